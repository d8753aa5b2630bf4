"""p2pd.media's sans-I/O cores and codec glue, with no socket and no clock but ``now``:
the datagram format (round trips, and garbage raises only MediaWireError), the jitter
buffer, the frame assembler, RFC 3550 statistics, the concealment floor, Opus (FEC and
PLC through libopus, PLC through FFmpeg), VP8, sources and recorders."""

from __future__ import annotations

import contextlib
import ctypes
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from required_groups import skip_or_fail

from p2pd.errors import UsageError, WireError
from p2pd.media.assembler import AssemblerConfig, FrameAssembler
from p2pd.media.codecs import (
    FRAME_SAMPLES,
    LibopusDecoder,
    OpusEncoder,
    PyAVOpusDecoder,
    Vp8Decoder,
    Vp8Encoder,
    load_libopus,
)
from p2pd.media.jitter import JitterBuffer, JitterConfig, PlayoutKind, align_tick, extend
from p2pd.media.plc import ConcealmentFloor
from p2pd.media.sinks import MatroskaRecorder, WavRecorder, open_recorder
from p2pd.media.sources import (
    TestPattern,
    ToneSource,
    check_audio_spec,
    check_video_spec,
    open_audio_source,
    open_video_source,
)
from p2pd.media.stats import ReceptionStats, RttEstimator
from p2pd.media.wire import (
    MAX_FRAGMENTS,
    MAX_RED_DISTANCE,
    AudioPacket,
    KeyframeRequest,
    MediaWireError,
    ReceiverReport,
    ReportBlock,
    VideoFragment,
    decode,
    fragment,
)

U32 = st.integers(0, 2**32 - 1)
PAYLOAD = st.binary(min_size=1, max_size=1200)
FRAME = 0.020


def dominant_frequency(pcm: np.ndarray) -> float:
    x = pcm.astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / 48000)[int(spectrum.argmax())])


# --------------------------------------------------------------------------- wire

reports = st.builds(ReportBlock, st.integers(0, 255), U32, U32, U32)
datagrams = st.one_of(
    st.builds(AudioPacket, U32, U32, PAYLOAD, st.booleans()),
    st.builds(
        AudioPacket, U32, U32, PAYLOAD, st.booleans(), PAYLOAD,
        st.integers(1, MAX_RED_DISTANCE),
    ),
    st.integers(1, MAX_FRAGMENTS).flatmap(
        lambda count: st.builds(
            VideoFragment, U32, st.integers(0, count - 1), st.just(count), U32, PAYLOAD,
            st.booleans(),
        )
    ),
    st.builds(ReceiverReport, U32, U32, U32, reports, reports, st.booleans()),
    st.builds(KeyframeRequest, U32),
)  # fmt: skip


@given(datagrams)
def test_every_datagram_round_trips(message: object) -> None:
    encoded = message.encode()  # type: ignore[attr-defined]
    assert decode(encoded) == message


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_garbage_raises_only_media_wire_error(data: bytes) -> None:
    try:
        decode(data)
    except MediaWireError as exc:
        assert isinstance(exc, WireError)


@given(datagrams, st.data())
def test_mutated_datagrams_raise_only_media_wire_error(
    message: object, data: st.DataObject
) -> None:
    encoded = bytearray(message.encode())  # type: ignore[attr-defined]
    cut = data.draw(st.integers(0, len(encoded)))
    flip = data.draw(st.integers(0, max(0, cut - 1)))
    mutated = bytes(encoded[:cut])
    if mutated:
        mutated = mutated[:flip] + bytes([mutated[flip] ^ 0xFF]) + mutated[flip + 1 :]
    with contextlib.suppress(MediaWireError):
        decode(mutated)


