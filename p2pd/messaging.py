"""Messages at rest and the delivery state machine: outbox, acks, retries, dedupe, order.

Sans I/O: every method takes ``now``; the trio service that moves messages
(:mod:`p2pd.delivery`) calls these and does the network part. Everything a user was told
is queued is in SQLite before the call returns, so neither side's crash loses it.

States of an outgoing message::

    queued ──(transmitted directly, or left in a mailbox)──> sent ──(ack)──> delivered

A message stays due for retransmission (exponential backoff, capped) until its ack
arrives. The receiver deduplicates by message id, so retransmissions are harmless, and
orders each conversation by the sender's sequence number.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypedDict

from .at_rest import CLEAR, AtRest
from .errors import StoredDataCorrupt, UsageError
from .identity import FINGERPRINT_LEN, MIN_PREFIX, fingerprint
from .wire import KIND_FILE, KIND_ROTATION, KIND_TEXT, MAX_TEXT

QUEUED, SENT, DELIVERED = "queued", "sent", "delivered"
#: Outgoing and not yet acknowledged. Written out in this exact form so that SQLite uses
#: the partial indexes below (with ``state != 'delivered'`` it scans every message ever
#: sent: 4 ms per query at 20,000 messages, measured by scripts/bench_messages.py).
PENDING = "direction='out' AND state IN ('queued', 'sent')"
#: For one conversation's pending messages. Left to itself, SQLite's planner preferred
#: messages_conv (peer_key, direction; since dropped), which walks every message of the
#: conversation ever sent: 0.33 ms per query at 3,000 messages, against 16 µs through the partial
#: index, and several such queries ran per message (scripts/bench_messages.py, py-spy).
PENDING_CONV = "messages INDEXED BY messages_pending_conv"
# Every index on the outbox costs a page in the commit of each message queued (one
# ``send`` call each), sent or acked. (Indexes on (direction, state, next_attempt), then
# on the pending messages' next_attempt, served the earliest retry time, which nothing
# in the daemon reads: its schedule reads messages_pending_conv. And messages_conv
# (peer_key, direction, seq) served only `inbox --from`: messages_inbox, on received
# messages alone, does. Dropped, see _SCHEMA: 6.7 -> 4.7 pages written per message
# queued; tests/test_messaging.py.)
_log = logging.getLogger(__name__)
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contacts (
    handle TEXT PRIMARY KEY, public_key BLOB NOT NULL, verified INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL, rotated_from BLOB, rotated_at REAL);
CREATE TABLE IF NOT EXISTS messages (
    id BLOB PRIMARY KEY, direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    handle TEXT NOT NULL, peer_key BLOB NOT NULL, seq INTEGER NOT NULL, text TEXT NOT NULL,
    state TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    sent_at_ms INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0, envelope BLOB, via TEXT,
    kind INTEGER NOT NULL DEFAULT 1);
DROP INDEX IF EXISTS messages_due;
DROP INDEX IF EXISTS messages_pending_due;
CREATE INDEX IF NOT EXISTS messages_pending_conv ON messages (peer_key, seq)
    WHERE direction='out' AND state IN ('queued', 'sent');
DROP INDEX IF EXISTS messages_conv;
CREATE INDEX IF NOT EXISTS messages_inbox ON messages (peer_key) WHERE direction='in';
CREATE TABLE IF NOT EXISTS conversation_seq (peer_key BLOB PRIMARY KEY, next_seq INTEGER);
"""


def backoff(attempts: int, rng: random.Random | None = None) -> float:
    """Seconds before retry number ``attempts + 1``: 0.5, 1, 2, ... 60, with ±20% jitter."""
    base = min(BACKOFF_MAX, BACKOFF_FIRST * (2.0 ** min(attempts, 16)))
    return float(base) * (0.8 + 0.4 * (rng or random).random())


