"""Secrets at rest (p2pd/at_rest.py): with a passphrase, p2pd.db holds neither message
text nor ratchet or prekey secrets; a value moved to another row does not open; a
database under another key refuses to open and is left alone; a clear database is
encrypted on the first start with a passphrase, in one transaction."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pd.at_rest import CLEAR, META_KEY, AtRest, open_at_rest
from p2pd.errors import (
    BadPassphrase,
    DatabaseLocked,
    SessionStateCorrupt,
    StoredDataCorrupt,
)
from p2pd.files.protocol import Layout, Offer
from p2pd.files.store import FileStore
from p2pd.identity import Identity
from p2pd.key_rotation import rotate_identity
from p2pd.keystore import identity_path, load_identity, save_identity, unlock
from p2pd.messaging import MessageStore
from p2pd.session import SessionManager
from p2pd.session.manager import PREKEYS_META_KEY
from p2pd.store import open_database
from p2pd.testing.daemons import DaemonProcess, cli_json, run_cli, short_tempdir

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
FAST = {"opslimit": 1, "memlimit": 8192}
PASSPHRASE = b"correct horse battery staple"
NOW = 1_700_000_000.0


# --------------------------------------------------------------------------- helpers


def raw_files(db: Path) -> bytes:
    """Every byte SQLite keeps of ``db`` on disk: the file, its WAL, its journal."""
    data = b""
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-journal")):
        if path.exists():
            data += path.read_bytes()
    return data


_SECRET_NAMES = {"priv", "own_ratchet_priv", "key", "message_key", "pre_keys"}


def key_material(document: Any, name: str = "") -> list[bytes]:
    """The private keys, chain keys and message keys in a decoded session state or
    prekey document (the libraries write bytes as latin-1 strings), each in every form
    it could take on disk: raw, as stored JSON (UTF-8), as escaped JSON, and hex."""
    found: list[bytes] = []
    if isinstance(document, dict):
        for key, value in document.items():
            found += key_material(value, key)
    elif isinstance(document, list):
        for value in document:
            found += key_material(value, name)
    elif isinstance(document, str) and name in _SECRET_NAMES and len(document) >= 16:
        raw = document.encode("latin-1")
        found += [
            raw,
            json.dumps(document, ensure_ascii=False)[1:-1].encode(),
            json.dumps(document)[1:-1].encode(),
            raw.hex().encode(),
        ]
    return found


def secret_documents(conn: sqlite3.Connection, at_rest: AtRest) -> list[Any]:
    """The session states and our prekeys, opened with ``at_rest``."""
    docs = [
        json.loads(at_rest.open_text("sessions", "state", bytes(sid), state))
        for sid, state in conn.execute("SELECT session_id, state FROM sessions")
    ]
    (prekeys,) = conn.execute("SELECT value FROM meta WHERE key=?", (PREKEYS_META_KEY,)).fetchone()
    docs.append(json.loads(at_rest.open_text("meta", "value", PREKEYS_META_KEY, prekeys)))
    return docs


def outbox_texts(store: MessageStore) -> list[str]:
    return [m.text for m in sorted(store.outbox(), key=lambda m: m.seq)]


class Pair:
    """alice and bob, each with a database file and an at-rest policy."""

    def __init__(self, root: Path, alice_at_rest: AtRest, bob_at_rest: AtRest) -> None:
        self.alice_id, self.bob_id = Identity.generate("alice"), Identity.generate("bob")
        self.alice_db, self.bob_db = root / "alice.db", root / "bob.db"
        self.alice_conn = open_database(self.alice_db)
        self.bob_conn = open_database(self.bob_db)
        self.open(alice_at_rest, bob_at_rest)

    def open(self, alice_at_rest: AtRest, bob_at_rest: AtRest) -> None:
        self.alice = SessionManager.open(
            self.alice_conn, self.alice_id, now=NOW, at_rest=alice_at_rest
        )
        self.bob = SessionManager.open(self.bob_conn, self.bob_id, now=NOW, at_rest=bob_at_rest)
        self.alice_messages = MessageStore(self.alice_conn, at_rest=alice_at_rest)
        self.bob_messages = MessageStore(self.bob_conn, at_rest=bob_at_rest)

    def converse(self, texts: list[str], now: float = NOW) -> None:
        """alice sends each text (queued, encrypted, envelope kept), bob stores it, and
        bob answers each; every step as the daemon does it."""
        for text in texts:
            (queued,) = self.alice_messages.enqueue_many("bob", self.bob_id.public_key, [text], now)
            envelope = self.alice.encrypt(
                self.bob_id.public_key, text.encode(), now=now, peer_bundle=self.bob.prekey_bundle()
            )
            self.alice_messages.set_envelope(queued.id, envelope)
            peer, plaintext = self.bob.decrypt(envelope, now=now)
            assert plaintext == text.encode()
            self.bob_messages.record_incoming(
                queued.id, "alice", peer, queued.seq, text, int(now * 1000), now, via="direct"
            )
            reply = self.bob.encrypt(self.alice_id.public_key, b"re: " + text.encode(), now=now)
            assert self.alice.decrypt(reply, now=now).plaintext == b"re: " + text.encode()

    def close(self) -> None:
        self.alice_conn.close()
        self.bob_conn.close()


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[Pair]:
    with open_database(tmp_path / "probe.db"):
        pass
    p = Pair(tmp_path, AtRest(KEY), CLEAR)
    yield p
    p.close()


TEXTS = ["meet me at the old mill at nine", "bring the blue notebook", "ünïcödé ✓ text"]


# --------------------------------------------------------------------------- the seal


def test_a_sealed_value_opens_only_where_it_was_sealed() -> None:
    at_rest = AtRest(KEY)
    sealed = at_rest.seal("messages", "text", b"id-1", b"hello")
    assert b"hello" not in sealed
    assert at_rest.open("messages", "text", b"id-1", sealed) == b"hello"
    for table, column, row in [
        ("messages", "text", b"id-2"),  # another row
        ("messages", "envelope", b"id-1"),  # another column
        ("sessions", "text", b"id-1"),  # another table
    ]:
        with pytest.raises(StoredDataCorrupt, match="moved from another row"):
            at_rest.open(table, column, row, sealed)
    with pytest.raises(StoredDataCorrupt):
        AtRest(OTHER_KEY).open("messages", "text", b"id-1", sealed)
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for damaged in (flipped, sealed[:20], b"", "hello"):
        with pytest.raises(StoredDataCorrupt) as error:
            at_rest.open("messages", "text", b"id-1", damaged)
        assert "hello" not in str(error.value)
    # the same value sealed twice differs (a fresh nonce): equal texts are not linkable
    assert at_rest.seal("messages", "text", b"id-1", b"hello") != sealed
    assert "KEY" not in repr(at_rest) and KEY.hex() not in repr(at_rest)


# --------------------------------------------------------------------------- rows


def test_messages_and_sessions_are_stored_encrypted(pair: Pair) -> None:
    """alice's database (with a key) holds none of the texts nor any key material of
    her sessions and prekeys; bob's (clear) holds both: the search can find them."""
    pair.converse(TEXTS)
    pair.alice_conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    alice_raw, bob_raw = raw_files(pair.alice_db), raw_files(pair.bob_db)
    alice_secrets = [
        m for d in secret_documents(pair.alice_conn, AtRest(KEY)) for m in key_material(d)
    ]
    bob_secrets = [m for d in secret_documents(pair.bob_conn, CLEAR) for m in key_material(d)]
    assert len(alice_secrets) > 20 and len(bob_secrets) > 20
    for text in TEXTS:
        assert text.encode() not in alice_raw
        assert text.encode() in bob_raw
    assert not [m for m in alice_secrets if m in alice_raw]
    assert any(m in bob_raw for m in bob_secrets)
    # ids, peer keys and sequence numbers stay as they were: the indexes still serve
    plan = pair.alice_conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE peer_key=? AND direction='in'",
        (pair.bob_id.public_key,),
    ).fetchall()
    assert "messages_inbox" in str(plan)
    assert outbox_texts(pair.alice_messages) == TEXTS
    assert all(m.envelope is not None for m in pair.alice_messages.outbox())


