"""When a connection pings, gives up on its handshake, closes for idleness, and whether
the key the peer proved is the one we want: a pure class, fed events and ``now``.

:class:`ConnectionPolicy` does no I/O and reads no clock: the driver
(:class:`~p2pd.transport.quic.peer.QuicPeer`) passes ``now`` to every call, and carries
out what it answers (a PING, a close). It knows nothing of aioquic's own timers (loss
detection, the idle timeout it enforces, pacing); the driver takes the earliest of those
and :meth:`ConnectionPolicy.deadline`.

The rules, with ``QuicConfig``'s fields:

- **Handshake**: a connection we make that is not established ``handshake_timeout``
  after it began is closed. One we accept (half-open, it holds a slot of the budget,
  :mod:`.admission`) is discarded after ``half_open_timeout``, without a
  CONNECTION_CLOSE (its source may be spoofed, and a close would keep the slot for
  the closing period, RFC 9000 section 10.2).
- **Key check** (docs/PROTOCOL.md, "QUIC"): after the TLS handshake, the ALPN must be
  ours, the peer must have proved an Ed25519 certificate key, and a connection we made
  must have reached the key we expected. Anything else closes the connection with a TLS
  alert (RFC 9001 section 4.8), before our Finished goes out.
- **Keep-alive** (RFC 9000 section 10.1.2): while the connection is *in use* (a stream is
  open, or there was stream or datagram traffic in the last ``idle_close``), an
  ack-eliciting PING goes out once nothing was sent for ``keepalive_interval``, so the
  peer's idle timeout never ends a connection someone uses.
- **Idle close**: with no stream open and no traffic for ``idle_close``, the connection
  is closed gracefully.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ...config import QuicConfig
from ...errors import ConnectionLost, P2PDError, PeerKeyMismatch
from ...identity import fingerprint
from ._aioquic import AlertDescription
from .codes import ALPN, AppError, crypto_error


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection: ``error`` for whoever waits on it, ``error_code`` and
    ``reason`` for the peer; a transport close (CONNECTION_CLOSE of type 0x1c, here
    carrying a TLS alert) if ``transport``, else an application close (0x1d)."""

    error: P2PDError
    error_code: int
    reason: str
    transport: bool
    #: Discard the connection's state at once and send nothing (RFC 9000 section 10:
    #: an endpoint may drop a connection silently; the peer's idle timeout ends it).
    silent: bool = False


#: :meth:`ConnectionPolicy.poll`'s answer when a PING is due.
PING: Literal["ping"] = "ping"


class ConnectionPolicy:
    """The rules of one connection (module docstring). ``where`` names the peer in error
    messages; ``expected_key`` is the key a connection we make must reach (None for a
    connection we accepted: any proven key will do, the layer above decides)."""

    def __init__(
        self, config: QuicConfig, now: float, *, where: str, expected_key: bytes | None
    ) -> None:
        self.config = config
        self.where = where
        self.expected_key = expected_key
        #: The key the peer proved; None until the handshake passed the key check.
        self.public_key: bytes | None = None
        timeout = config.handshake_timeout if expected_key else config.half_open_timeout
        self.handshake_deadline = now + timeout
        #: Last stream or datagram traffic, or use by the application.
        self.last_activity = now
        #: Last time anything was sent.
        self.last_send = now

    @property
    def established(self) -> bool:
        return self.public_key is not None

    # ---- events

    def activity(self, now: float) -> None:
        """Stream or datagram traffic, or the application used the connection."""
        self.last_activity = now

    def sent(self, now: float) -> None:
        """Datagrams went out."""
        self.last_send = now

    def handshake_completed(
        self, now: float, *, alpn: str | None, key: bytes | None
    ) -> Close | None:
        """The key check; None if the peer passes (then it is established), else how to
        close. ``key`` is the Ed25519 key of the certificate the peer proved, if any."""
        if alpn != ALPN:
            # aioquic already refuses a foreign ALPN in the handshake (RFC 9001 section
            # 8.1); this only guards against that ever changing.
            return Close(
                ConnectionLost(f"{self.where} does not speak {ALPN}"),
                crypto_error(AlertDescription.no_application_protocol),
                "ALPN",
                transport=True,
            )
        if key is None:
            # RFC 8446 section 4.4.2.4: the server may abort with certificate_required.
            return Close(
                ConnectionLost(f"{self.where} presented no Ed25519 certificate"),
                crypto_error(
                    AlertDescription.bad_certificate
                    if self.expected_key is not None
                    else AlertDescription.certificate_required
                ),
                "an Ed25519 identity certificate is required",
                transport=True,
            )
        if self.expected_key is not None and key != self.expected_key:
            # The handshake proved the peer holds `key`, but it is not who we wanted.
            # Our Finished has not gone out yet (the driver closes before it transmits),
            # so the server never completes its side either.
            return Close(
                PeerKeyMismatch(
                    f"the peer at {self.where} has key {fingerprint(key)}, "
                    f"expected {fingerprint(self.expected_key)}; connection closed"
                ),
                crypto_error(AlertDescription.bad_certificate),
                "unexpected identity key",
                transport=True,
            )
        self.public_key = key
        self.last_activity = now
        return None

    # ---- decisions

    # Every comparison is written as `now` against the same sum deadline() returns, so
    # that poll() at that deadline sees it as due (`now - last >= interval` can miss it
    # by one rounding step and cost a wake-up for nothing).

    def _in_use(self, now: float, busy: bool) -> bool:
        return busy or now < self.last_activity + self.config.idle_close

    def poll(self, now: float, *, busy: bool) -> Close | Literal["ping"] | None:
        """What is due at ``now``: a PING, a close, or nothing. ``busy``: a stream is
        open."""
        if not self.established:
            if now >= self.handshake_deadline:
                return Close(
                    ConnectionLost(f"QUIC handshake with {self.where} timed out"),
                    AppError.NO_ERROR,
                    "handshake timeout",
                    transport=False,
                    silent=self.expected_key is None,
                )
            return None
        if self._in_use(now, busy):
            if now >= self.last_send + self.config.keepalive_interval:
                return PING
            return None
        return Close(
            ConnectionLost(f"connection to {self.where} closed: idle"),
            AppError.NO_ERROR,
            "idle",
            transport=False,
        )

    def deadline(self, now: float, *, busy: bool) -> float:
        """When :meth:`poll` may next answer something other than None (math.inf: never,
        unless an event comes first)."""
        if not self.established:
            return self.handshake_deadline
        deadline = math.inf
        if self._in_use(now, busy):
            deadline = self.last_send + self.config.keepalive_interval
        if not busy:
            deadline = min(deadline, self.last_activity + self.config.idle_close)
        return deadline
