"""Signed handle records (p2pd.records): encoding, verification, bounds, storage rule,
version 2's rotation field and the claim that outlives the presence."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pd.errors import RecordError, WireError
from p2pd.identity import Identity
from p2pd.records import (
    CLAIM_LIFETIME,
    MAGIC,
    MAX_ADDRESSES,
    MAX_CLOCK_SKEW,
    MAX_EXTENSION,
    MAX_LIFETIME,
    MAX_RECORD_SIZE,
    MAX_RELAYS,
    MAX_SEQ,
    SIGNATURE_CONTEXT,
    VERSION,
    HandleRecord,
    Verdict,
    claim_ends,
    dht_key,
    judge,
    verify_claim,
    verify_record,
)
from p2pd.rotation import MAX_NOTICE_SIZE, RotationNotice
from p2pd.wire import (
    Address,
)

NOW = 1_700_000_000
HOUR = 3600
ALICE = Identity.from_seed("alice", bytes(range(32)))
MALLORY = Identity.from_seed("alice", bytes(range(1, 33)))
ADDRS = (Address("192.0.2.1", 4000), Address("2001:db8::1", 4001))


def make(
    identity: Identity = ALICE,
    addresses: tuple[Address, ...] = ADDRS,
    *,
    seq: int = 1,
    now: int = NOW,
    lifetime: int = HOUR,
    extension: bytes = b"ext",
    rotation: bytes = b"",
    relays: tuple[Address, ...] = (),
) -> HandleRecord:
    return HandleRecord.create(
        identity,
        addresses,
        seq=seq,
        now=now,
        lifetime=lifetime,
        extension=extension,
        rotation=rotation,
        relays=relays,
    )


def sign_raw(identity: Identity, record: HandleRecord) -> bytes:
    """Encode and sign a record *without* the bounds checks create() applies."""
    body = record.encode_body()
    return body + identity.sign(SIGNATURE_CONTEXT + body)


# --------------------------------------------------------------------------- round trip


def test_create_encode_decode_verify_round_trip() -> None:
    record = make()
    data = record.encode()
    assert data.startswith(MAGIC + bytes([VERSION]))
    decoded = HandleRecord.decode(data)
    assert decoded == record
    assert decoded.addresses == ADDRS
    assert decoded.extension == b"ext"
    assert decoded.signature_valid()
    decoded.verify(NOW)
    assert verify_record(data, NOW) == record
    assert verify_record(data, NOW, key=dht_key("alice")) == record
    assert record.key == dht_key("alice")
    assert record.fingerprint == ALICE.fingerprint


def test_record_with_no_addresses_and_no_extension() -> None:
    record = make(addresses=(), extension=b"")
    assert verify_record(record.encode(), NOW) == record


def largest_record() -> HandleRecord:
    """A 32-char handle, 8 IPv6 addresses, a full extension, a rotation notice and
    the most relays."""
    old = Identity.from_seed("a" * 32, bytes(32))
    new = Identity.from_seed("a" * 32, bytes(range(32)))
    notice = RotationNotice.create(old, new, now=NOW).encode()
    assert len(notice) == MAX_NOTICE_SIZE
    addrs = tuple(Address(f"2001:db8::{i + 1}", 65535) for i in range(MAX_ADDRESSES))
    relays = tuple(Address(f"2001:db8:1::{i + 1}", 65535) for i in range(MAX_RELAYS))
    return make(
        new,
        addrs,
        extension=b"\xff" * MAX_EXTENSION,
        seq=MAX_SEQ,
        rotation=notice,
        relays=relays,
    )


def test_largest_record_fits_max_record_size() -> None:
    record = largest_record()
    data = record.encode()
    assert len(data) == MAX_RECORD_SIZE == 2678
    assert verify_record(data, NOW) == record


def test_version_1_records_are_refused_by_name() -> None:
    data = bytearray(make().encode())
    data[4] = 1
    with pytest.raises(RecordError, match=r"version 1 \(an older p2pd\) is no longer accepted"):
        HandleRecord.decode(bytes(data))


def test_rotation_field_round_trips_and_must_name_this_key_and_handle() -> None:
    new = Identity.from_seed("alice", bytes(range(2, 34)))
    notice = RotationNotice.create(ALICE, new, now=NOW).encode()
    record = make(new, rotation=notice)
    assert verify_record(record.encode(), NOW).rotation == notice
    assert record.rotated_from(ALICE.public_key)
    assert not record.rotated_from(MALLORY.public_key)
    assert not make(new).rotated_from(ALICE.public_key)
    # a notice for another key (here: the one it moves from) does not verify as a claim
    wrong = make(ALICE, rotation=notice)
    with pytest.raises(RecordError, match="another handle or key"):
        verify_claim(wrong.encode(), NOW)
    forged = bytearray(notice)
    forged[-1] ^= 1
    with pytest.raises(RecordError, match="new key"):
        verify_claim(make(new, rotation=bytes(forged)).encode(), NOW)
    with pytest.raises(RecordError, match="rotation"):
        make(new, rotation=b"\x00" * (MAX_NOTICE_SIZE + 1))


def test_an_expired_presence_is_still_a_valid_claim() -> None:
    record = make(lifetime=HOUR)
    later = NOW + 30 * 24 * HOUR
    assert verify_claim(record.encode(), later) == record
    assert not record.present(later)
    with pytest.raises(RecordError, match="expired"):
        verify_record(record.encode(), later)
    assert record.without_presence().addresses == ()
    # a claim lasts a year from its last refresh, never counted from after its issue
    assert claim_ends(record, NOW + 5) == NOW + CLAIM_LIFETIME
    assert claim_ends(record, NOW - 5) == NOW - 5 + CLAIM_LIFETIME


def test_unsigned_record_does_not_encode() -> None:
    unsigned = dataclasses.replace(make(), signature=b"")
    with pytest.raises(RecordError):
        unsigned.encode()


# --------------------------------------------------------------------------- tampering


def _tampered_fields() -> list[tuple[str, dict[str, Any]]]:
    other_addrs = [
        ("address0-host", (Address("192.0.2.2", 4000), ADDRS[1])),
        ("address0-port", (Address("192.0.2.1", 4001), ADDRS[1])),
        ("address1-host", (ADDRS[0], Address("2001:db8::2", 4001))),
        ("address1-port", (ADDRS[0], Address("2001:db8::1", 4002))),
        ("address-dropped", (ADDRS[0],)),
        ("address-added", (*ADDRS, Address("198.51.100.7", 9))),
        ("address-reordered", (ADDRS[1], ADDRS[0])),
    ]
    return [
        ("handle", {"handle": "alicf"}),
        ("public_key", {"public_key": MALLORY.public_key}),
        *((name, {"addresses": addrs}) for name, addrs in other_addrs),
        ("seq", {"seq": 2}),
        ("seq-down", {"seq": 0}),
        ("issued", {"issued": NOW - 1}),
        ("expires", {"expires": NOW + HOUR + 1}),
        ("expires-down", {"expires": NOW + HOUR - 1}),
        ("extension", {"extension": b"exu"}),
        ("extension-empty", {"extension": b""}),
        ("extension-longer", {"extension": b"ext\x00"}),
        ("signature", {"signature": bytes(64)}),
        ("signature-other", {"signature": MALLORY.sign(b"x")}),
    ]


@pytest.mark.parametrize(
    "changes", [c for _, c in _tampered_fields()], ids=[n for n, _ in _tampered_fields()]
)
def test_tampered_field_fails_verification(changes: dict[str, Any]) -> None:
    """Changing any signed field after signing (keeping the old signature) is caught."""
    record = make()
    tampered = dataclasses.replace(record, **changes)
    assert tampered != record
    data = tampered.encode()  # in bounds: only the signature can give it away
    assert HandleRecord.decode(data) == tampered
    assert not tampered.signature_valid()
    with pytest.raises(RecordError):
        tampered.verify(NOW)
    with pytest.raises(RecordError):
        verify_record(data, NOW)


def test_every_single_byte_flip_fails_verification() -> None:
    """No corruption of any one byte of a record yields a record that verifies."""
    data = make().encode()
    verify_record(data, NOW)
    for i in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            try:
                verify_record(bytes(bad), NOW)
            except RecordError:
                continue
            pytest.fail(f"flipping byte {i} with {mask:#x} still verifies")


def test_truncations_fail_with_record_error() -> None:
    data = make().encode()
    for n in range(len(data)):
        with pytest.raises(RecordError):
            verify_record(data[:n], NOW)


# --------------------------------------------------------------------------- time


def test_expired_record_is_refused() -> None:
    record = make(lifetime=HOUR)
    data = record.encode()
    verify_record(data, NOW + HOUR - 1)
    with pytest.raises(RecordError, match="expired"):
        verify_record(data, NOW + HOUR)
    with pytest.raises(RecordError, match="expired"):
        verify_record(data, NOW + 10 * HOUR)


def test_record_issued_in_the_future_is_refused() -> None:
    """Up to MAX_CLOCK_SKEW of clock difference is tolerated, no more."""
    record = make(now=NOW + MAX_CLOCK_SKEW)
    verify_record(record.encode(), NOW)
    ahead = make(now=NOW + MAX_CLOCK_SKEW + 1)
    with pytest.raises(RecordError, match="future"):
        verify_record(ahead.encode(), NOW)


@pytest.mark.parametrize("lifetime", [MAX_LIFETIME + 1, 10 * MAX_LIFETIME, 0, -1])
def test_create_refuses_lifetime_out_of_bounds(lifetime: int) -> None:
    with pytest.raises(RecordError):
        make(lifetime=lifetime)


def test_create_accepts_max_lifetime() -> None:
    record = make(lifetime=MAX_LIFETIME)
    verify_record(record.encode(), NOW + MAX_LIFETIME - 1)


def test_decode_refuses_signed_lifetime_over_max() -> None:
    """A correctly signed record with too long a claim is still refused."""
    record = dataclasses.replace(make(), expires=NOW + MAX_LIFETIME + 1)
    with pytest.raises(RecordError):
        verify_record(sign_raw(ALICE, record), NOW)


def test_decode_refuses_expires_before_issued() -> None:
    record = dataclasses.replace(make(), expires=NOW)
    with pytest.raises(RecordError):
        verify_record(sign_raw(ALICE, record), NOW - 1)


# --------------------------------------------------------------------------- size bounds


def test_data_longer_than_max_record_size_is_refused() -> None:
    data = largest_record().encode()
    with pytest.raises(RecordError, match="too large"):
        HandleRecord.decode(data + b"\x00")
    with pytest.raises(RecordError, match="too large"):
        verify_record(b"\x00" * (MAX_RECORD_SIZE + 1), NOW)


def test_nine_addresses_refused_at_create() -> None:
    addrs = tuple(Address("192.0.2.1", 1000 + i) for i in range(MAX_ADDRESSES + 1))
    with pytest.raises(RecordError):
        make(addresses=addrs)
    make(addresses=addrs[:MAX_ADDRESSES])


def test_nine_addresses_refused_at_decode() -> None:
    addrs = tuple(Address("192.0.2.1", 1000 + i) for i in range(MAX_ADDRESSES + 1))
    record = dataclasses.replace(make(addresses=()), addresses=addrs)
    data = sign_raw(ALICE, record)
    assert len(data) <= MAX_RECORD_SIZE
    with pytest.raises(RecordError, match="address"):
        verify_record(data, NOW)


def test_extension_over_max_refused_at_create() -> None:
    with pytest.raises(RecordError):
        make(extension=b"\x00" * (MAX_EXTENSION + 1))
    make(extension=b"\x00" * MAX_EXTENSION)


def test_extension_over_max_refused_at_decode() -> None:
    record = dataclasses.replace(make(extension=b""), extension=b"\x00" * (MAX_EXTENSION + 1))
    data = sign_raw(ALICE, record)
    assert len(data) <= MAX_RECORD_SIZE
    with pytest.raises(RecordError, match="extension"):
        verify_record(data, NOW)


def test_port_zero_refused() -> None:
    with pytest.raises(RecordError):
        make(addresses=(Address("192.0.2.1", 0),))
    record = dataclasses.replace(make(addresses=()), addresses=(Address("192.0.2.1", 0),))
    with pytest.raises(RecordError):
        verify_record(sign_raw(ALICE, record), NOW)


@pytest.mark.parametrize("seq", [-1, MAX_SEQ + 1])
def test_seq_out_of_range_refused(seq: int) -> None:
    with pytest.raises(RecordError):
        make(seq=seq)
    if seq > MAX_SEQ:
        record = dataclasses.replace(make(), seq=seq)
        with pytest.raises(RecordError):
            verify_record(sign_raw(ALICE, record), NOW)


@pytest.mark.parametrize("handle", ["Alice", "ab", "al-ce", "1lice"])
def test_signed_record_with_invalid_handle_refused(handle: str) -> None:
    record = dataclasses.replace(make(), handle=handle)
    with pytest.raises(RecordError):
        verify_record(sign_raw(ALICE, record), NOW)


def test_non_ascii_handle_bytes_refused() -> None:
    data = bytearray(make().encode())
    data[6] = 0xE9  # first handle byte
    with pytest.raises(RecordError):
        HandleRecord.decode(bytes(data))


def test_unknown_magic_or_version_refused() -> None:
    data = make().encode()
    with pytest.raises(RecordError):
        HandleRecord.decode(b"P2HX" + data[4:])
    with pytest.raises(RecordError):
        HandleRecord.decode(data[:4] + bytes([VERSION + 1]) + data[5:])


# --------------------------------------------------------------------------- key & canon


def test_record_under_the_wrong_dht_key_is_refused() -> None:
    """Alice's record offered under Bob's DHT key is not Bob's record."""
    data = make().encode()
    with pytest.raises(RecordError):
        verify_record(data, NOW, key=dht_key("bob"))
    assert verify_record(data, NOW, key=dht_key("alice")).handle == "alice"