def test_swapped_message_rows_do_not_open_and_stay_as_they_are(pair: Pair) -> None:
    pair.converse(TEXTS)
    conn = pair.alice_conn
    (a, text_a), (b, text_b) = conn.execute(
        "SELECT id, text FROM messages ORDER BY seq LIMIT 2"
    ).fetchall()
    with conn:
        conn.execute("UPDATE messages SET text=? WHERE id=?", (text_b, a))
        conn.execute("UPDATE messages SET text=? WHERE id=?", (text_a, b))
    before = conn.execute("SELECT * FROM messages ORDER BY id").fetchall()
    with pytest.raises(StoredDataCorrupt, match=r"messages\.text"):
        pair.alice_messages.get(bytes(a))
    # listings leave the two out (counted) and go on with the rest
    assert outbox_texts(pair.alice_messages) == [TEXTS[2]]
    assert pair.alice_messages.corrupt_rows == 2
    assert pair.alice_messages.pending_for(pair.bob_id.public_key)[0].text == TEXTS[2]
    assert conn.execute("SELECT * FROM messages ORDER BY id").fetchall() == before
    # text and envelope of one row swapped: the column is bound too
    (c, text_c, envelope_c) = conn.execute(
        "SELECT id, text, envelope FROM messages ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    with conn:
        conn.execute("UPDATE messages SET text=?, envelope=? WHERE id=?", (envelope_c, text_c, c))
    with pytest.raises(StoredDataCorrupt):
        pair.alice_messages.get(bytes(c))


def test_swapped_session_states_are_refused_and_nothing_changes(tmp_path: Path) -> None:
    """alice talks to bob and to carol; their two session rows swap states. Sending to
    either fails with SessionStateCorrupt, and the rows are left as they were."""
    at_rest = AtRest(KEY)
    conn = open_database(tmp_path / "alice.db")
    alice_id = Identity.generate("alice")
    alice = SessionManager.open(conn, alice_id, now=NOW, at_rest=at_rest)
    peers = [Identity.generate(h) for h in ("bob", "carol")]
    others = [SessionManager.open(open_database(None), p, now=NOW) for p in peers]
    for peer, other in zip(peers, others, strict=True):
        alice.encrypt(peer.public_key, b"hi", now=NOW, peer_bundle=other.prekey_bundle())
    (s1, state1), (s2, state2) = conn.execute("SELECT session_id, state FROM sessions").fetchall()
    with conn:
        conn.execute("UPDATE sessions SET state=? WHERE session_id=?", (state2, s1))
        conn.execute("UPDATE sessions SET state=? WHERE session_id=?", (state1, s2))
    before = conn.execute("SELECT * FROM sessions ORDER BY session_id").fetchall()
    # a fresh manager: nothing cached from before the swap
    alice = SessionManager.open(conn, alice_id, now=NOW, at_rest=at_rest)
    for peer in peers:
        with pytest.raises(SessionStateCorrupt, match="does not open"):
            alice.encrypt(peer.public_key, b"again", now=NOW + 1)
    assert conn.execute("SELECT * FROM sessions ORDER BY session_id").fetchall() == before
    # the prekeys are bound to their row as well
    (sealed,) = conn.execute("SELECT value FROM meta WHERE key=?", (PREKEYS_META_KEY,)).fetchone()
    with conn:
        conn.execute("INSERT INTO meta(key, value) VALUES('moved', ?)", (sealed,))
    with pytest.raises(StoredDataCorrupt):
        at_rest.open_text("meta", "value", "moved", sealed)
    conn.close()


def test_a_database_under_another_key_refuses_to_open_and_is_left_alone(pair: Pair) -> None:
    pair.converse(TEXTS[:1])
    conn = pair.alice_conn
    with conn:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?)",
            (META_KEY, json.dumps({"scheme": "xchacha20poly1305-v1", "key_id": "00" * 16})),
        )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    digest = hashlib.sha256(raw_files(pair.alice_db)).hexdigest()
    with pytest.raises(DatabaseLocked, match="another storage key"):
        open_at_rest(conn, KEY)
    with pytest.raises(DatabaseLocked, match="no storage key"):
        open_at_rest(conn, None)
    assert hashlib.sha256(raw_files(pair.alice_db)).hexdigest() == digest


