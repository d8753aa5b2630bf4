"""The QUIC transport on real UDP sockets on 127.0.0.1: handshake and identity checks,
streams, reuse, idle handling, and garbage on the shared port (datagrams:
tests/test_quic_datagrams.py; the nodes: p2pd/testing/quic_nodes.py)."""

from __future__ import annotations

import itertools
import math
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import AlertDescription
from test_udp_gso import kernel_offloads

from p2pd.config import QuicConfig
from p2pd.errors import (
    ConnectionLost,
    LocalError,
    PeerKeyMismatch,
)
from p2pd.identity import Identity
from p2pd.testing.quic_nodes import echo, echoed, open_node, read_all
from p2pd.testing.waiting import wait_for
from p2pd.transport.quic import (
    ALPN,
    QuicPeer,
    QuicStream,
    StreamBroken,
)
from p2pd.transport.tls import certificate_public_key, make_certificate
from p2pd.transport.udp import RECV_BURST, UdpEndpoint
from p2pd.wire import Address

TIMEOUT = 20


# --------------------------------------------------------------------------- handshake


async def test_handshake_shares_the_port_with_the_dht() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_node("alice") as alice, open_node("bob") as bob:
            # DHT frames (0x00 request, 0x01 response) on the very sockets QUIC uses.
            alice.udp.sendto(b"\x00dht request", bob.address)
            peer = await alice.quic.connect(bob.address, bob.key)
            alice.udp.sendto(b"\x01dht response", bob.address)
            await wait_for(lambda: len(bob.dht_datagrams) == 2, "DHT frames delivered")
            assert bob.dht_datagrams == [b"\x00dht request", b"\x01dht response"]

            assert peer.public_key == bob.key
            assert peer.is_client
            # The server learned the client's key from its certificate.
            await wait_for(lambda: bool(bob.incoming), "incoming connection reported")
            (incoming,) = bob.incoming
            assert incoming.public_key == alice.key
            assert not incoming.is_client
            assert incoming.address == alice.address
            assert bob.udp.stats["dropped_unknown"] == 0


async def test_impostor_server_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_node("alice") as alice, open_node("mallory") as mallory:
            expected = Identity.generate("bob").public_key
            with pytest.raises(PeerKeyMismatch, match="expected"):
                await alice.quic.connect(mallory.address, expected)
            assert alice.quic.peers() == []
            # The impostor never completed its side: the client closed before Finished.
            await wait_for(lambda: len(mallory.closed) == 1, "impostor side closed")
            assert mallory.incoming == []
            # The failure is not cached: the right key still connects.
            peer = await alice.quic.connect(mallory.address, mallory.key)
            assert peer.public_key == mallory.key


async def raw_aioquic_client(
    server: tuple[str, int], configuration: QuicConfiguration
) -> list[events.QuicEvent]:
    """Drive a bare aioquic client over a trio socket until its connection ends."""
    seen: list[events.QuicEvent] = []
    conn = QuicConnection(configuration=configuration)
    with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        conn.connect(server, now=trio.current_time())
        while True:
            for data, addr in conn.datagrams_to_send(now=trio.current_time()):
                await sock.sendto(data, addr)
            timer = conn.get_timer()
            with trio.move_on_at(timer if timer is not None else math.inf) as scope:
                data, addr = await sock.recvfrom(65536)
                conn.receive_datagram(data, (addr[0], addr[1]), now=trio.current_time())
            if scope.cancelled_caught:
                conn.handle_timer(now=trio.current_time())
            while (event := conn.next_event()) is not None:
                seen.append(event)
                if isinstance(event, events.ConnectionTerminated):
                    return seen


def client_configuration(alpn: str, identity: Identity | None) -> QuicConfiguration:
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=[alpn], verify_mode=ssl.CERT_NONE
    )
    if identity is not None:
        configuration.certificate, configuration.private_key = make_certificate(identity)
    return configuration


