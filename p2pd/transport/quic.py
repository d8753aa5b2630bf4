"""QUIC between peers: a trio driver for aioquic's sans-I/O ``QuicConnection``.

The node has one UDP socket (:class:`~p2pd.transport.udp.UdpEndpoint`); datagrams whose
first byte has the 0x40 bit set (RFC 9000 section 17: the fixed bit) come to
:meth:`QuicEndpoint.datagram_received`. There we parse the header, find the connection by
its Destination Connection ID (or make a server connection for a new Initial), feed the
datagram to aioquic and note the connection. The UDP task reads every queued datagram
(a burst) before it yields, and then calls our flush hook, which runs one *step* of each
connection that received something, still in the UDP task and synchronously: the UDP
task never waits on QUIC, and no task switch happens per datagram.

A step fires aioquic's timer if due, consumes every pending event (stream data wakes the
reader, DATAGRAM frames go to ``on_datagram``), applies our keep-alive and idle rules,
drains ``datagrams_to_send()`` straight into the socket, and re-arms the connection's
deadline. Each connection also has one task (:meth:`QuicPeer._run`) that runs the same
step when its deadline comes (aioquic's ``get_timer()``, our keep-alive and idle
deadlines) or when the application wakes it (a write, a read that frees window, a close).

Batching is the point: one ``datagrams_to_send`` serves everything that arrived or was
written since the last step.
Time is ``trio.current_time()``: aioquic only adds durations to and compares the ``now``
values its caller passes (it reads no clock of its own except for certificate validity
and session tickets, neither used here), so any monotonic clock passed consistently
works.

Identity: both sides present a self-signed certificate for their Ed25519 identity key
(:mod:`p2pd.transport.tls`), the server *requests* the client's (RFC 8446 section
4.3.2), and after the handshake the client compares the server's key with the one it
expected while the server learns the client's key. See docs/PROTOCOL.md, "QUIC".

Two aioquic internals are reached on purpose, each commented where it is used: the
server's ``tls.Context._request_client_certificate`` switch and the peer certificate
(aioquic 1.7.2 has no public API for either), and the per-stream receive credit (aioquic
grants credit as data *arrives*; we grant it as the application *reads*, so a stream never
buffers more than ``QuicConfig.stream_window`` bytes).
"""

from __future__ import annotations

import enum
import logging
import math
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from aioquic._buffer import Buffer
from aioquic.buffer import size_uint_var
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import (
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
    stream_is_client_initiated,
    stream_is_unidirectional,
)
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicHeader,
    QuicPacketType,
    QuicProtocolVersion,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import PACKET_NUMBER_SEND_SIZE, QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream as _AioquicStream
from aioquic.tls import AlertDescription

from ..config import QuicConfig
from ..errors import (
    ConnectionLost,
    DatagramTooLarge,
    LocalError,
    P2PDError,
    PeerKeyMismatch,
    UsageError,
)
from ..identity import Identity, fingerprint
from ..wire import Address
from .tls import certificate_public_key, make_certificate
from .udp import UdpEndpoint

log = logging.getLogger(__name__)

#: Our one application protocol (RFC 9001 section 8.1: QUIC requires ALPN).
ALPN = "p2pd/1"
#: QUIC version 1 (RFC 9000) only.
SUPPORTED_VERSIONS = [QuicProtocolVersion.VERSION_1]
#: Length of the connection IDs we issue. All our connections share one socket and one
#: map, and short headers do not carry the length (RFC 9000 section 17.3), so it is fixed.
CID_LENGTH = 8
#: RFC 9000 section 7.2: a client's first Destination Connection ID is at least 8 bytes.
MIN_INITIAL_DCID = 8
#: RFC 9000 section 17.2: connection IDs are at most 20 bytes (QUIC version 1).
MAX_CID_LENGTH = 20
#: AEAD expansion of every cipher suite QUIC v1 uses (RFC 9001 section 5.3).
AEAD_TAG_SIZE = 16
#: A 1-RTT packet's header as aioquic writes it: first byte, the peer's connection ID (at
#: most 20 bytes, and the peer may switch us to a longer one at any time), packet number.
SHORT_HEADER_MAX = 1 + MAX_CID_LENGTH + PACKET_NUMBER_SEND_SIZE
#: A step repeats while aioquic's timer is already due after sending (pacing), at most
#: this many times, so one connection cannot hold the UDP task for long.
STEP_PASSES = 16
#: ``receive_some()`` without a size hands out at most this much at once.
DEFAULT_RECEIVE_SIZE = 1 << 20


class AppError(enum.IntEnum):
    """Our application error codes (RFC 9000 section 20.2), in CONNECTION_CLOSE,
    RESET_STREAM and STOP_SENDING frames."""

    NO_ERROR = 0x0
    #: We closed the stream and will not read what is left (STOP_SENDING).
    STREAM_CLOSED = 0x1
    #: Our stream handler failed; the stream is abandoned.
    HANDLER_FAILED = 0x2
    #: We accept no stream of that kind (unidirectional, or no stream handler).
    STREAM_REFUSED = 0x3
    #: The application reset the stream.
    STREAM_RESET = 0x4
    #: The endpoint is shutting down.
    SHUTDOWN = 0x5


