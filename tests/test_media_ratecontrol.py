"""The video bitrate that follows loss and RTT (p2pd/media/ratecontrol.py), driven by
``now`` alone: receiver reports every 0.5 s, the way a call sends them, with the loss
and RTT a path would show."""

from __future__ import annotations

import random

import pytest

from p2pd.errors import UsageError
from p2pd.media.nack import RetransmitHistory
from p2pd.media.ratecontrol import RateConfig, SendLossMeter, VideoRateController
from p2pd.media.wire import NackEntry, ReportBlock, VideoFragment, VideoNack

CEILING = 800_000
INTERVAL = 0.5  # MediaConfig.report_interval
#: Started at the ceiling (calls start at RateConfig.start_bps, 300 kbit/s).
FULL = RateConfig(start_bps=CEILING)


def run(
    rc: VideoRateController,
    seconds: float,
    *,
    loss: float | None = 0.0,
    rtt: float = 0.01,
    start: float = 0.0,
) -> float:
    """Reports every 0.5 s for ``seconds`` from ``start``; returns the time after."""
    now = start
    for _ in range(round(seconds / INTERVAL)):
        now += INTERVAL
        rc.report(now, loss, rtt)
    return now


def test_a_clean_path_keeps_the_configured_bitrate() -> None:
    rc = VideoRateController(FULL, ceiling=CEILING)
    run(rc, 30)
    assert rc.target == CEILING
    assert rc.statistics()["video_target_kbps"] == 800.0


def test_a_call_starts_at_300_kbits_and_grows_to_the_ceiling_on_a_clean_path() -> None:
    rc = VideoRateController(RateConfig(), ceiling=CEILING)
    assert rc.target == 300_000
    now = run(rc, 5)
    assert rc.target == pytest.approx(300_000 * 1.08**4.5)  # from the first report on
    run(rc, 10, start=now)
    assert rc.target == CEILING
    # A configured bitrate under the start is the start.
    assert VideoRateController(RateConfig(), ceiling=200_000).target == 200_000


def test_loss_over_ten_percent_cuts_the_bitrate_to_the_floor_and_no_further() -> None:
    rc = VideoRateController(FULL, ceiling=CEILING)
    now = run(rc, 1, loss=0.2)
    # Two reports of 20 % loss: each cuts to (1 - 0.2 / 2) = 90 %.
    assert rc.target == pytest.approx(CEILING * 0.9**2)
    run(rc, 60, loss=0.2, start=now)
    assert rc.target == RateConfig().floor_bps
    assert rc.decreases_loss > 10


def test_loss_between_two_and_ten_percent_holds_the_bitrate() -> None:
    rc = VideoRateController(FULL, ceiling=CEILING)
    now = run(rc, 2, loss=0.3)
    held = rc.target
    assert held < CEILING
    run(rc, 20, loss=0.05, start=now)
    assert rc.target == held


def test_after_the_loss_ends_the_bitrate_climbs_back_additively_then_faster() -> None:
    config = FULL
    rc = VideoRateController(config, ceiling=CEILING)
    now = run(rc, 30, loss=0.3)
    assert rc.target == config.floor_bps
    # Clean again: within additive_hold (10 s) of the last cut, 40 kbit/s a second.
    now = run(rc, 5, start=now)
    assert rc.target == pytest.approx(config.floor_bps + 5 * config.additive_bps)
    # Later, 8 % a second: it gets back to the ceiling, and never over it.
    run(rc, 60, start=now)
    assert rc.target == CEILING


def test_a_growing_rtt_cuts_the_bitrate_a_single_late_report_does_not() -> None:
    rc = VideoRateController(FULL, ceiling=CEILING)
    now = run(rc, 5, rtt=0.01)
    # One late report (a stalled thread): nothing happens.
    now += INTERVAL
    rc.report(now, 0.0, 0.2)
    assert rc.target == CEILING
    now = run(rc, 2, rtt=0.01, start=now)
    # A queue: the RTT stays 100 ms over its base for two reports and more.
    now = run(rc, 1, rtt=0.11, start=now)
    assert rc.target == pytest.approx(CEILING * 0.85)
    assert rc.decreases_delay == 1
    run(rc, 10, rtt=0.11, start=now)
    assert rc.target < CEILING * 0.85**5


