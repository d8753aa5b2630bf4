#!/usr/bin/env python3
"""An idle daemon's memory, and how fast it stops: the two numbers of issue 9.

Each run makes a fresh home, starts a real ``p2pd daemon --listen 127.0.0.1:0 --lan off``
(p2pd.testing.daemons.DaemonProcess, the installed CLI), waits for its "ready:" line and
``--settle`` seconds more, reads VmRSS, VmHWM and the thread count from
/proc/<pid>/status, then sends SIGTERM and times the exit (and checks that it exited 0
and removed its control socket). ``--restarted`` starts and stops each home's daemon
once first and measures the second start: the first start of a new home makes its X3DH
prekeys, which loads x3dh and pydantic (about 8 MB) for good; a daemon that already has
them publishes and keeps them up without (p2pd/session/public_prekeys.py) until a
session needs them. ``--imports`` also prints, from a fresh interpreter,
what each import made by a p2pd module adds to the resident memory of
``import p2pd.daemon``, with everything it brings in first: where the memory is. The
allocator grows the heap in steps of up to 1 MB and a step counts for whichever import
makes it, so read each figure to about a megabyte.

    .venv/bin/python scripts/bench_idle.py                 # 3 runs
    .venv/bin/python scripts/bench_idle.py --runs 5 --imports
    .venv/bin/python scripts/bench_idle.py --json
    .venv/bin/python scripts/bench_idle.py --restarted     # each home's second start

Goals (issue 9): idle RSS < 60 MB; SIGTERM to exit < 1 s. LAN discovery is off because
mDNS is sent only inside network namespaces (tests/test_lan.py times a LAN daemon's stop
there: its goodbye adds ~0.3 s); with LAN on, zeroconf adds ~3 MB. Only 127.0.0.1 is
used; every wait is bounded; the daemons are always stopped and the homes removed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import progress_printer

from p2pd.testing.daemons import DaemonProcess, run_cli, short_tempdir

GOAL_RSS_MB = 60.0
GOAL_STOP_S = 1.0
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0

progress = progress_printer("bench_idle")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB) and Threads of a process, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def one_run(settle: float, restarted: bool = False) -> dict[str, Any]:
    home = short_tempdir("p2pd-idle-")
    daemon: DaemonProcess | None = None
    try:
        init = run_cli(home, "init", "idle", "--no-passphrase")
        if init.returncode != 0:
            raise RuntimeError(f"p2pd init failed: {init.stderr}")
        if restarted:  # a first start makes the prekeys (x3dh); measure the next one
            first = DaemonProcess(home)
            try:
                first.wait_ready(READY_TIMEOUT)
            finally:
                code = first.stop(STOP_TIMEOUT)
            if code != 0:
                raise RuntimeError(f"the first start exited {code}: {first.log}")
        daemon = DaemonProcess(home).wait_ready(READY_TIMEOUT)
        time.sleep(settle)
        status = proc_status(daemon.proc.pid)
        t0 = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.proc.wait(STOP_TIMEOUT)
        stop_s = time.monotonic() - t0
        return {
            "rss_mb": round(status["VmRSS"] / 1024, 1),
            "hwm_mb": round(status["VmHWM"] / 1024, 1),
            "threads": status["Threads"],
            "stop_s": round(stop_s, 3),
            "exit_code": code,
            "socket_removed": not (home / "control.sock").exists(),
        }
    finally:
        if daemon is not None:
            daemon.stop(STOP_TIMEOUT)  # kills it if the SIGTERM above did not end it
        shutil.rmtree(home, ignore_errors=True)


# Runs in a fresh interpreter: the resident memory each import made by a p2pd module
# adds, with everything that import brings in first (like -X importtime's cumulative).
_IMPORT_PROBE = r"""
import json, sys, _frozen_importlib as bootstrap

def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4

find_and_load, stack, direct = bootstrap._find_and_load, [], {}

def ours(name):
    return name is None or name == "p2pd" or name.startswith("p2pd.")

