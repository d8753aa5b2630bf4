"""Everything p2pd takes from aioquic, and the only module that imports it.

aioquic documents ``QuicConfiguration``, ``QuicConnection``'s public methods, the events
and ``aioquic.buffer``; those are re-exported here as they are. Everything else we use is
in this file too, in two kinds:

- **Undocumented module-level names** (``pull_quic_header``, ``QuicHeader``,
  ``PACKET_NUMBER_SEND_SIZE``, ...): not underscored, and aioquic's own asyncio server
  uses them, but no promise keeps them stable.
- **Internals** (underscored attributes and methods, a copied private method body): all
  in :class:`Connection`, each commented with why and with the upstream request that
  would remove it (docs/ARCHITECTURE.md, "QUIC transport").

Because of the internals, aioquic is pinned (``pyproject.toml``) and this module refuses
to load with any other version (:func:`check_version`): a silent change to one of them
would weaken the transport's security (a server that no longer authenticates clients)
or its memory bound (a stream that buffers without limit), not just break it.
"""

from __future__ import annotations

from typing import Any

import aioquic
from aioquic.buffer import Buffer, size_uint_var
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import (
    MAX_STREAM_DATA_FRAME_CAPACITY,
    TRANSPORT_CLOSE_FRAME_CAPACITY,
    QuicConnection,
    QuicConnectionState,
)
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicHeader,
    QuicPacketType,
    QuicProtocolVersion,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import PACKET_NUMBER_SEND_SIZE, QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream as _AioquicStream
from aioquic.tls import AlertDescription, Epoch

from ..tls import certificate_public_key

__all__ = [
    "PACKET_NUMBER_SEND_SIZE",
    "PINNED_VERSION",
    "SMALLEST_MAX_DATAGRAM_SIZE",
    "AlertDescription",
    "Buffer",
    "Connection",
    "CryptoPair",
    "QuicConfiguration",
    "QuicErrorCode",
    "QuicFrameType",
    "QuicHeader",
    "QuicPacketBuilder",
    "QuicPacketType",
    "QuicProtocolVersion",
    "check_version",
    "encode_initial_close",
    "encode_quic_retry",
    "encode_quic_version_negotiation",
    "events",
    "pull_quic_header",
    "size_uint_var",
]

#: The aioquic release whose internals this module was written against and tested with.
PINNED_VERSION = "1.7.2"


def check_version(found: str) -> None:
    """Refuse any aioquic but :data:`PINNED_VERSION` (raises ImportError)."""
    if found != PINNED_VERSION:
        raise ImportError(
            f"p2pd's QUIC transport needs aioquic {PINNED_VERSION}, found {found}. It uses "
            "aioquic internals (p2pd/transport/quic/_aioquic.py; docs/ARCHITECTURE.md, "
            f'"QUIC transport"): install aioquic=={PINNED_VERSION}, or review that module '
            "against the new release and move the pin."
        )


check_version(aioquic.__version__)


