"""What both sides of scripts/bench_dht.py share: the workload, its plan from the seed,
the result record of one side, and the memory helpers. Kept apart so that the stock
kademlia baseline (``_stock_kademlia.py``) and the p2pd side import the same types."""

from __future__ import annotations

import argparse
import gc
import random
import resource
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from _bench import percentile, progress_printer

from p2pd.identity import Identity

LOCALHOST = "127.0.0.1"
RECORD_LIFETIME = 3600
#: By default setup (start + bootstrap + publish) may take this long plus SETUP_PER_NODE
#: per node (--setup-deadline).
SETUP_BASE = 120.0
SETUP_PER_NODE = 1.0
#: Closing everything at the end may take this long.
TEARDOWN_CAP = 120.0


progress = progress_printer("bench_dht")


def rss_kib() -> int:
    """VmRSS of this process in KiB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    n: int
    churn: float
    seed: int
    concurrency: int
    setup_concurrency: int
    lookup_deadline: float
    setup_deadline: float
    handles: list[str]
    key_seeds: list[bytes]
    bootstrap_from: list[list[int]]
    killed: list[int]
    #: (index of the live node that asks, index of the handle it asks for)
    lookups: list[tuple[int, int]]

    @property
    def alive(self) -> list[int]:
        dead = set(self.killed)
        return [i for i in range(self.n) if i not in dead]


def make_workload(args: argparse.Namespace) -> Workload:
    n = args.nodes
    rng = random.Random(args.seed)
    key_seeds = [rng.randbytes(32) for _ in range(n)]
    bootstrap_from = [sorted({0, rng.randrange(i)}) if i else [] for i in range(n)]
    killed = sorted(rng.sample(range(n), round(n * args.churn)))
    dead = set(killed)
    alive = [i for i in range(n) if i not in dead]
    lookups = []
    for _ in range(args.lookups):
        asker = rng.choice(alive)
        wanted = rng.randrange(n - 1)
        lookups.append((asker, wanted + (wanted >= asker)))
    return Workload(
        n=n,
        churn=args.churn,
        seed=args.seed,
        concurrency=args.concurrency,
        setup_concurrency=args.setup_concurrency,
        lookup_deadline=args.lookup_deadline,
        setup_deadline=(
            args.setup_deadline
            if args.setup_deadline is not None
            else SETUP_BASE + SETUP_PER_NODE * n
        ),
        handles=[f"user{i}" for i in range(n)],
        key_seeds=key_seeds,
        bootstrap_from=bootstrap_from,
        killed=killed,
        lookups=lookups,
    )


def identity_for(w: Workload, i: int) -> Identity:
    return Identity.from_seed(w.handles[i], w.key_seeds[i])


# --------------------------------------------------------------------------- results


@dataclass
class SideResult:
    impl: str
    n: int
    killed: int
    lookups_planned: int
    concurrency: int
    config: str = ""
    lookups_done: int = 0
    successes: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    #: p2pd only: LookupResult.elapsed, the core's own time for the lookup alone
    inner_ms: list[float] = field(default_factory=list)
    rpcs: list[int] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    bootstrap_s: float = 0.0
    publish_s: float = 0.0
    setup_s: float = 0.0
    lookup_s: float = 0.0
    #: This process's CPU time in the lookup phase (all nodes): what the latency of one
    #: lookup at a time is made of, apart from waiting on dead contacts, and less
    #: disturbed than wall time by other work on the machine.
    lookup_cpu_s: float = 0.0
    traced_bytes: int | None = None
    traced_peak_bytes: int | None = None
    rss_start_kib: int = 0
    rss_setup_kib: int = 0
    rss_end_kib: int = 0
    publish_failed: int = 0
    copies_per_handle: float = 0.0
    routing_table_mean: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)
    #: p2pd only: the survivors' whole-network RTT estimate and the soft timeout it gives
    #: a contact never measured (medians and p95 over nodes), after the lookups
    rtt_ms: dict[str, float | None] = field(default_factory=dict)
    incomplete: str = ""
    nodes_joined: int = 0
    published: int = 0
    #: False when an earlier pass ran in this process: freed memory is reused, so the RSS
    #: growth of this pass understates what its nodes take
    rss_first: bool = True

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        inner = sorted(self.inner_ms)
        done = self.lookups_done
        out: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("latencies_ms", "inner_ms", "rpcs", "failures")
        }
        out.update(
            success_pct=100.0 * self.successes / done if done else None,
            p50_ms=percentile(lat, 50),
            p95_ms=percentile(lat, 95),
            p99_ms=percentile(lat, 99),
            max_ms=lat[-1] if lat else None,
            mean_ms=sum(lat) / len(lat) if lat else None,
            inner_p50_ms=percentile(inner, 50),
            inner_p99_ms=percentile(inner, 99),
            rpcs_per_lookup=sum(self.rpcs) / len(self.rpcs) if self.rpcs else None,
            rpcs_max=max(self.rpcs) if self.rpcs else None,
            kib_per_node=(
                self.traced_bytes / 1024 / self.n if self.traced_bytes is not None else None
            ),
            rss_delta_kib_per_node=(
                (self.rss_setup_kib - self.rss_start_kib) / self.n if self.rss_setup_kib else None
            ),
            failures=dict(self.failures),
        )
        return out


def setup_deadline_note(w: Workload, result: SideResult) -> str:
    return (
        f"setup deadline ({w.setup_deadline:.0f} s) passed with "
        f"{result.nodes_joined}/{result.n} nodes joined, {result.published}/{result.n} "
        "published; no lookups run"
    )


def start_tracing(enabled: bool) -> None:
    gc.collect()
    if enabled:
        tracemalloc.start()


def stop_tracing(result: SideResult) -> None:
    """Read traced memory after setup, then stop tracing so lookups run at full speed."""
    gc.collect()
    if tracemalloc.is_tracing():
        result.traced_bytes, result.traced_peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    result.rss_setup_kib = rss_kib()


def report_lookups(result: SideResult, done: int) -> None:
    lat = sorted(result.latencies_ms)
    progress(
        f"{result.impl}: lookups {done}/{result.lookups_planned}, "
        f"{result.successes} ok, p50 {percentile(lat, 50) or 0:.1f} ms, "
        f"max {lat[-1] if lat else 0:.0f} ms"
    )
