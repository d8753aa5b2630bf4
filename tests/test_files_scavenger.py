"""The scavenger that makes a file transfer yield to DMs and calls (p2pd/files/scavenger.py),
driven sans-I/O against a model bottleneck: a link of ``rate`` bytes/s with ``base``
seconds of its own delay, whose queue holds whatever the sender keeps in flight beyond
one bandwidth-delay product. What must hold: the transfer's queue settles near the
target (what a DM waits behind it), the window fills the link when nothing queues, and
no RTT sample, however odd, takes it outside [floor, ceiling]. The real-network figures
are in scripts/bench_files.py (``--uplink-mbit``)."""

from __future__ import annotations

import math

import pytest

from p2pd.files.scavenger import BASE_INTERVAL, TARGET, Scavenger

FLOOR, CEILING = 8 * 1024, 8 << 20


def rtt_of(window: int, rate: float, base: float) -> float:
    """The model link: bytes beyond rate * base wait in its queue."""
    return base + max(0.0, window - rate * base) / rate


def run(s: Scavenger, rate: float, base: float, seconds: float, *, start: float = 0.0) -> float:
    """Drive ``s`` every 5 ms (RTT samples lag one step), after one sample of the empty
    link (a connection's handshake); returns the clock at the end."""
    now, window = start, s.window
    s.update(now, base)
    for _ in range(int(seconds / 0.005)):  # bounded
        window = s.update(now, rtt_of(window, rate, base))
        now += 0.005
    return now


@pytest.mark.parametrize(
    ("rate", "base"),
    [(625_000, 0.02), (2_500_000, 0.01), (12_500_000, 0.002), (250_000, 0.08)],
)
def test_the_queue_settles_near_the_target(rate: float, base: float) -> None:
    """5 Mbit/s with 20 ms, 20 Mbit/s with 10 ms, 100 Mbit/s with 2 ms, 2 Mbit/s with 80
    ms: after 20 s the queue a DM would wait behind is within half and twice the target
    (with no scavenger it is whatever the send buffer holds: 1 MiB at 5 Mbit/s is 1.7 s),
    and the link is kept busy (in flight at least one bandwidth-delay product)."""
    s = Scavenger(floor=FLOOR, ceiling=CEILING)
    run(s, rate, base, 20.0)
    queue = rtt_of(s.window, rate, base) - base
    assert TARGET / 2 <= queue <= TARGET * 2, (queue, s.window)
    assert s.window >= rate * base


def test_no_queue_grows_to_the_ceiling_and_a_queue_shrinks_to_the_floor() -> None:
    s = Scavenger(floor=FLOOR, ceiling=CEILING)
    now = 0.0
    for _ in range(200):  # a fast path: the RTT never moves off its base
        s.update(now, 0.001)
        now += 0.005
    assert s.window == CEILING
    for _ in range(400):  # something else filled the queue: 2 s of it
        s.update(now, 2.0)
        now += 0.005
    assert s.window == FLOOR


@pytest.mark.parametrize("sample", [None, 0.0, -1.0, math.nan, math.inf])
def test_a_sample_that_is_not_an_rtt_changes_nothing(sample: float | None) -> None:
    s = Scavenger(floor=FLOOR, ceiling=CEILING, window=100_000)
    assert s.update(1.0, sample) == 100_000
    assert s.base_delay() == math.inf


def test_the_base_delay_is_the_lowest_of_recent_intervals_and_old_ones_expire() -> None:
    """A route that got slower is learnt after BASE_HISTORY intervals: the old minimum
    stops counting, else the new path's own delay would read as queue forever."""
    s = Scavenger(floor=FLOOR, ceiling=CEILING)
    s.update(0.0, 0.010)
    s.update(1.0, 0.030)
    assert s.base_delay() == 0.010
    for i in range(1, 12):  # a new interval each time, every sample 50 ms
        s.update(i * BASE_INTERVAL, 0.050)
    assert s.base_delay() == 0.050


def test_the_window_moves_once_per_round_trip_at_most() -> None:
    s = Scavenger(floor=FLOOR, ceiling=CEILING, window=FLOOR * 4)
    first = s.update(0.0, 0.1)  # base 100 ms, no queue: one step up
    assert first > FLOOR * 4
    assert s.update(0.05, 0.1) == first  # within the round trip: unchanged
    assert s.update(0.11, 0.1) > first


def test_bad_parameters_are_refused() -> None:
    for floor, ceiling, target in ((0, 1, 0.025), (10, 5, 0.025), (1, 2, 0.0)):
        with pytest.raises(ValueError):
            Scavenger(floor=floor, ceiling=ceiling, target=target)
