"""Validating record storage for the DHT (kademlia's ``IStorage``), persisted in SQLite.

Stock kademlia stores whatever a STORE carries. Ours accepts a value only if it is a
correctly signed, current handle record filed under its own key, and then only by the
rule in :func:`p2pd.records.judge`: first claim wins, later records only from the same key
with a higher sequence number. Records live in a dict for reads and in SQLite for restarts.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator

from kademlia.storage import IStorage

from ..errors import RecordError
from ..records import HandleRecord, Verdict, judge, verify_record

log = logging.getLogger(__name__)


class RecordStorage(IStorage):  # type: ignore[misc]
    def __init__(
        self,
        conn: sqlite3.Connection,
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
        self.refused: dict[str, int] = {}
        self._load()

    def _load(self) -> None:
        now = self._clock()
        bad: list[bytes] = []
        for key, data, replicated in self._conn.execute(
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
            self._records[key] = record
            self._encoded[key] = data
            self._replicated[key] = float(replicated) if replicated else 0.0
        if bad:
            self._conn.executemany("DELETE FROM dht_records WHERE key=?", [(k,) for k in bad])
            self._conn.commit()

    # ------------------------------------------------------------------ our interface

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
            return verdict
        if verdict != Verdict.ACCEPT:
            self._count(verdict)
            return verdict
        if key not in self._records and len(self._records) >= self.max_records:
            self.cull(now)
            if len(self._records) >= self.max_records:
                self._count("full")
                return "full"
        self._records[key] = record
        self._encoded[key] = value
        self._replicated[key] = now
        self._conn.execute(
            "INSERT INTO dht_records(key, record, expires, replicated) VALUES(?,?,?,?) "
            "ON CONFLICT(key) DO UPDATE SET record=excluded.record, "
            "expires=excluded.expires, replicated=excluded.replicated",
            (key, value, record.expires, now),
        )
        self._conn.commit()
        return verdict

    def _count(self, verdict: str) -> None:
        self.refused[verdict] = self.refused.get(verdict, 0) + 1

    def record(self, key: bytes, now: float | None = None) -> HandleRecord | None:
        now = self._clock() if now is None else now
        record = self._records.get(key)
        if record is None or record.expires <= now:
            return None
        return record

    def cull(self, now: float | None = None) -> int:
        """Forget expired records; returns how many."""
        now = self._clock() if now is None else now
        dead = [k for k, r in self._records.items() if r.expires <= now]
        for key in dead:
            del self._records[key], self._encoded[key], self._replicated[key]
        if dead:
            self._conn.executemany("DELETE FROM dht_records WHERE key=?", [(k,) for k in dead])
            self._conn.commit()
        return len(dead)

    def mark_replicated(self, key: bytes, now: float | None = None) -> None:
        if key in self._replicated:
            self._replicated[key] = self._clock() if now is None else now

    def __len__(self) -> int:
        return len(self._records)

    # ------------------------------------------------------------------ IStorage

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.offer(key, value)

    def __getitem__(self, key: bytes) -> bytes:
        if self.record(key) is None:
            raise KeyError(key)
        return self._encoded[key]

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        if self.record(key) is None:
            return default
        return self._encoded[key]

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        """Records not replicated for ``seconds_old`` seconds (kademlia's republish)."""
        now = self._clock()
        return [
            (key, self._encoded[key])
            for key, when in self._replicated.items()
            if now - when >= seconds_old and self._records[key].expires > now
        ]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        now = self._clock()
        return iter([(k, self._encoded[k]) for k, r in self._records.items() if r.expires > now])
