"""The delivery state machine and message codecs, without any network."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pd import messaging, wire
from p2pd.at_rest import CLEAR, AtRest
from p2pd.errors import UsageError, WireError
from p2pd.identity import Identity, fingerprint
from p2pd.messaging import (
    DELIVERED,
    MAX_EVIDENCE_KEYS,
    MAX_EVIDENCE_PLACE,
    QUEUED,
    Contacts,
    MessageStore,
    backoff,
)
from p2pd.store import open_database

BOB = b"b" * 32
CAROL = b"c" * 32
MALLORY = b"m" * 32


_AT_REST: list[AtRest] = [CLEAR]


@pytest.fixture(autouse=True, params=["clear", "at-rest"])
def _storage(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test runs on a clear store and on one encrypted at rest (p2pd/at_rest.py)."""
    _AT_REST[0] = CLEAR if request.param == "clear" else AtRest(os.urandom(32))
    yield
    _AT_REST[0] = CLEAR


def new_store() -> MessageStore:
    return MessageStore(open_database(None), at_rest=_AT_REST[0])


def test_outbox_lifecycle_queued_then_delivered() -> None:
    """The store's part of a message's life (the retry schedule is the delivery core's:
    tests/test_delivery_core.py)."""
    store = new_store()
    m1 = store.enqueue("bob", BOB, "hello", now=100.0)
    m2 = store.enqueue("bob", BOB, "again", now=100.5)
    m3 = store.enqueue("carol", CAROL, "hi carol", now=101.0)
    assert (m1.seq, m2.seq, m3.seq) == (1, 2, 1)  # per-conversation sequence
    assert m1.state == QUEUED
    assert [m.id for m in store.due_for(BOB, now=101.0)] == [m1.id, m2.id]  # in order
    assert [m.id for m in store.due_for(CAROL, now=101.0)] == [m3.id]
    assert not store.mark_delivered(m1.id, CAROL, 103.0)  # an ack from the wrong peer
    assert store.mark_delivered(m1.id, BOB, 103.0)
    assert not store.mark_delivered(m1.id, BOB, 104.0)  # a duplicate ack changes nothing
    assert store.get(m1.id).state == DELIVERED  # type: ignore[union-attr]
    assert [m.id for m in store.due_for(BOB, now=1e9)] == [m2.id]
    assert store.has_pending(BOB) and [m.id for m in store.pending_for(BOB)] == [m2.id]
    with pytest.raises(UsageError):
        store.enqueue("bob", BOB, "x" * (wire.MAX_TEXT + 1), now=1.0)


def test_a_message_queued_writes_no_index_the_daemon_never_reads(tmp_path: Path) -> None:
    """Each ``send`` call commits its message: every index on the outbox costs a page
    in that commit. The pending messages' retry-time index of older versions (nothing
    in the daemon read it) and the conversation index (only `inbox --from` read it, and
    only for received messages) are dropped when a database is opened; the earliest
    retry time is still found, `inbox --from` still searches an index, and a message
    queued writes fewer than 5 pages to the WAL (6.7 with those indexes)."""
    conn = open_database(None)
    conn.execute(
        "CREATE TABLE messages (id BLOB PRIMARY KEY, direction TEXT NOT NULL, handle TEXT "
        "NOT NULL, peer_key BLOB NOT NULL, seq INTEGER NOT NULL, text TEXT NOT NULL, state "
        "TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, sent_at_ms INTEGER NOT "
        "NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL DEFAULT 0, "
        "envelope BLOB, via TEXT, kind INTEGER NOT NULL DEFAULT 1)"
    )
    conn.execute(  # as older versions made them
        "CREATE INDEX messages_pending_due ON messages (next_attempt) "
        "WHERE direction='out' AND state IN ('queued', 'sent')"
    )
    conn.execute("CREATE INDEX messages_conv ON messages (peer_key, direction, seq)")
    store = MessageStore(conn, at_rest=_AT_REST[0])
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert not {"messages_pending_due", "messages_conv"} & indexes
    assert {"messages_pending_conv", "messages_inbox"} <= indexes
    plan = conn.execute(
        "EXPLAIN QUERY PLAN SELECT rowid FROM messages WHERE direction='in' AND rowid>? "
        "AND peer_key=? ORDER BY rowid LIMIT 10",
        (0, BOB),
    ).fetchall()
    assert "USING INDEX messages_inbox" in plan[0][3]
    assert store.next_due() is None
    m1 = store.enqueue("bob", BOB, "hello", now=100.0)
    store.enqueue("carol", CAROL, "hi", now=101.0)
    assert store.next_due() == 0.0  # queued: due at once
    conn.execute("UPDATE messages SET next_attempt=105.0")
    assert store.next_due() == 105.0
    store.mark_delivered(m1.id, BOB, 102.0)
    conn.execute("UPDATE messages SET next_attempt=107.0 WHERE peer_key=?", (CAROL,))
    assert store.next_due() == 107.0

    # on a file, as the daemon keeps it (WAL): the pages one message queued writes
    disk = open_database(tmp_path / "p2pd.db")
    disk.execute("PRAGMA wal_autocheckpoint=0")  # the WAL only grows while we count
    on_disk = MessageStore(disk, at_rest=_AT_REST[0])
    text = "bench message 000001: the quick brown fox jumps over the lazy dog"
    for _ in range(200):  # past the first pages' splits
        on_disk.enqueue("bob", BOB, text, now=100.0)
    wal = tmp_path / "p2pd.db-wal"
    before = wal.stat().st_size
    for _ in range(500):
        on_disk.enqueue("bob", BOB, text, now=100.0)
    frame = 24 + disk.execute("PRAGMA page_size").fetchone()[0]
    assert (wal.stat().st_size - before) / frame / 500 < 5.0
    disk.close()