def test_dht_keys_are_20_bytes_and_distinct() -> None:
    assert len(dht_key("alice")) == 20
    assert dht_key("alice") != dht_key("alicf")


def test_trailing_bytes_are_refused() -> None:
    """One record, one encoding: appended bytes make it invalid."""
    data = make().encode()
    for extra in (b"\x00", b"\xff" * 10, data):
        with pytest.raises(RecordError):
            HandleRecord.decode(data + extra)


@pytest.mark.parametrize("data", [bytearray(b"P2HR"), memoryview(b"P2HR"), "P2HR", None])
def test_non_bytes_input_is_record_error(data: Any) -> None:
    with pytest.raises(RecordError):
        HandleRecord.decode(data)


# --------------------------------------------------------------------------- storage rule


def test_judge_first_claim_is_accepted() -> None:
    assert judge(make(), None) == Verdict.ACCEPT


def test_judge_other_key_refused_while_claim_held() -> None:
    held = make(ALICE, seq=1, lifetime=HOUR)
    usurper = make(MALLORY, seq=99)
    assert judge(usurper, held) == Verdict.OTHER_KEY


def test_judge_other_key_with_a_rotation_notice_from_the_held_key_is_rotated() -> None:
    new = Identity.from_seed("alice", bytes(range(2, 34)))
    moved = make(new, rotation=RotationNotice.create(ALICE, new, now=NOW).encode())
    assert judge(moved, make(ALICE, seq=7)) == Verdict.ROTATED
    # the notice moves alice from ALICE's key only: not from MALLORY's
    assert judge(moved, make(MALLORY, seq=7)) == Verdict.OTHER_KEY


