"""Handing mailbox passes (:mod:`.mailbox_pass`) to contacts, and keeping theirs.

A daemon gives each pinned contact this week's pass into its mailbox inside the
end-to-end session: a session signal (message kind 2, like address hints: acked, never
stored as a message, never left in a mailbox) whose text is ``{"type": "mailbox_pass",
"pass": HEX}`` (docs/PROTOCOL.md, "Mailbox passes"), sent once per contact, per week and
per run, when delivery opens a direct connection to the contact or a message from it
arrives on one.

A pass is accepted only from a pinned key, and only a pass into that key's own mailbox
with a certificate it signed; the newest (latest expiry) is kept, in SQLite table
``mailbox_passes``, its seed sealed at rest when the identity has a passphrase
(:mod:`p2pd.at_rest`). Counters go to the DHT's: ``mailbox_passes_sent``,
``mailbox_passes_received``, ``mailbox_passes_refused``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from typing import TypedDict

from ..at_rest import CLEAR, AtRest
from ..contact_news import ContactNews
from ..errors import StoredDataCorrupt
from ..identity import fingerprint
from .mailbox_pass import PASS_LEN, PASS_PERIOD, MailboxPass, issue_pass
from .mailbox_revoke import PassPin, make_pin


class PassRevoked(TypedDict):
    """What ``revoke_mailbox_pass`` answers (docs/CONTROL_API.md)."""

    epoch: int
    replicas: int
    until: int


__all__ = ["PASS_TYPE", "MailboxPasses", "PassAnnouncer", "encode_pass", "is_pass"]

log = logging.getLogger(__name__)

PASS_TYPE = "mailbox_pass"
#: The JSON around a 168-byte pass in hex.
MAX_PASS_TEXT = 512
#: Contacts whose pass waits to be sent; beyond this, it goes on a later connection.
MAX_QUEUED_PASSES = 64
PASS_SEND_TIMEOUT = 15.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mailbox_passes (
    owner BLOB PRIMARY KEY,
    pass BLOB NOT NULL,
    expires INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mailbox_pass_epoch (
    owner BLOB PRIMARY KEY,
    epoch INTEGER NOT NULL,
    revoked_at INTEGER NOT NULL
);
"""


def encode_pass(mailbox_pass: MailboxPass) -> str:
    return json.dumps({"type": PASS_TYPE, "pass": mailbox_pass.to_bytes().hex()})


def is_pass(text: str) -> bool:
    """Whether a session signal is a mailbox pass (rather than a call signal or hint)."""
    if len(text) > MAX_PASS_TEXT:
        return False
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("type") == PASS_TYPE


