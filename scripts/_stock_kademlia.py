"""The baseline of scripts/bench_dht.py: the stock kademlia library (``kademlia.network.Server``
in one asyncio loop, its fixed 5 s RPC timeout), run on the same workload as p2pd and
counting the find RPCs of each lookup."""

from __future__ import annotations

import asyncio
import contextvars
import time
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from _bench import Every10Percent
from _dht_workload import (
    LOCALHOST,
    RECORD_LIFETIME,
    SideResult,
    Workload,
    identity_for,
    progress,
    report_lookups,
    rss_kib,
    setup_deadline_note,
    start_tracing,
    stop_tracing,
)
from kademlia.network import Server
from kademlia.protocol import KademliaProtocol

from p2pd.dht import node_id_for
from p2pd.errors import RecordError
from p2pd.records import HandleRecord
from p2pd.wire import Address

#: One stock lookup may take this long (it has no deadline of its own; 5 s per dead round).
STOCK_LOOKUP_CAP = 60.0

#: The counter of the stock lookup running in this asyncio context (tasks inherit it).
_LOOKUP_RPCS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "bench_dht_lookup_rpcs", default=None
)
_STOCK_COUNTERS: Counter[str] = Counter()


def _count_rpc() -> None:
    counter = _LOOKUP_RPCS.get()
    if counter is not None:
        counter[0] += 1


class CountingProtocol(KademliaProtocol):  # type: ignore[misc]
    """The stock protocol, counting the find RPCs of the lookup that sent them."""

    async def call_find_node(self, node_to_ask: Any, node_to_find: Any) -> Any:
        _count_rpc()
        _STOCK_COUNTERS["requests_out"] += 1
        return await super().call_find_node(node_to_ask, node_to_find)

    async def call_find_value(self, node_to_ask: Any, node_to_find: Any) -> Any:
        _count_rpc()
        _STOCK_COUNTERS["requests_out"] += 1
        return await super().call_find_value(node_to_ask, node_to_find)

    async def call_ping(self, node_to_ask: Any) -> Any:
        _STOCK_COUNTERS["requests_out"] += 1
        return await super().call_ping(node_to_ask)

    async def call_store(self, node_to_ask: Any, key: bytes, value: Any) -> Any:
        _STOCK_COUNTERS["requests_out"] += 1
        return await super().call_store(node_to_ask, key, value)

    def _timeout(self, msg_id: bytes) -> None:
        _STOCK_COUNTERS["timeouts"] += 1
        super()._timeout(msg_id)


class CountingServer(Server):  # type: ignore[misc]
    protocol_class = CountingProtocol


@dataclass
class StockNode:
    server: CountingServer
    address: tuple[str, int]
    record: bytes = b""
    alive: bool = True


async def asyncio_pool(
    count: int, width: int, job: Callable[[int], Awaitable[None]], stop_at: float | None = None
) -> int:
    """asyncio twin of :func:`trio_pool` (``stop_at`` on the loop's clock)."""
    loop = asyncio.get_running_loop()
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count and (stop_at is None or loop.time() < stop_at):
            index = next_index
            next_index += 1
            await job(index)

    await asyncio.gather(*(worker() for _ in range(min(width, count))))
    return next_index


async def cancel_stray_tasks(rounds: int = 5) -> None:
    """End the stock library's fire-and-forget tasks (``welcome_if_new``'s stores, pings of
    bucket heads) so that they do not fail on closed transports after we return, and
    retrieve their outcomes so asyncio does not log them."""
    me = asyncio.current_task()
    for _ in range(rounds):
        await asyncio.sleep(0)  # let the closed transports run their callbacks
        stray = [t for t in asyncio.all_tasks() if t is not me]
        if not stray:
            return
        for task in stray:
            task.cancel()
        await asyncio.wait(stray, timeout=10)
        for task in stray:
            if task.done() and not task.cancelled():
                task.exception()


async def run_stock(w: Workload, trace: bool, setup_only: bool) -> SideResult:
    result = SideResult("stock", w.n, len(w.killed), len(w.lookups), w.concurrency)
    nodes: list[StockNode] = []
    _STOCK_COUNTERS.clear()
    result.rss_start_kib = rss_kib()
    start_tracing(trace)
    try:
        await _stock_phases(w, nodes, result, setup_only)
    except TimeoutError:
        result.incomplete = setup_deadline_note(w, result)
        progress(f"stock: {result.incomplete}")
    finally:
        progress(f"stock: closing {sum(n.alive for n in nodes)} nodes")
        for node in nodes:
            if node.alive:
                node.alive = False
                node.server.stop()
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        await cancel_stray_tasks()
    result.rss_end_kib = rss_kib()
    return result


