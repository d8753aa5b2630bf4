"""Fuzzing every decoder of bytes from the network, with hypothesis.

One property for all of them: whatever bytes arrive (arbitrary bytes, and valid encodings
with bits flipped, bytes inserted, deleted or overwritten, truncated or extended), a
decoder either returns a value or raises the error class its module declares:

=====================================================  ====================================
decoder                                                 may raise only
=====================================================  ====================================
wire.split_frame, decode_request, split_response,
  decode_response                                       WireError
wire.MessagePayload.decode, StreamFrameDecoder.feed     WireError
wire.decode_mailbox_plaintext, Address.decode_from      WireError
wire.Address.parse, Address(host, port)                 InvalidAddress (text from a person)
records.HandleRecord.decode, verify_record              RecordError
session.bundle.PrekeyBundle.decode                      BundleError
session.envelope.Envelope.decode                        EnvelopeError
session.SessionManager.decrypt                          EnvelopeError, SessionError
lan_announcement.decode_txt, parse_txt (mDNS TXT)       LanAnnouncementError
media.wire.decode (call media datagrams)                MediaWireError
media.CallMedia.datagram_received                       nothing (counts what it drops)
=====================================================  ====================================

and what does decode is canonical: it encodes back to the very bytes it came from (media
datagrams: up to the flag bits a receiver ignores, so it encodes to bytes that decode to
the same value; TXT records: up to the case of their keys, which RFC 6763 section 6.4
compares case-insensitively). ``SessionManager.decrypt``, a stateful path, is fuzzed in
tests/test_fuzz_decrypt.py.
"""

from __future__ import annotations

import functools
import json
import struct
import sys
from typing import Any

import msgpack
import pytest
import trio
from fuzz_helpers import (
    FUZZ,
    NOW,
    ciphertexts,
    exactly,
    initial_headers,
    mutate,
    ratchet_headers,
    refused,
)
from hypothesis import given
from hypothesis import strategies as st

from p2pd.calls import MAX_SIGNAL, SIGNAL_TYPES, decode_signal
from p2pd.dht.nodekey import NodeKey
from p2pd.errors import (
    BundleError,
    EnvelopeError,
    InvalidAddress,
    RecordError,
    WireError,
)
from p2pd.identity import Identity
from p2pd.lan_announcement import (
    LanAnnouncementError,
    build_txt,
    decode_txt,
    encode_txt,
    parse_txt,
)
from p2pd.media import CallMedia
from p2pd.media.wire import (
    AUDIO_RED_HEADER,
    MAX_NACK_ENTRIES,
    MAX_RED_DISTANCE,
    NACK_WHOLE_FRAME,
    AudioPacket,
    KeyframeRequest,
    MediaWireError,
    NackEntry,
    ReceiverReport,
    ReportBlock,
    VideoFragment,
    VideoNack,
)
from p2pd.media.wire import decode as media_decode
from p2pd.records import MAX_ADDRESSES, HandleRecord, verify_record
from p2pd.session.bundle import MAX_ONE_TIME_PREKEYS, PrekeyBundle
from p2pd.session.envelope import (
    ENVELOPE_VERSION,
    TYPE_INITIAL,
    Envelope,
)
from p2pd.wire import (
    DHT_METHODS,
    FRAME_ACK,
    FRAME_MESSAGE,
    MAILBOX_ACK,
    MAILBOX_DELETE_MAX,
    MAILBOX_MESSAGE,
    MAILBOX_PAGE,
    MAX_CONTACTS,
    MAX_FRAME,
    MAX_STREAM_FRAME,
    MAX_U63,
    MESSAGE_ID_LEN,
    MSG_ID_LEN,
    Address,
    Contact,
    FindValueReply,
    MessagePayload,
    Reader,
    StreamFrameDecoder,
    decode_mailbox_plaintext,
    decode_request,
    decode_response,
    encode_contacts,
    encode_mailbox_plaintext,
    encode_request,
    encode_response,
    encode_stream_frame,
    split_frame,
    split_response,
)

MSG_ID = bytes(range(MSG_ID_LEN))


# --------------------------------------------------------------------------- addresses

ips = st.ip_addresses().map(str)
ports = st.integers(1, 65535)
addresses = st.builds(Address, ips, ports)


