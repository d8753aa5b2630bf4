"""Validating claim storage for the DHT, in memory, persisted in SQLite when given one.

Stock kademlia stores whatever a STORE carries. Ours accepts a value only if it is a
correctly signed handle record (version 2) filed under its own key, and then only by the
rule in :func:`p2pd.records.judge`: the first claim seen here wins; later records only
from the same key with a higher sequence number, or from the key a verified rotation
notice moves the handle to. The dicts here are the truth for reads.

A claim (handle -> key) outlives the record's presence (its addresses): it is kept and
served until :func:`p2pd.records.claim_ends`, a year after its last refresh, so an owner
offline for a month keeps the handle and its republish is accepted. For each claim this
replica also keeps ``first_seen``, its own wall-clock time when it first accepted a claim
by that key (carried over a rotation), which it states in every find_value reply.

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
from dataclasses import dataclass

from ..errors import RecordError
from ..records import (
    OLD_VERSION_REFUSED,
    HandleRecord,
    Verdict,
    claim_ends,
    judge,
    verify_claim,
)
from .budget import FULL_CULL_INTERVAL, SourceQuota

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Claim:
    record: HandleRecord
    encoded: bytes
    #: Our wall clock when we first accepted a claim by this key (kept over a rotation).
    first_seen: float
    #: Our wall clock when we last accepted a new record (ACCEPT or ROTATED) of this key.
    refreshed: float
    #: When we last replicated it (or heard it replicated: Kademlia section 2.5).
    replicated: float

    def alive(self, now: float) -> bool:
        return claim_ends(self.record, self.refreshed) > now


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
        self._claims: dict[bytes, _Claim] = {}
        #: Keys in numeric order, to find the records near a node id without a scan.
        self._sorted: list[bytes] = []
        #: Keys whose row must be written (or deleted, if no longer held).
        self._dirty: set[bytes] = set()
        #: Offers refused, by verdict ("old-version": version-1 records, logged at debug).
        self.refused: dict[str, int] = {}
        #: Claims that moved to a new key by a rotation notice.
        self.rotated = 0
        #: New records per source (address, /24|/48) held here; the core sets its budget.
        self.quota: SourceQuota | None = None
        #: When a full store last culled: a cull walks every claim, so a flood of stores
        #: at a full node culls at most once per FULL_CULL_INTERVAL, not once each.
        self._full_culled = -FULL_CULL_INTERVAL
        if conn is not None:
            self._load(conn)

    def _load(self, conn: sqlite3.Connection) -> None:
        now = self._clock()
        legacy = conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='dht_records'"
        ).fetchone()
        if legacy is not None:
            (count,) = conn.execute("SELECT count(*) FROM dht_records").fetchone()
            log.warning(
                "dropping %d stored DHT record(s) of version 1 (an older p2pd): "
                "no longer accepted; their owners republish version 2",
                count,
            )
            conn.execute("DROP TABLE dht_records")
            conn.commit()
        bad: list[bytes] = []
        for key, data, first_seen, refreshed, replicated in conn.execute(
            "SELECT key, record, first_seen, refreshed, replicated FROM dht_claims"
        ):
            try:
                if not isinstance(key, bytes) or not isinstance(data, bytes):
                    raise RecordError("row of the wrong type")
                if not all(isinstance(t, int | float) for t in (first_seen, refreshed)):
                    raise RecordError("row of the wrong type")
                record = verify_claim(data, now, key=key)
                claim = _Claim(
                    record,
                    data,
                    float(first_seen),
                    float(refreshed),
                    float(replicated) if isinstance(replicated, int | float) else 0.0,
                )
                if not claim.alive(now):
                    raise RecordError("the claim's lifetime has ended")
            except RecordError as exc:
                log.warning("dropping stored record that no longer verifies: %s", exc)
                bad.append(key)
                continue
            self._put(key, claim)
        if bad:
            conn.executemany("DELETE FROM dht_claims WHERE key=?", [(k,) for k in bad])
            conn.commit()

    def _put(self, key: bytes, claim: _Claim) -> None:
        if key not in self._claims:
            bisect.insort(self._sorted, key)
        self._claims[key] = claim

    def _drop(self, key: bytes) -> None:
        del self._claims[key]
        if self.quota is not None:
            self.quota.release(key)
        index = bisect.bisect_left(self._sorted, key)
        if index < len(self._sorted) and self._sorted[index] == key:
            del self._sorted[index]
        self._dirty.add(key)

    def _alive(self, key: bytes, now: float) -> _Claim | None:
        claim = self._claims.get(key)
        return claim if claim is not None and claim.alive(now) else None

    # ------------------------------------------------------------------ rules

    def offer(
        self, key: bytes, value: bytes, now: float | None = None, *, source: str | None = None
    ) -> str:
        """Store ``value`` under ``key`` if the rules allow; return the verdict. A new key
        from a ``source`` (the sender's IP address) counts against its quota, checked
        before the record's signature."""
        now = self._clock() if now is None else now
        quota = self.quota if source is not None else None
        if quota is not None and key not in self._claims and not quota.admits(source or ""):
            self._count("quota")
            return "quota"
        try:
            record = verify_claim(value, now, key=key)
        except RecordError as exc:
            old = str(exc) == OLD_VERSION_REFUSED
            verdict = Verdict.OLD_VERSION if old else Verdict.INVALID
            self._count(verdict)
            log.debug("refused record for %s: %s", key.hex(), exc)
            return verdict
        held = self._alive(key, now)
        verdict = judge(record, held.record if held is not None else None)
        if verdict == Verdict.SAME:
            assert held is not None
            # Kademlia section 2.5: whoever sent us this copy is replicating it to the
            # other k-1 closest nodes too, so we need not for the next interval. Without
            # this every holder replicates every record at the same hour: k lookups and
            # k^2 stores per record instead of about one lookup and k stores. A copy is
            # not a refresh of the claim: only a new record from its key is.
            held.replicated = now
            self._dirty.add(key)
            return verdict
        if verdict not in (Verdict.ACCEPT, Verdict.ROTATED):
            self._count(verdict)
            return verdict
        if key not in self._claims and len(self._claims) >= self.max_records:
            if now - self._full_culled >= FULL_CULL_INTERVAL:
                self._full_culled = now
                self.cull(now)
            if len(self._claims) >= self.max_records:
                self._count("full")
                return "full"
        first_seen = now if held is None else held.first_seen
        if verdict == Verdict.ROTATED:
            self.rotated += 1
            log.info("claim under %s rotated to a new key by its notice", key.hex())
        if quota is not None and key not in self._claims:
            quota.charge(key, source or "")
        self._put(key, _Claim(record, value, first_seen, now, now))
        self._dirty.add(key)
        return verdict

    def _count(self, verdict: str) -> None:
        self.refused[verdict] = self.refused.get(verdict, 0) + 1

    def record(self, key: bytes, now: float | None = None) -> HandleRecord | None:
        """The claim held under ``key`` while it is alive (its presence may be stale)."""
        claim = self._alive(key, self._clock() if now is None else now)
        return None if claim is None else claim.record

    def get(self, key: bytes, now: float | None = None) -> bytes | None:
        """The encoded claim under ``key``, while it is alive."""
        claim = self._alive(key, self._clock() if now is None else now)
        return None if claim is None else claim.encoded

    def first_seen(self, key: bytes, now: float | None = None) -> int | None:
        """When this replica first accepted a claim by the key it holds under ``key``
        (Unix seconds, its own clock), while the claim is alive."""
        claim = self._alive(key, self._clock() if now is None else now)
        return None if claim is None else int(claim.first_seen)

    def cull(self, now: float | None = None) -> int:
        """Forget claims whose lifetime ended; returns how many."""
        now = self._clock() if now is None else now
        dead = [k for k, c in self._claims.items() if not c.alive(now)]
        for key in dead:
            self._drop(key)
        return len(dead)

    def mark_replicated(self, key: bytes, now: float | None = None) -> None:
        claim = self._claims.get(key)
        if claim is not None:
            claim.replicated = self._clock() if now is None else now
            self._dirty.add(key)

    def older_than(self, seconds_old: float, now: float | None = None) -> list[tuple[bytes, bytes]]:
        """Claims not replicated for ``seconds_old`` seconds (Kademlia's republish)."""
        now = self._clock() if now is None else now
        return [
            (key, c.encoded)
            for key, c in self._claims.items()
            if now - c.replicated >= seconds_old and c.alive(now)
        ]

    def near(self, node_id: bytes, count: int) -> list[tuple[bytes, bytes]]:
        """Up to ``2 * count`` live claims whose keys are numerically nearest to
        ``node_id`` (a cheap stand-in for "XOR-nearest": both agree on the leading bits)."""
        now = self._clock()
        index = bisect.bisect_left(self._sorted, node_id)
        keys = self._sorted[max(0, index - count) : index + count]
        return [(k, self._claims[k].encoded) for k in keys if self._claims[k].alive(now)]

    def __len__(self) -> int:
        return len(self._claims)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        now = self._clock()
        return iter([(k, c.encoded) for k, c in self._claims.items() if c.alive(now)])

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
        claims = self._claims
        upserts = [
            (k, c.encoded, c.first_seen, c.refreshed, c.replicated)
            for k in keys
            if (c := claims.get(k)) is not None
        ]
        deletes = [(k,) for k in keys if k not in claims]
        with conn:
            if upserts:
                conn.executemany(
                    "INSERT INTO dht_claims(key, record, first_seen, refreshed, replicated) "
                    "VALUES(?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET "
                    "record=excluded.record, first_seen=excluded.first_seen, "
                    "refreshed=excluded.refreshed, replicated=excluded.replicated",
                    upserts,
                )
            if deletes:
                conn.executemany("DELETE FROM dht_claims WHERE key=?", deletes)
        return True