def test_backoff_grows_and_is_capped() -> None:
    rng = random.Random(7)
    values = [backoff(a, rng) for a in range(20)]
    assert 0.4 <= values[0] <= 0.6
    assert values[5] > values[1]
    assert max(values) <= 60 * 1.2


def test_incoming_dedupe_and_order() -> None:
    store = new_store()
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
    store = new_store()
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
    store = new_store()
    store.enqueue("bob", BOB, "first", now=1.0)
    batch = store.enqueue_many("bob", BOB, ["a", "b", "c"], now=2.0)
    assert [(m.seq, m.text) for m in batch] == [(2, "a"), (3, "b"), (4, "c")]
    assert store.enqueue("bob", BOB, "after", now=3.0).seq == 5
    with pytest.raises(UsageError):
        store.enqueue_many("bob", BOB, ["fine", "x" * (wire.MAX_TEXT + 1)], now=4.0)
    assert [m.seq for m in store.pending_for(BOB)] == [1, 2, 3, 4, 5]  # nothing stored
    assert store.enqueue("bob", BOB, "next", now=5.0).seq == 6
    assert [m.seq for m in store.enqueue_many("carol", CAROL, ["x"], now=6.0)] == [1]


def test_a_pin_never_changes_by_itself_other_keys_are_evidence() -> None:
    contacts = Contacts(open_database(None))
    first = contacts.pin("bob", BOB, 1.0)
    assert first.public_key == BOB and not first.verified
    assert contacts.pin("bob", MALLORY, 2.0).public_key == BOB  # a later key: not pinned
    contacts.observe("bob", MALLORY, 3.0, source="dht", place="whois")
    contacts.observe("bob", MALLORY, 4.0, source="dht", place="whois")
    contacts.observe("bob", MALLORY, 5.0, source="message", place="mailbox")
    contacts.observe("bob", BOB, 6.0, source="dht")  # the pin itself is no evidence
    bob = contacts.get("bob")
    assert bob is not None and bob.public_key == BOB
    seen = {(e.public_key, e.source): e for e in contacts.evidence("bob")}
    assert set(seen) == {(MALLORY, "dht"), (MALLORY, "message")}
    dht = seen[MALLORY, "dht"]
    assert (dht.count, dht.first_seen, dht.last_seen, dht.place) == (2, 3.0, 4.0, "whois")
    assert contacts.observe("nobody", MALLORY, 7.0, source="dht") is None  # not pinned
    assert contacts.evidence("nobody") == []


