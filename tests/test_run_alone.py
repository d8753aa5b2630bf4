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


def test_a_serial_test_waits_for_the_ordinary_ones_under_way_and_new_ones_wait_for_it(
    tmp_path: Path,
) -> None:
    running, writer, late = (_RunAlone(tmp_path) for _ in range(3))
    running.acquire(alone=False)
    got_writer = _acquire_in_thread(writer, alone=True)
    assert not got_writer.wait(0.3)  # an ordinary test is under way
    time.sleep(0.05)
    got_late = _acquire_in_thread(late, alone=False)
    assert not got_late.wait(0.3)  # the serial test waits first: the new one after it
    running.release()
    assert got_writer.wait(5)
    assert not got_late.wait(0.3)  # never beside a serial test
    writer.release()
    assert got_late.wait(5)
    late.release()


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