def decode_pass(text: str) -> MailboxPass:
    """The pass in a signal; ValueError for anything malformed or not signed."""
    if len(text) > MAX_PASS_TEXT:
        raise ValueError("mailbox pass signal too long")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError("mailbox pass signal is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"type", "pass"} or doc["type"] != PASS_TYPE:
        raise ValueError("not a mailbox pass")
    raw = doc["pass"]
    if not isinstance(raw, str) or len(raw) != 2 * PASS_LEN:
        raise ValueError("mailbox pass of the wrong length")
    return MailboxPass.from_bytes(bytes.fromhex(raw))


class MailboxPasses:
    """The passes contacts gave us into their mailboxes (one per contact, newest wins)."""

    def __init__(
        self, conn: sqlite3.Connection, stats: Counter[str], *, at_rest: AtRest = CLEAR
    ) -> None:
        self._conn = conn
        self._at_rest = at_rest
        self.stats = stats
        #: Each owner's epoch as last read or written: the announcer asks for ours with
        #: every message that arrives directly, and only next_epoch changes it.
        self._epochs: dict[bytes, int] = {}
        conn.executescript(_SCHEMA)
        conn.commit()

    def get(self, owner: bytes, wall: float) -> MailboxPass | None:
        """A pass into ``owner``'s mailbox a storing node would take now, if we hold one."""
        row = self._conn.execute(
            "SELECT pass FROM mailbox_passes WHERE owner=?", (owner,)
        ).fetchone()
        if row is None:
            return None
        try:
            held = MailboxPass.from_bytes(
                self._at_rest.open("mailbox_passes", "pass", owner, row[0])
            )
        except (StoredDataCorrupt, ValueError):
            log.warning("ignoring a mailbox pass row that does not open")
            return None
        return held if held.owner == owner and held.valid(wall) else None

    def received(self, sender_key: bytes, pinned: bool, text: str, wall: float) -> bool:
        """A pass came in a session signal from ``sender_key``: kept if that key is
        pinned and it is a pass into that key's own mailbox; else dropped and counted."""
        self.stats["mailbox_passes_received"] += 1
        why = None
        try:
            got = decode_pass(text)
            if got.owner != sender_key:
                why = "a pass into someone else's mailbox"
            elif not got.valid(wall, margin=0):
                why = "expired or too long-lived"
        except ValueError as exc:
            why = str(exc)
        if why is None and not pinned:
            why = "not a contact"
        if why is not None:
            self.stats["mailbox_passes_refused"] += 1
            log.info("ignored a mailbox pass from %s: %s", fingerprint(sender_key)[:12], why)
            return False
        row = self._conn.execute(
            "SELECT expires FROM mailbox_passes WHERE owner=?", (sender_key,)
        ).fetchone()
        if row is not None and int(row[0]) > got.expires:
            return True  # we hold a newer one
        # The same expiry: the owner revoked the one we hold and gave us its new one
        # (p2pd/dht/mailbox_revoke.py); only the owner can send it, in the session.
        sealed = self._at_rest.seal("mailbox_passes", "pass", sender_key, got.to_bytes())
        # No await between this and the commit (the connection is shared: see
        # address_hints.py).
        with self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO mailbox_passes(owner, pass, expires) VALUES (?,?,?)",
                (sender_key, sealed, got.expires),
            )
        return True

    def epoch(self, owner: bytes) -> int:
        """Our pass epoch (0 until we first revoke a pass: p2pd/dht/mailbox_revoke.py)."""
        epoch = self._epochs.get(owner)
        if epoch is None:
            row = self._conn.execute(
                "SELECT epoch FROM mailbox_pass_epoch WHERE owner=?", (owner,)
            ).fetchone()
            epoch = self._epochs[owner] = 0 if row is None else int(row[0])
        return epoch

    def next_epoch(self, owner: bytes, wall: float) -> int:
        """Revoke our passes so far: the epoch our passes are derived with from now on.
        Its time (the pin's earliest timestamp) is after the last revocation's, even
        within one second: a replica never takes a pin no newer than the one it holds
        (p2pd/dht/mailbox_revoke.py), and it would keep the last one's pass."""
        row = self._conn.execute(
            "SELECT epoch, revoked_at FROM mailbox_pass_epoch WHERE owner=?", (owner,)
        ).fetchone()
        epoch, last = (0, -1) if row is None else (int(row[0]), int(row[1]))
        epoch += 1
        with self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO mailbox_pass_epoch(owner, epoch, revoked_at) "
                "VALUES (?,?,?)",
                (owner, epoch, max(int(wall), last + 1)),
            )
        self._epochs[owner] = epoch  # committed
        self.stats["mailbox_passes_revoked"] += 1
        return epoch

    def current_pin(
        self, owner: bytes, sign: Callable[[bytes], bytes], wall: float
    ) -> PassPin | None:
        """Our last revocation's pin, signed afresh, while it is in effect (None after,
        or if we never revoked): sent again with each republish of our record, so that
        a node that became a replica since (or one that lost its database) refuses the
        leaked pass too (a replica keeps its pins across restarts:
        p2pd/dht/mailbox_revoke.py)."""
        row = self._conn.execute(
            "SELECT epoch, revoked_at FROM mailbox_pass_epoch WHERE owner=?", (owner,)
        ).fetchone()
        if row is None:
            return None
        revoked_at = int(row[1])
        kept = issue_pass(owner, sign, float(revoked_at), int(row[0]))
        return make_pin(owner, sign, max(wall, revoked_at), kept) if kept.expires > wall else None


async def revoke_pass(
    passes: MailboxPasses,
    owner: bytes,
    sign: Callable[[bytes], bytes],
    wall: float,
    send_pin: Callable[[PassPin], Awaitable[int]],
) -> PassRevoked:
    """Revoke every pass we gave so far (one leaked): a new epoch, so this week's pass is
    a new one (the announcer gives it to each contact on its next direct connection),
    and a pin at our mailbox's replicas that refuses the others
    (p2pd/dht/mailbox_revoke.py). ``send_pin`` reports how many replicas took it."""
    epoch = passes.next_epoch(owner, wall)
    pin = passes.current_pin(owner, sign, wall)
    assert pin is not None  # its pass expires next week at the earliest
    replicas = await send_pin(pin)
    log.info("revoked our mailbox passes: epoch %d, pin held by %d replicas", epoch, replicas)
    return {"epoch": epoch, "replicas": replicas, "until": pin.expires}


class PassAnnouncer(ContactNews):
    """Gives pinned contacts this week's pass into our mailbox, once a week each
    (p2pd/contact_news.py), when delivery opens a direct connection to one or a message
    from one arrives on one."""

    def __init__(
        self,
        owner: bytes,
        sign: Callable[[bytes], bytes],
        stats: Counter[str],
        *,
        wall: Callable[[], float],
        handle_of: Callable[[bytes], str | None],
        send: Callable[[str, bytes, str], Awaitable[object]],
        epoch: Callable[[], int] = lambda: 0,
    ) -> None:
        # The version a contact is given: the week and our pass epoch, so that a
        # revocation (a new epoch) reaches every contact on its next connection.
        def current(key: bytes) -> tuple[int, int] | None:
            return None if key == owner else (int(wall() // PASS_PERIOD), epoch())

        def text(version: Hashable) -> str:
            assert isinstance(version, tuple)
            return encode_pass(issue_pass(owner, sign, wall(), version[1]))

        super().__init__(
            what="our mailbox pass",
            current=current,
            text=text,
            handle_of=handle_of,
            send=send,
            stats=stats,
            sent_stat="mailbox_passes_sent",
            timeout=PASS_SEND_TIMEOUT,
            max_queued=MAX_QUEUED_PASSES,
        )