@FUZZ
@given(st.binary(max_size=40))
def test_address_decode_from_arbitrary_bytes(data: bytes) -> None:
    reader = Reader(data)
    try:
        address = Address.decode_from(reader)
    except WireError:
        return
    assert address.encode() == data[: reader.position]


@FUZZ
@given(addresses, st.data())
def test_address_decode_from_mutations(address: Address, data: st.DataObject) -> None:
    candidate = mutate(data, address.encode())
    reader = Reader(candidate)
    if not refused(WireError, lambda: Address.decode_from(reader)):
        decoded = Address.decode_from(Reader(candidate))
        assert decoded.encode() == candidate[: reader.position]


address_text = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="0123456789abcdefABCDEF:.[]% \t\n+-_x", max_size=60),
    st.builds(lambda ip, port: f"{ip}:{port}", ips, st.integers(-5, 100_000)),
    st.builds(lambda ip, port: f"[{ip}]:{port}", ips, st.integers(-5, 100_000)),
    st.builds(lambda ip, junk: f"[{ip}]{junk}", ips, st.text(max_size=8)),
    st.builds(lambda ip, junk: f"{ip}%{junk}:1", ips, st.text(max_size=8)),
)


@FUZZ
@given(address_text, st.none() | ports)
def test_address_parse_raises_only_invalid_address(text: str, default_port: int | None) -> None:
    try:
        address = Address.parse(text, default_port=default_port)
    except InvalidAddress:
        return
    assert Address.parse(str(address)) == address
    assert 0 <= address.port <= 65535


@FUZZ
@given(address_text, st.integers(-(1 << 64), 1 << 64))
def test_address_constructor_raises_only_invalid_address(host: str, port: int) -> None:
    try:
        address = Address(host, port)
    except InvalidAddress:
        return
    assert Address(address.host, address.port) == address


# --------------------------------------------------------------------------- DHT frames

node_ids = exactly(20)
node_keys = exactly(32)
u63 = st.integers(0, MAX_U63)
contacts = st.lists(st.builds(Contact, node_keys, addresses), max_size=MAX_CONTACTS)
SIGNER = NodeKey.from_seed(b"\x05" * 32)


