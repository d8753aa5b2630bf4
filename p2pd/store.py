"""SQLite persistence: one database file per home, ``<home>/p2pd.db`` (mode 0600).

Tables (created if missing; ``user_version`` tracks the schema):

- ``meta(key TEXT PRIMARY KEY, value TEXT)``: small daemon state, e.g. our last sequence
  number.
- ``dht_claims(key BLOB PRIMARY KEY, record BLOB, first_seen REAL, refreshed REAL,
  replicated REAL)``: handle claims (version-2 records) this node stores for the network,
  with when this node first accepted a claim by that key and last received a new record
  from it (p2pd/dht/storage.py). Every row is verified again on load; a row that no
  longer verifies is logged and deleted. The table ``dht_records`` of older versions
  (version-1 records) is dropped at load, with a log line.
- ``dht_contacts(node_id BLOB PRIMARY KEY, host TEXT, port INTEGER, last_seen REAL)``:
  routing contacts, so a restarted node can rejoin without a bootstrap address. Written
  as plain columns: nothing is ever pickled.
- ``sessions(session_id BLOB PRIMARY KEY, peer_key BLOB, status TEXT, state TEXT,
  created REAL, updated REAL)``: end-to-end sessions (p2pd/session/manager.py), one
  active per peer; ``state`` is JSON holding the doubleratchet library's versioned model.
  Our own prekeys are in ``meta`` under ``session.prekeys`` (without the identity seed).

With a passphrase, the secret-bearing values (``sessions.state``, the prekeys, and the
messages' ``text`` and ``envelope``: p2pd/at_rest.py ``SECRET_COLUMNS``) are stored
sealed under the identity's storage key, and ``meta.at_rest`` records that and the key's
id; everything SQLite indexes stays as it is.

The daemon opens one connection, on the trio thread, shared by the DHT's storage and
delivery. The DHT writes its rows only when no other transaction is open on it
(p2pd/dht/storage.py says why); WAL mode lets a second process (a test) read the file.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

SCHEMA_VERSION = 1
DB_FILE = "p2pd.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dht_claims (
    key BLOB PRIMARY KEY, record BLOB NOT NULL, first_seen REAL NOT NULL,
    refreshed REAL NOT NULL, replicated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS dht_contacts (
    node_id BLOB PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL,
    last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    session_id BLOB PRIMARY KEY, peer_key BLOB NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'archived', 'closed')),
    state TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_peer ON sessions (peer_key, status);
CREATE UNIQUE INDEX IF NOT EXISTS sessions_active ON sessions (peer_key)
    WHERE status = 'active';
"""


def db_path(home: Path) -> Path:
    return home / DB_FILE


def open_database(path: Path | None) -> sqlite3.Connection:
    """Open (creating if needed) the database; ``None`` gives a private in-memory one."""
    if path is None:
        conn = sqlite3.connect(":memory:", check_same_thread=False)
    else:
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        # check_same_thread=False: tools may create a connection on one thread and hand it
        # to exactly one other; we never share one concurrently.
        conn = sqlite3.connect(path, check_same_thread=False, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.commit()
    return conn


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta(key, value) VALUES(?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
        (key, value),
    )
    conn.commit()
