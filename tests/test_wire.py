"""Bytes from the network (p2pd.wire): addresses, DHT frames, and their bounds.

The module promises that every decoder raises only WireError on bad input; the property
tests below hold it to that.
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

import msgpack
import pytest
from fuzz_helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pd.dht.nodekey import NodeKey
from p2pd.errors import InvalidAddress, OldFrameVersion, UsageError, WireError
from p2pd.identity import Identity
from p2pd.identity import verify_signature as verify
from p2pd.records import (
    MAX_ADDRESSES,
    MAX_EXTENSION,
    MAX_RECORD_SIZE,
    MAX_RELAYS,
    HandleRecord,
)
from p2pd.rotation import RotationNotice
from p2pd.wire import (
    COOKIE_LEN,
    DHT_METHODS,
    FRAME_REQUEST,
    FRAME_RESPONSE,
    MAILBOX_DELETE_MAX,
    MAILBOX_PAGE,
    MAX_CONTACTS,
    MAX_FRAME,
    MAX_MAILBOX_ENTRY,
    MAX_MAILBOX_PUT,
    MAX_U63,
    MAX_VALUE,
    MSG_ID_LEN,
    Address,
    Contact,
    FindValueReply,
    MailboxPage,
    Reader,
    decode_request,
    decode_response,
    encode_contacts,
    encode_request,
    encode_response,
    node_id_for,
    proof_message,
    reply_message,
    split_frame,
    split_response,
)

MSG_ID = bytes(range(MSG_ID_LEN))
SENDER = b"\x11" * 32
KEY = b"\x22" * 20
OWNER = b"\x33" * 32
SIG = b"\x44" * 64
NODE = b"\x55" * 32


def result_of(frame: bytes) -> bytes:
    """The result bytes of a response frame (its signature dropped)."""
    return split_response(split_frame(frame)[2])[0]


# --------------------------------------------------------------------------- Address.parse


@pytest.mark.parametrize(
    ("text", "host", "port", "version"),
    [
        ("127.0.0.1:4000", "127.0.0.1", 4000, 4),
        ("[::1]:4000", "::1", 4000, 6),
        ("  10.0.0.1:1  ", "10.0.0.1", 1, 4),
        ("[2001:DB8:0:0::1]:65535", "2001:db8::1", 65535, 6),
    ],
)
def test_parse_valid_addresses(text: str, host: str, port: int, version: int) -> None:
    addr = Address.parse(text)
    assert addr.host == host
    assert addr.port == port
    assert addr.version == version
    assert Address.parse(str(addr)) == addr


def test_parse_default_port() -> None:
    assert Address.parse("127.0.0.1", default_port=7) == Address("127.0.0.1", 7)
    assert Address.parse("[::1]", default_port=7) == Address("::1", 7)
    assert Address.parse("127.0.0.1:9", default_port=7).port == 9


@pytest.mark.parametrize(
    "text",
    [
        "localhost:1",
        "example.com:80",
        "1.2.3.4",
        "1.2.3.4:99999",
        "1.2.3.4:65536",
        "1.2.3.4:-1",
        "1.2.3.4:+80",
        "1.2.3.4:0x50",
        "1.2.3.4:",
        "1.2.3.4:80:80",
        "[::1",
        "[::1]",
        "[::1]:",
        "[::1]80",
        "::1:80",
        ":",
        "",
        "   ",
        "256.0.0.1:80",
        "1.2.3:80",
        "[localhost]:80",
    ],
)
def test_parse_bad_addresses_raise_invalid_address(text: str) -> None:
    """A malformed HOST:PORT is a usage error, never a crash."""
    with pytest.raises(InvalidAddress) as info:
        Address.parse(text)
    assert isinstance(info.value, UsageError)


@pytest.mark.parametrize("port", ["\u00b2", "1\u00b9", "\u2460"])
def test_parse_non_decimal_digit_port_is_invalid_address(port: str) -> None:
    """Superscript or circled digits in the port are refused as a usage error."""
    with pytest.raises(InvalidAddress):
        Address.parse(f"127.0.0.1:{port}")


@settings(max_examples=examples(300), deadline=None)
@given(st.text(max_size=80))
def test_parse_arbitrary_text_raises_only_invalid_address(text: str) -> None:
    try:
        addr = Address.parse(text)
    except InvalidAddress:
        return
    assert 0 <= addr.port <= 65535
    assert ipaddress.ip_address(addr.host)


@settings(max_examples=examples(300), deadline=None)
@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.text(alphabet="0123456789:[]-+ x", max_size=8),
)
def test_parse_ip_with_junk_port_raises_only_invalid_address(ip: Any, junk: str) -> None:
    host = str(ip) if ip.version == 4 else f"[{ip}]"
    try:
        addr = Address.parse(f"{host}:{junk}")
    except InvalidAddress:
        return
    assert addr.host == str(ip)
    assert str(addr.port) == junk.strip().lstrip("0") or addr.port == 0


# --------------------------------------------------------------------------- Address bytes


@pytest.mark.parametrize(
    "addr",
    [
        Address("192.0.2.1", 4000),
        Address("0.0.0.0", 1),
        Address("255.255.255.255", 65535),
        Address("::1", 4000),
        Address("2001:db8::1", 65535),
        Address("::ffff:192.0.2.1", 80),
    ],
)
def test_address_encode_decode_round_trip(addr: Address) -> None:
    data = addr.encode()
    assert len(data) == (1 + 4 + 2 if addr.version == 4 else 1 + 16 + 2)
    assert data[0] == addr.version
    reader = Reader(data)
    assert Address.decode_from(reader) == addr
    reader.end()


@settings(max_examples=examples(300), deadline=None)
@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(1, 65535),
)
def test_address_round_trip_property(ip: Any, port: int) -> None:
    addr = Address(str(ip), port)
    reader = Reader(addr.encode() + b"tail")
    assert Address.decode_from(reader) == addr
    assert reader.take(4) == b"tail"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x04\x01\x02\x03",
        b"\x04\x01\x02\x03\x04\x00\x00",  # port 0
        b"\x05\x01\x02\x03\x04\x00\x01",
        b"\x06" + b"\x00" * 17,
        b"\x00",
    ],
)
def test_address_decode_bad_bytes(data: bytes) -> None:
    with pytest.raises(WireError):
        Address.decode_from(Reader(data))


def test_address_refuses_hostnames_and_bad_ports() -> None:
    for host in ("evil.example", "localhost", "", "1.2.3.4 ", "x" * 1000):
        with pytest.raises(InvalidAddress):
            Address(host, 1)
    for port in (-1, 65536):
        with pytest.raises(InvalidAddress):
            Address("1.2.3.4", port)


def test_address_host_is_canonical() -> None:
    assert Address("2001:DB8:0::1", 1).host == "2001:db8::1"
    assert Address("2001:DB8:0::1", 1) == Address("2001:db8::1", 1)


# --------------------------------------------------------------------------- requests

VALID_REQUESTS: dict[str, list[Any]] = {
    "ping": [SENDER],
    "store": [SENDER, KEY, b"record" * 10],
    "find_node": [SENDER, KEY],
    "find_value": [SENDER, KEY],
    "mailbox_put": [SENDER, KEY, b"\x99" * MAX_MAILBOX_ENTRY],
    "mailbox_fetch": [SENDER, OWNER, 1_700_000_000, b"\x66" * 16, SIG],
    "mailbox_delete": [SENDER, OWNER, 1_700_000_000, [b"\x77" * 16, b"\x78" * 16], SIG],
    "proof": [SENDER, b"\x88" * COOKIE_LEN, SIG],
    "dialback": [SENDER, b"\x55" * 16, bytes(160)],  # issue 13; tests/test_reachability.py
    "dialed": [SENDER, b"\x55" * 16],
    "mailbox_relay": [SENDER, OWNER, "127.0.0.9", 4747, KEY, b"\x99" * MAX_MAILBOX_PUT],
    "mailbox_find": [SENDER, KEY],  # a lookup by a relay (p2pd/dht/mailbox_find.py)
    # an owner's pin revoking its other passes (p2pd/dht/mailbox_revoke.py)
    "mailbox_revoke": [SENDER, OWNER, 1_700_000_000, 1_700_600_000, b"\x44" * 32, SIG],
}


def test_every_method_has_a_round_trip_case() -> None:
    assert set(VALID_REQUESTS) == set(DHT_METHODS)


@pytest.mark.parametrize("prove", [False, True])
@pytest.mark.parametrize("method", DHT_METHODS)
def test_request_round_trip(method: str, prove: bool) -> None:
    args = VALID_REQUESTS[method]
    frame = encode_request(MSG_ID, method, args, prove)
    kind, msg_id, payload = split_frame(frame)
    assert kind == FRAME_REQUEST == frame[0] == 0x02
    assert msg_id == MSG_ID
    req = decode_request(msg_id, payload)
    assert req.msg_id == MSG_ID
    assert req.method == method
    assert req.prove is prove
    assert req.sender_key == SENDER
    assert req.sender_id == node_id_for(SENDER) != SENDER[:20]
    if method in ("store", "find_node", "find_value", "mailbox_put", "mailbox_find"):
        assert req.key == KEY
    if method in ("store", "mailbox_put"):
        assert req.value == args[2]
    if method in ("mailbox_fetch", "mailbox_delete"):
        assert req.owner_key == OWNER
        assert req.timestamp == args[2]
        assert req.signature == SIG
    if method == "mailbox_fetch":
        assert req.after == args[3]
    if method == "mailbox_delete":
        assert req.ids == tuple(args[3])
    if method == "proof":
        assert (req.cookie, req.signature) == (args[1], SIG)
    if method == "mailbox_revoke":
        assert (req.owner_key, req.timestamp, req.expires) == tuple(args[1:4])
        assert (req.pass_key, req.signature) == (args[4], SIG)
    if method == "mailbox_relay":
        assert (req.key, req.value) == (KEY, args[5])
        assert req.target == Contact(OWNER, Address("127.0.0.9", 4747))


def test_mailbox_fetch_with_empty_cursor() -> None:
    args = [SENDER, OWNER, 0, b"", SIG]
    req = decode_request(MSG_ID, split_frame(encode_request(MSG_ID, "mailbox_fetch", args))[2])
    assert req.after == b""


def _bad_requests() -> list[tuple[str, list[Any]]]:
    cases: list[tuple[str, list[Any]]] = [
        ("nope", [SENDER]),
        ("ping", []),
        ("ping", [SENDER, KEY]),
        ("ping", [b"short"]),
        ("ping", [b"\x11" * 20]),  # a v1 sender id, not a node key
        ("ping", ["not bytes" * 3]),
        ("store", [SENDER, KEY]),
        ("store", [SENDER, b"\x00" * 19, b"v"]),
        ("store", [SENDER, KEY, "str, not bytes"]),
        ("mailbox_put", [SENDER, KEY, b"\x00" * (MAX_MAILBOX_PUT + 1)]),
        ("mailbox_relay", [SENDER, OWNER, "127.0.0.9", 4747, KEY, b""]),
        ("mailbox_relay", [SENDER, OWNER, "not an ip", 4747, KEY, b"x"]),
        ("mailbox_relay", [SENDER, OWNER, "127.0.0.9", 0, KEY, b"x"]),
        ("mailbox_relay", [SENDER, b"short", "127.0.0.9", 4747, KEY, b"x"]),
        ("mailbox_relay", [SENDER, OWNER, "127.0.0.9", 4747, KEY, b"\x00" * (MAX_MAILBOX_PUT + 1)]),
        ("mailbox_fetch", [SENDER, OWNER, -1, b"", SIG]),
        ("mailbox_fetch", [SENDER, OWNER, 1 << 63, b"", SIG]),
        ("mailbox_fetch", [SENDER, OWNER, True, b"", SIG]),
        ("mailbox_fetch", [SENDER, OWNER, 1, b"\x00" * 15, SIG]),
        ("mailbox_fetch", [SENDER, OWNER, 1, b"", SIG[:63]]),
        ("mailbox_fetch", [SENDER, OWNER[:31], 1, b"", SIG]),
        ("mailbox_delete", [SENDER, OWNER, 1, [], SIG]),
        ("mailbox_revoke", [SENDER, OWNER, 1, 2, b"\x44" * 31, SIG]),
        ("mailbox_revoke", [SENDER, OWNER, -1, 2, b"\x44" * 32, SIG]),
        ("mailbox_revoke", [SENDER, OWNER, 1, 2, b"\x44" * 32, SIG[:63]]),
        ("mailbox_revoke", [SENDER, OWNER, 1, 2, b"\x44" * 32]),
        ("mailbox_find", [SENDER, b"\x00" * 19]),
        ("mailbox_delete", [SENDER, OWNER, 1, [b"\x00" * 16] * (MAILBOX_DELETE_MAX + 1), SIG]),
        ("mailbox_delete", [SENDER, OWNER, 1, [b"\x00" * 15], SIG]),
        ("mailbox_delete", [SENDER, OWNER, 1, b"\x00" * 16, SIG]),
        ("proof", [SENDER, b"\x88" * COOKIE_LEN]),
        ("proof", [SENDER, b"\x88" * (COOKIE_LEN + 1), SIG]),
        ("proof", [SENDER, b"\x88" * COOKIE_LEN, SIG[:63]]),
        ("proof", [SENDER, "a cookie", SIG]),
    ]
    return cases


@pytest.mark.parametrize(("method", "args"), _bad_requests())
def test_bad_requests_raise_wire_error(method: str, args: list[Any]) -> None:
    payload = msgpack.packb([method, args, False], use_bin_type=True)
    with pytest.raises(WireError):
        decode_request(MSG_ID, payload)


@pytest.mark.parametrize(
    "value",
    [
        None,
        5,
        "ping",
        [],
        ["ping"],
        ["ping", [SENDER]],  # frame v1's [method, args]
        ["ping", [SENDER], 1],
        ["ping", [SENDER], None],
        ["ping", [SENDER], True, 1],
        {"ping": [SENDER]},
    ],
)
def test_request_not_method_and_args(value: Any) -> None:
    with pytest.raises(WireError):
        decode_request(MSG_ID, msgpack.packb(value, use_bin_type=True))


# --------------------------------------------------------------------------- frames


def test_frames_over_max_frame_are_refused() -> None:
    frame = encode_request(MSG_ID, "ping", [SENDER])
    with pytest.raises(WireError):
        split_frame(frame + b"\x00" * (MAX_FRAME + 1 - len(frame)))
    with pytest.raises(WireError):
        split_frame(b"\x00" * (MAX_FRAME * 10))
    split_frame(frame + b"\x00" * (MAX_FRAME - len(frame)))  # the limit itself is fine


def test_encoders_refuse_frames_over_max_frame() -> None:
    with pytest.raises(WireError):
        encode_request(MSG_ID, "store", [SENDER, KEY, b"\x00" * MAX_FRAME])
    with pytest.raises(WireError):
        encode_response(MSG_ID, {"value": b"\x00" * MAX_FRAME})


@pytest.mark.parametrize(
    "frame",
    [b"", b"\x02", b"\x02" + MSG_ID, b"\x04" + MSG_ID + b"\xc0", b"\xff" + MSG_ID + b"\xc0"],
)
def test_short_or_unknown_frames_are_refused(frame: bytes) -> None:
    with pytest.raises(WireError):
        split_frame(frame)


@pytest.mark.parametrize("kind", [0x00, 0x01])
def test_frames_of_version_1_are_refused_as_such(kind: int) -> None:
    v1 = bytes([kind]) + MSG_ID + msgpack.packb(["ping", [b"\x11" * 20]], use_bin_type=True)
    with pytest.raises(OldFrameVersion):
        split_frame(v1)


def test_response_frame_kind() -> None:
    frame = encode_response(MSG_ID, NODE)
    kind, msg_id, payload = split_frame(frame)
    assert (kind, msg_id, frame[0]) == (FRAME_RESPONSE, MSG_ID, 0x03)
    raw, signature, cookie = split_response(payload)
    assert signature is None and cookie is None
    assert decode_response("ping", raw) == NODE
    assert msgpack.unpackb(payload) == [NODE, None]  # plain msgpack [result, nil]


@pytest.mark.parametrize("signed", [False, True])
def test_a_response_may_carry_a_cookie_after_its_signature(signed: bool) -> None:
    key = NodeKey.from_seed(b"\x07" * 32)
    cookie = b"\x5c" * COOKIE_LEN
    payload = split_frame(encode_response(MSG_ID, NODE, key.sign if signed else None, cookie))[2]
    raw, signature, got = split_response(payload)
    assert got == cookie and decode_response("ping", raw) == NODE
    assert (signature is not None) is signed
    if signature is not None:  # the cookie is not signed: the result is, as without one
        assert verify(key.public_key, reply_message(MSG_ID, raw), signature)
    # plain msgpack [result, signature-or-nil, cookie]
    assert msgpack.unpackb(payload) == [NODE, signature, cookie]
    with pytest.raises(WireError):
        encode_response(MSG_ID, NODE, None, cookie[:-1])


def test_a_proof_signs_the_responder_key_and_the_cookie() -> None:
    key = NodeKey.from_seed(b"\x07" * 32)
    cookie = b"\x5c" * COOKIE_LEN
    signature = key.sign(proof_message(NODE, cookie))
    assert verify(key.public_key, b"p2pd dht proof v2\x00" + NODE + cookie, signature)
    assert not verify(key.public_key, proof_message(SENDER, cookie), signature)
    # neither a reply's signature nor a proof's can be taken for the other
    assert not verify(key.public_key, reply_message(MSG_ID, NODE + cookie), signature)


def test_a_proving_response_is_signed_over_its_message_id_and_result_bytes() -> None:
    key = NodeKey.from_seed(b"\x07" * 32)
    result = {"nodes": encode_contacts([Contact(NODE, Address("192.0.2.1", 4000))])}
    payload = split_frame(encode_response(MSG_ID, result, key.sign))[2]
    raw, signature, _ = split_response(payload)
    assert signature is not None and len(signature) == 64
    assert msgpack.unpackb(payload, raw=False)[1] == signature
    assert verify(key.public_key, reply_message(MSG_ID, raw), signature)
    assert not verify(key.public_key, reply_message(b"\x00" * MSG_ID_LEN, raw), signature)
    assert not verify(NODE, reply_message(MSG_ID, raw), signature)
    assert key.node_id == node_id_for(key.public_key)
    assert "seed" not in repr(key) and key.public_key.hex() not in repr(key)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x92",
        b"\x92\xc0",
        b"\x91\xc0",
        b"\xc0\xc0",
        b"\x92\xc0\xc4\x40" + b"\x00" * 63,
        b"\x93\xc0\xc0",  # no cookie
        b"\x93\xc0\xc4\x10" + b"\x00" * 16,  # a cookie and nothing before it
        b"\x93\xc0\xc0\xc4\x0f" + b"\x00" * 15,  # a short cookie
        b"\x93\xc0\xc0\xc4\x10" + b"\x00" * 17,  # a long one
        b"\x94\xc0\xc0\xc0\xc0",
    ],
)
def test_malformed_response_envelopes_raise_wire_error(payload: bytes) -> None:
    with pytest.raises(WireError):
        raw, _, _ = split_response(payload)
        decode_response("ping", raw)


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=1024), st.sampled_from(DHT_METHODS))
def test_split_response_arbitrary_bytes_raise_only_wire_error(payload: bytes, method: str) -> None:
    with contextlib.suppress(WireError):
        raw, signature, cookie = split_response(payload)
        assert signature is None or len(signature) == 64
        assert cookie is None or len(cookie) == COOKIE_LEN
        decode_response(method, raw)


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=MAX_FRAME + 64))
def test_split_and_decode_arbitrary_bytes_raise_only_wire_error(datagram: bytes) -> None:
    try:
        _kind, msg_id, payload = split_frame(datagram)
        decode_request(msg_id, payload)
    except WireError:
        pass


@settings(max_examples=examples(300), deadline=None)
@given(st.sampled_from(DHT_METHODS), st.binary(max_size=512))
def test_request_with_valid_method_then_junk_raises_only_wire_error(
    method: str, tail: bytes
) -> None:
    """A payload that starts like a real request and then goes wrong."""
    payload = b"\x93" + msgpack.packb(method) + tail  # a 3-array: the method, then junk
    with contextlib.suppress(WireError):
        decode_request(MSG_ID, payload)


# --------------------------------------------------------------------------- responses


@settings(max_examples=examples(300), deadline=None)
@given(st.sampled_from((*DHT_METHODS, "unknown")), st.binary(max_size=1024))
def test_decode_response_arbitrary_bytes_raise_only_wire_error(method: str, payload: bytes) -> None:
    with contextlib.suppress(WireError):
        decode_response(method, payload)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=70)
    | st.sampled_from(["value", "nodes", "entries", "more", *DHT_METHODS, "127.0.0.1", "::1"])
    | st.sampled_from([SENDER, KEY, OWNER, SIG, b"\x00" * 16]),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(
            st.sampled_from(["value", "nodes", "entries", "more"]) | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=40,
)


@settings(max_examples=examples(300), deadline=None)
@given(st.sampled_from(DHT_METHODS), msgpack_values)
def test_decode_response_structured_junk_raises_only_wire_error(method: str, value: Any) -> None:
    """Well-formed msgpack of the wrong shape is refused with WireError, nothing else."""
    payload = msgpack.packb(value, use_bin_type=True)
    with contextlib.suppress(WireError):
        decode_response(method, payload)


@settings(max_examples=examples(300), deadline=None)
@given(msgpack_values)
def test_decode_request_structured_junk_raises_only_wire_error(value: Any) -> None:
    payload = msgpack.packb(value, use_bin_type=True)
    with contextlib.suppress(WireError):
        decode_request(MSG_ID, payload)


@settings(max_examples=examples(300), deadline=None)
@given(st.sampled_from(DHT_METHODS), st.lists(msgpack_values, max_size=6))
def test_decode_request_any_args_raises_only_wire_error(method: str, args: list[Any]) -> None:
    payload = msgpack.packb([method, args, True], use_bin_type=True)
    with contextlib.suppress(WireError):
        decode_request(MSG_ID, payload)


def _contact(host: str = "192.0.2.1", port: int = 4000, node: bytes = NODE) -> list[Any]:
    return [node, host, port]


def _find_value(nodes: list[Any], value: bytes | None = None) -> bytes:
    reply: dict[str, Any] = {"nodes": nodes}
    if value is not None:
        reply["value"] = value
    data: bytes = msgpack.packb(reply, use_bin_type=True)
    return data


def test_find_value_reply_round_trip() -> None:
    contacts = [Contact(NODE, Address("192.0.2.1", 4000)), Contact(OWNER, Address("::1", 1))]
    payload = result_of(
        encode_response(MSG_ID, {"value": b"rec", "nodes": encode_contacts(contacts)})
    )
    assert decode_response("find_value", payload) == FindValueReply(b"rec", tuple(contacts))
    assert contacts[0].node_id == node_id_for(NODE)
    assert decode_response("find_value", _find_value([])) == FindValueReply(None, ())
    with_receipt = msgpack.packb({"nodes": [], "value": b"rec", "seen": 1_700_000_000})
    assert decode_response("find_value", with_receipt) == FindValueReply(b"rec", (), 1_700_000_000)
    assert decode_response("find_node", msgpack.packb(encode_contacts(contacts))) == tuple(contacts)


@pytest.mark.parametrize(
    "contact",
    [
        _contact(host="evil.example"),
        _contact(host="localhost"),
        _contact(host=""),
        _contact(port=0),
        _contact(port=70000),
        _contact(port=-1),
        _contact(port=True),
        _contact(port="4000"),
        _contact(host=b"192.0.2.1"),  # type: ignore[arg-type]
        _contact(node=b"\x00" * 19),
        _contact(node=b"\x00" * 20),  # a v1 node id: contacts carry node keys
        [NODE, "192.0.2.1"],
        [NODE, "192.0.2.1", 4000, 1],
        {"id": NODE},
    ],
)
def test_find_value_bad_contact_raises_wire_error(contact: Any) -> None:
    """A peer cannot steer us to a hostname, port 0, or an out-of-range port."""
    with pytest.raises(WireError):
        decode_response("find_value", _find_value([contact]))
    with pytest.raises(WireError):
        decode_response("find_node", msgpack.packb([contact], use_bin_type=True))


def test_a_contact_decoded_before_does_not_let_a_bool_port_through() -> None:
    """Decoded contacts are cached by their exact types: port ``True`` equals and hashes
    as 1, so a cache keyed on values alone would hand back the contact of port 1."""
    good = msgpack.packb([_contact(port=1)], use_bin_type=True)
    assert decode_response("find_node", good)[0].address.port == 1
    assert decode_response("find_node", good) == decode_response("find_node", good)
    with pytest.raises(WireError):
        decode_response("find_node", msgpack.packb([_contact(port=True)], use_bin_type=True))


@pytest.mark.parametrize("host", ["fe80::1%evil.example", "::1%eth0", "fe80::1% x"])
def test_contact_host_with_zone_id_raises_wire_error(host: str) -> None:
    """A contact host must be a bare IP literal: no zone ids carrying arbitrary text."""
    with pytest.raises(WireError):
        decode_response("find_node", msgpack.packb([_contact(host=host)], use_bin_type=True))


def test_contact_list_longer_than_max_contacts_raises() -> None:
    ok = [_contact(port=1000 + i) for i in range(MAX_CONTACTS)]
    assert len(decode_response("find_node", msgpack.packb(ok, use_bin_type=True))) == MAX_CONTACTS
    too_many = [*ok, _contact(port=999)]
    with pytest.raises(WireError):
        decode_response("find_node", msgpack.packb(too_many, use_bin_type=True))
    with pytest.raises(WireError):
        decode_response("find_value", _find_value(too_many))


def test_find_value_reply_with_extra_keys_or_bad_value() -> None:
    for reply in (
        {"nodes": [], "value": b"x", "extra": 1},
        {"nodes": [], "value": "text"},
        {"nodes": [], "value": b"x" * (MAX_VALUE + 1)},
        {"nodes": [], "value": b"x", "seen": -1},
        {"nodes": [], "value": b"x", "seen": 1 << 63},
        {"nodes": [], "value": b"x", "seen": "yesterday"},
        {"nodes": [], "value": b"x", "seen": True},
        [b"x"],
        None,
    ):
        with pytest.raises(WireError):
            decode_response("find_value", msgpack.packb(reply, use_bin_type=True))


def _largest_record() -> bytes:
    """A 32-char handle, 8 IPv6 addresses, a full extension, a rotation notice and the
    most relays."""
    old = Identity.from_seed("a" * 32, bytes(32))
    new = Identity.from_seed("a" * 32, bytes(range(32)))
    addrs = [Address(f"2001:db8::{i + 1}", 65535) for i in range(MAX_ADDRESSES)]
    relays = [Address(f"2001:db8:1::{i + 1}", 65535) for i in range(MAX_RELAYS)]
    notice = RotationNotice.create(old, new, now=1).encode()
    return HandleRecord.create(
        new, addrs, seq=1, now=1, lifetime=60, extension=b"\x00" * MAX_EXTENSION,
        rotation=notice, relays=relays,
    ).encode()  # fmt: skip


def test_largest_find_value_reply_fits_in_a_frame() -> None:
    """A maximal record, its "seen" receipt and a full contact list of long IPv6
    spellings fit MAX_FRAME."""
    record = _largest_record()
    assert len(record) == MAX_RECORD_SIZE <= MAX_VALUE
    host = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"
    contacts = [Contact(bytes([i]) * 32, Address(host, 65535)) for i in range(MAX_CONTACTS)]
    result = {"value": record, "nodes": encode_contacts(contacts), "seen": MAX_U63}
    frame = encode_response(MSG_ID, result, NodeKey.from_seed(bytes(32)).sign)
    assert len(frame) <= MAX_FRAME
    reply = decode_response("find_value", result_of(frame))
    assert reply == FindValueReply(record, tuple(contacts), MAX_U63)


def test_full_mailbox_page_fits_in_a_frame() -> None:
    entries = [[bytes([i]) * 16, bytes([i]) * MAX_MAILBOX_ENTRY] for i in range(MAILBOX_PAGE)]
    frame = encode_response(MSG_ID, {"entries": entries, "more": True})
    page = decode_response("mailbox_fetch", result_of(frame))
    assert page == MailboxPage(tuple((i, e) for i, e in entries), True)


@pytest.mark.parametrize(
    ("method", "reply"),
    [
        ("ping", b"\x00" * 19),
        ("ping", None),
        ("store", 1),
        ("store", None),
        ("mailbox_put", b"\x01"),
        ("mailbox_fetch", {"entries": [], "more": 1}),
        ("mailbox_fetch", {"entries": []}),
        ("mailbox_fetch", {"entries": [[b"\x00" * 16, b"x"]] * (MAILBOX_PAGE + 1), "more": False}),
        ("mailbox_fetch", {"entries": [[b"\x00" * 15, b"x"]], "more": False}),
        ("mailbox_fetch", {"entries": [[b"\x00" * 16]], "more": False}),
        ("mailbox_delete", MAILBOX_DELETE_MAX + 1),
        ("mailbox_delete", -1),
        ("mailbox_delete", False),
        ("find_node", {"nodes": []}),
    ],
)
def test_bad_replies_raise_wire_error(method: str, reply: Any) -> None:
    with pytest.raises(WireError):
        decode_response(method, msgpack.packb(reply, use_bin_type=True))


@pytest.mark.parametrize(
    ("method", "reply", "expected"),
    [
        ("ping", NODE, NODE),
        ("store", True, True),
        ("store", False, False),
        ("mailbox_put", True, True),
        ("mailbox_delete", MAILBOX_DELETE_MAX, MAILBOX_DELETE_MAX),
        ("mailbox_delete", 0, 0),
        ("mailbox_fetch", {"entries": [], "more": False}, MailboxPage((), False)),
    ],
)
def test_good_replies_decode(method: str, reply: Any, expected: Any) -> None:
    assert decode_response(method, msgpack.packb(reply, use_bin_type=True)) == expected


# --------------------------------------------------------------------------- msgpack limits


@pytest.mark.parametrize(
    "payload",
    [
        b"\x91" * 5000 + b"\xc0",  # deeply nested arrays
        b"\x81\xa1a" * 3000 + b"\xc0",  # deeply nested maps
        b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion items
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 billion entries
        b"\xc4\x05abc",  # truncated bin
        b"\xc1",  # never-used byte
        b"\xc0\xc0",  # trailing data
        b"\xa2\xff\xfe",  # str that is not UTF-8
        b"\xd6\xff\x00\x00\x00\x00",  # timestamp extension
        b"\x81\x91\xc0\xc0",  # map with an array key
        b"\x81\xc0\xc0",  # map with a nil key
        b"",
    ],
)
def test_hostile_msgpack_raises_wire_error(payload: bytes) -> None:
    for decode in (
        lambda p: decode_request(MSG_ID, p),
        *(lambda p, m=m: decode_response(m, p) for m in DHT_METHODS),
    ):
        with pytest.raises(WireError):
            decode(payload)


def test_msgpack_over_length_limits_raise_wire_error() -> None:
    for value in (
        b"\x00" * (MAX_VALUE + 1),
        "x" * 257,
        [None] * (MAX_CONTACTS + 5),
        {str(i): None for i in range(5)},
    ):
        payload = msgpack.packb(value, use_bin_type=True)
        with pytest.raises(WireError, match="msgpack"):
            decode_response("find_node", payload)
