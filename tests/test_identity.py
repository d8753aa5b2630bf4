"""Handles, handle references, fingerprints and signatures (p2pd.identity)."""

from __future__ import annotations

import base64
import hashlib
import re

import nacl.signing
import pytest

from p2pd.errors import InvalidHandle, UsageError
from p2pd.identity import (
    DISPLAY_PREFIX,
    FINGERPRINT_LEN,
    MIN_PREFIX,
    HandleRef,
    Identity,
    check_handle,
    fingerprint,
    format_fingerprint,
    is_valid_handle,
    self_certifying,
    verify_signature,
)

SEED = bytes(range(32))
B32_RE = re.compile(r"[a-z2-7]+")


@pytest.fixture
def alice() -> Identity:
    return Identity.from_seed("alice", SEED)


# --------------------------------------------------------------------------- handles


@pytest.mark.parametrize("handle", ["alice", "a_b", "bob2", "abc", "a" + "b" * 31, "z_9_"])
def test_valid_handles_are_accepted(handle: str) -> None:
    """Lowercase, digits and underscore, 3-32 characters, starting with a letter."""
    assert check_handle(handle) == handle
    assert is_valid_handle(handle)


INVALID_HANDLES = [
    "",
    "ab",
    "a" * 33,
    "Alice",
    "ALICE",
    "1abc",
    "_abc",
    "al-ice",
    "al ice",
    "alice ",
    "alice\n",
    "alicé",
    "ålice",
    "ali\u0441e",  # Cyrillic es
    "alice\u0301",  # combining accent
    "a\u0661bc",  # Arabic-Indic digit one
    "al.ice",
    "alice#abcdefghijkl",
]


@pytest.mark.parametrize("handle", INVALID_HANDLES)
def test_invalid_handles_are_refused_with_the_rule(handle: str) -> None:
    """A bad handle raises InvalidHandle (a usage error) whose message states the rule."""
    with pytest.raises(InvalidHandle) as info:
        check_handle(handle)
    assert isinstance(info.value, UsageError)
    message = str(info.value)
    assert "3-32" in message
    assert "a-z" in message
    assert "starting with a letter" in message
    assert not is_valid_handle(handle)


def test_handle_error_does_not_echo_a_huge_input() -> None:
    """A pasted megabyte is not echoed back in the error message."""
    with pytest.raises(InvalidHandle) as info:
        check_handle("a" * 100_000)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("value", [None, 123, b"alice"])
def test_non_string_handles_are_invalid(value: object) -> None:
    with pytest.raises(InvalidHandle):
        check_handle(value)  # type: ignore[arg-type]
    assert not is_valid_handle(value)  # type: ignore[arg-type]


def test_identity_refuses_an_invalid_handle() -> None:
    with pytest.raises(InvalidHandle):
        Identity.from_seed("Alice", SEED)


# --------------------------------------------------------------------------- HandleRef


def test_handle_ref_without_prefix() -> None:
    ref = HandleRef.parse("alice")
    assert ref == HandleRef("alice", None)
    assert str(ref) == "alice"


def test_handle_ref_with_prefix(alice: Identity) -> None:
    prefix = alice.fingerprint[:MIN_PREFIX]
    ref = HandleRef.parse(f"alice#{prefix}")
    assert ref.handle == "alice"
    assert ref.fingerprint_prefix == prefix
    assert str(ref) == f"alice#{prefix}"


def test_handle_ref_full_fingerprint_is_accepted(alice: Identity) -> None:
    ref = HandleRef.parse(f"alice#{alice.fingerprint}")
    assert ref.fingerprint_prefix == alice.fingerprint
    assert ref.matches(alice.public_key)


def test_handle_ref_prefix_mixed_case_is_lowercased(alice: Identity) -> None:
    """People may type the fingerprint in capitals; it still names the same key."""
    typed = alice.fingerprint[:14].upper()
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(alice.fingerprint[:14]))
    for text in (typed, mixed):
        ref = HandleRef.parse(f"alice#{text}")
        assert ref.fingerprint_prefix == alice.fingerprint[:14]
        assert ref.matches(alice.public_key)


@pytest.mark.parametrize(
    "text",
    [
        "alice#",
        "alice#abcde",  # 5 < MIN_PREFIX
        "alice#abcdefghijk",  # 11 < MIN_PREFIX: 55 bits, within reach of grinding
        "alice#abcdefghijk0",  # 0 is not base32
        "alice#abcdefghijk1",  # 1 is not base32
        "alice#abcdefghijk8",
        "alice#abcdef-ghijk",
        "alice#abcdef ghijk",
        "alice#abcdefghijkl#",
        "alice#" + "a" * (FINGERPRINT_LEN + 1),
        "alice#abcdéf",
    ],
)
def test_handle_ref_bad_prefix_is_refused(text: str) -> None:
    """A prefix must be 12-32 base32 characters (60 bits or more); the error says so."""
    with pytest.raises(InvalidHandle) as info:
        HandleRef.parse(text)
    assert "base32" in str(info.value)
    assert f"{MIN_PREFIX}-{FINGERPRINT_LEN}" in str(info.value)
    assert "12-32" in str(info.value) and "60 bits" in str(info.value)


@pytest.mark.parametrize(
    "text", ["Alice#abcdefghijkl", "#abcdefghijkl", "al#abcdefghijkl", "al ice"]
)
def test_handle_ref_bad_handle_is_refused(text: str) -> None:
    with pytest.raises(InvalidHandle):
        HandleRef.parse(text)


