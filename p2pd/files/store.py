"""File transfers at rest: one table on the daemon's shared SQLite connection.

``file_transfers`` holds both directions. For an incoming transfer, ``next_group`` is
the first group not yet verified and recorded: every group before it is in the partial
file and matched its hash, so a restart (or kill -9) resumes there. The row holds the
offer, and with it the per-file key: as secret as the messages' text, it is sealed
under the storage key when the database is encrypted at rest (p2pd/at_rest.py; the
database is mode 0600 either way). A row whose offer does not open is skipped by
listings, counted and logged, and left as it is.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from ..at_rest import CLEAR, AtRest
from ..errors import StoredDataCorrupt
from .protocol import HASH_LEN, Offer

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS file_transfers (
    id BLOB PRIMARY KEY,
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    peer_key BLOB NOT NULL,
    handle TEXT NOT NULL,
    offer BLOB NOT NULL,
    state TEXT NOT NULL,
    path TEXT NOT NULL DEFAULT '',
    directory TEXT NOT NULL DEFAULT '',
    next_group INTEGER NOT NULL DEFAULT 0,
    hashes BLOB,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    resent INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS file_transfers_state ON file_transfers (direction, state);
"""

#: States. Outgoing: offered (the offer is queued or delivered, no bytes asked for yet),
#: sending, done, rejected, cancelled, failed. Incoming: pending (waits for `accept`),
#: accepted (bytes flow when the sender connects), done, rejected, cancelled, failed.
ACTIVE_OUT = ("offered", "sending")
#: Transfers a quota check reads at most (FileStore.accepted_bytes_since).
QUOTA_ROWS = 10_000
ACTIVE_IN = ("accepted",)
FINAL = ("done", "rejected", "cancelled", "failed")


@dataclass(frozen=True, slots=True)
class Transfer:
    id: bytes
    direction: str
    peer_key: bytes
    handle: str
    offer: Offer
    state: str
    #: Outgoing: the source file. Incoming: the final path once done.
    path: str
    #: Incoming: where it is (to be) saved.
    directory: str
    next_group: int
    hashes: list[bytes] | None
    bytes_done: int
    resent: int
    refused: int
    error: str
    created: float
    updated: float


_COLUMNS = (
    "id, direction, peer_key, handle, offer, state, path, directory, next_group, hashes, "
    "bytes_done, resent, refused, error, created, updated"
)


def _split(blob: bytes | None) -> list[bytes] | None:
    if blob is None:
        return None
    return [blob[i : i + HASH_LEN] for i in range(0, len(blob), HASH_LEN)]


