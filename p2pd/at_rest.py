"""Secrets at rest in p2pd.db: the columns that hold message text, ratchet state,
prekey secrets and pending envelopes are encrypted when the identity has a passphrase.

The key
-------
A random 32-byte *storage key*, made when the identity gets a passphrase (``init``, or
the first start of a daemon whose identity file predates this), sealed in identity.json
beside the seed under the same Argon2id-derived key (p2pd/keystore.py), and held only in
the daemon's memory. Why a random key rather than the Argon2 output itself:

- the database alone holds nothing to guess passphrases against (no salt, no verifier
  derived from the passphrase): an offline attack needs identity.json too;
- a future passphrase change re-seals 72 bytes in identity.json and leaves every row
  alone; `rotate-key` keeps the storage key, so history stays readable;
- one Argon2id run at start opens both the seed and the storage key.

Rows
----
Only values are encrypted, never what SQLite indexes or joins on (ids, peer keys,
handles, states, times), so queries and indexes work as before. A sealed value is::

    0x01 || nonce (24 random bytes) || XChaCha20-Poly1305(key, nonce, value, ad)

with ``ad = "p2pd at rest v1" 0x00 table 0x00 column 0x00 row-id``: a value moved to
another row or column does not open (:class:`~p2pd.errors.StoredDataCorrupt`), and the
row is left as it is. The database records that it is encrypted, and under which key
(``meta.at_rest``: the scheme and a 16-byte key id, BLAKE2b keyed by the storage key), so
that a daemon with another key or none refuses to start (:class:`~p2pd.errors.DatabaseLocked`)
instead of failing row by row.

Every secret-bearing column is listed in :data:`SECRET_COLUMNS`; a new one must be added
there (the migration encrypts what that list names, and tests/test_at_rest.py checks the
database of a daemon that ran for the plaintext and the key material).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import sqlite3
from typing import Final

import nacl.bindings
import nacl.exceptions
import nacl.utils

from .errors import DatabaseLocked, StoredDataCorrupt

__all__ = ["CLEAR", "KEY_LEN", "SECRET_COLUMNS", "AtRest", "open_at_rest"]

log = logging.getLogger(__name__)

KEY_LEN: Final = 32
SCHEME: Final = "xchacha20poly1305-v1"
#: The ``meta`` row that says the database is encrypted, and under which key.
META_KEY: Final = "at_rest"
_VERSION: Final = b"\x01"
_NONCE_LEN: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_TAG_LEN: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
_AD_PREFIX: Final = b"p2pd at rest v1\x00"
#: Every encrypted column: (table, column, the column that names the row, the rows of
#: that table it applies to or None for all). Text columns hold str in the clear and a
#: sealed BLOB when encrypted; blob columns hold bytes either way (NULL stays NULL).
SECRET_COLUMNS: Final = (
    ("messages", "text", "id", None),
    ("messages", "envelope", "id", None),
    ("sessions", "state", "session_id", None),
    ("meta", "value", "key", ("session.prekeys",)),
    ("file_transfers", "offer", "id", None),  # holds the per-file key (p2pd/files/)
)


def key_id(key: bytes) -> str:
    """What ``meta.at_rest`` records of a key: reveals nothing of it."""
    return hashlib.blake2b(b"p2pd at rest key id v1", key=key, digest_size=16).hexdigest()


def _ad(table: str, column: str, row: bytes | str) -> bytes:
    row_bytes = row.encode() if isinstance(row, str) else bytes(row)
    return _AD_PREFIX + table.encode() + b"\x00" + column.encode() + b"\x00" + row_bytes


class AtRest:
    """How one database's secret columns are stored: sealed under a storage key, or in
    the clear (``key`` None: an identity without a passphrase). Never shows the key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes | None) -> None:
        if key is not None and len(key) != KEY_LEN:
            raise ValueError("a storage key is 32 bytes")
        self._key = key

    def __repr__(self) -> str:
        return f"AtRest(encrypted={self.encrypted})"

    @property
    def encrypted(self) -> bool:
        return self._key is not None

    # ------------------------------------------------------------------ bytes

    def seal(self, table: str, column: str, row: bytes | str, value: bytes) -> bytes:
        """``value`` as stored in ``table.column`` of ``row``: sealed, or as it is."""
        if self._key is None:
            return value
        nonce = nacl.utils.random(_NONCE_LEN)
        box = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            value, _ad(table, column, row), nonce, self._key
        )
        return _VERSION + nonce + box

    def open(self, table: str, column: str, row: bytes | str, stored: object) -> bytes:
        """The value :meth:`seal` stored. Raises StoredDataCorrupt (naming the table and
        column, never the value) if it does not open."""
        if self._key is None:
            if isinstance(stored, bytes):
                return stored
            raise StoredDataCorrupt(f"p2pd.db: a {table}.{column} value is not bytes")
        if (
            not isinstance(stored, bytes)
            or len(stored) < 1 + _NONCE_LEN + _TAG_LEN
            or stored[:1] != _VERSION
        ):
            raise StoredDataCorrupt(f"p2pd.db: a {table}.{column} value is not encrypted")
        nonce, box = stored[1 : 1 + _NONCE_LEN], stored[1 + _NONCE_LEN :]
        try:
            return bytes(
                nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                    box, _ad(table, column, row), nonce, self._key
                )
            )
        except nacl.exceptions.CryptoError:
            raise StoredDataCorrupt(
                f"p2pd.db: a {table}.{column} value does not open: damaged, or moved "
                "from another row; left as it is"
            ) from None

    # ------------------------------------------------------------------ text

    def seal_text(self, table: str, column: str, row: bytes | str, text: str) -> str | bytes:
        """A text column's value as stored: the text itself in the clear, else sealed."""
        if self._key is None:
            return text
        return self.seal(table, column, row, text.encode("utf-8"))

    def open_text(self, table: str, column: str, row: bytes | str, stored: object) -> str:
        if self._key is None:
            if isinstance(stored, str):
                return stored
            raise StoredDataCorrupt(
                f"p2pd.db: a {table}.{column} value is encrypted and this identity has "
                "no storage key"
            )
        try:
            return self.open(table, column, row, stored).decode("utf-8")
        except UnicodeDecodeError:
            raise StoredDataCorrupt(f"p2pd.db: a {table}.{column} value is not text") from None

    def seal_blob(
        self, table: str, column: str, row: bytes | str, value: bytes | None
    ) -> bytes | None:
        return None if value is None else self.seal(table, column, row, value)

    def open_blob(self, table: str, column: str, row: bytes | str, stored: object) -> bytes | None:
        return None if stored is None else self.open(table, column, row, stored)


