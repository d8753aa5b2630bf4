"""The video bitrate adaptation inside CallMedia: on a virtual clock against a peer that
only counts (reports with loss, a queue for the congestion window), then in real calls
(two in-process QUIC endpoints through the lossy proxy, as tests/test_media_call.py runs
them): the target follows the loss, the encoder follows the target, and a call with
adaptation off keeps its bitrate."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from test_media_call import TIMEOUT, call, video_sent

from p2pd.media import CallMedia, MediaConfig
from p2pd.media.wire import ReceiverReport, ReportBlock, decode

#: The video size of every call here: what is adapted is the bitrate, not the picture.
#: At 640x480 (the default) VP8 encoding was most of these tests' CPU: 2.4 ms a frame
#: here against 1.0 ms at 384x288, which still fills the 150-300 kbit/s the adaptation
#: moves in (the test pattern encoded to 151 and 298 kbit/s at those targets; 640x480
#: overshot the 150 floor, 203). The pattern's frame number needs 324 pixels across,
#: and its size a multiple of 16.
SMALL = {"video_width": 384, "video_height": 288}


class _Queue:
    """A MediaPeer whose QUIC congestion window holds ``queued`` datagrams back."""

    max_datagram_size = 1158

    def __init__(self, queued: int) -> None:
        self.queued_datagrams = queued
        self.keyframes = 0

    def send_datagram(self, data: bytes, *, urgent: bool = False) -> bool:
        message = decode(data)
        if getattr(message, "keyframe", False) and getattr(message, "index", 1) == 0:
            self.keyframes += 1
        return True

    async def wait_closed(self) -> None:
        await trio.sleep_forever()


@pytest.mark.parametrize("queued", [0, 40])
async def test_a_queue_for_our_congestion_window_brings_the_encoder_down(
    queued: int, autojump_clock: trio.testing.MockClock
) -> None:
    """40 datagrams waiting at every video tick (the connection carries less than we
    send): the target falls from the 300 kbit/s start to the floor within a second and
    the encoder is opened again at each step, each new encoder starting with a keyframe.
    Nothing waiting: the encoder stays as it started."""
    peer = _Queue(queued)
    media = CallMedia(
        peer, audio_in=None, video_in="testsrc", record=None, duration=2,
        config=MediaConfig(**SMALL),
    )  # fmt: skip
    await media.run()
    stats = media.statistics()
    if queued:
        assert stats["video_rate_decreases_local"] >= 2, stats
        assert stats["video_target_kbps"] == 150.0, stats
        assert stats["video_encoder_kbps"] == 150.0, stats
        assert stats["video_encoder_switches"] >= 2, stats
        # Each new encoder starts with a keyframe (the first may never encode a frame:
        # the first tick already sees the queue).
        assert peer.keyframes == stats["video_keyframes_sent"], stats
        assert peer.keyframes >= stats["video_encoder_switches"], stats
    else:
        assert stats["video_rate_decreases_local"] == 0, stats
        assert stats["video_target_kbps"] == stats["video_encoder_kbps"] == 300.0, stats
        assert stats["video_encoder_switches"] == 0 and peer.keyframes == 1, stats


class _Full:
    """A MediaPeer whose send queue is full of video: it refuses every datagram but an
    urgent one, as a QuicPeer does with ``max_pending_datagrams`` waiting, and keeps
    those."""

    max_datagram_size = 1158
    queued_datagrams = 64

    def __init__(self) -> None:
        self.urgent: list[bytes] = []
        self.refused = 0

    def send_datagram(self, data: bytes, *, urgent: bool = False) -> bool:
        if urgent:
            self.urgent.append(data)
        else:
            self.refused += 1
        return urgent

    async def wait_closed(self) -> None:
        await trio.sleep_forever()


async def test_a_full_queue_of_video_still_lets_our_reports_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Our reports tell the peer what it loses, so that it slows down: they go out as
    urgent, past a queue full of our own audio and video, which is dropped. (Queued
    behind the video, the reports of the heavy-loss call below were dropped at our own
    queue: 5-7 of 12 a call.)"""
    peer = _Full()
    media = CallMedia(
        peer, audio_in="tone:440", video_in="testsrc", record=None, duration=3,
        config=MediaConfig(**SMALL),
    )  # fmt: skip
    await media.run()
    stats = media.statistics()
    reports = [decode(d) for d in peer.urgent]
    # One report per 0.5 s (and one at the start), all taken; no audio or video was.
    assert all(isinstance(r, ReceiverReport) for r in reports), reports
    assert len(reports) == stats["reports_sent"] >= 6, stats
    assert stats["control_send_dropped"] == 0, stats
    assert stats["datagrams_send_dropped"] == peer.refused, stats
    assert peer.refused >= stats["audio_packets_sent"] + stats["video_frames_sent"] > 100


