"""The Opus settings that follow reported loss (p2pd/media/audiorate.py), on ``now``, and
the encoder switch (p2pd/media/audioswitch.py) without a call."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import trio
import trio.testing

from p2pd.errors import UsageError
from p2pd.media.audiorate import AudioRateConfig, AudioRateController, OpusSettings
from p2pd.media.audioswitch import EncoderSwitcher, open_warm_encoder
from p2pd.media.codecs import FRAME_SAMPLES, open_opus_decoder

CEILING = 48_000


def controller(**kw: object) -> AudioRateController:
    return AudioRateController(AudioRateConfig(**kw), ceiling=CEILING)  # type: ignore[arg-type]


def drive(
    rc: AudioRateController, losses: list[float | None], *, start: float = 0.0, step: float = 0.5
) -> float:
    """One report per ``step`` seconds; each wanted switch is taken at once. Returns the
    time after the last report."""
    now = start
    for loss in losses:
        rc.report(now, loss)
        wanted = rc.wanted(now)
        if wanted is not None:
            rc.switched(now, wanted)
        now += step
    return now


def test_a_call_starts_with_fec_at_the_configured_loss_unless_told_otherwise() -> None:
    assert controller(start_fec=False).current == OpusSettings(CEILING, False, 0)
    rc = controller(start_packet_loss=10)
    assert rc.current == OpusSettings(CEILING, True, 10)
    assert rc.wanted(0.0) is None


def test_a_clean_path_turns_fec_off_after_the_hold_and_not_before() -> None:
    rc = controller(clean_hold=10.0, start_fec=True)
    now = drive(rc, [0.0] * 19)  # 9.5 s of clean reports
    assert rc.current.fec and rc.switches == 0
    drive(rc, [0.0] * 2, start=now)  # 10 s and more
    assert rc.current == OpusSettings(CEILING, False, 0)
    assert rc.switches == 1


def test_loss_turns_fec_on_at_the_reported_rate_rounded_up() -> None:
    rc = controller()
    now = drive(rc, [0.0] * 24)
    assert not rc.current.fec
    now = drive(rc, [0.07], start=now)
    assert rc.current.fec and rc.current.packet_loss == 5  # at the first lossy report
    drive(rc, [0.07] * 12, start=now)
    assert rc.current == OpusSettings(CEILING, True, 10)  # a mean of 7 % -> the next step
    assert 2 <= rc.switches <= 4


def test_one_lucky_interval_does_not_drop_protection() -> None:
    """At 5 % loss a quarter of 0.5 s intervals show none: the window's largest counts."""
    rng = random.Random(5)
    rc = controller()
    losses: list[float | None] = []
    for _ in range(120):  # 60 s of reports over ~25 packets each at 5 % loss
        lost = sum(rng.random() < 0.05 for _ in range(25))
        losses.append(lost / 25)
    drive(rc, losses)
    assert rc.current.fec and rc.current.packet_loss >= 5
    # Settings move within steps, and few times a minute.
    assert rc.switches <= 12


def test_heavy_loss_cuts_the_bitrate_and_a_clean_path_restores_it() -> None:
    rc = controller(cut_loss=0.2, cut_slope=2.0, floor_bps=24_000)
    now = drive(rc, [0.3] * 4)
    assert rc.current.bitrate == round(CEILING * (1 - 0.1 * 2) / 1000) * 1000
    assert rc.current.packet_loss == 30
    now = drive(rc, [0.0] * 40, start=now)  # 20 s clean
    assert rc.current == OpusSettings(CEILING, False, 0)


def test_switches_towards_less_protection_are_paced() -> None:
    rc = controller(more_interval=1.0, less_interval=5.0, clean_hold=0.0)
    rc.report(0.0, 0.2)
    first = rc.wanted(0.0)
    assert first is not None and first.packet_loss == 20
    rc.switched(0.0, first)
    rc.report(0.5, 0.0)
    rc.report(5.6, 0.0)  # the 20 % report left the window at 5.0 s
    assert rc.wanted(4.9) is None  # not yet: 5 s since the switch
    assert rc.wanted(5.6) == OpusSettings(CEILING, False, 0)


