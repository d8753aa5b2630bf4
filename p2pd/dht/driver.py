"""The trio driver of :class:`~p2pd.dht.core.DHTCore`: about what hypercorn's UDP server
is to aioquic. No asyncio, no thread, no queue.

- Datagrams come in from the node's UDP task (:meth:`DHT.datagram_received`, called by
  :class:`~p2pd.transport.udp.UdpEndpoint` for first bytes 0x00..0x03) and go straight
  into the core, synchronously: the work per datagram is bounded by the core, so the
  reader never waits on anything and nothing queues between the two.
- After each burst the endpoint calls :meth:`DHT.flush`: the core's datagrams go out,
  stored records are written to SQLite, and the timer task's deadline is moved.
- One timer task sleeps in one long-lived cancel scope until the core's next deadline
  (soft and hard RPC timeouts, lookup deadlines, maintenance), never polling.
- An operation (``publish``, ``resolve``...) starts a state machine in the core and
  waits on a ``trio.Event`` that the core's ``on_done`` callback sets.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import trio

from .. import wire
from ..claims import CONTESTED, Resolution, contested_error
from ..config import DHTConfig
from ..errors import NotFound
from ..identity import HandleRef, Identity
from ..records import HandleRecord, dht_key
from ..wire import Address
from . import mailbox_entry, mailbox_pass
from .core import DHTCore
from .mailbox import MailboxStorage, mailbox_key
from .mailbox_revoke import PassPin
from .nodekey import NodeKey
from .reachability import ReachabilityStatus
from .result import LookupResult
from .routing import Node
from .storage import RecordStorage

T = TypeVar("T")

#: A plain handle found contested stays contested for this long (seconds) on this node,
#: even if a later lookup sees one claim only: a replica that answers late (a loaded
#: machine, a lossy path) must not turn "contested" into one of the rival keys, pinned
#: by the next ``send``. Seen: ``whois dave`` said contested, and ``send dave`` a
#: moment later queued the message to one claim (a loaded test run). The
#: self-certifying form still picks one. The cost: a contest that ends (the rival's
#: claim expires) is still reported for up to this long.
CONTESTED_MEMORY = 600.0
#: Plain handles remembered as contested, at most (the oldest is forgotten first).
CONTESTED_REMEMBERED = 1024


class DatagramTransport(Protocol):
    """What the DHT sends through: the node's UDP endpoint, or a fake one."""

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None: ...


