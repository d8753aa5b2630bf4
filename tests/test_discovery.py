"""LAN discovery: the sans-I/O core of p2pd.discovery, and the service's decisions fed
with records directly. Nothing here opens a socket: tests that send mDNS run in network
namespaces (the netns testbed), never from the root namespace."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any, cast

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zeroconf import InterfaceChoice, IPVersion

from p2pd import discovery
from p2pd.config import LanConfig
from p2pd.discovery import (
    MAX_TXT_KEYS,
    MAX_TXT_SIZE,
    LanAnnouncementError,
    LanDiscovery,
    LanNotAContact,
    LanPeer,
    LanPeerTable,
    LanPinConflict,
    announced_hosts,
    build_txt,
    decode_announcement,
    decode_txt,
    encode_txt,
    epoch_day,
    lan_tag,
    parse_txt,
    recognise_tag,
    zeroconf_interfaces,
)
from p2pd.errors import UsageError, WireError
from p2pd.identity import Identity
from p2pd.wire import Address

NOW = 1_760_000_000
PORT = 4747
HOSTS = ["192.0.2.10", "2001:db8::10"]
SOURCES = [Address(h, PORT) for h in HOSTS]
NONCE = bytes(range(16))

ALICE = Identity.from_seed("alice", b"\x01" * 32)
BOB = Identity.from_seed("bob_b", b"\x02" * 32)
MALLORY = Identity.from_seed("mallory", b"\x03" * 32)


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def no_pins(handle: str) -> bytes | None:
    return None


def pins_of(*identities: Identity) -> Callable[[str], bytes | None]:
    table = {i.handle: i.public_key for i in identities}
    return table.get


def contacts_of(*identities: Identity) -> dict[bytes, str]:
    return {i.public_key: i.handle for i in identities}


def txt(
    identity: Identity = ALICE, *, mode: str = "everyone", now: int = NOW, **kw: object
) -> bytes:
    nonce = NONCE if mode == "contacts" else None
    props = build_txt(identity, port=PORT, addresses=HOSTS, mode=mode, now=now, nonce=nonce)  # type: ignore[arg-type]
    return encode_txt(props)


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


# --------------------------------------------------------------------------- interfaces


def test_zeroconf_interfaces() -> None:
    assert zeroconf_interfaces([Address("0.0.0.0", 1)], ()) == (
        InterfaceChoice.All,
        IPVersion.V4Only,
    )
    assert zeroconf_interfaces([Address("::", 1)], ()) == (InterfaceChoice.All, IPVersion.All)
    assert zeroconf_interfaces([Address("192.0.2.1", 1)], ()) == (["192.0.2.1"], None)
    assert zeroconf_interfaces([Address("0.0.0.0", 1)], ("10.1.2.3",)) == (["10.1.2.3"], None)


def test_announced_hosts() -> None:
    local = ["127.0.0.1", "192.0.2.5", "fe80::1", "2001:db8::5", "10.0.0.5"]
    assert announced_hosts([Address("192.0.2.1", 1)], (), local) == ["192.0.2.1"]
    assert announced_hosts([Address("0.0.0.0", 1)], (), local) == ["192.0.2.5", "10.0.0.5"]
    assert announced_hosts([Address("::", 1)], (), local) == [
        "192.0.2.5",
        "2001:db8::5",
        "10.0.0.5",
    ]
    assert announced_hosts([Address("0.0.0.0", 1)], ("10.0.0.5",), local) == ["10.0.0.5"]
    # loopback only when nothing else is there (a namespace with only lo)
    assert announced_hosts([Address("0.0.0.0", 1)], (), ["127.0.0.1", "fe80::1"]) == ["127.0.0.1"]
    many = [f"10.0.1.{i}" for i in range(1, 20)]
    assert len(announced_hosts([Address("0.0.0.0", 1)], (), many)) == 8


def test_lan_config() -> None:
    assert LanConfig().mode == "everyone"
    for bad in (
        {"mode": "all"},
        {"interfaces": ("eth0",)},
        {"ttl": 5},
        {"announce_interval": 400.0},
        {"max_peers": 0},
    ):
        with pytest.raises(UsageError):
            LanConfig(**bad)


# ------------------------------------------------------------------ the service, fed directly


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __call__(self, event: str, peer: LanPeer) -> None:
        self.events.append((event, peer.handle))


def _service(
    *,
    mode: str = "everyone",
    contacts: Mapping[bytes, str] | None = None,
    pins: Callable[[str], bytes | None] = no_pins,
    **config: object,
) -> tuple[LanDiscovery, Recorder]:
    recorder = Recorder()
    service = LanDiscovery(
        BOB,
        LanConfig(mode=mode, **config),  # type: ignore[arg-type]
        port=PORT,
        addresses=[Address("0.0.0.0", PORT)],
        contacts=lambda: contacts or {},
        pins=pins,
        on_peer=recorder,
    )
    return service, recorder


def test_service_consider_and_forget(caplog: pytest.LogCaptureFixture) -> None:
    service, recorder = _service(pins=pins_of(ALICE))
    service.consider("a._p2pd._udp.local.", txt(), PORT, HOSTS, now=NOW)
    service.consider("a._p2pd._udp.local.", txt(now=NOW + 300), PORT, HOSTS, now=NOW + 300)
    [peer] = service.peers()
    assert (peer.handle, peer.pinned, peer.last_seen) == ("alice", True, NOW + 300)
    # our own announcement, heard back, is not a peer
    service.consider("b._p2pd._udp.local.", txt(BOB), PORT, HOSTS, now=NOW)
    assert len(service.peers()) == 1
    # an impostor of a pinned handle: warning, ignored
    impostor = Identity.from_seed("alice", b"\x09" * 32)
    with caplog.at_level(logging.WARNING, logger="p2pd.discovery"):
        service.consider("i._p2pd._udp.local.", txt(impostor), PORT, HOSTS, now=NOW)
    assert "pinned" in caplog.text
    # garbage: one log line, nothing else
    with caplog.at_level(logging.INFO, logger="p2pd.discovery"):
        service.consider("g._p2pd._udp.local.", b"\x03x=y", PORT, HOSTS, now=NOW)
    assert "ignored instance" in caplog.text
    assert [p.handle for p in service.peers()] == ["alice"]
    service.forget("a._p2pd._udp.local.")
    assert service.peers() == []
    assert recorder.events == [("added", "alice"), ("updated", "alice"), ("removed", "alice")]
    assert service.statistics()["refused"] == 2


def test_service_refused_update_drops_the_peer() -> None:
    service, recorder = _service()
    service.consider("a", txt(), PORT, HOSTS, now=NOW)
    service.consider("a", txt(now=NOW - 3600), PORT, HOSTS, now=NOW)  # stale now
    assert service.peers() == []
    assert recorder.events == [("added", "alice"), ("removed", "alice")]


def test_service_contacts_mode_and_tag_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = discovery.recognise_tag

    def counting(nonce: bytes, tag: bytes, day: int, keys: Any, **kwargs: Any) -> bytes | None:
        nonlocal calls
        keys = list(keys)
        if len(keys) > 1:  # a scan of all contacts, not the check of the one recognised
            calls += 1
        return real(nonce, tag, day, keys, **kwargs)

    monkeypatch.setattr(discovery, "recognise_tag", counting)
    service, recorder = _service(
        contacts=contacts_of(BOB, ALICE), pins=pins_of(ALICE), max_tag_scans_per_minute=2
    )
    text = txt(mode="contacts")
    service.consider("a", text, PORT, HOSTS, now=NOW)
    service.consider("a", text, PORT, HOSTS, now=NOW + 1)  # same tag: remembered, no scan
    assert calls == 1
    assert [p.handle for p in service.peers()] == ["alice"]
    stranger = txt(MALLORY, mode="contacts")
    service.consider("m", stranger, PORT, HOSTS, now=NOW + 2)  # second scan: not a contact
    assert calls == 2
    # budget spent: a new tag is not judged, and what we knew stays
    other = encode_txt(
        build_txt(ALICE, port=PORT, addresses=HOSTS, mode="contacts", now=NOW, nonce=b"\x07" * 16)
    )
    service.consider("a", other, PORT, HOSTS, now=NOW + 3)
    assert calls == 2 and [p.handle for p in service.peers()] == ["alice"]
    assert service.statistics()["tag_scans_skipped"] == 1
    # a minute later there is budget again
    service.consider("a", other, PORT, HOSTS, now=NOW + 61)
    assert calls == 3 and service.peers()[0].last_seen == NOW + 61
    assert recorder.events == [("added", "alice"), ("updated", "alice"), ("updated", "alice")]


async def test_mode_off_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_zeroconf(*args: object) -> None:
        raise AssertionError("mode off must not open zeroconf")

    monkeypatch.setattr(discovery, "_open_zeroconf", no_zeroconf)
    service, _ = _service(mode="off")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            assert service.peers() == []
            nursery.cancel_scope.cancel()


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


async def test_no_multicast_interface_leaves_the_node_running(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_interfaces(*args: object) -> None:
        raise RuntimeError("No interfaces to listen on")

    monkeypatch.setattr(discovery, "_open_zeroconf", no_interfaces)
    service, _ = _service()
    with trio.fail_after(5), caplog.at_level(logging.WARNING, logger="p2pd.discovery"):
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            assert service.statistics()["disabled"] == 1
            nursery.cancel_scope.cancel()
    assert "LAN discovery is off" in caplog.text


class _LoopInAThread:
    """What :func:`discovery._in_zeroconf` uses of a Zeroconf: ``loop``, an asyncio loop
    running in a thread of its own, as zeroconf's does (no socket is opened)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class _SlowRegistration:
    """Stands in for ``Zeroconf.async_register_service``: probes (sleeps), then returns
    the task that broadcasts (sleeps again). Records the phases reached and cancelled."""

    def __init__(self, probing: float, broadcasting: float) -> None:
        self.seconds = {"probing": probing, "broadcasting": broadcasting}
        self.reached = {phase: threading.Event() for phase in self.seconds}
        self.cancelled: list[str] = []
        self.done = False

    async def _phase(self, phase: str) -> None:
        self.reached[phase].set()
        try:
            await asyncio.sleep(self.seconds[phase])
        except asyncio.CancelledError:
            self.cancelled.append(phase)
            raise

    async def _broadcasts(self) -> None:
        await self._phase("broadcasting")
        self.done = True

    async def __call__(self) -> asyncio.Future[None]:
        await self._phase("probing")
        return asyncio.ensure_future(self._broadcasts())


