"""File transfers at rest: one table on the daemon's shared SQLite connection.

``file_transfers`` holds both directions. For an incoming transfer, ``next_group`` is
the first group not yet verified and recorded: every group before it is in the partial
file and matched its hash, so a restart (or kill -9) resumes there. The row holds the
offer, and with it the per-file key: as secret as the messages' text, it is sealed
under the storage key when the database is encrypted at rest (p2pd/at_rest.py; the
database is mode 0600 either way). A row whose offer does not open, or whose
``refuse_reason`` is not one this version knows, is skipped by listings, counted and
logged, and left as it is.

``refuse_reason`` is what the receiver answers the sender's next OPEN of a failed
incoming transfer (REFUSE 4, their data did not verify; REFUSE 6, our disk cannot save
it), recorded when it fails. Tables from before it (no such column) get it at open,
filled in for failed incoming rows from their error text, the only place that text is
read for it.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from ..at_rest import CLEAR, AtRest
from ..errors import StoredDataCorrupt
from .protocol import HASH_LEN, REASON_CANNOT_SAVE, REASON_CORRUPT, REASONS, Offer

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
    updated REAL NOT NULL,
    refuse_reason INTEGER);
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
#: How the errors of incoming transfers that failed on our disk began before
#: ``refuse_reason`` was stored (the migration reads them once; nothing else does).
_SAVE_ERRORS_BEFORE = ("cannot write to %", "cannot save: %")


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
    #: Incoming, failed: the REFUSE reason the sender's next OPEN gets (None: not set).
    refuse_reason: int | None = None


_COLUMNS = (
    "id, direction, peer_key, handle, offer, state, path, directory, next_group, hashes, "
    "bytes_done, resent, refused, error, created, updated, refuse_reason"
)


def _migrate(conn: sqlite3.Connection) -> None:
    """Idempotent: a table from before ``refuse_reason`` gets the column, and its failed
    incoming rows the reason the daemon then chose from their error text."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(file_transfers)")}
    if "refuse_reason" in columns:
        return
    conn.execute("ALTER TABLE file_transfers ADD COLUMN refuse_reason INTEGER")
    conn.execute(
        "UPDATE file_transfers SET refuse_reason = CASE WHEN error LIKE ? OR error LIKE ? "
        "THEN ? ELSE ? END WHERE direction='in' AND state='failed'",
        (*_SAVE_ERRORS_BEFORE, REASON_CANNOT_SAVE, REASON_CORRUPT),
    )


def _refuse_reason(value: object) -> int | None:
    # type() and not isinstance(): SQLite hands back what was stored, and a bool or a
    # float 6.0 in this column is damage, not a reason.
    if value is None or (type(value) is int and value in REASONS):
        return value
    raise StoredDataCorrupt(f"refuse_reason {value!r} is not a reason this version knows")


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
        _migrate(conn)
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
            _refuse_reason(row[16]),
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
                    "VALUES (?,?,?,?,?,?,?,?,0,?,0,0,0,'',?,?,NULL)",
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
        """The transfer, None if no row has its id; StoredDataCorrupt if its row does
        not read."""
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM file_transfers WHERE id=?", (transfer_id,)
        ).fetchone()
        return None if row is None else self._row(row)

    def exists(self, transfer_id: bytes) -> bool:
        """A row with this id, readable or not."""
        sql = "SELECT 1 FROM file_transfers WHERE id=?"
        return self._conn.execute(sql, (transfer_id,)).fetchone() is not None

    def by_prefix(self, prefix: str) -> list[Transfer]:
        """Transfers whose id in hex starts with ``prefix`` (the CLI's short ids); raises
        StoredDataCorrupt if one of them does not read."""
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM file_transfers WHERE hex(id) LIKE ? LIMIT 2",
            (prefix.upper() + "%",),
        ).fetchall()
        return [self._row(row) for row in rows]  # the one asked for: its damage said

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
            "refuse_reason",
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
