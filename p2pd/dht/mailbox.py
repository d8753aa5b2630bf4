"""Offline mailboxes: sealed entries held by the k nodes closest to a recipient's key.

Anyone may put an entry into a mailbox; storing nodes learn neither its text nor its
sender (the entry is a sealed box to the recipient). Only the recipient, proving its key
with an Ed25519 signature over a fresh timestamp, can read or delete entries. Entries
expire, and every node caps each mailbox (count and bytes) and its total.
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
from ..wire import MAILBOX_DELETE_MAX, MAILBOX_ID_LEN, MAILBOX_PAGE, MAX_MAILBOX_ENTRY

log = logging.getLogger(__name__)

MAILBOX_KEY_CONTEXT = b"p2pd mailbox key v1\x00"
FETCH_CONTEXT = b"p2pd mailbox fetch v1\x00"
DELETE_CONTEXT = b"p2pd mailbox delete v1\x00"
#: How far a fetch/delete timestamp may be from the storing node's clock.
MAX_SKEW = 600


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
    per_mailbox_count: int = 500
    per_mailbox_bytes: int = 512 * 1024
    total_bytes: int = 32 * 1024 * 1024


class MailboxStorage:
    """Mailbox entries this node holds for others, in SQLite (table ``mailbox``)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        limits: MailboxLimits = MailboxLimits(),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._conn = conn
        self.limits = limits
        self._clock = clock
        conn.execute(
            "CREATE TABLE IF NOT EXISTS mailbox (key BLOB NOT NULL, id BLOB NOT NULL, "
            "entry BLOB NOT NULL, expires REAL NOT NULL, PRIMARY KEY (key, id))"
        )
        conn.commit()
        self.refused: dict[str, int] = {}

    def _refuse(self, why: str) -> bool:
        self.refused[why] = self.refused.get(why, 0) + 1
        return False

    def put(self, key: bytes, entry: bytes) -> bool:
        now = self._clock()
        if not 0 < len(entry) <= MAX_MAILBOX_ENTRY:
            return self._refuse("size")
        self.cull(now)
        count, size = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(entry)), 0) FROM mailbox WHERE key=?", (key,)
        ).fetchone()
        if count >= self.limits.per_mailbox_count:
            return self._refuse("mailbox-full")
        if size + len(entry) > self.limits.per_mailbox_bytes:
            return self._refuse("mailbox-full")
        (total,) = self._conn.execute(
            "SELECT COALESCE(SUM(LENGTH(entry)), 0) FROM mailbox"
        ).fetchone()
        if total + len(entry) > self.limits.total_bytes:
            return self._refuse("node-full")
        self._conn.execute(
            "INSERT OR IGNORE INTO mailbox(key, id, entry, expires) VALUES (?,?,?,?)",
            (key, entry_id(entry), entry, now + self.limits.ttl),
        )
        self._conn.commit()
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
        key = mailbox_key(owner)
        cursor = self._conn.executemany(
            "DELETE FROM mailbox WHERE key=? AND id=?", [(key, i) for i in ids]
        )
        self._conn.commit()
        return max(cursor.rowcount, 0)

    def cull(self, now: float | None = None) -> None:
        self._conn.execute(
            "DELETE FROM mailbox WHERE expires<=?", (self._clock() if now is None else now,)
        )

    def count(self) -> int:
        (n,) = self._conn.execute("SELECT COUNT(*) FROM mailbox").fetchone()
        return int(n)