def valid_requests() -> st.SearchStrategy[tuple[str, list[Any]]]:
    def method(name: str, *args: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.tuples(st.just(name), st.tuples(node_keys, *args).map(list))

    return st.one_of(
        method("ping"),
        method("store", exactly(20), st.binary(max_size=300)),
        method("find_node", exactly(20)),
        method("find_value", exactly(20)),
        method("mailbox_put", exactly(20), st.binary(min_size=1, max_size=300)),
        method("mailbox_fetch", exactly(32), u63, st.just(b"") | exactly(16), exactly(64)),
        method(
            "mailbox_delete",
            exactly(32),
            u63,
            st.lists(exactly(16), min_size=1, max_size=MAILBOX_DELETE_MAX),
            exactly(64),
        ),
        method("proof", exactly(16), exactly(64)),
    )


def valid_responses() -> st.SearchStrategy[tuple[str, Any]]:
    def method(name: str, result: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.tuples(st.just(name), result)

    encoded_contacts = contacts.map(encode_contacts)
    return st.one_of(
        method("ping", node_keys),
        method("store", st.booleans()),
        method("find_node", encoded_contacts),
        method(
            "find_value",
            st.one_of(
                st.builds(lambda v: {"value": v}, st.binary(max_size=300)),
                st.builds(lambda n: {"nodes": n}, encoded_contacts),
            ),
        ),
        method("mailbox_put", st.booleans()),
        method(
            "mailbox_fetch",
            st.builds(
                lambda entries, more: {"entries": entries, "more": more},
                st.lists(
                    st.tuples(exactly(16), st.binary(min_size=1, max_size=300)).map(list),
                    max_size=MAILBOX_PAGE,
                ),
                st.booleans(),
            ),
        ),
        method("mailbox_delete", st.integers(0, MAILBOX_DELETE_MAX)),
    )


def decode_frame(frame: bytes, method: str) -> None:
    """What the DHT protocol does with a datagram, for a reply expected to ``method``."""
    kind, msg_id, payload = split_frame(frame)
    if kind == 0x02:
        decode_request(msg_id, payload)
    else:
        decode_response(method, split_response(payload)[0])


@FUZZ
@given(st.binary(max_size=MAX_FRAME + 64), st.sampled_from(DHT_METHODS))
def test_dht_frame_arbitrary_bytes(frame: bytes, method: str) -> None:
    refused(WireError, lambda: decode_frame(frame, method))


@FUZZ
@given(
    st.sampled_from([b"\x00", b"\x01", b"\x02", b"\x03"]),
    st.binary(max_size=600),
    st.sampled_from(DHT_METHODS),
)
def test_dht_frame_valid_header_then_arbitrary_bytes(
    kind: bytes, payload: bytes, method: str
) -> None:
    refused(WireError, lambda: decode_frame(kind + MSG_ID + payload, method))


@FUZZ
@given(valid_requests(), st.booleans(), st.data())
def test_dht_request_mutations(
    request: tuple[str, list[Any]], prove: bool, data: st.DataObject
) -> None:
    method, args = request
    frame = encode_request(MSG_ID, method, args, prove)
    decoded = decode_request(MSG_ID, split_frame(frame)[2])  # the valid one decodes
    assert (decoded.method, decoded.sender_key, decoded.prove) == (method, args[0], prove)
    candidate = mutate(data, frame)
    refused(WireError, lambda: decode_frame(candidate, method))


@FUZZ
@given(
    valid_responses(),
    st.sampled_from(DHT_METHODS),
    st.booleans(),
    st.none() | st.binary(min_size=16, max_size=16),
    st.data(),
)
def test_dht_response_mutations(
    response: tuple[str, Any],
    other_method: str,
    signed: bool,
    cookie: bytes | None,
    data: st.DataObject,
) -> None:
    method, result = response
    frame = encode_response(MSG_ID, result, SIGNER.sign if signed else None, cookie)
    assert not refused(WireError, lambda: decode_frame(frame, method))
    candidate = mutate(data, frame)
    refused(WireError, lambda: decode_frame(candidate, method))
    # A reply that answers another request than the one we sent.
    refused(WireError, lambda: decode_frame(candidate, other_method))


hostile_hosts = st.one_of(
    ips,
    st.text(max_size=70),
    st.text(alphabet="0123456789abcdef:.%", max_size=70),
    st.builds(lambda ip, zone: f"{ip}%{zone}", ips, st.text(max_size=10)),
    st.builds(lambda ip: ip.upper(), ips),
    st.builds(lambda ip: f" {ip}", ips),
    st.builds(lambda ip: f"[{ip}]", ips),
)
hostile_ports = st.one_of(
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.integers(-2, 65537),
    st.booleans(),
    st.none(),
    st.floats(),
    st.text(max_size=6),
    st.binary(max_size=4),
)
hostile_contacts = st.lists(
    st.one_of(
        st.tuples(node_keys | node_ids | st.binary(max_size=36), hostile_hosts, hostile_ports).map(
            list
        ),
        st.lists(st.one_of(node_keys, hostile_hosts, hostile_ports), max_size=4),
        hostile_hosts,
        st.none(),
    ),
    max_size=MAX_CONTACTS + 2,
)


@FUZZ
@given(hostile_contacts)
def test_dht_contacts_from_peers(raw: list[Any]) -> None:
    """Contacts are the one place a peer hands us addresses: host and port of any type."""
    for method, value in (("find_node", raw), ("find_value", {"nodes": raw})):
        payload = msgpack.packb(value, use_bin_type=True)
        try:
            result = decode_response(method, payload)
        except WireError:
            continue
        found = result.contacts if isinstance(result, FindValueReply) else result
        assert isinstance(found, tuple)
        for contact in found:
            assert isinstance(contact, Contact)
            address = contact.address
            assert 1 <= address.port <= 65535
            assert Address(address.host, address.port) == address  # canonical spelling
            assert Address.decode_from(Reader(address.encode())) == address


# --------------------------------------------------------------------------- messages

handles = st.from_regex(r"[a-z][a-z0-9_]{2,31}", fullmatch=True)
payloads = st.builds(
    MessagePayload,
    exactly(MESSAGE_ID_LEN),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 64) - 1),
    st.text(max_size=200),
    sender=st.just("") | handles,
)


@FUZZ
@given(st.binary(max_size=400))
def test_message_payload_arbitrary_bytes(data: bytes) -> None:
    try:
        payload = MessagePayload.decode(data)
    except WireError:
        return
    assert payload.encode() == data