class MessageSummary(TypedDict):
    """A message as the control API and its events show it (docs/CONTROL_API.md)."""

    kind: str
    id: str
    direction: str
    handle: str
    fingerprint: str
    seq: int
    text: str
    state: str
    created: float
    updated: float
    sent_at: float
    via: str | None


class _Received(MessageSummary):
    sender_verified: bool


#: A received message: whether its sender's key is the handle's pin, and the sender as
#: shown (``handle#fingerprint-prefix``). ``from`` is a keyword, hence the spelling.
IncomingMessage = TypedDict("IncomingMessage", {"from": str})


class IncomingSummary(_Received, IncomingMessage):
    """A received message as ``inbox`` and the ``message`` event show it."""


class EvidenceSummary(TypedDict):
    fingerprint: str
    source: str
    where: str
    first_seen: float
    last_seen: float
    count: int


class ContactSummary(TypedDict):
    handle: str
    fingerprint: str
    verified: bool
    first_seen: float
    rotated_from: str | None
    rotated_at: float | None


@dataclass(frozen=True, slots=True)
class Message:
    id: bytes
    direction: str
    handle: str
    peer_key: bytes
    seq: int
    text: str
    state: str
    created: float
    updated: float
    sent_at_ms: int
    attempts: int
    envelope: bytes | None
    via: str | None
    #: What the payload carries (p2pd.wire.KIND_TEXT, or KIND_ROTATION: a notice).
    kind: int = KIND_TEXT

    def summary(self) -> MessageSummary:
        return {
            "kind": {KIND_ROTATION: "rotation", KIND_FILE: "file"}.get(self.kind, "text"),
            "id": self.id.hex(),
            "direction": self.direction,
            "handle": self.handle,
            "fingerprint": fingerprint(self.peer_key),
            "seq": self.seq,
            # a file offer's text holds the file's key: never shown (p2pd/files/)
            "text": "(file offer)" if self.kind == KIND_FILE else self.text,
            "state": self.state,
            "created": self.created,
            "updated": self.updated,
            "sent_at": self.sent_at_ms / 1000,
            "via": self.via,
        }


_COLUMNS = (
    "id, direction, handle, peer_key, seq, text, state, created, updated, sent_at_ms, "
    "attempts, envelope, via, kind"
)


_PLACES = ",".join("?" * 14)


#: Rows whose text or envelope did not open are named in the log once each, at most this
#: many (a damaged database must not flood the log on every retry).
MAX_CORRUPT_LOGGED = 256