def test_judge_same_key_higher_seq_accepted() -> None:
    assert judge(make(seq=2), make(seq=1)) == Verdict.ACCEPT
    assert judge(make(seq=MAX_SEQ), make(seq=0)) == Verdict.ACCEPT


def test_judge_same_key_lower_seq_is_stale() -> None:
    assert judge(make(seq=1), make(seq=2)) == Verdict.STALE


def test_judge_same_seq_different_content_is_stale() -> None:
    held = make(seq=3)
    other = make(seq=3, extension=b"different")
    assert other.encode() != held.encode()
    assert judge(other, held) == Verdict.STALE


def test_judge_identical_record_is_same() -> None:
    held = make(seq=3)
    again = HandleRecord.decode(held.encode())
    assert judge(again, held) == Verdict.SAME


# --------------------------------------------------------------------------- properties

handles = st.from_regex(r"[a-z][a-z0-9_]{2,31}", fullmatch=True)
addresses = st.builds(
    Address,
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
    st.integers(1, 65535),
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_RECORD_SIZE + 16))
def test_decode_arbitrary_bytes_raises_only_record_error(data: bytes) -> None:
    with contextlib.suppress(RecordError):
        HandleRecord.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_RECORD_SIZE))
def test_decode_bytes_after_valid_header_raise_only_record_error(tail: bytes) -> None:
    """Past the magic and version the decoder walks lengths; it must still stay bounded."""
    with contextlib.suppress(RecordError):
        verify_record(MAGIC + bytes([VERSION]) + tail, NOW)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_records_raise_only_record_error(data: st.DataObject) -> None:
    """Random edits to a real record (overwrite, insert, delete) never escape RecordError."""
    raw = bytearray(make().encode())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw)))
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.integers(0, 255))
        if op == "set" and pos < len(raw):
            raw[pos] = byte
        elif op == "insert":
            raw.insert(pos, byte)
        elif pos < len(raw):
            del raw[pos]
    with contextlib.suppress(RecordError):
        verify_record(bytes(raw), NOW)


