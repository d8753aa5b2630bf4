"""Offline mailboxes: sealed entries held by the k nodes closest to a recipient's key.

Anyone may put an entry into a mailbox; storing nodes learn neither its text nor its
sender (the entry is a sealed box to the recipient). Only the recipient, proving its key
with an Ed25519 signature over a fresh timestamp, can read or delete entries. Entries
expire, and every node caps each mailbox (count and bytes), its total, and what each
source address (and /24|/48) has stored (:class:`~p2pd.dht.budget.SourceQuota`), all as
running counters kept beside the table: a put costs no scan.

Each mailbox has two shares: one for stamped puts from anyone (strangers), one for puts
that carry the owner's pass (its contacts, :mod:`.mailbox_pass`). A flood of stamped
junk fills the first and never the second; and a part of the node's total
(``contact_reserve``) is kept for contacts' entries.
docs/PROTOCOL.md, "Mailboxes", has the formats.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..identity import verify_signature
from ..wire import MAILBOX_DELETE_MAX, MAILBOX_ID_LEN, MAILBOX_PAGE, MAX_MAILBOX_PUT
from . import mailbox_entry, mailbox_pass
from .budget import FULL_CULL_INTERVAL, SourceQuota
from .mailbox_revoke import PassPin, PassPins

log = logging.getLogger(__name__)

MAILBOX_KEY_CONTEXT = b"p2pd mailbox key v1\x00"
FETCH_CONTEXT = b"p2pd mailbox fetch v1\x00"
DELETE_CONTEXT = b"p2pd mailbox delete v1\x00"
#: How far a fetch/delete timestamp may be from the storing node's clock.
MAX_SKEW = 600
#: The two shares of a mailbox: stamped puts from anyone, puts with the owner's pass.
STRANGERS, CONTACTS = 0, 1


def mailbox_key(owner_public_key: bytes) -> bytes:
    """The DHT key of ``owner``'s mailbox."""
    return hashlib.sha256(MAILBOX_KEY_CONTEXT + owner_public_key).digest()[:20]


def entry_id(entry: bytes) -> bytes:
    return hashlib.sha256(entry).digest()[:MAILBOX_ID_LEN]


def fetch_message(owner: bytes, timestamp: int, after: bytes) -> bytes:
    return FETCH_CONTEXT + owner + struct.pack(">Q", timestamp) + after


def delete_message(owner: bytes, timestamp: int, ids: tuple[bytes, ...]) -> bytes:
    return DELETE_CONTEXT + owner + struct.pack(">Q", timestamp) + b"".join(ids)


@dataclass(frozen=True, slots=True)
class MailboxLimits:
    ttl: float = 7 * 24 * 3600
    #: The strangers' share of one mailbox (stamped puts).
    per_mailbox_count: int = 500
    per_mailbox_bytes: int = 512 * 1024
    #: The contacts' share of one mailbox (puts with the owner's pass), apart from the
    #: strangers' share: stamped junk cannot fill it.
    contact_count: int = 500
    contact_bytes: int = 512 * 1024
    total_bytes: int = 32 * 1024 * 1024
    #: The part of ``total_bytes`` only contacts' entries may use.
    contact_reserve: float = 0.25


