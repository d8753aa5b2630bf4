#!/usr/bin/env python3
"""Where the test suite's wall time goes: which workers ran what, and how busy the cores were.

Two parts, run side by side:

    scripts/suite_timeline.py sample /tmp/cpu.jsonl --seconds 400 &
    scripts/test --timeline=/tmp/timeline.jsonl
    scripts/suite_timeline.py show /tmp/timeline.jsonl --cpu /tmp/cpu.jsonl

``sample`` writes the machine's busy cores (from /proc/stat) twice a second, for at most
``--seconds`` (it ends by itself). ``show`` prints, per time slice, how many workers ran
an ordinary test, a serial one, or waited for a lane, and how many cores were busy; then
the stretches where the cores stood idle, with the tests under way then.
The timeline's lines come from tests/conftest.py (``--timeline``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Run:
    worker: str
    nodeid: str
    serial: bool
    asked: float
    started: float
    ended: float


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def sample(out: Path, seconds: float, interval: float) -> None:
    import os

    cores = os.cpu_count() or 1
    deadline = time.monotonic() + seconds
    busy0, total0 = _cpu_times()
    with out.open("w") as f:
        while time.monotonic() < deadline:
            time.sleep(interval)
            busy, total = _cpu_times()
            share = (busy - busy0) / (total - total0) if total > total0 else 0.0
            f.write(json.dumps([round(time.time(), 3), round(share * cores, 3)]) + "\n")
            f.flush()
            busy0, total0 = busy, total


def _load_runs(path: Path) -> list[Run]:
    runs = []
    for line in path.read_text().splitlines():
        worker, nodeid, serial, asked, started, ended = json.loads(line)
        runs.append(Run(worker, nodeid, bool(serial), asked, started, ended))
    return sorted(runs, key=lambda r: r.started)


def show(timeline: Path, cpu: Path | None, step: float, idle_below: float) -> None:
    runs = _load_runs(timeline)
    if not runs:
        raise SystemExit(f"{timeline}: no tests in it")
    t0 = min(r.asked for r in runs)
    t1 = max(r.ended for r in runs)
    samples: list[tuple[float, float]] = []
    if cpu is not None:
        samples = [tuple(json.loads(line)) for line in cpu.read_text().splitlines()]  # type: ignore[misc]
    workers = sorted({r.worker for r in runs})
    print(
        f"{len(runs)} tests on {len(workers)} workers, first lane asked to last end {t1 - t0:.1f} s"
    )
    serial = [r for r in runs if r.serial]
    if serial:
        s0 = min(r.asked for r in serial)
        print(
            f"serial tests: {len(serial)}, {sum(r.ended - r.started for r in serial):.1f} s of "
            f"runs; the first asked at {s0 - t0:.1f} s, the last ended at "
            f"{max(r.ended for r in serial) - t0:.1f} s"
        )
    print(f"\n{'from':>6} {'ordinary':>8} {'serial':>6} {'waiting':>7} {'cores':>5}")
    slices = []
    t = t0
    while t < t1:
        mid = t + step / 2
        ordinary = sum(1 for r in runs if r.started <= mid < r.ended and not r.serial)
        ser = sum(1 for r in runs if r.started <= mid < r.ended and r.serial)
        waiting = sum(1 for r in runs if r.asked <= mid < r.started)
        busy = [c for s, c in samples if t <= s < t + step]
        cores = sum(busy) / len(busy) if busy else float("nan")
        slices.append((t, ordinary, ser, waiting, cores))
        print(f"{t - t0:6.0f} {ordinary:8d} {ser:6d} {waiting:7d} {cores:5.2f}")
        t += step
    if not samples:
        return
    print(f"\nslices with fewer than {idle_below} cores busy, and what ran then:")
    idle_total = 0.0
    for start, _o, _s, _w, cores in slices:
        if cores == cores and cores < idle_below:  # not NaN
            idle_total += step
            under_way = [
                r.nodeid.split("::")[-1][:60]
                for r in runs
                if r.started < start + step and r.ended > start
            ]
            print(f"{start - t0:6.0f} {cores:4.2f}  {', '.join(under_way[:4])}")
    print(f"{idle_total:.0f} s of {t1 - t0:.0f} s under {idle_below} cores busy")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="write busy cores twice a second")
    p.add_argument("out", type=Path)
    p.add_argument(
        "--seconds", type=float, default=600.0, help="stop after this long (default 600)"
    )
    p.add_argument("--interval", type=float, default=0.5)
    p = sub.add_parser("show", help="print the timeline")
    p.add_argument("timeline", type=Path)
    p.add_argument("--cpu", type=Path, help="the file `sample` wrote")
    p.add_argument("--step", type=float, default=5.0, help="slice length in seconds (default 5)")
    p.add_argument(
        "--idle-below", type=float, default=1.5, help="cores busy under which a slice is listed"
    )
    args = parser.parse_args()
    if args.command == "sample":
        if not 0 < args.seconds <= 3600:
            parser.error("--seconds must be in (0, 3600]")
        sample(args.out, args.seconds, args.interval)
    else:
        show(args.timeline, args.cpu, args.step, args.idle_below)


if __name__ == "__main__":
    main()