#: A database in the clear (an identity without a passphrase).
CLEAR: Final = AtRest(None)


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}


def open_at_rest(conn: sqlite3.Connection, key: bytes | None) -> AtRest:
    """How ``conn``'s database stores its secrets, given this identity's storage key.

    - encrypted under ``key``: returns it;
    - encrypted under another key, or encrypted and ``key`` is None: DatabaseLocked,
      and nothing is changed;
    - in the clear and ``key`` is None: CLEAR (works as before: docs/SECURITY.md);
    - in the clear and a ``key``: every secret column is encrypted now, in one
      transaction (a crash leaves it all clear, and the next start does it again), then
      the file is vacuumed and its WAL emptied, so that no plaintext stays in free pages.
    """
    row = conn.execute("SELECT value FROM meta WHERE key=?", (META_KEY,)).fetchone()
    if row is not None:
        try:
            marker = json.loads(row[0])
            scheme, recorded = marker["scheme"], marker["key_id"]
        except (ValueError, TypeError, KeyError):
            raise DatabaseLocked("p2pd.db: its at-rest marker is damaged") from None
        if scheme != SCHEME:
            raise DatabaseLocked(f"p2pd.db is encrypted with an unknown scheme {scheme!r}")
        if key is None:
            raise DatabaseLocked(
                "p2pd.db is encrypted at rest, and this identity has no storage key (no "
                "passphrase): was identity.json replaced?"
            )
        if not hmac.compare_digest(str(recorded), key_id(key)):
            raise DatabaseLocked(
                "p2pd.db is encrypted under another storage key than this identity's "
                "(a database from another home, or identity.json was replaced)"
            )
        _zero_freed_cells(conn)
        return AtRest(key)
    if key is None:
        return CLEAR
    at_rest = AtRest(key)
    _encrypt_everything(conn, at_rest, key)
    _zero_freed_cells(conn)
    return at_rest


def _zero_freed_cells(conn: sqlite3.Connection) -> None:
    """A ratchet step replaces a session's sealed state: the old value, left in the page
    as free space, would let whoever later holds the storage key (the passphrase and
    identity.json) recover past message keys. SQLite's ``secure_delete=FAST`` zeroes
    freed space within b-tree pages at no extra I/O (freelist pages are left as they
    are; the WAL keeps earlier page images until they are overwritten)."""
    conn.execute("PRAGMA secure_delete=FAST")


def _encrypt_everything(conn: sqlite3.Connection, at_rest: AtRest, key: bytes) -> None:
    if conn.in_transaction:
        conn.commit()
    # Overwrite freed cells and pages with zeros from now on (the clear values replaced
    # below); VACUUM then drops the free pages older runs left.
    conn.execute("PRAGMA secure_delete=ON")
    counts: dict[str, int] = {}
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, column, row_column, only in SECRET_COLUMNS:
            if column not in _columns(conn, table):  # no such table (yet), or older
                continue
            query = f"SELECT {row_column}, {column} FROM {table}"  # names from our list
            args: tuple[str, ...] = ()
            if only is not None:
                query += f" WHERE {row_column} IN ({','.join('?' * len(only))})"
                args = only
            rows = conn.execute(query, args).fetchall()
            for row_id, value in rows:
                if value is None:
                    continue
                if isinstance(value, str):
                    sealed = at_rest.seal(table, column, row_id, value.encode("utf-8"))
                else:
                    sealed = at_rest.seal(table, column, row_id, bytes(value))
                conn.execute(
                    f"UPDATE {table} SET {column}=? WHERE {row_column}=?", (sealed, row_id)
                )
            counts[f"{table}.{column}"] = len(rows)
        conn.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?)",
            (META_KEY, json.dumps({"scheme": SCHEME, "key_id": key_id(key)})),
        )
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    log.info(
        "p2pd.db encrypted at rest: %s",
        ", ".join(f"{count} {name}" for name, count in counts.items()) or "no rows yet",
    )
