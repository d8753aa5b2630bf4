"""Many DHT nodes in one process: on real UDP sockets on loopback, or on a simulated
network.

Each node is the daemon's own DHT (``create_dht``) fed by an endpoint, all in one trio
run. By default the endpoint is a real :class:`~p2pd.transport.udp.UdpEndpoint`, exactly
as a daemon has; with ``network=`` it is a :class:`~p2pd.testing.fakenet.FakeNetwork`
endpoint on a host of its own, and the swarm runs in whatever time trio's clock keeps
(virtual time under ``MockClock``; the records' wall clock moves with it).

Each node has a DHT node key of its own (seeded from the swarm's seed on a FakeNetwork).
On real sockets node ``i`` listens on :func:`loopback_address` ``(i)``, a /24 of its own
in 127/8 (Linux routes all of it to ``lo``): the DHT keeps few ids per address and per
/24, so a swarm on 127.0.0.1 alone would be one host to it. For tests and tools::

    async with open_swarm(20, home=tmp_path) as swarm:
        await swarm.publish(3)
        record = await swarm.nodes[7].dht.resolve(HandleRef("user3"))
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..config import DHTConfig
from ..dht import DHT, NodeKey, create_dht
from ..identity import Identity
from ..records import HandleRecord
from ..store import open_database
from ..transport.udp import UdpEndpoint
from ..wire import Address
from .fakenet import FakeHost, FakeNetwork, FakeUdpEndpoint

#: The port every node of a simulated swarm listens on (each has a host of its own).
FAKE_PORT = 4747


def loopback_address(index: int) -> Address:
    """``127.a.b.1`` port 0: a loopback address in a /24 of its own for node ``index``
    (65,000 of them; Linux answers on all of 127/8 without configuration)."""
    index %= 254 * 256
    return Address(f"127.{1 + index // 256}.{index % 256}.1", 0)


async def run_node(
    nursery: trio.Nursery,
    dht: DHT,
    endpoint: UdpEndpoint | FakeUdpEndpoint,
    stack: AsyncExitStack,
) -> None:
    """Start ``dht``'s timer task and ``endpoint``'s receive task in ``nursery``; closing
    ``stack`` stops them. On the way out (last in, first out): cancel the node's tasks,
    wait until they are gone, and only then close the socket (pushed on ``stack`` before
    this call). Closed first, a receive task woken just before would read from a closed
    descriptor (EBADF)."""
    cancel = trio.CancelScope()
    finished = trio.Event()

    async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with cancel:
                async with trio.open_nursery() as inner:
                    await inner.start(dht.serve)
                    await inner.start(endpoint.serve, dht.datagram_received)
                    task_status.started()
        finally:
            finished.set()

    await nursery.start(serve)
    stack.push_async_callback(finished.wait)
    stack.callback(cancel.cancel)


@dataclass
class SwarmNode:
    index: int
    identity: Identity
    node_key: NodeKey
    endpoint: UdpEndpoint | FakeUdpEndpoint
    dht: DHT
    db_path: Path | None
    stack: AsyncExitStack
    seq: int = 0
    alive: bool = True
    published: list[HandleRecord] = field(default_factory=list)
    #: The simulated host, when the swarm runs on a FakeNetwork.
    host: FakeHost | None = None

    @property
    def address(self) -> Address:
        """Where other nodes reach it (a NATed host's public side, on a FakeNetwork)."""
        if self.host is not None:
            return Address(self.host.ip, FAKE_PORT)
        return self.endpoint.local_address


class Swarm:
    def __init__(
        self,
        nursery: trio.Nursery,
        config: DHTConfig,
        home: Path | None,
        network: FakeNetwork | None = None,
        seed: int = 1,
    ) -> None:
        self.nursery = nursery
        self.config = config
        self.home = home
        self.network = network
        self.rng = random.Random(seed)
        self.nodes: list[SwarmNode] = []
        self._epoch = time.time() - (trio.current_time() if network is not None else 0.0)

    def wall(self) -> float:
        """Wall-clock seconds: the real clock, or on a FakeNetwork one that moves with
        trio's (virtual) clock, so that records age and expire in virtual time."""
        if self.network is None:
            return time.time()
        return self._epoch + trio.current_time()

    async def start_node(
        self,
        identity: Identity,
        *,
        db_path: Path | None = None,
        listen: Address | None = None,
        host: FakeHost | None = None,
        node_key: NodeKey | None = None,
    ) -> SwarmNode:
        stack = AsyncExitStack()
        endpoint: UdpEndpoint | FakeUdpEndpoint
        randbytes = None
        if self.network is not None:
            host = host or self.network.add_host()
            endpoint = host.bind(FAKE_PORT)
            randbytes = random.Random(self.rng.getrandbits(64)).randbytes
            node_key = node_key or NodeKey.from_seed(self.rng.randbytes(32))
        else:
            endpoint = UdpEndpoint.bind(listen or loopback_address(len(self.nodes)))
            node_key = node_key or NodeKey.generate()
        stack.callback(endpoint.close)
        # A simulated swarm of thousands keeps its records in memory only.
        conn = open_database(db_path) if self.network is None or db_path else None
        if conn is not None:
            stack.callback(conn.close)
        dht = create_dht(
            node_key=node_key,
            conn=conn,
            config=self.config,
            transport=endpoint,
            wall=self.wall,
            randbytes=randbytes,
        )
        stack.callback(dht.close)
        await run_node(self.nursery, dht, endpoint, stack)
        node = SwarmNode(
            len(self.nodes), identity, node_key, endpoint, dht, db_path, stack, host=host
        )
        if host is not None:
            stack.callback(host.shutdown)
        return node

    async def add(self, identity: Identity | None = None, bootstrap: int = 2) -> SwarmNode:
        index = len(self.nodes)
        identity = identity or Identity.generate(f"user{index}")
        db_path = None if self.home is None else self.home / f"node{index}.db"
        node = await self.start_node(identity, db_path=db_path)
        node.index = index
        alive = [n for n in self.nodes if n.alive]
        if alive:
            seeds = [alive[0], *self.rng.sample(alive, min(bootstrap, len(alive)))]
            await node.dht.bootstrap(list(dict.fromkeys(s.address for s in seeds)))
        self.nodes.append(node)
        return node

    async def publish(self, index: int, *, lifetime: int = 3600) -> HandleRecord:
        node = self.nodes[index]
        node.seq += 1
        record = HandleRecord.create(
            node.identity, [node.address], seq=node.seq, now=int(self.wall()), lifetime=lifetime
        )
        await node.dht.publish(record)
        node.published.append(record)
        return record

    async def stop(self, index: int) -> None:
        """The node goes silent: its socket closes and its DHT half stops."""
        node = self.nodes[index]
        if node.alive:
            node.alive = False
            await node.stack.aclose()

    async def restart(self, index: int) -> SwarmNode:
        """Start a stopped node again from its database, on the same address."""
        old = self.nodes[index]
        await self.stop(index)
        node = await self.start_node(
            old.identity,
            db_path=old.db_path,
            listen=old.address,
            host=old.host,
            node_key=old.node_key,
        )
        node.index, node.seq, node.published = index, old.seq, old.published
        self.nodes[index] = node
        return node


@asynccontextmanager
async def open_swarm(
    n: int,
    *,
    config: DHTConfig | None = None,
    home: Path | None = None,
    seed: int = 1,
    network: FakeNetwork | None = None,
    bootstrap: int = 2,
) -> AsyncIterator[Swarm]:
    """Start ``n`` nodes, each bootstrapped from the first and ``bootstrap`` random earlier
    ones. With ``network``, the nodes live on that (running) simulated network."""
    async with trio.open_nursery() as nursery:
        swarm = Swarm(nursery, config or DHTConfig(), home, network, seed)
        try:
            for _ in range(n):
                await swarm.add(bootstrap=bootstrap)
            yield swarm
        finally:
            with trio.CancelScope(shield=True):
                for node in swarm.nodes:
                    if node.alive:
                        node.alive = False
                        await node.stack.aclose()
            nursery.cancel_scope.cancel()
