"""Revoking a mailbox pass (issue 12, item 3; docs/PROTOCOL.md, "Revoking a pass").

A pass (:mod:`.mailbox_pass`) is shared by all of an owner's contacts; a contact who
leaks it lets anyone fill the contacts' share of the owner's mailbox until it expires
(up to three weeks). So the owner can move on to a new pass before then:

- it bumps its **pass epoch** (a counter it keeps): this week's pass key is derived
  from the week *and* the epoch, so the new one is unrelated to the leaked one, and its
  contacts are given the new pass on their next direct connection (the announcer's
  version is (week, epoch): p2pd/dht/mailbox_pass_share.py);
- it sends its mailbox's replicas a **pin**, signed by its identity key:
  ``mailbox_revoke [sender, owner, timestamp, expires, pass key, signature]``: "from
  now on, of my passes that expire no later than ``expires``, only ``pass key`` is
  good". A replica keeps the newest pin per mailbox (by timestamp) until ``expires``
  and refuses (``mailbox_refused_pass-revoked``) a contact's put under any other pass
  key that does not expire later. Passes of later weeks (which expire later) are taken
  again: next week's pass needs no new pin.

Bounds on the replica: the timestamp within :data:`REVOKE_WINDOW` of its clock (an
overheard pin cannot be replayed later, an older one never replaces a newer one),
``expires`` in the future and at most :data:`~.mailbox_pass.MAX_PASS_LIFETIME` ahead,
one pin per mailbox key, :data:`MAX_PINS` pins in all (full: new pins are refused,
held ones are never evicted, so a flood of pins for fresh identities cannot push an
owner's revocation out; they all expire within three weeks). Pins are held in memory:
a replica that restarts, or a new replica, has none until the owner sends it again
(the owner sends it with each revocation; docs/SECURITY.md says what that leaves).

Pure functions and a bounded table; no I/O, no clock but the ``wall`` passed in.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..identity import verify_signature
from .mailbox_pass import MAX_PASS_LIFETIME, MailboxPass

__all__ = ["MAX_PINS", "REVOKE_WINDOW", "PassPin", "PassPins", "make_pin", "pin_message"]

REVOKE_CONTEXT = b"p2pd mailbox pass revoke v1\x00"
#: A pin's timestamp must be within this many seconds of the replica's clock.
REVOKE_WINDOW = 600
#: Pins a node holds, every mailbox together (one per mailbox key).
MAX_PINS = 8192
#: A full table drops expired pins at most this often (seconds).
CULL_INTERVAL = 60.0


def pin_message(owner: bytes, timestamp: int, expires: int, pass_key: bytes) -> bytes:
    return REVOKE_CONTEXT + owner + struct.pack(">QQ", timestamp, expires) + pass_key


@dataclass(frozen=True, slots=True)
class PassPin:
    """The owner's word: of its passes expiring by ``expires``, only ``pass_key``."""

    owner: bytes
    timestamp: int
    expires: int
    pass_key: bytes
    signature: bytes

    def args(self) -> list[object]:
        """The arguments of a ``mailbox_revoke`` request (after the sender key)."""
        return [self.owner, self.timestamp, self.expires, self.pass_key, self.signature]


def make_pin(
    owner: bytes, sign: Callable[[bytes], bytes], wall: float, kept: MailboxPass
) -> PassPin:
    """The pin that makes ``kept`` (the owner's new pass) the only good one of its week."""
    timestamp = int(wall)
    message = pin_message(owner, timestamp, kept.expires, kept.public_key)
    return PassPin(owner, timestamp, kept.expires, kept.public_key, sign(message))


class PassPins:
    """A storing node's pins, by mailbox key (a bounded table)."""

    def __init__(self, mailbox_key_of: Callable[[bytes], bytes]) -> None:
        self._mailbox_key = mailbox_key_of
        #: mailbox key -> (timestamp, expires, pass key)
        self._pins: dict[bytes, tuple[int, int, bytes]] = {}
        self._culled = float("-inf")

    def __len__(self) -> int:
        return len(self._pins)

    def pin(self, pin: PassPin, wall: float) -> str | None:
        """Hold ``pin`` (None), or why not. Cheap checks before the signature."""
        if abs(pin.timestamp - wall) > REVOKE_WINDOW:
            return "revoke-stale"
        if not wall < pin.expires <= wall + MAX_PASS_LIFETIME:
            return "revoke-expires"
        key = self._mailbox_key(pin.owner)
        held = self._pins.get(key)
        if held is not None and held[0] >= pin.timestamp:
            # the same pin again is fine; an older one never replaces a newer one
            return None if held == (pin.timestamp, pin.expires, pin.pass_key) else "revoke-old"
        if held is None and len(self._pins) >= MAX_PINS:
            self._cull(wall)
            if len(self._pins) >= MAX_PINS:
                return "revoke-full"
        message = pin_message(pin.owner, pin.timestamp, pin.expires, pin.pass_key)
        if not verify_signature(pin.owner, message, pin.signature):
            return "revoke-signature"
        self._pins[key] = (pin.timestamp, pin.expires, pin.pass_key)
        return None

    def revoked(self, key: bytes, expires: int, pass_key: bytes, wall: float) -> bool:
        """Whether a contact's put into mailbox ``key`` under ``pass_key`` (expiring at
        ``expires``) is refused by the mailbox's pin."""
        held = self._pins.get(key)
        if held is None:
            return False
        if held[1] <= wall:
            del self._pins[key]
            return False
        return pass_key != held[2] and expires <= held[1]

    def _cull(self, wall: float) -> None:
        if wall - self._culled < CULL_INTERVAL:  # a walk of the table: not per request
            return
        self._culled = wall
        for key in [k for k, (_, expires, _) in self._pins.items() if expires <= wall]:
            del self._pins[key]