def test_datagram_layout_is_as_documented() -> None:
    assert (
        AudioPacket(1, 960, b"op", start=True).encode()
        == bytes.fromhex("11 01 00000001 000003c0") + b"op"
    )
    assert (
        VideoFragment(7, 1, 3, 90000, b"v", keyframe=True).encode()
        == bytes.fromhex("12 01 00000007 0001 0003 00015f90") + b"v"
    )
    assert KeyframeRequest(2).encode() == bytes.fromhex("14 00000002")
    report = ReceiverReport(1, 2, 3, ReportBlock(4, 5, 6, 7)).encode()
    assert report[:14] == bytes.fromhex("13 00 00000001 00000002 00000003")
    assert report[14:27] == bytes.fromhex("04 00000005 00000006 00000007")
    assert len(report) == 40
    assert ReceiverReport(1, accepts_redundancy=True).encode()[:2] == bytes.fromhex("13 01")
    red = AudioPacket(7, 6720, b"new", start=False, redundant=b"old").encode()
    assert red == bytes.fromhex("15 00 00000007 00001a40 01 0003") + b"old" + b"new"
    packet = decode(red)
    assert isinstance(packet, AudioPacket)
    assert (packet.redundant_seq, packet.redundant_timestamp) == (6, 5760)
    # Wrapping: the copy of packet 0 is packet 2**32 - 1.
    first = AudioPacket(0, 0, b"n", redundant=b"o")
    assert (first.redundant_seq, first.redundant_timestamp) == (2**32 - 1, 2**32 - 960)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x21" + bytes(20),  # version 2
        b"\x1f" + bytes(20),  # unknown kind
        bytes.fromhex("11 00 00000001 00000002"),  # audio without payload
        bytes.fromhex("12 00 00000001 0003 0003 00000000") + b"x",  # index == count
        bytes.fromhex("12 00 00000001 0000 0000 00000000") + b"x",  # count 0
        bytes.fromhex("12 00 00000001 0000 0401 00000000") + b"x",  # count 1025
        b"\x13" + bytes(38),  # short report
        b"\x14" + bytes(5),  # long keyframe request
        bytes.fromhex("15 00 00000001 00000002 01 0001") + b"r",  # no primary
        bytes.fromhex("15 00 00000001 00000002 01 0002") + b"rp",  # copy eats the primary
        bytes.fromhex("15 00 00000001 00000002 01 ffff") + b"rp",  # length beyond the end
        bytes.fromhex("15 00 00000001 00000002 01 0000") + b"p",  # empty copy
        bytes.fromhex("15 00 00000001 00000002 00 0001") + b"rp",  # distance 0
        bytes.fromhex("15 00 00000001 00000002 09 0001") + b"rp",  # distance 9
        bytes.fromhex("15 00 00000001 00000002 01"),  # truncated header
    ],
)
def test_malformed_datagrams_are_refused(data: bytes) -> None:
    with pytest.raises(MediaWireError):
        decode(data)


@given(st.binary(min_size=1, max_size=20000), st.integers(20, 1200))
def test_fragments_reassemble_and_fit(data: bytes, limit: int) -> None:
    pieces = fragment(5, 9, data, keyframe=True, max_datagram=limit)
    assert b"".join(p.payload for p in pieces) == data
    assert all(0 < len(p.encode()) <= limit for p in pieces)
    assert [p.index for p in pieces] == list(range(len(pieces)))
    assert {p.count for p in pieces} == {len(pieces)}


def test_encoders_refuse_out_of_range_values() -> None:
    with pytest.raises(UsageError):
        AudioPacket(2**32, 0, b"x").encode()
    with pytest.raises(UsageError):
        AudioPacket(0, 0, b"").encode()
    with pytest.raises(UsageError):
        VideoFragment(0, 2, 2, 0, b"x").encode()
    with pytest.raises(UsageError):
        fragment(0, 0, b"x" * 10, keyframe=False, max_datagram=14)
    with pytest.raises(UsageError):
        AudioPacket(1, 0, b"x", redundant=b"y", distance=0).encode()
    with pytest.raises(UsageError):
        AudioPacket(1, 0, b"x", redundant=b"y" * 65536).encode()


# --------------------------------------------------------------------------- jitter buffer


def test_extend_unwraps_32_bit_values() -> None:
    assert extend(5, None) == 5
    assert extend(2, 2**32 - 3) == 2**32 + 2
    assert extend(2**32 - 3, 2**32 + 2) == 2**32 - 3
    assert extend(10, 20) == 10


def feed(jb: JitterBuffer, seqs: list[int], arrival: dict[int, float]) -> None:
    for seq in seqs:
        jb.push(seq, seq * 960, b"p%d" % seq, arrival[seq])


def run_ticks(
    jb: JitterBuffer, packets: dict[int, float], *, ticks: int, start: float = 0.0
) -> list[tuple[PlayoutKind, int | None]]:
    """Deliver each packet at its arrival time and pop every 20 ms; returns decisions."""
    pending = sorted(packets.items(), key=lambda kv: kv[1])
    out: list[tuple[PlayoutKind, int | None]] = []
    for k in range(ticks):
        now = start + k * FRAME
        while pending and pending[0][1] <= now:
            seq, at = pending.pop(0)
            jb.push(seq % 2**32, (seq * 960) % 2**32, b"p%d" % seq, at)
        decision = jb.pop(now)
        if decision is not None:
            out.append((decision.kind, decision.seq))
    return out


def test_steady_stream_plays_every_frame_in_order_after_the_target_delay() -> None:
    jb = JitterBuffer()
    packets = {seq: seq * FRAME + 0.003 for seq in range(100)}
    decisions = run_ticks(jb, packets, ticks=110)
    played = [seq for kind, seq in decisions if kind is PlayoutKind.FRAME]
    assert played == list(range(len(played)))
    assert len(played) >= 95
    assert jb.target_delay == pytest.approx(0.020)  # no jitter: the floor
    assert jb.statistics()["concealed"] == 0


def test_a_lost_frame_is_rebuilt_from_the_next_packets_fec() -> None:
    jb = JitterBuffer()
    packets = {seq: seq * FRAME + 0.001 for seq in range(60) if seq != 30}
    decisions = run_ticks(jb, packets, ticks=70)
    assert (PlayoutKind.FEC, 30) in decisions
    fec = next(d for d in decisions if d[1] == 30)
    assert fec[0] is PlayoutKind.FEC
    # After a loss the buffer holds one more frame for FEC: the target grows.
    assert jb.target_delay == pytest.approx(0.040, abs=0.002)