async def test_a_zeroconf_call_waits_for_its_broadcasts() -> None:
    zc = _LoopInAThread()
    try:
        call = _SlowRegistration(probing=0.05, broadcasting=0.05)
        with trio.fail_after(10):
            await discovery._in_zeroconf(cast(Any, zc), call)
        assert call.done and call.cancelled == []
    finally:
        zc.close()


@pytest.mark.parametrize("phase", ["probing", "broadcasting"])
async def test_a_cancelled_zeroconf_call_stops_in_zeroconfs_loop_at_once(phase: str) -> None:
    """A daemon stopped while it still registers does not wait for zeroconf's probes or
    announcements (which took up to 2 s): cancelled, the call is cancelled in zeroconf's
    loop, in whichever phase it is."""
    zc = _LoopInAThread()
    try:
        call = _SlowRegistration(
            probing=30.0 if phase == "probing" else 0.0,
            broadcasting=30.0,
        )
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(discovery._in_zeroconf, cast(Any, zc), call)
                assert await trio.to_thread.run_sync(call.reached[phase].wait, 5)
                cancelled_at = trio.current_time()
                nursery.cancel_scope.cancel()
            assert trio.current_time() - cancelled_at < 1.0
            while not call.cancelled:  # the cancellation is on its way to zeroconf's loop
                await trio.sleep(0.01)
        assert call.cancelled == [phase] and not call.done
    finally:
        zc.close()