async def test_reports_of_loss_bring_the_target_down_and_clean_ones_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The peer's reports drive the target: 50 % of our audio lost cuts it to 75 % per
    report (GCC: 1 - loss / 2), clean ones let it grow again."""
    media = CallMedia(_Queue(0), audio_in=None, video_in=None, record=None, duration=9)
    highest = 1000

    async def report(lost: float) -> None:
        nonlocal highest
        highest += 25  # 25 audio packets per 0.5 s report
        block = ReportBlock(fraction_lost=round(lost * 256), highest_seq=highest)
        media.datagram_received(ReceiverReport(1, audio=block).encode())
        await trio.sleep(0.5)

    await report(0.0)  # the first one sets the origin
    await report(0.5)
    assert media.statistics()["video_target_kbps"] == 225.0
    for _ in range(6):
        await report(0.5)
    assert media.statistics()["video_target_kbps"] == 150.0
    for _ in range(4):
        await report(0.0)
    assert media.statistics()["video_target_kbps"] == 150.0 + 4 * 0.5 * 40
    off = CallMedia(
        _Queue(0), audio_in=None, video_in=None, record=None, duration=1,
        config=MediaConfig(video_rate_adaptation=False),
    )  # fmt: skip
    off.datagram_received(ReceiverReport(1, audio=ReportBlock(255, highest_seq=5)).encode())
    off.datagram_received(ReceiverReport(2, audio=ReportBlock(255, highest_seq=60)).encode())
    assert off.statistics()["video_target_kbps"] == 800.0


#: Video frames each side sends before a lossy call hangs up: 2 s of them.
FRAMES = 60
#: How long such a call may take at most (seconds of wall time).
LIMIT = 90.0


#: Both sides sent FRAMES video frames and the call lasted CALL seconds.
#:
#: Counted in frames, not wall time, because the controller acts at events: the local
#: cuts at video ticks, the others at the peer's reports, all at most every 0.3 s. A
#: process starved of CPU runs few of them in a fixed time: beside CPU hogs (load 3-9
#: on 2 cores), 5 of 10 runs of a fixed 3 s call failed with 0 or 1 cut, and those
#: sides had sent 5-10 video frames of 90 (75-88 ticks skipped as late; the sides that
#: passed 10-29), against 82-84 with less load. The controller had nothing to act on;
#: it did not act late on what it had.
#: Receiver reports each side must have had from the other: the loss-based cut acts on
#: them, and at 25 % loss a 3 s call's 6 may come to 2 (a clean-clone CI run, idle: 2
#: of 6, both from before the video's loss showed, one cut where two are asked).
REPORTS = 6


def _enough(alice: CallMedia, bob: CallMedia) -> bool:
    """Both sides sent FRAMES video frames (and the call lasted 3 s), and heard REPORTS
    receiver reports from the other."""
    return video_sent(FRAMES)(alice, bob) and all(
        m.statistics()["reports_received"] >= REPORTS for m in (alice, bob)
    )


@pytest.mark.serial  # frames and reports per second of a real-time call
async def test_heavy_loss_brings_the_video_bitrate_down_and_the_encoder_with_it(
    tmp_path: Path,
) -> None:
    """25 % loss both ways: the reports show it (over 10 %), and through aioquic's
    NewReno the connection carries less than the 300 kbit/s start plus audio, so
    datagrams queue for its congestion window and may overflow: each side's target
    falls towards the 150 kbit/s floor, for any of the three reasons, and the encoder
    is opened again at the lower rate. The call lasts until each side sent FRAMES video
    frames and heard REPORTS reports (_enough). Measured (10 sides each, idle machine):
    at SMALL's 384x288, 3-6 cuts for loss (4 sides read), a cut for the queue on 3, 66
    datagrams dropped on one; at 640x480, a cut for the queue on 8 sides, 237-370
    dropped on two. The queue's cut alone, without timing, is
    test_a_queue_for_our_congestion_window_brings_the_encoder_down's."""
    with trio.fail_after(LIMIT + TIMEOUT):
        alice, bob = await call(
            tmp_path, audio=("tone:440", "tone:440"), video=("testsrc", "testsrc"),
            suffix=".mkv", drop=0.25, config=MediaConfig(**SMALL), until=_enough, limit=LIMIT,
        )  # fmt: skip
    for media in (alice, bob):
        stats = media.statistics()
        assert stats["video_frames_sent"] >= FRAMES, stats  # not cut short by LIMIT
        assert stats["reports_received"] >= REPORTS, stats
        cuts = sum(stats[f"video_rate_decreases_{why}"] for why in ("loss", "delay", "local"))
        print({k: v for k, v in stats.items() if k.startswith("video_")})
        counts = ("reports_sent", "reports_received", "datagrams_send_dropped")
        print({k: stats[k] for k in (*counts, "control_send_dropped")})
        assert cuts >= 2, stats
        # A full queue of ours drops video and audio before our reports, NACKs and
        # keyframe requests (urgent: 5-26 of those per side were dropped beside two CPU
        # hogs before). Not never: urgent ones have a reserve of 16 above the 64, and a
        # clean-clone CI run whose call lasted 8 s with the window collapsed dropped 11
        # (of 339). What the controller needs is the reports (REPORTS heard, asserted
        # above); the mechanism is proven without timing by
        # test_a_full_queue_of_video_still_lets_our_reports_out and test_quic_datagrams.
        assert stats["control_send_dropped"] * 10 <= max(10, stats["datagrams_send_dropped"])
        # at least a net tenth below the start: the controller grows again between cuts
        # (up to 40 kbit/s a second), so two cuts need not leave it under 300 * 0.9**2
        # (a clean-clone CI run ended at 245.6; one local run in four did too)
        assert stats["video_target_kbps"] < 300 * 0.9, stats
        assert stats["video_target_kbps"] >= 150, stats
        assert stats["video_encoder_switches"] >= 1, stats
        assert stats["video_encoder_kbps"] < 300, stats


@pytest.mark.serial
async def test_without_adaptation_the_configured_bitrate_stays(tmp_path: Path) -> None:
    """The same call with the adaptation off: the same frames, the bitrate stays."""
    with trio.fail_after(LIMIT + TIMEOUT):
        alice, bob = await call(
            tmp_path, audio=("tone:440", "tone:440"), video=("testsrc", "testsrc"),
            suffix=".mkv", drop=0.25, config=MediaConfig(video_rate_adaptation=False, **SMALL),
            until=_enough, limit=LIMIT,
        )  # fmt: skip
    for media in (alice, bob):
        stats = media.statistics()
        assert stats["video_frames_sent"] >= FRAMES, stats
        assert stats["video_target_kbps"] == 800.0, stats
        assert stats["video_encoder_kbps"] == 800.0, stats
        assert stats["video_encoder_switches"] == 0, stats
