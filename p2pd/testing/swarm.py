"""Many real DHT nodes in one process, each on its own UDP socket on 127.0.0.1.

Each node has a trio-owned :class:`~p2pd.transport.udp.UdpEndpoint` feeding its DHT,
exactly as a daemon does, all in one trio run. For tests and tools::

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
from ..dht import DHT, create_dht, node_id_for
from ..identity import Identity
from ..records import HandleRecord
from ..store import open_database
from ..transport.udp import UdpEndpoint
from ..wire import Address


@dataclass
class SwarmNode:
    index: int
    identity: Identity
    endpoint: UdpEndpoint
    dht: DHT
    db_path: Path | None
    stack: AsyncExitStack
    seq: int = 0
    alive: bool = True
    published: list[HandleRecord] = field(default_factory=list)

    @property
    def address(self) -> Address:
        return self.endpoint.local_address


class Swarm:
    def __init__(self, nursery: trio.Nursery, config: DHTConfig, home: Path | None) -> None:
        self.nursery = nursery
        self.config = config
        self.home = home
        self.nodes: list[SwarmNode] = []

    async def start_node(
        self, identity: Identity, *, db_path: Path | None = None, listen: Address | None = None
    ) -> SwarmNode:
        stack = AsyncExitStack()
        endpoint = UdpEndpoint.bind(listen or Address("127.0.0.1", 0))
        stack.callback(endpoint.close)
        conn = open_database(db_path)
        stack.callback(conn.close)
        dht = create_dht(
            node_id=node_id_for(identity.public_key),
            conn=conn,
            config=self.config,
            transport=endpoint,
        )
        stack.callback(dht.close)
        cancel = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with cancel:
                async with trio.open_nursery() as nursery:
                    await nursery.start(dht.serve)
                    await nursery.start(endpoint.serve, dht.datagram_received)
                    task_status.started()

        await self.nursery.start(serve)
        stack.callback(cancel.cancel)
        return SwarmNode(len(self.nodes), identity, endpoint, dht, db_path, stack)

    async def add(self, identity: Identity | None = None, bootstrap: int = 2) -> SwarmNode:
        index = len(self.nodes)
        identity = identity or Identity.generate(f"user{index}")
        db_path = None if self.home is None else self.home / f"node{index}.db"
        node = await self.start_node(identity, db_path=db_path)
        node.index = index
        alive = [n for n in self.nodes if n.alive]
        if alive:
            seeds = [alive[0], *random.sample(alive, min(bootstrap, len(alive)))]
            await node.dht.bootstrap([s.address for s in seeds])
        self.nodes.append(node)
        return node

    async def publish(self, index: int, *, lifetime: int = 3600) -> HandleRecord:
        node = self.nodes[index]
        node.seq += 1
        record = HandleRecord.create(
            node.identity, [node.address], seq=node.seq, now=int(time.time()), lifetime=lifetime
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
        node = await self.start_node(old.identity, db_path=old.db_path, listen=old.address)
        node.index, node.seq, node.published = index, old.seq, old.published
        self.nodes[index] = node
        return node


@asynccontextmanager
async def open_swarm(
    n: int, *, config: DHTConfig | None = None, home: Path | None = None, seed: int = 1
) -> AsyncIterator[Swarm]:
    """Start ``n`` nodes, each bootstrapped from the first and two random earlier ones."""
    random.seed(seed)
    async with trio.open_nursery() as nursery:
        swarm = Swarm(nursery, config or DHTConfig(), home)
        try:
            for _ in range(n):
                await swarm.add()
            yield swarm
        finally:
            with trio.CancelScope(shield=True):
                for node in swarm.nodes:
                    if node.alive:
                        node.alive = False
                        await node.stack.aclose()
            nursery.cancel_scope.cancel()
