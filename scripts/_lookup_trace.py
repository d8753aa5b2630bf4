"""Where one resolve's wall time goes: bench_dht.py ``--breakdown``.

Wraps one asking node's core for the length of one resolve (lookups run one at a time)
and notes, on trio's clock: each lookup it starts (the resolve's rounds, a size sample),
when each disjoint path of each round ended, every RPC's fate (answered, given up on at
its soft deadline, timed out), and the process's CPU time. Nothing here changes what
the DHT does: the wrappers call through and only read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from _bench import percentile

from p2pd.dht import core as core_module
from p2pd.dht.disjoint import DisjointLookup
from p2pd.dht.result import LookupResult
from p2pd.records import claimed_key


@dataclass
class LookupTrace:
    kind: str  # "round1", "round2", "round3", "sample", "node"
    started: float
    ended: float | None = None
    #: When each disjoint path ended, from the lookup's start.
    paths: list[float] = field(default_factory=list)
    rpcs: int = 0
    soft_timeouts: int = 0
    #: Seconds from the lookup's start to its last request sent (ask-nothing-more point).
    last_sent: float = 0.0
    #: Seconds the lookup had requests in flight that were all past their soft
    #: deadline or waiting on one: from each soft timeout back to its request's send.
    slow_waits: list[float] = field(default_factory=list)
    early_end: bool = False
    #: Round 1 only: nodes the density rule set aside, distinct keys claimed, voters.
    packed: int = 0
    claims: int = 0
    voters: int = 0
    #: (seconds from start, path index, event, node id prefix, RTO given) for a dump.
    events: list[tuple[float, int, str, str, float]] = field(default_factory=list)


@dataclass
class ResolveTrace:
    started: float
    cpu_started: float
    ended: float = 0.0
    cpu: float = 0.0
    #: Seconds blocked in trio's I/O wait (IdleClock) during the resolve.
    idle: float = 0.0
    idle_started: float = 0.0
    lookups: list[LookupTrace] = field(default_factory=list)
    rounds: int = 0
    #: Round 1's end to the resolve going on (a size sample waited for), seconds.
    sample_wait: float = 0.0


class IdleClock(trio.abc.Instrument):
    """Seconds trio spent blocked in its I/O wait: with every node in this one process
    on loopback, a datagram sent is readable at once, so a blocked wait is a wait for a
    timer (a soft deadline, a hard timeout), not for the network or the CPU."""

    def __init__(self) -> None:
        self.idle = 0.0
        self._since: float | None = None

    def before_io_wait(self, timeout: float) -> None:
        self._since = time.perf_counter() if timeout > 0 else None

    def after_io_wait(self, timeout: float) -> None:
        if self._since is not None:
            self.idle += time.perf_counter() - self._since
            self._since = None


CLOCK = IdleClock()


class _Traced(DisjointLookup):
    """A DisjointLookup that tells its trace when each path ends and what its RPCs did."""

    trace: LookupTrace | None = None
    _sent_at: dict[bytes, float]

    def next_requests(self, now: float) -> list[Any]:
        out = super().next_requests(now)
        trace = self.trace
        if trace is not None:
            t = trio.current_time() - trace.started
            if out:
                trace.last_sent = t
                trace.rpcs += len(out)
                for node in out:
                    self._sent_at[node.id] = t
                    trace.events.append((t, self._path_of(node.id), "sent", node.id.hex()[:6], 0.0))
            while len(trace.paths) < sum(p.done for p in self.paths):
                trace.paths.append(t)
                trace.events.append((t, -1, "path done", "", 0.0))
        return out

    def slow(self, node_id: bytes) -> bool:
        changed = super().slow(node_id)
        trace = self.trace
        if changed and trace is not None:
            trace.soft_timeouts += 1
            t = trio.current_time() - trace.started
            trace.slow_waits.append(t - self._sent_at.get(node_id, t))
            trace.events.append((t, self._path_of(node_id), "slow", node_id.hex()[:6], 0.0))
        return changed

    def _finish(self, now: float) -> None:
        super()._finish(now)
        trace = self.trace
        limit = self._limit
        if trace is None or not self.result.packed or limit is None:
            return
        scale = getattr(limit, "scale", None)
        if not scale:
            return
        target = int.from_bytes(self.target, "big")
        known = sorted(
            {n.id: n for p in self.paths for n, _ in p.known()}.values(),
            key=lambda n: n.long_id ^ target,
        )
        for node_id in self.result.packed:
            rank = next(i for i, n in enumerate(known) if n.id == node_id)
            lam = (known[rank].long_id ^ target) / scale
            trace.events.append(
                (
                    0.0,
                    -1,
                    f"packed rank {rank} lam {lam:.3f} size {2**160 / scale:.0f}",
                    node_id.hex()[:6],
                    0.0,
                )
            )

    def late(self, node_id: bytes) -> bool:
        changed = super().late(node_id)
        trace = self.trace
        if changed and trace is not None:
            t = trio.current_time() - trace.started
            trace.events.append((t, self._path_of(node_id), "late", node_id.hex()[:6], 0.0))
        return changed

    def replied(self, node_id: bytes, reply: Any) -> bool:
        trace = self.trace
        if trace is not None:
            t = trio.current_time() - trace.started
            value = getattr(reply, "value", None) is not None
            trace.events.append(
                (t, self._path_of(node_id), "value" if value else "reply", node_id.hex()[:6], 0.0)
            )
        return super().replied(node_id, reply)

    def failed(self, node_id: bytes) -> None:
        trace = self.trace
        if trace is not None:
            t = trio.current_time() - trace.started
            trace.events.append((t, self._path_of(node_id), "failed", node_id.hex()[:6], 0.0))
        super().failed(node_id)

    def _path_of(self, node_id: bytes) -> int:
        path = self._owner.get(node_id)
        return -1 if path is None else self.paths.index(path)


class ResolveTracer:
    """Install on one core for one resolve; ``finish()`` returns the trace."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.trace = ResolveTrace(trio.current_time(), time.process_time())
        self.trace.idle_started = CLOCK.idle
        self._original = core.start_lookup
        self._value_lookups = 0
        setattr(core_module, "DisjointLookup", self._make_lookup)  # noqa: B010
        core.start_lookup = self._start_lookup
        self._pending_kind: str | None = None
        self._round1_end: float | None = None

    def _make_lookup(self, *args: Any, **kwargs: Any) -> DisjointLookup:
        lookup = _Traced(*args, **kwargs)
        lookup._sent_at = {}
        kind = self._pending_kind
        if kind is not None:
            trace = LookupTrace(kind, trio.current_time())
            self.trace.lookups.append(trace)
            lookup.trace = trace
        return lookup

    def _start_lookup(
        self, target: bytes, now: float, on_done: Callable[[LookupResult], None], **kw: Any
    ) -> None:
        if kw.get("sample"):
            kind = "sample"
        elif kw.get("find_value"):
            self._value_lookups += 1
            kind = f"round{self._value_lookups}"
        else:
            kind = "node"
        box: list[LookupTrace] = []

        def done(result: LookupResult) -> None:
            if box:
                box[0].ended = trio.current_time() - box[0].started
                box[0].packed = len(result.packed)
                box[0].claims = len({claimed_key(v) for _, v in result.values})
                box[0].voters = len(result.voters)
                if kind == "round1":
                    self._round1_end = trio.current_time()
            on_done(result)

        self._pending_kind = kind
        before = len(self.trace.lookups)
        self._original(target, now, done, **kw)
        self._pending_kind = None
        if len(self.trace.lookups) > before:
            box.append(self.trace.lookups[before])

    def finish(self, result: LookupResult | None) -> ResolveTrace:
        setattr(core_module, "DisjointLookup", DisjointLookup)  # noqa: B010
        del self.core.start_lookup
        trace = self.trace
        trace.ended = trio.current_time() - trace.started
        trace.cpu = time.process_time() - trace.cpu_started
        trace.idle = CLOCK.idle - trace.idle_started
        trace.rounds = result.rounds if result is not None else 0
        rounds = [x for x in trace.lookups if x.kind.startswith("round")]
        if len(rounds) >= 2 and rounds[0].ended is not None:
            # From round 1's end to round 2's start: the wait for a size sample.
            gap = rounds[1].started - (rounds[0].started + rounds[0].ended)
            trace.sample_wait = max(0.0, gap)
        return trace