def test_two_lost_frames_conceal_the_first_and_fec_the_second() -> None:
    jb = JitterBuffer()
    packets = {seq: seq * FRAME + 0.001 for seq in range(60) if seq not in (30, 31)}
    decisions = dict((seq, kind) for kind, seq in run_ticks(jb, packets, ticks=70) if seq)
    assert decisions[30] is PlayoutKind.CONCEAL
    assert decisions[31] is PlayoutKind.FEC
    assert decisions[32] is PlayoutKind.FRAME


def test_target_follows_the_95th_percentile_of_the_delay() -> None:
    rng = np.random.default_rng(1)
    jb = JitterBuffer(JitterConfig(fec_headroom=False))
    delays = rng.uniform(0, 0.080, 250)
    packets = {seq: seq * FRAME + float(delays[seq]) for seq in range(250)}
    run_ticks(jb, packets, ticks=260)
    expected = np.quantile(delays, 0.95) - delays.min()
    assert jb.target_delay == pytest.approx(expected, abs=0.004)
    stats = jb.statistics()
    # Aiming at the 95th percentile, about 5% arrive too late for their turn.
    assert stats["late"] + stats["concealed"] <= 0.12 * 250


def test_target_is_clamped() -> None:
    jb = JitterBuffer(JitterConfig(max_delay=0.1, fec_headroom=False))
    packets = {seq: seq * FRAME + (0.5 if seq % 2 else 0.0) for seq in range(40)}
    run_ticks(jb, packets, ticks=50)
    assert jb.target_delay == 0.1


def test_an_underrun_conceals_without_skipping_the_late_frame() -> None:
    jb = JitterBuffer()
    packets = {seq: seq * FRAME + 0.001 for seq in range(40)}
    packets[20] = packets[21] = 20 * FRAME + 0.1  # a 100 ms delay spike, no loss
    for seq in range(22, 40):
        packets[seq] = max(packets[seq], 0.501)
    decisions = run_ticks(jb, packets, ticks=60)
    played = [seq for kind, seq in decisions if kind is PlayoutKind.FRAME]
    assert 20 in played and 21 in played  # waited for, not concealed
    assert (PlayoutKind.CONCEAL, None) in decisions  # the stretch
    assert jb.statistics()["late"] == 0


def test_a_burst_after_a_stall_is_caught_up_by_dropping_frames() -> None:
    jb = JitterBuffer()
    packets = {seq: seq * FRAME + 0.001 for seq in range(200)}
    for seq in range(50, 65):  # 300 ms stall, then everything at once
        packets[seq] = 65 * FRAME
    run_ticks(jb, packets, ticks=210)
    stats = jb.statistics()
    assert stats["dropped"] > 0
    assert stats["buffered"] <= 2


def test_reordered_and_duplicate_packets() -> None:
    jb = JitterBuffer()
    jb.push(1, 960, b"b", 0.021)
    jb.push(0, 0, b"a", 0.022)  # reordered before playout: becomes the first
    jb.push(0, 0, b"a", 0.023)
    assert jb.statistics()["duplicates"] == 1
    first = jb.pop(0.06)
    assert first is not None and first.seq == 0 and first.payload == b"a"


def test_sequence_numbers_wrap() -> None:
    jb = JitterBuffer()
    base = 2**32 - 10
    packets = {base + i: i * FRAME + 0.001 for i in range(30)}
    decisions = run_ticks(jb, packets, ticks=40)
    played = [seq for kind, seq in decisions if kind is PlayoutKind.FRAME]
    assert len(played) >= 25 and played == sorted(played)
    assert jb.statistics()["late"] == 0


def test_a_new_stream_resets_the_buffer() -> None:
    jb = JitterBuffer()
    for seq in range(500, 510):
        jb.push(seq, seq * 960, b"x", seq * FRAME)
    jb.push(0, 0, b"new", 10.0, start=True)
    assert jb.statistics()["resets"] == 1
    decision = jb.pop(10.1)
    assert decision is not None and decision.payload == b"new"


def test_capacity_is_bounded() -> None:
    jb = JitterBuffer(JitterConfig(capacity=8))
    for seq in range(100):
        jb.push(seq, seq * 960, b"x", 0.0)
    assert jb.statistics()["buffered"] == 8


@given(st.lists(st.tuples(U32, U32, st.floats(0, 100)), max_size=200), st.floats(0, 200))
def test_jitter_buffer_never_fails_on_any_input(
    packets: list[tuple[int, int, float]], end: float
) -> None:
    jb = JitterBuffer()
    for seq, ts, at in packets:
        jb.push(seq, ts, b"x", at)
    for k in range(20):
        jb.pop(end + k * FRAME)


# --------------------------------------------------------------------------- assembler


def frames_of(fid: int, size: int, *, key: bool = False) -> list[VideoFragment]:
    return fragment(fid, fid * 3000, bytes([fid % 256]) * size, keyframe=key, max_datagram=100)


