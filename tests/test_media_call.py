"""Calls end to end: two in-process QUIC endpoints on 127.0.0.1, one connection, media
both ways through CallMedia, recordings read back and measured."""

from __future__ import annotations

import wave
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import av
import numpy as np
import pytest
import trio
import trio.testing

from p2pd.identity import Identity
from p2pd.media import CallMedia, MediaConfig
from p2pd.media.assembler import AssemblerConfig
from p2pd.media.nack import NackConfig
from p2pd.media.wire import ReceiverReport, ReportBlock, VideoNack, decode, fragment
from p2pd.testing.proxy import open_lossy_proxy
from p2pd.transport.quic import QuicEndpoint, QuicPeer, open_quic_endpoint
from p2pd.transport.udp import UdpEndpoint
from p2pd.wire import Address

TIMEOUT = 30
CALL = 3.0
FRAME = 960  # samples: 20 ms at 48 kHz


@dataclass
class Side:
    identity: Identity
    udp: UdpEndpoint
    quic: QuicEndpoint
    media: CallMedia | None = None
    stray: list[bytes] = field(default_factory=list)

    def on_datagram(self, peer: QuicPeer, data: bytes) -> None:
        if self.media is not None:
            self.media.datagram_received(data)
        else:
            self.stray.append(data)


@asynccontextmanager
async def open_side(handle: str) -> AsyncIterator[Side]:
    identity = Identity.generate(handle)
    udp = UdpEndpoint.bind(Address("127.0.0.1", 0))
    holder: list[Side] = []
    try:
        async with (
            open_quic_endpoint(
                udp, identity, on_datagram=lambda p, d: holder[0].on_datagram(p, d)
            ) as quic,
            trio.open_nursery() as nursery,
        ):
            side = Side(identity, udp, quic)
            holder.append(side)
            await nursery.start(udp.serve, lambda data, addr: None, quic.datagram_received)
            yield side
            nursery.cancel_scope.cancel()
    finally:
        udp.close()


async def call(
    tmp_path: Path,
    *,
    audio: tuple[str | None, str | None],
    video: tuple[str | None, str | None] = (None, None),
    suffix: str = ".wav",
    drop: float = 0.0,
    config: MediaConfig | None = None,
    until: Callable[[CallMedia, CallMedia], bool] | None = None,
    limit: float = TIMEOUT,
) -> tuple[CallMedia, CallMedia]:
    """Alice calls Bob (through a lossy proxy if ``drop``) for CALL seconds; both record.

    ``until``: the call lasts until ``until(alice, bob)`` holds instead (checked every
    50 ms), or ``limit`` seconds at most; the caller asserts what it needed. For what
    counts events a starved process may run few of in CALL seconds of wall time (on
    2 cores, 4 xdist workers and a CPU hog or two, a call's video loop ran 5-12 of its
    90 ticks in 3 s: tests/test_media_rate_call.py)."""
    async with open_side("alice") as alice, open_side("bob") as bob:
        target = bob.udp.local_address.as_tuple()
        async with open_lossy_proxy(target, drop=drop, seed=7) as proxy:
            peer = await alice.quic.connect(
                proxy.address if drop else target, bob.identity.public_key
            )
            while not bob.quic.peers():
                await trio.sleep(0.01)
            (incoming,) = bob.quic.peers()
            duration = CALL if until is None else None
            alice.media = CallMedia(
                peer, audio_in=audio[0], video_in=video[0],
                record=tmp_path / f"alice{suffix}", duration=duration, config=config,
            )  # fmt: skip
            bob.media = CallMedia(
                incoming, audio_in=audio[1], video_in=video[1],
                record=tmp_path / f"bob{suffix}", duration=duration, config=config,
            )  # fmt: skip
            async with trio.open_nursery() as nursery:
                nursery.start_soon(alice.media.run)
                nursery.start_soon(bob.media.run)
                if until is not None:
                    nursery.start_soon(
                        _hang_up_when, until, alice.media, bob.media, limit, nursery.cancel_scope
                    )
            return alice.media, bob.media


def video_sent(frames: int) -> Callable[[CallMedia, CallMedia], bool]:
    """An ``until`` for :func:`call`: both sides sent ``frames`` video frames, and the
    call lasted CALL seconds."""

    def enough(alice: CallMedia, bob: CallMedia) -> bool:
        return all(
            m.statistics()["video_frames_sent"] >= frames and m.statistics()["duration_s"] >= CALL
            for m in (alice, bob)
        )

    return enough