def test_a_long_queue_cuts_deeper_but_not_under_half() -> None:
    rc = VideoRateController(FULL, ceiling=CEILING)
    now = run(rc, 5, rtt=0.005)
    now = run(rc, 1, rtt=0.305, start=now)  # 300 ms of queue: to 70 %
    assert rc.target == pytest.approx(CEILING * 0.7)
    run(rc, 0.5, rtt=2.005, start=now)  # 2 s of queue: to 50 %, not 0
    assert rc.target == pytest.approx(CEILING * 0.7 * 0.5)


def test_datagrams_our_own_congestion_window_dropped_cut_the_bitrate() -> None:
    rc = VideoRateController(FULL, ceiling=CEILING)
    assert rc.local_queue(1.0, 0) == CEILING
    assert rc.local_queue(1.1, 3) == pytest.approx(CEILING * 0.7)
    assert rc.local_queue(1.2, 9) == pytest.approx(CEILING * 0.7)  # within 0.3 s: once
    assert rc.local_queue(1.5, 9) == pytest.approx(CEILING * 0.7)  # nothing new
    assert rc.local_queue(1.6, 10) == pytest.approx(CEILING * 0.49)
    assert rc.statistics()["video_rate_decreases_local"] == 2


def test_a_queue_waiting_for_our_congestion_window_cuts_the_bitrate() -> None:
    rc = VideoRateController(FULL, ceiling=CEILING)
    assert rc.local_queue(1.0, 0, queued=16) == CEILING  # 16 waiting: no more than allowed
    assert rc.local_queue(1.1, 0, queued=17) == pytest.approx(CEILING * 0.7)
    assert rc.local_queue(1.2, 0, queued=40) == pytest.approx(CEILING * 0.7)  # once per 0.3 s
    assert rc.local_queue(1.5, 0, queued=3) == pytest.approx(CEILING * 0.7)


def test_the_rtt_base_is_the_window_minimum_so_a_slow_path_is_no_queue() -> None:
    """A path whose RTT is 200 ms from the start has no queue: no cut."""
    rc = VideoRateController(FULL, ceiling=CEILING)
    run(rc, 30, rtt=0.2)
    assert rc.target == CEILING
    assert rc.decreases_delay == 0


def test_hostile_reports_keep_the_bitrate_within_floor_and_ceiling() -> None:
    """Whatever a peer reports (any loss, any RTT, any timing, NaN, negative, huge), the
    target stays in [floor, ceiling]."""
    config = FULL
    rng = random.Random(7)
    values = [0.0, 1.0, -1.0, 2.0, 1e9, -1e9, float("nan"), float("inf"), -float("inf"), None]
    for trial in range(50):
        rc = VideoRateController(config, ceiling=CEILING)
        now = 0.0
        for _ in range(400):
            now += rng.choice([0.0, 1e-6, 0.5, 3.0, -1.0])
            loss = rng.choice([*values, rng.random()])
            rtt = rng.choice([*values, rng.random() * 2])
            rc.report(now, loss, rtt)
            assert config.floor_bps <= rc.target <= CEILING, trial


def test_a_flood_of_clean_reports_grows_the_bitrate_no_faster_than_time_does() -> None:
    config = FULL
    fast = VideoRateController(config, ceiling=CEILING)
    paced = VideoRateController(config, ceiling=CEILING)
    for rc in (fast, paced):
        run(rc, 30, loss=0.3)
        assert rc.target == config.floor_bps
    for i in range(1000):  # 1000 reports within 1 s
        fast.report(30.0 + i / 1000, 0.0, 0.01)
    paced.report(30.5, 0.0, 0.01)
    paced.report(31.0, 0.0, 0.01)
    assert fast.target == pytest.approx(paced.target, rel=0.01)
    assert fast.target < config.floor_bps + 1.1 * config.additive_bps


def test_a_flood_of_lossy_reports_cuts_no_more_often_than_the_interval() -> None:
    config = FULL
    rc = VideoRateController(config, ceiling=CEILING)
    for i in range(1000):  # 1000 reports of 50 % loss within 0.29 s: one cut
        rc.report(i * 0.00029, 0.5, 0.01)
    assert rc.decreases_loss == 1
    assert rc.target == pytest.approx(CEILING * 0.75)