def test_frames_come_out_whole_and_in_order() -> None:
    asm = FrameAssembler()
    pieces = frames_of(0, 500, key=True) + frames_of(1, 300) + frames_of(2, 50)
    out = []
    for p in reversed(pieces):  # fully reordered
        out += asm.push(p, 0.0)
    assert [f.frame_id for f in out] == [0, 1, 2]
    assert out[0].keyframe and out[0].data == bytes([0]) * 500
    assert not asm.waiting_for_keyframe
    assert asm.keyframe_request(0.0) is None


def test_a_lost_fragment_asks_for_a_keyframe_and_skips_to_it() -> None:
    asm = FrameAssembler(AssemblerConfig(reorder_tolerance=0.05, request_interval=0.25))
    for p in frames_of(0, 200, key=True):
        asm.push(p, 0.0)
    lossy = frames_of(1, 300)
    for p in lossy[1:]:  # the first fragment of frame 1 is lost
        asm.push(p, 0.03)
    for p in frames_of(2, 100):
        assert asm.push(p, 0.06) == []
    assert asm.poll(0.10) == []  # frame 2 waited 40 ms: still tolerated
    assert asm.poll(0.12) == []  # now frame 1 is lost
    assert asm.waiting_for_keyframe
    first = asm.keyframe_request(0.12)
    assert first == 1
    assert asm.keyframe_request(0.2) is None  # rate-limited
    assert asm.keyframe_request(0.4) == 2  # repeated while no keyframe comes
    for p in frames_of(3, 100):
        assert asm.push(p, 0.41) == []  # a delta frame is useless now
    out = []
    for p in frames_of(4, 400, key=True):
        out += asm.push(p, 0.45)
    assert [f.frame_id for f in out] == [4]
    assert asm.keyframe_request(1.0) is None
    stats = asm.statistics()
    assert stats["losses"] == 1 and stats["keyframe_requests"] == 2


def test_no_keyframe_requests_without_any_video() -> None:
    asm = FrameAssembler()
    assert asm.waiting_for_keyframe
    assert asm.keyframe_request(0.0) is None


def test_a_stream_starting_with_a_delta_frame_waits_for_a_keyframe() -> None:
    asm = FrameAssembler()
    for p in frames_of(10, 100):
        assert asm.push(p, 0.0) == []
    assert asm.keyframe_request(0.0) == 1


def test_assembler_memory_is_bounded() -> None:
    asm = FrameAssembler(AssemblerConfig(max_frames=4, max_bytes=10_000))
    for fid in range(50):
        asm.push(frames_of(fid, 1000)[0], 0.0)  # never complete
    stats = asm.statistics()
    assert stats["evicted"] >= 46


def test_inconsistent_fragments_are_dropped() -> None:
    asm = FrameAssembler()
    asm.push(VideoFragment(0, 0, 2, 0, b"a", keyframe=True), 0.0)
    asm.push(VideoFragment(0, 1, 3, 0, b"b", keyframe=True), 0.0)
    assert asm.statistics()["inconsistent"] == 1


@given(
    st.lists(
        st.builds(
            VideoFragment, st.integers(0, 40), st.integers(0, 3), st.just(4), U32,
            st.binary(min_size=1, max_size=50), st.booleans(),
        ),
        max_size=200,
    )
)  # fmt: skip
def test_assembler_never_fails_and_delivers_in_order(fragments: list[VideoFragment]) -> None:
    asm = FrameAssembler()
    out = []
    for i, f in enumerate(fragments):
        out += asm.push(f, i * 0.01)
        out += asm.poll(i * 0.01)
        asm.keyframe_request(i * 0.01)
    ids = [f.frame_id for f in out]
    assert ids == sorted(set(ids))


# --------------------------------------------------------------------------- statistics


def test_reception_stats_follow_rfc_3550() -> None:
    rx = ReceptionStats(48000)
    for seq in [0, 1, 2, 4, 5, 7]:  # 3 and 6 lost
        rx.packet(seq, seq * 960, seq * FRAME)
    assert rx.expected == 8 and rx.lost == 2
    block = rx.report()
    assert block.cumulative_lost == 2 and block.highest_seq == 7
    assert block.fraction_lost == (2 << 8) // 8
    assert rx.report().fraction_lost == 0  # a new interval: nothing new lost
    assert rx.jitter == pytest.approx(0.0, abs=1e-9)


def test_interarrival_jitter() -> None:
    rx = ReceptionStats(48000)
    for seq in range(2000):
        rx.packet(seq, seq * 960, seq * FRAME + (0.004 if seq % 2 else 0.0))
    # |D| is 4 ms every packet: J converges to it.
    assert rx.jitter == pytest.approx(0.004, rel=0.01)


def test_rtt_from_report_echoes() -> None:
    alice, bob = RttEstimator(), RttEstimator()
    # Alice's clock is 1000 s ahead of Bob's: only differences matter. One way is 15 ms.
    a_sent = 1000.0
    bob.report_received(RttEstimator.clock_us(a_sent), 0, 0, now=0.015)
    echo, delay = bob.echo(now=0.035)  # Bob reports 20 ms later
    assert delay == 20000
    alice.report_received(RttEstimator.clock_us(0.035), echo, delay, now=a_sent + 0.050)
    assert alice.latest == pytest.approx(0.030, abs=1e-5)


