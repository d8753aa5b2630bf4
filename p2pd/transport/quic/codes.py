"""What p2pd's QUIC says on the wire beyond RFC 9000 itself: the ALPN, the one version,
the connection ID length, our application error codes, and how a close reads in a log.
"""

from __future__ import annotations

import enum

from ._aioquic import AlertDescription, QuicErrorCode, QuicProtocolVersion, events

#: Our one application protocol (RFC 9001 section 8.1: QUIC requires ALPN).
ALPN = "p2pd/1"
#: QUIC version 1 (RFC 9000) only.
SUPPORTED_VERSIONS = [QuicProtocolVersion.VERSION_1]
#: Length of the connection IDs we issue. All our connections share one socket and one
#: map, and short headers do not carry the length (RFC 9000 section 17.3), so it is fixed.
CID_LENGTH = 8


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
    #: No slot for this connection: strangers fill their share (docs/SECURITY.md,
    #: "QUIC budgets"). Sent just after the handshake, once the client's key is known.
    BUSY = 0x6


def crypto_error(alert: AlertDescription) -> int:
    """A TLS alert as a QUIC transport error code (RFC 9001 section 4.8)."""
    return int(QuicErrorCode.CRYPTO_ERROR) + int(alert)


def stream_is_client_initiated(stream_id: int) -> bool:
    """RFC 9000 section 2.1: the least significant bit is 0 for client-initiated streams."""
    return not stream_id & 0x1


def stream_is_unidirectional(stream_id: int) -> bool:
    """RFC 9000 section 2.1: the second least significant bit is 1 for unidirectional."""
    return bool(stream_id & 0x2)


def describe_close(event: events.ConnectionTerminated) -> str:
    """Why a connection ended, for a log line or an error message."""
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
