"""The DHT's claim storage: the first-claim rule, claims that outlive their presence,
rotation, first-seen receipts, persistence, bounds, corrupt and version-1 rows."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from p2pd.dht.storage import RecordStorage
from p2pd.identity import Identity
from p2pd.records import CLAIM_LIFETIME, HandleRecord, Verdict, dht_key
from p2pd.rotation import RotationNotice
from p2pd.store import open_database
from p2pd.wire import Address

NOW = int(time.time())
DAY = 24 * 3600


def record(identity: Identity, seq: int, lifetime: int = 3600, now: int = NOW) -> HandleRecord:
    return HandleRecord.create(
        identity, [Address("127.0.0.1", 4000 + seq)], seq=seq, now=now, lifetime=lifetime
    )


def test_first_claim_then_only_higher_seq_from_same_key(tmp_path: Path) -> None:
    storage = RecordStorage(open_database(tmp_path / "db"))
    alice = Identity.generate("alice")
    usurper = Identity.generate("alice")
    r1, r2 = record(alice, 1), record(alice, 2)
    assert storage.offer(r1.key, r1.encode()) == Verdict.ACCEPT
    assert storage.offer(r1.key, r1.encode()) == Verdict.SAME
    assert storage.offer(r2.key, r2.encode()) == Verdict.ACCEPT
    assert storage.offer(r1.key, r1.encode()) == Verdict.STALE
    other = record(usurper, 99)
    assert storage.offer(other.key, other.encode()) == Verdict.OTHER_KEY
    assert storage.get(r1.key) == r2.encode()
    assert storage.refused == {Verdict.STALE: 1, Verdict.OTHER_KEY: 1}


def test_refuses_records_filed_under_another_key_or_garbage(tmp_path: Path) -> None:
    storage = RecordStorage(open_database(None))
    r = record(Identity.generate("alice"), 1)
    assert storage.offer(dht_key("bob"), r.encode()) == Verdict.INVALID
    assert storage.offer(r.key, b"garbage") == Verdict.INVALID
    assert storage.offer(r.key, r.encode()[:-1] + bytes([r.encode()[-1] ^ 1])) == Verdict.INVALID
    assert len(storage) == 0


def test_an_owner_offline_past_its_presence_keeps_the_handle() -> None:
    """The presence (a day) ends, the claim does not: a rival is refused a month later,
    the claim is still served, and the owner's republish after the month is accepted."""
    clock = [float(NOW)]
    storage = RecordStorage(open_database(None), clock=lambda: clock[0])
    alice = Identity.generate("alice")
    r1 = record(alice, 1, lifetime=DAY)
    assert storage.offer(r1.key, r1.encode()) == Verdict.ACCEPT
    clock[0] += 30 * DAY
    assert storage.get(r1.key) == r1.encode()  # served: a claim, with stale addresses
    assert storage.cull() == 0
    rival = record(Identity.generate("alice"), 9, lifetime=DAY, now=int(clock[0]))
    assert storage.offer(rival.key, rival.encode()) == Verdict.OTHER_KEY
    back = record(alice, 2, lifetime=DAY, now=int(clock[0]))
    assert storage.offer(back.key, back.encode()) == Verdict.ACCEPT
    assert storage.get(r1.key) == back.encode()
    assert storage.first_seen(r1.key) == NOW  # the first claim by this key, kept


def test_a_claim_ends_a_year_after_its_last_refresh() -> None:
    clock = [float(NOW)]
    storage = RecordStorage(open_database(None), clock=lambda: clock[0])
    r = record(Identity.generate("alice"), 1, lifetime=DAY)
    assert storage.offer(r.key, r.encode()) == Verdict.ACCEPT
    clock[0] += CLAIM_LIFETIME - 1
    assert storage.get(r.key) == r.encode()
    # a copy handed on by another replica is not a refresh
    assert storage.offer(r.key, r.encode()) == Verdict.SAME
    clock[0] += 1
    assert storage.get(r.key) is None
    assert storage.first_seen(r.key) is None
    rival = record(Identity.generate("alice"), 1, lifetime=DAY, now=int(clock[0]))
    assert storage.offer(rival.key, rival.encode()) == Verdict.ACCEPT
    assert storage.first_seen(r.key) == int(clock[0])
    assert storage.cull() == 0 and len(storage) == 1


