"""The :class:`~p2pd.delivery.core.Ledger` on SQLite: messages, contacts and sessions on
the daemon's one connection, so that one transaction holds a ratchet step together with
the message it encrypted or decrypted. Nothing here commits except :meth:`commit` (and
what MessageStore, Contacts and SessionManager commit on their own: a session reset)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from .. import wire
from ..messaging import PENDING, PENDING_CONV, SENT, Contacts, Message, MessageStore
from ..session import SessionManager
from .events import MakeDue, MarkDelivered, ScheduleAttempt, SetEnvelope, Write


class SqliteLedger:
    def __init__(
        self,
        conn: sqlite3.Connection,
        messages: MessageStore,
        contacts: Contacts,
        sessions: SessionManager,
    ) -> None:
        self.conn = conn
        self.messages = messages
        self.contacts = contacts
        self.sessions = sessions

    def commit(self) -> None:
        """End the open transaction, if any (the service, after each core entry point)."""
        if self.conn.in_transaction:
            self.conn.commit()

    def message(self, msg_id: bytes) -> Message | None:
        return self.messages.get(msg_id)

    def open_envelope(
        self,
        transport_key: bytes | None,
        envelope: bytes,
        decode: Callable[[bytes], wire.MessagePayload],
        now: float,
    ) -> tuple[bytes, wire.MessagePayload]:
        # A savepoint: a message refused after decryption undoes its ratchet step and
        # nothing else of the transaction (acks and messages of the same read). Inside a
        # transaction always: releasing an outermost savepoint would commit the ratchet
        # step before the message is stored, and a crash between would lose the message.
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN")
        self.conn.execute("SAVEPOINT p2pd_accept")
        try:
            decrypted = self.sessions.decrypt(
                envelope, now=now, sender_key=transport_key, commit=False
            )
            payload = decode(decrypted.plaintext)
        except BaseException:
            self.conn.execute("ROLLBACK TO p2pd_accept")
            self.conn.execute("RELEASE p2pd_accept")
            raise
        self.conn.execute("RELEASE p2pd_accept")
        return decrypted.peer_key, payload

    def trusted_handle(self, peer_key: bytes) -> str | None:
        contact = self.contacts.by_key(peer_key)
        return None if contact is None else contact.handle

    def store_incoming(
        self, sender_key: bytes, handle: str, payload: wire.MessagePayload, now: float, via: str
    ) -> Message | None:
        return self.messages.record_incoming(
            payload.msg_id, handle, sender_key, payload.seq, payload.text, payload.sent_at_ms,
            now, via=via, commit=False,
        )  # fmt: skip

    def outgoing_state(self, msg_id: bytes) -> tuple[bytes, str] | None:
        row = self.conn.execute(
            "SELECT peer_key, state FROM messages WHERE id=? AND direction='out'", (msg_id,)
        ).fetchone()
        return None if row is None else (bytes(row[0]), str(row[1]))

    def has_pending(self, peer_key: bytes) -> bool:
        return self.messages.has_pending(peer_key)

    def next_attempts(self) -> dict[bytes, float]:
        rows = self.conn.execute(
            f"SELECT peer_key, MIN(next_attempt) FROM {PENDING_CONV} WHERE {PENDING} "
            "GROUP BY peer_key"
        ).fetchall()
        return {bytes(peer_key): float(when) for peer_key, when in rows}

    def next_attempt(self, peer_key: bytes) -> float | None:
        (when,) = self.conn.execute(
            f"SELECT MIN(next_attempt) FROM {PENDING_CONV} WHERE {PENDING} AND peer_key=?",
            (peer_key,),
        ).fetchone()
        return None if when is None else float(when)

    def reset_session(self, peer_key: bytes, now: float) -> None:
        self.sessions.reset_session(peer_key, now=now)
        self.messages.clear_envelopes(peer_key)

    def encrypt(self, peer_key: bytes, plaintext: bytes, bundle: bytes | None, now: float) -> bytes:
        return self.sessions.encrypt(peer_key, plaintext, now=now, peer_bundle=bundle, commit=False)

    def encrypt_many(
        self, peer_key: bytes, plaintexts: Sequence[bytes], bundle: bytes | None, now: float
    ) -> list[bytes]:
        return self.sessions.encrypt_many(
            peer_key, plaintexts, now=now, peer_bundle=bundle, commit=False
        )

    def set_envelope(self, msg_id: bytes, envelope: bytes) -> None:
        self.messages.set_envelope(msg_id, envelope, commit=False)

    def apply(self, writes: Sequence[Write]) -> None:
        """The core's rows, in the open transaction (the caller commits)."""
        attempts: list[tuple[Any, ...]] = []
        for write in writes:
            if isinstance(write, ScheduleAttempt):  # a batch's: one statement
                via = write.via
                attempts.append((write.attempts, write.next_attempt, write.now, via, via,
                                 write.msg_id))  # fmt: skip
                continue
            self._schedule(attempts)
            if isinstance(write, SetEnvelope):
                self.set_envelope(write.msg_id, write.envelope)
            elif isinstance(write, MarkDelivered):
                self.messages.mark_delivered(write.msg_id, write.peer_key, write.now, commit=False)
            elif isinstance(write, MakeDue):
                self.conn.execute(
                    f"UPDATE {PENDING_CONV} SET next_attempt=? "
                    f"WHERE {PENDING} AND peer_key=? AND next_attempt>?",
                    (write.when, write.peer_key, write.when),
                )
        self._schedule(attempts)

    def _schedule(self, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            self.conn.executemany(
                "UPDATE messages SET attempts=?, next_attempt=?, updated=?, state=CASE WHEN "
                f"? IS NULL THEN state ELSE '{SENT}' END, via=COALESCE(?, via) "
                "WHERE id=? AND state!='delivered'",
                rows,
            )
            rows.clear()
