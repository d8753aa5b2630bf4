"""The suite's own scheduling lock (tests/conftest.py ``_RunAlone``): serial tests run
SERIAL_LANES (3) at a time and never beside an ordinary test, and an ordinary test
waiting for its turn does not keep a second serial test out. Each ``_RunAlone`` opens
the lock files anew, so two of them in one process conflict as two xdist workers do
(flock(2) locks belong to the open file)."""

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


def test_two_serial_tests_run_together_while_an_ordinary_one_waits(tmp_path: Path) -> None:
    first, reader, second = (_RunAlone(tmp_path) for _ in range(3))
    first.acquire(alone=True)
    waiting_reader = _acquire_in_thread(reader, alone=False)
    assert not waiting_reader.wait(0.3)  # a serial test holds a lane: no ordinary test
    got_second = _acquire_in_thread(second, alone=True)
    # the waiting reader holds nothing, so the second serial test takes another lane
    assert got_second.wait(5)
    assert not waiting_reader.is_set()
    first.release()
    assert not waiting_reader.wait(0.3)  # the second serial test still runs
    second.release()
    assert waiting_reader.wait(5)
    reader.release()


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
