"""Keys at rest.

The identity lives in ``<home>/identity.json``, mode 0600, written atomically. With a
passphrase, the 32-byte Ed25519 seed is sealed with XSalsa20-Poly1305 (``SecretBox``) under
a key derived by Argon2id (``nacl.pwhash.argon2id``); the KDF parameters are stored beside
it, bounded on load so that a crafted file cannot demand unbounded memory. Without one
(``--no-passphrase``) the seed is stored in the clear and the file says so.

File format (JSON object)::

    {"format": "p2pd-identity", "version": 1, "handle": "alice",
     "public_key": "<hex>", "protection": "argon2id-secretbox" | "none",
     "kdf": {"opslimit": int, "memlimit": int, "salt": "<hex 16 bytes>"},   # when sealed
     "secret": "<hex>",     # sealed box (nonce || ciphertext) or the bare seed
     "storage_key": "<hex>"}   # when sealed: a sealed random 32-byte key (below)

The storage key encrypts the secret columns of p2pd.db at rest (p2pd/at_rest.py says
why it is a random key sealed here rather than the Argon2 output). It is sealed under the
same derived key as the seed, so one Argon2id run opens both; `rotate-key` keeps it. An
identity file written before it existed gets one the first time a daemon opens it
(:func:`unlock`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from .errors import (
    BadPassphrase,
    IdentityExists,
    KeystoreCorrupt,
    NoIdentity,
    PassphraseRequired,
    UsageError,
)
from .identity import Identity, is_valid_handle

IDENTITY_FILE = "identity.json"
FORMAT = "p2pd-identity"
MAX_FILE_SIZE = 4096
#: Interactive limits: about 0.1-0.3 s and 64 MiB here. A daemon opens the key once.
DEFAULT_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
DEFAULT_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE
MAX_OPSLIMIT = 16
MAX_MEMLIMIT = 1 << 30
STORAGE_KEY_LEN = 32
_SEALED_LEN = nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES + 32


@dataclass(frozen=True, slots=True)
class Unlocked:
    """An opened identity, and the key of its database at rest (None without a
    passphrase: the database stays in the clear)."""

    identity: Identity
    storage_key: bytes | None = field(default=None, repr=False)


def identity_path(home: Path) -> Path:
    return home / IDENTITY_FILE


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file at ``path``, readable by us only (0600), fsynced. A
    stale file of that name (a crash mid-write) is removed first."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def forget_passphrase_env(name: str = "P2PD_PASSPHRASE") -> None:
    """Drop the passphrase from this process's environment once it has been read: from
    ``os.environ`` (children do not inherit it) and, on glibc, from the bytes the kernel
    shows in ``/proc/PID/environ`` (unsetenv alone leaves them there), which are zeroed.
    Best effort elsewhere: only the ``os.environ`` entry goes."""
    if name not in os.environ:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        environ = ctypes.POINTER(ctypes.c_char_p).in_dll(libc, "environ")
        slots = ctypes.cast(environ, ctypes.POINTER(ctypes.c_void_p))
        prefix = name.encode() + b"="
        for index in range(100_000):  # bounded: environ ends with a NULL pointer
            entry = environ[index]
            if entry is None:
                break
            if entry.startswith(prefix):
                ctypes.memset(slots[index], 0, len(entry))
    except (OSError, ValueError, AttributeError):  # no libc symbol here: os.environ only
        pass
    os.environ.pop(name, None)


def ensure_home(home: Path) -> None:
    """Create the home directory, private to this user (0700)."""
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)


def _derive(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, passphrase, salt, opslimit=opslimit, memlimit=memlimit
    )


def save_identity(
    home: Path,
    identity: Identity,
    passphrase: bytes | None,
    *,
    opslimit: int = DEFAULT_OPSLIMIT,
    memlimit: int = DEFAULT_MEMLIMIT,
    replace: bool = False,
    storage_key: bytes | None = None,
) -> Path:
    """Write the identity; refuse to overwrite one unless ``replace`` (`rotate-key`:
    the new file takes the old one's place atomically, so a crash leaves one or the
    other, whole). With a passphrase, ``storage_key`` is sealed beside the seed (a new
    random one if None). Returns the file's path."""
    if passphrase is None and storage_key is not None:
        raise UsageError("a storage key is kept only under a passphrase")
    ensure_home(home)
    path = identity_path(home)
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "handle": identity.handle,
        "public_key": identity.public_key.hex(),
    }
    if passphrase is None:
        doc["protection"] = "none"
        doc["secret"] = identity.seed.hex()
    else:
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        key = _derive(passphrase, salt, opslimit, memlimit)
        box = nacl.secret.SecretBox(key)
        doc["protection"] = "argon2id-secretbox"
        doc["kdf"] = {"opslimit": opslimit, "memlimit": memlimit, "salt": salt.hex()}
        doc["secret"] = bytes(box.encrypt(identity.seed)).hex()
        storage_key = storage_key or nacl.utils.random(STORAGE_KEY_LEN)
        doc["storage_key"] = bytes(box.encrypt(storage_key)).hex()
    if replace:
        return _replace_file(home, doc)
    data = (json.dumps(doc, indent=1) + "\n").encode()
    tmp = path.with_suffix(".tmp")
    write_private_file(tmp, data)
    try:
        # link() fails if the target exists: no window in which an identity is overwritten.
        os.link(tmp, path)
    except FileExistsError:
        raise IdentityExists(
            f"an identity already exists at {path}; refusing to overwrite it"
        ) from None
    finally:
        tmp.unlink()
    return path


