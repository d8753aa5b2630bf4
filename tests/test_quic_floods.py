"""QUIC under load, on real UDP sockets on 127.0.0.0/8 (issue 12, item 4): an attacker
floods a node with real Initial packets from many source addresses (each socket bound
to its own 127.77.x.y, as spoofed sources would be), and the defences of
p2pd.transport.quic.admission hold: Retry once handshakes pile up, per-address limits,
a reserve for our own connections and pinned contacts, a short half-open timeout. An
honest peer and a pinned contact still connect and talk meanwhile, and the counters
say what happened."""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from p2pd.api import Api
from p2pd.config import LanConfig, NodeConfig, QuicConfig
from p2pd.daemon import Node, open_node
from p2pd.errors import ConnectionLost
from p2pd.identity import Identity
from p2pd.messaging import DELIVERED
from p2pd.testing.daemons import short_tempdir
from p2pd.testing.quic_flood import InitialForge
from p2pd.testing.quic_nodes import Node as QuicNode
from p2pd.testing.quic_nodes import echo
from p2pd.testing.waiting import wait_for
from p2pd.transport.quic import PinCheck, QuicPeer, open_quic_endpoint
from p2pd.transport.quic._aioquic import (
    Buffer,
    Connection,
    QuicConfiguration,
    QuicErrorCode,
    QuicPacketType,
    events,
    pull_quic_header,
)
from p2pd.transport.tls import make_certificate
from p2pd.transport.udp import UdpEndpoint
from p2pd.wire import Address

TIMEOUT = 30