def measured(name, import_):
    if name in sys.modules:
        return find_and_load(name, import_)
    start = rss_kb()
    parent = stack[-1] if stack else None
    stack.append(name)
    try:
        return find_and_load(name, import_)
    finally:
        stack.pop()
        if ours(parent) and not ours(name):
            key = f"{name} <- {parent}"
            direct[key] = direct.get(key, 0) + rss_kb() - start

before = rss_kb()
bootstrap._find_and_load = measured
import p2pd.daemon
bootstrap._find_and_load = find_and_load
print(json.dumps({"before_kb": before, "after_kb": rss_kb(), "imports_kb": direct}))
"""


def import_costs() -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the import probe failed: {proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="daemons started (default 3)")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds idle after ready (default 2)"
    )
    parser.add_argument(
        "--restarted",
        action="store_true",
        help="measure each home's second start (its first made the prekeys)",
    )
    parser.add_argument("--imports", action="store_true", help="memory per imported package")
    parser.add_argument("--top", type=int, default=15, help="packages listed (default 15)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    runs = []
    count = max(args.runs, 1)
    for i in range(count):
        progress(f"run {i + 1}/{count}")
        runs.append(one_run(args.settle, args.restarted))
    rss = statistics.median(r["rss_mb"] for r in runs)
    stop = statistics.median(r["stop_s"] for r in runs)
    figures: dict[str, Any] = {
        "restarted": args.restarted,
        "runs": runs,
        "median_rss_mb": rss,
        "median_stop_s": stop,
        "rss_ok": rss < GOAL_RSS_MB,
        "stop_ok": max(r["stop_s"] for r in runs) < GOAL_STOP_S,
        "clean": all(r["exit_code"] == 0 and r["socket_removed"] for r in runs),
    }
    if args.imports:
        progress("import p2pd.daemon, measured per package")
        figures["imports"] = import_costs()
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_text(figures, args.top)
    return 0 if figures["clean"] else 1


def print_text(f: dict[str, Any], top: int) -> None:
    started = "restarted" if f["restarted"] else "first start of a new home"
    print(f"idle p2pd daemon (--listen 127.0.0.1:0 --lan off), {started}:")
    for r in f["runs"]:
        print(
            f"  RSS {r['rss_mb']:6.1f} MB (peak {r['hwm_mb']:.1f}), {r['threads']} threads;"
            f"  SIGTERM to exit {r['stop_s'] * 1000:6.0f} ms, exit {r['exit_code']},"
            f" socket {'removed' if r['socket_removed'] else 'LEFT BEHIND'}"
        )
    verdict = {True: "ok", False: "MISSED"}
    print(
        f"median RSS {f['median_rss_mb']:.1f} MB (goal < {GOAL_RSS_MB:.0f} MB:"
        f" {verdict[f['rss_ok']]}); median stop {f['median_stop_s'] * 1000:.0f} ms"
        f" (goal < {GOAL_STOP_S * 1000:.0f} ms every run: {verdict[f['stop_ok']]})"
    )
    if "imports" in f:
        imp = f["imports"]
        before, after = imp["before_kb"] / 1024, imp["after_kb"] / 1024
        ranked = sorted(imp["imports_kb"].items(), key=lambda item: -item[1])
        imported = sum(kb for _, kb in ranked) / 1024
        print(
            f"\nimport p2pd.daemon: {before:.1f} MB (the interpreter) -> {after:.1f} MB;"
            " what p2pd's modules import, with all it brings in first:"
        )
        for name, kb in ranked[:top]:
            print(f"  {kb / 1024:6.1f} MB  {name}")
        rest = sum(kb for _, kb in ranked[top:]) / 1024
        print(f"  {rest:6.1f} MB  the other {max(len(ranked) - top, 0)} imports")
        own = after - before - imported
        print(
            f"  {own:6.1f} MB  p2pd's own modules, and the library pages and heap they touch first"
        )


if __name__ == "__main__":
    sys.exit(main())
