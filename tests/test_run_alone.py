"""The suite's own scheduling lock (tests/conftest.py ``_RunAlone``): serial tests run
SERIAL_LANES (3) at a time and never beside an ordinary test, and an ordinary test
that found serial ones under way runs as soon as they end, before the next. Each
``_RunAlone`` opens the lock files anew, so two of them in one process conflict as two
xdist workers do (flock(2) locks belong to the open file)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from conftest import SERIAL_LANES, _RunAlone


def _acquire_in_thread(lock: _RunAlone, alone: bool) -> threading.Event:
    got = threading.Event()

    def run() -> None:
        lock.acquire(alone=alone)
        got.set()

    threading.Thread(target=run, daemon=True).start()
    return got


def test_two_serial_tests_run_together(tmp_path: Path) -> None:
    first, second = (_RunAlone(tmp_path) for _ in range(2))
    first.acquire(alone=True)
    assert _acquire_in_thread(second, alone=True).wait(5)  # another lane
    first.release()
    second.release()


def test_an_ordinary_test_that_found_a_serial_one_runs_before_the_next_serial_one(
    tmp_path: Path,
) -> None:
    """The end of a run: xdist queued short ordinary tests behind serial ones on some
    workers, and the serial tests of the other workers, one after another, held them
    (and what was queued behind them) off for the whole serial block. Now a serial test
    waits while an ordinary one waits: that one runs when the serial one under way
    ends, and the next serial one after it."""
    first, reader, second = (_RunAlone(tmp_path) for _ in range(3))
    first.acquire(alone=True)
    waiting_reader = _acquire_in_thread(reader, alone=False)
    assert not waiting_reader.wait(0.3)  # a serial test holds a lane: no ordinary test
    got_second = _acquire_in_thread(second, alone=True)
    assert not got_second.wait(0.3)  # an ordinary test waits: it goes first
    first.release()
    assert waiting_reader.wait(5)
    assert not got_second.wait(0.3)  # never beside an ordinary test
    reader.release()
    assert got_second.wait(5)
    second.release()


def test_a_serial_test_waits_for_the_ordinary_ones_under_way_and_those_that_come(
    tmp_path: Path,
) -> None:
    """Ordinary tests first: the serial ones come last in the order, so the ordinary
    ones that still come are the few xdist queued among them."""
    running, writer, late = (_RunAlone(tmp_path) for _ in range(3))
    running.acquire(alone=False)
    got_writer = _acquire_in_thread(writer, alone=True)
    assert not got_writer.wait(0.3)  # an ordinary test is under way
    got_late = _acquire_in_thread(late, alone=False)
    assert got_late.wait(5)  # beside the one under way
    running.release()
    assert not got_writer.wait(0.3)  # never beside an ordinary test
    late.release()
    assert got_writer.wait(5)
    got_after = _acquire_in_thread(running, alone=False)
    assert not got_after.wait(0.3)  # nor an ordinary test beside a serial one
    writer.release()
    assert got_after.wait(5)
    running.release()


def test_ordinary_tests_run_side_by_side(tmp_path: Path) -> None:
    locks = [_RunAlone(tmp_path) for _ in range(4)]
    for lock in locks:
        lock.acquire(alone=False)  # none waits for another
    for lock in locks:
        lock.release()


def test_no_more_serial_tests_at_once_than_there_are_lanes(tmp_path: Path) -> None:
    held = [_RunAlone(tmp_path) for _ in range(SERIAL_LANES)]
    for lock in held:
        lock.acquire(alone=True)
    extra = _RunAlone(tmp_path)
    got_extra = _acquire_in_thread(extra, alone=True)
    assert not got_extra.wait(0.3)
    held[0].release()
    assert got_extra.wait(5)
    for lock in [*held[1:], extra]:
        lock.release()


def test_a_serial_test_waiting_for_a_lane_lets_an_ordinary_one_that_came_after_go_first(
    tmp_path: Path,
) -> None:
    """The serial block of a clean-clone run: every lane busy, a serial test waiting for
    one (holding the turnstile), and a short ordinary test arriving. It used to wait
    behind every serial test that came after it (19-31 s for a test of milliseconds,
    and the serial tests xdist queued behind it on its worker with it); now the waiting
    serial test lets the lane it would have taken go, the ordinary test runs when the
    lanes are free, and the serial test after it."""
    lanes = [_RunAlone(tmp_path) for _ in range(SERIAL_LANES)]
    for lock in lanes:
        lock.acquire(alone=True)
    writer, reader = _RunAlone(tmp_path), _RunAlone(tmp_path)
    got_writer = _acquire_in_thread(writer, alone=True)
    assert not got_writer.wait(0.3)  # every lane busy
    got_reader = _acquire_in_thread(reader, alone=False)
    time.sleep(0.1)
    lanes[0].release()
    assert not got_writer.wait(0.3)  # the ordinary test waits: it goes first
    for lock in lanes[1:]:
        lock.release()
    assert got_reader.wait(5)
    assert not got_writer.wait(0.3)  # never beside an ordinary test
    reader.release()
    assert got_writer.wait(5)
    writer.release()


def test_a_whole_lane_test_runs_beside_no_other_serial_test(tmp_path: Path) -> None:
    """SERIAL_WHOLE: it waits for the serial tests under way, and none starts beside it
    (the targeted attacker's 40 resolves said "contested" beside two or three others)."""
    first, whole, later = (_RunAlone(tmp_path) for _ in range(3))
    first.acquire(alone=True)
    got_whole = threading.Event()

    def run_whole() -> None:
        whole.acquire(alone=True, whole=True)
        got_whole.set()

    threading.Thread(target=run_whole, daemon=True).start()
    assert not got_whole.wait(0.3)  # a serial test holds a lane
    first.release()
    assert got_whole.wait(5)
    got_later = _acquire_in_thread(later, alone=True)
    assert not got_later.wait(0.3)  # every lane is the whole test's
    whole.release()
    assert got_later.wait(5)
    later.release()