async def test_client_without_certificate_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_node("bob") as bob:
            seen = await raw_aioquic_client(bob.address, client_configuration(ALPN, None))
            terminated = seen[-1]
            assert isinstance(terminated, events.ConnectionTerminated)
            assert terminated.error_code == (
                QuicErrorCode.CRYPTO_ERROR + AlertDescription.certificate_required
            )
            assert bob.incoming == []


async def test_other_alpn_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_node("bob") as bob:
            configuration = client_configuration("h3", Identity.generate("eve"))
            seen = await raw_aioquic_client(bob.address, configuration)
            assert not any(isinstance(e, events.HandshakeCompleted) for e in seen)
            terminated = seen[-1]
            assert isinstance(terminated, events.ConnectionTerminated)
            assert terminated.error_code == (
                QuicErrorCode.CRYPTO_ERROR + AlertDescription.no_application_protocol
            )
            assert bob.incoming == []


def test_certificate_carries_the_identity_key() -> None:
    identity = Identity.generate("alice")
    certificate, _ = make_certificate(identity)
    assert certificate_public_key(certificate) == identity.public_key
    assert certificate_public_key(None) is None
    # The seed never appears in the certificate.
    from cryptography.hazmat.primitives.serialization import Encoding

    assert identity.seed not in certificate.public_bytes(Encoding.DER)


async def test_connect_to_nobody_times_out() -> None:
    config = QuicConfig(handshake_timeout=0.5)
    with trio.fail_after(TIMEOUT):
        async with open_node("alice", config=config) as alice:
            silent = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            with silent:
                await silent.bind(("127.0.0.1", 0))
                with pytest.raises(ConnectionLost, match="timed out"):
                    await alice.quic.connect(
                        silent.getsockname(), Identity.generate("xavier").public_key
                    )


async def test_a_connect_while_the_node_shuts_down_is_a_local_error() -> None:
    """A task that still connects while the endpoint's nursery is closing (a clean-clone
    CI run saw delivery's mailbox acks do it) gets LocalError, which its callers handle,
    not trio's RuntimeError, and holds no connection slot."""
    with trio.fail_after(TIMEOUT):
        async with open_node("alice") as alice:
            async with trio.open_nursery() as closed:
                pass  # exited: "closed to new arrivals", as the endpoint's is at shutdown
            serving = alice.quic._nursery
            alice.quic._nursery = closed
            try:
                with pytest.raises(LocalError, match="shutting down"):
                    await alice.quic.connect(
                        ("127.0.0.1", 9), Identity.generate("xavier").public_key
                    )
            finally:
                alice.quic._nursery = serving
            assert alice.quic.budget.total == 0
            assert alice.quic.peers() == []


# --------------------------------------------------------------------------- streams


async def test_stream_echo_one_megabyte_both_ways() -> None:
    payload = os.urandom(1 << 20)
    with trio.fail_after(TIMEOUT):
        async with open_node("alice") as alice, open_node("bob", on_stream=echo) as bob:
            peer = await alice.quic.connect(bob.address, bob.key)
            stream = await peer.open_stream()
            assert await echoed(stream, payload) == payload
            await stream.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"x")