async def _stock_phases(
    w: Workload, nodes: list[StockNode], result: SideResult, setup_only: bool
) -> None:
    loop = asyncio.get_running_loop()
    setup_started = time.perf_counter()
    async with asyncio.timeout(w.setup_deadline):
        tick = Every10Percent(w.n, lambda d: progress(f"stock: bootstrap {d}/{w.n}"))
        for i in range(w.n):
            identity = identity_for(w, i)
            server = CountingServer(ksize=20, alpha=3, node_id=node_id_for(identity.public_key))
            await server.listen(0, interface=LOCALHOST)
            port = server.transport.get_extra_info("sockname")[1]
            node = StockNode(server, (LOCALHOST, port))
            # the same kind and size of value as p2pd stores: a signed handle record
            node.record = HandleRecord.create(
                identity,
                [Address(LOCALHOST, port)],
                seq=1,
                now=int(time.time()),
                lifetime=RECORD_LIFETIME,
            ).encode()
            nodes.append(node)
            result.nodes_joined = len(nodes)
            if w.bootstrap_from[i]:
                await server.bootstrap([nodes[j].address for j in w.bootstrap_from[i]])
            tick(i + 1)
        result.bootstrap_s = time.perf_counter() - setup_started

        publish_started = time.perf_counter()
        tick = Every10Percent(w.n, lambda d: progress(f"stock: publish {d}/{w.n}"))
        published = 0

        async def publish(i: int) -> None:
            nonlocal published
            if not await nodes[i].server.set(w.handles[i], nodes[i].record):
                result.publish_failed += 1
            published += 1
            result.published = published
            tick(published)

        await asyncio_pool(w.n, w.setup_concurrency, publish)
        result.publish_s = time.perf_counter() - publish_started
        result.setup_s = time.perf_counter() - setup_started

    stop_tracing(result)
    result.copies_per_handle = sum(len(n.server.storage.data) for n in nodes) / w.n
    result.routing_table_mean = (
        sum(sum(len(b) for b in n.server.protocol.router.buckets) for n in nodes) / w.n
    )
    if setup_only:
        return
    progress(
        f"stock: setup {result.setup_s:.1f} s; {result.copies_per_handle:.1f} copies/handle,"
        f" {result.routing_table_mean:.1f} contacts/node; killing {len(w.killed)} nodes"
    )
    before = Counter(_STOCK_COUNTERS)

    for i in w.killed:
        nodes[i].alive = False
        nodes[i].server.stop()

    lookup_started = time.perf_counter()
    cpu_started = time.process_time()
    tick = Every10Percent(len(w.lookups), lambda d: report_lookups(result, d))

    async def lookup(index: int) -> None:
        asker, wanted = w.lookups[index]
        expected = HandleRecord.decode(nodes[wanted].record).public_key
        counter = [0]
        token = _LOOKUP_RPCS.set(counter)
        started = time.perf_counter()
        outcome = "ok"
        try:
            value = await asyncio.wait_for(
                nodes[asker].server.get(w.handles[wanted]), STOCK_LOOKUP_CAP
            )
        except TimeoutError:
            outcome = "timeout"
        except Exception as exc:
            outcome = type(exc).__name__
        else:
            if value is None:
                outcome = "not-found"
            else:
                try:
                    if HandleRecord.decode(value).public_key != expected:
                        outcome = "wrong-key"
                except RecordError:
                    outcome = "bad-value"
        finally:
            _LOOKUP_RPCS.reset(token)
        result.latencies_ms.append((time.perf_counter() - started) * 1000)
        if outcome == "ok":
            result.rpcs.append(counter[0])
        result.lookups_done += 1
        if outcome == "ok":
            result.successes += 1
        else:
            result.failures[outcome] += 1
        tick(result.lookups_done)

    started = await asyncio_pool(
        len(w.lookups), w.concurrency, lookup, loop.time() + w.lookup_deadline
    )
    result.lookup_s = time.perf_counter() - lookup_started
    result.lookup_cpu_s = time.process_time() - cpu_started
    if started < len(w.lookups):
        result.incomplete = f"lookup deadline: ran {started} of {len(w.lookups)} lookups"
    after = Counter(_STOCK_COUNTERS)
    after.subtract(before)
    result.counters = {k: after[k] for k in ("requests_out", "timeouts")}