def encode_initial_close(
    version: int, source_cid: bytes, destination_cid: bytes, error_code: int
) -> bytes:
    """A server Initial packet that closes a connection we keep no state for (a
    transport CONNECTION_CLOSE, RFC 9000 section 10.2.3), e.g. INVALID_TOKEN (section
    8.1.3) or CONNECTION_REFUSED.

    ``source_cid`` is the Destination Connection ID the client chose: Initial keys
    derive from it (RFC 9001 section 5.2), so this costs an HKDF and one AES-GCM
    encryption, not a TLS handshake.
    """
    # Copied from aioquic 1.7.2's asyncio/server.py (_encode_invalid_token_close, a
    # private function), with the error code as a parameter. INTERNAL-ish: CryptoPair,
    # QuicPacketBuilder and TRANSPORT_CLOSE_FRAME_CAPACITY are undocumented names.
    crypto = CryptoPair()
    crypto.setup_initial(cid=source_cid, is_client=False, version=version)
    builder = QuicPacketBuilder(
        host_cid=source_cid,
        is_client=False,
        max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
        peer_cid=destination_cid,
        version=version,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    buf = builder.start_frame(
        QuicFrameType.TRANSPORT_CLOSE, capacity=TRANSPORT_CLOSE_FRAME_CAPACITY
    )
    buf.push_uint_var(error_code)
    buf.push_uint_var(QuicFrameType.PADDING)  # the frame type that caused it: none
    buf.push_uint_var(0)  # no reason phrase
    datagrams, _ = builder.flush()
    data: bytes = datagrams[0]
    return data


class Connection(QuicConnection):
    """aioquic's connection with the changes p2pd needs, and typed windows onto state
    aioquic keeps private.

    ``tests/test_quic.py`` fails loudly if a later aioquic changes what the overrides
    rely on (a server that learns no client key, a stream that stalls or over-buffers).
    """

    def __init__(self, *, stream_window: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._p2pd_window = stream_window
        #: stream id -> bytes the application has read; only streams we hand out.
        self._p2pd_consumed: dict[int, int] = {}

    # ---- mutual TLS (upstream request 1)

    def _initialize(self, peer_cid: bytes) -> None:
        # INTERNAL: QuicConnection._initialize, QuicConnection._is_client,
        # tls.Context._request_client_certificate.
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

    # ---- the peer's certificate (upstream request 2)

    def peer_certificate_key(self) -> bytes | None:
        """The Ed25519 key of the certificate the peer proved during the handshake."""
        # INTERNAL: tls.Context._peer_certificate.
        return certificate_public_key(self.tls._peer_certificate)

    # ---- receive credit as the application reads (upstream request 3)

    def track_consumption(self, stream_id: int) -> None:
        """Grant ``stream_id`` credit as the application reads it (from 0 bytes read)."""
        self._p2pd_consumed[stream_id] = 0

    def stream_consumed(self, stream_id: int, total: int) -> None:
        """The application has now read ``total`` bytes of ``stream_id``."""
        self._p2pd_consumed[stream_id] = total

    def untrack_consumption(self, stream_id: int) -> None:
        """The application no longer reads ``stream_id``: no more credit for it."""
        self._p2pd_consumed.pop(stream_id, None)

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: _AioquicStream
    ) -> None:
        # INTERNAL: overrides QuicConnection._write_stream_limits and copies the part of
        # its body that writes the frame (QuicPacketBuilder.start_frame,
        # MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection._on_max_stream_data_delivery,
        # QuicStream.max_stream_data_local and max_stream_data_local_sent).
        #
        # aioquic doubles a stream's receive credit whenever the peer has sent half of it,
        # whether or not anybody reads: a peer can make us buffer without bound. We grant
        # credit as the application consumes instead (RFC 9000 section 4.2): the limit is
        # always "read so far + window", announced once it moved by half a window, so a
        # stream holds at most one window of unread data. Streams the application has
        # not seen yet (or has closed) get no more than their initial window. (Calling
        # super() is not enough: it would double the limit we set.)
        sid = stream.stream_id
        if sid is None:  # only aioquic's CRYPTO streams have none; never passed here
            return
        if stream.max_stream_data_local:
            consumed = self._p2pd_consumed.get(sid)
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

    # ---- stream state (upstream requests 4 and 5)

    def send_backlog(self, stream_id: int) -> int:
        """Bytes written to a stream and not yet acknowledged by the peer."""
        # INTERNAL: QuicConnection._streams, QuicStreamSender._buffer_start/_buffer_stop.
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def latest_rtt(self) -> float | None:
        """The latest round-trip sample in seconds (aioquic floors it at 1 ms), None
        before the first acknowledgement."""
        # INTERNAL: QuicConnection._loss (QuicPacketRecovery._rtt_initialized/_rtt_latest).
        loss = self._loss
        return loss._rtt_latest if loss._rtt_initialized else None

    def knows_stream(self, stream_id: int) -> bool:
        """aioquic still holds state for ``stream_id`` (late frames may arrive for it)."""
        # INTERNAL: QuicConnection._streams.
        return stream_id in self._streams

    def sender_stopped(self, stream_id: int) -> bool:
        """True once the peer's STOP_SENDING reset our side of the stream.

        aioquic resets the sender while it parses the frame, before we see the
        StopSendingReceived event; writing in between (even a FIN) raises RuntimeError.
        Seen when a peer closes a stream while our handler is finishing with it.
        """
        # INTERNAL: QuicConnection._streams, QuicStreamSender._reset_error_code.
        stream = self._streams.get(stream_id)
        return stream is not None and stream.sender._reset_error_code is not None

    # ---- acknowledgements ride with data (upstream request 9)

    def ack_with_data(self) -> None:
        """Put the ACK this connection owes into the next packet, if one is owed: the
        application has just written, so a packet goes out anyway.

        aioquic delays an ACK by ``K_GRANULARITY`` (1 ms) and writes it only once that
        delay is over, even into a packet it sends meanwhile: an answer written 0.8 ms
        after a message leaves without the message's ACK, and a second, ACK-only packet
        follows 0.2 ms later (two datagrams and two wake-ups per answer instead of one).
        RFC 9000 section 13.2.1 has an endpoint include pending ACKs in the packets it
        sends; ack-eliciting packets on their own are still acknowledged after the
        delay."""
        # INTERNAL: QuicConnection._spaces, QuicPacketSpace.ack_at (tls.Epoch.ONE_RTT:
        # streams are written in 1-RTT packets only).
        space = self._spaces.get(Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None:
            space.ack_at = 0.0  # due: written into the next packet, pacing or not

    # ---- closing (upstream request 8)

    @property
    def is_closing(self) -> bool:
        """aioquic is closing or draining the connection (RFC 9000 section 10.2): it
        sends nothing but a CONNECTION_CLOSE any more. Its ConnectionTerminated event
        comes only when the closing period ends, 3 PTOs later (~100 ms on loopback);
        until then this is the only sign that the peer closed."""
        # INTERNAL: QuicConnection._state, QuicConnectionState.
        return self._state in (
            QuicConnectionState.CLOSING,
            QuicConnectionState.DRAINING,
            QuicConnectionState.TERMINATED,
        )

    # ---- datagrams (upstream request 6)

    @property
    def remote_max_datagram_frame_size(self) -> int | None:
        """The peer's max_datagram_frame_size transport parameter (RFC 9221 section 3);
        None if it takes no DATAGRAM frames or the handshake has not told us yet."""
        # INTERNAL: QuicConnection._remote_max_datagram_frame_size.
        return self._remote_max_datagram_frame_size

    @property
    def pending_datagrams(self) -> int:
        """DATAGRAM frames queued and not yet sent."""
        # INTERNAL: QuicConnection._datagrams_pending.
        return len(self._datagrams_pending)

    def send_datagram_frame_first(self, data: bytes) -> None:
        """Queue a DATAGRAM frame ahead of those waiting: the next packet the congestion
        window allows carries it (``send_datagram_frame`` queues it behind them)."""
        # INTERNAL: QuicConnection._datagrams_pending, a deque aioquic sends from the
        # left (popleft once a frame is written).
        self._datagrams_pending.appendleft(data)