def test_an_old_claim_handed_on_by_a_replica_does_not_live_longer_here() -> None:
    """A new replica receiving a months-old claim counts its year from the record's issue
    time, not from its receipt: replication alone cannot keep a claim alive forever."""
    # A fixed clock: NOW was read when the module was imported, maybe minutes ago.
    storage = RecordStorage(open_database(None), clock=lambda: float(NOW))
    r = record(Identity.generate("alice"), 1, lifetime=DAY, now=NOW - CLAIM_LIFETIME + 60)
    assert storage.offer(r.key, r.encode()) == Verdict.ACCEPT
    assert storage.get(r.key) == r.encode()
    assert storage.get(r.key, now=NOW + 60) is None


def test_a_rotation_notice_lets_the_new_key_replace_the_claim() -> None:
    clock = [float(NOW)]
    storage = RecordStorage(open_database(None), clock=lambda: clock[0])
    old, new = Identity.generate("alice"), Identity.generate("alice")
    r1 = record(old, 5)
    storage.offer(r1.key, r1.encode())
    clock[0] += DAY
    notice = RotationNotice.create(old, new, now=int(clock[0])).encode()
    moved = HandleRecord.create(new, [], seq=0, now=int(clock[0]), lifetime=DAY, rotation=notice)
    assert storage.offer(moved.key, moved.encode()) == Verdict.ROTATED
    assert storage.get(r1.key) == moved.encode()
    assert storage.first_seen(r1.key) == NOW  # carried over: the handle is held since then
    assert storage.rotated == 1
    # the old key cannot take it back
    r2 = record(old, 6, now=int(clock[0]))
    assert storage.offer(r2.key, r2.encode()) == Verdict.OTHER_KEY


def test_a_forged_rotation_notice_does_not_move_the_claim() -> None:
    storage = RecordStorage(open_database(None))
    owner, mallory, stranger = (Identity.generate("alice") for _ in range(3))
    held = record(owner, 1)
    storage.offer(held.key, held.encode())
    # mallory's notice from a key mallory holds, not from the owner's
    own = RotationNotice.create(stranger, mallory, now=NOW).encode()
    r = HandleRecord.create(mallory, [], seq=1, now=NOW, lifetime=DAY, rotation=own)
    assert storage.offer(r.key, r.encode()) == Verdict.OTHER_KEY
    # a notice naming the owner's key whose old-key signature is not the owner's
    real = RotationNotice.create(owner, mallory, now=NOW)
    fake = RotationNotice(
        real.handle, real.old_key, real.new_key, real.issued,
        RotationNotice.create(stranger, mallory, now=NOW).old_signature, real.new_signature,
    ).encode()  # fmt: skip
    r = HandleRecord.create(mallory, [], seq=1, now=NOW, lifetime=DAY, rotation=fake)
    assert storage.offer(r.key, r.encode()) == Verdict.INVALID
    assert storage.get(held.key) == held.encode()


def test_first_seen_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "p2pd.db"
    clock = [float(NOW)]
    storage = RecordStorage(open_database(path), clock=lambda: clock[0])
    alice = Identity.generate("alice")
    r1 = record(alice, 1)
    storage.offer(r1.key, r1.encode())
    clock[0] += 40 * DAY
    r2 = record(alice, 2, now=int(clock[0]))
    storage.offer(r2.key, r2.encode())
    assert storage.persist()
    reopened = RecordStorage(open_database(path), clock=lambda: clock[0])
    assert reopened.get(r1.key) == r2.encode()
    assert reopened.first_seen(r1.key) == NOW


