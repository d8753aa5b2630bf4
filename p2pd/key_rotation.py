"""``p2pd rotate-key``: a new identity key for the same handle, with the daemon stopped.

Why stopped: the identity key is the daemon's QUIC certificate key and signs its prekeys
and its handle record, and the new seed must be stored under the user's passphrase,
which a running daemon does not keep. So the command does it on disk, and the next start
runs as the new identity throughout. (The DHT node key is separate and stays.)

Steps, in this order (a crash between two leaves a state the next start handles):

1. The notice (:class:`p2pd.rotation.RotationNotice`, signed by the old key and the new
   one) is stored in the database, with what belonged to the old key dropped in the same
   transaction: our prekeys (new ones are made and published at the next start) and
   every session (they were agreed with the old key; peers start new ones, X3DH as for
   a new contact), and the envelopes of messages not yet acknowledged (encrypted again
   in the new sessions).
2. The new identity replaces ``identity.json`` atomically, under the same protection
   (the same passphrase, or none if it had none), mode 0600.

The old seed is not kept: the signed notice is all a rotation needs from it, and a key
one rotates away from may be one that leaked. (A crash after 1 and before 2 leaves the
old identity in place and a notice for a key nobody holds: the daemon does not send it,
and it logs so; sessions start afresh. Run rotate-key again.)

At the next start the daemon (p2pd/daemon.py) publishes its record under the new key,
carrying the notice where the record format allows it, and queues the notice once for
every contact (p2pd/delivery/service.py, ``announce_rotation``; docs/PROTOCOL.md,
"Key rotation notices").
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from .errors import RecordError
from .identity import Identity
from .keystore import save_identity, unlock
from .rotation import RotationNotice, verify_notice
from .session.manager import PREKEYS_META_KEY
from .store import db_path, get_meta, open_database

log = logging.getLogger(__name__)

#: The notice of the last rotation, hex. Kept after it was sent: our record carries it
#: (once records can), for contacts that were offline longer than the mailbox keeps it.
ROTATION_META = "rotation.notice"


def rotate_identity(
    home: Path, passphrase: bytes | None, *, now: float | None = None
) -> tuple[Identity, RotationNotice]:
    """Rotate the identity in ``home`` (its daemon must be stopped); return the new
    identity and the notice. Raises what :func:`load_identity` raises."""
    unlocked = unlock(home, passphrase)  # the storage key (p2pd/at_rest.py) is kept
    old = unlocked.identity
    new = Identity.generate(old.handle)
    notice = RotationNotice.create(old, new, now=int(time.time() if now is None else now))
    conn = open_database(db_path(home))
    try:
        with conn:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (ROTATION_META, notice.encode().hex()),
            )
            conn.execute("DELETE FROM meta WHERE key=?", (PREKEYS_META_KEY,))
            conn.execute("DELETE FROM sessions")
            if conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='messages'"
            ).fetchone():
                conn.execute(
                    "UPDATE messages SET envelope=NULL, next_attempt=0 "
                    "WHERE direction='out' AND state IN ('queued', 'sent')"
                )
    finally:
        conn.close()
    save_identity(home, new, passphrase, replace=True, storage_key=unlocked.storage_key)
    log.info("rotated %s from %s to %s", old.handle, old.fingerprint, new.fingerprint)
    return new, notice


def stored_notice(conn: sqlite3.Connection) -> RotationNotice | None:
    """The notice of the last rotation, if any (syntax checked, signatures too)."""
    text = get_meta(conn, ROTATION_META)
    if text is None:
        return None
    try:
        return verify_notice(bytes.fromhex(text))
    except (ValueError, RecordError):
        log.warning("the stored rotation notice is damaged: ignored")
        return None
