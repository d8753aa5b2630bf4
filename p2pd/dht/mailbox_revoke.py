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
owner's revocation out; they all expire within three weeks).

Pins are kept across restarts in the node's database (table ``mailbox_pins``, one row
per pin as signed, the same bound): written with the DHT's other rows after each burst
of datagrams (:meth:`PassPins.persist`, never inside someone else's transaction) and
loaded at start, where every row is checked again as if it had just arrived, except
for the freshness window (its signature, its mailbox key, its expiry): a corrupt row is
refused with a log line and deleted, an expired one dropped, and beyond
:data:`MAX_PINS` the oldest are dropped. A node that becomes a replica later has no pin
until the owner sends it again (with each republish of its record).

Pure functions and a bounded table; no clock but the ``wall`` passed in; the only I/O
is the database given to :class:`PassPins`.
"""

from __future__ import annotations

import logging
import sqlite3
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..identity import verify_signature
from .mailbox_pass import MAX_PASS_LIFETIME, MailboxPass

__all__ = ["MAX_PINS", "REVOKE_WINDOW", "PassPin", "PassPins", "make_pin", "pin_message"]

log = logging.getLogger(__name__)

REVOKE_CONTEXT = b"p2pd mailbox pass revoke v1\x00"
#: A pin's timestamp must be within this many seconds of the replica's clock.
REVOKE_WINDOW = 600
#: Pins a node holds, every mailbox together (one per mailbox key).
MAX_PINS = 8192
#: A full table drops expired pins at most this often (seconds).
CULL_INTERVAL = 60.0
#: Corrupt stored pins logged one line each at load; the rest in one line.
MAX_LOGGED_ROWS = 8

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mailbox_pins (
    key BLOB PRIMARY KEY, owner BLOB NOT NULL, timestamp INTEGER NOT NULL,
    expires INTEGER NOT NULL, pass_key BLOB NOT NULL, signature BLOB NOT NULL)
"""


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


def _stored_pin(
    row: tuple[object, ...], mailbox_key_of: Callable[[bytes], bytes], wall: float
) -> PassPin | str | None:
    """A row of ``mailbox_pins`` checked as a pin received now would be (its signature
    last), except for the freshness window: the pin, None if it has expired, or why the
    row is refused."""
    key, owner, timestamp, expires, pass_key, signature = row
    if not (
        isinstance(key, bytes)
        and isinstance(owner, bytes)
        and isinstance(pass_key, bytes)
        and isinstance(signature, bytes)
        and isinstance(timestamp, int)
        and isinstance(expires, int)
    ):
        return "a column of the wrong type"
    if (len(owner), len(pass_key), len(signature)) != (32, 32, 64):
        return "a key or signature of the wrong length"
    if not 0 <= timestamp < 1 << 63 or not 0 <= expires < 1 << 63:
        return "a time out of range"
    if key != mailbox_key_of(owner):
        return "not its owner's mailbox key"
    if expires <= wall:
        return None
    if expires > timestamp + REVOKE_WINDOW + MAX_PASS_LIFETIME:
        return "an expiry further from its timestamp than a pin may have"
    if not verify_signature(owner, pin_message(owner, timestamp, expires, pass_key), signature):
        return "a signature that does not verify"
    return PassPin(owner, timestamp, expires, pass_key, signature)


class PassPins:
    """A storing node's pins, by mailbox key (a bounded table), kept in ``conn`` when
    given one (None: in memory only), loaded from it at ``wall``."""

    def __init__(
        self,
        mailbox_key_of: Callable[[bytes], bytes],
        conn: sqlite3.Connection | None = None,
        *,
        wall: float = 0.0,
    ) -> None:
        self._mailbox_key = mailbox_key_of
        #: mailbox key -> the owner's pin
        self._pins: dict[bytes, PassPin] = {}
        self._culled = float("-inf")
        self._conn = conn
        #: Mailbox keys whose row must be written (or deleted, if no pin is held).
        self._dirty: set[bytes] = set()
        if conn is not None:
            self._load(conn, wall)

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
        if held is not None and held.timestamp >= pin.timestamp:
            # the same pin again is fine; an older one never replaces a newer one
            same = (held.timestamp, held.expires, held.pass_key) == (
                pin.timestamp,
                pin.expires,
                pin.pass_key,
            )
            return None if same else "revoke-old"
        if held is None and len(self._pins) >= MAX_PINS:
            self._cull(wall)
            if len(self._pins) >= MAX_PINS:
                return "revoke-full"
        message = pin_message(pin.owner, pin.timestamp, pin.expires, pin.pass_key)
        if not verify_signature(pin.owner, message, pin.signature):
            return "revoke-signature"
        self._pins[key] = pin
        self._dirty.add(key)
        return None

    def revoked(self, key: bytes, expires: int, pass_key: bytes, wall: float) -> bool:
        """Whether a contact's put into mailbox ``key`` under ``pass_key`` (expiring at
        ``expires``) is refused by the mailbox's pin."""
        held = self._pins.get(key)
        if held is None:
            return False
        if held.expires <= wall:
            self._drop(key)
            return False
        return pass_key != held.pass_key and expires <= held.expires

    def _drop(self, key: bytes) -> None:
        del self._pins[key]
        self._dirty.add(key)

    def _cull(self, wall: float) -> None:
        if wall - self._culled < CULL_INTERVAL:  # a walk of the table: not per request
            return
        self._culled = wall
        for key in [k for k, pin in self._pins.items() if pin.expires <= wall]:
            self._drop(key)

    # ------------------------------------------------------------------ persistence

    def _load(self, conn: sqlite3.Connection, wall: float) -> None:
        """The pins stored before a restart, newest first, each checked again."""
        conn.execute(_SCHEMA)
        conn.commit()
        gone: list[int] = []
        refused = overflow = 0
        rows = conn.execute(
            "SELECT rowid, key, owner, timestamp, expires, pass_key, signature "
            "FROM mailbox_pins ORDER BY timestamp DESC"
        )
        for rowid, *row in rows:
            if len(self._pins) >= MAX_PINS:
                overflow += 1  # the oldest beyond the bound: dropped as a full table would
                gone.append(rowid)
                continue
            got = _stored_pin(tuple(row), self._mailbox_key, wall)
            if isinstance(got, PassPin):
                self._pins[self._mailbox_key(got.owner)] = got
                continue
            gone.append(rowid)
            if got is not None:  # None: expired, as it would have been in memory
                refused += 1
                if refused <= MAX_LOGGED_ROWS:
                    log.warning(
                        "refusing stored mailbox pin (row %d) with %s: skipped and deleted",
                        rowid,
                        got,
                    )
        if refused > MAX_LOGGED_ROWS:
            log.warning("refused %d more stored mailbox pins", refused - MAX_LOGGED_ROWS)
        if overflow:
            log.warning("dropped the %d oldest stored mailbox pins (%d kept)", overflow, MAX_PINS)
        if gone:
            conn.executemany("DELETE FROM mailbox_pins WHERE rowid=?", [(r,) for r in gone])
            conn.commit()

    def persist(self) -> bool:
        """Write the rows of pins taken or dropped since the last call, unless another
        transaction is open on the connection (then at a later call, as
        p2pd/dht/storage.py does). Whether nothing is left to write."""
        conn = self._conn
        if conn is None:
            self._dirty.clear()
            return True
        if not self._dirty:
            return True
        if conn.in_transaction:
            return False
        keys, self._dirty = self._dirty, set()
        pins = self._pins
        held = [(k, *pins[k].args()) for k in keys if k in pins]
        with conn:
            if held:
                conn.executemany(
                    "INSERT OR REPLACE INTO mailbox_pins"
                    "(key, owner, timestamp, expires, pass_key, signature) VALUES (?,?,?,?,?,?)",
                    held,
                )
            conn.executemany(
                "DELETE FROM mailbox_pins WHERE key=?", [(k,) for k in keys if k not in pins]
            )
        return True
