#!/usr/bin/env python3
"""Message latency and throughput between real p2pd daemons on 127.0.0.1.

Every figure is taken from outside, the way a user's program sees the daemons: real
``p2pd daemon`` processes (p2pd.testing.daemons.DaemonProcess) in temporary homes, driven
through their control sockets with p2pd.control_client.ControlClient. A message counts as
delivered when the sender's daemon reports ``message_status`` ``delivered`` on an event
stream subscribed before the send (no polling, so no polling delay): the receiver's daemon
has decrypted it, committed it to SQLite and acknowledged it.

What one run does:

1. two daemons, ``alice`` and ``bob`` (bob joins through alice: a two-node DHT, one pair),
   exchange a first message each way and a few more (warm-up, not counted);
2. baseline: the round trip of trivial control calls on alice (``message``: the control
   socket and one SQLite read; ``status``: plus the DHT's statistics) and of
   ``whois bob`` (plus a DHT lookup over UDP), so the figures below can be read against
   what the control socket and a lookup cost on their own;
3. established session: ``--samples`` messages alice -> bob, one at a time, each from the
   ``send`` call until its ``delivered`` event is read: p50/p99, and where the time goes
   (send call; queued -> sent; sent -> delivered; event -> reader, from the daemons' event
   timestamps);
4. throughput: ``--messages`` messages sent as fast as ``send`` returns (each returns
   once the message is durable in SQLite), on ``--connections`` control connections, until
   the last is delivered: msgs/s, and msgs/s in each tenth of the run. CPU per message of
   both daemons from /proc/<pid>/stat (utime + stime, all threads) and context switches
   from /proc/<pid>/task/*/status, before and after (also for phase 3). If the daemon
   drops events for our subscription (it buffers 1,024 per subscriber), the end is found
   by polling ``status`` for an empty outbox instead, and the output says so. Then the
   same again with ``--batch`` messages per ``send`` call (the control API's ``texts``,
   as ``p2pd send --lines`` uses it; each call returns once all its messages are durable):
   the first phase is bounded by one control round trip per message, the second shows
   what the delivery path itself sustains;
5. first contact: ``--first-contact`` fresh recipients join the DHT; alice sends each one
   message, one at a time: resolve, QUIC handshake, X3DH, deliver, ack. p50/p95;
6. Tox beside it (``--tox``, scripts/_tox.py): c-toxcore from Debian's libtoxcore2 on
   127.0.0.1, after p2pd's daemons have stopped: first contact (friend request to
   connected, up to 3 fresh pairs), a round trip of one message at a time (up to 200),
   and a burst of ``--messages`` (Tox's queue is in memory: not durable). Printed beside
   p2pd's rows, not graded.

    .venv/bin/python scripts/bench_messages.py                  # 500 / 5000 / 20 samples
    .venv/bin/python scripts/bench_messages.py --samples 100 --messages 1000 --first-contact 5
    .venv/bin/python scripts/bench_messages.py --json > figures.json
    .venv/bin/python scripts/bench_messages.py --samples 0 --first-contact 0 --profile /tmp/prof

``--profile DIR`` runs both daemons under cProfile (their main thread; the DHT's asyncio
thread is not seen) and prints their top costs and SQLite calls per message; cProfile
slows the daemons severalfold, so the timings of such a run are not the benchmark's.

Goals (per pair, loopback): established p50 < 2 ms and p99 < 10 ms; >= 2,000 msgs/s.
First contact has no goal. Only 127.0.0.1 is used; every loop is bounded in count and
time; the daemons are always stopped and the temporary homes removed. Progress goes to
stderr, figures to stdout at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pstats
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _tox
from _bench import Every10Percent, percentile, progress_printer
from _messages_report import GOALS, print_text

from p2pd.control_client import ControlClient
from p2pd.testing import daemons
from p2pd.testing.daemons import DaemonProcess, run_cli, short_tempdir

#: One message may take this long to be delivered before it counts as lost.
MESSAGE_TIMEOUT = 30.0
#: A daemon may take this long to start, join and publish its record.
READY_TIMEOUT = 120.0
#: Unmeasured alice -> bob messages after the first exchange.
WARMUP = 20
#: Samples of each baseline call, at most.
BASELINE_SAMPLES = 200
#: At most this many fresh recipients (one daemon process each, ~60 MB) run at once.
MAX_FIRST_CONTACT = 50
#: Events read while waiting for one message, at most (a bound on the wait loop).
MAX_EVENTS_PER_MESSAGE = 10_000
#: Tox's rows: messages one at a time (~50 ms each) and fresh pairs (~10 s each), at most.
TOX_SAMPLES = 200
TOX_FIRST_CONTACT = 3
TEXT = "bench message {i:06d}: the quick brown fox jumps over the lazy dog"
CLK_TCK = os.sysconf("SC_CLK_TCK")

progress = progress_printer("bench_messages")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds (from /proc/<pid>/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of all of a process's threads."""
    voluntary = involuntary = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):  # a thread may end while we read
            for line in status.read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
    return voluntary, involuntary


