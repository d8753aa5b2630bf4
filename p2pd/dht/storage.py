"""Validating record storage for the DHT, in memory, persisted in SQLite when given one.

Stock kademlia stores whatever a STORE carries. Ours accepts a value only if it is a
correctly signed, current handle record filed under its own key, and then only by the
rule in :func:`p2pd.records.judge`: first claim wins, later records only from the same key
with a higher sequence number. The dicts here are the truth for reads.

Persistence shares the daemon's one SQLite connection. Writes are queued and written by
:meth:`RecordStorage.persist`, which the DHT's driver calls after each burst of datagrams;
it writes only when no transaction of someone else is open on the connection (delivery
commits a ratchet step together with its message; a DHT commit in between would commit
half of that), and otherwise leaves the rows queued for the next call.
"""

from __future__ import annotations

import bisect
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator

from ..errors import RecordError
from ..records import HandleRecord, Verdict, judge, verify_record

log = logging.getLogger(__name__)


class RecordStorage:
    def __init__(
        self,
        conn: sqlite3.Connection | None,
        *,
        max_records: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._conn = conn
        self._clock = clock
        self.max_records = max_records
        self._records: dict[bytes, HandleRecord] = {}
        self._encoded: dict[bytes, bytes] = {}
        self._replicated: dict[bytes, float] = {}
        #: Keys in numeric order, to find the records near a node id without a scan.
        self._sorted: list[bytes] = []
        #: Keys whose row must be written (or deleted, if no longer held).
        self._dirty: set[bytes] = set()
        self.refused: dict[str, int] = {}
        if conn is not None:
            self._load(conn)

    def _load(self, conn: sqlite3.Connection) -> None:
        now = self._clock()
        bad: list[bytes] = []
        for key, data, replicated in conn.execute(
            "SELECT key, record, replicated FROM dht_records"
        ):
            try:
                if not isinstance(key, bytes) or not isinstance(data, bytes):
                    raise RecordError("row of the wrong type")
                record = verify_record(data, now, key=key)
            except RecordError as exc:
                log.warning("dropping stored record that no longer verifies: %s", exc)
                bad.append(key)
                continue
            self._put(key, record, data, float(replicated) if replicated else 0.0)
        if bad:
            conn.executemany("DELETE FROM dht_records WHERE key=?", [(k,) for k in bad])
            conn.commit()

    def _put(self, key: bytes, record: HandleRecord, data: bytes, replicated: float) -> None:
        if key not in self._records:
            bisect.insort(self._sorted, key)
        self._records[key] = record
        self._encoded[key] = data
        self._replicated[key] = replicated

    def _drop(self, key: bytes) -> None:
        del self._records[key], self._encoded[key], self._replicated[key]
        index = bisect.bisect_left(self._sorted, key)
        if index < len(self._sorted) and self._sorted[index] == key:
            del self._sorted[index]
        self._dirty.add(key)

    # ------------------------------------------------------------------ rules

    def offer(self, key: bytes, value: bytes, now: float | None = None) -> str:
        """Store ``value`` under ``key`` if the rules allow; return the verdict."""
        now = self._clock() if now is None else now
        try:
            record = verify_record(value, now, key=key)
        except RecordError as exc:
            self._count(Verdict.INVALID)
            log.debug("refused record for %s: %s", key.hex(), exc)
            return Verdict.INVALID
        verdict = judge(record, self._records.get(key), now)
        if verdict == Verdict.SAME:
            # Kademlia section 2.5: whoever sent us this copy is replicating it to the
            # other k-1 closest nodes too, so we need not for the next interval. Without
            # this every holder replicates every record at the same hour: k lookups and
            # k^2 stores per record instead of about one lookup and k stores.
            self._replicated[key] = now
            self._dirty.add(key)
            return verdict
        if verdict != Verdict.ACCEPT:
            self._count(verdict)
            return verdict
        if key not in self._records and len(self._records) >= self.max_records:
            self.cull(now)
            if len(self._records) >= self.max_records:
                self._count("full")
                return "full"
        self._put(key, record, value, now)
        self._dirty.add(key)
        return verdict

    def _count(self, verdict: str) -> None:
        self.refused[verdict] = self.refused.get(verdict, 0) + 1

    def record(self, key: bytes, now: float | None = None) -> HandleRecord | None:
        now = self._clock() if now is None else now
        record = self._records.get(key)
        if record is None or record.expires <= now:
            return None
        return record

    def get(self, key: bytes, now: float | None = None) -> bytes | None:
        """The encoded record under ``key``, if we hold a current one."""
        if self.record(key, now) is None:
            return None
        return self._encoded[key]

    def cull(self, now: float | None = None) -> int:
        """Forget expired records; returns how many."""
        now = self._clock() if now is None else now
        dead = [k for k, r in self._records.items() if r.expires <= now]
        for key in dead:
            self._drop(key)
        return len(dead)

    def mark_replicated(self, key: bytes, now: float | None = None) -> None:
        if key in self._replicated:
            self._replicated[key] = self._clock() if now is None else now
            self._dirty.add(key)

    def older_than(self, seconds_old: float, now: float | None = None) -> list[tuple[bytes, bytes]]:
        """Records not replicated for ``seconds_old`` seconds (Kademlia's republish)."""
        now = self._clock() if now is None else now
        return [
            (key, self._encoded[key])
            for key, when in self._replicated.items()
            if now - when >= seconds_old and self._records[key].expires > now
        ]

    def near(self, node_id: bytes, count: int) -> list[tuple[bytes, bytes]]:
        """Up to ``2 * count`` current records whose keys are numerically nearest to
        ``node_id`` (a cheap stand-in for "XOR-nearest": both agree on the leading bits)."""
        now = self._clock()
        index = bisect.bisect_left(self._sorted, node_id)
        keys = self._sorted[max(0, index - count) : index + count]
        return [(k, self._encoded[k]) for k in keys if self._records[k].expires > now]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        now = self._clock()
        return iter([(k, self._encoded[k]) for k, r in self._records.items() if r.expires > now])

    # ------------------------------------------------------------------ persistence

    def persist(self) -> bool:
        """Write queued rows, unless another transaction is open on the connection.
        Returns whether nothing is left queued."""
        conn = self._conn
        if conn is None:
            self._dirty.clear()
            return True
        if not self._dirty:
            return True
        if conn.in_transaction:
            return False
        keys, self._dirty = self._dirty, set()
        upserts = [
            (k, self._encoded[k], self._records[k].expires, self._replicated[k])
            for k in keys
            if k in self._records
        ]
        deletes = [(k,) for k in keys if k not in self._records]
        with conn:
            if upserts:
                conn.executemany(
                    "INSERT INTO dht_records(key, record, expires, replicated) VALUES(?,?,?,?) "
                    "ON CONFLICT(key) DO UPDATE SET record=excluded.record, "
                    "expires=excluded.expires, replicated=excluded.replicated",
                    upserts,
                )
            if deletes:
                conn.executemany("DELETE FROM dht_records WHERE key=?", deletes)
        return True
