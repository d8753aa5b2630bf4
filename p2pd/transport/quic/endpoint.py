"""All QUIC connections of a node on its one UDP socket: :class:`QuicEndpoint`.

The endpoint routes datagrams to connections by Destination Connection ID, makes server
connections for new Initials, answers unknown versions, runs the stream handlers, and
holds the map of connections for reuse. It is the :class:`~.peer.PeerHost` of its
peers: they reach it only through that interface.

Every connection holds a slot of the endpoint's :class:`~.admission.SlotBudget`: an
Initial gets a slot, a Retry (address validation, RFC 9000 section 8.1.2) or a refusal
(docs/SECURITY.md, "QUIC budgets"). What is refused is answered statelessly: a Retry
or an Initial CONNECTION_CLOSE, each smaller than the 1,200-byte datagram that asked.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from ...config import QuicConfig
from ...errors import LocalError, UsageError
from ...identity import Identity
from ...wire import Address
from ..tls import make_certificate
from ..udp import UdpEndpoint
from ._aioquic import (
    SMALLEST_MAX_DATAGRAM_SIZE,
    Buffer,
    Connection,
    QuicConfiguration,
    QuicErrorCode,
    QuicHeader,
    QuicPacketType,
    encode_initial_close,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from .admission import Slot, SlotBudget, SlotKind, Verdict, source_key
from .codes import ALPN, CID_LENGTH, SUPPORTED_VERSIONS, AppError
from .peer import NetworkAddress, QuicPeer
from .stream import QuicStream
from .tokens import RetryTokens

log = logging.getLogger("p2pd.transport.quic")

#: RFC 9000 section 7.2: a client's first Destination Connection ID is at least 8 bytes.
MIN_INITIAL_DCID = 8
#: A connection we make that is still in its handshake after this long is not reused by
#: a new ``connect`` to the same key and address: a fresh one sends its Initial at once.
#: The old one's Initial is resent ever later (RFC 9002 section 6.2.1: each PTO doubles;
#: 0.2, 0.4, 0.8, 1.6, 3.2 s gaps seen here), so a caller that tried again once the peer
#: was back (a restart) waited up to seconds for its next resend. The old one runs on,
#: to its handshake timeout, for whoever still waits on it.
STALE_HANDSHAKE = 1.0

StreamHandler = Callable[[QuicPeer, QuicStream], Awaitable[None]]
DatagramHandler = Callable[[QuicPeer, bytes], None]
PeerHandler = Callable[[QuicPeer], None]
#: Is this Ed25519 key pinned by one of our contacts?
PinCheck = Callable[[bytes], bool]
#: Sends a datagram to a virtual address (a relay circuit, p2pd/relay/client.py).
VirtualSend = Callable[[bytes, NetworkAddress], None]


class QuicEndpoint:
    """All QUIC connections of a node, on its one UDP socket.

    Run :meth:`serve` in a nursery (``await nursery.start(quic.serve)``) and pass
    :meth:`datagram_received` as ``on_quic`` to ``UdpEndpoint.serve``; or use
    :func:`open_quic_endpoint`.

    - ``on_stream(peer, stream)`` runs as a task in the endpoint's nursery for each stream
      a peer opens. If it raises, the error is logged and that stream reset; when it
      returns, the stream is closed. Without it, incoming streams are refused.
    - ``on_datagram(peer, data)`` is called, synchronously and so without blocking, for
      each DATAGRAM frame.
    - ``on_connection(peer)`` is called when an incoming connection has completed its
      handshake (``peer.public_key`` is the client's proven key; ``peer.close()`` refuses).
    - ``on_closed(peer)`` is called when any connection is gone (``peer.error`` says why).
    - ``is_pinned(key)`` says whether a contact pins ``key``: an incoming connection
      whose proven key is pinned moves from the strangers' share of the slots to the
      reserve (:mod:`.admission`). Without it, every incoming peer is a stranger.
    - ``virtual_send(data, addr)`` sends to a virtual address (one whose host
      ``is_virtual``): a relay circuit (p2pd/relay/). Its packets come in through
      :meth:`datagram_received` with the same virtual address, so aioquic sees one
      stable path per circuit.
    - ``on_observed(peer, seen)``: ``peer`` says it sees us at ``seen`` (an
      observed-address report, :mod:`.observed`; direct paths of our socket only, at
      most one a second per connection). Reports go out on every direct connection.
    """

    def __init__(
        self,
        udp: UdpEndpoint,
        identity: Identity,
        config: QuicConfig | None = None,
        *,
        on_stream: StreamHandler | None = None,
        on_datagram: DatagramHandler | None = None,
        on_connection: PeerHandler | None = None,
        on_closed: PeerHandler | None = None,
        is_pinned: PinCheck | None = None,
        virtual_send: VirtualSend | None = None,
        is_virtual: Callable[[str], bool] = lambda host: False,
        on_observed: Callable[[QuicPeer, Address], None] | None = None,
    ) -> None:
        self.udp = udp
        self._on_observed = on_observed
        self._virtual_send = virtual_send
        self._is_virtual = is_virtual
        self.config = config or QuicConfig()
        if self.config.max_datagram_size < SMALLEST_MAX_DATAGRAM_SIZE:
            raise UsageError(
                f"QUIC max_datagram_size must be at least {SMALLEST_MAX_DATAGRAM_SIZE}"
            )
        self.public_key = identity.public_key
        self.stats: Counter[str] = Counter()
        self._on_stream = on_stream
        self._on_datagram = on_datagram
        self._on_connection = on_connection
        self._on_closed = on_closed
        self._is_pinned = is_pinned
        self.budget = SlotBudget(self.config)
        self._slots: dict[QuicPeer, Slot] = {}
        self._tokens = RetryTokens()
        certificate, private_key = make_certificate(identity)
        self._client_config = self._configuration(True, certificate, private_key)
        self._server_config = self._configuration(False, certificate, private_key)
        self._nursery: trio.Nursery | None = None
        self._by_cid: dict[bytes, QuicPeer] = {}
        self._peers: dict[tuple[bytes, NetworkAddress], QuicPeer] = {}
        #: Every connection, in the order they were made (a dict: insertion-ordered).
        self._all: dict[QuicPeer, None] = {}
        self._routes: dict[NetworkAddress, VirtualSend] = {}
        #: Connections that received datagrams since the last flush, in arrival order.
        self._dirty: list[QuicPeer] = []

    def _configuration(self, is_client: bool, certificate: Any, key: Any) -> QuicConfiguration:
        c = self.config
        return QuicConfiguration(
            alpn_protocols=[ALPN],
            is_client=is_client,
            connection_id_length=CID_LENGTH,
            idle_timeout=c.idle_timeout,
            max_data=c.connection_window,
            max_stream_data=c.stream_window,
            max_datagram_size=c.max_datagram_size,
            max_datagram_frame_size=c.max_datagram_frame_size,
            certificate=certificate,
            private_key=key,
            # No CA: chain validation is off, the identity key check is ours
            # (policy.ConnectionPolicy.handshake_completed).
            verify_mode=ssl.CERT_NONE,
            supported_versions=list(SUPPORTED_VERSIONS),
        )

    # ---- lifecycle

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the endpoint until cancelled; then close every connection."""
        if self._nursery is not None:
            raise LocalError("this QUIC endpoint is already serving")
        self.udp.add_flush_hook(self._flush)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.udp.remove_flush_hook(self._flush)

    # ---- the receive path (called by UdpEndpoint.serve for every QUIC datagram)

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        """Feed one datagram to its connection. The connection steps (answers it) once
        the UDP task's burst is over, in the flush hook that :meth:`serve` registers
        with ``self.udp``: so pass this only to that ``UdpEndpoint``'s ``serve``."""
        if len(data) > CID_LENGTH and data[0] & 0xC0 == 0x40:
            # Fast path for the common case, a short header (RFC 9000 section 17.3): the
            # Destination Connection ID follows the first byte, with the length we chose.
            # aioquic parses the header again; no need to build a Buffer twice.
            peer = self._by_cid.get(data[1 : 1 + CID_LENGTH])
            if peer is None:
                self._drop("unknown_connection")
                return
        else:
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
            except ValueError:  # aioquic's BufferReadError is a ValueError too
                self._drop("malformed")
                return
            peer = self._by_cid.get(header.destination_cid)
            if peer is None:
                self._unknown_connection(data, addr, header)
                return
        if peer.receive_datagram(data, addr, trio.current_time()):
            self._dirty.append(peer)

    def _flush(self) -> None:
        """The UDP task's flush hook: one step for each connection that received
        datagrams in the burst it just handed out."""
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for peer in dirty:
            peer.step_received()
            if peer.quic.is_closing and peer in self._slots:
                # The peer closed (or aioquic did): no reuse, and the slot is free now.
                self.peer_closing(peer)

    def _drop(self, reason: str) -> None:
        self.stats["quic_dropped"] += 1
        self.stats[f"quic_dropped_{reason}"] += 1

    def _unknown_connection(self, data: bytes, addr: NetworkAddress, header: QuicHeader) -> None:
        version, packet_type = header.version, header.packet_type
        if version is None:
            self._drop("unknown_connection")  # a short header for no connection of ours
            return
        # RFC 9000 section 14.1: a server drops Initial datagrams under 1200 bytes; they
        # also are the only ones that may make us answer (anti-amplification, section 8).
        if len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            self._drop("too_small")
            return
        stats = self.stats
        if version not in SUPPORTED_VERSIONS:
            if packet_type == QuicPacketType.VERSION_NEGOTIATION:
                self._drop("unknown_connection")  # never answer one (reflection loops)
                return
            # Section 6.1: answer an unknown version with Version Negotiation. It is
            # smaller than the >= 1200 byte datagram that asked, so it amplifies nothing.
            stats["quic_version_negotiation_sent"] += 1
            self.sendto(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=list(SUPPORTED_VERSIONS),
                ),
                addr,
            )
            return
        if packet_type != QuicPacketType.INITIAL:
            self._drop("unknown_connection")
            return
        if len(header.destination_cid) < MIN_INITIAL_DCID:
            self._drop("malformed")
            return
        if self._nursery is None:
            self._drop("not_serving")
            return
        now = trio.current_time()
        original_cid, retry_cid = header.destination_cid, None
        if header.token:
            # Only a client we sent a Retry has a token (we send no NEW_TOKEN frames).
            found = self._tokens.validate(addr, header.destination_cid, header.token, now)
            if found is None:
                # RFC 9000 section 8.1.3: a Retry token that does not validate (forged,
                # expired, from another address) closes the connection: INVALID_TOKEN.
                stats["quic_tokens_refused"] += 1
                self._refuse(header, addr, QuicErrorCode.INVALID_TOKEN)
                return
            original_cid, retry_cid = found, header.destination_cid
        source = source_key(addr[0])
        verdict = self.budget.incoming(source, validated=retry_cid is not None)
        if verdict is Verdict.RETRY:
            self._send_retry(header, addr, now)
            return
        if verdict is not Verdict.ADMIT:
            # Told at once, so an honest client fails over (delivery: the mailbox) instead
            # of waiting out its handshake timeout (section 20.1: CONNECTION_REFUSED).
            stats[f"quic_{verdict.value}"] += 1
            self._refuse(header, addr, QuicErrorCode.CONNECTION_REFUSED)
            return
        quic = Connection(
            configuration=self._server_config,
            original_destination_connection_id=original_cid,
            # After a Retry the server must echo its Source Connection ID in the
            # retry_source_connection_id transport parameter (section 7.3), as aioquic's
            # asyncio server does; the client checks both.
            retry_source_connection_id=retry_cid,
            stream_window=self.config.stream_window,
        )
        peer = QuicPeer(self, quic, addr, None)
        self._slots[peer] = self.budget.take_incoming(source)
        self._all[peer] = None
        # Map the client's chosen DCID (its Initials keep using it until it hears from us;
        # after a Retry, the Retry's Source Connection ID) and our own first CID, as
        # aioquic's asyncio server does.
        peer.add_connection_id(header.destination_cid)
        peer.add_connection_id(quic.host_cid)
        stats["quic_connections_accepted"] += 1
        if retry_cid is not None:
            stats["quic_validated_accepted"] += 1
        quic.receive_datagram(data, addr, now)
        self._nursery.start_soon(peer.run, name=f"quic {addr[0]}:{addr[1]}")

    def _send_retry(self, header: QuicHeader, addr: NetworkAddress, now: float) -> None:
        """A stateless Retry (RFC 9000 section 17.2.5), about 100 bytes."""
        assert header.version is not None
        retry_cid = os.urandom(CID_LENGTH)
        try:
            token = self._tokens.create(addr, header.destination_cid, retry_cid, now)
        except ValueError:  # not an IP address: cannot come from a socket
            self._drop("malformed")
            return
        self.stats["quic_retries_sent"] += 1
        self.sendto(
            encode_quic_retry(
                version=header.version,
                source_cid=retry_cid,
                destination_cid=header.source_cid,
                original_destination_cid=header.destination_cid,
                retry_token=token,
            ),
            addr,
        )

    def _refuse(self, header: QuicHeader, addr: NetworkAddress, error_code: int) -> None:
        """A stateless Initial CONNECTION_CLOSE (48 bytes) with ``error_code``."""
        assert header.version is not None
        self.sendto(
            encode_initial_close(
                header.version, header.destination_cid, header.source_cid, error_code
            ),
            addr,
        )

    # ---- outgoing connections

    async def connect(self, address: Address | NetworkAddress, expected_key: bytes) -> QuicPeer:
        """A connection to the peer at ``address`` that proves it holds ``expected_key``.

        An open connection to that key at that address (made by either side) is reused,
        and one of ours still in its handshake unless it began over STALE_HANDSHAKE ago.
        Raises :class:`~p2pd.errors.PeerKeyMismatch` if the peer proves another key,
        :class:`~p2pd.errors.ConnectionLost` if the handshake fails or times out or the
        peer refuses us (CONNECTION_REFUSED, INVALID_TOKEN), and
        :class:`~p2pd.errors.LocalError` if this endpoint cannot make a connection (not
        serving, every slot taken); nothing else (:class:`~p2pd.errors.UsageError` for
        a malformed key or address). A peer that refuses a stranger after the handshake
        (``AppError.BUSY``) lets ``connect`` return and closes the connection at once.
        """
        if not isinstance(expected_key, bytes) or len(expected_key) != 32:
            raise UsageError("expected_key must be a 32-byte Ed25519 public key")
        addr = self._normalize(address)
        peer = self._peers.get((expected_key, addr))
        if (
            peer is None
            or peer.is_closing
            or (not peer.is_established and trio.current_time() - peer.started > STALE_HANDSHAKE)
        ):
            peer = self._new_client(addr, expected_key)
        await peer.wait_established()
        return peer

    def _new_client(self, addr: NetworkAddress, expected_key: bytes) -> QuicPeer:
        if self._nursery is None:
            raise LocalError("the QUIC endpoint is not running")
        slot = self.budget.take_outgoing(addr[0])
        if slot is None:
            self.stats["quic_refused_outgoing"] += 1
            raise LocalError("too many QUIC connections")
        quic = Connection(
            configuration=self._client_config, stream_window=self.config.stream_window
        )
        quic.connect(addr, now=trio.current_time())
        peer = QuicPeer(self, quic, addr, expected_key)
        try:
            self._nursery.start_soon(peer.run, name=f"quic {addr[0]}:{addr[1]}")
        except RuntimeError:  # trio: "Nursery is closed to new arrivals"
            # The node is shutting down and a task still connects (a clean-clone CI run
            # saw delivery's mailbox acks do it): a local failure its caller handles.
            self.budget.release(slot)
            raise LocalError("the QUIC endpoint is shutting down") from None
        self._slots[peer] = slot
        self._all[peer] = None
        peer.add_connection_id(quic.host_cid)
        self._peers[(expected_key, addr)] = peer
        return peer

    def _normalize(self, address: Address | NetworkAddress) -> NetworkAddress:
        if isinstance(address, Address):
            host, port = address.host, address.port
        else:
            host, port = Address(str(address[0]), int(address[1])).as_tuple()
        # aioquic drops packets from any other spelling of the server's address; the UDP
        # endpoint spells IPv4 peers a.b.c.d both ways, also on a dual-stack socket
        # (p2pd/transport/udp.py), so that is the spelling here too.
        return (host, port)

    # ---- public bookkeeping

    def peers(self) -> list[QuicPeer]:
        """Every connection that is established and not closing, the newest first.

        Callers take the first connection to a key (delivery's and files' connect): after
        the peer restarted (kill -9, a crash) its old connection still looks open here
        until its idle timeout (30 s) while the new one it made works. The order of a
        set picked the old one about half the time and the transfer or the conversation
        waited out that timeout (seen as a file transfer stalled 30 s after the receiver's
        restart). Newest first, not "last heard from": a datagram forged with the old
        connection's address would count as heard before aioquic dropped it."""
        return [
            p
            for p in reversed(self._all)
            if p.is_established and not p.is_closing and not p.quic.is_closing
        ]

    def statistics(self) -> dict[str, Any]:
        return {
            "connections": len(self._all),
            "counters": dict(self.stats),
            "slots": self.budget.statistics(),
        }

    # ---- PeerHost: used by the peers only

    @property
    def accepts_streams(self) -> bool:
        return self._on_stream is not None

    def sendto(self, data: bytes, addr: NetworkAddress) -> None:
        route = self._routes.get(addr) if self._routes else None
        if route is not None:
            route(data, addr)  # a hole-punched path on a socket of its own
        elif self._virtual_send is not None and self._is_virtual(addr[0]):
            self._virtual_send(data, addr)  # wrapped for a relay circuit
        else:
            self.udp.sendto(data, addr)

    def send_many(self, datagrams: list[bytes], addr: NetworkAddress) -> None:
        if addr in self._routes or (self._virtual_send is not None and self._is_virtual(addr[0])):
            for data in datagrams:
                self.sendto(data, addr)
        else:
            self.udp.send_many(datagrams, addr)  # segmented where the kernel can

    # ---- routes: paths on sockets other than the node's (p2pd/relay/upgrade.py)

    def add_route(self, addr: NetworkAddress, send: VirtualSend) -> None:
        """Packets to ``addr`` leave through ``send`` (a hole-punched side socket); its
        owner feeds what arrives there to :meth:`datagram_received` and calls
        :meth:`flush` after each burst."""
        self._routes[addr] = send

    def remove_route(self, addr: NetworkAddress) -> None:
        self._routes.pop(addr, None)

    def flush(self) -> None:
        """Step the connections that received datagrams (what the UDP task's flush hook
        does after each burst), for datagrams fed from another socket's task."""
        self._flush()

    def has_connection_to(self, addr: NetworkAddress) -> bool:
        """A connection to ``addr`` exists, established or not, and is not closed."""
        return any(p.address == addr and not p.quic.is_closing for p in self._all)

    def register_cid(self, cid: bytes, peer: QuicPeer) -> None:
        self._by_cid[cid] = peer

    def unregister_cid(self, cid: bytes, peer: QuicPeer) -> None:
        if self._by_cid.get(cid) is peer:
            del self._by_cid[cid]

    def peer_established(self, peer: QuicPeer) -> None:
        assert peer.public_key is not None
        slot = self._slots.get(peer)
        if (
            not peer.is_client
            and slot is not None
            and slot.kind is SlotKind.HALF_OPEN
            and not self.budget.established(slot, pinned=self._pinned(peer.public_key))
        ):
            # A stranger's handshake that started in the reserve: no place for it.
            self.stats["quic_refused_busy"] += 1
            peer.close("no slot for a stranger", AppError.BUSY)
            return
        key = (peer.public_key, peer.address)
        current = self._peers.get(key)
        if current is None or current.is_closing:
            self._peers[key] = peer
        if not peer.is_client:
            self.stats["quic_connections_established_in"] += 1
            if self._on_connection is not None:
                try:
                    self._on_connection(peer)
                except Exception:
                    log.exception("on_connection handler failed; closing %r", peer)
                    peer.close("internal error")
        else:
            self.stats["quic_connections_established_out"] += 1

    def peer_closing(self, peer: QuicPeer) -> None:
        for key in [k for k, p in self._peers.items() if p is peer]:
            del self._peers[key]
        # A closing connection only answers with its CONNECTION_CLOSE until its closing
        # or draining period ends (RFC 9000 section 10.2, 3 PTOs: ~100 ms on loopback):
        # its slot is free now, or a client reconnecting at once would find its own
        # closing connections counted against its address.
        slot = self._slots.pop(peer, None)
        if slot is not None:
            self.budget.release(slot)

    def _pinned(self, key: bytes) -> bool:
        if self._is_pinned is None:
            return False
        try:
            return bool(self._is_pinned(key))
        except Exception:  # the contacts' trouble must not end the receive path
            log.exception("is_pinned failed; treating the peer as a stranger")
            return False

    def peer_closed(self, peer: QuicPeer) -> None:
        self.peer_closing(peer)
        for cid in peer.connection_ids:
            self.unregister_cid(cid, peer)
        self._all.pop(peer, None)
        if self._on_closed is not None:
            try:
                self._on_closed(peer)
            except Exception:
                log.exception("on_closed handler failed for %r", peer)

    def observes_path(self, addr: NetworkAddress) -> bool:
        return addr not in self._routes and not self._is_virtual(addr[0])

    def address_observed(self, peer: QuicPeer, seen: Address) -> None:
        if self._on_observed is None:
            return
        try:
            self._on_observed(peer, seen)
        except Exception:
            log.exception("on_observed handler failed for %r", peer)

    def deliver_datagram(self, peer: QuicPeer, data: bytes) -> None:
        if self._on_datagram is None:
            self.stats["quic_datagrams_ignored"] += 1
            return
        try:
            self._on_datagram(peer, data)
        except Exception:
            log.exception("on_datagram handler failed for %r", peer)

    def start_stream_handler(self, peer: QuicPeer, stream: QuicStream) -> None:
        if self._nursery is None or self._on_stream is None:
            stream.reset(AppError.STREAM_REFUSED)
            return
        self._nursery.start_soon(
            self._run_stream_handler, self._on_stream, peer, stream, name=f"{stream!r}"
        )

    async def _run_stream_handler(
        self, handler: StreamHandler, peer: QuicPeer, stream: QuicStream
    ) -> None:
        try:
            await handler(peer, stream)
        except Exception:
            # Only this stream pays for a failing handler (RESET_STREAM + STOP_SENDING).
            log.exception("stream handler failed on %r; resetting that stream", stream)
            stream.reset(AppError.HANDLER_FAILED)
        finally:
            try:
                stream.close_nowait()
            except Exception:  # one stream's trouble must never end the endpoint
                log.exception("closing %r failed", stream)


@asynccontextmanager
async def open_quic_endpoint(
    udp: UdpEndpoint,
    identity: Identity,
    config: QuicConfig | None = None,
    *,
    on_stream: StreamHandler | None = None,
    on_datagram: DatagramHandler | None = None,
    on_connection: PeerHandler | None = None,
    on_closed: PeerHandler | None = None,
    is_pinned: PinCheck | None = None,
    virtual_send: VirtualSend | None = None,
    is_virtual: Callable[[str], bool] = lambda host: False,
    on_observed: Callable[[QuicPeer, Address], None] | None = None,
) -> AsyncIterator[QuicEndpoint]:
    """A serving :class:`QuicEndpoint`, shut down (every peer told) when the block exits.

    The caller still runs ``udp.serve(on_dht, endpoint.datagram_received)``.
    """
    endpoint = QuicEndpoint(
        udp,
        identity,
        config,
        on_stream=on_stream,
        on_datagram=on_datagram,
        on_connection=on_connection,
        on_closed=on_closed,
        is_pinned=is_pinned,
        virtual_send=virtual_send,
        is_virtual=is_virtual,
        on_observed=on_observed,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.serve)
        try:
            yield endpoint
        finally:
            nursery.cancel_scope.cancel()
