"""The DHT, behind a narrow trio-side interface.

Nothing outside this package imports kademlia. Callers use :func:`open_dht` and the
:class:`DHT` it yields: ``bootstrap``, ``publish``, ``resolve``, ``statistics``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from ..config import DHTConfig
from ..errors import NotFound
from ..identity import HandleRef, Identity
from ..records import HandleRecord, dht_key
from ..store import open_database
from ..wire import Address
from .bridge import AsyncioThread
from .lookup import LookupResult
from .mailbox import MailboxStorage
from .protocol import DatagramSender, node_id_for
from .server import DHTServer
from .storage import RecordStorage

__all__ = ["DHT", "AsyncioThread", "LookupResult", "node_id_for", "open_dht"]


class DHT:
    """A DHT node, driven from trio. Its kademlia half lives on the asyncio thread."""

    def __init__(self, bridge: AsyncioThread, server: DHTServer) -> None:
        self._bridge = bridge
        self._server = server
        self.node_id: bytes = server.node.id

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        """Hand a DHT datagram to the protocol (called from the UDP endpoint)."""
        self._bridge.call_soon(self._server.proto.datagram_received, data, addr)

    async def bootstrap(self, addresses: list[Address]) -> int:
        """Join through these addresses; returns the routing table size afterwards."""
        return await self._bridge.run_coro(
            self._server.bootstrap([a.as_tuple() for a in addresses])
        )

    async def publish(self, record: HandleRecord) -> int:
        """Store our record at the k closest nodes; returns how many accepted it."""
        return await self._bridge.run_coro(self._server.store_value(record.key, record.encode()))

    async def resolve(self, ref: HandleRef) -> HandleRecord:
        record, _ = await self.resolve_with_details(ref)
        return record

    async def resolve_with_details(self, ref: HandleRef) -> tuple[HandleRecord, LookupResult]:
        """The newest valid record for ``ref``; raises NotFound."""
        record, result = await self._bridge.run_coro(
            self._server.resolve(dht_key(ref.handle), ref.matches)
        )
        if record is None:
            if result.values and ref.fingerprint_prefix is not None:
                raise NotFound(
                    f"no record for {ref.handle!r} matches the fingerprint prefix "
                    f"{ref.fingerprint_prefix!r}: refusing the key the network holds"
                )
            raise NotFound(f"no valid record for handle {ref.handle!r} in the DHT")
        return record, result

    async def mailbox_put(self, owner_public_key: bytes, entry: bytes) -> int:
        """Leave a sealed entry in someone's mailbox; returns how many nodes took it."""
        return await self._bridge.run_coro(self._server.mailbox_put(owner_public_key, entry))

    async def mailbox_fetch(self, identity: Identity) -> list[tuple[bytes, bytes]]:
        """(entry id, sealed entry) for everything waiting in our mailbox."""
        return await self._bridge.run_coro(self._server.mailbox_fetch(identity))

    async def mailbox_delete(self, identity: Identity, ids: list[bytes]) -> int:
        return await self._bridge.run_coro(self._server.mailbox_delete(identity, ids))

    async def statistics(self) -> dict[str, Any]:
        return await self._bridge.run_sync(self._server.statistics)

    async def contacts(self) -> list[tuple[bytes, str, int]]:
        return await self._bridge.run_sync(self._server.contacts)

    async def offer_local(self, record: HandleRecord) -> str:
        """Offer a record to this node's own storage (tests and tools)."""
        return await self._bridge.run_sync(
            self._server.storage.offer, record.key, record.encode(), time.time()
        )

    @property
    def server(self) -> DHTServer:
        """The asyncio-side server; use only through the bridge."""
        return self._server


@asynccontextmanager
async def open_dht(
    bridge: AsyncioThread,
    *,
    node_id: bytes,
    db_path: Path | None,
    config: DHTConfig,
    transport: DatagramSender,
) -> AsyncIterator[DHT]:
    """Create a DHT node on ``bridge``'s loop that sends through ``transport``."""

    def build() -> DHTServer:
        conn = open_database(db_path)
        storage = RecordStorage(conn, max_records=config.max_records)
        server = DHTServer(node_id, storage, config, MailboxStorage(conn))
        server.attach(transport)
        return server

    server = await bridge.run_sync(build)
    try:
        yield DHT(bridge, server)
    finally:
        with trio.CancelScope(shield=True):
            await bridge.run_sync(server.stop)
