"""The QUIC transport's timers on the fake network (p2pd/testing/fakenet.py) under trio's
MockClock: a stall of the process is a jump of the clock, so what a starved machine
does now and then happens here every run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing
from aioquic.quic.logger import QuicLogger

from p2pd.config import QuicConfig
from p2pd.identity import Identity
from p2pd.testing.fakenet import FakeNetwork, FakeUdpEndpoint
from p2pd.testing.quic_nodes import read_all
from p2pd.transport.quic import QuicEndpoint, QuicPeer, QuicStream
from p2pd.transport.quic.peer import NetworkAddress


async def answer(peer: QuicPeer, stream: QuicStream) -> None:
    request = await read_all(stream)
    await stream.send_all(b"re: " + request, eof=True)


@asynccontextmanager
async def open_fake_node(
    net: FakeNetwork, name: str, on_datagram: Any = None
) -> AsyncIterator[tuple[Identity, FakeUdpEndpoint, QuicEndpoint]]:
    """A QUIC endpoint on a host of ``net``; ``on_datagram(quic, data, addr)`` (if
    given) stands between the UDP task and the endpoint."""
    udp = net.add_host().bind(4000)
    identity = Identity.generate(name)
    quic = QuicEndpoint(
        udp,  # type: ignore[arg-type]  # FakeUdpEndpoint has UdpEndpoint's surface
        identity,
        QuicConfig(),
        on_stream=answer,
    )

    def received(data: bytes, addr: NetworkAddress) -> None:
        if on_datagram is None:
            quic.datagram_received(data, addr)
        else:
            on_datagram(quic, data, addr)

    async with trio.open_nursery() as nursery:
        await nursery.start(quic.serve)
        await nursery.start(udp.serve, lambda d, a: None, received)
        yield identity, udp, quic
        nursery.cancel_scope.cancel()


async def test_an_ack_read_after_a_stall_leaves_no_probe_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Alice's process stalls (1 s) just before it reads bob's answer, which
    acknowledges her message: by then her PTO deadline has passed, but the answer
    acknowledges everything in flight, so there is nothing to probe for. The step that
    reads it must not fire the PTO on the deadline it computed before (aioquic's
    ``handle_timer`` acts on the loss deadline of the last ``get_timer()``): that sent
    a PING probe, and backed the PTO off, after every late ACK on a loaded machine."""
    stall = {"armed": False}

    def stalling(quic: QuicEndpoint, data: bytes, addr: NetworkAddress) -> None:
        if stall["armed"]:
            stall["armed"] = False
            autojump_clock.jump(1.0)
        quic.datagram_received(data, addr)

    net = FakeNetwork(seed=3, median_rtt=0.02, jitter=0.0)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            async with (
                open_fake_node(net, "alice", stalling) as (_, _, alice),
                open_fake_node(net, "bob") as (bob, bob_udp, _),
            ):
                peer = await alice.connect(bob_udp.local_address, bob.public_key)
                for i in range(3):  # RTT samples, the handshake confirmed
                    stream = await peer.open_stream()
                    await stream.send_all(b"warm-up %d" % i, eof=True)
                    assert await read_all(stream) == b"re: warm-up %d" % i
                    await stream.aclose()
                await trio.sleep(1.0)  # every ACK is in
                logger = QuicLogger()
                peer.quic._quic_logger = logger.start_trace(is_client=True, odcid=b"a")

                stream = await peer.open_stream()
                stall["armed"] = True
                await stream.send_all(b"message", eof=True)
                assert await read_all(stream) == b"re: message"
                await stream.aclose()
                assert not stall["armed"]  # the stall happened, before the answer was read
                await trio.sleep(1.0)
                events = logger.to_dict()["traces"][0]["events"]
                sent = [e["data"]["frames"] for e in events if e["name"] == "transport:packet_sent"]
                probes = [
                    frames for frames in sent if any(x["frame_type"] == "ping" for x in frames)
                ]
                assert probes == [], sent
                assert peer.quic._loss._pto_count == 0
            nursery.cancel_scope.cancel()


async def test_a_connect_after_the_peer_came_back_does_not_wait_for_an_old_handshakes_resend(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Bob is down (his host drops everything) when alice first connects; her attempt
    gives up after 1 s, as delivery's does after its connect timeout, while the
    handshake runs on, resending its Initial ever later (0.2, 0.4, 0.8, 1.6 s...). Bob
    is back at 1.5 s and alice connects again at once: she is through within a round
    trip or two (the fake network's is 20 ms), not at the old handshake's next resend
    (3.0 s, 1.5 s later), which is what reusing it waited for (seen as a restarted peer
    reached 2.6 s late in test_delivery). Concurrent connects in the first second
    still share one handshake."""
    up = {"bob": False}

    def bob_host(quic: QuicEndpoint, data: bytes, addr: NetworkAddress) -> None:
        if up["bob"]:
            quic.datagram_received(data, addr)

    net = FakeNetwork(seed=5, median_rtt=0.02, jitter=0.0)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            async with (
                open_fake_node(net, "alice") as (_, _, alice),
                open_fake_node(net, "bob", bob_host) as (bob, bob_udp, _),
            ):
                start = trio.current_time()
                firsts: list[QuicPeer] = []

                async def first_attempt() -> None:
                    with trio.move_on_after(1.0):
                        firsts.append(await alice.connect(bob_udp.local_address, bob.public_key))

                async with trio.open_nursery() as attempts:  # two at once: one handshake
                    attempts.start_soon(first_attempt)
                    attempts.start_soon(first_attempt)
                    await trio.sleep(0.1)
                    assert len(alice._all) == 1
                assert firsts == []  # both gave up: bob is down
                await trio.sleep_until(start + 1.5)
                up["bob"] = True
                back = trio.current_time()
                peer = await alice.connect(bob_udp.local_address, bob.public_key)
                took = trio.current_time() - back
                assert peer.is_established and took < 0.2, took
            nursery.cancel_scope.cancel()