@dataclass
class ProcessMeter:
    """CPU time and context switches of the daemons between :meth:`start` and :meth:`stop`."""

    pids: dict[str, int]
    _cpu: dict[str, float] = field(default_factory=dict)
    _switches: dict[str, tuple[int, int]] = field(default_factory=dict)

    def start(self) -> None:
        for name, pid in self.pids.items():
            self._cpu[name] = cpu_seconds(pid)
            self._switches[name] = context_switches(pid)

    def stop(self, messages: int, seconds: float) -> dict[str, Any]:
        per = max(messages, 1)
        out: dict[str, Any] = {"cpu_ms_per_message": {}, "cpu_utilisation": {}, "switches": {}}
        for name, pid in self.pids.items():
            cpu = cpu_seconds(pid) - self._cpu[name]
            now = context_switches(pid)
            vol, invol = now[0] - self._switches[name][0], now[1] - self._switches[name][1]
            out["cpu_ms_per_message"][name] = round(cpu * 1000 / per, 3)
            out["cpu_utilisation"][name] = round(cpu / seconds, 3) if seconds > 0 else None
            out["switches"][name] = {
                "voluntary_per_message": round(vol / per, 2),
                "involuntary_per_message": round(invol / per, 2),
            }
        return out


def dht_counters(home: Path) -> dict[str, int]:
    with ControlClient(home) as control:
        counters: dict[str, int] = control.call("status")["dht_counters"]
    return counters


def dht_per_message(before: dict[str, int], after: dict[str, int], messages: int) -> dict[str, Any]:
    """The sender's DHT traffic during a phase, per message: shows whether ``send``
    resolved the handle (it reuses a record looked up in the last minute), and soft
    timeouts (a reply later than the adaptive RTO makes lookups skip that node)."""
    per = max(messages, 1)
    return {
        "requests_out_per_message": round(
            (after.get("requests_out", 0) - before.get("requests_out", 0)) / per, 2
        ),
        "soft_timeouts": after.get("soft_timeouts", 0) - before.get("soft_timeouts", 0),
    }


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def summary_ms(values: list[float], pcts: tuple[int, ...]) -> dict[str, Any]:
    s = sorted(values)
    out: dict[str, Any] = {"n": len(s)}
    for p in pcts:
        out[f"p{p}_ms"] = ms(percentile(s, p))
    out["min_ms"] = ms(s[0]) if s else None
    out["max_ms"] = ms(s[-1]) if s else None
    out["mean_ms"] = ms(sum(s) / len(s)) if s else None
    return out


# --------------------------------------------------------------------------- daemons