async def _hang_up_when(
    until: Callable[[CallMedia, CallMedia], bool],
    alice: CallMedia,
    bob: CallMedia,
    limit: float,
    scope: trio.CancelScope,
) -> None:
    """Hang up (cancel ``scope``) once ``until(alice, bob)`` holds, or after ``limit``."""
    with trio.move_on_after(limit):
        for _ in range(int(limit / 0.05) + 1):  # bounded: move_on_after ends it anyway
            await trio.sleep(0.05)
            if until(alice, bob):
                break
    scope.cancel()


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (48000, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)


def dominant_frequency(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / 48000)[int(spectrum.argmax())])


def longest_gap(x: np.ndarray) -> int:
    """The longest dropout in samples: a run of 5 ms blocks whose RMS is under 5% (-26
    dB) of the recording's median block, or of exactly silent samples."""
    blocks = x[: x.size // 240 * 240].reshape(-1, 240)
    rms = np.sqrt((blocks**2).mean(axis=1))
    quiet = rms < 0.05 * np.median(rms)
    longest = run = 0
    for q in quiet:
        run = run + 1 if q else 0
        longest = max(longest, run)
    silent = np.concatenate([[False], x == 0, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(silent))
    zeros = int((edges[1::2] - edges[::2]).max()) if edges.size else 0
    return max(longest * 240, zeros)


async def test_tone_call_records_the_other_sides_tone(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        alice, bob = await call(tmp_path, audio=("tone:440", "tone:660"))
    for name, expected, media in (("alice", 660, alice), ("bob", 440, bob)):
        x = read_wav(tmp_path / f"{name}.wav")
        assert abs(x.size / 48000 - CALL) <= 0.1 * CALL, name
        assert dominant_frequency(x) == pytest.approx(expected, abs=5), name
        stats = media.statistics()
        assert stats["state"] == "ended" and stats["end_reason"] == "duration"
        assert stats["audio_packets_sent"] == pytest.approx(CALL / 0.02, abs=3)
        assert stats["audio_packets_received"] >= 0.95 * CALL / 0.02
        assert stats["rtt_ms"] is not None and 0 < stats["rtt_ms"] < 100
        assert stats["loss_pct"] == 0
        assert 30 < stats["bitrate_sent_kbps"] < 60
        assert stats["keyframe_requests_sent"] == 0  # no video in this call
        # No loss reported: no redundant copies, the bitrate stays that of one stream.
        assert stats["audio_red_sent"] == 0 and stats["audio_redundancy"] is False
        assert stats["audio_red_recovered"] == 0


async def test_ten_percent_loss_is_concealed_without_gaps(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        alice, bob = await call(tmp_path, audio=("tone:440", "tone:660"), drop=0.10)
    for name, expected, media, peer in (("alice", 660, alice, bob), ("bob", 440, bob, alice)):
        x = read_wav(tmp_path / f"{name}.wav")
        stats, peer_stats = media.statistics(), peer.statistics()
        assert abs(x.size / 48000 - CALL) <= 0.1 * CALL, name
        assert dominant_frequency(x) == pytest.approx(expected, abs=5), name
        assert longest_gap(x) <= FRAME, (name, stats)
        assert stats["loss_pct"] > 2, stats
        # Our reports told the peer of the loss: it sent redundant copies from the first
        # report with loss, and lost frames came back from them. Reports go every 0.5 s
        # through the same lossy proxy: one is lost (10%), or its half second held no loss
        # (0.9^25 = 7%), about one time in six, so the first with loss may be the second or
        # third (a clean-clone CI run saw 73 copies in 150 packets: from ~1.5 s). A quarter
        # of the packets means copies began by the fourth report (all four missing: ~1e-3).
        assert peer_stats["audio_red_sent"] > 0.25 * peer_stats["audio_packets_sent"], peer_stats
        assert peer_stats["audio_redundancy"] is True, peer_stats
        assert stats["audio_red_recovered"] > 0, stats
        assert stats["bitrate_received_kbps"] > 1.5 * 48 * 0.9 * 0.7, stats  # ~ twice
        # Not every loss has a copy (the first half second, two in a row): those are
        # rebuilt from FEC or concealed.
        assert stats["audio_frames_concealed"] + stats["audio_fec_recovered"] > 0, stats


async def test_video_call_records_the_expected_frames(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        alice, bob = await call(
            tmp_path, audio=("tone:440", "tone:660"), video=("testsrc", "testsrc"), suffix=".webm"
        )
    # Against what the call did, not the nominal 3 s at 30 fps: a process starved of CPU
    # (two CPU hogs on the 2 cores, other tests) skips capture ticks, and the recording
    # holds what was sent. Measured so at load 10-11: 36-59 of 90 frames sent.
    for name, media, peer in (("alice", alice, bob), ("bob", bob, alice)):
        stats, peer_stats = media.statistics(), peer.statistics()
        duration = stats["duration_s"]
        with av.open(str(tmp_path / f"{name}.webm")) as container:
            assert {s.codec_context.name for s in container.streams} == {"opus", "vp8"}
            sizes = [(f.width, f.height) for f in container.decode(video=0)]
        with av.open(str(tmp_path / f"{name}.webm")) as container:
            frames = list(container.decode(audio=0))
        # Where the audio ends: it starts where playout started and has no holes, so it
        # ends with the call, never after it, and before it by at most what was never
        # played: the tail after the peer stopped (it started up to 0.2 s before us),
        # concealment held back and dropped, and the jitter buffer's delay. Measured
        # with two hogs at load 10-11: 0.4 s before to 0.09 s after; before the fix, up
        # to 0.65 s before (ticks skipped). After: a playout clock catching up after a
        # stall (see the stall test below).
        end = frames[0].time + sum(f.samples for f in frames) / 48000
        assert duration - 0.5 <= end <= duration + 0.3, (name, end, stats)
        assert set(sizes) == {(640, 480)}
        # Every frame received is recorded, and most that the peer sent arrived on the
        # loopback: not those it sent after we ended (it may start and end up to 0.2 s
        # after us). Measured with two hogs: 83-100 %.
        assert stats["video_frames_received"] == len(sizes)
        assert len(sizes) >= 0.75 * peer_stats["video_frames_sent"], (name, len(sizes), stats)
        # The capture clock ticked 30 times a second: each tick a frame sent or skipped
        # for a stall (a skip may reach past the deadline; a stall at the end may take
        # the last ticks, as the 0.3 s of the end's check above).
        ticks = stats["video_frames_sent"] + stats["video_frames_skipped"]
        assert 30 * (CALL - 0.3) <= ticks <= 30 * duration + 2, stats


async def test_video_losses_bring_keyframe_requests_and_recover(tmp_path: Path) -> None:
    """The fallback alone: NACKs off (as with a peer that does not answer them).

    The call lasts until each side sent 90 frames (3 s at 30 fps) rather than 3 s of
    wall time: beside two CPU hogs a 3 s call sent so few that 4 and 7 frames were
    received where 22.5 were asked (the flakes3 sweep, 2 runs of 5), the late ticks
    skipped. What plays is counted against what the peer sent."""
    with trio.fail_after(3 * TIMEOUT):
        alice, bob = await call(
            tmp_path, audio=(None, None), video=("testsrc", "testsrc"), suffix=".mkv", drop=0.05,
            config=MediaConfig(video_nack=False), until=video_sent(int(30 * CALL)),
            limit=2 * TIMEOUT,
        )  # fmt: skip
    for name, media, peer in (("alice", alice, bob), ("bob", bob, alice)):
        stats, peer_stats = media.statistics(), peer.statistics()
        # A frame of ~3.4 datagrams is lost with ~16% probability (one every 200 ms):
        # the receiver asks, the sender answers with keyframes, and the frames between
        # a loss and the next keyframe are dropped. Measured: 40-60% of frames play
        # (with keyframe requests only; see the next test for NACK retransmission).
        assert stats["keyframe_requests_sent"] > 0, stats
        assert peer_stats["keyframe_requests_received"] > 0, peer_stats
        assert peer_stats["video_keyframes_sent"] > 1, peer_stats
        assert peer_stats["video_frames_sent"] >= 30 * CALL, peer_stats  # not cut short
        assert stats["video_frames_received"] >= 0.25 * peer_stats["video_frames_sent"], stats
        assert stats["video_decode_errors"] == 0, stats
        with av.open(str(tmp_path / f"{name}.mkv")) as container:
            decoded = sum(1 for _ in container.decode(video=0))
        assert decoded == stats["video_frames_received"]


async def test_video_losses_are_repaired_by_nack_retransmission(tmp_path: Path) -> None:
    """5% loss with NACKs (the default): lost fragments come back within the frame's
    deadline, so most frames play without waiting for a keyframe.

    At 320x240: NACKs are what is tested, and the path must be one they can work on.
    At 640x480 beside CPU hogs (load 7-10) this failed 2-8 runs in 10 (issue 9), the RTT
    0.8-1.45 s on the loopback. Where that second built (sampled every 0.1 s): in this
    process, which encodes and decodes both sides' video and forwards every packet
    through the lossy proxy; starved, it fell behind its own proxy, whose socket held
    25-45 KB unread, with 25-36 datagrams waiting for each side's QUIC congestion window
    (aioquic's smoothed RTT 0.5-0.95 s). At such an RTT no NACK can help: the receiver
    gives a missing frame up after NackConfig.max_deadline (0.4 s) and asks for a
    keyframe, so a longer RetransmitConfig.max_age would only resend fragments too late
    to play. At 320x240 the same load left the RTT at 1-59 ms and 83-90 of 90 frames
    played (NACKs off: 57-80).

    Not load-proof still: with four CPU hogs at nice 0 (this test at nice 10) it failed
    8 runs in 8 at 640x480 and 3 in 3 at 320x240 (no NACK at all: a few frames sent in
    3 s, the late ones skipped); run until 90 frames were sent, 5 in 5 (none resent, as
    when the RTT passes 0.5 s; the calls took 9-12 s). Beside two hogs: 5 in 5 passed
    at either size."""
    config = MediaConfig(video_width=320, video_height=240)
    with trio.fail_after(TIMEOUT):
        alice, bob = await call(
            tmp_path, audio=(None, None), video=("testsrc", "testsrc"), suffix=".mkv",
            drop=0.05, config=config,
        )  # fmt: skip
    for name, media, peer in (("alice", alice, bob), ("bob", bob, alice)):
        stats, peer_stats = media.statistics(), peer.statistics()
        assert stats["video_nacks_sent"] > 0, stats
        assert peer_stats["video_nacks_received"] > 0, peer_stats
        assert peer_stats["video_retransmitted"] > 0, peer_stats
        assert stats["video_nack_recovered"] > 0, stats
        # Measured on a loaded 2-core machine: 93-99% of frames play (keyframe
        # requests only: 40-60%, the test above).
        assert stats["video_frames_received"] >= 0.75 * peer_stats["video_frames_sent"], stats
        assert stats["video_decode_errors"] == 0, stats
        with av.open(str(tmp_path / f"{name}.mkv")) as container:
            decoded = sum(1 for _ in container.decode(video=0))
        assert decoded == stats["video_frames_received"]


class _Silent:
    """A MediaPeer that sends nowhere: for CallMedia's receive path alone."""

    max_datagram_size = 1158

    def send_datagram(self, data: bytes, *, urgent: bool = False) -> bool:
        return True

    async def wait_closed(self) -> None:
        await trio.sleep_forever()


async def test_redundancy_follows_the_peers_reports() -> None:
    """Copies go only to a peer that says it decodes them, from a report with loss on,
    until ``redundancy_hold`` passes without one."""
    config = MediaConfig(redundancy_hold=0.2)
    media = CallMedia(
        _Silent(), audio_in=None, video_in=None, record=None, duration=1, config=config
    )

    def report(n: int, lost: int, accepts: bool) -> bytes:
        return ReceiverReport(
            n, audio=ReportBlock(fraction_lost=lost), accepts_redundancy=accepts
        ).encode()

    assert not media.redundancy_active(trio.current_time())
    media.datagram_received(report(1, 2, True))  # under 1% lost: no
    assert not media.redundancy_active(trio.current_time())
    media.datagram_received(report(2, 26, False))  # 10% lost, but an older peer
    assert not media.redundancy_active(trio.current_time())
    media.datagram_received(report(3, 26, True))
    assert media.redundancy_active(trio.current_time())
    await trio.sleep(0.1)
    media.datagram_received(report(4, 0, True))  # no loss: still on within the hold
    assert media.redundancy_active(trio.current_time())
    await trio.sleep(0.15)
    assert not media.redundancy_active(trio.current_time())
    off = CallMedia(
        _Silent(), audio_in=None, video_in=None, record=None, duration=1,
        config=MediaConfig(audio_redundancy=False),
    )  # fmt: skip
    off.datagram_received(report(1, 26, True))
    assert not off.redundancy_active(trio.current_time())


class _Recording(_Silent):
    """A MediaPeer that keeps what it is asked to send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_datagram(self, data: bytes, *, urgent: bool = False) -> bool:
        self.sent.append(data)
        return True


async def test_nacks_go_only_to_a_peer_that_answers_them() -> None:
    """A missing fragment is NACKed once the peer's report says it answers NACKs (an
    older peer would drop them, and waiting for its retransmissions would only delay)."""
    config = MediaConfig(assembler=AssemblerConfig(nack=NackConfig(reorder_delay=0)))
    for answers, video_nack in ((False, True), (True, False), (True, True)):
        peer = _Recording()
        media = CallMedia(
            peer, audio_in=None, video_in=None, record=None, duration=1,
            config=replace(config, video_nack=video_nack),
        )  # fmt: skip
        media.datagram_received(ReceiverReport(1, answers_nacks=answers).encode())
        pieces = [
            *fragment(0, 0, bytes(300), keyframe=True, max_datagram=114),
            *fragment(1, 3000, bytes(300), keyframe=False, max_datagram=114)[1:],
        ]
        for piece in pieces:
            media.datagram_received(piece.encode())
        nacks = [m for m in map(decode, peer.sent) if isinstance(m, VideoNack)]
        if answers and video_nack:
            assert [[(e.frame_id, e.fragments()) for e in n.entries] for n in nacks] == [[(1, [0])]]
            assert media.statistics()["video_nacks_sent"] == 1
        else:
            assert nacks == []


class _Wire(_Silent):
    """A MediaPeer that hands what it sends straight to the other side's CallMedia."""

    def __init__(self) -> None:
        self.to: CallMedia | None = None

    def send_datagram(self, data: bytes, *, urgent: bool = False) -> bool:
        if self.to is not None:
            self.to.datagram_received(data)
        return True


@pytest.mark.parametrize("stall", [0.0, 0.5])
async def test_a_stall_of_the_receiver_is_silence_in_the_recording_not_a_hole(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, stall: float
) -> None:
    """Starved of CPU for 0.5 s (the process, both sides: the clock jumps), playout skips
    the ticks it missed; the recording gets that much silence, so it stays as long as the
    call and its audio in time with a video track placed by timestamps. Without a stall
    nothing is inserted."""
    to_alice, to_bob = _Wire(), _Wire()
    alice = CallMedia(to_bob, audio_in="tone:440", video_in=None, record=None, duration=CALL)
    bob = CallMedia(
        to_alice, audio_in=None, video_in=None, record=tmp_path / "bob.wav", duration=CALL
    )
    to_bob.to, to_alice.to = bob, alice
    async with trio.open_nursery() as nursery:
        await nursery.start(alice.run)
        await nursery.start(bob.run)
        await trio.sleep(1.0)
        autojump_clock.jump(stall)
    stats = bob.statistics()
    x = read_wav(tmp_path / "bob.wav")
    # Playout starts a frame or two in (the jitter buffer's start delay): the rest is
    # the call, the stall included. After the stall the playout clock catches up in
    # pauses (align_tick, up to half a frame a tick) and the recording keeps those
    # frames: 3.1 s for the 3.0 s call (not followed: leaving a quiet frame out for
    # each frame caught up cost wideband PESQ ~0.05 in scripts/bench_call.py at 0 %).
    assert CALL - 3 * FRAME / 48000 <= x.size / 48000 <= CALL + 0.15, (x.size / 48000, stats)
    assert dominant_frequency(x) == pytest.approx(440, abs=5)
    if stall:
        assert stats["audio_playout_skipped"] >= 20, stats  # the stall was seen as one
        assert longest_gap(x) >= 0.45 * 48000  # the stall, as silence
    else:
        assert stats["audio_playout_skipped"] == 0, stats
        assert longest_gap(x) < FRAME, stats  # no frame of silence (5 ms at the start)