class MessageStore:
    """Messages in SQLite. With an encrypted ``at_rest`` (p2pd/at_rest.py) the ``text``
    and ``envelope`` of every row are sealed, bound to the row's id; the rest (ids,
    handles, peer keys, states, times, sequence numbers) stays as it is, so that the
    indexes serve. A row whose values do not open is skipped by every listing (counted
    in :attr:`corrupt_rows`, logged once) and left unchanged; :meth:`get` raises
    StoredDataCorrupt for it."""

    def __init__(self, conn: sqlite3.Connection, *, at_rest: AtRest = CLEAR) -> None:
        self._conn = conn
        self._at_rest = at_rest
        #: Rows skipped because a value did not open (each time one was read).
        self.corrupt_rows = 0
        self._corrupt_logged: set[bytes] = set()
        conn.executescript(_SCHEMA)
        if "kind" not in {row[1] for row in conn.execute("PRAGMA table_info(messages)")}:
            conn.execute("ALTER TABLE messages ADD COLUMN kind INTEGER NOT NULL DEFAULT 1")
        conn.commit()

    def _values(self, m: Message) -> tuple[Any, ...]:
        """A message as the row _COLUMNS name (dataclasses.astuple would deep-copy)."""
        seal = self._at_rest
        text = seal.seal_text("messages", "text", m.id, m.text)
        envelope = seal.seal_blob("messages", "envelope", m.id, m.envelope)
        return (m.id, m.direction, m.handle, m.peer_key, m.seq, text, m.state, m.created,
                m.updated, m.sent_at_ms, m.attempts, envelope, m.via, m.kind)  # fmt: skip

    def _row(self, row: tuple[Any, ...]) -> Message:
        """The message a row holds; StoredDataCorrupt if its text or envelope does not
        open (an encrypted database)."""
        msg_id = bytes(row[0])
        text = self._at_rest.open_text("messages", "text", msg_id, row[5])
        envelope = self._at_rest.open_blob("messages", "envelope", msg_id, row[11])
        return Message(
            msg_id, row[1], row[2], bytes(row[3]), int(row[4]), text, row[6],
            float(row[7]), float(row[8]), int(row[9]), int(row[10]), envelope, row[12],
            int(row[13]),
        )  # fmt: skip

    def _rows(self, rows: Sequence[tuple[Any, ...]]) -> list[Message]:
        """:meth:`_row` of each, leaving out (and counting) those that do not open."""
        messages = []
        for row in rows:
            try:
                messages.append(self._row(row))
            except StoredDataCorrupt as exc:
                self._skipped(bytes(row[0]), exc)
        return messages

    def _skipped(self, msg_id: bytes, exc: StoredDataCorrupt) -> None:
        self.corrupt_rows += 1
        if msg_id not in self._corrupt_logged and len(self._corrupt_logged) < MAX_CORRUPT_LOGGED:
            self._corrupt_logged.add(msg_id)
            _log.warning("message %s skipped: %s", msg_id.hex(), exc)

    # ------------------------------------------------------------------ outgoing

    def enqueue(self, handle: str, peer_key: bytes, text: str, now: float) -> Message:
        """Store a new outgoing message (state queued) durably; return it."""
        (message,) = self.enqueue_many(handle, peer_key, [text], now)
        return message

    def enqueue_many(
        self,
        handle: str,
        peer_key: bytes,
        texts: Sequence[str],
        now: float,
        *,
        kind: int = KIND_TEXT,
    ) -> list[Message]:
        """Store each of ``texts`` as a new outgoing message, in order, in one transaction:
        all durable on return, or (a text too long) none stored."""
        for text in texts:
            if len(text.encode("utf-8")) > MAX_TEXT:
                raise UsageError(f"message too long: at most {MAX_TEXT} bytes of UTF-8")
        count = len(texts)
        if not count:
            return []
        sent_at_ms = int(now * 1000)
        with self._conn:
            ((next_seq,),) = self._conn.execute(  # fetchall: the statement runs to its end
                "INSERT INTO conversation_seq(peer_key, next_seq) VALUES (?, ?) "
                "ON CONFLICT(peer_key) DO UPDATE SET next_seq=next_seq+? RETURNING next_seq",
                (peer_key, 1 + count, count),
            ).fetchall()
            first = int(next_seq) - count
            messages = [
                Message(os.urandom(16), "out", handle, peer_key, first + i, text, QUEUED,
                        now, now, sent_at_ms, 0, None, None, kind)
                for i, text in enumerate(texts)
            ]  # fmt: skip
            self._conn.executemany(
                f"INSERT INTO messages({_COLUMNS}) VALUES ({_PLACES})",
                map(self._values, messages),
            )
        return messages

    def get(self, msg_id: bytes) -> Message | None:
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE id=?", (msg_id,)
        ).fetchone()
        return None if row is None else self._row(row)

    def next_due(self) -> float | None:
        """The earliest retry time of any unacknowledged message (None: nothing pending)."""
        row = self._conn.execute(
            f"SELECT MIN(next_attempt) FROM {PENDING_CONV} WHERE {PENDING}"
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def due_for(self, peer_key: bytes, now: float, limit: int = 512) -> list[Message]:
        """One conversation's unacknowledged messages whose retry time has come, in order."""
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM {PENDING_CONV} WHERE {PENDING} "
            "AND peer_key=? AND next_attempt<=? ORDER BY seq LIMIT ?",
            (peer_key, now, limit),
        ).fetchall()
        return self._rows(rows)

    def clear_envelopes(self, peer_key: bytes) -> int:
        """Forget the ciphertext of a conversation's unacknowledged messages, so that they
        are encrypted again in a new session (the peer could not decrypt them)."""
        cursor = self._conn.execute(
            f"UPDATE {PENDING_CONV} SET envelope=NULL, next_attempt=0 "
            f"WHERE {PENDING} AND peer_key=?",
            (peer_key,),
        )
        self._conn.commit()
        return cursor.rowcount

    def pending_for(self, peer_key: bytes) -> list[Message]:
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM {PENDING_CONV} WHERE {PENDING} AND peer_key=? ORDER BY seq",
            (peer_key,),
        ).fetchall()
        return self._rows(rows)

    def has_pending(self, peer_key: bytes) -> bool:
        """Whether anything to ``peer_key`` waits for its ack."""
        row = self._conn.execute(
            f"SELECT 1 FROM {PENDING_CONV} WHERE {PENDING} AND peer_key=? LIMIT 1",
            (peer_key,),
        ).fetchone()
        return row is not None

    def set_envelope(self, msg_id: bytes, envelope: bytes, *, commit: bool = True) -> None:
        """Keep the ciphertext so that every retry sends the same bytes."""
        sealed = self._at_rest.seal("messages", "envelope", msg_id, envelope)
        self._conn.execute("UPDATE messages SET envelope=? WHERE id=?", (sealed, msg_id))
        if commit:
            self._conn.commit()

    def mark_delivered(
        self, msg_id: bytes, peer_key: bytes, now: float, *, commit: bool = True
    ) -> bool:
        """An ack arrived from ``peer_key``. True if this changed the message's state."""
        cursor = self._conn.execute(
            "UPDATE messages SET state=?, updated=? WHERE id=? AND direction='out' "
            "AND peer_key=? AND state!=?",
            (DELIVERED, now, msg_id, peer_key, DELIVERED),
        )
        if commit:
            self._conn.commit()
        return cursor.rowcount == 1

    def readdress(self, handle: str, old_key: bytes, new_key: bytes) -> int:
        """The pin of ``handle`` moved from ``old_key`` to ``new_key`` (a rotation
        notice, or the user's --accept-new): what still waits for the old key goes to
        the new one, encrypted again (in a new session), after what was sent before."""
        with self._conn:
            self._conn.execute(
                "INSERT INTO conversation_seq(peer_key, next_seq) SELECT ?, next_seq "
                "FROM conversation_seq WHERE peer_key=? ON CONFLICT(peer_key) DO UPDATE "
                "SET next_seq=MAX(next_seq, excluded.next_seq)",
                (new_key, old_key),
            )
            cursor = self._conn.execute(
                f"UPDATE messages SET peer_key=?, envelope=NULL, next_attempt=0, via=NULL "
                f"WHERE {PENDING} AND peer_key=? AND handle=?",
                (new_key, old_key, handle),
            )
        return cursor.rowcount

    # ------------------------------------------------------------------ incoming

    def seen(self, msg_id: bytes) -> bool:
        return (
            self._conn.execute(
                "SELECT 1 FROM messages WHERE id=? AND direction='in'", (msg_id,)
            ).fetchone()
            is not None
        )

    def record_incoming(
        self,
        msg_id: bytes,
        handle: str,
        peer_key: bytes,
        seq: int,
        text: str,
        sent_at_ms: int,
        now: float,
        *,
        via: str,
        commit: bool = True,
    ) -> Message | None:
        """Store a received message and return it; None (and nothing changes) if its id is
        already known."""
        message = Message(
            msg_id, "in", handle, peer_key, seq, text, DELIVERED, now, now, sent_at_ms, 0,
            None, via,
        )  # fmt: skip
        cursor = self._conn.execute(
            f"INSERT OR IGNORE INTO messages({_COLUMNS}) VALUES ({_PLACES})",
            self._values(message),
        )
        if commit:
            self._conn.commit()
        return message if cursor.rowcount == 1 else None

    def inbox(
        self, *, peer_key: bytes | None = None, after_rowid: int = 0, limit: int = 1000
    ) -> list[tuple[int, Message]]:
        """Received messages after the cursor ``after_rowid``: the ``limit`` that arrived
        first, then each conversation in its sender's order. (A page is cut in arrival
        order, so that the next page, after the largest cursor of this one, misses
        nothing; sorting before cutting would skip what another conversation received
        earlier.)"""
        where, args = "direction='in' AND rowid>?", [after_rowid]
        if peer_key is not None:
            where += " AND peer_key=?"
            args.append(peer_key)  # type: ignore[arg-type]
        rows = self._conn.execute(
            f"SELECT rowid, {_COLUMNS} FROM messages WHERE {where} ORDER BY rowid LIMIT ?",
            (*args, limit),
        ).fetchall()
        page = []
        for r in rows:
            try:
                page.append((int(r[0]), self._row(r[1:])))
            except StoredDataCorrupt as exc:
                self._skipped(bytes(r[1]), exc)
        page.sort(key=lambda item: (item[1].peer_key, item[1].seq))
        return page

    def outbox(self, *, limit: int = 1000) -> list[Message]:
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE direction='out' ORDER BY created DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return self._rows(rows)


