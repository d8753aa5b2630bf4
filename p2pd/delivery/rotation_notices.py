"""Delivery's key rotation notices, both ways: ours queued for every contact once
(:meth:`RotationNotices.announce`), and a contact's moving its pin to its new key
(:meth:`RotationNotices.received`).

A notice is a payload of its own kind (``wire.KIND_ROTATION``) that travels through the
outbox like a message: durable, retried, left in the mailbox of a contact that is
offline, sent from the new key in a new session. The notice itself, signed by both
keys, is :mod:`p2pd.rotation`'s; ``p2pd rotate-key`` makes it (:mod:`p2pd.key_rotation`).
Wire format: docs/PROTOCOL.md, "Key rotation notices (payload kind 3)".
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from .. import wire
from ..errors import RecordError
from ..identity import DISPLAY_PREFIX, fingerprint
from ..messaging import Contacts, MessageStore
from ..rotation import RotationNotice, verify_notice
from ..store import get_meta, set_meta
from .events import RotationReceived

__all__ = ["ROTATION_SENT_META", "RotationNotices"]

log = logging.getLogger(__name__)

#: The rotation notice last queued for every contact (hex), so it is queued once.
ROTATION_SENT_META = "rotation.sent"


class RotationNotices:
    """Our rotation notices out, contacts' in, for the delivery service (see the module
    docstring). ``public_key`` is ours now; ``emit(kind, **fields)`` is the EventBus's;
    ``queued(key)`` is the service's: messages to that key were queued (or moved to
    it), deliver them; ``forget(key)`` drops the record the service cached for a key
    that rotated away."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        public_key: bytes,
        contacts: Contacts,
        messages: MessageStore,
        *,
        emit: Callable[..., Any],
        queued: Callable[[bytes], None],
        forget: Callable[[bytes], None],
    ) -> None:
        self._conn = conn
        self.public_key = public_key
        self.contacts = contacts
        self.messages = messages
        self._emit = emit
        self._queued = queued
        self._forget = forget

    def announce(self, notice: RotationNotice) -> int:
        """Queue ``notice`` (our key just rotated to this identity's) for every contact,
        once: through the outbox like a message (durable, retried, left in the mailbox
        of a contact that is offline), from the new key, in a new session. Returns how
        many were queued (0 if this notice was announced already)."""
        encoded = notice.encode()
        if notice.new_key != self.public_key:
            log.warning("a stored rotation notice is for another key than ours: not sent")
            return 0
        if get_meta(self._conn, ROTATION_SENT_META) == encoded.hex():
            return 0
        now = time.time()
        contacts = self.contacts.all()
        for contact in contacts:
            self.messages.enqueue_many(
                contact.handle, contact.public_key, [encoded.hex()], now, kind=wire.KIND_ROTATION
            )
        set_meta(self._conn, ROTATION_SENT_META, encoded.hex())
        log.info("key rotation notice queued for %d contact(s)", len(contacts))
        for contact in contacts:
            self._queued(contact.public_key)
        return len(contacts)

    def received(self, event: RotationReceived) -> None:
        """A rotation notice from ``event.sender_key``: a valid one signed by the key a
        contact is pinned to moves the pin to the new key (what still waits for the old
        key follows it); any other valid one is evidence; an invalid one is dropped."""
        try:
            if len(event.text) > wire.MAX_ROTATION_TEXT:
                raise RecordError("rotation notice too long")
            notice = verify_notice(bytes.fromhex(event.text))
        except (ValueError, RecordError) as exc:
            log.warning("ignored a bad rotation notice from %s: %s",
                        fingerprint(event.sender_key)[:12], exc)  # fmt: skip
            return
        if notice.new_key != event.sender_key or notice.handle != event.claimed:
            log.warning("ignored a rotation notice sent by another key than its new one")
            return
        now = time.time()
        if not self.contacts.rotate(notice.handle, notice.old_key, notice.new_key, now):
            log.warning("a rotation notice for %r not from its pinned key: kept as evidence",
                        notice.handle)  # fmt: skip
            return
        moved = self.messages.readdress(notice.handle, notice.old_key, notice.new_key)
        self._forget(notice.old_key)
        log.info("%s rotated its key to %s (%d waiting message(s) follow)", notice.handle,
                 fingerprint(notice.new_key)[:DISPLAY_PREFIX], moved)  # fmt: skip
        self._emit(
            "contact_rotated",
            handle=notice.handle,
            old_fingerprint=fingerprint(notice.old_key),
            fingerprint=fingerprint(notice.new_key),
            issued=notice.issued,
        )
        self._queued(notice.new_key)
