"""The file protocol, sans I/O (p2pd/files/protocol.py): layouts, the offer codec and
its bounds, chunk sealing, verification as groups arrive, forged and reordered chunks,
resume offsets, hostile names. A sender and a receiver are wired together in memory."""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd import wire
from p2pd.files.protocol import (
    F_ACK,
    F_CHUNK,
    F_END,
    F_REQUEST,
    HASHES_PER_FRAME,
    MAX_FILE_SIZE,
    MAX_FRAME,
    MAX_GROUPS,
    MAX_NAME_BYTES,
    MAX_OFFER_TEXT,
    STREAM_HEADER,
    ChunkCipher,
    FileProtocolError,
    FrameDecoder,
    Layout,
    Offer,
    ReceiverStream,
    SenderStream,
    encode_frame,
    group_hash,
    hash_file,
    place_file,
    root_of,
    safe_name,
    verify_file,
)

CHUNK = 4096  # the smallest chunk: many chunks and groups from small data
GROUP_CHUNKS = 4


def make(
    data: bytes, chunk: int = CHUNK, group_chunks: int = GROUP_CHUNKS
) -> tuple[Offer, list[bytes]]:
    layout = Layout(len(data), chunk, group_chunks)
    hashes = [
        group_hash(data[g * layout.group_size : (g + 1) * layout.group_size])
        for g in range(layout.groups)
    ]
    offer = Offer(os.urandom(16), os.urandom(32), layout, root_of(hashes), "a.bin")
    return offer, hashes


def chunk_frames(tx: SenderStream, data: bytes, first_group: int = 0) -> list[bytes]:
    lay = tx.layout
    out = []
    for index in range(lay.group_span(first_group)[0], lay.chunks):
        offset, length = lay.chunk_span(index)
        out.append(tx.chunk_frame(index, data[offset : offset + length]))
    return out


def receive_all(offer: Offer, hashes: list[bytes], data: bytes) -> tuple[bytes, ReceiverStream]:
    """Sender and receiver in memory, every frame in one go and then byte by byte."""
    tx = SenderStream(offer, hashes)
    rx = ReceiverStream(offer, None, 0)
    out = bytearray(len(data))
    stream = tx.hash_frames() + b"".join(chunk_frames(tx, data)) + encode_frame(F_END)
    verified: list[int] = []
    for piece in (stream[i : i + 7919] for i in range(0, len(stream), 7919)):
        result = rx.data_received(piece)
        for offset, plain in result.writes:
            out[offset : offset + len(plain)] = plain
        verified += result.verified
    assert verified == list(range(offer.layout.groups))
    return bytes(out), rx


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, CHUNK * GROUP_CHUNKS - 1, CHUNK * GROUP_CHUNKS,
     CHUNK * GROUP_CHUNKS + 1, 5 * CHUNK * GROUP_CHUNKS + 333],
)  # fmt: skip
def test_sizes_around_chunk_and_group_boundaries_round_trip(size: int) -> None:
    data = os.urandom(size)
    offer, hashes = make(data)
    got, rx = receive_all(offer, hashes, data)
    assert got == data and rx.complete


def test_a_forged_chunk_is_refused() -> None:
    data = os.urandom(3 * CHUNK * GROUP_CHUNKS)
    offer, hashes = make(data)
    tx = SenderStream(offer, hashes)
    rx = ReceiverStream(offer, None, 0)
    rx.data_received(tx.hash_frames())
    frames = chunk_frames(tx, data)
    rx.data_received(frames[0])
    forged = bytearray(frames[1])
    forged[-1] ^= 1  # one bit of the tag
    with pytest.raises(FileProtocolError, match="does not authenticate"):
        rx.data_received(bytes(forged))
    # sealed under another key (an attacker without the offer's key): refused too
    other = ChunkCipher(os.urandom(32), offer.transfer_id)
    offset, length = offer.layout.chunk_span(1)
    fake = encode_frame(
        F_CHUNK, struct.pack(">Q", 1) + other.seal(1, data[offset : offset + length])
    )
    rx2 = ReceiverStream(offer, hashes, 0)
    rx2.data_received(frames[0])
    with pytest.raises(FileProtocolError):
        rx2.data_received(fake)