@pytest.mark.parametrize("trial", range(50))
def test_a_hostile_peers_reports_move_us_only_within_the_bounds(trial: int) -> None:
    """Any sequence of reports (NaN, negative, over 1, floods at one instant) leaves the
    settings within [floor, ceiling] and the packet-loss cap, and switches at most once
    per ``more_interval``."""
    rng = random.Random(trial)
    config = AudioRateConfig(floor_bps=24_000, packet_loss_max=30, more_interval=1.0)
    rc = AudioRateController(config, ceiling=CEILING)
    now = 0.0
    switch_times = []
    junk = [math.nan, math.inf, -math.inf, -1.0, 2.0, 1e300, None, 0.0, 1.0]
    for _ in range(400):
        now += rng.choice([0.0, 0.0, 0.001, 0.5, 3.0])
        loss = rng.choice(junk) if rng.random() < 0.5 else rng.random()
        rc.report(now, loss)
        wanted = rc.wanted(now)
        if wanted is not None:
            rc.switched(now, wanted)
            switch_times.append(now)
        s = rc.current
        assert 24_000 <= s.bitrate <= CEILING
        assert 0 <= s.packet_loss <= 30
        assert s.fec or s.packet_loss == 0
    gaps = [b - a for a, b in itertools.pairwise(switch_times)]
    assert all(g >= 1.0 for g in gaps)


def test_a_ceiling_under_the_floor_is_kept() -> None:
    rc = AudioRateController(AudioRateConfig(floor_bps=24_000), ceiling=16_000)
    drive(rc, [0.9] * 10)
    assert rc.current.bitrate == 16_000


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(UsageError):
        AudioRateConfig(packet_loss_step=0)
    with pytest.raises(UsageError):
        AudioRateConfig(loss_on=0.5, cut_loss=0.2)
    with pytest.raises(UsageError):
        AudioRateController(AudioRateConfig(), ceiling=1_000_000)


def _speech_like(n: int) -> list[np.ndarray]:
    """Frames of a 200 Hz buzz with an envelope: loud, then a quiet frame every 10."""
    t = np.arange(FRAME_SAMPLES) / 48000
    out = []
    for k in range(n):
        level = 50 if k % 10 == 9 else 8000
        out.append((level * np.sin(2 * np.pi * 200 * (t + k * 0.02))).astype(np.int16))
    return out


async def test_the_switcher_opens_in_a_thread_and_switches_in_a_pause() -> None:
    rc = controller(clean_hold=0.0, start_fec=True)
    switcher = EncoderSwitcher(rc)
    encoder = open_warm_encoder(rc.current)
    frames = _speech_like(40)
    decoder = open_opus_decoder()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(switcher.serve)
            switcher.report(0.0, 0.0)  # clean and no hold: FEC off wanted
            for _ in range(200):  # bounded: the thread opens it within a few ms
                if switcher._ready is not None:
                    break
                await trio.sleep(0.005)
            assert switcher._ready is not None
            used = []
            for k, pcm in enumerate(frames):
                encoder = switcher.take(1.0 + k * 0.02, pcm, encoder)
                used.append(encoder)
                for packet in encoder.encode(pcm):
                    decoder.decode(packet)
            nursery.cancel_scope.cancel()
    switched_at = next(k for k in range(1, len(used)) if used[k] is not used[k - 1])
    assert switched_at == 9  # the first quiet frame, not before
    assert rc.current == OpusSettings(CEILING, False, 0)
    assert rc.switches == 1
    stats = switcher.statistics()
    assert stats["audio_fec"] is False and stats["audio_encoder_switches"] == 1
    assert stats["audio_encoder_open_ms_max"] is not None


async def test_in_unbroken_speech_the_switch_waits_at_most_max_defer_frames() -> None:
    rc = controller(clean_hold=0.0, start_fec=True)
    switcher = EncoderSwitcher(rc, max_defer=10)
    encoder = open_warm_encoder(rc.current)
    t = np.arange(FRAME_SAMPLES) / 48000
    loud = (8000 * np.sin(2 * np.pi * 200 * t)).astype(np.int16)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(switcher.serve)
            switcher.report(0.0, 0.0)
            for _ in range(200):
                if switcher._ready is not None:
                    break
                await trio.sleep(0.005)
            nursery.cancel_scope.cancel()
    used = [encoder := switcher.take(1.0 + k * 0.02, loud, encoder) for k in range(20)]
    switched_at = next(k for k in range(1, len(used)) if used[k] is not used[k - 1])
    assert switched_at == 10 and rc.switches == 1
