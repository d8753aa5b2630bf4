#!/usr/bin/env python3
"""The DHT at network scale: thousands of p2pd nodes on a simulated network, in virtual time.

Every node is the daemon's own DHT (``create_dht``: the sans-I/O core and its trio
driver) on a :class:`~p2pd.testing.fakenet.FakeNetwork` endpoint, all in one trio run under
``MockClock(autojump_threshold=0)``: when every task waits, the clock jumps to the next
deadline, so hours of virtual time cost only the CPU the nodes spend. Nothing touches a
real socket.

What one run does (``--seed`` fixes the whole plan):

1. N nodes join one after another, each through node 0 and one random earlier node;
2. every node publishes its handle ``user<i>`` (a signed record, k = 20 copies);
3. lookup phase: ``--lookups`` resolutions from random live nodes of random handles
   (never their own; handles of nodes that have left count: the record lives on its
   replicas), while ``--churn`` of the N nodes leave (silently: no goodbye) and as many
   new nodes join and publish, spread evenly over the phase;
4. baseline, same run: the same lookups again, each from the same asker, with stock
   kademlia's lookup logic (its ``ValueSpiderCrawl``: rounds of alpha requests that
   wait for every reply, a fixed 5 s timeout, the first value found wins) driven on
   the same nodes' routing tables over the same network. The library's own classes run
   only on asyncio, so the logic is ported here faithfully (see ``StockCrawl``);
5. an idle window of virtual time (``--idle-window``, an hour by default; a shorter one
   has that share of the owners republish, as each does once an hour; maintenance runs): bytes sent
   per node per second;
6. ``--mailbox-puts`` sealed entries to random owners' mailboxes: entries held per node.

Printed: lookup success, hops, virtual latency p50/p95/p99, RPCs per lookup; publish
latency; maintenance bytes per node per second; memory per node (RSS growth over the
setup / N); records and mailbox entries held per node (max / mean); wall time per phase.
The goals of issue 10 are graded only on the workload they name (N = 10,000, median RTT
50 ms, 1 % loss, 20 % churn); any other run prints "not graded".

    .venv/bin/python scripts/sim_dht.py                   # the graded workload
    .venv/bin/python scripts/sim_dht.py -n 1000 --lookups 500
    .venv/bin/python scripts/sim_dht.py -n 100000 --lookups 2000 --no-baseline
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio
import trio.testing
from _bench import Every10Percent, percentile, progress_printer, trio_pool

from p2pd import wire
from p2pd.config import DHTConfig
from p2pd.dht import DHT, DHTCore
from p2pd.dht.routing import Node
from p2pd.errors import Contested, NotFound
from p2pd.identity import HandleRef
from p2pd.records import HandleRecord, dht_key
from p2pd.testing.adversary import Behaviour, open_coalition
from p2pd.testing.fakenet import FakeNetwork
from p2pd.testing.swarm import Swarm, SwarmNode

PORT = 4747
RECORD_LIFETIME = 24 * 3600
#: stock kademlia (rpcudp) waits this long for any reply
STOCK_TIMEOUT = 5.0
#: Virtual seconds after which a lookup (or a churn join) counts as stuck: far beyond any
#: deadline the protocol has (10 s per lookup), so that a bug shows as a count, not a hang.
STEP_CAP = 300.0
GOAL_WORKLOAD = {
    "n": 10_000,
    "median_rtt": 0.050,
    "loss": 0.01,
    "churn": 0.2,
    "idle_window": 3600.0,
    "hostile": 0.0,
}

progress = progress_printer("sim_dht")


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@dataclass
class Figures:
    latencies: list[float] = field(default_factory=list)  # virtual seconds, every lookup
    hops: list[int] = field(default_factory=list)
    rpcs: list[int] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        done = sum(self.outcomes.values())
        return {
            "lookups": done,
            "success": self.outcomes["ok"] / done if done else None,
            "outcomes": dict(self.outcomes),
            "p50_ms": percentile(lat, 50) * 1000 if lat else None,
            "p95_ms": percentile(lat, 95) * 1000 if lat else None,
            "p99_ms": percentile(lat, 99) * 1000 if lat else None,
            "hops_mean": sum(self.hops) / len(self.hops) if self.hops else None,
            "hops_max": max(self.hops) if self.hops else None,
            "rpcs_mean": sum(self.rpcs) / len(self.rpcs) if self.rpcs else None,
        }


class Sim:
    """A :class:`~p2pd.testing.swarm.Swarm` on the simulated network, plus the plan."""

    def __init__(self, swarm: Swarm, seed: int) -> None:
        self.swarm = swarm
        self.rng = random.Random(seed)
        #: node index -> the record its owner published last
        self.records: dict[int, HandleRecord] = {}

    @property
    def nodes(self) -> list[SwarmNode]:
        return self.swarm.nodes

    def live(self) -> list[SwarmNode]:
        return [n for n in self.swarm.nodes if n.alive]

    async def add(self) -> SwarmNode:
        """A new node joins through node 0 and one random earlier live node."""
        return await self.swarm.add(bootstrap=1)

    async def leave(self, node: SwarmNode) -> None:
        """The node goes silent: no goodbye, its host leaves the network."""
        await self.swarm.stop(node.index)

    async def publish(self, node: SwarmNode) -> float:
        started = trio.current_time()
        self.records[node.index] = await self.swarm.publish(node.index, lifetime=RECORD_LIFETIME)
        return trio.current_time() - started


# ---------------------------------------------------------------------- stock baseline


class StockCrawl:
    """Stock kademlia's ``ValueSpiderCrawl`` (kademlia 2.2.3, crawling.py), as a state
    machine on our core's requests, so that it runs on the same network and tables.

    Per round it asks the alpha nearest uncontacted nodes (all uncontacted ones when the
    nearest list did not change since the last round) and waits for *every* reply, each
    up to the fixed 5 s RPC timeout; non-responders are dropped; it stops at the first
    round that returned any value (the most common one wins) or when all of the k
    nearest were contacted. Its store of the value at the nearest node without it is
    left out (it does not change the lookup's outcome or latency).
    """

    def __init__(self, core: DHTCore, target: bytes, on_done: Callable[[Any], None]) -> None:
        self.core = core
        self.target = target
        self.long = int.from_bytes(target, "big")
        self.k = core.config.ksize
        self.alpha = core.config.alpha
        self.on_done = on_done
        self.known: dict[bytes, Node] = {}
        self.contacted: set[bytes] = set()
        self.dropped: set[bytes] = set()
        self.last_ids: list[bytes] = []
        self.waiting = 0
        self.round_values: list[bytes] = []
        self.round_nodes: list[Node] = []
        self.rpcs = 0
        self.rounds = 0
        for node in core.table.closest(target, self.k):
            self.known[node.id] = node

    def nearest(self) -> list[Node]:
        live = (n for i, n in self.known.items() if i not in self.dropped)
        return sorted(live, key=lambda n: n.long_id ^ self.long)[: self.k]

    def start(self, now: float) -> None:
        nearest = self.nearest()
        ids = [n.id for n in nearest]
        count = len(nearest) if ids == self.last_ids else self.alpha
        self.last_ids = ids
        ask = [n for n in nearest if n.id not in self.contacted][:count]
        if not ask:
            self.on_done((None, self.rpcs, self.rounds))
            return
        self.rounds += 1
        self.waiting = len(ask)
        self.round_values = []
        for node in ask:
            self.contacted.add(node.id)
            self.rpcs += 1
            self.core.request(node, "find_value", [self.target], now, self, timeout=STOCK_TIMEOUT)

    def rpc_done(self, node: Node, result: Any, now: float) -> None:
        if result is None or not isinstance(result, wire.FindValueReply):
            self.dropped.add(node.id)
        elif result.value is not None:
            self.round_values.append(result.value)
        else:
            for contact in result.contacts:
                if contact.node_id != self.core.node_id:
                    self.known.setdefault(
                        contact.node_id,
                        Node(
                            contact.node_id,
                            contact.address.host,
                            contact.address.port,
                            contact.node_key,
                        ),
                    )
        self.waiting -= 1
        if self.waiting:
            return
        if self.round_values:
            value = Counter(self.round_values).most_common(1)[0][0]
            self.on_done((value, self.rpcs, self.rounds))
            return
        if all(n.id in self.contacted for n in self.nearest()):
            self.on_done((None, self.rpcs, self.rounds))
            return
        self.start(now)

    def rpc_slow(self, node: Node, now: float) -> None:
        pass  # stock kademlia has no soft timeout


async def stock_resolve(dht: DHT, key: bytes) -> tuple[bytes | None, int, int]:
    """Run a StockCrawl with the stock library's fixed 5 s timeout on ``dht``'s core."""
    done = trio.Event()
    box: list[Any] = []

    def finish(value: Any) -> None:
        box.append(value)
        done.set()

    StockCrawl(dht.core, key, finish).start(trio.current_time())
    dht.flush()
    await done.wait()
    return box[0]  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- phases


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"workload": vars(args).copy(), "wall_s": {}}
    net = FakeNetwork(seed=args.seed, median_rtt=args.median_rtt, loss=args.loss)
    rss_before = rss_kib()
    wall0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        swarm = Swarm(nursery, parse_config(args.config), None, net, args.seed)
        sim = Sim(swarm, args.seed)
        rng = sim.rng

        # -- 1. join
        started = time.perf_counter()
        tick = Every10Percent(args.n, lambda d: progress(f"join {d}/{args.n}"))
        for i in range(args.n):
            await sim.add()
            tick(i + 1)
        out["wall_s"]["join"] = time.perf_counter() - started

        # -- 1b. the hostile nodes (issue 11's adversary harness): online before the
        # handles are claimed, honest until the lookups, then liars, eclipsers and black
        # holes for every handle
        stack = AsyncExitStack()
        coalition = None
        if args.hostile:
            count = int(args.n * args.hostile)
            coalition = await stack.enter_async_context(
                open_coalition(swarm, count, seed=args.seed)
            )
            progress(f"{count} hostile nodes joined")

        # -- 2. publish
        started = time.perf_counter()
        publish_times: list[float] = []
        tick = Every10Percent(args.n, lambda d: progress(f"publish {d}/{args.n}"))

        async def publish(i: int) -> None:
            publish_times.append(await sim.publish(sim.nodes[i]))
            tick(len(publish_times))

        await trio_pool(args.n, args.width, publish)
        out["wall_s"]["publish"] = time.perf_counter() - started
        publish_times.sort()
        out["publish_p50_ms"] = percentile(publish_times, 50) * 1000
        out["publish_p95_ms"] = percentile(publish_times, 95) * 1000
        gc.collect()
        out["rss_per_node_kib"] = (rss_kib() - rss_before) / args.n
        stored = [len(n.dht.core.storage) for n in sim.live()]
        out["records_per_node"] = {"max": max(stored), "mean": sum(stored) / len(stored)}
        out["routing_table_mean"] = sum(len(n.dht.core.table) for n in sim.live()) / args.n
        progress(
            f"setup done: {out['records_per_node']['mean']:.1f} records/node (max "
            f"{out['records_per_node']['max']}), {out['routing_table_mean']:.0f} contacts/node"
        )

        if coalition is not None:
            for record in sim.records.values():
                coalition.add_rival(record.handle, swarm.wall())
            coalition.behaviours = Behaviour.LIAR | Behaviour.ECLIPSE | Behaviour.BLACKHOLE

        # -- 3. lookups under churn
        churn_events = int(args.n * args.churn)
        plan: list[tuple[int, int]] = []
        figures = Figures()
        stock = Figures()
        started = time.perf_counter()
        churned = 0
        busy: Counter[int] = Counter()  # askers with a lookup running: they do not leave
        out["stuck"] = Counter()
        tick = Every10Percent(args.lookups, lambda d: progress(f"lookups {d}/{args.lookups}"))

        churn_lock = trio.Lock()

        async def churn_to(done_lookups: int) -> None:
            async with churn_lock:  # one join at a time: node indexes (handles) stay unique
                await _churn_to(done_lookups)

        async def _churn_to(done_lookups: int) -> None:
            nonlocal churned
            goal = churn_events * done_lookups // max(args.lookups, 1)
            while churned < goal:
                churned += 1
                # a node that is asking something right now stays until it has its answer
                idle = [n for n in sim.live()[1:] if not busy[n.index]]
                await sim.leave(rng.choice(idle))
                with trio.move_on_after(STEP_CAP) as cap:
                    await sim.publish(await sim.add())
                if cap.cancelled_caught:
                    out["stuck"]["churn join"] += 1

        async def lookup(j: int) -> None:
            await churn_to(j)
            live = sim.live()
            asker = rng.choice(live)
            busy[asker.index] += 1
            wanted = rng.choice([i for i in sim.records if i != asker.index] or [asker.index])
            plan.append((asker.index, wanted))
            record = sim.records[wanted]
            began = trio.current_time()
            outcome = "ok"
            with trio.move_on_after(STEP_CAP) as cap:
                try:
                    found, details = await asker.dht.resolve_with_details(HandleRef(record.handle))
                except NotFound:
                    outcome = "not-found"
                except Contested:
                    outcome = "contested"
                else:
                    figures.hops.append(details.hops)
                    figures.rpcs.append(details.rpcs)
                    if found.public_key != record.public_key:
                        outcome = "wrong-key"
            if cap.cancelled_caught:
                outcome = "stuck"
            figures.latencies.append(trio.current_time() - began)
            figures.outcomes[outcome] += 1
            if args.baseline and asker.alive:
                began = trio.current_time()
                value, rpcs, rounds = None, 0, 0
                with trio.move_on_after(STEP_CAP) as cap:
                    value, rpcs, rounds = await stock_resolve(asker.dht, dht_key(record.handle))
                stock.latencies.append(trio.current_time() - began)
                if cap.cancelled_caught:
                    stock.outcomes["stuck"] += 1
                elif value is None:
                    stock.outcomes["not-found"] += 1
                else:
                    right = HandleRecord.decode(value).public_key == record.public_key
                    stock.outcomes["ok" if right else "wrong-key"] += 1
                stock.rpcs.append(rpcs)
                stock.hops.append(rounds)
            busy[asker.index] -= 1
            tick(len(figures.latencies))

        virtual = trio.current_time()
        await trio_pool(args.lookups, args.concurrency, lookup)
        await churn_to(args.lookups)
        out["wall_s"]["lookups"] = time.perf_counter() - started
        out["lookup_virtual_s"] = trio.current_time() - virtual
        out["churned"] = churned
        out["p2pd"] = figures.summary()
        if args.baseline:
            out["stock"] = stock.summary()

        progress(
            f"lookups done: {out['p2pd']['success'] * 100:.2f} % ok, p50 "
            f"{out['p2pd']['p50_ms']:.0f} ms, p99 {out['p2pd']['p99_ms']:.0f} ms"
        )

        # -- 5. an idle window: owners republish once an hour (a window's share of them
        # here, at random times within it) and maintenance runs as it comes. Graded only
        # over a whole hour: a shorter window may miss the hourly replication round.
        started = time.perf_counter()
        live = sim.live()
        window = args.idle_window
        before = sum(n.dht.core.stats["bytes_out"] for n in live)
        window_end = trio.current_time() + window
        share = [i for i in range(len(live)) if rng.random() < window / 3600]

        async def republish(j: int) -> None:
            await trio.sleep(rng.random() * window * 0.9)
            node = live[share[j]]
            if node.alive:
                with trio.move_on_after(STEP_CAP) as cap:
                    await sim.publish(node)
                if cap.cancelled_caught:
                    out["stuck"]["republish"] += 1

        await trio_pool(len(share), max(len(share), 1), republish)
        await trio.sleep_until(window_end)
        after = sum(n.dht.core.stats["bytes_out"] for n in live if n.alive)
        out["maintenance_bytes_per_node_s"] = (after - before) / len(live) / window
        out["idle_republishes"] = len(share)
        out["wall_s"]["idle_window"] = time.perf_counter() - started
        progress(f"idle window done: {out['maintenance_bytes_per_node_s']:.0f} B/s per node")

        # -- 6. mailboxes
        started = time.perf_counter()
        copies: list[int] = []

        async def put(j: int) -> None:
            live = sim.live()
            sender, owner = rng.choice(live), rng.choice(live)
            copies.append(
                await sender.dht.mailbox_put(owner.identity.public_key, rng.randbytes(800))
            )

        await trio_pool(args.mailbox_puts, args.width, put)
        held = [n.dht.core.mailboxes.count() if n.dht.core.mailboxes else 0 for n in sim.live()]
        out["mailbox"] = {
            "puts": args.mailbox_puts,
            "copies_mean": sum(copies) / len(copies) if copies else None,
            "held_max": max(held),
            "held_mean": sum(held) / len(held),
        }
        out["wall_s"]["mailbox"] = time.perf_counter() - started
        out["network"] = dict(net.stats)
        await stack.aclose()
        nursery.cancel_scope.cancel()
    out["wall_s"]["total"] = time.perf_counter() - wall0
    return out


def parse_config(items: list[str]) -> DHTConfig:
    """``--config alpha=6 --config value_quorum=5``: DHTConfig fields, for ablations."""
    values: dict[str, Any] = {}
    names = {f.name: f for f in dataclasses.fields(DHTConfig)}
    for item in items:
        name, _, text = item.partition("=")
        if name not in names or not text:
            raise SystemExit(f"sim_dht: --config {item!r}: not a DHTConfig field=value")
        default = getattr(DHTConfig(), name)
        if isinstance(default, bool):  # bool("false") is True
            if text.lower() not in ("true", "false", "1", "0", "on", "off"):
                raise SystemExit(f"sim_dht: --config {item!r}: expected true or false")
            values[name] = text.lower() in ("true", "1", "on")
        else:
            values[name] = type(default)(text)
    return DHTConfig(**values)


def graded(args: argparse.Namespace) -> bool:
    return not args.config and all(getattr(args, k) == v for k, v in GOAL_WORKLOAD.items())


def verdicts(r: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    p = r["p2pd"]
    rtt_ms = args.median_rtt * 1000
    return [
        ("lookup success >= 99.9 %", f"{p['success'] * 100:.2f} %", p["success"] >= 0.999),
        (
            f"lookup p50 <= 3 x median RTT ({3 * rtt_ms:.0f} ms)",
            f"{p['p50_ms']:.0f} ms",
            p["p50_ms"] <= 3 * rtt_ms,
        ),
        ("lookup p99 < 1 s", f"{p['p99_ms']:.0f} ms", p["p99_ms"] < 1000),
        ("publish p50 < 1 s", f"{r['publish_p50_ms']:.0f} ms", r["publish_p50_ms"] < 1000),
        (
            "maintenance < 1 KB/s per node",
            f"{r['maintenance_bytes_per_node_s']:.0f} B/s",
            r["maintenance_bytes_per_node_s"] < 1000,
        ),
        (
            "busiest node stores <= 2 x mean",
            f"{r['records_per_node']['max']} vs mean {r['records_per_node']['mean']:.1f}",
            r["records_per_node"]["max"] <= 2 * r["records_per_node"]["mean"],
        ),
    ]


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    w = r["workload"]
    print(
        f"\nsim_dht: N={w['n']}, median RTT {w['median_rtt'] * 1000:.0f} ms, "
        f"loss {w['loss'] * 100:.1f} %, churn {w['churn'] * 100:.0f} % "
        f"({r['churned']} left, as many joined), {w['lookups']} lookups, seed {w['seed']}"
    )
    print(f"{'':24}{'success':>10}{'p50':>9}{'p95':>9}{'p99':>9}{'hops':>7}{'RPCs':>7}")
    for name in ("p2pd", "stock"):
        s = r.get(name)
        if s is None:
            continue
        label = name if name == "p2pd" else "stock kademlia logic"
        print(
            f"{label:24}{s['success'] * 100:>9.2f}%{s['p50_ms']:>7.0f}ms{s['p95_ms']:>7.0f}ms"
            f"{s['p99_ms']:>7.0f}ms{s['hops_mean']:>7.1f}{s['rpcs_mean']:>7.1f}"
            + ("" if s["success"] == 1 else f"   {s['outcomes']}")
        )
    print("(stock: hops = rounds of its crawl)" if "stock" in r else "")
    if r["stuck"]:
        print(f"STUCK (over {STEP_CAP:.0f} virtual seconds, a bug): {dict(r['stuck'])}")
    print(f"publish p50 / p95: {r['publish_p50_ms']:.0f} / {r['publish_p95_ms']:.0f} ms (virtual)")
    print(
        f"maintenance: {r['maintenance_bytes_per_node_s']:.0f} B/s sent per node (idle window of "
        f"{r['workload']['idle_window']:.0f} s, {r['idle_republishes']} republishes)"
    )
    rec = r["records_per_node"]
    print(f"records per node: max {rec['max']}, mean {rec['mean']:.1f}")
    mb = r["mailbox"]
    if mb["puts"]:
        print(
            f"mailbox: {mb['puts']} puts, {mb['copies_mean']:.1f} copies each; entries per "
            f"node max {mb['held_max']}, mean {mb['held_mean']:.2f}"
        )
    print(
        f"memory: {r['rss_per_node_kib']:.0f} KiB RSS per node; routing table "
        f"{r['routing_table_mean']:.0f} contacts per node"
    )
    print(
        "wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in r["wall_s"].items())
        + f"; lookup phase {r['lookup_virtual_s']:.0f} s virtual"
    )
    print("\ngoals (issue 10):")
    ok_all = graded(args)
    for goal, value, ok in verdicts(r, args):
        verdict = ("PASS" if ok else "MISS") if ok_all else "not graded"
        print(f"  {goal:42} {value:>22}  {verdict}")
    if not ok_all:
        print("  (graded only on N=10000, median RTT 50 ms, 1 % loss, 20 % churn, default config)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="nodes (default 10000)")
    parser.add_argument("--lookups", type=int, default=2000, help="lookups (default 2000)")
    parser.add_argument("--median-rtt", type=float, default=0.050, help="seconds (0.050)")
    parser.add_argument("--loss", type=float, default=0.01, help="per packet (0.01)")
    parser.add_argument("--churn", type=float, default=0.2, help="fraction of N (0.2)")
    parser.add_argument("--concurrency", type=int, default=20, help="lookups at a time")
    parser.add_argument("--width", type=int, default=200, help="publishes at a time")
    parser.add_argument("--mailbox-puts", type=int, default=1000)
    parser.add_argument(
        "--idle-window",
        type=float,
        default=3600.0,
        help="virtual seconds over which maintenance traffic is measured (3600; graded only "
        "at 3600: a shorter window may miss the hourly replication)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--hostile",
        type=float,
        default=0.0,
        help="fraction of N added as hostile nodes (liars, eclipse, black holes; 0)",
    )
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a DHTConfig field (ablations; the run is then not graded)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.n < 3 or not 0 <= args.churn < 1 or not 0 <= args.loss < 1:
        parser.error("need -n >= 3, 0 <= --churn < 1, 0 <= --loss < 1")
    result = trio.run(run, args, clock=trio.testing.MockClock(autojump_threshold=0))
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        report(result, args)


if __name__ == "__main__":
    main()