@FUZZ
@given(payloads, st.data())
def test_message_payload_mutations(payload: MessagePayload, data: st.DataObject) -> None:
    encoded = payload.encode()
    assert MessagePayload.decode(encoded) == payload
    candidate = mutate(data, encoded)
    try:
        decoded = MessagePayload.decode(candidate)
    except WireError:
        return
    assert decoded.encode() == candidate


def feed_in_chunks(stream: bytes, cuts: list[int]) -> list[tuple[int, bytes]] | None:
    """Feed ``stream`` to a fresh decoder in pieces; None once it refuses the stream."""
    decoder = StreamFrameDecoder()
    frames: list[tuple[int, bytes]] = []
    start = 0
    for end in [*sorted(cuts), len(stream)]:
        try:
            frames += decoder.feed(stream[start:end])
        except WireError:
            return None
        # Never more buffered than one frame's header and largest payload.
        assert decoder.pending < 5 + MAX_STREAM_FRAME
        start = max(start, end)
    assert decoder.pending == len(stream) - sum(5 + len(p) for _, p in frames)
    return frames


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_stream_frames_arbitrary_bytes(stream: bytes, cuts: list[int]) -> None:
    feed_in_chunks(stream, cuts)


stream_frames = st.lists(
    st.tuples(st.sampled_from([FRAME_MESSAGE, FRAME_ACK]), st.binary(max_size=200)), max_size=6
)


@FUZZ
@given(stream_frames, st.lists(st.integers(0, 1400), max_size=6), st.data())
def test_stream_frames_mutations(
    frames: list[tuple[int, bytes]], cuts: list[int], data: st.DataObject
) -> None:
    stream = b"".join(encode_stream_frame(kind, payload) for kind, payload in frames)
    assert feed_in_chunks(stream, cuts) == frames  # any chunking, same frames
    feed_in_chunks(mutate(data, stream), cuts)


def test_stream_frame_length_is_checked_before_buffering() -> None:
    """A header announcing more than MAX_STREAM_FRAME is refused at once, before a peer
    can make us buffer it."""
    decoder = StreamFrameDecoder()
    header = struct.pack(">BI", FRAME_MESSAGE, MAX_STREAM_FRAME + 1)
    assert refused(WireError, lambda: decoder.feed(header))


mailbox_plaintexts = st.one_of(
    st.builds(
        lambda key, mid, env: encode_mailbox_plaintext(MAILBOX_MESSAGE, key, mid, env),
        exactly(32),
        exactly(MESSAGE_ID_LEN),
        st.binary(max_size=300),
    ),
    st.builds(
        lambda key, mid: encode_mailbox_plaintext(MAILBOX_ACK, key, mid, b""),
        exactly(32),
        exactly(MESSAGE_ID_LEN),
    ),
)


def check_mailbox_plaintext(data: bytes) -> None:
    try:
        kind, sender, msg_id, envelope = decode_mailbox_plaintext(data)
    except WireError:
        return
    assert encode_mailbox_plaintext(kind, sender, msg_id, envelope) == data


@FUZZ
@given(st.binary(max_size=400))
def test_mailbox_plaintext_arbitrary_bytes(data: bytes) -> None:
    check_mailbox_plaintext(data)


@FUZZ
@given(mailbox_plaintexts, st.data())
def test_mailbox_plaintext_mutations(valid: bytes, data: st.DataObject) -> None:
    assert not refused(WireError, lambda: decode_mailbox_plaintext(valid))
    check_mailbox_plaintext(mutate(data, valid))


# --------------------------------------------------------------------------- records

bundles = st.builds(
    lambda spk, sig, keys: PrekeyBundle(spk, sig, tuple(sorted(keys))),
    exactly(32),
    exactly(64),
    st.sets(exactly(32), max_size=MAX_ONE_TIME_PREKEYS),
)


SIGNERS = [Identity.from_seed(f"user{i}", bytes([i]) * 32) for i in range(3)]


@st.composite
def records(draw: st.DrawFn) -> bytes:
    signer = draw(st.sampled_from(SIGNERS))
    identity = Identity.from_seed(draw(handles), signer.seed)
    record = HandleRecord.create(
        identity,
        draw(st.lists(addresses, max_size=MAX_ADDRESSES)),
        seq=draw(u63),
        now=draw(st.integers(NOW - 3600, NOW)),
        lifetime=draw(st.integers(3601, 7200)),
        extension=draw(st.binary(max_size=200) | bundles.map(PrekeyBundle.encode)),
    )
    return record.encode()