@dataclass
class Cluster:
    """The temporary root and every daemon started in it (stopped by :meth:`close`)."""

    root: Path
    profile_dir: Path | None = None
    daemons: list[DaemonProcess] = field(default_factory=list)

    def init(self, handle: str) -> Path:
        home = self.root / handle
        proc = run_cli(home, "init", handle, "--no-passphrase")
        if proc.returncode != 0:
            raise RuntimeError(f"p2pd init {handle} failed: {proc.stderr.strip()}")
        return home

    def start(self, home: Path, bootstrap: list[str], *, profiled: bool = False) -> DaemonProcess:
        """Start (not wait for) a daemon listening on 127.0.0.1, port chosen by the OS."""
        with self._command(home.name if profiled else None):
            daemon = DaemonProcess(home, bootstrap=bootstrap)  # a 127.0.N.1 of its own
        self.daemons.append(daemon)
        return daemon

    @contextlib.contextmanager
    def _command(self, profile_name: str | None) -> Iterator[None]:
        """Under --profile: the daemon runs as ``python -m cProfile -o DIR/NAME.prof``.
        DaemonProcess takes no command, so its module's p2pd_command is patched here."""
        if profile_name is None or self.profile_dir is None:
            yield
            return
        out = self.profile_dir / f"{profile_name}.prof"
        command = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "p2pd_cli.main"]
        with mock.patch.object(daemons, "p2pd_command", lambda: command):
            yield

    def stop(self, group: list[DaemonProcess]) -> None:
        """SIGTERM them all at once, then wait for each (SIGKILL after 15 s). One signal
        only: a second one during shutdown could kill a profiled daemon before cProfile
        writes its file."""
        for d in group:
            if d.alive:
                with contextlib.suppress(ProcessLookupError):
                    d.proc.send_signal(signal.SIGTERM)
        for d in group:
            with contextlib.suppress(subprocess.TimeoutExpired):
                d.proc.wait(15)
            code = d.stop()  # kills it if still running
            if code not in (0, -signal.SIGTERM):
                progress(f"daemon {d.handle or d.home.name} exited with {code}:\n{d.log[-2000:]}")
        self.daemons = [d for d in self.daemons if d not in group]

    def close(self) -> None:
        try:
            self.stop(list(self.daemons))
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def handle_of(daemon: DaemonProcess) -> str:
    return daemon.handle.split("#", 1)[0]


# --------------------------------------------------------------------------- one message


@dataclass(frozen=True)
class Sample:
    """One message, from the ``send`` call to its ``delivered`` event being read."""

    total: float  # perf_counter: send call -> delivered event read
    send_call: float  # perf_counter: the send call's round trip
    # wall clock (time.time(), the same clock as the daemon's event timestamps):
    to_queued: float | None  # send call made -> daemon emitted "queued"
    queued_to_sent: float | None  # -> "sent" (encrypted, committed, written to the stream)
    sent_to_delivered: float | None  # -> "delivered" (the ack arrived and was committed)
    delivered_to_read: float | None  # -> this process read the event


