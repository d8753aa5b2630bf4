"""The one way tests wait for a condition they cannot await: poll it, bounded in time
and in count. Prefer an event where the code offers one (a ``trio.Event``, the control
API's event stream); these are for state with no event (a counter, a row, a file).

- :func:`wait_for` in trio tests: checks after every scheduling round or ``interval``,
  raises AssertionError naming ``what`` after ``timeout`` seconds (trio's clock, so a
  MockClock test jumps instead of sleeping).
- :func:`wait_until` in process tests (daemons driven through the CLI): blocking, returns
  whether the condition held, for the caller's assert to say more.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

__all__ = ["wait_for", "wait_until"]


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


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if predicate():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return bool(predicate())