def check_record(data: bytes) -> None:
    try:
        record = HandleRecord.decode(data)
    except RecordError:
        pass
    else:
        assert record.encode() == data
        refused(BundleError, lambda: PrekeyBundle.decode(record.extension))
    refused(RecordError, lambda: verify_record(data, NOW))


@FUZZ
@given(st.binary(max_size=600))
def test_record_arbitrary_bytes(data: bytes) -> None:
    check_record(data)
    check_record(b"P2HR\x01" + data)


@FUZZ
@given(records(), st.data())
def test_record_mutations(valid: bytes, data: st.DataObject) -> None:
    verify_record(valid, NOW)  # the valid one verifies
    check_record(mutate(data, valid))


# --------------------------------------------------------------------------- session codecs


@FUZZ
@given(st.binary(max_size=1500))
def test_bundle_arbitrary_bytes(data: bytes) -> None:
    try:
        bundle = PrekeyBundle.decode(data)
    except BundleError:
        return
    assert bundle.encode() == data


@FUZZ
@given(bundles, st.data())
def test_bundle_mutations(bundle: PrekeyBundle, data: st.DataObject) -> None:
    candidate = mutate(data, bundle.encode())
    try:
        decoded = PrekeyBundle.decode(candidate)
    except BundleError:
        return
    assert decoded.encode() == candidate


envelopes = st.one_of(
    st.builds(
        lambda r, c, h: Envelope(r, c, initial=h), ratchet_headers, ciphertexts, initial_headers
    ),
    st.builds(lambda r, c, s: Envelope(r, c, session=s), ratchet_headers, ciphertexts, exactly(16)),
)


@FUZZ
@given(st.binary(max_size=600))
def test_envelope_arbitrary_bytes(data: bytes) -> None:
    for candidate in (data, bytes([ENVELOPE_VERSION, TYPE_INITIAL]) + data):
        try:
            envelope = Envelope.decode(candidate)
        except EnvelopeError:
            continue
        assert envelope.encode() == candidate


@FUZZ
@given(envelopes, st.data())
def test_envelope_mutations(envelope: Envelope, data: st.DataObject) -> None:
    candidate = mutate(data, envelope.encode())
    try:
        decoded = Envelope.decode(candidate)
    except EnvelopeError:
        return
    assert decoded.encode() == candidate


# --------------------------------------------------------------------------- LAN announcements

LAN_IDENTITIES = [Identity.from_seed(f"lan_{i}", bytes([i + 1]) * 32) for i in range(3)]


@st.composite
def lan_announcements(draw: st.DrawFn) -> tuple[Identity, bytes, list[Address]]:
    """A valid TXT record, its announcer, and the A/AAAA records with the SRV port."""
    identity = draw(st.sampled_from(LAN_IDENTITIES))
    mode = draw(st.sampled_from(["everyone", "contacts"]))
    port = draw(ports)
    hosts = draw(st.lists(ips, min_size=1, max_size=8, unique=True))
    nonce = draw(exactly(16)) if mode == "contacts" else None
    props = build_txt(identity, port=port, addresses=hosts, mode=mode, now=NOW, nonce=nonce)  # type: ignore[arg-type]
    sources = [Address(h, port) for h in hosts]
    return identity, encode_txt(props), sources


def check_lan_txt(data: bytes, sources: list[Address]) -> None:
    """decode_txt and parse_txt raise only LanAnnouncementError; what decodes re-encodes
    to a record that decodes to the same properties."""
    try:
        props = decode_txt(data)
    except LanAnnouncementError:
        pass
    else:
        assert decode_txt(encode_txt(props)) == props  # keys come back in lower case
    contacts = {i.public_key: i.handle for i in LAN_IDENTITIES}
    pins = {i.handle: i.public_key for i in LAN_IDENTITIES}.get
    refused(
        LanAnnouncementError,
        lambda: parse_txt(data, source_addresses=sources, now=NOW, contacts=contacts, pins=pins),
    )


@FUZZ
@given(st.binary(max_size=1200))
def test_lan_txt_arbitrary_bytes(data: bytes) -> None:
    check_lan_txt(data, [Address("192.0.2.1", 4747)])


