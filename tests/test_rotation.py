"""Rotation notices: both keys sign, nothing else moves a pin."""

from __future__ import annotations

import pytest

from p2pd.errors import RecordError
from p2pd.identity import Identity
from p2pd.rotation import MAX_NOTICE_SIZE, RotationNotice, verify_notice


def test_a_notice_signed_by_both_keys_verifies_and_round_trips() -> None:
    old, new = Identity.generate("alice"), Identity.generate("alice")
    notice = RotationNotice.create(old, new, now=1_800_000_000)
    data = notice.encode()
    assert len(data) <= MAX_NOTICE_SIZE
    back = verify_notice(data)
    assert back == notice
    assert back.moves("alice", old.public_key, new.public_key)
    assert not back.moves("alice", new.public_key, old.public_key)


def test_a_notice_is_refused_when_either_signature_or_any_byte_is_wrong() -> None:
    old, new, mallory = (Identity.generate("alice") for _ in range(3))
    data = RotationNotice.create(old, new, now=1_800_000_000).encode()
    # Mallory cannot rotate alice's handle onto his key: the old key did not sign that.
    forged = RotationNotice.create(mallory, new, now=1_800_000_000)
    spliced = (
        RotationNotice("alice", old.public_key, new.public_key, 1_800_000_000).encode_body()
        + forged.old_signature
        + forged.new_signature
    )
    with pytest.raises(RecordError, match="old key"):
        verify_notice(spliced)
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        with pytest.raises(RecordError):
            verify_notice(bytes(flipped))
    for bad in (b"", data[:-1], data + b"\x00", b"P2RN" + b"\xff" * 300):
        with pytest.raises(RecordError):
            verify_notice(bad)


def test_create_refuses_a_new_handle_or_the_same_key() -> None:
    old = Identity.generate("alice")
    with pytest.raises(RecordError):
        RotationNotice.create(old, Identity.generate("bob"), now=1)
    with pytest.raises(RecordError):
        RotationNotice.create(old, Identity.from_seed("alice", old.seed), now=1)