# --------------------------------------------------------------------------- contacts

#: Where a key that differs from a pin can be seen (the ``source`` of an evidence row).
EVIDENCE_SOURCES = ("dht", "lan", "message", "call", "rotation")
#: Suspected keys remembered per handle: the most recently seen ones.
MAX_EVIDENCE_KEYS = 8
#: ``place`` (an address, a replica, how it came) is cut to this many characters.
MAX_EVIDENCE_PLACE = 120

_CONTACTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_evidence (
    handle TEXT NOT NULL, public_key BLOB NOT NULL, source TEXT NOT NULL,
    place TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    count INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (handle, public_key, source));
"""


@dataclass(frozen=True, slots=True)
class Evidence:
    """A key other than the pinned one, seen for a pinned handle: never used by itself."""

    handle: str
    public_key: bytes
    source: str
    place: str
    first_seen: float
    last_seen: float
    count: int

    def summary(self) -> EvidenceSummary:
        return {
            "fingerprint": fingerprint(self.public_key),
            "source": self.source,
            "where": self.place,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "count": self.count,
        }


@dataclass(frozen=True, slots=True)
class Contact:
    handle: str
    public_key: bytes
    verified: bool
    first_seen: float
    #: The key a verified rotation notice moved the pin from, and when.
    rotated_from: bytes | None = None
    rotated_at: float | None = None

    def summary(self) -> ContactSummary:
        return {
            "handle": self.handle,
            "fingerprint": fingerprint(self.public_key),
            "verified": self.verified,
            "first_seen": self.first_seen,
            "rotated_from": None if self.rotated_from is None else fingerprint(self.rotated_from),
            "rotated_at": self.rotated_at,
        }


class Contacts:
    """Pinned keys (trust on first use). A pin changes only with proof: a rotation
    notice signed by the pinned key (:meth:`rotate`), or the user naming the new key
    (:meth:`accept_new`). Any other key seen for a pinned handle is kept as evidence
    (:meth:`observe`) and shown, never used."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        conn.executescript(_SCHEMA + _CONTACTS_SCHEMA)
        _migrate_contacts(conn)
        conn.commit()

    def get(self, handle: str) -> Contact | None:
        return self._one("handle", handle)

    def by_key(self, public_key: bytes) -> Contact | None:
        """The contact pinned to ``public_key`` (one statement: the receiver asks this
        for every message)."""
        return self._one("public_key", public_key)

    def _one(self, column: str, value: str | bytes) -> Contact | None:
        row = self._conn.execute(
            "SELECT handle, public_key, verified, first_seen, rotated_from, rotated_at "
            f"FROM contacts WHERE {column}=?",
            (value,),
        ).fetchone()
        if row is None:
            return None
        return Contact(
            row[0], bytes(row[1]), bool(row[2]), float(row[3]),
            None if row[4] is None else bytes(row[4]), None if row[5] is None else float(row[5]),
        )  # fmt: skip

    def pin(self, handle: str, public_key: bytes, now: float) -> Contact:
        """The contact for ``handle``: pinned to ``public_key`` if it had no pin yet.
        An existing pin is returned unchanged, whatever ``public_key`` is (see
        :meth:`observe` to keep another key as evidence)."""
        self._conn.execute(
            "INSERT OR IGNORE INTO contacts(handle, public_key, verified, first_seen) "
            "VALUES (?,?,0,?)",
            (handle, public_key, now),
        )
        self._conn.commit()
        contact = self.get(handle)
        assert contact is not None
        return contact

    def observe(
        self, handle: str, public_key: bytes, now: float, *, source: str, place: str = ""
    ) -> Contact | None:
        """``public_key`` was seen for ``handle`` (a lookup, a LAN announcement, a message
        or call that claims the handle). A key other than the pinned one is stored as
        evidence; the pin never changes here. Returns the contact (None: not pinned)."""
        contact = self.get(handle)
        if contact is None or contact.public_key == public_key:
            return contact
        self.add_evidence(handle, public_key, now, source=source, place=place)
        return contact

    def add_evidence(
        self, handle: str, public_key: bytes, now: float, *, source: str, place: str = ""
    ) -> None:
        if source not in EVIDENCE_SOURCES:
            raise ValueError(f"unknown evidence source {source!r}")
        place = "".join(c if c.isprintable() else "?" for c in place[:MAX_EVIDENCE_PLACE])
        with self._conn:
            self._conn.execute(
                "INSERT INTO key_evidence(handle, public_key, source, place, first_seen, "
                "last_seen, count) VALUES (?,?,?,?,?,?,1) "
                "ON CONFLICT(handle, public_key, source) DO UPDATE SET "
                "place=excluded.place, last_seen=excluded.last_seen, count=count+1",
                (handle, public_key, source, place, now, now),
            )
            # Bounded: the keys seen most recently are kept (a flood of made-up keys
            # pushes out older ones, never the pin, which is not evidence).
            self._conn.execute(
                "DELETE FROM key_evidence WHERE handle=? AND public_key NOT IN ("
                "SELECT public_key FROM key_evidence WHERE handle=? GROUP BY public_key "
                "ORDER BY MAX(last_seen) DESC LIMIT ?)",
                (handle, handle, MAX_EVIDENCE_KEYS),
            )

    def evidence(self, handle: str) -> list[Evidence]:
        rows = self._conn.execute(
            "SELECT handle, public_key, source, place, first_seen, last_seen, count "
            "FROM key_evidence WHERE handle=? ORDER BY last_seen DESC",
            (handle,),
        ).fetchall()
        return [
            Evidence(r[0], bytes(r[1]), r[2], r[3], float(r[4]), float(r[5]), int(r[6]))
            for r in rows
        ]

    def mark_verified(self, handle: str) -> Contact:
        """The user compared safety numbers: the current pin is verified."""
        contact = self._require(handle)
        self._conn.execute("UPDATE contacts SET verified=1 WHERE handle=?", (handle,))
        self._conn.commit()
        return replace(contact, verified=True)

    def accept_new(self, handle: str, named: str, now: float) -> tuple[Contact, bytes]:
        """Pin the suspected key the user named (its full fingerprint, or a prefix of at
        least MIN_PREFIX characters that matches exactly one suspected key), verified.
        Returns the contact and the key it was pinned to before. A name that matches
        none, or several, is a UsageError and changes nothing."""
        contact = self._require(handle)
        named = named.strip().replace(" ", "").lower()
        if not MIN_PREFIX <= len(named) <= FINGERPRINT_LEN:
            raise UsageError(
                f"name the key to accept by its fingerprint: {MIN_PREFIX}-{FINGERPRINT_LEN} "
                "base32 characters (see `p2pd verify "
                f"{handle}`)"
            )
        keys = {e.public_key for e in self.evidence(handle)}
        matches = [k for k in keys if fingerprint(k).startswith(named)]
        if not matches and fingerprint(contact.public_key).startswith(named):
            raise UsageError(f"{named!r} is the key {handle!r} is pinned to already")
        if not matches:
            raise UsageError(
                f"no suspected key of {handle!r} has the fingerprint {named!r}: nothing "
                f"changed (`p2pd verify {handle}` lists them)"
            )
        if len(matches) > 1:
            raise UsageError(
                f"{named!r} matches {len(matches)} suspected keys of {handle!r}: give more "
                "of the fingerprint; nothing changed"
            )
        (new_key,) = matches
        with self._conn:
            self._conn.execute(
                "UPDATE contacts SET public_key=?, verified=1, rotated_from=NULL, "
                "rotated_at=NULL WHERE handle=?",
                (new_key, handle),
            )
            self._conn.execute(
                "DELETE FROM key_evidence WHERE handle=? AND public_key=?", (handle, new_key)
            )
        updated = self.get(handle)
        assert updated is not None
        return updated, contact.public_key

    def rotate(self, handle: str, old_key: bytes, new_key: bytes, now: float) -> bool:
        """A verified rotation notice moves ``handle`` from ``old_key`` to ``new_key``:
        the pin follows if, and only if, it is ``old_key`` (verified stays as it was:
        the pinned key itself vouched for the new one). Otherwise the new key is only
        evidence. True if the pin moved."""
        with self._conn:
            cursor = self._conn.execute(
                "UPDATE contacts SET public_key=?, rotated_from=?, rotated_at=? "
                "WHERE handle=? AND public_key=?",
                (new_key, old_key, now, handle, old_key),
            )
            moved = cursor.rowcount == 1
            if moved:
                self._conn.execute(
                    "DELETE FROM key_evidence WHERE handle=? AND public_key=?", (handle, new_key)
                )
        if not moved:
            self.observe(handle, new_key, now, source="rotation", place="notice not from the pin")
        return moved

    def _require(self, handle: str) -> Contact:
        contact = self.get(handle)
        if contact is None:
            raise UsageError(f"{handle!r} is not a contact yet: `p2pd whois {handle}` first")
        return contact

    def all(self) -> list[Contact]:
        rows = self._conn.execute("SELECT handle FROM contacts ORDER BY handle").fetchall()
        return [c for (h,) in rows if (c := self.get(h)) is not None]


def _migrate_contacts(conn: sqlite3.Connection) -> None:
    """Idempotent: a database from before pins needed proof had ``pending_key`` (a key a
    lookup saw, which blocked sending): it becomes an evidence row and the column goes.
    The rotation columns are added where missing."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(contacts)")}
    if "rotated_from" not in columns:
        conn.execute("ALTER TABLE contacts ADD COLUMN rotated_from BLOB")
    if "rotated_at" not in columns:
        conn.execute("ALTER TABLE contacts ADD COLUMN rotated_at REAL")
    if "pending_key" in columns:
        conn.execute(
            "INSERT OR IGNORE INTO key_evidence(handle, public_key, source, place, "
            "first_seen, last_seen, count) SELECT handle, pending_key, 'dht', "
            "'a lookup (before this version)', first_seen, first_seen, 1 FROM contacts "
            "WHERE pending_key IS NOT NULL AND pending_key != public_key"
        )
        conn.execute("ALTER TABLE contacts DROP COLUMN pending_key")
