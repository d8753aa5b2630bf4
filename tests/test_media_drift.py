"""Playout on a device clock (issue 15, item 2): pure simulations, no I/O, no trio.

A sender's microphone runs at 48 kHz by its own crystal, a receiver's speaker by
another; they differ by up to a few hundred ppm (cheap USB devices: up to ~1000). The
receiver plays on its speaker's clock (:class:`~p2pd.media.devices.SpeakerSink`: the
device takes 10 ms blocks, and whenever fewer than ``low_water`` samples are queued the
call takes frames from the jitter buffer), so the jitter buffer must absorb the drift:
frames pile up when the speaker is slow (it drops one, in a pause) and run short when it
is fast (it stretches by a frame of concealment, in a pause). Never by an underrun of the
device, an overflow of the buffer, or a gap (a frame due and not there).

This runs that loop for minutes of virtual time with the call's own jitter buffer
settings, speech-like talk spurts (1.5 s of speech, 0.5 s of pause) and a network that
delays each packet by 30-35 ms (seeded).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

import pytest

from p2pd.media.call import MediaConfig
from p2pd.media.jitter import JitterBuffer, PlayoutKind

FRAME = 960
RATE = 48000
BLOCK = 480  # what the speaker thread takes per write
LOW_WATER = MediaConfig().speaker_low_water


def talking(seq: int) -> bool:
    """1.5 s of speech, then 0.5 s of pause, over and over."""
    return seq % 100 < 75


@dataclass
class Run:
    seconds: float
    device_underruns: int
    gaps: int  # frames due and not there (an underrun of the jitter buffer)
    stretched: int
    dropped: int
    shifts_in_speech: int
    max_buffered: int
    max_queued: int  # samples queued for the device at most
    latency_first: float  # mean capture-to-playout time over the first minute
    latency_last: float  # ... and over the last one
    latency_max: float
    stats: dict[str, object]


def simulate(sender_ppm: float, device_ppm: float, seconds: float, seed: int = 1) -> Run:
    """``seconds`` of a call whose sender captures at 48 kHz * (1 + sender_ppm / 1e6) and
    whose receiver's speaker consumes at 48 kHz * (1 + device_ppm / 1e6), on a clock
    (the receiver's ``now``) that is the reference."""
    rng = random.Random(seed)
    jitter = JitterBuffer(MediaConfig().jitter)
    capture_rate = RATE * (1 + sender_ppm / 1e6)
    device_rate = RATE * (1 + device_ppm / 1e6)
    frames = int(seconds * capture_rate / FRAME)
    # (time, kind, seq): 0 a packet arrives, 1 the device takes a block, 2 trio tops up
    events: list[tuple[float, int, int]] = []
    for seq in range(frames):
        captured = (seq + 1) * FRAME / capture_rate
        heapq.heappush(events, (captured + 0.030 + rng.uniform(0, 0.005), 0, seq))
    heapq.heappush(events, (0.0, 1, 0))
    captured_at = {seq: (seq + 1) * FRAME / capture_rate for seq in range(frames)}
    queued = 0  # samples queued for the device
    fed = False
    quiet = True
    device_underruns = gaps = shifts_in_speech = 0
    max_buffered = max_queued = 0
    latencies: list[tuple[float, float]] = []
    end = frames * FRAME / capture_rate
    while events:
        now, kind, seq = heapq.heappop(events)
        if now > end:
            break
        if kind == 0:
            jitter.push(seq, seq * FRAME, b"x", now, start=seq == 0)
            continue
        if kind == 1:
            # The device takes a block; short of one (once fed) is an underrun.
            if fed and queued < BLOCK:
                device_underruns += 1
            queued = max(0, queued - BLOCK)
            heapq.heappush(events, (now + BLOCK / device_rate, 1, 0))
            if queued < LOW_WATER:
                # The device thread wakes trio, which comes a moment later.
                heapq.heappush(events, (now + 0.0005, 2, 0))
            continue
        wake = now
        for _ in range(8):
            if queued >= LOW_WATER:
                break
            decision = jitter.pop(wake, quiet=quiet)
            queued += FRAME
            if decision is None:
                continue  # silence before the first frame
            fed = True
            if decision.underrun:
                gaps += 1
            if decision.kind is PlayoutKind.CONCEAL and decision.seq is None and not quiet:
                shifts_in_speech += 1
            if decision.seq is not None:
                if decision.kind is PlayoutKind.FRAME:
                    latencies.append((wake, wake - captured_at[decision.seq]))
                quiet = not talking(decision.seq)
        max_queued = max(max_queued, queued)
        max_buffered = max(max_buffered, jitter.statistics()["buffered"])
    stats = jitter.statistics()
    first = [lat for t, lat in latencies if t < 60]
    last = [lat for t, lat in latencies if t > end - 60]
    return Run(
        seconds=end,
        device_underruns=device_underruns,
        gaps=gaps,
        stretched=int(stats["expanded"]),
        dropped=int(stats["dropped"]),
        shifts_in_speech=shifts_in_speech,
        max_buffered=max_buffered,
        max_queued=max_queued,
        latency_first=sum(first) / len(first),
        latency_last=sum(last) / len(last),
        latency_max=max(lat for _, lat in latencies),
        stats=stats,
    )


@pytest.mark.parametrize(
    ("sender_ppm", "device_ppm"),
    [(0, 0), (0, 200), (0, -200), (100, -100), (0, 1000), (0, -1000), (500, -500)],
)
def test_drift_is_absorbed_in_pauses(sender_ppm: float, device_ppm: float) -> None:
    run = simulate(sender_ppm, device_ppm, seconds=300)
    skew = (device_ppm - sender_ppm) / 1e6
    print(
        f"\n{sender_ppm:+} ppm sender, {device_ppm:+} ppm speaker, {run.seconds:.0f} s: "
        f"stretched {run.stretched}, dropped {run.dropped}, buffered <= {run.max_buffered}, "
        f"latency {run.latency_first * 1000:.1f} -> {run.latency_last * 1000:.1f} ms "
        f"(max {run.latency_max * 1000:.1f})"
    )
    # Never a gap, an underrun or an overflow.
    assert run.device_underruns == 0
    assert run.gaps == 0
    assert run.stats["overflow"] == 0 and run.stats["late"] == 0
    assert run.stats["concealed"] == 0 and run.stats["resyncs"] == 0
    # The shifts happen in pauses, and there are as many as the drift needs: a frame
    # for every 20 ms the clocks part (a fast speaker needs frames stretched in, a slow
    # one frames dropped), give or take the start (the warm-up floor comes down by two).
    assert run.shifts_in_speech == 0
    expected = skew * run.seconds / 0.020
    assert abs((run.stretched - run.dropped) - expected) <= 2, (run.stretched, run.dropped)
    # Bounded depth: a few frames in the jitter buffer and the device queue, and a delay
    # that stays where it started instead of creeping with the drift.
    assert run.max_buffered <= 5
    assert run.max_queued <= LOW_WATER + FRAME
    assert abs(run.latency_last - run.latency_first) <= 0.025
    assert run.latency_max <= 0.120


def test_without_pauses_shifts_wait_at_most_a_second() -> None:
    """A steady tone never pauses: the shifts come anyway, one per max_defer ticks at
    most late, so the delay still cannot creep (1000 ppm: one every 20 s)."""
    global talking
    saved = talking
    talking = lambda seq: True  # noqa: E731
    try:
        run = simulate(0, 1000, seconds=120)
    finally:
        talking = saved
    assert run.device_underruns == 0 and run.gaps == 0
    assert run.stretched - run.dropped >= 4  # 120 s * 1000 ppm = 6 frames, less the start
    assert abs(run.latency_last - run.latency_first) <= 0.045
