"""The DHT's record storage: the first-claim rule, persistence, bounds, corrupt rows."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from p2pd.dht.storage import RecordStorage
from p2pd.identity import Identity
from p2pd.records import HandleRecord, Verdict, dht_key
from p2pd.store import open_database
from p2pd.wire import Address

NOW = int(time.time())


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


def test_expired_claim_frees_the_handle_and_is_culled() -> None:
    storage = RecordStorage(open_database(None))
    old = record(Identity.generate("alice"), 1, lifetime=60, now=NOW - 120)
    # accepted while it was current...
    assert storage.offer(old.key, old.encode(), now=NOW - 100) == Verdict.ACCEPT
    # ...and once expired, it is not served and another key may claim the handle
    assert storage.get(old.key) is None
    fresh = record(Identity.generate("alice"), 1)
    assert storage.offer(fresh.key, fresh.encode()) == Verdict.ACCEPT
    assert storage.cull() == 0 and len(storage) == 1


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
    conn.execute("UPDATE dht_records SET record=? WHERE key=?", (bytes(bad), records[1].key))
    conn.execute("INSERT INTO dht_records VALUES (?, ?, 0, 0)", (b"x" * 20, "not bytes"))
    conn.commit()
    conn.close()
    reopened = RecordStorage(open_database(path))
    assert reopened.get(records[0].key) == records[0].encode()
    assert reopened.get(records[2].key) == records[2].encode()
    assert reopened.get(records[1].key) is None
    assert len(reopened) == 2
    rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM dht_records").fetchone()[0]
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
    assert other.execute("SELECT COUNT(*) FROM dht_records").fetchone()[0] == 0
    assert storage.persist()
    assert other.execute("SELECT COUNT(*) FROM dht_records").fetchone()[0] == 1
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