def _crypto_error(alert: AlertDescription) -> int:
    """A TLS alert as a QUIC transport error code (RFC 9001 section 4.8)."""
    return int(QuicErrorCode.CRYPTO_ERROR) + int(alert)


class StreamBroken(ConnectionLost, trio.BrokenResourceError):
    """The peer reset this stream, or the connection under it was lost."""


NetworkAddress = tuple[str, int]
StreamHandler = Callable[["QuicPeer", "QuicStream"], Awaitable[None]]
DatagramHandler = Callable[["QuicPeer", bytes], None]
PeerHandler = Callable[["QuicPeer"], None]


# --------------------------------------------------------------------------- aioquic


class _Connection(QuicConnection):
    """aioquic's connection with the two changes p2pd needs.

    Both override private methods of aioquic 1.7.2; ``tests/test_quic.py`` fails loudly
    if a later aioquic changes them (no client key, or a stream that stalls).
    """

    def __init__(self, *, stream_window: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._p2pd_window = stream_window
        #: stream id -> bytes the application has read; only streams we hand out.
        self.consumed: dict[int, int] = {}

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # Mutual authentication: the server sends CertificateRequest (RFC 8446
            # section 4.3.2) and the client answers with its certificate and a
            # CertificateVerify made with its identity key. aioquic 1.7.2 implements
            # both sides of this but exposes the server switch only as a private
            # attribute marked "for test purposes only"; the client side is automatic
            # when the configuration carries a certificate and key. A client that
            # sends an empty Certificate is let through by aioquic (RFC 8446 section
            # 4.4.2.4 allows that) and refused by us after the handshake.
            self.tls._request_client_certificate = True

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: _AioquicStream
    ) -> None:
        # aioquic doubles a stream's receive credit whenever the peer has sent half of it,
        # whether or not anybody reads: a peer can make us buffer without bound. We grant
        # credit as the application consumes instead (RFC 9000 section 4.2): the limit is
        # always "read so far + window", announced once it moved by half a window, so a
        # stream holds at most one window of unread data. Streams the application has
        # not seen yet (or has closed) get no more than their initial window.
        sid = stream.stream_id
        if sid is None:  # only aioquic's CRYPTO streams have none; never passed here
            return
        if stream.max_stream_data_local:
            consumed = self.consumed.get(sid)
            if consumed is not None:
                target = consumed + self._p2pd_window
                if target - stream.max_stream_data_local >= self._p2pd_window // 2:
                    stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            # From here on as aioquic's own method: MAX_STREAM_DATA (section 19.10),
            # re-sent by the delivery handler if lost. (We never set a quic_logger.)
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(sid)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    # Small typed windows onto aioquic state that has no public accessor.

    def send_backlog(self, stream_id: int) -> int:
        """Bytes written to a stream and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def peer_certificate_key(self) -> bytes | None:
        """The Ed25519 key of the certificate the peer proved during the handshake."""
        return certificate_public_key(self.tls._peer_certificate)

    @property
    def remote_max_datagram_frame_size(self) -> int | None:
        return self._remote_max_datagram_frame_size

    @property
    def pending_datagrams(self) -> int:
        return len(self._datagrams_pending)

    def knows_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def sender_stopped(self, stream_id: int) -> bool:
        """True once the peer's STOP_SENDING reset our side of the stream.

        aioquic resets the sender while it parses the frame, before we see the
        StopSendingReceived event; writing in between (even a FIN) raises RuntimeError.
        Seen when a peer closes a stream while our handler is finishing with it.
        """
        stream = self._streams.get(stream_id)
        return stream is not None and stream.sender._reset_error_code is not None


def largest_datagram_payload(frame_limit: int) -> int:
    """The largest payload whose DATAGRAM frame (type byte, varint length, payload; RFC
    9221 section 4) is at most ``frame_limit`` bytes."""
    size = frame_limit - 2
    while size > 0 and 1 + size_uint_var(size) + size > frame_limit:
        size -= 1
    return max(size, 0)


def _describe_close(event: events.ConnectionTerminated) -> str:
    # The reason phrase is the peer's text: bounded and printable before it reaches a log.
    phrase = "".join(c if c.isprintable() else "?" for c in event.reason_phrase[:100])
    reason = f": {phrase}" if phrase else ""
    code = event.error_code
    if event.frame_type is None:
        try:
            name = AppError(code).name.lower()
        except ValueError:
            name = f"application error {code:#x}"
        return f"closed by the application ({name}){reason}"
    if QuicErrorCode.CRYPTO_ERROR <= code <= QuicErrorCode.CRYPTO_ERROR + 0xFF:
        try:
            alert = AlertDescription(code - QuicErrorCode.CRYPTO_ERROR).name
        except ValueError:
            alert = str(code - QuicErrorCode.CRYPTO_ERROR)
        return f"TLS handshake failed ({alert}){reason}"
    try:
        name = QuicErrorCode(code).name
    except ValueError:
        name = f"{code:#x}"
    return f"closed ({name}){reason}"


# --------------------------------------------------------------------------- streams


class QuicStream(trio.abc.HalfCloseableStream):
    """One bidirectional QUIC stream, as a trio stream.

    ``receive_some`` returns ``b""`` once the peer has finished sending. ``send_all`` waits
    while more than ``QuicConfig.send_buffer`` bytes are unacknowledged. Errors follow
    trio: ``trio.ClosedResourceError`` after our own ``aclose``, :class:`StreamBroken`
    (a ``trio.BrokenResourceError`` and a :class:`~p2pd.errors.ConnectionLost`) when the
    peer reset the stream or the connection was lost, ``trio.BusyResourceError`` for two
    concurrent senders or receivers.
    """

    def __init__(self, peer: QuicPeer, stream_id: int) -> None:
        self.peer = peer
        self.stream_id = stream_id
        self._recv = bytearray()
        self._recv_eof = False
        self._recv_error: P2PDError | None = None
        self._send_eof = False
        self._send_error: P2PDError | None = None
        self._closed = False
        self._receiving = False
        self._sending = False
        self._recv_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._consumed = 0
        self._credit_mark = 0

    def __repr__(self) -> str:
        return f"<QuicStream {self.stream_id} with {self.peer!r}>"

    # ---- sending

    async def send_all(self, data: bytes | bytearray | memoryview, *, eof: bool = False) -> None:
        """Write ``data``; with ``eof``, finish our direction too, as :meth:`send_eof` would,
        but before yielding: the FIN rides in the packet with the last data instead of
        one of its own (a message and its answer are one packet each way)."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            peer = self.peer
            quic = peer.quic
            high = peer.endpoint.config.send_buffer
            view = memoryview(data).cast("B")
            offset, total = 0, len(view)
            while True:
                self._check_send()
                if offset >= total:
                    break
                room = high - quic.send_backlog(self.stream_id)
                if room <= 0:
                    await self._wait_writable()
                    continue
                chunk = view[offset : offset + room]
                if quic.sender_stopped(self.stream_id):
                    raise StreamBroken("the peer stopped reading this stream")
                quic.send_stream_data(self.stream_id, bytes(chunk))
                offset += len(chunk)
                peer._touch()
                peer._kick()
            if eof and not self._send_eof and not peer._closing:
                self._send_eof = True
                if not quic.sender_stopped(self.stream_id):
                    quic.send_stream_data(self.stream_id, b"", end_stream=True)
                peer._kick()
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    @property
    def at_eof(self) -> bool:
        """The peer finished its direction and everything it sent has been read."""
        return self._recv_eof and not self._recv

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._check_send()
        high = self.peer.endpoint.config.send_buffer
        if self.peer.quic.send_backlog(self.stream_id) >= high:
            await self._wait_writable()
        else:
            await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Finish our direction (FIN, RFC 9000 section 3.1); reading goes on. Idempotent."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if not self._send_eof and self._send_error is None and not self.peer._closing:
            self._send_eof = True
            if not self.peer.quic.sender_stopped(self.stream_id):
                self.peer.quic.send_stream_data(self.stream_id, b"", end_stream=True)
            self.peer._kick()
        await trio.lowlevel.checkpoint()

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._send_error is not None:
            raise StreamBroken(self._send_error.message) from self._send_error
        if self._send_eof:
            raise trio.ClosedResourceError("send_eof() was called on this stream")

    async def _wait_writable(self) -> None:
        self.peer._blocked_writers.add(self)
        await self._send_lot.park()

    # ---- receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            # trio wants every call to be a checkpoint; parking is one, so a call that
            # parked does not yield a second time (a reader woken for new data would
            # otherwise cost two scheduling rounds per wake-up).
            parked = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed")
                buf = self._recv
                if buf:
                    size = min(len(buf), max_bytes or DEFAULT_RECEIVE_SIZE)
                    if size == len(buf):
                        data = bytes(buf)
                        buf.clear()
                    else:
                        data = bytes(buf[:size])
                        del buf[:size]
                    self._consumed_bytes(size)
                    # No scheduling round when the data was already here: a handler for a
                    # new stream finds its first bytes waiting, and a round before
                    # reading them delayed every message's answer. (A reader cannot
                    # starve the others: new data comes only when the UDP task runs.)
                    return data
                if self._recv_eof:
                    if not parked:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                if self._recv_error is not None:
                    raise StreamBroken(self._recv_error.message) from self._recv_error
                await self._recv_lot.park()
                parked = True
        finally:
            self._receiving = False

    def _consumed_bytes(self, size: int) -> None:
        peer = self.peer
        self._consumed += size
        peer.quic.consumed[self.stream_id] = self._consumed
        # Wake the connection so MAX_STREAM_DATA goes out once the window moved by half
        # (the same threshold _Connection._write_stream_limits uses).
        if self._consumed - self._credit_mark >= peer.endpoint.config.stream_window // 2:
            self._credit_mark = self._consumed
            peer._kick()
        peer._touch()

    # ---- closing

    async def aclose(self) -> None:
        """Close both directions: our FIN after what is buffered (graceful), and
        STOP_SENDING if the peer has not finished (RFC 9000 section 3.5)."""
        self._close_now(AppError.STREAM_CLOSED, graceful=True)
        await trio.lowlevel.checkpoint()

    def reset(self, error_code: int = AppError.STREAM_RESET) -> None:
        """Abandon the stream in both directions now (RESET_STREAM and STOP_SENDING)."""
        self._close_now(error_code, graceful=False)

    def _close_now(self, error_code: int, *, graceful: bool) -> None:
        if self._closed:
            return
        self._closed = True
        peer = self.peer
        quic = peer.quic
        if not peer._closing and quic.knows_stream(self.stream_id):
            stopped = quic.sender_stopped(self.stream_id)
            if self._send_error is None and not stopped and not (graceful and self._send_eof):
                if graceful:
                    quic.send_stream_data(self.stream_id, b"", end_stream=True)
                else:
                    quic.reset_stream(self.stream_id, error_code)
            if not self._recv_eof and self._recv_error is None:
                quic.stop_stream(self.stream_id, error_code)
            peer._kick()
        self._send_eof = True
        self._recv.clear()
        peer._forget_stream(self)
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()

    # ---- fed by the connection task

    def _on_data(self, data: bytes, end_stream: bool) -> None:
        if data:
            self._recv += data
        if end_stream:
            self._recv_eof = True
        if self._recv_lot:
            self._recv_lot.unpark_all()

    def _on_reset(self, error: P2PDError) -> None:
        if self._recv_error is None and not self._recv_eof:
            self._recv_error = error
        self._recv_lot.unpark_all()

    def _on_stop_sending(self, error: P2PDError) -> None:
        if self._send_error is None:
            self._send_error = error
        self._send_lot.unpark_all()

    def _on_connection_lost(self, error: P2PDError) -> None:
        if self._recv_error is None and not self._recv_eof:
            self._recv_error = error
        if self._send_error is None and not self._send_eof:
            self._send_error = error
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()


