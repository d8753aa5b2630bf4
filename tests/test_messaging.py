"""The delivery state machine and message codecs, without any network."""

from __future__ import annotations

import contextlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pd import wire
from p2pd.errors import KeyChanged, UsageError, WireError
from p2pd.messaging import DELIVERED, QUEUED, SENT, Contacts, MessageStore, backoff
from p2pd.store import open_database

BOB = b"b" * 32
CAROL = b"c" * 32


def test_outbox_lifecycle_queued_sent_delivered() -> None:
    store = MessageStore(open_database(None))
    rng = random.Random(1)
    m1 = store.enqueue("bob", BOB, "hello", now=100.0)
    m2 = store.enqueue("bob", BOB, "again", now=100.5)
    m3 = store.enqueue("carol", CAROL, "hi carol", now=101.0)
    assert (m1.seq, m2.seq, m3.seq) == (1, 2, 1)  # per-conversation sequence
    assert m1.state == QUEUED
    assert [m.id for m in store.due(now=101.0)] == sorted(
        [m1.id, m2.id, m3.id],
        key=lambda i: (store.get(i).peer_key, store.get(i).seq),  # type: ignore[union-attr]
    )
    store.mark_attempt(m1.id, 102.0, via="direct", rng=rng)
    assert store.get(m1.id).state == SENT  # type: ignore[union-attr]
    assert m1.id not in [m.id for m in store.due(now=102.0)]  # backing off
    assert m1.id in [m.id for m in store.due(now=200.0)]  # due again: not acked yet
    assert not store.mark_delivered(m1.id, CAROL, 103.0)  # an ack from the wrong peer
    assert store.mark_delivered(m1.id, BOB, 103.0)
    assert not store.mark_delivered(m1.id, BOB, 104.0)  # a duplicate ack changes nothing
    assert store.get(m1.id).state == DELIVERED  # type: ignore[union-attr]
    assert m1.id not in [m.id for m in store.due(now=1e9)]
    store.mark_attempt(m2.id, 102.0, via=None, rng=rng)  # failed attempt: stays queued
    assert store.get(m2.id).state == QUEUED  # type: ignore[union-attr]
    store.retry_now(BOB)
    assert m2.id in [m.id for m in store.due(now=102.1)]
    with pytest.raises(UsageError):
        store.enqueue("bob", BOB, "x" * (wire.MAX_TEXT + 1), now=1.0)


def test_backoff_grows_and_is_capped() -> None:
    rng = random.Random(7)
    values = [backoff(a, rng) for a in range(20)]
    assert 0.4 <= values[0] <= 0.6
    assert values[5] > values[1]
    assert max(values) <= 60 * 1.2


def test_incoming_dedupe_and_order() -> None:
    store = MessageStore(open_database(None))
    ids = [os.urandom(16) for _ in range(5)]
    for seq in (3, 1, 2, 5, 4):  # arrival out of order
        assert store.record_incoming(ids[seq - 1], "bob", BOB, seq, f"m{seq}", 0, 1.0, via="direct")
    assert not store.record_incoming(ids[0], "bob", BOB, 1, "m1", 0, 2.0, via="mailbox")
    assert [m.text for _, m in store.inbox(peer_key=BOB)] == ["m1", "m2", "m3", "m4", "m5"]
    assert store.seen(ids[2]) and not store.seen(os.urandom(16))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from([BOB, CAROL]), min_size=1, max_size=40), st.integers(1, 7))
def test_inbox_pages_miss_nothing(senders: list[bytes], limit: int) -> None:
    """Pages of the inbox, each after the previous page's largest cursor, hold every
    message exactly once, whatever the order conversations arrived in."""
    store = MessageStore(open_database(None))
    seqs = {BOB: 0, CAROL: 0}
    for sender in senders:
        seqs[sender] += 1
        store.record_incoming(os.urandom(16), "x", sender, seqs[sender], "t", 0, 1.0, via="direct")
    seen: list[bytes] = []
    after = 0
    for _ in range(len(senders) + 1):
        page = store.inbox(after_rowid=after, limit=limit)
        seen += [m.id for _, m in page]
        assert [(m.peer_key, m.seq) for _, m in page] == sorted(
            (m.peer_key, m.seq) for _, m in page
        )
        if not page:
            break
        after = max(rowid for rowid, _ in page)
    assert len(seen) == len(set(seen)) == len(senders)


def test_enqueue_many_is_in_order_and_all_or_nothing() -> None:
    store = MessageStore(open_database(None))
    store.enqueue("bob", BOB, "first", now=1.0)
    batch = store.enqueue_many("bob", BOB, ["a", "b", "c"], now=2.0)
    assert [(m.seq, m.text) for m in batch] == [(2, "a"), (3, "b"), (4, "c")]
    assert store.enqueue("bob", BOB, "after", now=3.0).seq == 5
    with pytest.raises(UsageError):
        store.enqueue_many("bob", BOB, ["fine", "x" * (wire.MAX_TEXT + 1)], now=4.0)
    assert [m.seq for m in store.pending_for(BOB)] == [1, 2, 3, 4, 5]  # nothing stored
    assert store.enqueue("bob", BOB, "next", now=5.0).seq == 6
    assert [m.seq for m in store.enqueue_many("carol", CAROL, ["x"], now=6.0)] == [1]


def test_contacts_pin_first_key_and_refuse_a_changed_one() -> None:
    contacts = Contacts(open_database(None))
    first = contacts.check("bob", BOB, 1.0)
    assert first.public_key == BOB and not first.verified
    assert contacts.check("bob", BOB, 2.0).public_key == BOB
    with pytest.raises(KeyChanged, match="has changed"):
        contacts.check("bob", b"x" * 32, 3.0)
    pending = contacts.get("bob")
    assert pending is not None and pending.public_key == BOB and pending.pending_key == b"x" * 32
    with pytest.raises(KeyChanged):  # still refused until accepted
        contacts.check("bob", b"x" * 32, 4.0)
    accepted = contacts.accept("bob")
    assert accepted.public_key == b"x" * 32 and accepted.verified and accepted.pending_key is None
    assert contacts.check("bob", b"x" * 32, 5.0).verified
    with pytest.raises(UsageError):
        contacts.accept("nobody")


def test_message_payload_round_trip() -> None:
    p = wire.MessagePayload(os.urandom(16), 7, 123456, "héllo ✓")
    assert wire.MessagePayload.decode(p.encode()) == p


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_message_decoders_raise_only_wire_error(data: bytes) -> None:
    for decode in (wire.MessagePayload.decode, wire.decode_mailbox_plaintext):
        with contextlib.suppress(WireError):
            decode(data)
    with contextlib.suppress(WireError):
        wire.StreamFrameDecoder().feed(data)


def test_stream_frames_reassemble_across_chunks() -> None:
    frames = [
        wire.encode_stream_frame(wire.FRAME_MESSAGE, os.urandom(16) + b"envelope" * 100),
        wire.encode_stream_frame(wire.FRAME_ACK, os.urandom(16)),
    ]
    data = b"".join(frames)
    decoder = wire.StreamFrameDecoder()
    out = []
    for i in range(0, len(data), 7):
        out += decoder.feed(data[i : i + 7])
    assert [k for k, _ in out] == [wire.FRAME_MESSAGE, wire.FRAME_ACK] and decoder.pending == 0
    with pytest.raises(WireError):
        wire.StreamFrameDecoder().feed(b"\x01\xff\xff\xff\xff")  # length over the bound
    with pytest.raises(WireError):
        wire.StreamFrameDecoder().feed(b"\x09\x00\x00\x00\x01x")  # unknown type
