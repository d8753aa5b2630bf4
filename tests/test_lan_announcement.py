"""LAN discovery: the sans-I/O core, p2pd.lan_announcement. No zeroconf, no trio, no
clock: every test passes ``now``. The zeroconf service is tested in tests/test_discovery.py,
the interface address helpers in tests/test_netif.py."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lan_helpers import (
    ALICE,
    BOB,
    HOSTS,
    MALLORY,
    NONCE,
    NOW,
    PORT,
    SOURCES,
    b64,
    contacts_of,
    no_pins,
    pins_of,
    txt,
)

from p2pd.errors import WireError
from p2pd.identity import Identity
from p2pd.lan_announcement import (
    MAX_TXT_KEYS,
    MAX_TXT_SIZE,
    TAG_SCANS_PER_SOURCE,
    LanAnnouncementError,
    LanNotAContact,
    LanPeer,
    LanPeerTable,
    LanPinConflict,
    TagScanBudget,
    TagScanSkipped,
    build_txt,
    decode_announcement,
    decode_txt,
    encode_txt,
    epoch_day,
    lan_tag,
    parse_txt,
    recognise_tag,
)
from p2pd.wire import Address


def parse(
    text: bytes,
    *,
    sources: list[Address] = SOURCES,
    now: float = NOW,
    contacts: Mapping[bytes, str] | None = None,
    pins: Callable[[str], bytes | None] = no_pins,
) -> LanPeer:
    return parse_txt(text, source_addresses=sources, now=now, contacts=contacts or {}, pins=pins)


def resign(props: dict[bytes, bytes], identity: Identity = ALICE) -> dict[bytes, bytes]:
    """Sign ``props`` as they are (for tests that need a valid signature over odd values)."""
    ann = decode_announcement({**props, b"s": b64(b"\0" * 64)}, now=NOW)
    out = dict(props)
    out[b"s"] = b64(identity.sign(ann.signed_bytes()))
    return out


# --------------------------------------------------------------------------- round trips


def test_everyone_round_trip() -> None:
    props = build_txt(ALICE, port=PORT, addresses=HOSTS, mode="everyone", now=NOW)
    assert list(props)[:4] == [b"v", b"m", b"p", b"t"]  # version first, RFC 6763 6.7
    assert props[b"h"] == b"alice" and props[b"k"] == b64(ALICE.public_key)
    text = encode_txt(props)
    assert decode_txt(text) == props
    assert len(text) < 400
    peer = parse(text)
    assert peer.handle == "alice"
    assert peer.public_key == ALICE.public_key
    assert peer.addresses == tuple(SOURCES)
    assert peer.mode == "everyone"
    assert peer.issued == NOW and peer.last_seen == NOW
    assert peer.pinned is False  # claimed, not proven
    assert parse(text, pins=pins_of(ALICE)).pinned is True


def test_contacts_round_trip() -> None:
    text = txt(mode="contacts")
    props = decode_txt(text)
    assert set(props) == {b"v", b"m", b"p", b"t", b"n", b"g", b"a", b"s"}
    peer = parse(text, contacts=contacts_of(BOB, ALICE), pins=pins_of(ALICE, BOB))
    assert (peer.handle, peer.public_key, peer.mode, peer.pinned) == (
        "alice",
        ALICE.public_key,
        "contacts",
        True,
    )
    assert peer.addresses == tuple(SOURCES)


def test_summary_is_json() -> None:
    peer = parse(txt(), pins=pins_of(ALICE))
    summary = peer.summary()
    assert json.loads(json.dumps(summary)) == {
        "handle": "alice",
        "fingerprint": ALICE.fingerprint,
        "addresses": ["192.0.2.10:4747", "[2001:db8::10]:4747"],
        "via": "lan",
        "last_seen": NOW,
        "pinned": True,
        "verified": True,
        "mode": "everyone",
    }


# --------------------------------------------------------------------------- contacts mode privacy


def test_stranger_cannot_recognise_contacts_mode() -> None:
    text = txt(mode="contacts")
    # nothing in the record names alice or her key
    for secret in (b"alice", b64(ALICE.public_key), ALICE.fingerprint.encode()):
        assert secret not in text
    with pytest.raises(LanNotAContact):
        parse(text, contacts=contacts_of(BOB, MALLORY))
    with pytest.raises(LanNotAContact):
        parse(text, contacts={})


def test_tag_changes_with_nonce_and_day() -> None:
    key = ALICE.public_key
    day = epoch_day(NOW)
    base = lan_tag(key, NONCE, day)
    assert len(base) == 16
    assert lan_tag(key, NONCE, day) == base
    assert lan_tag(key, bytes(16), day) != base
    assert lan_tag(key, NONCE, day + 1) != base
    assert lan_tag(BOB.public_key, NONCE, day) != base
    assert recognise_tag(NONCE, base, day, [BOB.public_key, key]) == key
    assert recognise_tag(NONCE, base, day + 1, [key]) is None
    # the scan is bounded
    assert recognise_tag(NONCE, base, day, [BOB.public_key, key], limit=1) is None


def test_two_periods_share_nothing_but_shape() -> None:
    one = decode_txt(
        encode_txt(
            build_txt(
                ALICE, port=PORT, addresses=HOSTS, mode="contacts", now=NOW, nonce=b"\x11" * 16
            )
        )
    )
    two = decode_txt(
        encode_txt(
            build_txt(
                ALICE,
                port=PORT,
                addresses=HOSTS,
                mode="contacts",
                now=NOW + 86400,
                nonce=b"\x22" * 16,
            )
        )
    )
    for key in (b"n", b"g", b"s", b"t"):
        assert one[key] != two[key]
    # what stays equal is what the network shows anyway (port, addresses) or constant
    assert {k for k in one if one[k] == two[k]} == {b"v", b"m", b"p", b"a"}


def test_contacts_tag_uses_the_signed_day() -> None:
    # just before midnight by the announcer's clock, just after by ours: still recognised
    midnight = (epoch_day(NOW) + 1) * 86400
    text = txt(mode="contacts", now=midnight - 5)
    peer = parse(text, now=midnight + 5, contacts=contacts_of(ALICE), pins=pins_of(ALICE))
    assert peer.handle == "alice"


def test_contacts_mode_the_pin_decides() -> None:
    # the contact list may be a snapshot a few seconds old; the pins are read live
    text = txt(mode="contacts")
    with pytest.raises(LanNotAContact, match="no longer"):
        parse(text, contacts=contacts_of(ALICE), pins=no_pins)
    alice_again = Identity.from_seed("alice", b"\x09" * 32)
    with pytest.raises(LanPinConflict):
        parse(text, contacts=contacts_of(ALICE), pins=pins_of(alice_again))


def test_contacts_mode_with_tag_forged_by_someone_who_knows_the_key() -> None:
    # Anyone who knows alice's public key can compute a tag for it, but not sign.
    props = decode_txt(txt(MALLORY, mode="contacts"))
    props[b"g"] = b64(lan_tag(ALICE.public_key, NONCE, epoch_day(NOW)))
    with pytest.raises(LanAnnouncementError, match="signature"):
        parse(encode_txt(props), contacts=contacts_of(ALICE))


# --------------------------------------------------------------------------- tampering


def _other_value(key: bytes, props: dict[bytes, bytes]) -> bytes:
    return {
        b"v": b"2",
        b"m": b"c" if props[b"m"] == b"e" else b"e",
        b"p": b"4748",
        b"t": str(NOW + 1).encode(),
        b"h": b"alicf",
        b"k": b64(MALLORY.public_key),
        b"a": b64(b"\x04" + bytes([192, 0, 2, 11])),
        b"s": b64(bytes([props[b"s"][0] ^ 1]) + base64.urlsafe_b64decode(props[b"s"] + b"==")[1:]),
        b"n": b64(b"\x99" * 16),
        b"g": b64(b"\x98" * 16),
    }[key]


@pytest.mark.parametrize("mode", ["everyone", "contacts"])
def test_every_field_tampered(mode: str) -> None:
    props = decode_txt(txt(mode=mode))
    for key in props:
        tampered = dict(props)
        tampered[key] = _other_value(key, props)
        # sources that agree with whatever the record now claims, so that only the
        # signature, the tag or the shape can refuse it
        port = int(tampered[b"p"]) if tampered[b"p"].isdigit() else PORT
        sources = [Address(h, port) for h in [*HOSTS, "192.0.2.11"]]
        with pytest.raises(LanAnnouncementError):
            parse(
                encode_txt(tampered),
                sources=sources,
                contacts=contacts_of(ALICE),
                pins=pins_of(ALICE),
            )


def test_signature_binds_port_time_addresses() -> None:
    props = decode_txt(txt())
    for key, value in [(b"p", b"4748"), (b"t", str(NOW - 1).encode())]:
        tampered = {**props, key: value}
        port = int(tampered[b"p"])
        with pytest.raises(LanAnnouncementError, match="signature"):
            parse(encode_txt(tampered), sources=[Address(h, port) for h in HOSTS])
    tampered = {**props, b"a": b64(b"\x04" + bytes([192, 0, 2, 11]))}
    with pytest.raises(LanAnnouncementError, match="signature"):
        parse(encode_txt(tampered), sources=[Address("192.0.2.11", PORT)])


def test_pinned_handle_with_another_key() -> None:
    impostor = Identity.from_seed("alice", b"\x09" * 32)
    with pytest.raises(LanPinConflict, match="pinned"):
        parse(txt(impostor), pins=pins_of(ALICE))
    # the same announcement from an unknown handle is only "claimed"
    assert parse(txt(impostor)).pinned is False


def test_missing_keys() -> None:
    for mode in ("everyone", "contacts"):
        props = decode_txt(txt(mode=mode))
        for key in props:
            partial = {k: v for k, v in props.items() if k != key}
            with pytest.raises(LanAnnouncementError):
                parse(encode_txt(partial), contacts=contacts_of(ALICE))


def test_mixed_modes_refused() -> None:
    everyone = decode_txt(txt())
    contacts = decode_txt(txt(mode="contacts"))
    with pytest.raises(LanAnnouncementError, match="tag"):
        decode_announcement({**everyone, b"n": contacts[b"n"]}, now=NOW)
    with pytest.raises(LanAnnouncementError, match="names its key"):
        decode_announcement({**contacts, b"k": everyone[b"k"]}, now=NOW)


def test_unknown_keys_ignored_and_keys_case_insensitive() -> None:
    props = decode_txt(txt())
    extended = {**props, b"x-future": b"whatever"}
    assert parse(encode_txt(extended)).handle == "alice"
    upper = {k.upper(): v for k, v in props.items()}
    assert parse(encode_txt(upper)).handle == "alice"


# --------------------------------------------------------------------------- bounds and syntax


def test_oversize_record() -> None:
    props = decode_txt(txt())
    for i in range(4):
        props[f"x{i}".encode()] = b"z" * 240
    text = encode_txt(props)
    assert len(text) > MAX_TXT_SIZE
    with pytest.raises(LanAnnouncementError, match="bytes"):
        parse(text)


def test_too_many_keys() -> None:
    props = decode_txt(txt())
    for i in range(MAX_TXT_KEYS - len(props)):
        props[f"x{i}".encode()] = b"1"
    assert parse(encode_txt(props)).handle == "alice"  # exactly 16: fine
    props[b"one-more"] = b"1"
    with pytest.raises(LanAnnouncementError, match="keys"):
        parse(encode_txt(props))


def test_duplicate_keys() -> None:
    text = txt()
    with pytest.raises(LanAnnouncementError, match="duplicate"):
        decode_txt(text + encode_txt({b"h": b"mallory"}))
    with pytest.raises(LanAnnouncementError, match="duplicate"):
        decode_txt(text + encode_txt({b"H": b"alice"}))


@pytest.mark.parametrize(
    "text, reason",
    [
        (b"", "empty"),
        (b"\x05v=1", "truncated"),
        (b"\x03v=1\x00", "empty TXT string"),
        (b"\x01v", "without a value"),
        (b"\x02=1", "key"),
        (b"\x04\x01v=1", "key"),
        (b"\x04\xc3v=1", "key"),
    ],
)
def test_malformed_txt(text: bytes, reason: str) -> None:
    with pytest.raises(LanAnnouncementError, match=reason):
        decode_txt(text)


def test_stale_and_future_announcements() -> None:
    text = txt()
    assert parse(text, now=NOW + 600).handle == "alice"
    assert parse(text, now=NOW - 600).handle == "alice"
    with pytest.raises(LanAnnouncementError, match="stale"):
        parse(text, now=NOW + 601)  # a replay of an old one
    with pytest.raises(LanAnnouncementError, match="stale"):
        parse(text, now=NOW - 601)
    with pytest.raises(LanAnnouncementError, match="stale"):
        parse_txt(
            text,
            source_addresses=SOURCES,
            now=NOW + 61,
            contacts={},
            pins=no_pins,
            max_clock_skew=60,
        )


@pytest.mark.parametrize(
    "key, value",
    [
        (b"k", b64(ALICE.public_key) + b"="),  # padding
        (b"k", b64(ALICE.public_key)[:-1] + b"+"),  # not url-safe
        (b"k", b64(ALICE.public_key)[:-1] + b"B"),  # non-canonical trailing bits
        (b"k", b64(ALICE.public_key[:31])),  # short
        (b"k", b64(ALICE.public_key)[:-1]),  # length 4n+1... or truncated
        (b"s", b"!!!!"),
        (b"a", b""),  # no address
        (b"a", b64(b"\x05" + bytes(4))),  # unknown family
        (b"a", b64(b"\x04" + bytes(3))),  # truncated
        (b"a", b64(b"\x04\x01\x02\x03\x04" * 2)),  # duplicate
        (b"a", b64(b"".join(b"\x04" + bytes([10, 0, 0, i]) for i in range(9)))),  # too many
        (b"p", b"0"),
        (b"p", b"65536"),
        (b"p", b"04747"),
        (b"p", b"+4747"),
        (b"p", b" 4747"),
        (b"t", b"-1"),
        (b"t", b"1e9"),
        (b"t", str(1 << 63).encode()),
        (b"h", b"Alice"),
        (b"h", b"al"),
        (b"h", "alicé".encode()),
        (b"m", b"x"),
        (b"v", b"01"),
    ],
)
def test_bad_values(key: bytes, value: bytes) -> None:
    props = decode_txt(txt())
    props[key] = value
    with pytest.raises(LanAnnouncementError):
        parse(encode_txt(props))


def test_source_addresses() -> None:
    text = txt()
    # addresses come from A/AAAA records, only if also signed
    peer = parse(text, sources=[Address("192.0.2.99", PORT), Address("2001:db8::10", PORT)])
    assert peer.addresses == (Address("2001:db8::10", PORT),)
    with pytest.raises(LanAnnouncementError, match="none of the announced addresses"):
        parse(text, sources=[Address("192.0.2.99", PORT)])
    with pytest.raises(LanAnnouncementError, match="none of the announced addresses"):
        parse(text, sources=[])
    # and at the signed port (the SRV record's)
    with pytest.raises(LanAnnouncementError, match="SRV port"):
        parse(text, sources=[Address("192.0.2.10", PORT + 1)])
    # duplicates collapse
    assert parse(text, sources=[SOURCES[0], SOURCES[0]]).addresses == (SOURCES[0],)


def test_build_txt_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        build_txt(ALICE, port=0, addresses=HOSTS, mode="everyone", now=NOW)
    with pytest.raises(ValueError):
        build_txt(ALICE, port=PORT, addresses=[], mode="everyone", now=NOW)
    with pytest.raises(ValueError):
        build_txt(
            ALICE, port=PORT, addresses=[f"10.0.0.{i}" for i in range(9)], mode="everyone", now=NOW
        )
    with pytest.raises(ValueError):
        build_txt(ALICE, port=PORT, addresses=HOSTS, mode="contacts", now=NOW)
    with pytest.raises(ValueError):
        build_txt(ALICE, port=PORT, addresses=HOSTS, mode="everyone", now=NOW, nonce=NONCE)
    with pytest.raises(ValueError):
        build_txt(ALICE, port=PORT, addresses=HOSTS, mode="off", now=NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_txt({b"x": b"y" * 300})


def test_longest_handle_and_most_addresses_fit() -> None:
    longest = Identity.from_seed("a" * 32, b"\x04" * 32)
    hosts = [f"2001:db8::{i}" for i in range(1, 9)]
    props = build_txt(longest, port=65535, addresses=hosts, mode="everyone", now=(1 << 63) - 1)
    text = encode_txt(props)
    assert len(text) <= MAX_TXT_SIZE and all(len(k) + 1 + len(v) <= 255 for k, v in props.items())


# --------------------------------------------------------------------------- fuzzing


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1200))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(WireError):
        parse(data, contacts=contacts_of(ALICE, BOB), pins=pins_of(ALICE))


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["everyone", "contacts"]),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_fuzz_mutated_records(mode: str, flips: list[tuple[int, int]]) -> None:
    original = txt(mode=mode)
    data = bytearray(original)
    for position, mask in flips:
        data[position % len(data)] ^= mask
    kwargs = {"contacts": contacts_of(ALICE, BOB), "pins": pins_of(ALICE, BOB)}
    try:
        peer = parse(bytes(data), **kwargs)  # type: ignore[arg-type]
    except WireError:
        return
    # What still verifies (a key's case flipped) means the same as the original.
    assert peer == parse(original, **kwargs)  # type: ignore[arg-type]


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.binary(min_size=1, max_size=4).filter(lambda k: b"=" not in k),
        st.binary(max_size=60),
        max_size=20,
    )
)
def test_fuzz_txt_dictionaries(props: dict[bytes, bytes]) -> None:
    try:
        text = encode_txt(props)
    except ValueError:
        return
    with contextlib.suppress(WireError):
        parse(text, contacts=contacts_of(ALICE))


# --------------------------------------------------------------------------- peer table


def _peer(identity: Identity, last_seen: float = NOW, host: str = "192.0.2.10") -> LanPeer:
    return LanPeer(
        handle=identity.handle,
        public_key=identity.public_key,
        addresses=(Address(host, PORT),),
        mode="everyone",
        issued=int(last_seen),
        last_seen=last_seen,
        pinned=False,
    )


def test_peer_table() -> None:
    table = LanPeerTable(ALICE.public_key, max_peers=2, stale_after=720)
    assert table.update("me", _peer(ALICE)) is None  # ourselves
    assert table.update("b1", _peer(BOB)) == "added"
    assert table.update("b1", _peer(BOB, NOW + 10)) == "updated"
    assert table.update("b2", _peer(BOB, NOW + 20, "192.0.2.20")) == "updated"
    assert [p.last_seen for p in table.peers()] == [NOW + 20]
    assert table.update("m", _peer(MALLORY)) == "added"
    assert table.update("x", _peer(Identity.from_seed("xavier", b"\x05" * 32))) is None  # full
    assert table.remove("b1") is None  # still announced as b2
    removed = table.remove("b2")
    assert removed is not None and removed.handle == "bob_b"
    assert table.remove("b2") is None
    # an instance name that changes key
    table.update("m", _peer(BOB))
    assert [p.handle for p in table.peers()] == ["bob_b"]
    # silent peers (asked again by the service), then expiry
    assert table.names_silent_since(NOW) == []
    assert table.names_silent_since(NOW + 1) == ["m"]
    assert table.expire(NOW + 720) == []
    assert [p.handle for p in table.expire(NOW + 721)] == ["bob_b"]
    assert len(table) == 0 and table.name_of("m") is None


def test_signed_bytes_layout() -> None:
    ann = decode_announcement(decode_txt(txt()), now=NOW)
    expected = (
        b"p2pd lan v1\x00e"
        + bytes([5])
        + b"alice"
        + ALICE.public_key
        + struct.pack(">HQ", PORT, NOW)
        + bytes([2, 4, 192, 0, 2, 10, 6])
        + bytes.fromhex("20010db8000000000000000000000010")
    )
    assert ann.signed_bytes() == expected


# --------------------------------------------------------------------------- contacts-mode budget


def test_tag_scan_budget() -> None:
    budget = TagScanBudget(per_minute=2, size=2)
    assert budget.lookup(b"n1", b"t1") == (False, None)
    assert budget.may_scan(NOW) and budget.may_scan(NOW + 1)
    assert not budget.may_scan(NOW + 59)  # two scans in the last minute already
    assert budget.may_scan(NOW + 60)  # the first has left the window
    # what a (nonce, tag) turned out to be is remembered, a stranger (None) too
    budget.remember(b"n1", b"t1", ALICE.public_key)
    budget.remember(b"n2", b"t2", None)
    assert budget.lookup(b"n1", b"t1") == (True, ALICE.public_key)
    assert budget.lookup(b"n2", b"t2") == (True, None)
    # least recently used first out: n1 was just looked up, so n2 goes
    budget.lookup(b"n1", b"t1")
    budget.remember(b"n3", b"t3", BOB.public_key)
    assert budget.lookup(b"n2", b"t2") == (False, None)
    assert budget.lookup(b"n1", b"t1") == (True, ALICE.public_key)


def test_tag_scan_budget_per_source() -> None:
    budget = TagScanBudget(per_minute=5, per_source=2)
    assert budget.may_scan(NOW, "192.0.2.66") and budget.may_scan(NOW, "192.0.2.66")
    assert not budget.may_scan(NOW + 1, "192.0.2.66")  # that address's two are spent
    assert budget.may_scan(NOW + 1, "192.0.2.10")  # others still have the total's
    assert budget.may_scan(NOW + 60, "192.0.2.66")  # and a minute later, again
    assert budget.stats["tag_scans_skipped_source"] == 1
    assert budget.may_scan(NOW + 60, "192.0.2.11") and budget.may_scan(NOW + 60, "192.0.2.12")
    assert budget.may_scan(NOW + 60, "192.0.2.13")
    assert not budget.may_scan(NOW + 60, "192.0.2.14")  # the total: 5 in the last minute
    assert budget.stats["tag_scans_skipped"] == 1


CAROL = Identity.from_seed("carol", b"\x04" * 32)


@pytest.mark.parametrize("per_source", [TAG_SCANS_PER_SOURCE, 60])
def test_a_flood_of_junk_tags_from_one_address_no_longer_hides_contacts(
    per_source: int,
) -> None:
    """The attack: 90 random contacts-mode tags in 45 s from one address, against 60
    scans a minute. With only the total budget (``per_source`` 60, as before), the
    flood takes every scan and carol, a contact not seen on the LAN before, is not
    judged. With a budget per address the flood gets 10 and carol is recognised.
    alice, recognised once before, is recognised at each fresh nonce either way."""
    budget = TagScanBudget(60, per_source=per_source)
    contacts = {os.urandom(32): f"c{i}" for i in range(200)} | contacts_of(ALICE, CAROL)
    day = epoch_day(NOW)

    def announce(identity: Identity, source: str, now: float) -> bytes | None:
        nonce = os.urandom(16)
        tag = lan_tag(identity.public_key, nonce, day)
        return budget.recognise(nonce, tag, day, contacts, source=source, now=now)

    assert announce(ALICE, "192.0.2.10", NOW) == ALICE.public_key
    skipped = 0
    for i in range(90):
        try:
            junk = os.urandom(16)
            found = budget.recognise(
                junk, junk, day, contacts, source="192.0.2.66", now=NOW + i / 2
            )
            assert found is None
        except TagScanSkipped:
            skipped += 1
        if i % 30 == 29:
            assert announce(ALICE, "192.0.2.10", NOW + i / 2) == ALICE.public_key
    if per_source == 60:
        assert skipped == 31
        with pytest.raises(TagScanSkipped):
            announce(CAROL, "192.0.2.12", NOW + 50)
    else:
        assert skipped == 80 and budget.stats["tag_scans_skipped_source"] == 80
        assert announce(CAROL, "192.0.2.12", NOW + 50) == CAROL.public_key
    assert budget.stats["tag_recent_hits"] == 3


# --------------------------------------------------------------------------- the module


def test_the_core_imports_no_event_loop_and_no_zeroconf() -> None:
    """The pure core loads without zeroconf, trio or ifaddr (a fresh interpreter)."""
    code = (
        "import sys, p2pd.lan_announcement\n"
        "print(sorted(m for m in ('zeroconf', 'trio', 'ifaddr', 'asyncio') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