def test_handle_ref_matches_only_the_named_key(alice: Identity) -> None:
    """A self-certifying reference accepts its key and refuses any other."""
    other = Identity.from_seed("alice", bytes(32))
    assert fingerprint(other.public_key)[:MIN_PREFIX] != alice.fingerprint[:MIN_PREFIX]
    ref = HandleRef.parse(f"alice#{alice.fingerprint[:MIN_PREFIX]}")
    assert ref.matches(alice.public_key)
    assert not ref.matches(other.public_key)


def test_handle_ref_without_prefix_matches_any_key(alice: Identity) -> None:
    ref = HandleRef.parse("alice")
    assert ref.matches(alice.public_key)
    assert ref.matches(bytes(32))


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_is_32_lowercase_base32_chars(alice: Identity) -> None:
    fp = fingerprint(alice.public_key)
    assert len(fp) == FINGERPRINT_LEN == 32
    assert B32_RE.fullmatch(fp)
    assert fp == alice.fingerprint


def test_fingerprint_is_sha256_prefix_in_base32(alice: Identity) -> None:
    """The fingerprint is base32(SHA-256(key)[:20]) as docs/PROTOCOL.md specifies."""
    fp = fingerprint(alice.public_key)
    assert base64.b32decode(fp.upper()) == hashlib.sha256(alice.public_key).digest()[:20]


def test_fingerprints_differ_between_keys() -> None:
    a = Identity.from_seed("alice", bytes(32)).public_key
    b = Identity.from_seed("alice", b"\x01" + bytes(31)).public_key
    assert fingerprint(a) != fingerprint(b)


def test_format_fingerprint_groups_of_four(alice: Identity) -> None:
    shown = format_fingerprint(alice.fingerprint)
    groups = shown.split(" ")
    assert len(groups) == 8
    assert all(len(g) == 4 for g in groups)
    assert "".join(groups) == alice.fingerprint


def test_self_certifying_form(alice: Identity) -> None:
    """``init`` prints ``handle#<16 chars of fingerprint>``, which parses back to the key."""
    text = self_certifying("alice", alice.public_key)
    assert text == f"alice#{alice.fingerprint[:DISPLAY_PREFIX]}"
    assert len(text.split("#")[1]) == DISPLAY_PREFIX == 16
    ref = HandleRef.parse(text)
    assert ref.handle == "alice"
    assert ref.matches(alice.public_key)


# --------------------------------------------------------------------------- Identity


def test_identity_repr_and_str_never_show_the_seed(alice: Identity) -> None:
    """Printing or logging an identity never reveals the private key."""
    for shown in (repr(alice), str(alice), f"{alice}", f"{alice!r}"):
        assert SEED.hex() not in shown
        assert SEED.hex().upper() not in shown
        assert repr(SEED) not in shown
        assert "alice" in shown
        assert alice.fingerprint in shown


def test_identity_generate_makes_distinct_keys() -> None:
    a, b = Identity.generate("alice"), Identity.generate("alice")
    assert a.public_key != b.public_key
    assert len(a.seed) == 32
    assert Identity.from_seed("alice", a.seed).public_key == a.public_key


# --------------------------------------------------------------------------- signatures


def test_signature_verifies(alice: Identity) -> None:
    sig = alice.sign(b"hello")
    assert len(sig) == 64
    assert verify_signature(alice.public_key, b"hello", sig) is True
    nacl.signing.VerifyKey(alice.public_key).verify(b"hello", sig)


def test_tampered_message_does_not_verify(alice: Identity) -> None:
    sig = alice.sign(b"hello")
    assert verify_signature(alice.public_key, b"hellp", sig) is False
    assert verify_signature(alice.public_key, b"hello ", sig) is False
    assert verify_signature(alice.public_key, b"", sig) is False


def test_every_flipped_signature_bit_fails(alice: Identity) -> None:
    sig = alice.sign(b"hello")
    for i in range(len(sig) * 8):
        bad = bytearray(sig)
        bad[i // 8] ^= 1 << (i % 8)
        assert verify_signature(alice.public_key, b"hello", bytes(bad)) is False


def test_other_key_does_not_verify(alice: Identity) -> None:
    other = Identity.from_seed("alice", bytes(32))
    assert verify_signature(other.public_key, b"hello", alice.sign(b"hello")) is False


@pytest.mark.parametrize("key_len", [0, 1, 31, 33, 64])
def test_wrong_length_key_is_false_not_an_exception(alice: Identity, key_len: int) -> None:
    sig = alice.sign(b"hello")
    key = (alice.public_key * 3)[:key_len]
    assert verify_signature(key, b"hello", sig) is False


@pytest.mark.parametrize("sig_len", [0, 1, 63, 65, 128])
def test_wrong_length_signature_is_false_not_an_exception(alice: Identity, sig_len: int) -> None:
    sig = alice.sign(b"hello")
    assert verify_signature(alice.public_key, b"hello", (sig * 3)[:sig_len]) is False
    assert verify_signature(alice.public_key, b"hello", sig + b"\x00") is False


@pytest.mark.parametrize(
    "key",
    [
        bytes(32),  # small-order point (identity encoding variants)
        b"\x01" + bytes(31),
        b"\xff" * 32,  # not a canonical field element
        b"\xec" + b"\xff" * 30 + b"\x7f",
    ],
)
def test_degenerate_keys_are_false_not_an_exception(alice: Identity, key: bytes) -> None:
    assert verify_signature(key, b"hello", alice.sign(b"hello")) is False
    assert verify_signature(key, b"hello", bytes(64)) is False