def test_the_encoder_changes_only_by_a_step_worth_a_keyframe_and_not_too_often() -> None:
    config = FULL
    rc = VideoRateController(config, ceiling=CEILING)
    # The target moves a little: the encoder stays.
    rc.target = 0.9 * CEILING
    assert rc.encoder_bitrate(10.0, CEILING) is None
    # By 25 %: a new encoder at the target.
    rc.target = 0.75 * CEILING
    assert rc.encoder_bitrate(10.0, CEILING) == 600_000
    # Down again 0.3 s later: too soon (0.5 s between switches down) ...
    rc.target = 0.5 * CEILING
    assert rc.encoder_bitrate(10.3, 600_000) is None
    assert rc.encoder_bitrate(11.0, 600_000) == 400_000
    # ... up: 4 s between, unless a keyframe is due anyway (0.5 s, and 5 % is a step).
    rc.target = 0.6 * CEILING
    assert rc.encoder_bitrate(12.0, 400_000) is None
    assert rc.encoder_bitrate(15.0, 400_000) == 480_000
    rc.target = 0.63 * CEILING
    assert rc.encoder_bitrate(15.2, 480_000, keyframe_due=True) is None
    assert rc.encoder_bitrate(15.6, 480_000, keyframe_due=True) == 504_000
    assert rc.switches == 4


def test_a_bitrate_configured_under_the_floor_is_kept() -> None:
    rc = VideoRateController(RateConfig(), ceiling=100_000)
    run(rc, 10, loss=0.5)
    assert rc.target == 100_000
    with pytest.raises(UsageError):
        VideoRateController(RateConfig(), ceiling=0)
    with pytest.raises(UsageError):
        RateConfig(loss_low=0.2, loss_high=0.1)


# ---- what share of our datagrams the peer missed


def block(highest: int, fraction: float) -> ReportBlock:
    return ReportBlock(fraction_lost=round(fraction * 256), highest_seq=highest % (1 << 32))


def test_the_loss_meter_weighs_audio_reports_and_video_nacks_by_their_counts() -> None:
    meter = SendLossMeter()
    assert meter.report(block(100, 0.0), 0) is None  # the first report sets the origin
    # 25 audio packets, 10 % of them lost; 75 video fragments, 15 NACKed.
    meter.fragments_sent(75)
    loss = meter.report(block(125, 0.1), 15)
    assert loss == pytest.approx((0.1 * 25 + 15) / 100, abs=0.002)
    # Video only (no audio sent): the NACKs alone.
    meter.fragments_sent(40)
    assert meter.report(block(125, 0.0), 19) == pytest.approx(4 / 40)
    # Too few datagrams to say anything.
    meter.fragments_sent(3)
    assert meter.report(block(126, 1.0), 19) is None


def test_hostile_report_blocks_and_nacks_make_the_loss_at_most_one() -> None:
    meter = SendLossMeter()
    meter.report(block(10, 0), 0)
    # A sequence number that jumps (a lie or a wrap past the bound): no audio counted.
    meter.fragments_sent(20)
    assert meter.report(block(10 + 100_000, 1.0), 0) == 0.0
    # NACKs that name more than was sent: the loss is 100 %, not more.
    meter.fragments_sent(20)
    assert meter.report(block(100_010, 0), 10_000) == 1.0
    # A counter that goes back: no negative loss.
    meter.fragments_sent(20)
    assert meter.report(block(100_010, 0), 5) == 0.0


def fragment(frame_id: int, index: int, count: int = 4) -> VideoFragment:
    return VideoFragment(frame_id, index, count, 0, b"x" * 1000)


def test_the_history_counts_each_fragment_a_nack_names_once_and_only_ours() -> None:
    history = RetransmitHistory()
    for fid in range(3):
        for i in range(4):
            f = fragment(fid, i)
            history.sent(f, f.encode(), 0.0)
    nack = VideoNack((NackEntry(1, 0, 0b11), NackEntry(77, 0)))
    history.nacked(nack, 0.01)
    assert history.first_nacked == 3  # fragments 0, 1, 2 of frame 1; frame 77 is not ours
    history.nacked(nack, 0.05)  # asked again: not lost again
    history.nacked(VideoNack((NackEntry(2, 0xFFFF),)), 0.06)  # all of frame 2
    assert history.first_nacked == 7