def test_evidence_is_bounded_to_the_most_recent_keys() -> None:
    contacts = Contacts(open_database(None))
    contacts.pin("bob", BOB, 0.0)
    keys = [bytes([i]) * 32 for i in range(1, 21)]
    for i, key in enumerate(keys):
        contacts.observe("bob", key, float(i), source="lan", place="x" * 500 + "\n")
    kept = contacts.evidence("bob")
    assert [e.public_key for e in kept] == keys[::-1][:MAX_EVIDENCE_KEYS]
    assert all(len(e.place) == MAX_EVIDENCE_PLACE and e.place.isprintable() for e in kept)


def test_accept_new_installs_only_the_key_named() -> None:
    contacts = Contacts(open_database(None))
    contacts.pin("bob", BOB, 1.0)
    new, other = Identity.generate("bob"), Identity.generate("bob")
    contacts.observe("bob", new.public_key, 2.0, source="dht")
    contacts.observe("bob", other.public_key, 3.0, source="lan")
    for wrong in (fingerprint(MALLORY), "a" * 12, fingerprint(BOB), new.fingerprint[:11]):
        with pytest.raises(UsageError, match=r"nothing changed|fingerprint|already"):
            contacts.accept_new("bob", wrong, 4.0)
        assert contacts.get("bob").public_key == BOB  # type: ignore[union-attr]
    accepted, previous = contacts.accept_new("bob", new.fingerprint[:12].upper(), 5.0)
    assert previous == BOB and accepted.public_key == new.public_key and accepted.verified
    assert [e.public_key for e in contacts.evidence("bob")] == [other.public_key]
    with pytest.raises(UsageError, match="not a contact"):
        contacts.accept_new("nobody", new.fingerprint, 6.0)


def test_accept_new_refuses_an_ambiguous_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    contacts = Contacts(open_database(None))
    contacts.pin("bob", BOB, 1.0)
    # Two keys whose fingerprints share 12 characters would take 2**60 tries: fake the
    # fingerprints instead, by asking for the shortest prefix both keys share.
    one, two = Identity.generate("bob").public_key, Identity.generate("bob").public_key
    contacts.observe("bob", one, 2.0, source="dht")
    contacts.observe("bob", two, 3.0, source="dht")
    monkeypatch.setattr(messaging, "fingerprint", lambda key: "q" * 20 + fingerprint(key)[20:])
    with pytest.raises(UsageError, match="matches 2 suspected keys"):
        contacts.accept_new("bob", "q" * 12, 4.0)
    assert contacts.get("bob").public_key == BOB  # type: ignore[union-attr]


def test_a_rotation_moves_only_the_pinned_key() -> None:
    contacts = Contacts(open_database(None))
    contacts.pin("bob", BOB, 1.0)
    new = Identity.generate("bob").public_key
    assert not contacts.rotate("bob", MALLORY, new, 2.0)  # not from the pin: evidence
    assert contacts.get("bob").public_key == BOB  # type: ignore[union-attr]
    assert [e.source for e in contacts.evidence("bob")] == ["rotation"]
    assert contacts.rotate("bob", BOB, new, 3.0)
    bob = contacts.get("bob")
    assert bob is not None and (bob.public_key, bob.rotated_from, bob.rotated_at) == (new, BOB, 3.0)
    assert contacts.evidence("bob") == []  # the new key is the pin now, not a suspect


def test_old_pending_keys_become_evidence() -> None:
    conn = open_database(None)
    conn.executescript(
        "CREATE TABLE contacts (handle TEXT PRIMARY KEY, public_key BLOB NOT NULL, "
        "verified INTEGER NOT NULL DEFAULT 0, first_seen REAL NOT NULL, pending_key BLOB);"
    )
    conn.execute("INSERT INTO contacts VALUES ('bob', ?, 1, 5.0, ?)", (BOB, MALLORY))
    conn.execute("INSERT INTO contacts VALUES ('carol', ?, 0, 6.0, NULL)", (CAROL,))
    conn.commit()
    for _ in range(2):  # idempotent
        contacts = Contacts(conn)
        assert [(c.handle, c.public_key, c.verified) for c in contacts.all()] == [
            ("bob", BOB, True),
            ("carol", CAROL, False),
        ]
        (evidence,) = contacts.evidence("bob")
        assert (evidence.public_key, evidence.source) == (MALLORY, "dht")
    columns = {row[1] for row in conn.execute("PRAGMA table_info(contacts)")}
    assert "pending_key" not in columns


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
