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
from ..identity import Identity
from ..records import HandleRecord, Verdict, choose_best
from ..wire import MAILBOX_DELETE_MAX, MailboxPage
from .lookup import LookupResult, iterative_find
from .mailbox import (
    MailboxStorage,
    delete_message,
    entry_id,
    fetch_message,
    mailbox_key,
)
from .protocol import DHTProtocol
from .storage import RecordStorage

log = logging.getLogger(__name__)


class DHTServer(Server):  # type: ignore[misc]
    protocol_class = DHTProtocol

    def __init__(
        self,
        node_id: bytes,
        storage: RecordStorage,
        config: DHTConfig,
        mailboxes: MailboxStorage,
    ) -> None:
        super().__init__(ksize=config.ksize, alpha=config.alpha, node_id=node_id, storage=storage)
        self.config = config
        self.storage: RecordStorage = storage
        self.mailboxes = mailboxes
        self.protocol: DHTProtocol | None = None
        self._maintenance: asyncio.Task[None] | None = None

    def _create_protocol(self) -> DHTProtocol:
        return DHTProtocol(self.node, self.storage, self.config, self.mailboxes)

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
        self.mailboxes.cull()
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

    # ------------------------------------------------------------------ mailboxes

    async def _mailbox_nodes(self, owner: bytes) -> tuple[bytes, list[Node], bool]:
        """The mailbox key, the k closest nodes to it, and whether we are among them."""
        key = mailbox_key(owner)
        result = await iterative_find(self.proto, key, find_value=False)
        target = Node(key)
        far = max((n.distance_to(target) for n in result.closest), default=None)
        local = far is None or len(result.closest) < self.ksize
        return key, result.closest, local or self.node.distance_to(target) < far

    async def mailbox_put(self, owner: bytes, entry: bytes) -> int:
        """Leave ``entry`` in ``owner``'s mailbox on the k closest nodes; returns copies."""
        key, nodes, local = await self._mailbox_nodes(owner)
        stored = int(local and self.mailboxes.put(key, entry))
        replies = await asyncio.gather(
            *(self.proto.call(n, "mailbox_put", key, entry) for n in nodes)
        )
        return stored + sum(1 for r in replies if r is True)

    async def mailbox_fetch(
        self, identity: Identity, *, max_pages: int = 100
    ) -> list[tuple[bytes, bytes]]:
        """Every entry in our mailbox, from all the nodes that hold a copy, deduplicated."""
        owner = identity.public_key
        _, nodes, local = await self._mailbox_nodes(owner)
        found: dict[bytes, bytes] = {}

        def signed(after: bytes) -> tuple[int, bytes]:
            ts = int(time.time())
            return ts, identity.sign(fetch_message(owner, ts, after))

        if local:
            after = b""
            for _ in range(max_pages):
                ts, sig = signed(after)
                page = self.mailboxes.fetch(owner, ts, after, sig)
                if not page or not page[0]:
                    break
                found.update(page[0])
                after = page[0][-1][0]
                if not page[1]:
                    break

        async def from_node(node: Node) -> None:
            after = b""
            for _ in range(max_pages):
                ts, sig = signed(after)
                page = await self.proto.call(node, "mailbox_fetch", owner, ts, after, sig)
                if not isinstance(page, MailboxPage) or not page.entries:
                    return
                for ident, entry in page.entries:
                    if entry_id(entry) == ident:  # a node cannot rewrite an entry unseen
                        found[ident] = entry
                after = page.entries[-1][0]
                if not page.more:
                    return

        await asyncio.gather(*(from_node(n) for n in nodes))
        return sorted(found.items())

    async def mailbox_delete(self, identity: Identity, ids: list[bytes]) -> int:
        """Delete entries (that we have safely processed) from every copy."""
        owner = identity.public_key
        _, nodes, local = await self._mailbox_nodes(owner)
        deleted = 0
        for start in range(0, len(ids), MAILBOX_DELETE_MAX):
            chunk = tuple(ids[start : start + MAILBOX_DELETE_MAX])
            ts = int(time.time())
            sig = identity.sign(delete_message(owner, ts, chunk))
            if local:
                deleted += self.mailboxes.delete(owner, ts, chunk, sig) or 0
            replies = await asyncio.gather(
                *(self.proto.call(n, "mailbox_delete", owner, ts, list(chunk), sig) for n in nodes)
            )
            deleted += sum(r for r in replies if isinstance(r, int) and not isinstance(r, bool))
        return deleted

    def statistics(self) -> dict[str, Any]:
        proto = self.proto
        return {
            "node_id": self.node.id.hex(),
            "routing_table_size": proto.routing_table_size(),
            "records_stored": len(self.storage),
            "mailbox_entries_held": self.mailboxes.count(),
            "refused_records": dict(self.storage.refused),
            "counters": dict(proto.stats),
        }

    def contacts(self) -> list[tuple[bytes, str, int]]:
        return [(n.id, n.ip, n.port) for n in self.proto.contacts()]
