"""Helpers the benchmarks under scripts/ share (imported from the script's folder)."""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable

import trio


def progress_printer(name: str) -> Callable[[str], None]:
    """A ``progress(message)`` that writes ``[name HH:MM:SS] message`` to stderr."""

    def progress(message: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return progress


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * pct // 100))  # ceil
    return sorted_values[int(rank) - 1]


class Every10Percent:
    """Calls ``report(done)`` when ``done`` crosses each tenth of ``total``."""

    def __init__(self, total: int, report: Callable[[int], None]) -> None:
        self.total = max(total, 1)
        self.report = report
        self.next_tenth = 1

    def __call__(self, done: int) -> None:
        if done * 10 >= self.next_tenth * self.total:
            self.next_tenth = done * 10 // self.total + 1
            self.report(done)


async def trio_pool(
    count: int, width: int, job: Callable[[int], Awaitable[None]], stop_at: float | None = None
) -> int:
    """Run ``job(0..count-1)``, ``width`` at a time; no new job starts after ``stop_at``
    (trio clock). Returns how many were started."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count and (stop_at is None or trio.current_time() < stop_at):
            index = next_index
            next_index += 1
            await job(index)

    async with trio.open_nursery() as nursery:
        for _ in range(min(width, count)):
            nursery.start_soon(worker)
    return next_index