# --------------------------------------------------------------------------- peers


class QuicPeer:
    """One QUIC connection to a peer whose identity key is known.

    For a connection we made, :attr:`public_key` is the key we expected and the server
    proved. For one we accepted, it is the key the client proved; the layer above decides
    whether it wants that peer (and calls :meth:`close` if not).
    """

    def __init__(
        self,
        endpoint: QuicEndpoint,
        quic: _Connection,
        address: NetworkAddress,
        expected_key: bytes | None,
    ) -> None:
        self.endpoint = endpoint
        self.quic = quic
        self.address = address
        self.is_client = expected_key is not None
        self.expected_key = expected_key
        #: The peer's verified Ed25519 key; None until the handshake completed.
        self.public_key: bytes | None = None
        self._streams: dict[int, QuicStream] = {}
        self._closed_stream_ids: set[int] = set()
        self._blocked_writers: set[QuicStream] = set()
        self._cids: set[bytes] = set()
        self._lot = trio.lowlevel.ParkingLot()
        self._kicked = False
        #: Received datagrams are waiting for a step (the endpoint's flush runs it).
        self._dirty = False
        #: A step outside the task ended the connection; the task must finish it.
        self._stop = False
        #: The task's waiting scope, whose deadline is the connection's next deadline.
        self._wait: trio.CancelScope | None = None
        self._timer_at: float | None = None
        self._ready = trio.Event()
        self._done = trio.Event()
        self._established = False
        self._closing = False
        self._terminated = False
        self._error: P2PDError | None = None
        now = trio.current_time()
        self._now = now
        self._last_activity = now
        self._last_send = now
        self._handshake_deadline = now + endpoint.config.handshake_timeout
        self._ping_uid = 0

    def __repr__(self) -> str:
        key = self.public_key or self.expected_key
        who = fingerprint(key)[:12] if key else "?"
        return f"<QuicPeer {who} at {self.address[0]}:{self.address[1]}>"

    # ---- public API

    @property
    def is_closing(self) -> bool:
        """True once the connection is closing or closed: it takes no new streams."""
        return self._closing or self._terminated

    @property
    def error(self) -> P2PDError | None:
        """Why the connection ended (None while it is open)."""
        return self._error

    async def wait_closed(self) -> None:
        """Return once the connection is gone (after the closing period, RFC 9000
        section 10.2)."""
        await self._done.wait()

    async def open_stream(self) -> QuicStream:
        """A new bidirectional stream. The peer sees it with its first byte (or FIN). If
        the peer's stream limit is reached, the stream's data waits until it rises."""
        # A cancellation point but no scheduling round: the caller writes next, and that
        # write yields (a round here cost a message about 0.05 ms, bench_messages.py).
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        quic = self.quic
        stream_id = quic.get_next_available_stream_id()
        # aioquic allocates the id only on the first write; an empty write does that
        # without sending anything, so the next open_stream gets the next id.
        quic.send_stream_data(stream_id, b"")
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        quic.consumed[stream_id] = 0
        self._touch()
        return stream

    @property
    def max_datagram_size(self) -> int:
        """The largest payload :meth:`send_datagram` accepts now; 0 if the peer takes no
        DATAGRAM frames.

        The peer's max_datagram_frame_size bounds the whole frame (RFC 9221 section 3),
        and the frame must fit in one packet (section 5: DATAGRAM frames are never split)
        whatever connection ID the peer switches us to.
        """
        remote = self.quic.remote_max_datagram_frame_size
        if not self._established or remote is None:
            return 0
        packet_room = self.quic.configuration.max_datagram_size - SHORT_HEADER_MAX
        return largest_datagram_payload(min(remote, packet_room - AEAD_TAG_SIZE))

    def send_datagram(self, data: bytes) -> bool:
        """Queue one unreliable DATAGRAM frame (RFC 9221).

        Raises :class:`~p2pd.errors.DatagramTooLarge` if ``data`` exceeds
        :attr:`max_datagram_size` (it would never be sent: in aioquic 1.7.2 such a frame
        stays at the head of the queue and blocks every later datagram), and
        :class:`~p2pd.errors.ConnectionLost` on a closed connection. Returns False, and
        drops the datagram, when ``QuicConfig.max_pending_datagrams`` are already
        waiting for congestion window: old audio is worth less than new.
        """
        self._check_open()
        limit = self.max_datagram_size
        # aioquic 1.7.2 checks neither bound: it queues any size, and a frame that fits
        # in no packet then stays at the head of _datagrams_pending for ever, so no
        # later datagram is sent either (test_aioquic_itself_gets_stuck_on_...).
        if len(data) > limit:
            raise DatagramTooLarge(
                f"datagram of {len(data)} bytes refused: {self!r} accepts at most {limit}"
            )
        quic = self.quic
        if quic.pending_datagrams >= self.endpoint.config.max_pending_datagrams:
            self.endpoint.stats["quic_datagrams_dropped"] += 1
            return False
        quic.send_datagram_frame(bytes(data))
        self._touch()
        self._kick()
        return True

    def close(self, reason: str = "") -> None:
        """Close gracefully (CONNECTION_CLOSE, NO_ERROR). Streams break at once."""
        self._fail(
            ConnectionLost(f"connection to {self._where()} closed by us"),
            AppError.NO_ERROR,
            reason,
            transport=False,
        )

    async def aclose(self) -> None:
        """:meth:`close`, then wait until the connection is gone."""
        self.close()
        await self.wait_closed()

    def statistics(self) -> dict[str, Any]:
        return {
            "address": f"{self.address[0]}:{self.address[1]}",
            "fingerprint": fingerprint(self.public_key) if self.public_key else None,
            "initiator": self.is_client,
            "established": self._established,
            "closing": self.is_closing,
            "streams": len(self._streams),
        }

    # ---- helpers for streams and the endpoint

    def _where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def _check_open(self) -> None:
        if self._error is not None:
            raise ConnectionLost(self._error.message) from self._error
        if self.is_closing:
            raise ConnectionLost(f"connection to {self._where()} is closing")
        if not self._established:
            raise ConnectionLost(f"connection to {self._where()} is not established yet")

    def _touch(self) -> None:
        self._last_activity = self._now = trio.current_time()

    def _kick(self) -> None:
        """Have the connection task run a step soon (never blocks, never switches)."""
        self._kicked = True
        if self._lot:
            self._lot.unpark_all()

    def _forget_stream(self, stream: QuicStream) -> None:
        sid = stream.stream_id
        if self._streams.pop(sid, None) is not None:
            self.quic.consumed.pop(sid, None)
            self._blocked_writers.discard(stream)
            # Late frames for it may still arrive while aioquic holds its state.
            if self.quic.knows_stream(sid):
                self._closed_stream_ids.add(sid)
            self._touch()

    async def _wait_ready(self) -> None:
        await self._ready.wait()
        if not self._established or self._error is not None:
            error = self._error or ConnectionLost(f"connection to {self._where()} failed")
            raise type(error)(error.message)

    def _fail(self, error: P2PDError, error_code: int, reason: str, *, transport: bool) -> None:
        """Close the connection (once) and break everything that waits on it."""
        if self._closing or self._terminated:
            return
        self._closing = True
        if self._error is None:
            self._error = error
        self.quic.close(
            error_code=error_code,
            frame_type=QuicFrameType.CRYPTO if transport else None,
            reason_phrase=reason,
        )
        self._break_all(self._error)
        self.endpoint._forget_peer(self)
        self._ready.set()
        self._kick()

    def _break_all(self, error: P2PDError) -> None:
        for stream in list(self._streams.values()):
            stream._on_connection_lost(error)
        self._blocked_writers.clear()

    # ---- the connection task

    async def _run(self) -> None:
        try:
            while not self._terminated:
                # One cancel scope serves many waits: its deadline is moved, not a new
                # scope made, each time the connection's next deadline changes (here or
                # after a step in the receive path). Only when the deadline is reached
                # (a timer fires) does a new one start.
                with trio.CancelScope() as wait:
                    self._wait = wait
                    while True:
                        if self._stop or self._terminated:
                            return  # a step in the receive path ended the connection
                        self._kicked = False
                        if not self._safe_step():
                            return
                        if self._kicked:
                            # Woken during the step (a callback wrote something): go
                            # again, but let other tasks run first.
                            await trio.lowlevel.checkpoint()
                            continue
                        wait.deadline = self._next_deadline()
                        await self._lot.park()
        finally:
            self._wait = None
            if not self._terminated:
                # Cancelled: the endpoint is shutting down. Tell the peer now, in one
                # synchronous send, rather than let it wait for its idle timeout.
                self._fail(
                    ConnectionLost("the QUIC endpoint shut down"),
                    AppError.SHUTDOWN,
                    "shutdown",
                    transport=False,
                )
                try:
                    self._transmit(trio.current_time())
                except Exception:
                    log.exception("could not send CONNECTION_CLOSE on %r", self)
                finally:
                    self._finish()

    def _step_after_receive(self) -> None:
        """The step for datagrams received in the UDP task's last burst, run by the
        endpoint's flush in that task (as aioquic's asyncio protocol transmits from
        ``datagram_received``): no wake-up of our task, which only has its deadline
        moved. Once the connection is over, the task is woken to finish it."""
        self._dirty = False
        if self._stop or self._terminated:
            return
        if not self._safe_step():
            self._stop = True
            self._lot.unpark_all()
            return
        wait = self._wait
        if wait is not None:  # else the task has not started yet; it steps first
            deadline = self._next_deadline()
            if deadline != wait.deadline:
                wait.deadline = deadline

    def _safe_step(self) -> bool:
        """One step; False once the connection is over."""
        try:
            self._step()
        except Exception:
            # aioquic turns a peer's protocol errors into a close and an event; anything
            # raised here is a bug (ours or aioquic's). It costs this connection, never
            # the endpoint.
            log.exception("internal error on %r; dropping the connection", self)
            if self._error is None:
                self._error = ConnectionLost(
                    f"connection to {self._where()} failed (internal error)"
                )
            return False
        return not self._terminated

    def _step(self) -> None:
        """Timer, events, keep-alive and idle rules, then everything there is to send;
        again while the timer is already due by the time the datagrams are out."""
        quic = self.quic
        now = self._now = trio.current_time()
        for _ in range(STEP_PASSES):
            if self._timer_at is not None and now >= self._timer_at:
                self._timer_at = None
                quic.handle_timer(now)
            self._process_events()
            if self._terminated:
                return
            self._housekeeping(now)
            sent = self._transmit(now)
            # get_timer() is safe only after connect() or the first receive_datagram()
            # (it compares with _close_at, which is None before); both happen before
            # any step.
            timer_at = self._timer_at = quic.get_timer()
            if not sent or timer_at is None:
                break
            # aioquic's pacer (recovery.QuicPacketPacer) sees one `now` per call, so its
            # token bucket never refills while a call builds and encrypts packets. With
            # a large window it lets out two or three packets and asks to be called
            # again a microsecond later: packet_time is floored at 1 us and the bucket
            # holds 16 packets' worth of time at cwnd/srtt, under 3 us once cwnd is a few
            # MB (it is on loopback, where nothing is lost and srtt is floored at 1 ms).
            # That deadline has passed by the time the packets are out; going through
            # the scheduler for it costs a scheduling round and a Cancelled per two
            # packets. Pass the real time instead, as often as the timer is due.
            now = self._now = trio.current_time()
            if now < timer_at:
                break
        if self._blocked_writers:
            self._wake_writers()

    def _transmit(self, now: float) -> bool:
        """Send what aioquic has to send; True if anything went out."""
        datagrams = self.quic.datagrams_to_send(now)
        if not datagrams:
            return False
        self._last_send = now
        sendto = self.endpoint.udp.sendto
        for data, addr in datagrams:
            sendto(data, addr)
        return True

    def _wake_writers(self) -> None:
        # Hysteresis: a writer blocked at send_buffer wakes at half of it, so it refills in
        # large writes instead of one packet's worth per acknowledgement.
        low = self.endpoint.config.send_buffer // 2
        backlog = self.quic.send_backlog
        for stream in list(self._blocked_writers):
            if stream._send_error is not None or backlog(stream.stream_id) <= low:
                self._blocked_writers.discard(stream)
                stream._send_lot.unpark_all()

    def _next_deadline(self) -> float:
        deadline = self._timer_at if self._timer_at is not None else math.inf
        if self._closing:
            return deadline
        config = self.endpoint.config
        if not self._established:
            return min(deadline, self._handshake_deadline)
        if self._streams or self._now - self._last_activity < config.idle_close:
            deadline = min(deadline, self._last_send + config.keepalive_interval)
        if not self._streams:
            deadline = min(deadline, self._last_activity + config.idle_close)
        return deadline

    def _housekeeping(self, now: float) -> None:
        if self._closing:
            return
        config = self.endpoint.config
        if not self._established:
            if now >= self._handshake_deadline:
                self._fail(
                    ConnectionLost(f"QUIC handshake with {self._where()} timed out"),
                    AppError.NO_ERROR,
                    "handshake timeout",
                    transport=False,
                )
            return
        if self._streams or now - self._last_activity < config.idle_close:
            # Keep-alive (RFC 9000 section 10.1.2): an ack-eliciting PING well before the
            # idle timeout, so a connection in use is not lost to silence.
            if now - self._last_send >= config.keepalive_interval:
                self._ping_uid += 1
                self.quic.send_ping(self._ping_uid)
        else:
            log.debug("closing idle connection %r", self)
            self._fail(
                ConnectionLost(f"connection to {self._where()} closed: idle"),
                AppError.NO_ERROR,
                "idle",
                transport=False,
            )

    def _process_events(self) -> None:
        quic = self.quic
        endpoint = self.endpoint
        while (event := quic.next_event()) is not None:
            # Most frequent first: this runs once per event in bulk transfers.
            if isinstance(event, events.StreamDataReceived):
                self._on_stream_data(event)
            elif isinstance(event, events.DatagramFrameReceived):
                if self._established and not self._closing:
                    self._last_activity = self._now
                    endpoint._deliver_datagram(self, event.data)
            elif isinstance(event, events.StreamReset):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_reset(
                        StreamBroken(
                            f"stream {event.stream_id} reset by the peer "
                            f"(code {event.error_code:#x})"
                        )
                    )
            elif isinstance(event, events.StopSendingReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_stop_sending(
                        StreamBroken(
                            f"the peer stopped reading stream {event.stream_id} "
                            f"(code {event.error_code:#x})"
                        )
                    )
            elif isinstance(event, events.HandshakeCompleted):
                self._on_handshake(event)
            elif isinstance(event, events.ConnectionIdIssued):
                endpoint._register_cid(event.connection_id, self)
            elif isinstance(event, events.ConnectionIdRetired):
                endpoint._unregister_cid(event.connection_id, self)
            elif isinstance(event, events.ConnectionTerminated):
                self._on_terminated(event)
                return

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        if not self._established or self._closing:
            return  # nothing is delivered before the peer's key is checked
        sid = event.stream_id
        stream = self._streams.get(sid)
        if stream is None:
            if sid in self._closed_stream_ids:
                if not self.quic.knows_stream(sid):
                    self._closed_stream_ids.discard(sid)
                return
            if stream_is_client_initiated(sid) == self.is_client:
                return  # one of ours, already closed and forgotten
            stream = QuicStream(self, sid)
            if stream_is_unidirectional(sid) or self.endpoint._on_stream is None:
                # We speak bidirectional streams only (docs/PROTOCOL.md).
                self.endpoint.stats["quic_streams_refused"] += 1
                self.quic.stop_stream(sid, AppError.STREAM_REFUSED)
                if not stream_is_unidirectional(sid):
                    self.quic.reset_stream(sid, AppError.STREAM_REFUSED)
                self._closed_stream_ids.add(sid)
                return
            self._streams[sid] = stream
            self.quic.consumed[sid] = 0
            self.endpoint._spawn_stream_handler(self, stream)
        self._last_activity = self._now
        stream._on_data(event.data, event.end_stream)

    def _on_handshake(self, event: events.HandshakeCompleted) -> None:
        if self._closing:
            return
        key = self.quic.peer_certificate_key()
        if event.alpn_protocol != ALPN:
            # aioquic already refuses a foreign ALPN in the handshake (RFC 9001 section
            # 8.1); this only guards against that ever changing.
            self._fail(
                ConnectionLost(f"{self._where()} does not speak {ALPN}"),
                _crypto_error(AlertDescription.no_application_protocol),
                "ALPN",
                transport=True,
            )
            return
        if key is None:
            # RFC 8446 section 4.4.2.4: the server may abort with certificate_required.
            self._fail(
                ConnectionLost(f"{self._where()} presented no Ed25519 certificate"),
                _crypto_error(
                    AlertDescription.bad_certificate
                    if self.is_client
                    else AlertDescription.certificate_required
                ),
                "an Ed25519 identity certificate is required",
                transport=True,
            )
            return
        if self.expected_key is not None and key != self.expected_key:
            # The handshake proved the peer holds `key`, but it is not who we wanted.
            # Our Finished has not gone out yet (we close before transmitting), so the
            # server never completes its side either.
            self._fail(
                PeerKeyMismatch(
                    f"the peer at {self._where()} has key {fingerprint(key)}, "
                    f"expected {fingerprint(self.expected_key)}; connection closed"
                ),
                _crypto_error(AlertDescription.bad_certificate),
                "unexpected identity key",
                transport=True,
            )
            return
        self.public_key = key
        self._established = True
        self._last_activity = self._now
        self.endpoint._on_established(self)
        self._ready.set()

    def _on_terminated(self, event: events.ConnectionTerminated) -> None:
        if self._error is None:
            self._error = ConnectionLost(f"connection to {self._where()} {_describe_close(event)}")
        log.debug("%r terminated: %s", self, _describe_close(event))
        self._closing = True
        self._finish()

    def _finish(self) -> None:
        if self._terminated:
            return
        self._terminated = True
        error = self._error or ConnectionLost(f"connection to {self._where()} closed")
        self._break_all(error)
        self.endpoint._remove_peer(self)
        self._ready.set()
        self._done.set()


# --------------------------------------------------------------------------- endpoint


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
    ) -> None:
        self.udp = udp
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
        certificate, private_key = make_certificate(identity)
        self._client_config = self._configuration(True, certificate, private_key)
        self._server_config = self._configuration(False, certificate, private_key)
        self._nursery: trio.Nursery | None = None
        self._by_cid: dict[bytes, QuicPeer] = {}
        self._peers: dict[tuple[bytes, NetworkAddress], QuicPeer] = {}
        self._all: set[QuicPeer] = set()
        #: Connections that received datagrams since the last flush, in arrival order.
        self._dirty: list[QuicPeer] = []
        self._v6 = udp.local_address.version == 6

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
            # No CA: chain validation is off, the identity key check is ours (module doc).
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
        try:
            peer.quic.receive_datagram(data, addr, trio.current_time())
        except Exception:
            # As in QuicPeer._run: a bug must not take the UDP receive loop down with it.
            log.exception("internal error receiving on %r; dropping the connection", peer)
            peer._fail(
                ConnectionLost(f"connection to {peer._where()} failed (internal error)"),
                QuicErrorCode.INTERNAL_ERROR,
                "internal error",
                transport=True,
            )
            return
        if not peer._dirty:
            peer._dirty = True
            self._dirty.append(peer)

    def _flush(self) -> None:
        """The UDP task's flush hook: one step for each connection that received
        datagrams in the burst it just handed out."""
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for peer in dirty:
            peer._step_after_receive()

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
            self.udp.sendto(
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
        if len(self._all) >= self.config.max_connections:
            self._drop("too_many_connections")
            return
        quic = _Connection(
            configuration=self._server_config,
            original_destination_connection_id=header.destination_cid,
            stream_window=self.config.stream_window,
        )
        peer = QuicPeer(self, quic, addr, None)
        self._all.add(peer)
        # Map the client's chosen DCID (its Initials keep using it until it hears from us)
        # and our own first CID, as aioquic's asyncio server does.
        self._register_cid(header.destination_cid, peer)
        self._register_cid(quic.host_cid, peer)
        stats["quic_connections_accepted"] += 1
        quic.receive_datagram(data, addr, trio.current_time())
        self._nursery.start_soon(peer._run, name=f"quic {addr[0]}:{addr[1]}")

    # ---- outgoing connections

    async def connect(self, address: Address | NetworkAddress, expected_key: bytes) -> QuicPeer:
        """A connection to the peer at ``address`` that proves it holds ``expected_key``.

        An open connection to that key at that address (made by either side) is reused.
        Raises :class:`~p2pd.errors.PeerKeyMismatch` if the peer proves another key, and
        :class:`~p2pd.errors.ConnectionLost` if the handshake fails or times out.
        """
        if not isinstance(expected_key, bytes) or len(expected_key) != 32:
            raise UsageError("expected_key must be a 32-byte Ed25519 public key")
        addr = self._normalize(address)
        peer = self._peers.get((expected_key, addr))
        if peer is None or peer.is_closing:
            peer = self._new_client(addr, expected_key)
        await peer._wait_ready()
        return peer

    def _new_client(self, addr: NetworkAddress, expected_key: bytes) -> QuicPeer:
        if self._nursery is None:
            raise LocalError("the QUIC endpoint is not running")
        if len(self._all) >= self.config.max_connections:
            raise LocalError("too many QUIC connections")
        quic = _Connection(
            configuration=self._client_config, stream_window=self.config.stream_window
        )
        quic.connect(addr, now=trio.current_time())
        peer = QuicPeer(self, quic, addr, expected_key)
        self._all.add(peer)
        self._register_cid(quic.host_cid, peer)
        self._peers[(expected_key, addr)] = peer
        self._nursery.start_soon(peer._run, name=f"quic {addr[0]}:{addr[1]}")
        return peer

    def _normalize(self, address: Address | NetworkAddress) -> NetworkAddress:
        if isinstance(address, Address):
            host, port = address.host, address.port
        else:
            host, port = Address(str(address[0]), int(address[1])).as_tuple()
        # The socket reports an IPv4 peer of a dual-stack IPv6 socket as ::ffff:a.b.c.d,
        # and aioquic drops packets from any other spelling of the server's address.
        if self._v6 and ":" not in host:
            host = "::ffff:" + host
        return (host, port)

    # ---- bookkeeping used by the peers

    def peers(self) -> list[QuicPeer]:
        """Every connection that is established and not closing."""
        return [p for p in self._all if p._established and not p.is_closing]

    def statistics(self) -> dict[str, Any]:
        return {"connections": len(self._all), "counters": dict(self.stats)}

    def _register_cid(self, cid: bytes, peer: QuicPeer) -> None:
        self._by_cid[cid] = peer
        peer._cids.add(cid)

    def _unregister_cid(self, cid: bytes, peer: QuicPeer) -> None:
        if self._by_cid.get(cid) is peer:
            del self._by_cid[cid]
        peer._cids.discard(cid)

    def _on_established(self, peer: QuicPeer) -> None:
        assert peer.public_key is not None
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

    def _forget_peer(self, peer: QuicPeer) -> None:
        """No longer offer ``peer`` for reuse (it is closing)."""
        for key in [k for k, p in self._peers.items() if p is peer]:
            del self._peers[key]

    def _remove_peer(self, peer: QuicPeer) -> None:
        self._forget_peer(peer)
        for cid in list(peer._cids):
            self._unregister_cid(cid, peer)
        self._all.discard(peer)
        if self._on_closed is not None:
            try:
                self._on_closed(peer)
            except Exception:
                log.exception("on_closed handler failed for %r", peer)

    def _deliver_datagram(self, peer: QuicPeer, data: bytes) -> None:
        if self._on_datagram is None:
            self.stats["quic_datagrams_ignored"] += 1
            return
        try:
            self._on_datagram(peer, data)
        except Exception:
            log.exception("on_datagram handler failed for %r", peer)

    def _spawn_stream_handler(self, peer: QuicPeer, stream: QuicStream) -> None:
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
                stream._close_now(AppError.STREAM_CLOSED, graceful=True)
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
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.serve)
        try:
            yield endpoint
        finally:
            nursery.cancel_scope.cancel()