def summarize(traces: list[ResolveTrace], label: str) -> list[str]:
    """p50 (and p90) of each phase over the resolves traced."""

    def p(values: list[float], q: float) -> str:
        v = percentile(sorted(values), q)
        return "n/a" if v is None else f"{v * 1000:.1f}"

    def row(name: str, values: list[float]) -> str:
        return f"  {name:<46} p50 {p(values, 50):>7} ms  p90 {p(values, 90):>7} ms"

    n = len(traces)
    lines = [f"breakdown {label}: {n} resolves"]
    lines.append(row("resolve, wall", [t.ended for t in traces]))
    lines.append(row("resolve, process CPU", [t.cpu for t in traces]))
    lines.append(row("resolve, wall - CPU", [t.ended - t.cpu for t in traces]))
    lines.append(row("resolve, trio idle (timer waits)", [t.idle for t in traces]))
    r1 = [x for t in traces for x in t.lookups if x.kind == "round1" and x.ended is not None]
    lines.append(row("round 1 lookup", [x.ended for x in r1]))  # type: ignore[misc]
    fast = [x.paths[0] for x in r1 if len(x.paths) >= 2]
    slowest = [x.paths[-1] for x in r1 if len(x.paths) >= 2]
    if fast:
        lines.append(row("round 1, first path ended", fast))
        lines.append(row("round 1, last path ended", slowest))
        lines.append(
            row("round 1, path imbalance", [b - a for a, b in zip(fast, slowest, strict=True)])
        )
    lines.append(row("round 1, last request sent", [x.last_sent for x in r1]))
    lines.append(
        row(
            "round 1, last request -> end",
            [x.ended - x.last_sent for x in r1],  # type: ignore[operator]
        )
    )
    soft = [x.soft_timeouts for x in r1]
    rpcs = [x.rpcs for x in r1]
    lines.append(
        f"  round 1: RPCs p50 {percentile(sorted(rpcs), 50)}, soft timeouts mean "
        f"{sum(soft) / max(1, len(soft)):.2f} (lookups with one: {sum(1 for s in soft if s)}/"
        f"{len(soft)}), soft wait p50 {p([w for x in r1 for w in x.slow_waits], 50)} ms"
    )
    later = [t for t in traces if t.rounds >= 2]
    for t in later:
        first = next(x for x in t.lookups if x.kind == "round1")
        lines.append(
            f"    round 2 after a round 1 with {first.packed} set aside, {first.claims} "
            f"keys claimed, {first.voters} voters"
        )
    lines.append(
        f"  resolves with a round 2: {len(later)}/{n}; round 3: "
        f"{sum(1 for t in traces if t.rounds >= 3)}/{n}"
    )
    r2 = [x for t in traces for x in t.lookups if x.kind == "round2" and x.ended is not None]
    if r2:
        lines.append(row("round 2 lookup", [x.ended for x in r2]))  # type: ignore[misc]
        lines.append(
            row("round 1 end -> round 2 (size sample wait)", [t.sample_wait for t in later])
        )
    samples = [x for t in traces for x in t.lookups if x.kind == "sample"]
    lines.append(f"  size samples started during a resolve: {len(samples)}")
    return lines