class MailboxStorage:
    """Mailbox entries this node holds for others, in SQLite (table ``mailbox``), and
    the owners' pins (table ``mailbox_pins``, :mod:`.mailbox_revoke`)."""

    def __init__(
        self,
        conn: sqlite3.Connection | None,
        limits: MailboxLimits = MailboxLimits(),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # None: a private in-memory database, made when the first entry arrives (the
        # simulation runs thousands of nodes, few of which ever hold a mailbox).
        self._conn_or_none = conn
        self.limits = limits
        self._clock = clock
        self.refused: dict[str, int] = {}
        #: Bytes held, all mailboxes together: a running total, not a scan per put.
        self._total: int | None = None
        #: Of which in strangers' shares.
        self._strangers_total = 0
        #: (mailbox key, share) -> [entries, bytes] held: running counters, not a scan.
        self._boxes: dict[tuple[bytes, int], list[int]] = {}
        #: The owners' pins, revoking leaked passes (:mod:`.mailbox_revoke`): kept in
        #: ``conn`` (table ``mailbox_pins``) across restarts, loaded now.
        self.pins = PassPins(mailbox_key, conn, wall=clock())
        #: Checks contacts' puts (:mod:`.mailbox_pass`).
        self.passes = mailbox_pass.PassChecker(mailbox_key, self.pins.revoked)
        #: Entries per source (address, /24|/48) held here; the core sets its budget.
        #: Entries loaded from disk were charged to no one (the sources are not stored).
        self.quota: SourceQuota | None = None
        #: Postage an entry must carry (:mod:`.mailbox_entry`); the core sets it from
        #: ``DHTConfig.postage_bits``. None: the format and postage are not checked (a
        #: table used on its own, in tests of its caps).
        self.postage_bits: int | None = None
        self._full_culled = -FULL_CULL_INTERVAL

    @property
    def _conn(self) -> sqlite3.Connection:
        conn = self._conn_or_none
        if conn is None:
            conn = self._conn_or_none = sqlite3.connect(":memory:")
        if self._total is None:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS mailbox (key BLOB NOT NULL, id BLOB NOT NULL, "
                "entry BLOB NOT NULL, expires REAL NOT NULL, share INTEGER NOT NULL DEFAULT 0, "
                "PRIMARY KEY (key, id))"
            )
            columns = {row[1] for row in conn.execute("PRAGMA table_info(mailbox)")}
            if "share" not in columns:  # a table from before passes: all strangers'
                conn.execute("ALTER TABLE mailbox ADD COLUMN share INTEGER NOT NULL DEFAULT 0")
            conn.commit()
            self._total = self._recount(conn)
        return conn

    def _recount(self, conn: sqlite3.Connection) -> int:
        """Count what each mailbox holds (at start, and after a cull); the total."""
        rows = conn.execute(
            "SELECT key, share, COUNT(*), COALESCE(SUM(LENGTH(entry)), 0) FROM mailbox "
            "GROUP BY key, share"
        )
        self._boxes = {
            (bytes(key), int(share)): [int(n), int(size)] for key, share, n, size in rows
        }
        self._strangers_total = sum(v[1] for (_, share), v in self._boxes.items() if not share)
        return sum(size for _, size in self._boxes.values())

    def _refuse(self, why: str) -> bool:
        self.refused[why] = self.refused.get(why, 0) + 1
        return False

    def persist(self) -> None:
        """Write what changed in the pins (the entries are written as they come)."""
        self.pins.persist()

    def revoke(self, pin: PassPin) -> bool:
        """Hold an owner's pin (:mod:`.mailbox_revoke`); False (counted) if refused."""
        why = self.pins.pin(pin, self._clock())
        return True if why is None else self._refuse(why)

    def put(self, key: bytes, entry: bytes, *, source: str | None = None) -> bool:
        """Hold ``entry`` (or a contact's put: :mod:`.mailbox_pass`) in the mailbox
        ``key``; from a ``source`` (the sender's IP address), only within its quota."""
        now = self._clock()
        if not 0 < len(entry) <= MAX_MAILBOX_PUT:
            return self._refuse("size")
        share = STRANGERS
        if entry[0] == mailbox_pass.CONTACT_PUT:
            # A pass instead of postage: checked (one or two signatures), then dropped.
            inner, why = self.passes.check(key, entry, now)
            if inner is None:
                return self._refuse(why or "pass")
            entry, share = inner, CONTACTS
        elif len(entry) > mailbox_entry.BUCKETS[-1]:
            return self._refuse("size")
        elif self.postage_bits is not None:
            # One hash, before any quota or table work: a put without postage costs
            # this node nothing more and its source's quota nothing.
            why = mailbox_entry.check(key, entry, now, self.postage_bits)
            if why is not None:
                return self._refuse(why)
        quota = self.quota if source is not None else None
        if quota is not None and not quota.admits(source or ""):
            return self._refuse("quota")
        conn = self._conn
        if conn.in_transaction:
            # Someone else's transaction is open on the shared connection (see
            # storage.py): committing ours would commit theirs. The sender tries others.
            return self._refuse("busy")
        limits = self.limits
        max_count, max_bytes, max_total = (
            (limits.contact_count, limits.contact_bytes, limits.total_bytes)
            if share == CONTACTS
            else (
                limits.per_mailbox_count,
                limits.per_mailbox_bytes,
                int(limits.total_bytes * (1 - limits.contact_reserve)),
            )
        )
        for attempt in range(2):
            count, size = self._boxes.get((key, share), (0, 0))
            total = self._strangers_total if share == STRANGERS else self._total or 0
            why = None
            if count >= max_count or size + len(entry) > max_bytes:
                why = "mailbox-full" if share == STRANGERS else "contacts-full"
            elif total + len(entry) > max_total or (self._total or 0) + len(entry) > (
                limits.total_bytes
            ):
                why = "node-full"
            if why is None:
                break
            if attempt == 1 or now - self._full_culled < FULL_CULL_INTERVAL:
                return self._refuse(why)
            self._full_culled = now
            if not self.cull(now):
                return self._refuse(why)
        cursor = conn.execute(
            "INSERT OR IGNORE INTO mailbox(key, id, entry, expires, share) VALUES (?,?,?,?,?)",
            (key, entry_id(entry), entry, now + self.limits.ttl, share),
        )
        conn.commit()
        if cursor.rowcount > 0:
            self._total = (self._total or 0) + len(entry)
            if share == STRANGERS:
                self._strangers_total += len(entry)
            box = self._boxes.setdefault((key, share), [0, 0])
            box[0] += 1
            box[1] += len(entry)
            if quota is not None:
                quota.charge((key, entry_id(entry)), source or "")
        else:
            # The same entry again (a replayed put): held once, costs nothing more.
            self.refused["duplicate"] = self.refused.get("duplicate", 0) + 1
        return True

    def _authorised(self, owner: bytes, timestamp: int, message: bytes, signature: bytes) -> bool:
        if abs(timestamp - self._clock()) > MAX_SKEW:
            return self._refuse("stale-signature")
        if not verify_signature(owner, message, signature):
            return self._refuse("bad-signature")
        return True

    def fetch(
        self, owner: bytes, timestamp: int, after: bytes, signature: bytes
    ) -> tuple[list[tuple[bytes, bytes]], bool] | None:
        """A page of entries after ``after``, and whether more follow; None if refused."""
        if not self._authorised(
            owner, timestamp, fetch_message(owner, timestamp, after), signature
        ):
            return None
        now = self._clock()
        rows = self._conn.execute(
            "SELECT id, entry FROM mailbox WHERE key=? AND id>? AND expires>? ORDER BY id LIMIT ?",
            (mailbox_key(owner), after, now, MAILBOX_PAGE + 1),
        ).fetchall()
        entries = [(bytes(i), bytes(e)) for i, e in rows[:MAILBOX_PAGE]]
        return entries, len(rows) > MAILBOX_PAGE

    def delete(
        self, owner: bytes, timestamp: int, ids: tuple[bytes, ...], signature: bytes
    ) -> int | None:
        if len(ids) > MAILBOX_DELETE_MAX:
            return None
        if not self._authorised(owner, timestamp, delete_message(owner, timestamp, ids), signature):
            return None
        conn = self._conn
        if conn.in_transaction:
            self._refuse("busy")
            return None
        key = mailbox_key(owner)
        held = conn.execute(
            f"SELECT share, COUNT(*), COALESCE(SUM(LENGTH(entry)), 0) FROM mailbox WHERE key=? "
            f"AND id IN ({','.join('?' * len(ids))}) GROUP BY share",
            (key, *ids),
        ).fetchall()
        cursor = conn.executemany(
            "DELETE FROM mailbox WHERE key=? AND id=?", [(key, i) for i in ids]
        )
        conn.commit()
        deleted = max(cursor.rowcount, 0)
        for share, n, freed in held:
            self._total = max((self._total or 0) - int(freed), 0)
            if share == STRANGERS:
                self._strangers_total = max(self._strangers_total - int(freed), 0)
            box = self._boxes.get((key, int(share)))
            if box is not None:
                box[0], box[1] = box[0] - int(n), box[1] - int(freed)
                if box[0] <= 0:
                    del self._boxes[(key, int(share))]
        if self.quota is not None:
            for ident in ids:
                self.quota.release((key, ident))
        return deleted

    def cull(self, now: float | None = None) -> int:
        """Forget expired entries; returns how many."""
        if self._conn_or_none is None:
            return 0
        conn = self._conn
        if conn.in_transaction:
            return 0
        when = self._clock() if now is None else now
        if self.quota is not None and len(self.quota):
            for key, ident in conn.execute("SELECT key, id FROM mailbox WHERE expires<=?", (when,)):
                self.quota.release((bytes(key), bytes(ident)))
        cursor = conn.execute("DELETE FROM mailbox WHERE expires<=?", (when,))
        conn.commit()
        if cursor.rowcount > 0:
            self._total = self._recount(conn)
        return max(cursor.rowcount, 0)

    def rows(self) -> list[tuple[bytes, bytes, bytes, float]]:
        """Everything held, as stored: (mailbox key, entry id, entry, expiry) (for tests
        and tools that check what a storing node can see)."""
        if self._conn_or_none is None:
            return []
        rows = self._conn.execute("SELECT key, id, entry, expires FROM mailbox ORDER BY key, id")
        return [(bytes(k), bytes(i), bytes(e), float(x)) for k, i, e, x in rows]

    def count(self, share: int | None = None) -> int:
        """Entries held (in one share: :data:`STRANGERS` or :data:`CONTACTS`)."""
        if self._conn_or_none is None:
            return 0
        self._conn  # noqa: B018 (counts what is on disk, once)
        return sum(v[0] for (_, s), v in self._boxes.items() if share is None or s == share)