def _replace_file(home: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` in place of the identity file, atomically: a crash leaves the old
    file or the new one, whole."""
    path = identity_path(home)
    tmp = path.with_suffix(".tmp")
    write_private_file(tmp, (json.dumps(doc, indent=1) + "\n").encode())
    os.replace(tmp, path)
    _fsync_dir(home)
    return path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def identity_exists(home: Path) -> bool:
    return identity_path(home).exists()


def _field(doc: dict[str, Any], name: str, kind: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise KeystoreCorrupt(f"identity file: field {name!r} is missing or malformed")
    return value


def _hex(doc: dict[str, Any], name: str) -> bytes:
    try:
        return bytes.fromhex(_field(doc, name, str))
    except ValueError:
        raise KeystoreCorrupt(f"identity file: field {name!r} is not hex") from None


def _is_one(value: object) -> bool:
    return type(value) is int and value == 1  # not `value == 1`: `true == 1` in Python


def read_identity_file(home: Path) -> dict[str, Any]:
    """The parsed, structurally checked key file (no secrets decrypted)."""
    path = identity_path(home)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise NoIdentity(f"no identity in {home}: run `p2pd init HANDLE` first") from None
    if len(raw) > MAX_FILE_SIZE:
        raise KeystoreCorrupt(f"identity file {path} is too large")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: a deeply nested file under the size cap (json is recursive).
        raise KeystoreCorrupt(f"identity file {path} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not _is_one(doc.get("version")):
        raise KeystoreCorrupt(f"identity file {path} has an unknown format")
    if not is_valid_handle(_field(doc, "handle", str)):
        raise KeystoreCorrupt("identity file: the handle is invalid")
    if len(_hex(doc, "public_key")) != 32:
        raise KeystoreCorrupt("identity file: the public key has the wrong length")
    if doc.get("protection") not in ("none", "argon2id-secretbox"):
        raise KeystoreCorrupt("identity file: unknown protection scheme")
    return doc


def is_encrypted(home: Path) -> bool:
    return bool(read_identity_file(home)["protection"] != "none")


def load_identity(home: Path, passphrase: bytes | None) -> Identity:
    """Open the identity. Raises BadPassphrase, PassphraseRequired, KeystoreCorrupt."""
    return _open(home, passphrase)[0].identity


def unlock(home: Path, passphrase: bytes | None) -> Unlocked:
    """Open the identity and its storage key, as a daemon does. A sealed identity file
    without a storage key (written before there was one) gets one now, written in place
    atomically: the daemon then encrypts its database (p2pd/at_rest.py). Raises what
    :func:`load_identity` raises."""
    unlocked, doc, box = _open(home, passphrase)
    if box is None or unlocked.storage_key is not None:
        return unlocked
    storage_key = nacl.utils.random(STORAGE_KEY_LEN)
    _replace_file(home, {**doc, "storage_key": bytes(box.encrypt(storage_key)).hex()})
    return Unlocked(unlocked.identity, storage_key)


def _open(
    home: Path, passphrase: bytes | None
) -> tuple[Unlocked, dict[str, Any], nacl.secret.SecretBox | None]:
    """The identity, its storage key, the file and (sealed) the box that opened it."""
    doc = read_identity_file(home)
    handle: str = doc["handle"]
    public_key = _hex(doc, "public_key")
    secret = _hex(doc, "secret")
    box: nacl.secret.SecretBox | None = None
    storage_key: bytes | None = None
    if doc["protection"] == "none":
        seed = secret
    else:
        if passphrase is None:
            raise PassphraseRequired()
        kdf = doc.get("kdf")
        if not isinstance(kdf, dict):
            raise KeystoreCorrupt("identity file: kdf parameters missing")
        opslimit = _field(kdf, "opslimit", int)
        memlimit = _field(kdf, "memlimit", int)
        salt = _hex(kdf, "salt")
        # nonce + tag + seed: a fixed length, so damage is told apart from a wrong passphrase
        if len(secret) != _SEALED_LEN:
            raise KeystoreCorrupt("identity file: the sealed secret has the wrong length")
        sealed_storage_key = _hex(doc, "storage_key") if "storage_key" in doc else None
        if sealed_storage_key is not None and len(sealed_storage_key) != _SEALED_LEN:
            raise KeystoreCorrupt("identity file: the sealed storage key has the wrong length")
        if not (
            1 <= opslimit <= MAX_OPSLIMIT
            and 8192 <= memlimit <= MAX_MEMLIMIT
            and len(salt) == nacl.pwhash.argon2id.SALTBYTES
        ):
            raise KeystoreCorrupt("identity file: kdf parameters out of bounds")
        box = nacl.secret.SecretBox(_derive(passphrase, salt, opslimit, memlimit))
        try:
            seed = box.decrypt(secret)
        except nacl.exceptions.CryptoError:
            raise BadPassphrase(f"the passphrase does not open the identity in {home}") from None
        if sealed_storage_key is not None:
            try:
                storage_key = box.decrypt(sealed_storage_key)
            except nacl.exceptions.CryptoError:  # the seed opened: not the passphrase
                raise KeystoreCorrupt("identity file: the storage key is damaged") from None
    if len(seed) != 32:
        raise KeystoreCorrupt("identity file: the secret key has the wrong length")
    identity = Identity.from_seed(handle, seed)
    if identity.public_key != public_key:
        raise KeystoreCorrupt("identity file: the secret key does not match the public key")
    return Unlocked(identity, storage_key), doc, box