@FUZZ
@given(lan_announcements(), st.data())
def test_lan_txt_mutations(
    valid: tuple[Identity, bytes, list[Address]], data: st.DataObject
) -> None:
    identity, text, sources = valid
    contacts = {i.public_key: i.handle for i in LAN_IDENTITIES}
    pins = {i.handle: i.public_key for i in LAN_IDENTITIES}.get
    peer = parse_txt(text, source_addresses=sources, now=NOW, contacts=contacts, pins=pins)
    assert peer.public_key == identity.public_key  # the valid one verifies
    check_lan_txt(mutate(data, text), sources)


@pytest.mark.parametrize(
    "data",
    [
        b"\x01a" * 600,  # many one-byte strings without "="
        b"\x03a=b" * 200,  # many copies of one key
        b"".join(bytes([4]) + b"k%02d=" % i for i in range(100)),  # many keys
        b"\xff" + b"a" * 255,  # one string of the longest length, no "="
        bytes(1024),  # only empty strings
    ],
)
def test_lan_txt_long_runs_of_small_strings(data: bytes) -> None:
    """The TXT decoder is a loop, not a recursion: no depth to exhaust, only bounds."""
    with pytest.raises(LanAnnouncementError):
        decode_txt(data)


# --------------------------------------------------------------------------- call media

media_payloads = st.binary(min_size=1, max_size=300)
media_u32 = st.sampled_from([0, 1, (1 << 31), (1 << 32) - 1]) | st.integers(0, (1 << 32) - 1)
media_blocks = st.builds(ReportBlock, st.integers(0, 255), media_u32, media_u32, media_u32)
media_datagrams = st.one_of(
    st.builds(AudioPacket, media_u32, media_u32, media_payloads, st.booleans()),
    st.builds(
        AudioPacket,
        media_u32,
        media_u32,
        media_payloads,
        st.booleans(),
        media_payloads,
        st.integers(1, MAX_RED_DISTANCE),
    ),
    st.integers(1, 8).flatmap(
        lambda count: st.builds(
            VideoFragment,
            media_u32,
            st.integers(0, count - 1),
            st.just(count),
            media_u32,
            media_payloads,
            st.booleans(),
        )
    ),
    st.builds(
        ReceiverReport,
        media_u32,
        media_u32,
        media_u32,
        media_blocks,
        media_blocks,
        st.booleans(),
        st.booleans(),
    ),
    st.builds(KeyframeRequest, media_u32),
    st.builds(
        VideoNack,
        st.lists(
            st.builds(NackEntry, media_u32, st.just(NACK_WHOLE_FRAME))
            | st.builds(NackEntry, media_u32, st.integers(0, 1000), st.integers(0, 0x7F)),
            min_size=1,
            max_size=MAX_NACK_ENTRIES,
        ).map(tuple),
    ),
)


def check_media(data: bytes) -> None:
    """decode() returns a value that round-trips, or raises MediaWireError."""
    try:
        message = media_decode(data)
    except MediaWireError:
        return
    again = message.encode()
    assert media_decode(again) == message
    assert len(again) == len(data)  # the same layout, at most other ignored flag bits
    if isinstance(message, AudioPacket) and message.redundant:
        # Two lengths, one datagram: the copy and the primary fill it exactly.
        assert AUDIO_RED_HEADER + len(message.redundant) + len(message.payload) == len(data)


@FUZZ
@given(st.binary(max_size=300))
def test_media_datagram_arbitrary_bytes(data: bytes) -> None:
    check_media(data)


@FUZZ
@given(st.sampled_from([0x11, 0x12, 0x13, 0x14, 0x15, 0x16]), st.binary(max_size=64))
def test_media_datagram_valid_type_then_arbitrary_bytes(kind: int, rest: bytes) -> None:
    check_media(bytes([kind]) + rest)


@FUZZ
@given(media_datagrams, st.data())
def test_media_datagram_mutations(message: Any, data: st.DataObject) -> None:
    check_media(mutate(data, message.encode()))


class _SilentPeer:
    """A MediaPeer that is never used: the CallMedia below only receives."""

    max_datagram_size = 1158

    def send_datagram(self, data: bytes, *, urgent: bool = False) -> bool:
        return True

    async def wait_closed(self) -> None:
        await trio.sleep_forever()