# --------------------------------------------------------------------------- migration


def test_a_clear_database_is_encrypted_on_first_start_with_a_key(tmp_path: Path) -> None:
    """An old daemon's clear database (messages, sessions, prekeys, free pages from a
    deleted session) is encrypted in one go; the conversation goes on; a second start
    with the same key changes nothing."""
    pair = Pair(tmp_path, CLEAR, CLEAR)
    pair.converse(TEXTS)
    old_session = pair.alice_conn.execute("SELECT state FROM sessions").fetchone()[0]
    old_secrets = key_material(json.loads(old_session))
    pair.alice_conn.close()
    assert TEXTS[0].encode() in raw_files(pair.alice_db)
    pair.alice_conn = open_database(pair.alice_db)
    at_rest = open_at_rest(pair.alice_conn, KEY)
    assert at_rest.encrypted
    pair.open(at_rest, CLEAR)
    raw = raw_files(pair.alice_db)
    for text in TEXTS:
        assert text.encode() not in raw
    assert not [m for m in old_secrets if m in raw]
    assert outbox_texts(pair.alice_messages) == TEXTS
    pair.converse(["after the migration"], now=NOW + 10)  # the sessions still work
    assert open_at_rest(pair.alice_conn, KEY).encrypted  # marked: not encrypted twice
    assert outbox_texts(pair.alice_messages)[-1] == "after the migration"
    pair.close()