def test_a_chunk_cannot_be_moved_replayed_or_reordered() -> None:
    data = os.urandom(2 * CHUNK * GROUP_CHUNKS)
    offer, hashes = make(data)
    tx = SenderStream(offer, hashes)
    frames = chunk_frames(tx, data)
    # chunk 1's seal relabelled as chunk 0: the nonce differs, the tag fails
    relabelled = encode_frame(F_CHUNK, struct.pack(">Q", 0) + frames[1][5 + 8 :])
    with pytest.raises(FileProtocolError):
        ReceiverStream(offer, hashes, 0).data_received(relabelled)
    # out of order
    with pytest.raises(FileProtocolError, match="out of order"):
        ReceiverStream(offer, hashes, 0).data_received(frames[1])
    # a replay of chunk 0 after it
    rx = ReceiverStream(offer, hashes, 0)
    rx.data_received(frames[0])
    with pytest.raises(FileProtocolError, match="out of order"):
        rx.data_received(frames[0])
    # the same chunk from another transfer of the same file (same key is never reused,
    # but even then the transfer id is in the nonce)
    other = Offer(os.urandom(16), offer.key, offer.layout, offer.root, "a.bin")
    with pytest.raises(FileProtocolError):
        ReceiverStream(other, hashes, 0).data_received(frames[0])


def test_a_group_that_does_not_match_its_hash_is_refused() -> None:
    """A sender (whose key is right) sending other bytes than it hashed."""
    data = os.urandom(2 * CHUNK * GROUP_CHUNKS)
    offer, hashes = make(data)
    tx = SenderStream(offer, hashes)
    rx = ReceiverStream(offer, hashes, 0)
    wrong = bytearray(data)
    wrong[CHUNK + 3] ^= 0xFF
    frames = chunk_frames(tx, bytes(wrong))
    for frame in frames[: GROUP_CHUNKS - 1]:
        assert rx.data_received(frame).verified == []
    with pytest.raises(FileProtocolError, match="group 0 does not match"):
        rx.data_received(frames[GROUP_CHUNKS - 1])
    assert rx.next_group == 0  # nothing verified


def test_a_hash_list_that_does_not_give_the_root_is_refused() -> None:
    data = os.urandom(3 * CHUNK * GROUP_CHUNKS)
    offer, hashes = make(data)
    lying = SenderStream(offer, [hashes[0], hashes[2], hashes[1]])
    with pytest.raises(FileProtocolError, match="root"):
        ReceiverStream(offer, None, 0).data_received(lying.hash_frames())
    # a chunk before the hash list
    with pytest.raises(FileProtocolError, match="before the hash list"):
        ReceiverStream(offer, None, 0).data_received(chunk_frames(lying, data)[0])
    # a wrong root for an empty file
    empty = Offer(os.urandom(16), os.urandom(32), Layout(0, CHUNK, GROUP_CHUNKS), b"\0" * 32, "e")
    with pytest.raises(FileProtocolError):
        ReceiverStream(empty, None, 0)


def test_resume_asks_from_the_next_group_and_counts_what_comes_twice() -> None:
    groups = 6
    data = os.urandom(groups * CHUNK * GROUP_CHUNKS)
    offer, hashes = make(data)
    tx = SenderStream(offer, hashes)
    # groups 0..2 verified; the partial file holds half of group 3 too
    written = 3 * CHUNK * GROUP_CHUNKS + 2 * CHUNK
    rx = ReceiverStream(offer, hashes, 3, written_until=written)
    assert rx.start() == encode_frame(F_REQUEST, struct.pack(">IB", 3, 0))
    events = tx.data_received(rx.start())
    assert (events[0].kind, events[0].group, events[0].hashes) == (F_REQUEST, 3, False)
    resent = 0
    verified = []
    for frame in chunk_frames(tx, data, first_group=3):
        result = rx.data_received(frame)
        resent += result.resent
        verified += result.verified
        if result.verified:
            ack = tx.data_received(result.replies)
            assert ack[0].kind == F_ACK and ack[0].group == result.verified[-1] + 1
    assert verified == [3, 4, 5] and rx.complete
    assert resent == 2 * CHUNK  # only what was written past the last verified group
    # without the hash list yet, the request asks for it
    fresh = ReceiverStream(offer, None, 0)
    assert tx.data_received(fresh.start())[0].hashes is True


