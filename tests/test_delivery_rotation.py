"""Delivery's rotation notices (p2pd/delivery/rotation_notices.py) on an in-memory
database: ours are queued once for every contact; a contact's moves the pin and what
waits for the old key only when the pinned key signed it, and a bad one changes nothing.
No network: the end-to-end rotation is tests/test_delivery.py's."""

from __future__ import annotations

from typing import Any

from p2pd import wire
from p2pd.delivery.events import RotationReceived
from p2pd.delivery.rotation_notices import RotationNotices
from p2pd.identity import Identity
from p2pd.messaging import Contacts, MessageStore
from p2pd.rotation import RotationNotice
from p2pd.store import open_database

NOW = 1_800_000_000


class Harness:
    """RotationNotices over a fresh database, with what it calls written down."""

    def __init__(self, me: Identity) -> None:
        self.conn = open_database(None)
        self.contacts = Contacts(self.conn)
        self.messages = MessageStore(self.conn)
        self.queued: list[bytes] = []
        self.forgotten: list[bytes] = []
        self.emitted: list[tuple[str, dict[str, Any]]] = []
        self.notices = RotationNotices(
            self.conn, me.public_key, self.contacts, self.messages,
            emit=lambda kind, **fields: self.emitted.append((kind, fields)),
            queued=self.queued.append, forget=self.forgotten.append,
        )  # fmt: skip


def test_our_notice_is_queued_once_for_every_contact() -> None:
    old, new = Identity.generate("alice"), Identity.generate("alice")
    bob, carol = Identity.generate("bob"), Identity.generate("carol")
    h = Harness(new)
    h.contacts.pin("bob", bob.public_key, NOW)
    h.contacts.pin("carol", carol.public_key, NOW)
    notice = RotationNotice.create(old, new, now=NOW)
    assert h.notices.announce(notice) == 2
    outbox = h.messages.outbox()
    assert sorted((m.handle, m.kind, m.text) for m in outbox) == [
        ("bob", wire.KIND_ROTATION, notice.encode().hex()),
        ("carol", wire.KIND_ROTATION, notice.encode().hex()),
    ]
    assert sorted(h.queued) == sorted([bob.public_key, carol.public_key])
    # A restart announces the same notice again: nothing more is queued.
    assert h.notices.announce(notice) == 0
    assert len(h.messages.outbox()) == 2
    # A notice for a key that is not ours is never sent.
    other = RotationNotice.create(old, Identity.generate("alice"), now=NOW)
    assert h.notices.announce(other) == 0
    assert len(h.messages.outbox()) == 2


def test_a_contacts_notice_moves_the_pin_and_what_waits() -> None:
    old, new = Identity.generate("bob"), Identity.generate("bob")
    h = Harness(Identity.generate("alice"))
    h.contacts.pin("bob", old.public_key, NOW)
    h.messages.enqueue_many("bob", old.public_key, ["hello"], NOW)
    text = RotationNotice.create(old, new, now=NOW).encode().hex()
    h.notices.received(RotationReceived(new.public_key, "bob", text, "direct"))
    contact = h.contacts.get("bob")
    assert contact is not None and contact.public_key == new.public_key
    assert [m.peer_key for m in h.messages.outbox()] == [new.public_key]
    assert h.forgotten == [old.public_key] and h.queued == [new.public_key]
    assert [kind for kind, _ in h.emitted] == ["contact_rotated"]


def test_a_bad_or_foreign_notice_changes_no_pin() -> None:
    old, new, mallory = (Identity.generate("bob") for _ in range(3))
    h = Harness(Identity.generate("alice"))
    h.contacts.pin("bob", old.public_key, NOW)
    good = RotationNotice.create(old, new, now=NOW).encode().hex()
    foreign = RotationNotice.create(mallory, new, now=NOW).encode().hex()  # not the pin
    cases = [
        RotationReceived(new.public_key, "bob", "zz", "direct"),  # not hex
        RotationReceived(new.public_key, "bob", good[:-2], "direct"),  # cut short
        RotationReceived(new.public_key, "bob", "00" * wire.MAX_ROTATION_TEXT, "mailbox"),
        RotationReceived(mallory.public_key, "bob", good, "direct"),  # not from its new key
        RotationReceived(new.public_key, "carol", good, "direct"),  # another handle claimed
        RotationReceived(new.public_key, "bob", foreign, "direct"),  # signed by mallory
    ]
    for event in cases:
        h.notices.received(event)
        contact = h.contacts.get("bob")
        assert contact is not None and contact.public_key == old.public_key, event
    assert h.queued == [] and h.forgotten == [] and h.emitted == []
