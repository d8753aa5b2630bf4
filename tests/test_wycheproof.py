"""Project Wycheproof vectors for the primitives p2pd builds on (Ed25519, X25519).

The vectors are in tests/vectors/ (Wycheproof 0.9rc5 JSON). These tests pin the
behaviour of the PyNaCl/libsodium build the project runs on, and of
p2pd.identity.verify_signature, which must agree with it and never raise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.signing
import pytest

from p2pd.identity import verify_signature

VECTORS = Path(__file__).parent / "vectors"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


def _ed25519_cases() -> list[tuple[int, bytes, bytes, bytes, str, list[str]]]:
    doc = _load("ed25519_test.json")
    assert doc["algorithm"] == "EDDSA"
    cases = []
    for group in doc["testGroups"]:
        assert group["type"] == "EddsaVerify"
        pk = bytes.fromhex(group["publicKey"]["pk"])
        for t in group["tests"]:
            cases.append(
                (
                    t["tcId"],
                    pk,
                    bytes.fromhex(t["msg"]),
                    bytes.fromhex(t["sig"]),
                    t["result"],
                    t["flags"],
                )
            )
    return cases


def _x25519_cases() -> list[tuple[int, bytes, bytes, bytes, str, list[str]]]:
    doc = _load("x25519_test.json")
    assert doc["algorithm"] == "XDH"
    cases = []
    for group in doc["testGroups"]:
        assert group["type"] == "XdhComp"
        assert group["curve"] == "curve25519"
        for t in group["tests"]:
            cases.append(
                (
                    t["tcId"],
                    bytes.fromhex(t["private"]),
                    bytes.fromhex(t["public"]),
                    bytes.fromhex(t["shared"]),
                    t["result"],
                    t["flags"],
                )
            )
    return cases


def test_ed25519_vectors() -> None:
    """Every valid signature verifies, every invalid one is refused, by nacl and by p2pd."""
    checked = {"valid": 0, "invalid": 0}
    failures = []
    for tc_id, pk, msg, sig, result, flags in _ed25519_cases():
        assert result in ("valid", "invalid"), (tc_id, result)  # no "acceptable" for EdDSA
        if len(pk) != 32:
            continue  # not a key this code path can be handed
        try:
            nacl.signing.VerifyKey(pk).verify(msg, sig)
            nacl_ok = True
        except Exception:  # any refusal by nacl counts as a reject
            nacl_ok = False
        p2pd_ok = verify_signature(pk, msg, sig)  # must not raise
        assert isinstance(p2pd_ok, bool)
        expected = result == "valid"
        if nacl_ok != expected or p2pd_ok != expected:
            failures.append((tc_id, flags, result, nacl_ok, p2pd_ok))
        checked[result] += 1
    assert not failures, failures
    assert checked["valid"] > 50 and checked["invalid"] > 50, checked
    assert sum(checked.values()) > 100, checked


def test_x25519_vectors() -> None:
    """crypto_scalarmult matches every valid/acceptable shared secret.

    libsodium's crypto_scalarmult (since 1.0.16) returns -1 when the result is the
    all-zero point, i.e. for a low-order public key; PyNaCl turns that into
    nacl.exceptions.RuntimeError. Wycheproof marks those cases "acceptable" with the
    ZeroSharedSecret (and LowOrderPublic) flags: refusing them is what a careful
    implementation should do, so a raise is accepted there and *only* there.
    """
    checked = refused_zero = 0
    failures = []
    for tc_id, private, public, shared, result, flags in _x25519_cases():
        if len(private) != 32 or len(public) != 32 or len(shared) != 32:
            continue
        assert result in ("valid", "acceptable"), (tc_id, result)  # no invalid X25519 vectors
        all_zero = shared == bytes(32)
        try:
            out = nacl.bindings.crypto_scalarmult(private, public)
        except nacl.exceptions.CryptoError as exc:
            if all_zero and "ZeroSharedSecret" in flags and result == "acceptable":
                refused_zero += 1
                checked += 1
            else:
                failures.append((tc_id, flags, f"raised {type(exc).__name__}"))
            continue
        if out != shared:
            failures.append((tc_id, flags, out.hex(), shared.hex()))
        else:
            checked += 1
    assert not failures, failures
    assert checked > 100, checked
    # The library must refuse the low-order points, not hand back an all-zero key.
    assert refused_zero > 0


def test_x25519_all_zero_results_are_always_refused() -> None:
    """No vector makes libsodium return the all-zero shared secret: it raises instead."""
    zero_cases = [c for c in _x25519_cases() if c[3] == bytes(32)]
    assert len(zero_cases) > 10
    for tc_id, private, public, _shared, _result, flags in zero_cases:
        assert "ZeroSharedSecret" in flags, tc_id
        with pytest.raises(nacl.exceptions.RuntimeError):
            nacl.bindings.crypto_scalarmult(private, public)
