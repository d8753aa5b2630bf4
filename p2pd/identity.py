"""Identities, handles and fingerprints.

An identity is an Ed25519 key pair. Its *fingerprint* is the first 20 bytes of
SHA-256(public key), written in lowercase RFC 4648 base32 (32 characters), and shown to
people in groups of four. A *handle* names an identity in the DHT; the self-certifying
form ``alice#<fingerprint prefix>`` additionally names the key, so a lookup can refuse a
record whose key does not match.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InvalidHandle

if TYPE_CHECKING:
    import nacl.signing

# PyNaCl (libsodium through cffi) is imported where keys are made or checked, not above:
# the CLI parses handles before every command and must not pay for it (10 to 15 ms of
# CPU). In the daemon it is loaded once; the import statement after that is a dict lookup.

HANDLE_MIN = 3
HANDLE_MAX = 32
_HANDLE_RE = re.compile(r"[a-z][a-z0-9_]{2,31}")
FINGERPRINT_LEN = 32  # base32 characters (160 bits)
#: The prefix `init`, `status` and `whois` print in the self-certifying form: 80 bits.
DISPLAY_PREFIX = 16
#: The shortest prefix accepted on input: 60 bits. Matching a given prefix of n bits
#: takes about 2**n key generations; at 30 bits (6 characters) that was ten core-hours,
#: at 60 bits it is about 10**9 times more (issue 11, item 6).
MIN_PREFIX = 12
_B32 = set("abcdefghijklmnopqrstuvwxyz234567")


def check_handle(handle: str) -> str:
    """Return ``handle`` if it is valid, else raise :class:`InvalidHandle`.

    A handle is 3-32 characters of ``a-z``, ``0-9`` and ``_``, starting with a letter.
    Upper case is refused rather than folded, so that one handle has one spelling.
    """
    if not isinstance(handle, str) or not _HANDLE_RE.fullmatch(handle):
        shown = handle if isinstance(handle, str) and len(handle) <= 64 else "<too long>"
        raise InvalidHandle(
            f"invalid handle {shown!r}: use {HANDLE_MIN}-{HANDLE_MAX} characters of a-z, 0-9 "
            "and _, starting with a letter"
        )
    return handle


def is_valid_handle(handle: str) -> bool:
    return isinstance(handle, str) and _HANDLE_RE.fullmatch(handle) is not None


@functools.lru_cache(maxsize=4096)  # public keys only; it ran twice per message received
def fingerprint(public_key: bytes) -> str:
    """The 32-character base32 fingerprint of an Ed25519 public key."""
    digest = hashlib.sha256(public_key).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def format_fingerprint(fp: str) -> str:
    """``abcd efgh ...``: the fingerprint in groups of four, for people to compare."""
    return " ".join(fp[i : i + 4] for i in range(0, len(fp), 4))


@dataclass(frozen=True, slots=True)
class HandleRef:
    """A handle as a user typed it: ``alice`` or ``alice#<fingerprint prefix>``."""

    handle: str
    fingerprint_prefix: str | None = None

    @classmethod
    def parse(cls, text: str) -> HandleRef:
        handle, sep, prefix = text.partition("#")
        check_handle(handle)
        if not sep:
            return cls(handle)
        prefix = prefix.lower()
        if not (MIN_PREFIX <= len(prefix) <= FINGERPRINT_LEN) or not set(prefix) <= _B32:
            raise InvalidHandle(
                f"invalid fingerprint prefix in {text[:80]!r}: give {MIN_PREFIX}-"
                f"{FINGERPRINT_LEN} base32 characters (a-z, 2-7) after '#' (at least "
                f"{MIN_PREFIX * 5} bits: a shorter prefix can be matched by grinding keys)"
            )
        return cls(handle, prefix)

    def matches(self, public_key: bytes) -> bool:
        """True when the key fits the fingerprint prefix (always, without one)."""
        if self.fingerprint_prefix is None:
            return True
        return fingerprint(public_key).startswith(self.fingerprint_prefix)

    def __str__(self) -> str:
        if self.fingerprint_prefix is None:
            return self.handle
        return f"{self.handle}#{self.fingerprint_prefix}"


def self_certifying(handle: str, public_key: bytes) -> str:
    return f"{handle}#{fingerprint(public_key)[:DISPLAY_PREFIX]}"


class Identity:
    """An Ed25519 signing key with its handle. Never printed or logged."""

    __slots__ = ("_signing_key", "handle")

    def __init__(self, handle: str, signing_key: nacl.signing.SigningKey) -> None:
        self.handle = check_handle(handle)
        self._signing_key = signing_key

    @classmethod
    def generate(cls, handle: str) -> Identity:
        import nacl.signing

        return cls(handle, nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, handle: str, seed: bytes) -> Identity:
        import nacl.signing

        return cls(handle, nacl.signing.SigningKey(seed))

    @property
    def seed(self) -> bytes:
        return bytes(self._signing_key)

    @property
    def public_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached Ed25519 signature of ``message``."""
        return self._signing_key.sign(message).signature

    def __repr__(self) -> str:  # never the key
        return f"Identity(handle={self.handle!r}, fingerprint={self.fingerprint!r})"


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Ed25519 verification that answers True/False and never raises on bad input."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    import nacl.exceptions
    import nacl.signing

    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True