def send_and_wait(
    control: ControlClient, events: ControlClient, handle: str, text: str, timeout: float
) -> Sample | None:
    """Send one message and wait for its ``delivered`` event; None if it does not come in
    ``timeout`` seconds. ``events`` must already be subscribed on the sender's daemon."""
    t0_wall = time.time()
    t0 = time.perf_counter()
    message = control.call("send", {"handle": handle, "text": text})
    t_return = time.perf_counter()
    msg_id = message["id"]
    stamps: dict[str, float] = {}
    deadline = t0 + timeout
    for _ in range(MAX_EVENTS_PER_MESSAGE):
        left = deadline - time.perf_counter()
        event = events.next_event(left) if left > 0 else None
        if event is None:
            return None
        if event.get("event") != "message_status" or event.get("id") != msg_id:
            continue
        stamps[str(event.get("state"))] = float(event["time"])
        if event.get("state") == "delivered":
            t1 = time.perf_counter()
            t1_wall = time.time()
            break
    else:
        return None

    def span(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    queued, sent, delivered = stamps.get("queued"), stamps.get("sent"), stamps.get("delivered")
    return Sample(
        total=t1 - t0,
        send_call=t_return - t0,
        to_queued=span(t0_wall, queued),
        queued_to_sent=span(queued, sent),
        sent_to_delivered=span(sent, delivered),
        delivered_to_read=span(delivered, t1_wall),
    )


def breakdown(samples: list[Sample]) -> dict[str, Any]:
    """Medians of each part of a message's way, in ms."""
    out: dict[str, Any] = {}
    for name in ("send_call", "to_queued", "queued_to_sent", "sent_to_delivered"):
        values = sorted(v for s in samples if (v := getattr(s, name)) is not None)
        out[f"{name}_p50_ms"] = ms(percentile(values, 50))
    values = sorted(v for s in samples if (v := s.delivered_to_read) is not None)
    out["delivered_to_read_p50_ms"] = ms(percentile(values, 50))
    return out


def measure_one_at_a_time(
    sender: DaemonProcess,
    recipients: list[str],
    count: int,
    deadline: float,
    label: str,
    first_text: int = 0,
    *,
    quiet: bool = False,
) -> tuple[list[Sample], int]:
    """``count`` messages from ``sender``, one at a time, to ``recipients`` in turn.
    Returns the samples and how many messages were lost (not delivered in time)."""
    samples: list[Sample] = []
    lost = 0
    report = Every10Percent(
        count, lambda done: None if quiet else progress(f"{label}: {done}/{count}")
    )
    with ControlClient(sender.home) as control, ControlClient(sender.home) as events:
        events.subscribe()
        for i in range(count):
            if time.monotonic() > deadline:
                progress(f"{label}: deadline reached after {i} of {count} messages")
                break
            handle = recipients[i % len(recipients)]
            text = TEXT.format(i=first_text + i)
            sample = send_and_wait(control, events, handle, text, MESSAGE_TIMEOUT)
            if sample is None:
                lost += 1
                progress(f"{label}: message {i} to {handle} not delivered in {MESSAGE_TIMEOUT} s")
            else:
                samples.append(sample)
            report(i + 1)
    return samples, lost


# --------------------------------------------------------------------------- baseline


def time_calls(
    home: Path, method: str, params: dict[str, Any], count: int, deadline: float
) -> list[float]:
    times: list[float] = []
    with ControlClient(home) as control:
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            control.call(method, params)
            times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------- throughput


class DeliveryWatcher:
    """A thread reading the sender's event stream: when each ``delivered`` event arrived."""

    def __init__(self, home: Path) -> None:
        self._events = ControlClient(home)
        self._events.subscribe()
        self.delivered: dict[str, float] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="delivery-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                event = self._events.next_event(0.2)
                if event is None:
                    continue
                if event.get("event") == "message_status" and event.get("state") == "delivered":
                    now = time.perf_counter()
                    with self._cond:
                        self.delivered[str(event.get("id"))] = now
                        self._cond.notify_all()
        except BaseException as exc:  # reported by the main thread
            self.error = exc
            with self._cond:
                self._cond.notify_all()

    def wait_for(self, count: int, deadline: float) -> bool:
        """Until ``count`` deliveries were seen or ``deadline`` (monotonic) passes."""
        with self._cond:
            while len(self.delivered) < count and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return len(self.delivered) >= count

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._events.close()


def run_throughput(
    sender: DaemonProcess,
    receiver: DaemonProcess,
    count: int,
    connections: int,
    deadline: float,
    first_text: int,
    batch: int = 1,
) -> dict[str, Any]:
    """``count`` messages as fast as ``send`` calls return, each call carrying ``batch``
    texts (the control API's ``texts``; 1: one call per message, with ``text``)."""
    handle = handle_of(receiver)
    with ControlClient(sender.home) as probe:
        status_before = probe.call("status")
    dropped_before = status_before["messages"]["events_dropped"]
    watcher = DeliveryWatcher(sender.home)
    sent_ids: list[list[str]] = [[] for _ in range(connections)]
    errors: list[BaseException] = []
    sent_count = [0]
    lock = threading.Lock()
    report = Every10Percent(count, lambda done: progress(f"throughput: {done}/{count} sent"))

    def send_share(index: int, share: int) -> None:
        try:
            with ControlClient(sender.home) as control:
                for j in range(0, share, batch):
                    if time.monotonic() > deadline:
                        return
                    texts = [
                        TEXT.format(i=first_text + index * count + k)
                        for k in range(j, min(share, j + batch))
                    ]
                    if batch == 1:
                        ids = [control.call("send", {"handle": handle, "text": texts[0]})["id"]]
                    else:
                        result = control.call("send", {"handle": handle, "texts": texts})
                        ids = [m["id"] for m in result["messages"]]
                    sent_ids[index].extend(ids)
                    with lock:
                        for _ in ids:
                            sent_count[0] += 1
                            report(sent_count[0])
        except BaseException as exc:
            errors.append(exc)

    shares = [count // connections + (i < count % connections) for i in range(connections)]
    try:
        meter = ProcessMeter({"sender": sender.proc.pid, "receiver": receiver.proc.pid})
        meter.start()
        cpu_client = own_cpu_seconds()
        t0 = time.perf_counter()
        threads = [
            threading.Thread(target=send_share, args=(i, n), name=f"sender-{i}", daemon=True)
            for i, n in enumerate(shares)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 5)
        t_sent = time.perf_counter()
        sent = sum(len(ids) for ids in sent_ids)
        progress(f"throughput: {sent} sent in {t_sent - t0:.2f} s; waiting for the acks")
        complete, polled = wait_delivered(sender.home, watcher, sent, dropped_before, deadline)
        t_done = time.perf_counter()
        used = meter.stop(sent if complete else len(watcher.delivered), t_done - t0)
        cpu_client = own_cpu_seconds() - cpu_client
    finally:
        watcher.close()
    if errors:
        raise RuntimeError(f"a sending thread failed: {errors[0]!r}") from errors[0]
    if watcher.error is not None:
        raise RuntimeError(f"the event stream failed: {watcher.error!r}") from watcher.error
    with ControlClient(sender.home) as probe:
        status_after = probe.call("status")
    dropped = status_after["messages"]["events_dropped"] - dropped_before
    all_ids = [i for ids in sent_ids for i in ids]
    missing = [i for i in all_ids if i not in watcher.delivered]
    if missing and not (complete and polled):
        progress(
            f"throughput: {len(missing)} message(s) not seen delivered before the deadline"
            f" ({dropped} event(s) dropped by the daemon)"
        )
    times = sorted(watcher.delivered[i] for i in all_ids if i in watcher.delivered)
    last = times[-1] if times and not polled else t_done
    elapsed = (last if complete else t_done) - t0
    delivered = sent if complete and polled else len(all_ids) - len(missing)
    return {
        "messages": count,
        "sent": sent,
        "delivered": delivered,
        "complete": complete and (polled or not missing),
        "completion_seen_by": "polling status (events were dropped)" if polled else "events",
        "connections": connections,
        "batch": batch,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(delivered / elapsed, 1) if elapsed > 0 else None,
        "msgs_per_s_by_tenth": [] if polled else rates_by_tenth(t0, times),
        "send_calls_seconds": round(t_sent - t0, 3),
        "send_calls_per_s": round(sent / (t_sent - t0), 1) if t_sent > t0 else None,
        "events_dropped": dropped,
        "messages_per_batch": _per_batch(status_before["messages"], status_after["messages"]),
        "sender_dht": dht_per_message(
            status_before["dht_counters"], status_after["dht_counters"], sent
        ),
        "cpu_ms_per_message": {
            **used["cpu_ms_per_message"],
            "bench_client": round(cpu_client * 1000 / max(delivered, 1), 3),
        },
        "cpu_utilisation": {
            **used["cpu_utilisation"],
            "bench_client": round(cpu_client / (t_done - t0), 3) if t_done > t0 else None,
        },
        "switches": used["switches"],
    }


def _per_batch(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """The mean batch the sender wrote on a stream during a phase (its counters)."""
    sent = after.get("sent_direct", 0) - before.get("sent_direct", 0)
    batches = after.get("batches_direct", 0) - before.get("batches_direct", 0)
    return round(sent / batches, 2) if batches else None


def wait_delivered(
    home: Path, watcher: DeliveryWatcher, count: int, dropped_before: int, deadline: float
) -> tuple[bool, bool]:
    """Until ``count`` delivered events were seen, or, if the daemon dropped events for
    our subscription (its buffer holds 1,024), until its outbox has nothing pending
    (polled every 20 ms; drops are looked for every 0.2 s). Returns (complete, completion
    seen by polling)."""
    polled = False
    with ControlClient(home) as probe:
        while time.monotonic() < deadline:
            if not polled:
                if watcher.wait_for(count, min(deadline, time.monotonic() + 0.2)):
                    return True, False
                if watcher.error is not None:
                    return False, False
            messages = probe.call("status")["messages"]
            if messages["events_dropped"] > dropped_before:
                if not polled:
                    progress("throughput: the daemon dropped events; polling its outbox instead")
                polled = True
                if messages["outbox_pending"] == 0:
                    return True, True
                time.sleep(0.02)
    return False, polled


def rates_by_tenth(t0: float, times: list[float]) -> list[float]:
    """Deliveries per second in each tenth of the messages (a slowdown as the database
    grows shows here)."""
    if len(times) < 10:
        return []
    out, start = [], t0
    for k in range(1, 11):
        first, end = len(times) * (k - 1) // 10, len(times) * k // 10
        stop = times[end - 1]
        out.append(round((end - first) / (stop - start), 1) if stop > start else 0.0)
        start = stop
    return out


# --------------------------------------------------------------------------- profile


def profile_report(path: Path, messages: int, top: int = 20) -> dict[str, Any]:
    """Top functions by own time, and SQLite calls, per message, from a cProfile dump."""
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    # Time spent waiting for I/O is not work: leave epoll/select out of the total.
    idle = {k for k in raw if k[0] == "~" and ("epoll" in k[2] or "select" in k[2])}
    total = sum(v[2] for k, v in raw.items() if k not in idle)
    per = max(messages, 1)
    rows = []
    busy = [kv for kv in raw.items() if kv[0] not in idle]
    for (filename, line, name), (_cc, nc, tt, ct, _callers) in sorted(
        busy, key=lambda kv: kv[1][2], reverse=True
    )[:top]:
        where = name if filename == "~" else f"{_short(filename)}:{line}({name})"
        rows.append(
            {
                "function": where,
                "calls_per_message": round(nc / per, 2),
                "own_ms_per_message": round(tt * 1000 / per, 4),
                "cumulative_ms_per_message": round(ct * 1000 / per, 4),
            }
        )
    sqlite = {"commit": 0, "execute": 0, "context_exit": 0}
    for (filename, _line, name), (_cc, nc, *_rest) in raw.items():
        if filename != "~":
            continue
        if "sqlite3.Connection" in name:
            if "'commit'" in name:
                sqlite["commit"] += nc
            elif "'__exit__'" in name:
                sqlite["context_exit"] += nc
            elif "'execute'" in name:
                sqlite["execute"] += nc
        elif "sqlite3.Cursor" in name and "'execute'" in name:
            sqlite["execute"] += nc
    return {
        "file": str(path),
        "messages": messages,
        "busy_ms_per_message": round(total * 1000 / per, 3),
        "sqlite_per_message": {
            "commit_calls": round(sqlite["commit"] / per, 2),
            "with_conn_blocks": round(sqlite["context_exit"] / per, 2),
            "execute_calls": round(sqlite["execute"] / per, 2),
        },
        "top_by_own_time": rows,
    }


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/p2pd/", "/cli/", "/lib/python"):
        if marker in filename:
            return filename[filename.index(marker) :].lstrip("/")
    return filename


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    root = short_tempdir("p2pd-bm-")
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(root, profile_dir)
    result: dict[str, Any] = {
        "config": {
            "samples": args.samples,
            "messages": args.messages,
            "first_contact": args.first_contact,
            "connections": args.connections,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_at_start": list(os.getloadavg()),
            "profiled": profile_dir is not None,
        },
        "goals": GOALS,
    }
    try:
        progress(f"homes under {root}")
        alice_home = cluster.init("alice")
        bob_home = cluster.init("bob")
        fresh_homes = [cluster.init(f"fresh{i:03d}") for i in range(args.first_contact)]

        alice = cluster.start(alice_home, [], profiled=True).wait_ready(READY_TIMEOUT)
        bob = cluster.start(bob_home, [alice.listen], profiled=True).wait_ready(READY_TIMEOUT)
        progress(f"alice at {alice.listen} (pid {alice.proc.pid}), bob at {bob.listen}")

        # Warm-up: bob's first contact (X3DH), bob's answer (alice's side confirms the
        # session: from then on normal envelopes), then a few unmeasured messages.
        deadline = time.monotonic() + 120
        for sender, receiver in ((alice, bob), (bob, alice)):
            _, lost = measure_one_at_a_time(
                sender, [handle_of(receiver)], 1, deadline, "warm-up", quiet=True
            )
            if lost:
                raise RuntimeError(f"{sender.handle} could not reach {receiver.handle}")
        _, lost = measure_one_at_a_time(alice, ["bob"], WARMUP, deadline, "warm-up", 1, quiet=True)
        if lost:
            raise RuntimeError("warm-up messages were lost")
        messages_sent = 1 + WARMUP

        progress("baseline: control calls on alice")
        deadline = time.monotonic() + 120
        n = min(BASELINE_SAMPLES, max(args.samples, 20))
        with ControlClient(alice_home) as c:
            some_id = c.call("outbox", {"limit": 1})[0]["id"]
        dht_before = dht_counters(alice_home)
        baseline = {
            "message": summary_ms(
                time_calls(alice_home, "message", {"id": some_id}, n, deadline), (50, 99)
            ),
            "status": summary_ms(time_calls(alice_home, "status", {}, n, deadline), (50, 99)),
            "whois": summary_ms(
                time_calls(alice_home, "whois", {"handle": "bob"}, n, deadline), (50, 99)
            ),
        }
        baseline["whois"]["sender_dht"] = dht_per_message(
            dht_before, dht_counters(alice_home), baseline["whois"]["n"]
        )
        result["baseline"] = baseline

        if args.samples:
            progress(f"established session: {args.samples} messages, one at a time")
            deadline = time.monotonic() + 60 + args.samples * 1.0
            dht_before = dht_counters(alice_home)
            meter = ProcessMeter({"sender": alice.proc.pid, "receiver": bob.proc.pid})
            meter.start()
            t0 = time.monotonic()
            samples, lost = measure_one_at_a_time(
                alice, ["bob"], args.samples, deadline, "established", 1000
            )
            used = meter.stop(len(samples), time.monotonic() - t0)
            messages_sent += len(samples) + lost
            result["established"] = {
                **summary_ms([s.total for s in samples], (50, 90, 99)),
                "lost": lost,
                "breakdown": breakdown(samples),
                **used,
                "sender_dht": dht_per_message(dht_before, dht_counters(alice_home), len(samples)),
            }

        if args.messages:
            progress(f"throughput: {args.messages} messages on {args.connections} connection(s)")
            deadline = time.monotonic() + 60 + args.messages * 0.1
            result["throughput"] = run_throughput(
                alice, bob, args.messages, args.connections, deadline, 1_000_000
            )
            messages_sent += result["throughput"]["sent"]
            if args.batch > 1:
                progress(f"throughput: {args.messages} messages, {args.batch} per send call")
                deadline = time.monotonic() + 60 + args.messages * 0.1
                result["throughput_batched"] = run_throughput(
                    alice, bob, args.messages, args.connections, deadline, 3_000_000, args.batch
                )
                messages_sent += result["throughput_batched"]["sent"]

        if args.first_contact:
            progress(f"first contact: starting {args.first_contact} fresh recipients")
            fresh = [cluster.start(h, [alice.listen]) for h in fresh_homes]
            for d in fresh:
                d.wait_ready(READY_TIMEOUT)
            time.sleep(2.0)  # let their start-up work (joins, publishes) settle
            handles = [handle_of(d) for d in fresh]
            deadline = time.monotonic() + 60 + args.first_contact * MESSAGE_TIMEOUT
            samples, lost = measure_one_at_a_time(
                alice, handles, len(handles), deadline, "first contact", 2_000_000
            )
            result["first_contact"] = {
                **summary_ms([s.total for s in samples], (50, 95)),
                "lost": lost,
                "breakdown": breakdown(samples),
            }
            cluster.stop(fresh)

        with ControlClient(alice_home) as c:
            alice_status = c.call("status")
        with ControlClient(bob_home) as c:
            bob_status = c.call("status")
        result["counters"] = {"alice": alice_status["messages"], "bob": bob_status["messages"]}
        result["alice_dht"] = {
            "routing_table_size": alice_status["routing_table_size"],
            **alice_status["dht_counters"],
        }
        result["config"]["loadavg_at_end"] = list(os.getloadavg())
        result["seconds"] = round(time.monotonic() - started, 1)
        if profile_dir is not None:
            cluster.stop([alice, bob])  # cProfile writes its file when the daemon exits
            result["profile"] = {
                name: profile_report(profile_dir / f"{name}.prof", messages_sent)
                for name in ("alice", "bob")
                if (profile_dir / f"{name}.prof").exists()
            }
    finally:
        progress("stopping the daemons")
        cluster.close()
    if args.tox != "off":
        result["tox"] = run_tox(args)
        result["seconds"] = round(time.monotonic() - started, 1)
    return result


def run_tox(args: argparse.Namespace) -> dict[str, Any]:
    """c-toxcore's figures in the same run, after p2pd's daemons have stopped (not graded)."""
    lib = _tox.load()
    if lib is None:
        if args.tox == "on":
            raise SystemExit("--tox on: libtoxcore is not installed (apt install libtoxcore2)")
        progress("tox: libtoxcore is not installed (apt install libtoxcore2): skipped")
        return {"skipped": "libtoxcore is not installed (apt install libtoxcore2)"}
    return _tox.run(
        lib,
        samples=min(args.samples, TOX_SAMPLES),
        messages=args.messages,
        first_contact=min(args.first_contact, TOX_FIRST_CONTACT),
        progress=progress,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--samples", type=int, default=500, help="established-session messages (default 500)"
    )
    parser.add_argument(
        "--messages", type=int, default=5000, help="throughput messages (default 5000)"
    )
    parser.add_argument(
        "--first-contact",
        type=int,
        default=20,
        help=f"fresh recipients, one first message each (default 20, at most {MAX_FIRST_CONTACT})",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        help="control connections sending in parallel in the throughput phase (default 1)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=100,
        help="a second throughput phase with this many messages per send call (the control "
        "API's 'texts', as `p2pd send --lines` does); 1 skips it (default 100)",
    )
    parser.add_argument(
        "--tox",
        choices=("auto", "on", "off"),
        default="auto",
        help="c-toxcore (Debian's libtoxcore2, through ctypes) as a peer in the same run, "
        "after p2pd's phases: first contact, round trip, a burst (not graded). auto: where "
        "it is installed (default); on: fail where it is not",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--profile", metavar="DIR", help="run alice and bob under cProfile, dumps in DIR"
    )
    args = parser.parse_args()
    if not 0 <= args.first_contact <= MAX_FIRST_CONTACT:
        parser.error(f"--first-contact must be 0..{MAX_FIRST_CONTACT}")
    if not 0 <= args.samples <= 100_000 or not 0 <= args.messages <= 1_000_000:
        parser.error("--samples must be 0..100000 and --messages 0..1000000")
    if not 1 <= args.connections <= 16:
        parser.error("--connections must be 1..16")
    if not 1 <= args.batch <= 1000:
        parser.error("--batch must be 1..1000")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_text(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
