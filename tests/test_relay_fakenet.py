"""Relays on the simulated network (p2pd.testing.fakenet), in virtual time: the trio glue
(:class:`p2pd.relay.Relays`) and real QUIC endpoints, each peer behind its own
endpoint-dependent NAT. A QUIC connection through a relay carries a stream both ways;
when the relay dies, the NATed peer registers with another within its refresh interval
and is reachable again through it (issue 13, item 5: measured in virtual seconds)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio
import trio.testing

from p2pd.config import QuicConfig, RelayConfig
from p2pd.identity import Identity
from p2pd.relay import Relays, is_virtual
from p2pd.relay.client import RESEND, TRIES
from p2pd.relay.service import CHECK_INTERVAL, NO_CANDIDATES_RECHECK
from p2pd.testing.fakenet import FakeHost, FakeNetwork, FakeUdpEndpoint
from p2pd.testing.quic_nodes import echo_whole
from p2pd.testing.waiting import wait_for
from p2pd.transport.quic import QuicEndpoint, QuicPeer
from p2pd.wire import Address

PORT = 4747


@dataclass
class Node:
    host: FakeHost
    udp: FakeUdpEndpoint
    relays: Relays
    quic: QuicEndpoint
    identity: Identity


async def start(
    nursery: trio.Nursery,
    net: FakeNetwork,
    name: str,
    *,
    nat: str | None,
    candidates: list[Address],
    natted: Callable[[], bool] | None = None,
) -> Node:
    host = net.add_host(nat=nat)
    udp = host.bind(PORT)
    identity = Identity.generate(name)
    relays = Relays(
        RelayConfig(refresh_interval=25.0),
        identity,
        udp.sendto,
        on_packet=lambda packet, virtual: quic.datagram_received(packet, virtual),
        needs_relays=natted or (lambda: nat is not None),
        candidates=lambda: list(candidates),
    )
    quic = QuicEndpoint(
        udp,  # type: ignore[arg-type]  # FakeUdpEndpoint has UdpEndpoint's surface
        identity,
        QuicConfig(),
        on_stream=echo_whole,
        virtual_send=relays.send,
        is_virtual=is_virtual,
    )
    await nursery.start(quic.serve)
    await nursery.start(relays.run)
    await nursery.start(
        udp.serve, lambda d, a: None, quic.datagram_received, relays.datagram_received
    )
    return Node(host, udp, relays, quic, identity)


async def round_trip(alice: Node, bob: Node, relay: Address) -> QuicPeer:
    virtual = await alice.relays.connect(relay, bob.identity.public_key)
    peer = await alice.quic.connect(virtual, bob.identity.public_key)
    assert is_virtual(peer.address[0])
    stream = await peer.open_stream()
    message = b"through the relay " * 500  # several packets each way
    await stream.send_all(message, eof=True)
    back = b""
    while chunk := await stream.receive_some():
        back += chunk
    assert back == message
    return peer


async def test_quic_through_a_relay_and_a_relay_that_dies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNetwork(seed=3, median_rtt=0.04, loss=0.01)
    with trio.fail_after(600):  # virtual seconds
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            r1 = await start(nursery, net, "relay_one", nat=None, candidates=[])
            r2 = await start(nursery, net, "relay_two", nat=None, candidates=[])
            relays = [r1.udp.local_address, r2.udp.local_address]
            alice = await start(nursery, net, "alice", nat="edm", candidates=relays)
            offered = relays[:1]
            bob = await start(nursery, net, "bob", nat="edm", candidates=offered)
            await wait_for(lambda: bob.relays.registered() == relays[:1], "bob registered")
            await wait_for(lambda: len(alice.relays.registered()) == 2, "alice registered")

            peer = await round_trip(alice, bob, relays[0])
            stats = r1.relays.server.statistics()
            assert stats["circuits"] == 1 and stats["relayed_bytes"] > 2 * 9000
            assert r2.relays.server.statistics()["relayed_bytes"] == 0
            peer.close("done")

            # The relay dies. Bob (offered the other one now) notices at his next
            # refresh, three unanswered tries later, and registers with the other.
            offered.append(relays[1])
            r1.host.shutdown()
            died = trio.current_time()
            await wait_for(lambda: bob.relays.registered() == relays[1:], "bob moved", timeout=60)
            moved = trio.current_time() - died
            assert moved <= 25.0 + TRIES * RESEND + 5.0 + 1.0, moved  # refresh, tries, check
            print(f"bob registered with the other relay {moved:.1f} virtual s after the kill")
            await round_trip(alice, bob, relays[1])
            assert r2.relays.server.statistics()["circuits"] == 1
            nursery.cancel_scope.cancel()


async def test_a_node_that_learns_it_is_natted_registers_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The DHT's reachability says we are NATed (its ``on_change``, wired to
    ``Relays.reachability_changed`` in p2pd/daemon.py): the registrations start then, not
    at the relay service's next look (every CHECK_INTERVAL, 5 s): a NATed daemon's
    record lists relays that much sooner after it starts."""
    net = FakeNetwork(seed=5, median_rtt=0.04)
    natted = False
    with trio.fail_after(60):  # virtual seconds
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            relay = await start(nursery, net, "relay", nat=None, candidates=[])
            address = [relay.udp.local_address]
            alice = await start(
                nursery, net, "alice", nat="edm", candidates=address, natted=lambda: natted
            )
            await trio.sleep(1.0)  # the service looked once, at its start: not NATed
            assert alice.relays.registered() == []
            natted = True
            told = trio.current_time()
            alice.relays.reachability_changed()
            await wait_for(lambda: alice.relays.registered() == address, "registered", timeout=10)
            took = trio.current_time() - told
            # a HELLO and a REGISTER round trip; the next look would have come 4 s later
            assert took < 1.0 < CHECK_INTERVAL - 1.0, took
            nursery.cancel_scope.cancel()


async def test_a_natted_node_with_no_candidates_yet_registers_soon_after_its_join(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A daemon learns it is NATed before its DHT join has filled the routing table that
    the relay candidates come from: the service's look at its start finds none. It looks
    again NO_CANDIDATES_RECHECK later, not at its next CHECK_INTERVAL (5 s), so the
    registration follows the join by about a round trip (in tests/test_upgrade_netns.py
    the network took 5-6 s longer to settle in 18 of 50 runs before)."""
    net = FakeNetwork(seed=7, median_rtt=0.04)
    with trio.fail_after(60):  # virtual seconds
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            relay = await start(nursery, net, "relay", nat=None, candidates=[])
            table: list[Address] = []  # alice's routing table: empty until she joins
            alice = await start(nursery, net, "alice", nat="edm", candidates=table)
            await trio.sleep(1.0)  # the join under way
            assert alice.relays.registered() == []
            table.append(relay.udp.local_address)  # joined
            joined = trio.current_time()
            await wait_for(lambda: alice.relays.registered() == table, "registered", timeout=10)
            took = trio.current_time() - joined
            # the next look at most NO_CANDIDATES_RECHECK after the join, then a HELLO and
            # a REGISTER round trip; the next regular look would have come 4 s later
            assert took < NO_CANDIDATES_RECHECK + 0.5 < CHECK_INTERVAL - 1.0, took
            nursery.cancel_scope.cancel()