class DHT:
    """A DHT node driven by trio. Start :meth:`serve` in a nursery (``open_dht`` does)."""

    def __init__(
        self,
        core: DHTCore,
        transport: DatagramTransport,
        *,
        wall: Callable[[], float] = time.time,
        on_alone: Callable[[], None] | None = None,
    ) -> None:
        self.core = core
        self.node_id: bytes = core.node_id
        self._transport = transport
        self._wall = wall
        self._timer = trio.CancelScope()
        self._dialback: DatagramTransport | None = None
        #: Told when the routing table loses its last contact (the daemon's maintenance
        #: then rejoins at once instead of noticing at its next upkeep).
        self._on_alone = on_alone
        self._alone = len(core.table) == 0
        #: The pass a mailbox owner gave us, if any (p2pd/dht/mailbox_pass_share.py):
        #: our puts into its mailbox then carry it instead of postage.
        self.mailbox_passes: Callable[[bytes], mailbox_pass.MailboxPass | None] = lambda _: None
        #: Plain handles found contested: (wall time, that resolution), oldest first.
        self._contested: dict[str, tuple[float, Resolution]] = {}
        add_hook = getattr(transport, "add_flush_hook", None)
        if add_hook is not None:
            add_hook(self.flush)

    def close(self) -> None:
        """Stop taking the transport's bursts; write what is left to write."""
        remove_hook = getattr(self._transport, "remove_flush_hook", None)
        if remove_hook is not None:
            remove_hook(self.flush)
        self.core.storage.persist()
        if self.core.mailboxes is not None:
            self.core.mailboxes.persist()

    # ------------------------------------------------------------------ I/O

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        """A DHT datagram from the UDP task; its answers go out at :meth:`flush`."""
        self.core.datagram_received(data, addr, trio.current_time())

    def flush(self) -> None:
        """Send what the core has queued, persist what it stored, re-arm the timer."""
        sendto = self._transport.sendto
        for data, addr in self.core.datagrams_to_send():
            sendto(data, addr)
        if self._dialback is not None:
            for data, addr in self.core.reach.dialbacks_to_send():
                self._dialback.sendto(data, addr)
        self.core.storage.persist()
        if self.core.mailboxes is not None:
            self.core.mailboxes.persist()  # pins (p2pd/dht/mailbox_revoke.py)
        alone = len(self.core.table) == 0
        if alone and not self._alone and self._on_alone is not None:
            self._on_alone()
        self._alone = alone
        when = self.core.get_timer()
        deadline = math.inf if when is None else when
        if self._timer.deadline != deadline:  # moving it re-sorts trio's deadlines
            self._timer.deadline = deadline

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fire the core's timers at their deadlines, forever."""
        task_status.started()
        while True:
            self._timer = trio.CancelScope()
            self.flush()
            with self._timer:
                await trio.sleep_forever()
            self.core.handle_timer(trio.current_time())

    async def _run(self, start: Callable[[Callable[[T], None], float], None]) -> T:
        done = trio.Event()
        box: list[T] = []

        def finish(value: T) -> None:
            box.append(value)
            done.set()

        start(finish, trio.current_time())
        self.flush()
        await done.wait()
        return box[0]

    # ------------------------------------------------------------------ operations

    async def bootstrap(self, addresses: list[Address]) -> int:
        """Join through these addresses; returns the routing table size afterwards."""
        targets = [a.as_tuple() for a in addresses]
        return await self._run(lambda done, now: self.core.start_bootstrap(targets, now, done))

    async def publish(self, record: HandleRecord) -> int:
        """Store our record at the k closest nodes; returns how many accepted it."""
        value = record.encode()
        return await self._run(
            lambda done, now: self.core.start_store(record.key, value, now, done)
        )

    async def resolve(self, ref: HandleRef) -> HandleRecord:
        record, _ = await self.resolve_with_details(ref)
        return record

    async def resolve_claim(self, ref: HandleRef) -> tuple[Resolution, LookupResult]:
        """What the replicas say about ``ref``, decided by p2pd/claims.py's rule."""
        key = dht_key(ref.handle)
        found: tuple[Resolution, LookupResult] = await self._run(
            lambda done, now: self.core.start_resolve(
                key,
                now,
                self._wall(),
                ref.matches,
                done,
                certified=ref.fingerprint_prefix is not None,
            )
        )
        return found

    async def resolve_with_details(self, ref: HandleRef) -> tuple[HandleRecord, LookupResult]:
        """The newest record of the key the replicas agree on for ``ref``; without its
        addresses when its presence has expired (the claim outlives them). Raises
        NotFound, or Contested when different keys claim it (p2pd/claims.py)."""
        resolution, result = await self.resolve_claim(ref)
        record = resolution.record
        if ref.fingerprint_prefix is None:
            resolution = self._remember_contested(ref.handle, resolution)
        if resolution.status == CONTESTED:
            raise contested_error(ref.handle, resolution)
        if record is None:
            if result.values and ref.fingerprint_prefix is not None:
                raise NotFound(
                    f"no record for {ref.handle!r} matches the fingerprint prefix "
                    f"{ref.fingerprint_prefix!r}: refusing the key the network holds"
                )
            raise NotFound(f"no valid record for handle {ref.handle!r} in the DHT")
        if not record.present(self._wall()):
            record = record.without_presence()
        return record, result

    def _remember_contested(self, handle: str, resolution: Resolution) -> Resolution:
        """``resolution`` for plain ``handle``, or the contested one seen for it within
        CONTESTED_MEMORY (its claims joined by any new key found now)."""
        now = self._wall()
        seen = self._contested.get(handle)
        if resolution.status == CONTESTED:
            self._contested.pop(handle, None)
            self._contested[handle] = (now, resolution)
            while len(self._contested) > CONTESTED_REMEMBERED:
                del self._contested[next(iter(self._contested))]
            return resolution
        if seen is None:
            return resolution
        when, old = seen
        if not 0 <= now - when < CONTESTED_MEMORY:
            del self._contested[handle]
            return resolution
        keys = {claim.public_key for claim in old.claims}
        new = tuple(c for c in resolution.claims if c.public_key not in keys)
        return Resolution(CONTESTED, None, old.claims + new)

    async def mailbox_put(self, owner_public_key: bytes, plaintext: bytes) -> int:
        """Leave ``plaintext`` in someone's mailbox, padded, sealed to them and stamped
        (p2pd/dht/mailbox_entry.py), or with the owner's pass if it gave us one
        (p2pd/dht/mailbox_pass.py); returns how many nodes took it."""
        sealed = mailbox_entry.seal(owner_public_key, plaintext)
        key, bits, wall = mailbox_key(owner_public_key), self.core.config.postage_bits, self._wall()
        held = self.mailbox_passes(owner_public_key)
        if held is not None and held.owner == owner_public_key and held.valid(wall):
            put = mailbox_pass.wrap(held, key, mailbox_entry.stamp(key, sealed, wall, 0))
            copies: int = await self._run(
                lambda done, now: self.core.start_mailbox_put(owner_public_key, put, now, done)
            )
            if copies:
                return copies
            # Not confirmed with the pass (replicas that predate passes, or a pass they
            # refuse): pay the postage instead.
            self.core.stats["mailbox_pass_unconfirmed"] += 1
        # Postage is tens of milliseconds of hashing: off the trio thread. (hashlib keeps
        # the GIL for inputs this small, so trio still waits up to the interpreter's
        # 5 ms switch interval at a time while it runs, not the whole search.)
        entry = await trio.to_thread.run_sync(mailbox_entry.stamp, key, sealed, wall, bits)
        return await self._run(
            lambda done, now: self.core.start_mailbox_put(owner_public_key, entry, now, done)
        )

    async def mailbox_fetch(self, identity: Identity) -> list[tuple[bytes, bytes]]:
        """(entry id, sealed entry) for everything waiting in our mailbox."""
        return await self._run(
            lambda done, now: self.core.start_mailbox_fetch(
                identity.public_key, identity.sign, self._wall, now, done
            )
        )

    async def mailbox_delete(self, identity: Identity, ids: list[bytes]) -> int:
        return await self._run(
            lambda done, now: self.core.start_mailbox_delete(
                identity.public_key, ids, identity.sign, self._wall, now, done
            )
        )

    async def mailbox_revoke(self, pin: PassPin) -> int:
        """Send an owner's pin revoking its other passes of the week to its mailbox's
        replicas (p2pd/dht/mailbox_revoke.py); how many took it."""
        return await self._run(lambda done, now: self.core.start_mailbox_revoke(pin, now, done))

    async def gather(self, calls: list[tuple[Node, str, list[Any]]]) -> list[wire.DHTResult | None]:
        """Send these requests; every result (None: no reply) in order (tests, tools)."""
        return await self._run(lambda done, now: self.core.gather(calls, now, done))

    def statistics(self) -> dict[str, Any]:
        return self.core.statistics()

    def enable_reachability(
        self,
        local_hosts: Iterable[str],
        dialback: DatagramTransport | None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """Probe our reachability and go client mode behind a NAT
        (p2pd/dht/reachability.py); ``local_hosts`` are our own IPs, ``dialback`` a
        second socket of ours (another port) to send others' dial-back nonces from,
        ``on_change`` is told when our mapping or reachability changes."""
        self._dialback = dialback
        now = trio.current_time()
        self.core.reach.enable(
            local_hosts, can_dial_back=dialback is not None, now=now, on_change=on_change
        )
        self.flush()

    def address_reported(self, observer_host: str, seen: wire.Address) -> None:
        """A QUIC peer at ``observer_host`` says it sees us at ``seen``."""
        self.core.reach.reported(observer_host, seen, trio.current_time())

    def reachability(self) -> ReachabilityStatus:
        return self.core.reach.status(trio.current_time())

    def contacts(self) -> list[tuple[bytes, str, int]]:
        return self.core.contacts()


def create_dht(
    *,
    node_key: NodeKey,
    conn: sqlite3.Connection | None,
    config: DHTConfig,
    transport: DatagramTransport,
    wall: Callable[[], float] = time.time,
    randbytes: Callable[[int], bytes] | None = None,
    on_alone: Callable[[], None] | None = None,
) -> DHT:
    """A DHT node sending through ``transport``; run its :meth:`DHT.serve` in a nursery
    and call :meth:`DHT.close` when done. ``conn`` is the node's SQLite connection (None:
    nothing persists). If the transport has flush hooks (a
    :class:`~p2pd.transport.udp.UdpEndpoint` does), the node's answers go out after each
    burst the transport reads. ``node_key`` is the node's own DHT key (never the
    identity key: docs/ARCHITECTURE.md, "Earned ids"). ``on_alone`` is called when the
    routing table loses its last contact."""
    storage = RecordStorage(conn, max_records=config.max_records, clock=wall)
    mailboxes = MailboxStorage(conn, clock=wall)
    extra = {} if randbytes is None else {"randbytes": randbytes}
    core = DHTCore(node_key, config, storage, mailboxes, trio.current_time(), **extra)
    return DHT(core, transport, wall=wall, on_alone=on_alone)


@asynccontextmanager
async def open_dht(
    *,
    node_key: NodeKey,
    conn: sqlite3.Connection | None,
    config: DHTConfig,
    transport: DatagramTransport,
    wall: Callable[[], float] = time.time,
    on_alone: Callable[[], None] | None = None,
) -> AsyncIterator[DHT]:
    """:func:`create_dht`, its timers running until the context exits."""
    dht = create_dht(
        node_key=node_key,
        conn=conn,
        config=config,
        transport=transport,
        wall=wall,
        on_alone=on_alone,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dht.serve)
            try:
                yield dht
            finally:
                nursery.cancel_scope.cancel()
    finally:
        dht.close()