def test_a_failed_migration_leaves_the_database_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = Pair(tmp_path, CLEAR, CLEAR)
    pair.converse(TEXTS)
    calls = 0
    real_seal = AtRest.seal

    def failing_seal(self: AtRest, *args: Any) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("disk full")
        return real_seal(self, *args)

    monkeypatch.setattr(AtRest, "seal", failing_seal)
    with pytest.raises(OSError):
        open_at_rest(pair.alice_conn, KEY)
    monkeypatch.undo()
    assert outbox_texts(MessageStore(pair.alice_conn)) == TEXTS
    assert pair.alice_conn.execute("SELECT 1 FROM meta WHERE key=?", (META_KEY,)).fetchone() is None
    assert open_at_rest(pair.alice_conn, KEY).encrypted  # the next start does it
    assert outbox_texts(MessageStore(pair.alice_conn, at_rest=AtRest(KEY))) == TEXTS
    pair.close()


# --------------------------------------------------------------------------- the key


def test_the_storage_key_lives_sealed_beside_the_seed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    alice = Identity.generate("alice")
    save_identity(home, alice, PASSPHRASE, **FAST)
    doc = json.loads(identity_path(home).read_text())
    first = unlock(home, PASSPHRASE)
    assert first.identity.public_key == alice.public_key
    assert first.storage_key is not None and len(first.storage_key) == 32
    assert first.storage_key.hex() not in identity_path(home).read_text()
    assert "storage_key" in doc and unlock(home, PASSPHRASE).storage_key == first.storage_key
    assert first.storage_key.hex() not in repr(first)
    # an identity file from before: the key is made once, then kept
    del doc["storage_key"]
    identity_path(home).write_text(json.dumps(doc))
    made = unlock(home, PASSPHRASE).storage_key
    assert made is not None and unlock(home, PASSPHRASE).storage_key == made
    assert os.stat(identity_path(home)).st_mode & 0o777 == 0o600
    # rotate-key keeps it (the history stays readable); a wrong passphrase opens nothing
    rotated, _ = rotate_identity(home, PASSPHRASE)
    assert unlock(home, PASSPHRASE).storage_key == made
    assert load_identity(home, PASSPHRASE).public_key == rotated.public_key
    before = identity_path(home).read_bytes()
    with pytest.raises(BadPassphrase):
        unlock(home, b"wrong")
    assert identity_path(home).read_bytes() == before
    # no passphrase, no storage key: the database stays clear
    save_identity(tmp_path / "clear", alice, None)
    assert unlock(tmp_path / "clear", None).storage_key is None


# --------------------------------------------------------------------------- real daemons