# --------------------------------------------------------------------------- concealment


def test_concealment_floor_keeps_good_concealment_and_replaces_a_hole() -> None:
    floor = ConcealmentFloor(960)
    tone = ToneSource(440)
    for _ in range(5):
        floor.good(tone.read())
    loud = tone.read()
    assert floor.conceal(loud) is loud  # libopus did fine: kept
    quiet = np.zeros(960, np.int16)
    replaced = floor.conceal(quiet)
    assert floor.replaced == 1
    assert np.sqrt(np.mean(replaced.astype(float) ** 2)) > 0.5 * 0.8 * 7300
    assert dominant_frequency(np.tile(replaced, 4)) == pytest.approx(440, abs=15)
    for _ in range(20):
        last = floor.conceal(quiet)
    assert not last.any()  # after max_frames, silence is honest


# --------------------------------------------------------------------------- codecs


def encode_tone(freq: float, frames: int, *, envelope: bool = False) -> list[bytes]:
    source, encoder = ToneSource(freq), OpusEncoder()
    packets = []
    for i in range(frames):
        pcm = source.read()
        if envelope:  # a 3 Hz syllable-like envelope keeps libopus's VAD active
            t = (i * 960 + np.arange(960)) / 48000
            pcm = (pcm * (0.55 + 0.45 * np.sin(2 * np.pi * 3 * t))).astype(np.int16)
        (packet,) = encoder.encode(pcm)
        packets.append(packet)
    return packets


@pytest.fixture
def libopus() -> ctypes.CDLL:
    """libopus through ctypes. PyAV's wheel bundles one; without it calls fall back to
    FFmpeg's decoder, which has no FEC, and these tests are the only proof of FEC: so its
    absence fails under CI=true (tests/required_groups.py)."""
    found = load_libopus()
    if found is None:
        skip_or_fail("libopus is not loadable through ctypes (p2pd.media.codecs)")
    return found


def test_opus_in_band_fec_rebuilds_a_lost_frame(libopus: ctypes.CDLL) -> None:
    packets = encode_tone(440, 30)
    reference = LibopusDecoder(libopus)
    clean = [reference.decode(p) for p in packets]
    fec, plc = LibopusDecoder(libopus), LibopusDecoder(libopus)
    for i in range(20):
        fec.decode(packets[i])
        plc.decode(packets[i])
    rebuilt, used = fec.decode_fec(packets[21])
    concealed = plc.conceal()
    assert used  # libopus put LBRR in packet 21 (the tone is still "active" at 0.4 s)

    def error(x: np.ndarray) -> float:
        diff = x.astype(float) - clean[20].astype(float)
        return float(np.sqrt(np.mean(diff**2)) / np.sqrt(np.mean(clean[20].astype(float) ** 2)))

    assert error(rebuilt) < 0.1 < error(concealed)


def test_libopus_puts_no_fec_in_a_steady_tone_after_its_vad_gives_up(libopus: ctypes.CDLL) -> None:
    """The surprise documented in p2pd.media.codecs: LBRR only for VAD-active frames."""
    steady = encode_tone(440, 100)
    speechy = encode_tone(440, 100, envelope=True)

    def has_lbrr(p: bytes) -> bool:
        return bool(libopus.opus_packet_has_lbrr(p, len(p)) == 1)

    assert any(has_lbrr(p) for p in steady[:20])
    assert not any(has_lbrr(p) for p in steady[60:])
    assert sum(has_lbrr(p) for p in speechy[60:]) > 10


def test_ffmpeg_decoder_conceals_with_toc_only_packets() -> None:
    packets = encode_tone(660, 25)
    decoder = PyAVOpusDecoder()
    for p in packets[:20]:
        pcm = decoder.decode(p)
    assert dominant_frequency(pcm) == pytest.approx(660, abs=30)
    concealed = decoder.conceal()
    assert concealed.shape == (FRAME_SAMPLES,) and np.abs(concealed).max() > 300
    _rebuilt, used = decoder.decode_fec(packets[21])
    assert not used  # FFmpeg cannot decode FEC
    assert decoder.decode(packets[22]).shape == (FRAME_SAMPLES,)


def test_ffmpeg_opus_decoder_refuses_garbage_with_media_wire_error() -> None:
    with pytest.raises(MediaWireError):
        PyAVOpusDecoder().decode(b"\x03\xff")  # code 3 without a frame count byte


def test_libopus_decoder_refuses_garbage_with_media_wire_error(libopus: ctypes.CDLL) -> None:
    with pytest.raises(MediaWireError):
        LibopusDecoder(libopus).decode(b"\x03\xff")


def test_vp8_round_trip_and_keyframe_on_request() -> None:
    encoder, decoder, pattern = Vp8Encoder(), Vp8Decoder(), TestPattern()
    keys = []
    for i in range(12):
        ((data, key),) = encoder.encode(pattern.read(i / 30), keyframe=i == 7)
        keys.append(key)
        (picture,) = decoder.decode(data)
        assert (picture.width, picture.height) == (640, 480)
    assert keys[0] and keys[7] and sum(keys) == 2
    with pytest.raises(MediaWireError):
        Vp8Decoder().decode(b"\x00" * 20)