@FUZZ
@given(st.lists(media_datagrams, min_size=1, max_size=10), st.data())
def test_call_media_drops_and_counts_malformed_datagrams(
    messages: list[Any], data: st.DataObject
) -> None:
    """Whatever arrives, datagram_received never raises; what does not decode is counted
    and changes nothing else in the call's statistics."""
    mutated = [mutate(data, m.encode()) for m in messages]

    async def main() -> None:
        media = CallMedia(_SilentPeer(), audio_in=None, video_in=None, record=None, duration=1)
        for datagram in mutated:
            before = media.statistics()
            media.datagram_received(datagram)
            after = media.statistics()
            if refused(MediaWireError, functools.partial(media_decode, datagram)):
                assert after["datagrams_malformed"] == before["datagrams_malformed"] + 1
                ignore = {"datagrams_malformed", "datagrams_received", "bitrate_received_kbps"}
                assert {k: v for k, v in after.items() if k not in ignore} == {
                    k: v for k, v in before.items() if k not in ignore
                }
            else:
                assert after["datagrams_malformed"] == before["datagrams_malformed"]

    trio.run(main)


# --------------------------------------------------------------------------- call signals


@pytest.mark.parametrize("depth", [10, 500, 1000, MAX_SIGNAL - 2])
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_call_signal_nested_deep_raises_only_value_error(opener: str, depth: int) -> None:
    """A peer with a session could send "[[[[..." within MAX_SIGNAL: json recursed out of
    the decoder as a RecursionError (issue 12); it must be the declared ValueError."""
    text = (opener * depth)[:MAX_SIGNAL]
    with pytest.raises(ValueError):
        decode_signal(text)


@FUZZ
@given(st.text(max_size=MAX_SIGNAL + 10))
def test_call_signal_garbage_raises_only_value_error(text: str) -> None:
    try:
        doc = decode_signal(text)
    except ValueError:
        return
    assert doc["type"] in SIGNAL_TYPES


#: Any JSON value, nested (what a peer with a session can put in any field of a signal).
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)
CALL_ID = "0123456789abcdef" * 2


def _check_signal(text: str) -> None:
    """decode_signal either raises ValueError or returns a signal whose fields the
    call manager reads have the types it expects."""
    try:
        doc = decode_signal(text)
    except ValueError:
        return
    assert doc["type"] in SIGNAL_TYPES and doc["call"] == CALL_ID
    assert all(isinstance(doc[f], bool) for f in ("audio", "video") if f in doc)
    assert "reason" not in doc or isinstance(doc["reason"], str)


@FUZZ
@given(
    st.sampled_from(SIGNAL_TYPES),
    st.sampled_from(["type", "call", "audio", "video", "reason", "extra"]),
    JSON_VALUES,
)
def test_call_signal_fields_of_any_json_type_raise_only_value_error(
    kind: str, field: str, value: Any
) -> None:
    """A signal whose one field holds any JSON value (a list as the reason was a
    TypeError: ``[] in dict``)."""
    _check_signal(json.dumps({"type": kind, "call": CALL_ID, field: value}))


@pytest.mark.parametrize("field", ["reason", "audio", "extra"])
@pytest.mark.parametrize("closed", [True, False])
@pytest.mark.parametrize("opener", [("[", "]"), ('{"a":', "}")])
def test_call_signal_deep_nesting_inside_a_valid_signal(
    field: str, closed: bool, opener: tuple[str, str]
) -> None:
    """Nesting as deep as MAX_SIGNAL allows, inside a field of an otherwise valid signal,
    closed (valid JSON) or not, and decoded from a caller already deep in the stack (the
    daemon calls the decoder from within trio tasks): only ValueError, or a signal."""
    prefix = f'{{"type":"reject","call":"{CALL_ID}","{field}":'
    room = MAX_SIGNAL - len(prefix) - 2  # the closing "}" and the innermost "1"
    depth = room // (len(opener[0]) + len(opener[1])) if closed else room // len(opener[0])
    nested = opener[0] * depth + ("1" + opener[1] * depth if closed else "")
    text = prefix + nested + "}"
    assert len(text) <= MAX_SIGNAL
    _check_signal(text)

    def deep(levels: int) -> None:
        if levels:
            deep(levels - 1)
        else:
            _check_signal(text)

    # leave the decoder fewer frames than the nesting needs
    deep(max(0, sys.getrecursionlimit() - depth // 2 - 60))