class FileStore:
    """Reads and writes ``file_transfers``; every write commits (the connection is
    shared, and a transfer's progress must survive a kill -9)."""

    def __init__(self, conn: sqlite3.Connection, *, at_rest: AtRest = CLEAR) -> None:
        self._conn = conn
        self._at_rest = at_rest
        #: Rows whose offer did not open (damaged, moved, another key): skipped.
        self.unreadable_rows = 0
        conn.executescript(_SCHEMA)
        conn.commit()

    def _rows(self, rows: list[Any]) -> list[Transfer]:
        out = []
        for row in rows:
            try:
                out.append(self._row(row))
            except StoredDataCorrupt as exc:
                self.unreadable_rows += 1
                log.warning("file transfer %s skipped: %s", bytes(row[0]).hex()[:16], exc)
        return out

    def _row(self, row: tuple[Any, ...]) -> Transfer:
        return Transfer(
            bytes(row[0]),
            row[1],
            bytes(row[2]),
            row[3],
            Offer.decode(self._at_rest.open("file_transfers", "offer", bytes(row[0]), row[4])),
            row[5],
            row[6],
            row[7],
            int(row[8]),
            _split(row[9]),
            int(row[10]),
            int(row[11]),
            int(row[12]),
            row[13],
            float(row[14]),
            float(row[15]),
        )

    def add(
        self,
        *,
        direction: str,
        peer_key: bytes,
        handle: str,
        offer: Offer,
        state: str,
        now: float,
        path: str = "",
        directory: str = "",
        hashes: list[bytes] | None = None,
    ) -> bool:
        """A new transfer; False if its id is known already (a repeated offer)."""
        try:
            with self._conn:
                self._conn.execute(
                    f"INSERT INTO file_transfers ({_COLUMNS}) "
                    "VALUES (?,?,?,?,?,?,?,?,0,?,0,0,0,'',?,?)",
                    (
                        offer.transfer_id,
                        direction,
                        peer_key,
                        handle,
                        self._at_rest.seal(
                            "file_transfers", "offer", offer.transfer_id, offer.encode()
                        ),
                        state,
                        path,
                        directory,
                        None if hashes is None else b"".join(hashes),
                        now,
                        now,
                    ),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def get(self, transfer_id: bytes) -> Transfer | None:
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM file_transfers WHERE id=?", (transfer_id,)
        ).fetchone()
        return None if row is None else self._row(row)

    def by_prefix(self, prefix: str) -> list[Transfer]:
        """Transfers whose id in hex starts with ``prefix`` (the CLI's short ids)."""
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM file_transfers WHERE hex(id) LIKE ? LIMIT 2",
            (prefix.upper() + "%",),
        ).fetchall()
        return self._rows(rows)

    def all(self, limit: int = 1000) -> list[Transfer]:
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM file_transfers ORDER BY created DESC LIMIT ?", (limit,)
        ).fetchall()
        return self._rows(rows)

    def active(self, direction: str) -> list[Transfer]:
        states = ACTIVE_OUT if direction == "out" else ACTIVE_IN
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM file_transfers WHERE direction=? AND state IN "
            f"({','.join('?' * len(states))})",
            (direction, *states),
        ).fetchall()
        return self._rows(rows)

    def count_pending(self, peer_key: bytes | None = None) -> int:
        """Incoming offers waiting for `accept`, from ``peer_key`` or from anyone."""
        sql = "SELECT COUNT(*) FROM file_transfers WHERE direction='in' AND state='pending'"
        if peer_key is None:
            return int(self._conn.execute(sql).fetchone()[0])
        return int(self._conn.execute(sql + " AND peer_key=?", (peer_key,)).fetchone()[0])

    def accepted_bytes_since(self, since: float, peer_key: bytes) -> tuple[int, int]:
        """Bytes of incoming files accepted (at once or by `accept`) since ``since``: from
        ``peer_key``, and from anyone; one query. Looks at no more than QUOTA_ROWS
        transfers: beyond that it answers "more than any quota" (a bounded query,
        whatever contacts sent)."""
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM file_transfers WHERE direction='in' AND created>=? "
            "AND state NOT IN ('pending', 'rejected') LIMIT ?",
            (since, QUOTA_ROWS + 1),
        ).fetchall()
        if len(rows) > QUOTA_ROWS:
            return 1 << 62, 1 << 62
        transfers = self._rows(rows)
        mine = sum(t.offer.size for t in transfers if t.peer_key == peer_key)
        return mine, sum(t.offer.size for t in transfers)

    def update(self, transfer_id: bytes, now: float, **fields: Any) -> None:
        allowed = {
            "state",
            "path",
            "directory",
            "next_group",
            "bytes_done",
            "error",
            "resent",
            "refused",
        }
        if set(fields) - allowed:
            raise ValueError(f"cannot update {set(fields) - allowed}")
        sets = ", ".join(f"{name}=?" for name in fields)
        with self._conn:
            self._conn.execute(
                f"UPDATE file_transfers SET {sets}, updated=? WHERE id=?",
                (*fields.values(), now, transfer_id),
            )

    def add_counts(self, transfer_id: bytes, *, resent: int = 0, refused: int = 0) -> None:
        with self._conn:
            self._conn.execute(
                "UPDATE file_transfers SET resent=resent+?, refused=refused+? WHERE id=?",
                (resent, refused, transfer_id),
            )

    def set_hashes(self, transfer_id: bytes, hashes: list[bytes]) -> None:
        with self._conn:
            self._conn.execute(
                "UPDATE file_transfers SET hashes=? WHERE id=?", (b"".join(hashes), transfer_id)
            )
