"""The one way tests wait for a condition they cannot await: poll it, bounded in time
and in count. Prefer an event where the code offers one (a ``trio.Event``, the control
API's event stream); these are for state with no event (a counter, a row, a file).

- :func:`wait_for` in trio tests: checks after every scheduling round or ``interval``,
  raises AssertionError naming ``what`` after ``timeout`` seconds (trio's clock, so a
  MockClock test jumps instead of sleeping).
- :func:`wait_until` in process tests (daemons driven through the CLI): blocking, returns
  whether the condition held, for the caller's assert to say more. Unless told an
  ``interval``, it polls at growing intervals (:data:`FIRST_INTERVAL` up to
  :data:`MAX_INTERVAL`): such a predicate is usually a CLI process and a daemon's
  answer, some 25-50 ms of CPU, so a long wait polls twice a second, not five times,
  while a condition that holds at once is still seen at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

__all__ = ["wait_for", "wait_until"]

#: :func:`wait_until`'s first pause; each next one is half as long again, up to MAX_INTERVAL.
FIRST_INTERVAL = 0.05
MAX_INTERVAL = 0.5


async def wait_for(
    predicate: Callable[[], object],
    what: str = "the condition",
    *,
    timeout: float = 30.0,
    interval: float = 0.005,
) -> None:
    """Return once ``predicate()`` is true; AssertionError after ``timeout`` seconds."""
    deadline = trio.current_time() + timeout
    for _ in range(int(timeout / interval) + 2):
        if predicate():
            return
        if trio.current_time() >= deadline:
            break
        await trio.sleep(interval)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def wait_until(
    predicate: Callable[[], object], timeout: float, interval: float | None = None
) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; whether it held. Every
    ``interval`` seconds, or by default at growing intervals (see the module's doc)."""
    deadline = time.monotonic() + timeout
    pause = FIRST_INTERVAL if interval is None else interval
    for _ in range(int(timeout / min(pause, FIRST_INTERVAL)) + 2):
        if predicate():
            return True
        now = time.monotonic()
        if now >= deadline:
            break
        time.sleep(min(pause, deadline - now))
        if interval is None:
            pause = min(pause * 1.5, MAX_INTERVAL)
    return bool(predicate())
