"""Configuration of the session layer: one frozen dataclass, read once, passed down."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from .bundle import MAX_ONE_TIME_PREKEYS

DAY = 24 * 3600.0
#: Names the whole parameter set of p2pd/session/crypto.py; stored with every session and
#: with our prekeys so that a state made under other parameters is refused instead of
#: silently failing to decrypt. Here, not in crypto.py, because checking a stored state's
#: suite must not import the X3DH and Double Ratchet libraries (and pydantic, ~8 MB):
#: an idle daemon does not need them (issue 9).
SUITE = "p2pd-x3dh-ed25519-sha256/dr-x25519-hkdf-aescbc-hmac-sha256/v1"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    #: Seconds between signed prekey rotations (X3DH section 3.2: "e.g. once a week, or
    #: once a month").
    signed_prekey_rotation: float = 7 * DAY
    #: Seconds a retired signed prekey still opens initial messages. It must outlast the
    #: record lifetime (24 h: a sender may use a bundle until the record expires) plus
    #: the time an initial message may wait in a mailbox (7 days), with slack.
    signed_prekey_grace: float = 14 * DAY
    #: One-time prekeys kept published; each used one is deleted and replaced. At most
    #: 40, what the bundle format carries (1,382 bytes at 40).
    one_time_prekeys: int = MAX_ONE_TIME_PREKEYS
    #: Most message keys one incoming message may skip in a chain (the Double Ratchet's
    #: MAX_SKIP, section 3.2): more is refused with TooManySkipped.
    max_skip: int = 1000
    #: Most skipped message keys a session stores in total; the oldest are dropped first.
    max_skipped_keys: int = 2000
    #: Superseded sessions kept per peer to open messages still in flight (e.g. after
    #: both sides started a session at once). Older ones are closed.
    max_archived_sessions: int = 4
    #: Seconds an archived session may stay unused before it is closed.
    archived_session_lifetime: float = 30 * DAY

    def __post_init__(self) -> None:
        if not self.signed_prekey_rotation > 0 or not self.signed_prekey_grace >= 0:
            raise UsageError("signed prekey rotation must be positive, grace not negative")
        if not 0 <= self.one_time_prekeys <= MAX_ONE_TIME_PREKEYS:
            raise UsageError(f"one_time_prekeys must be 0..{MAX_ONE_TIME_PREKEYS}")
        if not 1 <= self.max_skip <= self.max_skipped_keys:
            raise UsageError("need 1 <= max_skip <= max_skipped_keys")
        if self.max_archived_sessions < 0 or not self.archived_session_lifetime >= 0:
            raise UsageError("archived session limits must not be negative")