@pytest.mark.slow
def test_daemons_keep_no_plaintext_and_no_key_material_on_disk(tmp_path: Path) -> None:
    """alice runs with a passphrase, bob without. They exchange messages; alice's
    p2pd.db (read with sqlite3, and byte by byte with its WAL) holds none of the texts
    and none of her ratchet or prekey secrets, while bob's clear one holds both. Then a
    wrong passphrase is refused and changes nothing, and bob, his identity sealed
    under a passphrase, has his clear database encrypted at his next start, history
    kept."""
    root = short_tempdir("p2pd-rest-")
    passphrase = PASSPHRASE.decode()
    (root / "pass").write_text(passphrase + "\n")
    env = {"P2PD_PASSPHRASE": passphrase}
    assert (
        run_cli(root / "alice", "init", "alice", "--passphrase-file", str(root / "pass")).returncode
        == 0
    )
    assert run_cli(root / "bob", "init", "bob", "--no-passphrase").returncode == 0
    # Restarted below, alice's join and publish waited out bob's saved address (his
    # daemon not started yet) for the default rpc_timeout, 2 s: this test claims no DHT
    # timing
    (root / "alice" / "config.toml").write_text("[dht]\nrpc_timeout = 0.5\n")
    daemons: list[DaemonProcess] = []
    try:
        alice = DaemonProcess(root / "alice", env=env).wait_ready()
        daemons.append(alice)
        bob = DaemonProcess(root / "bob", bootstrap=[alice.listen]).wait_ready()
        daemons.append(bob)
        for sender, recipient, text in [
            ("alice", "bob", TEXTS[0]), ("bob", "alice", TEXTS[1]), ("alice", "bob", TEXTS[2])
        ]:  # fmt: skip
            proc = run_cli(root / sender, "send", recipient, text, "--wait", "--timeout", "30")
            assert proc.returncode == 0, proc.stderr
        assert [m["text"] for m in cli_json_lines(root / "bob", "inbox", "--json")] == [
            TEXTS[0], TEXTS[2]
        ]  # fmt: skip
        assert [m["text"] for m in cli_json_lines(root / "alice", "inbox", "--json")] == [TEXTS[1]]
        for d in daemons:
            assert d.stop() == 0
        alice_db, bob_db = root / "alice" / "p2pd.db", root / "bob" / "p2pd.db"
        storage_key = unlock(root / "alice", PASSPHRASE).storage_key
        with contextlib.closing(sqlite3.connect(alice_db)) as conn:
            texts = [row[0] for row in conn.execute("SELECT text FROM messages")]
            assert len(texts) == 3 and all(isinstance(t, bytes) for t in texts)
            assert not any(x.encode() in t for x in TEXTS for t in texts)
            alice_secrets = [
                m for d in secret_documents(conn, AtRest(storage_key)) for m in key_material(d)
            ]
        with contextlib.closing(sqlite3.connect(bob_db)) as conn:
            bob_secrets = [m for d in secret_documents(conn, CLEAR) for m in key_material(d)]
        alice_raw, bob_raw = raw_files(alice_db), raw_files(bob_db)
        assert len(alice_secrets) > 20
        assert not [t for t in TEXTS if t.encode() in alice_raw]
        assert not [m for m in alice_secrets if m in alice_raw]
        assert [t for t in TEXTS if t.encode() in bob_raw] == TEXTS  # the search works
        assert any(m in bob_raw for m in bob_secrets)

        # a wrong passphrase: a clear error, and the database is not touched
        (root / "wrong").write_text("not it\n")
        digest = hashlib.sha256(raw_files(alice_db)).hexdigest()
        proc = run_cli(
            root / "alice", "daemon", "--listen", "127.0.0.1:0",
            "--passphrase-file", str(root / "wrong"),
        )  # fmt: skip
        assert proc.returncode == 1 and "passphrase does not open" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert hashlib.sha256(raw_files(alice_db)).hexdigest() == digest
        # identity.json with another storage key (replaced by hand): refused, unchanged
        rows = dump(alice_db)
        kept = identity_path(root / "alice").read_bytes()
        save_identity(
            root / "alice", load_identity(root / "alice", PASSPHRASE), PASSPHRASE,
            replace=True, **FAST,
        )  # fmt: skip
        proc = run_cli(root / "alice", "daemon", "--listen", "127.0.0.1:0", env=env)
        assert proc.returncode == 1, proc.stderr
        assert "ERROR: p2pd.db is encrypted under another storage key" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert dump(alice_db) == rows  # (SQLite's header counter moves: rows compared)
        identity_path(root / "alice").write_bytes(kept)
        # alice's received message gets the sealed text of one she sent: at her next
        # start it is skipped and counted, and the daemon runs on
        with contextlib.closing(sqlite3.connect(alice_db)) as conn, conn:
            (sent,) = conn.execute("SELECT text FROM messages WHERE direction='out'").fetchone()
            conn.execute("UPDATE messages SET text=? WHERE direction='in'", (sent,))

        # bob's identity gets a passphrase: his clear database is encrypted at start
        save_identity(
            root / "bob", load_identity(root / "bob", None), PASSPHRASE, replace=True, **FAST
        )
        alice = DaemonProcess(root / "alice", env=env, listen=alice.listen).wait_ready()
        daemons.append(alice)
        bob = DaemonProcess(root / "bob", env=env, bootstrap=[alice.listen]).wait_ready()
        daemons.append(bob)
        assert "p2pd.db encrypted at rest" in bob.log
        assert cli_json_lines(root / "alice", "inbox", "--json") == []
        status = cli_json(root / "alice", "status", "--json")
        assert status["messages"]["unreadable_rows"] == 1
        assert [m["text"] for m in cli_json_lines(root / "bob", "inbox", "--json")] == [
            TEXTS[0], TEXTS[2]
        ]  # fmt: skip
        proc = run_cli(root / "alice", "send", "bob", "after", "--wait", "--timeout", "30")
        assert proc.returncode == 0, proc.stderr
        assert [m["text"] for m in cli_json_lines(root / "bob", "inbox", "--json")][-1] == "after"
        assert bob.stop() == 0
        bob_raw = raw_files(bob_db)
        assert not [t for t in [*TEXTS, "after"] if t.encode() in bob_raw]
        assert not [m for m in bob_secrets if m in bob_raw]
    finally:
        for d in daemons:
            d.stop()
        shutil.rmtree(root, ignore_errors=True)


