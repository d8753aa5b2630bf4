"""The identity key file (p2pd.keystore): round trips, permissions, and damaged files."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import nacl.pwhash
import pytest

from p2pd.errors import (
    BadPassphrase,
    IdentityExists,
    KeystoreCorrupt,
    LocalError,
    NoIdentity,
    PassphraseRequired,
)
from p2pd.identity import Identity
from p2pd.keystore import (
    MAX_FILE_SIZE,
    identity_exists,
    identity_path,
    is_encrypted,
    load_identity,
    read_identity_file,
    save_identity,
)

FAST = {
    "opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN,
    "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN,
}
PASSPHRASE = b"correct horse battery staple"
SEED = bytes(range(100, 132))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def alice() -> Identity:
    return Identity.from_seed("alice", SEED)


def _save(home: Path, identity: Identity, passphrase: bytes | None = PASSPHRASE) -> Path:
    return save_identity(home, identity, passphrase, **FAST)


def _doc(home: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(identity_path(home).read_text())
    return doc


def _write(home: Path, doc: dict[str, Any]) -> None:
    identity_path(home).write_text(json.dumps(doc))


# --------------------------------------------------------------------------- round trips


def test_round_trip_with_passphrase(home: Path, alice: Identity) -> None:
    path = _save(home, alice)
    assert path == identity_path(home)
    assert identity_exists(home)
    assert is_encrypted(home)
    loaded = load_identity(home, PASSPHRASE)
    assert loaded.handle == "alice"
    assert loaded.seed == SEED
    assert loaded.public_key == alice.public_key


def test_round_trip_without_passphrase(home: Path, alice: Identity) -> None:
    _save(home, alice, None)
    assert not is_encrypted(home)
    assert _doc(home)["protection"] == "none"
    loaded = load_identity(home, None)
    assert loaded.seed == SEED
    assert loaded.public_key == alice.public_key


def test_unencrypted_identity_ignores_a_passphrase(home: Path, alice: Identity) -> None:
    _save(home, alice, None)
    assert load_identity(home, b"anything").public_key == alice.public_key


def test_empty_passphrase_is_a_passphrase(home: Path, alice: Identity) -> None:
    """b"" seals the key (it is not "no passphrase"), and only b"" opens it."""
    _save(home, alice, b"")
    assert is_encrypted(home)
    assert load_identity(home, b"").public_key == alice.public_key
    with pytest.raises(PassphraseRequired):
        load_identity(home, None)
    with pytest.raises(BadPassphrase):
        load_identity(home, b" ")


def test_sealed_file_does_not_contain_the_seed(home: Path, alice: Identity) -> None:
    """With a passphrase the seed never touches the disk in the clear."""
    _save(home, alice)
    raw = identity_path(home).read_bytes()
    assert SEED.hex().encode() not in raw
    assert SEED.hex().upper().encode() not in raw
    assert SEED not in raw
    assert PASSPHRASE not in raw
    doc = _doc(home)
    assert doc["protection"] == "argon2id-secretbox"
    assert doc["kdf"]["opslimit"] == FAST["opslimit"]
    assert doc["kdf"]["memlimit"] == FAST["memlimit"]


def test_two_saves_use_fresh_salt_and_nonce(tmp_path: Path, alice: Identity) -> None:
    _save(tmp_path / "a", alice)
    _save(tmp_path / "b", alice)
    a, b = _doc(tmp_path / "a"), _doc(tmp_path / "b")
    assert a["kdf"]["salt"] != b["kdf"]["salt"]
    assert a["secret"] != b["secret"]


# --------------------------------------------------------------------------- permissions


def test_file_is_0600_and_home_is_0700(home: Path, alice: Identity) -> None:
    _save(home, alice)
    assert stat.S_IMODE(identity_path(home).stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_existing_open_home_is_made_private(home: Path, alice: Identity) -> None:
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    _save(home, alice, None)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE(identity_path(home).stat().st_mode) == 0o600


def test_no_temporary_file_is_left_behind(home: Path, alice: Identity) -> None:
    _save(home, alice)
    assert sorted(p.name for p in home.iterdir()) == ["identity.json"]


# --------------------------------------------------------------------------- passphrases


def test_wrong_passphrase_is_bad_passphrase(home: Path, alice: Identity) -> None:
    """A wrong passphrase says so, without a traceback or any secret in the message."""
    _save(home, alice)
    with pytest.raises(BadPassphrase) as info:
        load_identity(home, b"hunter2-xyzzy")
    assert isinstance(info.value, LocalError)
    message = str(info.value)
    assert "passphrase" in message
    assert "Traceback" not in message
    assert SEED.hex() not in message
    assert PASSPHRASE.decode() not in message
    assert "hunter2-xyzzy" not in message
    assert _doc(home)["secret"] not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_encrypted_identity_without_passphrase(home: Path, alice: Identity) -> None:
    _save(home, alice)
    with pytest.raises(PassphraseRequired):
        load_identity(home, None)


# --------------------------------------------------------------------------- overwriting


def test_second_save_is_refused_and_keeps_the_first(home: Path, alice: Identity) -> None:
    """`init` twice never destroys the existing key."""
    _save(home, alice)
    before = identity_path(home).read_bytes()
    bob = Identity.generate("bob")
    with pytest.raises(IdentityExists):
        _save(home, bob, None)
    with pytest.raises(IdentityExists):
        _save(home, bob)
    assert identity_path(home).read_bytes() == before
    assert load_identity(home, PASSPHRASE).public_key == alice.public_key
    assert sorted(p.name for p in home.iterdir()) == ["identity.json"]


def test_save_survives_a_stale_temporary_file(home: Path, alice: Identity) -> None:
    """A crash mid-save leaves identity.tmp behind; the next save still works."""
    home.mkdir()
    (home / "identity.tmp").write_text("junk from a crash")
    _save(home, alice, None)
    assert load_identity(home, None).public_key == alice.public_key


# --------------------------------------------------------------------------- missing / corrupt


def test_missing_file_is_no_identity(home: Path) -> None:
    assert not identity_exists(home)
    with pytest.raises(NoIdentity):
        load_identity(home, None)
    with pytest.raises(NoIdentity):
        load_identity(home, PASSPHRASE)


def test_not_json_is_corrupt(home: Path, alice: Identity) -> None:
    _save(home, alice, None)
    for raw in (b"not json", b"", b"\xff\xfe\x00garbage", b'{"format": "p2pd-identity"'):
        identity_path(home).write_bytes(raw)
        with pytest.raises(KeystoreCorrupt):
            load_identity(home, None)


def test_deeply_nested_json_is_corrupt(home: Path, alice: Identity) -> None:
    """A damaged file under the size limit must still be reported as corrupt."""
    _save(home, alice, None)
    identity_path(home).write_bytes(b"[" * 4000)
    with pytest.raises(KeystoreCorrupt):
        load_identity(home, None)


@pytest.mark.parametrize(
    "change",
    [
        {"format": "p2pd-identity-v0"},
        {"format": None},
        {"version": 2},
        {"version": "1"},
        {"handle": "Alice"},
        {"handle": 5},
        {"public_key": "zz" * 32},
        {"public_key": "00" * 31},
        {"protection": "rot13"},
        {"secret": "not hex"},
        {"secret": 12},
    ],
)
def test_malformed_fields_are_corrupt(home: Path, alice: Identity, change: dict[str, Any]) -> None:
    _save(home, alice, None)
    _write(home, {**_doc(home), **change})
    with pytest.raises(KeystoreCorrupt):
        load_identity(home, None)


def test_json_that_is_not_an_object_is_corrupt(home: Path) -> None:
    home.mkdir()
    for raw in ("[]", "null", '"p2pd-identity"', "1"):
        identity_path(home).write_text(raw)
        with pytest.raises(KeystoreCorrupt):
            read_identity_file(home)


def test_huge_file_is_corrupt(home: Path, alice: Identity) -> None:
    """An oversized file is refused, even though it is otherwise a valid identity."""
    _save(home, alice, None)
    raw = identity_path(home).read_bytes()
    identity_path(home).write_bytes(raw + b" " * (MAX_FILE_SIZE + 1 - len(raw)))
    assert len(identity_path(home).read_bytes()) == MAX_FILE_SIZE + 1
    with pytest.raises(KeystoreCorrupt):
        load_identity(home, None)
    # just at the limit it is still fine
    identity_path(home).write_bytes(raw + b" " * (MAX_FILE_SIZE - len(raw)))
    assert load_identity(home, None).public_key == alice.public_key


@pytest.mark.parametrize(
    "kdf_change",
    [
        {"memlimit": 1 << 40},
        {"memlimit": (1 << 30) + 1},
        {"memlimit": 0},
        {"memlimit": 8191},
        {"opslimit": 1 << 20},
        {"opslimit": 17},
        {"opslimit": 0},
        {"opslimit": True},
        {"memlimit": "8192"},
        {"salt": "00" * 15},
        {"salt": "00" * 17},
        {"salt": "xyz"},
    ],
)
def test_kdf_parameters_out_of_bounds_are_corrupt(
    home: Path, alice: Identity, kdf_change: dict[str, Any]
) -> None:
    """A crafted file cannot make the loader burn unbounded memory or time."""
    _save(home, alice)
    doc = _doc(home)
    doc["kdf"] = {**doc["kdf"], **kdf_change}
    _write(home, doc)
    with pytest.raises(KeystoreCorrupt):
        load_identity(home, PASSPHRASE)


def test_missing_kdf_is_corrupt(home: Path, alice: Identity) -> None:
    _save(home, alice)
    doc = _doc(home)
    del doc["kdf"]
    _write(home, doc)
    with pytest.raises(KeystoreCorrupt):
        load_identity(home, PASSPHRASE)


@pytest.mark.parametrize("passphrase", [None, PASSPHRASE])
def test_public_key_not_matching_seed_is_corrupt(
    home: Path, alice: Identity, passphrase: bytes | None
) -> None:
    _save(home, alice, passphrase)
    doc = _doc(home)
    doc["public_key"] = Identity.generate("alice").public_key.hex()
    _write(home, doc)
    with pytest.raises(KeystoreCorrupt):
        load_identity(home, passphrase)


@pytest.mark.parametrize("cut", [1, 2, 32, 64])
def test_truncated_clear_secret_is_corrupt(home: Path, alice: Identity, cut: int) -> None:
    _save(home, alice, None)
    doc = _doc(home)
    doc["secret"] = doc["secret"][:-cut]
    _write(home, doc)
    with pytest.raises(KeystoreCorrupt):
        load_identity(home, None)


def test_lengthened_clear_secret_is_corrupt(home: Path, alice: Identity) -> None:
    _save(home, alice, None)
    doc = _doc(home)
    doc["secret"] += "00"
    _write(home, doc)
    with pytest.raises(KeystoreCorrupt):
        load_identity(home, None)


@pytest.mark.parametrize("cut", [2, 48, 144])
def test_truncated_sealed_secret_is_corrupt(home: Path, alice: Identity, cut: int) -> None:
    """A damaged key file must not tell the user their (correct) passphrase is wrong.

    The sealed secret has a fixed length (24-byte nonce + 16-byte tag + 32-byte seed),
    so truncation is detectable before any decryption.
    """
    _save(home, alice)
    doc = _doc(home)
    assert len(doc["secret"]) == 2 * (24 + 16 + 32)
    doc["secret"] = doc["secret"][:-cut]
    _write(home, doc)
    with pytest.raises(KeystoreCorrupt):
        load_identity(home, PASSPHRASE)


def test_flipped_sealed_secret_is_refused(home: Path, alice: Identity) -> None:
    """Tampering with the ciphertext never yields a different key."""
    _save(home, alice)
    doc = _doc(home)
    raw = bytearray(bytes.fromhex(doc["secret"]))
    raw[-1] ^= 1
    doc["secret"] = raw.hex()
    _write(home, doc)
    with pytest.raises((BadPassphrase, KeystoreCorrupt)):
        load_identity(home, PASSPHRASE)