# --------------------------------------------------------------------------- sources, sinks


def test_source_specs() -> None:
    check_audio_spec("tone:440")
    check_video_spec("testsrc")
    for bad in ("tone:", "tone:5", "tone:abc", "nonexistent.wav"):
        with pytest.raises(UsageError):
            check_audio_spec(bad)
    with pytest.raises(UsageError):
        check_video_spec("/nonexistent.mkv")


def test_tone_source_is_phase_continuous() -> None:
    source = open_audio_source("tone:1000")
    pcm = np.concatenate([source.read() for _ in range(10)])
    assert dominant_frequency(pcm) == pytest.approx(1000, abs=5)
    assert np.abs(np.diff(pcm.astype(int))).max() < 2 * np.pi * 1000 / 48000 * 10400


def test_test_pattern_moves_and_counts_frames() -> None:
    source = open_video_source("testsrc")
    a, b = source.read(0.0), source.read(1 / 30)
    assert (a.width, a.height, a.format.name) == (640, 480, "yuv420p")
    assert not np.array_equal(a.to_ndarray(), b.to_ndarray())


def test_file_sources_decode_resample_and_loop(tmp_path: Path) -> None:
    path = tmp_path / "in.wav"
    with wave.open(str(path), "wb") as w:  # 0.25 s of 300 Hz at 16 kHz stereo
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        t = np.arange(4000) / 16000
        tone = (8000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
        w.writeframes(np.repeat(tone, 2).tobytes())
    source = open_audio_source(str(path))
    pcm = np.concatenate([source.read() for _ in range(40)])  # 0.8 s: loops 3 times
    source.close()
    assert dominant_frequency(pcm) == pytest.approx(300, abs=5)
    assert np.sqrt(np.mean(pcm[-9600:].astype(float) ** 2)) > 2000  # still playing

    video = tmp_path / "in.mkv"
    with av.open(str(video), "w") as out:
        stream = out.add_stream("libvpx", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(
                np.full((360, 320), 40 * i, np.uint8), format="yuv420p"
            )
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    vsource = open_video_source(f"file:{video}")
    pictures = [vsource.read(i / 30) for i in range(45)]  # 1.5 s of a 0.5 s, 10 fps file
    vsource.close()
    assert {(p.width, p.height) for p in pictures} == {(640, 480)}


def test_wav_recorder_drops_trailing_concealment_only(tmp_path: Path) -> None:
    path = tmp_path / "out.wav"
    rec = open_recorder(path, start=0.0)
    assert isinstance(rec, WavRecorder)
    one = np.full(960, 100, np.int16)
    rec.write_audio(one, concealed=False, now=0)
    rec.write_audio(one, concealed=True, now=0)  # in the middle: kept
    rec.write_audio(one, concealed=False, now=0)
    rec.write_audio(one, concealed=True, now=0)  # at the end: dropped
    rec.close()
    rec.close()
    with wave.open(str(path)) as w:
        assert w.getnframes() == 3 * 960 and w.getframerate() == 48000


def test_matroska_recorder_writes_opus_and_vp8(tmp_path: Path) -> None:
    path = tmp_path / "out.webm"
    rec = open_recorder(path, start=0.0)
    assert isinstance(rec, MatroskaRecorder)
    tone, encoder, pattern = ToneSource(440), Vp8Encoder(), TestPattern()
    for i in range(50):
        rec.write_audio(tone.read(), concealed=False, now=i * FRAME)
        if i % 2 == 0:
            ((data, key),) = encoder.encode(pattern.read(i * FRAME))
            rec.write_video(data, keyframe=key, timestamp=i * 1800, now=i * FRAME)
    rec.close()
    with av.open(str(path)) as container:
        assert [s.codec_context.name for s in container.streams] == ["opus", "vp8"]
        frames = list(container.decode(video=0))
    assert len(frames) == 25 and (frames[0].width, frames[0].height) == (640, 480)
    with pytest.raises(UsageError):
        open_recorder(tmp_path / "out.mp3", start=0.0)


# --------------------------------------------------------------------------- redundancy


def run_red_ticks(
    jb: JitterBuffer, arrivals: dict[int, float], *, ticks: int
) -> list[tuple[PlayoutKind, int | None, bytes | None]]:
    """Like run_ticks, but every packet after the first carries a copy of the one before
    (as a call sends while its peer reports loss); a lost packet is left out of
    ``arrivals``, its copy still rides in the next one."""
    pending = sorted(arrivals.items(), key=lambda kv: kv[1])
    out: list[tuple[PlayoutKind, int | None, bytes | None]] = []
    for k in range(ticks):
        now = k * FRAME
        while pending and pending[0][1] <= now:
            seq, at = pending.pop(0)
            jb.push(seq, seq * 960, b"p%d" % seq, at)
            if seq > 0:
                jb.push_redundant(seq - 1, (seq - 1) * 960, b"p%d" % (seq - 1))
        decision = jb.pop(now)
        if decision is not None:
            out.append((decision.kind, decision.seq, decision.payload))
    return out


def test_a_lost_frame_plays_from_its_redundant_copy() -> None:
    jb = JitterBuffer()
    packets = {seq: seq * FRAME + 0.001 for seq in range(80) if seq not in (30, 60, 61)}
    decisions = {
        seq: (kind, payload)
        for kind, seq, payload in run_red_ticks(jb, packets, ticks=90)
        if seq is not None
    }
    # The copy is the lost packet's own bytes, decoded as the frame itself.
    assert decisions[30] == (PlayoutKind.REDUNDANT, b"p30")
    # Two in a row: the first has no copy left (it rode in the lost 61), so FEC from the
    # copy of 61 that rides in 62; 61 itself plays from that copy.
    assert decisions[60] == (PlayoutKind.FEC, b"p61")
    assert decisions[61] == (PlayoutKind.REDUNDANT, b"p61")
    others = [kind for seq, (kind, _) in decisions.items() if seq < 80 and seq not in (30, 60, 61)]
    assert len(others) >= 70 and set(others) == {PlayoutKind.FRAME}
    stats = jb.statistics()
    assert stats["redundant"] == 2 and stats["redundant_filled"] == 2 and stats["fec"] == 1
    # A frame played from a copy was still lost: the buffer keeps the extra frame.
    assert jb.target_delay == pytest.approx(0.040, abs=0.002)


def test_redundant_copies_of_frames_already_here_or_played_change_nothing() -> None:
    jb = JitterBuffer()
    jb.push(0, 0, b"a", 0.0)
    jb.push(1, 960, b"b", 0.02)
    jb.push_redundant(0, 0, b"copy")  # here already
    first = jb.pop(0.03)
    assert first is not None and first.kind is PlayoutKind.FRAME and first.payload == b"a"
    jb.push_redundant(0, 0, b"copy")  # played already
    jb.push_redundant(2, 1920, b"copy")  # newer than any packet: not a copy of anything
    jb.push_redundant(2**31, 0, b"copy")  # far away
    assert jb.statistics()["redundant_filled"] == 0
    assert jb.statistics()["buffered"] == 1


def test_a_packet_after_its_own_copy_is_not_a_duplicate() -> None:
    jb = JitterBuffer()
    jb.push(0, 0, b"a", 0.0)
    jb.push(2, 1920, b"c", 0.04)
    jb.push_redundant(1, 960, b"b")
    jb.push(1, 960, b"b", 0.041)  # reordered: the packet itself after its copy
    stats = jb.statistics()
    assert stats["duplicates"] == 0 and stats["redundant_filled"] == 0
    decisions = []
    for _ in range(3):
        due = jb.next_due()
        assert due is not None
        decisions.append(jb.pop(due))
    assert [(d.kind, d.seq) for d in decisions if d is not None] == [
        (PlayoutKind.FRAME, 0),
        (PlayoutKind.FRAME, 1),
        (PlayoutKind.FRAME, 2),
    ]


# --------------------------------------------------------------------------- playout clock


def test_next_due_is_when_pop_plays_the_frame() -> None:
    jb = JitterBuffer()
    assert jb.next_due() is None
    for seq in range(5):
        jb.push(seq, 48000 + seq * 960, b"x", 1.0 + seq * FRAME + 0.004)
    due = jb.next_due()
    assert due == pytest.approx(1.004 + 0.020)  # timestamp + min transit + target
    assert due is not None
    assert jb.pop(due - 0.0005) is None  # not due yet: nothing starts
    decision = jb.pop(due + 0.0005)
    assert decision is not None and decision.kind is PlayoutKind.FRAME and decision.seq == 0
    after = jb.next_due()
    assert after is not None and after == pytest.approx(due + FRAME)


@pytest.mark.parametrize(
    ("nominal", "expected"),
    [
        (1.0010, 1.0010),  # on the spot (due 1.000 + margin 1 ms)
        (1.0025, 1.0025),  # within the tolerance after it: left alone
        (1.0090, 1.0010),  # the frame overdue by 8 ms: earlier
        (1.0150, 1.0050),  # overdue by 14 ms: earlier by half a frame, for now
        (0.9950, 1.0010),  # 6 ms early: later
        (0.5790, 0.5810),  # due much later: only the phase counts (frames 20 ms apart)
        (0.5870, 0.5810),  # ... the shorter way round
    ],
)
def test_align_tick_moves_the_tick_to_just_after_the_frame_is_due(
    nominal: float, expected: float
) -> None:
    tick = align_tick(nominal, 1.000, FRAME, margin=0.001, tolerance=0.002)
    assert tick == pytest.approx(expected)
    assert abs(tick - nominal) <= FRAME / 2 + 1e-9


def test_align_tick_without_a_due_time_keeps_the_clock() -> None:
    assert align_tick(3.0, None, FRAME, margin=0.001, tolerance=0.002) == 3.0


@given(st.floats(0, 1e5), st.floats(0, 1e5))
def test_align_tick_never_moves_more_than_half_a_frame(nominal: float, due: float) -> None:
    tick = align_tick(nominal, due, FRAME, margin=0.001, tolerance=0.002)
    assert abs(tick - nominal) <= FRAME / 2 + 1e-6


# --------------------------------------------------------------------------- timeline shifts


def steady(jb: JitterBuffer, upto: int, *, delay: float = 0.001) -> None:
    for seq in range(upto):
        jb.push(seq, seq * 960, b"p%d" % seq, seq * FRAME + delay)


def test_a_growing_target_stretches_only_after_a_quiet_frame() -> None:
    """The first loss adds a frame of headroom: the next frame, here already, is not due
    any more. In speech it is played on (the stretch waits); after a quiet frame the
    buffer stretches."""
    for quiet, expected in ((False, PlayoutKind.FRAME), (True, PlayoutKind.CONCEAL)):
        jb = JitterBuffer()
        for seq in range(12):
            if seq != 5:  # lost: its FEC from 6 starts the headroom
                jb.push(seq, seq * 960, b"x", seq * FRAME + 0.001)
        # Frame k is due at k x 20 ms + 1 ms transit + 20 ms target.
        decisions = [jb.pop(k * FRAME + 0.0215, quiet=False) for k in range(6)]
        assert [(d.kind, d.seq) for d in decisions if d is not None][-2:] == [
            (PlayoutKind.FRAME, 4),
            (PlayoutKind.FEC, 5),
        ]
        assert jb.target_delay == pytest.approx(0.040)
        decision = jb.pop(6 * FRAME + 0.0215, quiet=quiet)  # frame 6: 20 ms early now
        assert decision is not None and decision.kind is expected, quiet
        if quiet:
            assert decision.seq is None and jb.statistics()["expanded"] == 1
        else:
            assert decision.seq == 6
            assert jb.statistics()["deferred"] == 1 and jb.statistics()["expanded"] == 0


def test_a_deferred_stretch_happens_after_max_defer_ticks() -> None:
    jb2 = JitterBuffer(JitterConfig(max_defer=3, fec_headroom=False, min_delay=0.005))
    steady(jb2, 40)
    first = jb2.pop(0.0065, quiet=False)
    assert first is not None and first.seq == 0
    jb2._quantile_delay = 0.1  # the target jumps by 95 ms (white box: a delay spike)
    seen = []
    for k in range(1, 8):
        decision = jb2.pop(0.0065 + k * FRAME, quiet=False)
        assert decision is not None
        seen.append((decision.kind, decision.seq))
    # Three ticks played on, then the stretch that can wait no longer.
    assert seen[:3] == [(PlayoutKind.FRAME, 1), (PlayoutKind.FRAME, 2), (PlayoutKind.FRAME, 3)]
    assert seen[3] == (PlayoutKind.CONCEAL, None)


def test_dropping_to_catch_up_waits_for_a_quiet_frame() -> None:
    for quiet in (False, True):
        jb = JitterBuffer(JitterConfig(fec_headroom=False))
        steady(jb, 40)
        first = jb.pop(0.025, quiet=quiet)
        assert first is not None and first.seq == 0
        # Three frames overdue at once (a burst, or the target fell).
        decision = jb.pop(0.025 + 4 * FRAME, quiet=quiet)
        assert decision is not None
        assert decision.seq == (2 if quiet else 1), quiet
        assert jb.statistics()["dropped"] == (1 if quiet else 0)


def test_while_losing_packets_a_frame_with_no_successor_counts_as_lost() -> None:
    """After a loss, when neither a frame nor the one after it (given its own delay
    percentile) is here, both are taken as lost: conceal and move on, no stretch."""
    jb = JitterBuffer()
    packets = {seq: seq * FRAME + 0.001 for seq in range(60) if seq not in (20, 40, 41)}
    decisions = run_ticks(jb, packets, ticks=70)
    by_seq = {seq: kind for kind, seq in decisions if seq is not None}
    assert by_seq[20] is PlayoutKind.FEC
    assert by_seq[40] is PlayoutKind.CONCEAL and by_seq[41] is PlayoutKind.FEC
    assert jb.statistics()["expanded"] <= 1  # at most the headroom's own stretch
    assert [seq for kind, seq in decisions if kind is PlayoutKind.FRAME][-1] == 59
    # Without losses before, a missing frame with nothing newer is waited for.
    jb = JitterBuffer()
    packets = {seq: seq * FRAME + 0.001 for seq in range(30)}
    packets[20] = packets[21] = 21 * FRAME + 0.030  # late, not lost
    decisions = run_ticks(jb, packets, ticks=40)
    assert (PlayoutKind.FRAME, 20) in decisions and (PlayoutKind.CONCEAL, None) in decisions


def test_the_first_packets_play_at_least_start_delay_late() -> None:
    jb = JitterBuffer(JitterConfig(min_delay=0.005, start_delay=0.025, warmup=50))
    steady(jb, 100)
    assert jb.target_delay == pytest.approx(0.005)  # 100 packets: warmed up
    jb = JitterBuffer(JitterConfig(min_delay=0.005, start_delay=0.025, warmup=50))
    steady(jb, 10)
    assert jb.target_delay == pytest.approx(0.025)
    assert jb.pop(0.025) is None and jb.pop(0.0265) is not None