@asynccontextmanager
async def quic_peer(
    handle: str,
    *,
    host: str = "127.0.0.1",
    config: QuicConfig | None = None,
    is_pinned: PinCheck | None = None,
) -> AsyncIterator[QuicNode]:
    identity = Identity.generate(handle)
    udp = UdpEndpoint.bind(Address(host, 0))
    closed: list[QuicPeer] = []
    try:
        async with (
            open_quic_endpoint(
                udp, identity, config, on_stream=echo, on_closed=closed.append, is_pinned=is_pinned
            ) as quic,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(udp.serve, lambda data, addr: None, quic.datagram_received)
            yield QuicNode(identity, udp, quic, closed=closed)
            nursery.cancel_scope.cancel()
    finally:
        udp.close()


async def say_hello(client: QuicNode, server: QuicNode, text: bytes) -> bytes:
    """Connect (or reuse), send ``text`` on a stream, return the server's echo."""
    peer = await client.quic.connect(server.address, server.key)
    stream = await peer.open_stream()
    await stream.send_all(text, eof=True)
    out = b""
    for _ in range(100):
        data = await stream.receive_some()
        if not data:
            break
        out += data
    return out


@asynccontextmanager
async def flood_sockets(count: int) -> AsyncIterator[list[socket.socket]]:
    """``count`` non-blocking UDP sockets, each on its own address 127.77.x.y."""
    sockets = []
    try:
        for i in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.setblocking(False)
            sock.bind((f"127.77.{i // 200}.{i % 200 + 1}", 0))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Flood:
    """Fresh Initials, round-robin from ``sockets``, until stopped or ``limit`` sent;
    the attacker reads nothing (a spoofer never sees the answers)."""

    target: tuple[str, int]
    sockets: list[socket.socket]
    limit: int = 20_000
    sent: int = 0
    stop: trio.Event = field(default_factory=trio.Event)

    async def run(self, watch: Callable[[], None] = lambda: None) -> None:
        forge = InitialForge(self.target)
        for i in range(self.limit):
            if self.stop.is_set():
                return
            try:
                self.sockets[i % len(self.sockets)].sendto(forge.initial(), self.target)
                self.sent += 1
            except BlockingIOError:
                pass
            watch()
            await trio.lowlevel.checkpoint()  # the node runs in this process too


def received_types(sock: socket.socket) -> list[QuicPacketType]:
    """The long-header types of every datagram waiting on ``sock`` (read, not kept)."""
    found = []
    for _ in range(100_000):
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            break
        header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        found.append(header.packet_type)
    return found


# --------------------------------------------------------------------------- the flood


async def test_an_initial_flood_takes_the_retry_path_and_honest_peers_get_through() -> None:
    """64 addresses flood bob with fresh Initials. Half-open connections stop at
    retry_after_half_open (32): every further Initial without a token gets a Retry and
    no slot. alice (a stranger) and carol (a contact bob pins) connect meanwhile, each
    after a Retry, and talk; the spoofed handshakes are dropped after half_open_timeout.
    """
    config = QuicConfig(half_open_timeout=6.0)  # > the honest phase, even on a busy machine
    threshold = config.retry_after_half_open
    with trio.fail_after(TIMEOUT):
        async with (
            quic_peer("carol", host="127.0.0.3") as carol,
            quic_peer("bob", config=config, is_pinned=lambda k: k == carol.key) as bob,
            quic_peer("alice", host="127.0.0.2") as alice,
            flood_sockets(64) as sockets,
            trio.open_nursery() as nursery,
        ):
            most_half_open = 0

            def watch() -> None:
                nonlocal most_half_open
                most_half_open = max(most_half_open, bob.quic.budget.half_open)

            flood = Flood(bob.address, sockets)
            nursery.start_soon(flood.run, watch)
            stats = bob.quic.stats
            await wait_for(lambda: stats["quic_retries_sent"] >= 100, "the flood met Retries")
            assert bob.quic.budget.half_open == threshold

            assert await say_hello(alice, bob, b"hello from alice") == b"hello from alice"
            assert await say_hello(carol, bob, b"hello from carol") == b"hello from carol"
            flood.stop.set()

            # Both came in with a token: the Retry path, followed by aioquic's client.
            assert stats["quic_validated_accepted"] == 2
            assert most_half_open <= threshold + 2
            assert stats["quic_connections_accepted"] == threshold + 2
            # Every other flooding Initial got a Retry (and alice's and carol's first).
            assert stats["quic_retries_sent"] <= flood.sent - threshold + 2
            slots = bob.quic.budget.statistics()
            assert (slots["slots_stranger"], slots["slots_pinned"]) == (1, 1)
            # The spoofed sources got Retries (about 100 bytes), never a slot.
            assert QuicPacketType.RETRY in received_types(sockets[-1])
            # The spoofed handshakes go after half_open_timeout, silently.
            await wait_for(lambda: bob.quic.budget.half_open == 0, "half-open dropped")
            assert stats["quic_half_open_dropped"] == threshold
            assert {"quic_retries_sent", "quic_half_open_dropped"} <= set(stats)
            # The honest connections outlive them.
            assert await say_hello(alice, bob, b"still here") == b"still here"


async def test_one_address_gets_at_most_its_share_of_handshakes() -> None:
    """From one address, 4 handshakes at a time (max_half_open_per_address); the rest
    are refused at once with CONNECTION_REFUSED (48 bytes, not a slot), and another
    address is unaffected."""
    with trio.fail_after(TIMEOUT):
        async with (
            quic_peer("bob") as bob,
            quic_peer("alice", host="127.0.0.2") as alice,
            flood_sockets(1) as sockets,
        ):
            flood = Flood(bob.address, sockets, limit=20)
            await flood.run()
            stats = bob.quic.stats
            await wait_for(lambda: stats["quic_refused_per_address"] == 16, "16 refused")
            assert bob.quic.budget.half_open == 4
            assert stats["quic_connections_accepted"] == 4
            types = received_types(sockets[0])
            # 16 refusals: each a stateless Initial (the 4 admitted answer with theirs).
            assert types.count(QuicPacketType.INITIAL) >= 16
            assert await say_hello(alice, bob, b"hi") == b"hi"


async def test_a_refused_client_learns_it_at_once() -> None:
    """aioquic's client (ours) sees CONNECTION_REFUSED as a close, not a timeout."""
    config = QuicConfig(max_connections_per_address=1)
    with trio.fail_after(TIMEOUT):
        async with (
            quic_peer("bob", config=config) as bob,
            quic_peer("alice") as alice,
            quic_peer("mallory") as mallory,  # same address as alice: 127.0.0.1
        ):
            assert await say_hello(mallory, bob, b"first") == b"first"
            started = trio.current_time()
            with pytest.raises(ConnectionLost, match="CONNECTION_REFUSED"):
                await alice.quic.connect(bob.address, bob.key)
            assert trio.current_time() - started < config.handshake_timeout / 2
            assert bob.quic.stats["quic_refused_per_address"] == 1


# --------------------------------------------------------------------------- tokens


async def test_our_client_follows_a_retry() -> None:
    """retry_after_half_open = 0: every Initial without a token gets a Retry. Our
    client (aioquic's) answers it with the token and the handshake completes, with the
    transport parameters a Retry requires (RFC 9000 section 7.3) checked by aioquic."""
    with trio.fail_after(TIMEOUT):
        async with (
            quic_peer("bob", config=QuicConfig(retry_after_half_open=0)) as bob,
            quic_peer("alice") as alice,
        ):
            assert await say_hello(alice, bob, b"after a retry") == b"after a retry"
            stats = bob.quic.stats
            assert (stats["quic_retries_sent"], stats["quic_validated_accepted"]) == (1, 1)
            assert stats["quic_tokens_refused"] == 0


def raw_client(token: bytes = b"") -> Connection:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=["p2pd/1"], token=token)
    configuration.certificate, configuration.private_key = make_certificate(
        Identity.generate("eve")
    )
    return Connection(configuration=configuration, stream_window=1 << 16)