def dump(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return list(conn.iterdump())


def cli_json_lines(home: Path, *args: str) -> list[dict[str, Any]]:
    proc = run_cli(home, *args)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_a_file_offer_and_its_key_are_sealed_and_a_moved_offer_is_skipped(
    tmp_path: Path,
) -> None:
    """The per-file key lives in the stored offer: with a storage key, neither it nor the
    name is on disk in the clear; the same search finds both in a clear database; an
    offer copied into another transfer's row does not open, and that row is skipped."""
    found = {}
    for label, key in (("clear", None), ("sealed", KEY)):
        db = tmp_path / f"{label}.db"
        conn = open_database(db)
        store = FileStore(conn, at_rest=open_at_rest(conn, key))
        offers = [
            Offer(os.urandom(16), os.urandom(32), Layout(10, 4096, 4), b"\1" * 32, f"{n}.pdf")
            for n in ("holiday-photos", "tax-return")
        ]
        for offer in offers:
            assert store.add(
                direction="in", peer_key=b"\2" * 32, handle="bob", offer=offer,
                state="pending", now=NOW,
            )  # fmt: skip
        conn.commit()
        raw = raw_files(db)
        found[label] = [o.key in raw or o.name.encode() in raw for o in offers]
        if key is not None:
            first, second = offers
            stored = conn.execute(
                "SELECT offer FROM file_transfers WHERE id=?", (first.transfer_id,)
            ).fetchone()[0]
            conn.execute(
                "UPDATE file_transfers SET offer=? WHERE id=?", (stored, second.transfer_id)
            )
            conn.commit()
            assert [t.offer.key for t in store.all()] == [first.key]
            assert store.unreadable_rows == 1
        conn.close()
    assert found == {"clear": [True, True], "sealed": [False, False]}