def test_hash_lists_longer_than_one_frame() -> None:
    layout = Layout(3 * HASHES_PER_FRAME * CHUNK + 1, CHUNK, 1)
    hashes = [os.urandom(32) for _ in range(layout.groups)]
    offer = Offer(os.urandom(16), os.urandom(32), layout, root_of(hashes), "big")
    rx = ReceiverStream(offer, None, 0)
    result = rx.data_received(SenderStream(offer, hashes).hash_frames())
    assert result.hashes == hashes


def test_offer_round_trip_and_bounds() -> None:
    offer, _ = make(os.urandom(10_000))
    offer = Offer(offer.transfer_id, offer.key, offer.layout, offer.root, "ünï.txt", "text/plain")
    assert Offer.from_text(offer.to_text()) == offer
    assert len(offer.to_text()) <= MAX_OFFER_TEXT <= wire.MAX_FILE_OFFER_TEXT
    raw = offer.encode()
    for cut in range(len(raw)):
        with pytest.raises(FileProtocolError):
            Offer.decode(raw[:cut])
    with pytest.raises(FileProtocolError):
        Offer.decode(raw + b"x")
    with pytest.raises(FileProtocolError):
        Offer.from_text("zz" * 10)
    with pytest.raises(FileProtocolError):
        Offer.from_text("00" * (MAX_OFFER_TEXT // 2 + 1))
    for layout in (
        Layout(MAX_FILE_SIZE + 1),
        Layout(10, 100, 1),  # chunk too small
        Layout(10, 2 << 20, 1),  # chunk too large
        Layout(10, 4096, 0),
        Layout(MAX_GROUPS * 4096 + 1, 4096, 1),  # too many groups
    ):
        bad = bytearray(raw)
        bad[49:63] = struct.pack(">QIH", layout.size, layout.chunk_size, layout.group_chunks)
        with pytest.raises(FileProtocolError):
            Offer.decode(bytes(bad))
    # a media type that is not one becomes application/octet-stream
    odd = Offer(offer.transfer_id, offer.key, offer.layout, offer.root, "x", "text/plain\n")
    assert Offer.decode(odd.encode()).media_type == "application/octet-stream"


def test_the_default_layout_keeps_the_hash_list_bounded() -> None:
    assert Layout.for_size(100 << 20).group_size == 1 << 20
    huge = Layout.for_size(MAX_FILE_SIZE)
    huge.check()
    assert huge.groups <= MAX_GROUPS
    assert huge.chunk_size + 24 <= MAX_FRAME


def test_frame_lengths_are_bounded_before_buffering() -> None:
    decoder = FrameDecoder(header=True)
    with pytest.raises(FileProtocolError):
        decoder.feed(b"XY")
    decoder = FrameDecoder(header=True)
    with pytest.raises(FileProtocolError):
        decoder.feed(STREAM_HEADER + struct.pack(">BI", F_CHUNK, MAX_FRAME + 1))
    with pytest.raises(FileProtocolError):
        FrameDecoder(header=False).feed(struct.pack(">BI", 99, 0))


@given(st.binary(max_size=300))
def test_garbage_raises_only_our_error(data: bytes) -> None:
    offer, hashes = make(os.urandom(3 * CHUNK))
    for feed in (
        lambda: Offer.decode(data),
        lambda: FrameDecoder(header=True).feed(data),
        lambda: ReceiverStream(offer, None, 0).data_received(data),
        lambda: ReceiverStream(offer, hashes, 0).data_received(data),
        lambda: SenderStream(offer, hashes).data_received(data),
    ):
        with contextlib.suppress(FileProtocolError):
            feed()


HOSTILE = [
    ("../../etc/passwd", "passwd"),
    ("/etc/shadow", "shadow"),
    ("..\\..\\windows\\system32\\x.dll", "x.dll"),
    ("..", "file"),
    (".", "file"),
    ("", "file"),
    (".bashrc", "bashrc"),
    ("...", "file"),
    ("a\x00b\x1bc\n.txt", "a_b_c_.txt"),
    ("evil\u202etxt.exe", "evil_txt.exe"),  # a right-to-left override
    ("name. . .", "name"),
    ("CON.txt", "_CON.txt"),
    ("c:boot.ini", "c_boot.ini"),
    ("  spaced  ", "spaced"),
]


@pytest.mark.parametrize(("offered", "expected"), HOSTILE)
def test_hostile_names_are_made_safe(offered: str, expected: str) -> None:
    assert safe_name(offered) == expected


@given(st.text(max_size=400))
def test_any_name_is_one_safe_component(offered: str) -> None:
    name = safe_name(offered)
    assert name and "/" not in name and "\\" not in name and "\0" not in name
    assert name not in (".", "..") and not name.startswith(".")
    assert len(name.encode()) <= MAX_NAME_BYTES
    assert all(ord(c) >= 32 and ord(c) != 127 for c in name)


def test_long_names_keep_their_extension() -> None:
    name = safe_name("é" * 500 + ".jpeg")
    assert name.endswith(".jpeg") and len(name.encode()) <= MAX_NAME_BYTES


def test_placing_a_file_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("mine")
    for expected in ("a (1).txt", "a (2).txt"):
        partial = tmp_path / ".p2pd-x.partial"
        partial.write_text("theirs")
        assert place_file(partial, tmp_path, "a.txt") == tmp_path / expected
        assert not partial.exists()
    assert (tmp_path / "a.txt").read_text() == "mine"
    partial = tmp_path / ".p2pd-y.partial"
    partial.write_text("x")
    assert place_file(partial, tmp_path, "noext") == tmp_path / "noext"


def test_hash_and_verify_a_file_on_disk(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK * GROUP_CHUNKS + 5)
    path = tmp_path / "f"
    path.write_bytes(data)
    offer, hashes = make(data)
    assert hash_file(path, offer.layout) == hashes
    assert verify_file(path, offer.layout, offer.root)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert not verify_file(path, offer.layout, offer.root)
    path.write_bytes(data + b"x")
    assert not verify_file(path, offer.layout, offer.root)


def test_the_offer_travels_as_a_message_kind() -> None:
    offer, _ = make(os.urandom(100))
    payload = wire.MessagePayload(os.urandom(16), 1, 0, offer.to_text(), kind=wire.KIND_FILE)
    decoded = wire.MessagePayload.decode(payload.encode())
    assert decoded.kind == wire.KIND_FILE and Offer.from_text(decoded.text) == offer
    too_long = wire.MessagePayload(os.urandom(16), 1, 0, "0" * 5000, kind=wire.KIND_FILE)
    with pytest.raises(wire.WireError):
        wire.MessagePayload.decode(too_long.encode())


def test_verification_overhead_is_small() -> None:
    """What the verification data costs on the wire, for the default layout: the hash
    list (32 bytes per 1 MiB group) and per chunk a frame header, index and tag."""
    layout = Layout.for_size(256 << 20)
    hash_bytes = 32 * layout.groups + 9 * -(-layout.groups // HASHES_PER_FRAME)
    per_chunk = 5 + 8 + 16
    overhead = (hash_bytes + per_chunk * layout.chunks) / layout.size
    assert overhead < 0.001  # under 0.1 %