async def test_a_token_from_another_address_or_forged_is_refused() -> None:
    """eve gets a Retry at one address and replays the Initial carrying its token from
    another: INVALID_TOKEN, no slot. A token she makes up fares the same."""
    with trio.fail_after(TIMEOUT):
        async with (
            quic_peer("bob", config=QuicConfig(retry_after_half_open=0)) as bob,
            flood_sockets(2) as pair,
        ):
            here, there = (trio.socket.from_stdlib_socket(s) for s in pair)
            eve = raw_client()
            eve.connect(bob.address, now=trio.current_time())
            for data, addr in eve.datagrams_to_send(now=trio.current_time()):
                await here.sendto(data, addr)
            retry, addr = await here.recvfrom(65536)
            eve.receive_datagram(retry, (addr[0], addr[1]), now=trio.current_time())
            (with_token, _), *_ = eve.datagrams_to_send(now=trio.current_time())
            assert pull_quic_header(Buffer(data=with_token), host_cid_length=8).token
            await there.sendto(with_token, bob.address)  # the wrong address
            refusal, _ = await there.recvfrom(65536)
            assert len(refusal) < len(with_token)
            stats = bob.quic.stats
            assert stats["quic_tokens_refused"] == 1
            assert bob.quic.budget.total == 0

            forged = raw_client(token=b"\x00" * 60)
            forged.connect(bob.address, now=trio.current_time())
            for data, addr in forged.datagrams_to_send(now=trio.current_time()):
                await here.sendto(data, addr)
            close, _ = await here.recvfrom(65536)
            forged.receive_datagram(close, bob.address, now=trio.current_time())
            # aioquic reports the close once its draining period is over (RFC 9000
            # section 10.2.2): move its clock there.
            timer = forged.get_timer()
            assert timer is not None
            forged.handle_timer(now=timer)
            seen = list(iter(forged.next_event, None))
            terminated = [e for e in seen if isinstance(e, events.ConnectionTerminated)]
            assert terminated[0].error_code == QuicErrorCode.INVALID_TOKEN
            assert stats["quic_tokens_refused"] == 2
            assert bob.quic.budget.total == 0

            # The token is good from the address it was sent to.
            await here.sendto(with_token, bob.address)
            await wait_for(lambda: bob.quic.budget.half_open == 1, "validated")
            assert stats["quic_validated_accepted"] == 1


# --------------------------------------------------------------------------- reserve


async def test_strangers_cannot_take_the_reserve_from_contacts_and_our_own() -> None:
    """bob has 6 slots, 3 for strangers. Three strangers hold them; a fourth completes
    its handshake in the reserve and is closed (BUSY); carol, whom bob pins, gets in;
    and bob still connects out."""
    config = QuicConfig(max_connections=6, reserved_share=0.5)
    with trio.fail_after(TIMEOUT):
        async with (
            quic_peer("carol") as carol,
            quic_peer("dave") as dave,
            quic_peer("bob", config=config, is_pinned=lambda k: k == carol.key) as bob,
            AsyncExitStack() as stack,
        ):
            strangers = [
                await stack.enter_async_context(quic_peer(f"stranger{i}")) for i in range(4)
            ]
            for stranger in strangers[:3]:
                assert await say_hello(stranger, bob, b"x") == b"x"
            try:
                late = await strangers[3].quic.connect(bob.address, bob.key)
                await late.wait_closed()
                error = late.error
            except ConnectionLost as exc:  # if the close overtook the handshake
                error = exc
            assert error is not None and "(busy)" in error.message
            assert bob.quic.stats["quic_refused_busy"] == 1
            await wait_for(lambda: bob.quic.budget.half_open == 0, "refused one gone")
            assert await say_hello(carol, bob, b"contact") == b"contact"
            assert await say_hello(bob, dave, b"outgoing") == b"outgoing"
            slots = bob.quic.budget.statistics()
            assert (slots["slots_stranger"], slots["slots_pinned"]) == (3, 1)
            assert slots["slots_outgoing"] == 1


