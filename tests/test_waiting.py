"""p2pd/testing/waiting.py's ``wait_until``, the poll the process tests wait with: how
often it asks (each ask is usually a CLI process and a daemon's answer, 25-50 ms of
CPU), how soon it sees a condition, and that it keeps to its timeout. On a clock of its
own (the module's ``time``), so that a 30 s wait takes no time here."""

from __future__ import annotations

import itertools

import pytest

from p2pd.testing import waiting
from p2pd.testing.waiting import MAX_INTERVAL, wait_until


class Clock:
    """``time.monotonic`` and ``time.sleep`` for the module: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(waiting, "time", fake)
    return fake


def test_a_long_wait_polls_about_twice_a_second_and_keeps_its_timeout(clock: Clock) -> None:
    asked: list[float] = []

    def never() -> bool:
        asked.append(clock.now)
        return False

    assert not wait_until(never, 30.0)
    assert 30.0 <= clock.now <= 30.0 + 1e-9  # not a pause past the deadline
    # at most 2 asks a second once the pauses have grown (5 a second at a fixed 0.2 s)
    assert len(asked) <= 2 * 30 + 10, len(asked)
    gaps = [b - a for a, b in itertools.pairwise(asked)]
    assert max(gaps) <= MAX_INTERVAL + 1e-9


def test_a_condition_is_seen_soon_after_it_holds(clock: Clock) -> None:
    for holds_at in (0.0, 0.1, 0.7, 12.3):
        start = clock.now
        assert wait_until(lambda h=holds_at, s=start: clock.now - s >= h, 30.0)
        seen = clock.now - start
        assert holds_at <= seen <= holds_at + max(0.5 * holds_at, 0.05) + 1e-9, (holds_at, seen)
        assert seen <= holds_at + MAX_INTERVAL + 1e-9


def test_an_interval_given_is_kept(clock: Clock) -> None:
    asked: list[float] = []

    def never() -> bool:
        asked.append(clock.now)
        return False

    assert not wait_until(never, 10.0, interval=1.0)
    assert asked[:3] == [0.0, 1.0, 2.0]
    assert len(asked) == 12  # every second from 0 to 10, and once more at the deadline