@settings(max_examples=300, deadline=None)
@given(
    handle=handles,
    seed=st.binary(min_size=32, max_size=32),
    addrs=st.lists(addresses, max_size=MAX_ADDRESSES),
    seq=st.integers(0, MAX_SEQ),
    now=st.integers(0, 1 << 40),
    lifetime=st.integers(1, MAX_LIFETIME),
    extension=st.binary(max_size=MAX_EXTENSION),
)
def test_round_trip_property(
    handle: str,
    seed: bytes,
    addrs: list[Address],
    seq: int,
    now: int,
    lifetime: int,
    extension: bytes,
) -> None:
    identity = Identity.from_seed(handle, seed)
    record = HandleRecord.create(
        identity, addrs, seq=seq, now=now, lifetime=lifetime, extension=extension
    )
    data = record.encode()
    assert len(data) <= MAX_RECORD_SIZE
    decoded = verify_record(data, now, key=dht_key(handle))
    assert decoded == record
    assert decoded.addresses == tuple(addrs)
    assert decoded.encode() == data
    assert judge(decoded, record) == Verdict.SAME


def test_record_error_is_a_wire_error() -> None:
    """Callers that catch WireError for bad network bytes also catch bad records."""
    assert issubclass(RecordError, WireError)


def test_relays_round_trip_and_leave_a_record_without_them_unchanged() -> None:
    plain = make()
    relays = (Address("198.18.1.11", 4747), Address("2001:db8::7", 4747))
    relayed = make(relays=relays)
    assert verify_record(relayed.encode(), NOW).relays == relays
    # no relays: no relay bytes at all (what an older p2pd encodes and decodes)
    assert relayed.encode_body().startswith(plain.encode_body())
    assert len(relayed.encode()) == len(plain.encode()) + 1 + 7 + 19
    with pytest.raises(RecordError, match="at most"):
        make(relays=(Address("198.18.1.11", 4747),) * (MAX_RELAYS + 1))
    # a zero count is not canonical; a count above the bound is refused before reading
    data = plain.encode()
    for count in (0, MAX_RELAYS + 1):
        forged = data[:-64] + bytes([count]) + bytes(19) * count + data[-64:]
        with pytest.raises(RecordError):
            HandleRecord.decode(forged)
    # the signature covers the relays: a relay swapped in does not verify
    swapped = relayed.encode().replace(bytes([198, 18, 1, 11]), bytes([203, 0, 113, 9]))
    with pytest.raises(RecordError, match="signature"):
        verify_record(swapped, NOW)