# --------------------------------------------------------------------------- daemons


@pytest.fixture()
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-qfl-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def daemon(
    root: Path, identity: Identity, quic: QuicConfig, bootstrap: tuple[Address, ...] = ()
) -> AsyncIterator[Node]:
    config = NodeConfig(
        home=root / identity.handle,
        listen=Address("127.0.0.1", 0),
        bootstrap=bootstrap,
        quic=quic,
        ack_timeout=2.0,
        connect_timeout=1.0,
        lan=LanConfig(mode="off"),
    )
    async with open_node(config, identity) as n:
        yield n


def inbox_texts(n: Node) -> list[str]:
    return [m["text"] for m in Api(n).inbox(limit=100)["messages"]]


async def test_a_daemon_under_an_initial_flood_still_takes_a_message(root: Path) -> None:
    """Real daemons: bob is flooded with Initials; alice's message still arrives
    directly (through a Retry), and bob's `status` shows the flood in quic_counters."""
    quic = QuicConfig(retry_after_half_open=8, half_open_timeout=4.0)
    with trio.fail_after(90):
        async with (
            daemon(root, Identity.generate("bob"), quic) as bob,
            daemon(root, Identity.generate("alice"), QuicConfig(), (bob.listen_address,)) as alice,
            flood_sockets(32) as sockets,
            trio.open_nursery() as nursery,
        ):
            flood = Flood(bob.listen_address.as_tuple(), sockets)
            nursery.start_soon(flood.run)
            counters = bob.quic.stats
            await wait_for(lambda: counters["quic_retries_sent"] >= 50, "flooded")
            sent = await alice.delivery.send("bob", "through the flood")
            await wait_for(lambda: inbox_texts(bob) == ["through the flood"], "delivered")
            flood.stop.set()
            # bob can hold it before alice has recorded her write (the packet leaves
            # before send_all returns, and send_all's checkpoint lets bob's tasks run
            # first): alice's record is read once she saw bob's ack.
            messages = alice.delivery.messages
            await wait_for(lambda: messages.get(sent.id).state == DELIVERED, "acked")  # type: ignore[union-attr]
            assert messages.get(sent.id).via == "direct"  # type: ignore[union-attr]
            status = Api(bob).status()["quic_counters"]
            assert status["quic_retries_sent"] >= 50
            assert status["quic_validated_accepted"] >= 1
            assert bob.quic.budget.half_open <= quic.retry_after_half_open + 1


async def test_a_refused_connection_sends_the_message_to_the_mailbox(root: Path) -> None:
    """bob takes one connection per address and carol (same address as alice) holds
    it: alice's connect is refused at once (CONNECTION_REFUSED) and the message goes
    to bob's mailbox, where bob finds it."""
    with trio.fail_after(90):
        async with (
            daemon(
                root, Identity.generate("bob"), QuicConfig(max_connections_per_address=1)
            ) as bob,
            daemon(root, Identity.generate("alice"), QuicConfig(), (bob.listen_address,)) as alice,
            daemon(root, Identity.generate("carol"), QuicConfig(), (bob.listen_address,)) as carol,
        ):
            await carol.quic.connect(bob.listen_address, bob.identity.public_key)
            sent = await alice.delivery.send("bob", "refused, so mailed")
            await wait_for(
                lambda: alice.delivery.messages.get(sent.id).via == "mailbox",  # type: ignore[union-attr]
                "mailed",
            )
            assert bob.quic.stats["quic_refused_per_address"] >= 1
            bob.delivery.poll_mailbox_now()
            await wait_for(lambda: inbox_texts(bob) == ["refused, so mailed"], "read")