def test_version_1_records_are_refused_and_their_old_table_dropped(tmp_path: Path) -> None:
    path = tmp_path / "p2pd.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE dht_records (key BLOB PRIMARY KEY, record BLOB NOT NULL, "
        "expires INTEGER NOT NULL, replicated REAL NOT NULL)"
    )
    r = record(Identity.generate("alice"), 1)
    v1 = bytearray(r.encode())
    v1[4] = 1
    conn.execute("INSERT INTO dht_records VALUES (?, ?, ?, 0)", (r.key, bytes(v1), r.expires))
    conn.commit()
    conn.close()
    storage = RecordStorage(open_database(path))
    assert len(storage) == 0
    tables = {row[0] for row in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    assert "dht_records" not in tables and "dht_claims" in tables
    assert storage.offer(r.key, bytes(v1)) == Verdict.OLD_VERSION
    assert storage.refused == {Verdict.OLD_VERSION: 1}


def test_records_survive_a_restart_and_corrupt_rows_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "p2pd.db"
    storage = RecordStorage(open_database(path))
    ids = [Identity.generate(f"user{i}") for i in range(3)]
    records = [record(i, 1) for i in ids]
    for r in records:
        storage.offer(r.key, r.encode())
    assert storage.persist()  # the DHT's driver calls this after each burst
    # damage one row behind the storage's back
    conn = sqlite3.connect(path)
    bad = bytearray(records[1].encode())
    bad[-5] ^= 0xFF
    conn.execute("UPDATE dht_claims SET record=? WHERE key=?", (bytes(bad), records[1].key))
    conn.execute("INSERT INTO dht_claims VALUES (?, ?, 0, 0, 0)", (b"x" * 20, "not bytes"))
    conn.commit()
    conn.close()
    reopened = RecordStorage(open_database(path))
    assert reopened.get(records[0].key) == records[0].encode()
    assert reopened.get(records[2].key) == records[2].encode()
    assert reopened.get(records[1].key) is None
    assert len(reopened) == 2
    rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM dht_claims").fetchone()[0]
    assert rows == 2  # the damaged rows are gone from disk too
    assert (path.stat().st_mode & 0o777) == 0o600


def test_capacity_is_bounded() -> None:
    storage = RecordStorage(open_database(None), max_records=3)
    records = [record(Identity.generate(f"user{i}"), 1) for i in range(5)]
    verdicts = [storage.offer(r.key, r.encode()) for r in records]
    assert verdicts.count(Verdict.ACCEPT) == 3
    assert verdicts[3:] == ["full", "full"]
    assert len(storage) == 3


def test_writes_wait_while_another_transaction_is_open(tmp_path: Path) -> None:
    """The daemon shares one connection: a DHT commit in the middle of delivery's
    transaction would commit half of it, so the rows wait for the next persist()."""
    path = tmp_path / "p2pd.db"
    conn = open_database(path)
    storage = RecordStorage(conn)
    r = record(Identity.generate("alice"), 1)
    conn.execute("BEGIN")
    conn.execute("INSERT INTO meta(key, value) VALUES ('delivery', 'half done')")
    assert storage.offer(r.key, r.encode()) == Verdict.ACCEPT
    assert storage.get(r.key) == r.encode()  # served at once from memory
    assert not storage.persist()  # ...but not written inside someone else's transaction
    conn.rollback()  # delivery changes its mind: its row goes, and nothing of ours went
    other = sqlite3.connect(path)
    assert other.execute("SELECT COUNT(*) FROM dht_claims").fetchone()[0] == 0
    assert storage.persist()
    assert other.execute("SELECT COUNT(*) FROM dht_claims").fetchone()[0] == 1
    assert other.execute("SELECT COUNT(*) FROM meta WHERE key='delivery'").fetchone()[0] == 0


def test_a_copy_received_again_postpones_our_own_replication() -> None:
    """Kademlia 2.5: a node that was just sent a record by a replicating peer does not
    replicate it itself for the next interval; only the first holder to notice does."""
    clock = [float(NOW)]
    storage = RecordStorage(open_database(None), clock=lambda: clock[0])
    r = record(Identity.generate("alice"), 1, lifetime=7200)
    assert storage.offer(r.key, r.encode()) == Verdict.ACCEPT
    clock[0] += 3000
    assert storage.older_than(3600, now=clock[0] + 700) == [(r.key, r.encode())]
    assert storage.offer(r.key, r.encode()) == Verdict.SAME  # a peer replicates it to us
    assert storage.older_than(3600, now=clock[0] + 700) == []
    assert storage.older_than(3600, now=clock[0] + 3600) == [(r.key, r.encode())]
