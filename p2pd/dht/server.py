"""Our Kademlia server: bmuller's ``Server`` with our protocol, lookup and storage.

Runs entirely on the asyncio loop thread. The rest of p2pd reaches it only through
:class:`p2pd.dht.DHT` (trio side).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from kademlia.network import Server
from kademlia.node import Node

from ..config import DHTConfig
from ..records import HandleRecord, Verdict, choose_best
from .lookup import LookupResult, iterative_find
from .protocol import DHTProtocol
from .storage import RecordStorage

log = logging.getLogger(__name__)


class DHTServer(Server):  # type: ignore[misc]
    protocol_class = DHTProtocol

    def __init__(self, node_id: bytes, storage: RecordStorage, config: DHTConfig) -> None:
        super().__init__(ksize=config.ksize, alpha=config.alpha, node_id=node_id, storage=storage)
        self.config = config
        self.storage: RecordStorage = storage
        self.protocol: DHTProtocol | None = None
        self._maintenance: asyncio.Task[None] | None = None

    def _create_protocol(self) -> DHTProtocol:
        return DHTProtocol(self.node, self.storage, self.config)

    @property
    def proto(self) -> DHTProtocol:
        if self.protocol is None:
            raise RuntimeError("DHT server is not attached to a transport")
        return self.protocol

    def attach(self, transport: Any) -> DHTProtocol:
        """Use a datagram transport someone else owns (the trio UDP endpoint)."""
        self.protocol = self._create_protocol()
        self.protocol.connection_made(transport)
        self._maintenance = asyncio.ensure_future(self._maintain())
        return self.protocol

    async def listen(self, port: int, interface: str = "127.0.0.1") -> None:
        """Own a UDP socket on this loop (benchmarks that run no trio side)."""
        loop = asyncio.get_running_loop()
        self.transport, self.protocol = await loop.create_datagram_endpoint(
            self._create_protocol, local_addr=(interface, port)
        )
        self._maintenance = asyncio.ensure_future(self._maintain())

    def refresh_table(self, interval: int = 3600) -> None:  # replaced by _maintain
        pass

    def stop(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self.protocol is not None:
            self.protocol.close()
        if self.transport is not None:
            self.transport.close()

    async def _maintain(self) -> None:
        """Refresh lonely buckets, re-replicate stored records, forget expired ones."""
        period = min(self.config.refresh_interval, self.config.replicate_interval) / 4
        while True:
            await asyncio.sleep(period)
            try:
                await self.maintain_once()
            except Exception:  # one bad round must not end maintenance
                log.exception("DHT maintenance round failed")

    async def maintain_once(self) -> None:
        proto = self.proto
        self.storage.cull()
        for bucket in proto.router.buckets:
            if time.monotonic() - bucket.last_updated >= self.config.refresh_interval:
                low, high = bucket.range
                target = ((low + high) // 2).to_bytes(20, "big")
                await iterative_find(proto, target, find_value=False)
        for key, value in self.storage.iter_older_than(self.config.replicate_interval):
            await self.store_value(key, value)
            self.storage.mark_replicated(key)

    # ------------------------------------------------------------------ operations

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> int:
        """Ping the given addresses, then look up our own id. Returns contacts known."""
        proto = self.proto

        async def ping(addr: tuple[str, int]) -> Node | None:
            probe = Node(bytes(20), addr[0], addr[1])
            node_id = await proto.request(probe, "ping")
            if not isinstance(node_id, bytes) or node_id == self.node.id:
                return None
            node = Node(node_id, addr[0], addr[1])
            proto.welcome_if_new(node)
            return node

        found = await asyncio.gather(*(ping(a) for a in addrs))
        seeds = [n for n in found if n is not None]
        if seeds:
            await iterative_find(proto, self.node.id, find_value=False, seeds=seeds)
        return proto.routing_table_size()

    async def lookup(self, key: bytes, *, find_value: bool) -> LookupResult:
        return await iterative_find(self.proto, key, find_value=find_value)

    async def store_value(self, key: bytes, value: bytes) -> int:
        """Store at the k closest nodes (and here, if we are among them). Returns count."""
        proto = self.proto
        result = await iterative_find(proto, key, find_value=False)
        stored = 0
        target = Node(key)
        far = max((n.distance_to(target) for n in result.closest), default=None)
        among_closest = far is None or len(result.closest) < self.ksize
        if among_closest or self.node.distance_to(target) < far:
            stored += self.storage.offer(key, value) in (Verdict.ACCEPT, Verdict.SAME)
        replies = await asyncio.gather(
            *(proto.call(n, "store", key, value) for n in result.closest)
        )
        stored += sum(1 for r in replies if r is True)
        return stored

    async def resolve(
        self, key: bytes, accept_key: Callable[[bytes], bool]
    ) -> tuple[HandleRecord | None, LookupResult]:
        """The newest valid record under ``key`` whose public key ``accept_key`` allows."""
        result = await self.lookup(key, find_value=True)
        values = [v for _, v in result.values]
        local = self.storage.get(key)
        if local is not None:
            values.append(local)
        best = choose_best(values, time.time(), key=key, accept_key=accept_key)
        if best is not None:
            # Repair: the closest nodes that lack the newest record get it (Kademlia
            # section 2.3 caches a found value at the nearest node without it).
            encoded = best.encode()
            stale = [n for n, v in result.values if v != encoded] + result.without_value
            closest = {n.id for n in result.closest}
            for node in stale:
                if node.id in closest:
                    self.proto.spawn(self.proto.call(node, "store", key, encoded))
            if local is not None and local != encoded:
                self.storage.offer(key, encoded)
        return best, result

    def statistics(self) -> dict[str, Any]:
        proto = self.proto
        return {
            "node_id": self.node.id.hex(),
            "routing_table_size": proto.routing_table_size(),
            "records_stored": len(self.storage),
            "refused_records": dict(self.storage.refused),
            "counters": dict(proto.stats),
        }

    def contacts(self) -> list[tuple[bytes, str, int]]:
        return [(n.id, n.ip, n.port) for n in self.proto.contacts()]