@pytest.mark.parametrize("gso", ["on", "off"])
async def test_bulk_data_goes_out_segmented_and_arrives_intact(
    gso: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: a step's packets for one peer leave in segmented sends (UDP_SEGMENT)
    and come in as coalesced reads (UDP_GRO); the bytes are the same either way."""
    if gso == "off":
        monkeypatch.setenv("P2PD_NO_GSO", "1")
    payload = os.urandom(2 << 20)
    with trio.fail_after(TIMEOUT):
        async with open_node("alice") as alice, open_node("bob", on_stream=echo) as bob:
            if gso == "on" and not kernel_offloads():
                pytest.skip("this kernel has no UDP_SEGMENT")
            peer = await alice.quic.connect(bob.address, bob.key)
            stream = await peer.open_stream()
            assert await echoed(stream, payload) == payload
            for node in (alice, bob):
                stats = node.udp.stats
                if gso == "on":
                    # most packets went out in batches; some reads were coalesced
                    assert stats["gso_datagrams"] > (len(payload) // 1200) // 2
                    assert stats["gro_reads"] > 0
                else:
                    assert stats["gso_sends"] == stats["gro_reads"] == 0
                assert stats["gso_refused"] == stats["gso_failed"] == stats["send_errors"] == 0


async def test_send_all_with_eof_puts_the_fin_in_the_same_packet() -> None:
    """A message and its FIN travel in one packet (p2pd.delivery writes every exchange
    so): one packet with STREAM frames goes out, and the receiver reads the data and
    the end together."""
    from aioquic.quic.logger import QuicLogger

    seen: list[tuple[bytes, bool]] = []

    async def handler(peer: QuicPeer, stream: QuicStream) -> None:
        data = await stream.receive_some()
        seen.append((data, stream.at_eof))
        seen.append((await stream.receive_some(), stream.at_eof))

    with trio.fail_after(TIMEOUT):
        async with open_node("alice") as alice, open_node("bob", on_stream=handler) as bob:
            peer = await alice.quic.connect(bob.address, bob.key)
            logger = QuicLogger()
            peer.quic._quic_logger = logger.start_trace(is_client=True, odcid=b"test")
            stream = await peer.open_stream()
            await stream.send_all(b"hello", eof=True)
            await wait_for(lambda: len(seen) == 2, "the handler read data and end")
            assert seen == [(b"hello", True), (b"", True)]
            sent = [
                event["data"]["frames"]
                for event in logger.to_dict()["traces"][0]["events"]
                if event["name"] == "transport:packet_sent"
            ]
            with_stream = [f for f in sent if any(x["frame_type"] == "stream" for x in f)]
            assert len(with_stream) == 1, sent
            (frame,) = [x for x in with_stream[0] if x["frame_type"] == "stream"]
            assert frame["fin"] and frame["length"] == 5
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"more")
            await stream.aclose()


async def test_a_last_write_leaves_at_once_and_an_answer_carries_the_ack() -> None:
    """One message and one answer are one packet each way (p2pd.delivery's exchange):
    ``send_all(eof=True)`` has sent its packet when it returns (not a scheduling round
    later, after the writer's own work), and the answer carries the ACK of what it
    answers, where aioquic would have sent it 1 ms later in a packet of its own."""
    from aioquic.quic.logger import QuicLogger

    async def answer(peer: QuicPeer, stream: QuicStream) -> None:
        request = await read_all(stream)
        await stream.send_all(b"re: " + request, eof=True)

    Frames = list[dict[str, Any]]

    def sent(logger: QuicLogger) -> list[tuple[int, Frames]]:
        events = logger.to_dict()["traces"][0]["events"]
        return [
            (e["data"]["header"]["packet_number"], e["data"]["frames"])
            for e in events
            if e["name"] == "transport:packet_sent"
        ]

    def first_sent(packets: list[tuple[int, Frames]], sid: int) -> list[tuple[int, Frames]]:
        """The packets that carry data of stream ``sid`` for the first time. On a
        starved machine (two CPU hogs beside 4 xdist workers on 2 cores) a PTO fires
        before the peer's ACK is read, and aioquic's probe sends the oldest packet's
        data again (a PING and the same STREAM frame: RFC 9002 section 6.2.4): a
        retransmission, not a second packet of the message."""
        seen: set[tuple[int, int]] = set()
        firsts = []
        for number, frames in packets:
            data = {
                (x["offset"], x["length"])
                for x in frames
                if x["frame_type"] == "stream" and x["stream_id"] == sid
            }
            if data - seen:
                firsts.append((number, frames))
                seen |= data
        return firsts

    def acked(frames: Frames) -> set[int]:
        return {
            n
            for x in frames
            if x["frame_type"] == "ack"
            for low, high in x["acked_ranges"]
            for n in range(low, high + 1)
        }

    with trio.fail_after(TIMEOUT):
        async with open_node("alice") as alice, open_node("bob", on_stream=answer) as bob:
            peer = await alice.quic.connect(bob.address, bob.key)
            await wait_for(lambda: bool(bob.incoming), "bob has the connection")
            await trio.sleep(0.05)  # the handshake's last packets are acknowledged
            # aioquic's ACK delay (1 ms) made long: however slow the machine, bob's ACK
            # of a message can only go out early by riding with the answer.
            bob.incoming[0].quic._ack_delay = 5.0
            ours, theirs = QuicLogger(), QuicLogger()
            peer.quic._quic_logger = ours.start_trace(is_client=True, odcid=b"a")
            bob.incoming[0].quic._quic_logger = theirs.start_trace(is_client=False, odcid=b"b")
            messages = set()  # the packet numbers of alice's messages
            for i in range(8):
                stream = await peer.open_stream()
                await stream.send_all(b"message %d" % i, eof=True)
                # No other task ran since: the packet was sent by send_all itself.
                message = first_sent(sent(ours), stream.stream_id)
                assert len(message) == 1, (i, message)
                messages.add(message[0][0])
                assert await read_all(stream) == b"re: message %d" % i
                await stream.aclose()
                answers = first_sent(sent(theirs), stream.stream_id)
                assert len(answers) == 1, (i, answers)
                # the message's ACK rides with the answer
                assert message[0][0] in acked(answers[0][1]), (i, message, answers)
            # ...and none of them was acknowledged in a packet of bob's that holds
            # nothing else
            acked_alone = set().union(
                *(
                    acked(frames)
                    for _, frames in sent(theirs)
                    if {x["frame_type"] for x in frames} == {"ack"}
                )
            )
            assert len(messages) == 8 and not messages & acked_alone, (messages, acked_alone)


async def test_many_concurrent_streams() -> None:
    # More than the 128 streams aioquic lets a peer open at first (RFC 9000 section 4.6):
    # the later ones wait for MAX_STREAMS, which closed streams release.
    count = 200
    with trio.fail_after(TIMEOUT):
        async with open_node("alice") as alice, open_node("bob", on_stream=echo) as bob:
            peer = await alice.quic.connect(bob.address, bob.key)
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                stream = await peer.open_stream()
                message = f"message {i} ".encode() * (i + 1)
                await stream.send_all(message)
                await stream.send_eof()
                results[i] = await read_all(stream)
                await stream.aclose()

            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(one, i)
            assert results == {i: f"message {i} ".encode() * (i + 1) for i in range(count)}


async def test_send_all_waits_for_a_reader_and_buffers_are_bounded() -> None:
    window, send_buffer = 64 * 1024, 256 * 1024
    config = QuicConfig(stream_window=window, send_buffer=send_buffer)
    server_stream: list[QuicStream] = []
    reading = trio.Event()

    async def lazy(peer: QuicPeer, stream: QuicStream) -> None:
        server_stream.append(stream)
        await reading.wait()
        assert len(await read_all(stream)) == 4 << 20

    with trio.fail_after(TIMEOUT):
        async with (
            open_node("alice", config=config) as alice,
            open_node("bob", config=config, on_stream=lazy) as bob,
        ):
            peer = await alice.quic.connect(bob.address, bob.key)
            stream = await peer.open_stream()
            done = trio.Event()

            async def writer() -> None:
                await stream.send_all(b"\x00" * (4 << 20))
                await stream.send_eof()
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                await wait_for(lambda: bool(server_stream), "stream reached the server")
                receiver = server_stream[0]
                # Nobody reads: the peer may send one window, and we keep at most the
                # send buffer; send_all must be waiting, not buffering 4 MB.
                await wait_for(lambda: len(receiver._recv) >= window, "window filled")
                with trio.move_on_after(0.5):
                    await done.wait()
                assert not done.is_set()
                assert len(receiver._recv) <= window
                assert peer.quic.send_backlog(stream.stream_id) <= send_buffer
                reading.set()
            assert done.is_set()


async def test_failing_handler_resets_only_its_stream() -> None:
    async def picky(peer: QuicPeer, stream: QuicStream) -> None:
        data = await stream.receive_some()
        if data.startswith(b"boom"):
            raise RuntimeError("handler bug (expected by the test)")
        await stream.send_all(data)

    with trio.fail_after(TIMEOUT):
        async with open_node("alice") as alice, open_node("bob", on_stream=picky) as bob:
            peer = await alice.quic.connect(bob.address, bob.key)
            bad = await peer.open_stream()
            await bad.send_all(b"boom")
            with pytest.raises(StreamBroken, match="reset by the peer"):
                await read_all(bad)
            good = await peer.open_stream()
            await good.send_all(b"fine")
            await good.send_eof()
            assert await read_all(good) == b"fine"
            assert not peer.is_closing


async def test_closing_a_peer_breaks_its_streams_on_both_sides() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_node("alice") as alice, open_node("bob", on_stream=echo) as bob:
            peer = await alice.quic.connect(bob.address, bob.key)
            stream = await peer.open_stream()
            await stream.send_all(b"ping")
            assert await stream.receive_some() == b"ping"
            await wait_for(lambda: bool(bob.incoming), "incoming connection reported")
            bob.incoming[0].close("test")
            with pytest.raises(ConnectionLost):
                await stream.receive_some()
            await peer.wait_closed()
            assert isinstance(peer.error, ConnectionLost)
            with pytest.raises(ConnectionLost):
                await peer.open_stream()


def test_a_peer_close_shows_in_is_closing_before_the_terminated_event() -> None:
    """Connection.is_closing (aioquic's private _state) is how the endpoint frees the
    slot of a connection the peer closed at once, not three PTOs later when aioquic
    reports ConnectionTerminated."""
    from p2pd.transport.quic._aioquic import Connection

    certificate, key = make_certificate(Identity.generate("server"))
    client = Connection(
        configuration=QuicConfiguration(
            is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE
        ),
        stream_window=1 << 16,
    )
    server = Connection(
        configuration=QuicConfiguration(
            is_client=False, alpn_protocols=[ALPN], certificate=certificate, private_key=key
        ),
        original_destination_connection_id=client.original_destination_connection_id,
        stream_window=1 << 16,
    )
    now = 0.0
    client.connect(("127.0.0.1", 2), now=now)
    for _ in range(10):
        now += 0.01
        for src, dst, addr in (
            (client, server, ("127.0.0.1", 1)),
            (server, client, ("127.0.0.1", 2)),
        ):
            for data, _ in src.datagrams_to_send(now=now):
                dst.receive_datagram(data, addr, now=now)
    assert any(isinstance(e, events.HandshakeCompleted) for e in iter(server.next_event, None))
    assert not server.is_closing
    client.close()
    for data, _ in client.datagrams_to_send(now=now):
        server.receive_datagram(data, ("127.0.0.1", 1), now=now)
    assert server.is_closing
    assert not any(
        isinstance(e, events.ConnectionTerminated) for e in iter(server.next_event, None)
    )


# --------------------------------------------------------------------------- reuse, idle


async def test_connections_are_reused_in_both_directions() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_node("alice") as alice, open_node("bob") as bob:
            results: list[QuicPeer] = []

            async def connect() -> None:
                results.append(await alice.quic.connect(bob.address, bob.key))

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(connect)
            assert results[0] is results[1] is results[2]
            assert await alice.quic.connect(Address(*bob.address), bob.key) is results[0]
            assert alice.quic.statistics()["connections"] == 1
            # One port per node: bob reaches alice over the connection alice opened.
            await wait_for(lambda: bool(bob.incoming), "incoming connection reported")
            back = await bob.quic.connect(alice.address, alice.key)
            assert back is bob.incoming[0]
            assert bob.quic.statistics()["connections"] == 1
            # A closed connection is not reused.
            results[0].close()
            fresh = await alice.quic.connect(bob.address, bob.key)
            assert fresh is not results[0]


async def test_idle_connection_is_closed() -> None:
    config = QuicConfig(idle_close=0.3, keepalive_interval=0.1)
    with trio.fail_after(TIMEOUT):
        async with open_node("alice", config=config) as alice, open_node("bob") as bob:
            peer = await alice.quic.connect(bob.address, bob.key)
            start = trio.current_time()
            await peer.wait_closed()
            assert trio.current_time() - start >= 0.3
            assert peer.error is not None and "idle" in peer.error.message
            # Bob heard the CONNECTION_CLOSE, not an idle timeout of its own.
            await wait_for(lambda: len(bob.closed) == 1, "bob saw the close")
            assert bob.closed[0].error is not None
            assert "idle" in bob.closed[0].error.message


async def test_keepalive_holds_an_open_stream_past_the_idle_timeout() -> None:
    # A 1 s QUIC idle timeout on both sides; 2.5 s of application silence on an open
    # stream. Without our PINGs the connection would die (RFC 9000 section 10.1).
    config = QuicConfig(idle_timeout=1.0, keepalive_interval=0.3, idle_close=0.5)
    with trio.fail_after(TIMEOUT):
        async with (
            open_node("alice", config=config) as alice,
            open_node("bob", config=config, on_stream=echo) as bob,
        ):
            peer = await alice.quic.connect(bob.address, bob.key)
            stream = await peer.open_stream()
            await stream.send_all(b"hello")
            assert await stream.receive_some() == b"hello"
            await trio.sleep(2.5)  # the silence under test, not a synchronisation
            assert not peer.is_closing
            await stream.send_all(b"still here")
            assert await stream.receive_some() == b"still here"


# --------------------------------------------------------------------------- garbage


async def test_garbage_on_the_quic_port_is_dropped_and_counted() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_node("alice") as alice, open_node("bob", on_stream=echo) as bob:
            garbage = [
                b"\x40" + os.urandom(40),  # short header, unknown connection
                b"\x40",  # too short to hold a connection ID
                b"\xc0\x00\x00\x00\x01\x08" + os.urandom(4),  # truncated Initial
                b"\xc0\x00\x00\x00\x01\x08" + os.urandom(8) + b"\x00\x00\x44\xd0",  # no payload
                b"\xff" * 1300,  # long header, absurd connection ID length
                b"\xc3" + os.urandom(80),  # random long header
            ]
            for data in garbage:
                alice.udp.sendto(data, bob.address)
            await wait_for(
                lambda: bob.quic.stats["quic_dropped"] == len(garbage), "all garbage counted"
            )
            assert bob.quic.stats["quic_dropped_malformed"] >= 3
            assert bob.quic.statistics()["connections"] == 0
            # Still working.
            peer = await alice.quic.connect(bob.address, bob.key)
            stream = await peer.open_stream()
            await stream.send_all(b"after the garbage")
            await stream.send_eof()
            assert await read_all(stream) == b"after the garbage"


async def test_unknown_version_gets_version_negotiation() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_node("bob") as bob:
            with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as sock:
                await sock.bind(("127.0.0.1", 0))
                # Long header, version 0x1a2a3a4a (reserved for forcing negotiation).
                probe = b"\xc0\x1a\x2a\x3a\x4a\x08" + b"D" * 8 + b"\x08" + b"S" * 8
                await sock.sendto(probe + bytes(1200), bob.address)
                reply, _ = await sock.recvfrom(2048)
            assert reply[1:5] == b"\x00\x00\x00\x00"  # version 0: Version Negotiation
            assert b"\x00\x00\x00\x01" in reply[5 + 1 + 8 + 1 + 8 :]
            assert bob.quic.stats["quic_version_negotiation_sent"] == 1


async def test_forged_packets_for_a_live_connection_change_nothing() -> None:
    """Datagrams that carry a real connection ID but are not the peer's (random payload,
    truncated, a bogus long header) reach aioquic, which cannot decrypt them and drops
    them: a transfer running at the time completes intact and the connection stays."""
    payload = os.urandom(1 << 20)
    with trio.fail_after(TIMEOUT):
        async with open_node("alice") as alice, open_node("bob", on_stream=echo) as bob:
            peer = await alice.quic.connect(bob.address, bob.key)
            await wait_for(lambda: bool(bob.incoming), "incoming connection reported")
            cids = sorted(bob.incoming[0]._cids)
            stream = await peer.open_stream()
            received = b""

            async def reader() -> None:
                nonlocal received
                received = await read_all(stream)

            async def forger() -> None:
                for _ in range(20):
                    for cid in cids:
                        for forged in (
                            b"\x40" + cid + os.urandom(60),
                            b"\x5f" + cid,
                            b"\xc0\x00\x00\x00\x01" + bytes([len(cid)]) + cid + os.urandom(30),
                        ):
                            alice.udp.sendto(forged, bob.address)
                    await trio.sleep(0.002)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                nursery.start_soon(forger)
                await stream.send_all(payload)
                await stream.send_eof()
            assert received == payload
            assert not peer.is_closing and not bob.incoming[0].is_closing
            assert bob.closed == [] and alice.closed == []
            again = await peer.open_stream()
            await again.send_all(b"still here")
            await again.send_eof()
            assert await read_all(again) == b"still here"


async def test_udp_reads_bursts_and_flushes_once_per_burst() -> None:
    """UdpEndpoint.serve hands out every queued datagram (up to RECV_BURST) before it
    yields, then runs its flush hooks once: QUIC steps once per burst, not per packet."""
    with trio.fail_after(TIMEOUT):
        receiver = UdpEndpoint.bind(Address("127.0.0.1", 0))
        sender = UdpEndpoint.bind(Address("127.0.0.1", 0))
        quic: list[bytes] = []
        dht: list[bytes] = []
        flushes: list[int] = []
        receiver.add_flush_hook(lambda: flushes.append(len(quic) + len(dht)))
        to = receiver.local_address.as_tuple()
        total = RECV_BURST + 6
        try:
            # All queued before the receive task starts.
            for i in range(total):
                sender.sendto(b"\x40" + i.to_bytes(2, "big"), to)
            for odd in (b"\x00dht", b"", b"\x20neither"):
                sender.sendto(odd, to)
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    receiver.serve, lambda d, a: dht.append(d), lambda d, a: quic.append(d)
                )
                await wait_for(lambda: len(quic) == total and len(dht) == 1, "all delivered")
                await wait_for(lambda: receiver.stats["datagrams_in"] == total + 3, "counted")
                nursery.cancel_scope.cancel()
        finally:
            receiver.close()
            sender.close()
        assert quic == [b"\x40" + i.to_bytes(2, "big") for i in range(total)]
        assert dht == [b"\x00dht"]
        assert receiver.stats["dropped_unknown"] == 2  # empty, and an unknown first byte
        # One flush after each burst, each burst within the bound (per receive queue: QUIC
        # has its own on Linux); far fewer than one flush per datagram.
        bound = RECV_BURST * receiver.stats["queues"]
        assert flushes == sorted(flushes) and flushes[-1] == total + 1
        assert all(b - a <= bound for a, b in itertools.pairwise([0, *flushes]))
        assert 1 <= len(flushes) <= 8


async def test_a_dht_flood_cannot_fill_the_queue_quic_packets_wait_in() -> None:
    """Issue 12: QUIC has a receive queue of its own (SO_REUSEPORT and a BPF program that
    steers by the first byte, p2pd/transport/udp.py). A DHT flood that overflows the
    DHT's queue before the daemon reads any of it (a busy daemon, a fast flooder) drops
    only DHT datagrams: every QUIC packet sent after it is still read, first."""
    with trio.fail_after(TIMEOUT):
        receiver = UdpEndpoint.bind(Address("127.0.0.1", 0))
        sender = UdpEndpoint.bind(Address("127.0.0.1", 0))
        assert receiver.stats["queues"] == 2  # Linux: the tests run there
        quic: list[bytes] = []
        dht: list[bytes] = []
        to = receiver.local_address.as_tuple()
        flood = 20_000  # far more than a 1 MiB queue holds of 64-byte datagrams
        try:
            for _ in range(flood):
                sender.sendto(b"\x02" + bytes(63), to)
            for i in range(200):
                sender.sendto(b"\x40" + i.to_bytes(2, "big") + bytes(61), to)
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    receiver.serve, lambda d, a: dht.append(d), lambda d, a: quic.append(d)
                )
                await wait_for(lambda: len(quic) == 200, "every QUIC packet read")
                await wait_for(lambda: len(dht) > 0, "the DHT's queue read too")
                nursery.cancel_scope.cancel()
        finally:
            receiver.close()
            sender.close()
        assert len(dht) < flood  # the flood overflowed its own queue...
        assert [q[1:3] for q in quic] == [i.to_bytes(2, "big") for i in range(200)]


# The echo handler has the signature QuicEndpoint expects.
_echo: Callable[[QuicPeer, QuicStream], Awaitable[None]] = echo


# ---- the aioquic boundary


def test_only_the_aioquic_module_imports_aioquic() -> None:
    """Every reach into aioquic goes through p2pd/transport/quic/_aioquic.py, so moving
    the pin means reviewing one file (docs/ARCHITECTURE.md, "QUIC transport")."""
    import ast
    from pathlib import Path

    import p2pd

    root = Path(p2pd.__file__).parent
    importers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(name == "aioquic" or name.startswith("aioquic.") for name in names):
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"transport/quic/_aioquic.py"}


def test_another_aioquic_version_is_refused_at_import() -> None:
    from p2pd.transport.quic._aioquic import PINNED_VERSION, check_version

    check_version(PINNED_VERSION)
    with pytest.raises(ImportError, match=rf"needs aioquic {PINNED_VERSION}, found 1\.8\.0"):
        check_version("1.8.0")


async def test_a_stream_send_limit_caps_its_backlog_below_the_send_buffer() -> None:
    """A file transfer sets ``send_limit`` (p2pd/files/scavenger.py): the stream holds at
    most that much unacknowledged, not the whole send buffer, and everything still
    arrives once the reader reads."""
    window, send_buffer, limit = 64 * 1024, 256 * 1024, 16 * 1024
    config = QuicConfig(stream_window=window, send_buffer=send_buffer)
    server_stream: list[QuicStream] = []
    reading = trio.Event()
    received: list[int] = []

    async def lazy(peer: QuicPeer, stream: QuicStream) -> None:
        server_stream.append(stream)
        await reading.wait()
        received.append(len(await read_all(stream)))

    with trio.fail_after(TIMEOUT):
        async with (
            open_node("alice", config=config) as alice,
            open_node("bob", config=config, on_stream=lazy) as bob,
        ):
            peer = await alice.quic.connect(bob.address, bob.key)
            stream = await peer.open_stream()
            stream.send_limit = limit
            assert stream.send_high == limit

            async def writer() -> None:
                await stream.send_all(b"\x00" * (1 << 20))
                await stream.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                await wait_for(lambda: bool(server_stream), "stream reached the server")
                await wait_for(lambda: len(server_stream[0]._recv) >= limit, "limit sent")
                await trio.sleep(0.3)  # time to over-buffer, if it would
                assert peer.quic.send_backlog(stream.stream_id) <= limit
                reading.set()
            await wait_for(lambda: bool(received), "the reader finished")
            assert received == [1 << 20]
            stream.send_limit = 1 << 30  # above the send buffer: the send buffer holds
            assert stream.send_high == send_buffer
