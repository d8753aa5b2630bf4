"""The DHT node as a sans-I/O state machine, the way aioquic's ``QuicConnection`` is one.

No sockets, no event loop, no clock: every entry point takes ``now`` (a monotonic time;
the trio driver passes ``trio.current_time()``, the simulation a virtual one) and what
it has to send is collected for the driver::

    core.datagram_received(data, addr, now)     # a datagram from the network
    core.datagrams_to_send() -> [(data, addr)]  # what to put on the wire now
    core.get_timer() -> when | None             # the next deadline
    core.handle_timer(now)                      # call at (or after) that deadline
    core.start_lookup / start_store / start_resolve / start_bootstrap / start_mailbox_*

An operation (a lookup, a store at the k closest, a mailbox fetch...) is a small state
machine that owns the requests it sent; replies and timeouts reach it synchronously
through :class:`RpcOwner`, and it reports its result once through the ``on_done``
callback it was started with. Wall-clock time (record validity, mailbox signatures)
comes from the storages' injected clock, never from ``now``.

What this node does with what it hears, and why (the hardening of stock kademlia):

- Frames are decoded by :mod:`p2pd.wire`, which bounds and type-checks every argument;
  a malformed datagram is dropped and counted, never raised.
- A reply is matched to its request by message id *and* the address it was sent to, so
  a third party cannot answer for someone else.
- Per-contact adaptive timeouts (:mod:`p2pd.dht.rtt`): an operation stops *waiting* on a
  contact after its RTO and asks another; a late reply still counts until the hard
  timeout. A contact is evicted after ``failures_before_eviction`` consecutive lost
  replies, not after one; a full bucket's head is pinged, and replaced only if silent.
- STORE goes through :class:`~p2pd.dht.storage.RecordStorage` (first claim wins, then
  only a higher sequence number from the same key).
- ``find_value`` answers with the value *and* the closest contacts, so a lookup can go
  on to find the newest record instead of stopping at the first one.
- Work per datagram is bounded: no request makes the node walk what it stores (a new
  neighbour is handed at most ``2 * WELCOME_SCAN`` records, found through a sorted index).
"""

from __future__ import annotations

import heapq
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .. import wire
from ..claims import Answer, Resolution, resolve_claims
from ..config import DHTConfig
from ..errors import WireError
from ..records import HandleRecord, Verdict, verify_claim
from .lookup import Lookup, LookupResult
from .mailbox import MailboxStorage, delete_message, entry_id, fetch_message, mailbox_key
from .routing import Node, RoutingTable
from .rtt import RttTable
from .storage import RecordStorage

log = logging.getLogger(__name__)

Address = tuple[str, int]
#: Most node ids remembered as unresponsive.
SUSPECTS_MAX = 10_000
#: A newcomer in our own bucket is offered at most twice this many records.
WELCOME_SCAN = 8
#: Most records re-replicated by one maintenance round (the rest wait for the next).
REPLICATE_BATCH = 32
#: Most mailbox pages fetched from one node in one fetch.
MAILBOX_MAX_PAGES = 100

_SOFT, _HARD, _DEADLINE, _MAINTAIN = range(4)


class RpcOwner(Protocol):
    """What sent a request, and hears how it ended (synchronously, from the core)."""

    def rpc_done(self, node: Node, result: wire.DHTResult | None, now: float) -> None:
        """A reply (decoded), or None: lost, malformed, or the hard timeout passed."""

    def rpc_slow(self, node: Node, now: float) -> None:
        """The contact's soft deadline passed with no reply yet."""


@dataclass(slots=True)
class _Pending:
    node: Node
    address: Address
    method: str
    sent_at: float
    owner: RpcOwner | None
    #: A request to an address whose node id we do not know yet (bootstrap ping).
    probe: bool


class DHTCore:
    """One DHT node's protocol state: routing table, pending requests, operations."""

    def __init__(
        self,
        node_id: bytes,
        config: DHTConfig,
        storage: RecordStorage,
        mailboxes: MailboxStorage | None,
        now: float,
        *,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.node_id = node_id
        self.node = Node(node_id)
        self.config = config
        self.storage = storage
        self.mailboxes = mailboxes
        self.table = RoutingTable(node_id, config.ksize, now)
        #: The latest ``now`` any entry point was given. An operation's later steps run
        #: from callbacks (a reply, a timer) and must use this, not the ``now`` their
        #: operation started with: a stale one would date requests in the past (RTT
        #: samples too long, deadlines already passed).
        self.now = now
        self.rtt = RttTable(config.soft_timeout_min, config.soft_timeout_max)
        self.stats: Counter[str] = Counter()
        self._randbytes = randbytes
        self._pending: dict[bytes, _Pending] = {}
        self._timers: list[tuple[float, int, int, Any]] = []
        self._timer_seq = 0
        self._out: list[tuple[bytes, Address]] = []
        self._failures: dict[bytes, int] = {}
        # Node ids whose last request went unanswered, and until when lookups skip them:
        # peers keep naming a dead node in their replies long after we evicted it.
        self._suspect_until: dict[bytes, float] = {}
        self._checking: set[bytes] = set()  # heads of full buckets being pinged
        self._maintenance_period = min(config.refresh_interval, config.replicate_interval) / 4
        self._schedule(now + self._maintenance_period, _MAINTAIN, None)

    # ------------------------------------------------------------------ I/O surface

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        timers = self._timers
        while timers:
            _, _, kind, ref = timers[0]
            if kind in (_SOFT, _HARD) and ref not in self._pending:
                heapq.heappop(timers)  # answered already: no need to wake for it
                continue
            return timers[0][0]
        return None

    def handle_timer(self, now: float) -> None:
        self.now = max(self.now, now)
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, ref = heapq.heappop(timers)
            if kind == _SOFT:
                pending = self._pending.get(ref)
                if pending is not None and pending.owner is not None:
                    pending.owner.rpc_slow(pending.node, now)
            elif kind == _HARD:
                pending = self._pending.pop(ref, None)
                if pending is not None:
                    self.stats["timeouts"] += 1
                    self._finish(pending, None, now)
            elif kind == _DEADLINE:
                ref.pump(now)
            else:
                self._maintain(now)
                self._schedule(now + self._maintenance_period, _MAINTAIN, None)

    def _schedule(self, when: float, kind: int, ref: Any) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, kind, ref))

    def _send(self, data: bytes, address: Address) -> None:
        self.stats["datagrams_out"] += 1
        self.stats["bytes_out"] += len(data)
        self._out.append((data, address))

    # ------------------------------------------------------------------ inbound

    def datagram_received(self, data: bytes, addr: Address, now: float) -> None:
        self.now = max(self.now, now)
        self.stats["datagrams_in"] += 1
        self.stats["bytes_in"] += len(data)
        address = (addr[0], addr[1])
        try:
            kind, msg_id, payload = wire.split_frame(data)
            if kind == wire.FRAME_REQUEST:
                self._on_request(wire.decode_request(msg_id, payload), address, now)
            else:
                self._on_response(msg_id, payload, address, now)
        except WireError as exc:
            self.stats["malformed"] += 1
            log.debug("dropped malformed DHT datagram from %s: %s", address, exc)

    def _on_request(self, req: wire.DHTRequest, address: Address, now: float) -> None:
        if req.sender_id == self.node_id:
            self.stats["malformed"] += 1
            return
        self.stats["requests_in"] += 1
        sender = Node(req.sender_id, address[0], address[1])
        self._failures.pop(sender.id, None)
        self._suspect_until.pop(sender.id, None)
        self.seen(sender, now)
        result: Any
        if req.method == "ping":
            result = self.node_id
        elif req.method == "store":
            assert req.key is not None and req.value is not None
            verdict = self.storage.offer(req.key, req.value)
            result = verdict in (Verdict.ACCEPT, Verdict.SAME)
        elif req.method == "find_node":
            assert req.key is not None
            result = self._neighbors(req.key, exclude=sender.id)
        elif req.method == "find_value":
            assert req.key is not None
            result = {"nodes": self._neighbors(req.key, exclude=sender.id)}
            value = self.storage.get(req.key)
            if value is not None:
                result["value"] = value
                result["seen"] = self.storage.first_seen(req.key)
        else:
            result = self._on_mailbox_request(req)
        self._send(wire.encode_response(req.msg_id, result), address)

    def _on_mailbox_request(self, req: wire.DHTRequest) -> Any:
        boxes = self.mailboxes
        if req.method == "mailbox_put":
            assert req.key is not None and req.value is not None
            return boxes is not None and boxes.put(req.key, req.value)
        assert req.owner_key is not None and req.timestamp is not None
        assert req.signature is not None
        if req.method == "mailbox_fetch":
            assert req.after is not None
            page = (
                None
                if boxes is None
                else boxes.fetch(req.owner_key, req.timestamp, req.after, req.signature)
            )
            entries, more = page if page is not None else ([], False)
            return {"entries": [list(e) for e in entries], "more": more}
        assert req.ids is not None
        if boxes is None:
            return 0
        return boxes.delete(req.owner_key, req.timestamp, req.ids, req.signature) or 0

    def _neighbors(self, key: bytes, exclude: bytes) -> list[list[Any]]:
        nodes = self.table.closest(key, self.config.ksize, exclude=exclude)
        return wire.encode_contacts([wire.Contact(n.id, wire.Address(n.ip, n.port)) for n in nodes])

    def _on_response(self, msg_id: bytes, payload: bytes, address: Address, now: float) -> None:
        pending = self._pending.get(msg_id)
        if pending is None or pending.address != address:
            self.stats["unexpected_replies"] += 1
            return
        del self._pending[msg_id]
        self.rtt.sample(address, now - pending.sent_at)
        self.stats["replies_in"] += 1
        result: wire.DHTResult | None
        try:
            result = wire.decode_response(pending.method, payload)
        except WireError:
            result = None
            self.stats["malformed"] += 1
        self._finish(pending, result, now)

    def _finish(self, pending: _Pending, result: wire.DHTResult | None, now: float) -> None:
        if not pending.probe:
            self.note_reply(pending.node, result, now)
        if pending.owner is not None:
            pending.owner.rpc_done(pending.node, result, now)

    # ------------------------------------------------------------------ outbound

    def request(
        self,
        node: Node,
        method: str,
        args: list[Any],
        now: float,
        owner: RpcOwner | None = None,
        *,
        probe: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Send one RPC; ``owner`` hears of its reply or its loss (after ``timeout``,
        by default the configured ``rpc_timeout``)."""
        self.now = max(self.now, now)
        msg_id = self._randbytes(wire.MSG_ID_LEN)
        address = (node.ip, node.port)
        try:
            frame = wire.encode_request(msg_id, method, [self.node_id, *args])
        except WireError:
            log.exception("could not encode a %s request", method)
            if owner is not None:
                owner.rpc_done(node, None, now)
            return
        self._pending[msg_id] = _Pending(node, address, method, now, owner, probe)
        if owner is not None:
            self._schedule(now + self.rtt.rto(address), _SOFT, msg_id)
        hard = self.config.rpc_timeout if timeout is None else timeout
        self._schedule(now + hard, _HARD, msg_id)
        self.stats["requests_out"] += 1
        self._send(frame, address)

    # ------------------------------------------------------------------ contacts

    def seen(self, node: Node, now: float) -> None:
        """``node`` spoke to us (or answered): add or refresh it in the routing table."""
        if node.id == self.node_id:
            return
        new = not self.table.contains(node.id)
        head = self.table.add(node, now)
        if head is not None:
            if head.id not in self._checking:
                self._checking.add(head.id)
                self.request(head, "ping", [], now, _HeadCheck(self, head))
        elif new:
            self._welcome(node, now)

    def _welcome(self, node: Node, now: float) -> None:
        """Hand a newcomer the records it should now hold (Kademlia section 2.5), if we
        are the closest holder of each. Only a newcomer in our own bucket can be among the
        k closest to what we hold; only the keys nearest its id are checked."""
        if len(self.storage) == 0 or not self.table.in_own_bucket(node):
            return
        k = self.config.ksize
        for key, value in self.storage.near(node.id, WELCOME_SCAN):
            target = int.from_bytes(key, "big")
            neighbors = self.table.closest(key, k, exclude=node.id)
            newcomer = node.long_id ^ target
            close = len(neighbors) < k or newcomer < (neighbors[-1].long_id ^ target)
            first = not neighbors or (self.node.long_id ^ target) < (neighbors[0].long_id ^ target)
            if close and first:
                self.stats["welcome_stores"] += 1
                self.request(node, "store", [key, value], now)

    def is_suspect(self, node_id: bytes, now: float) -> bool:
        until = self._suspect_until.get(node_id)
        if until is None:
            return False
        if until < now:
            del self._suspect_until[node_id]
            return False
        return True

    def mark_suspect(self, node_id: bytes, now: float) -> None:
        """Skip this node in lookups for a while; any word from it clears that."""
        if len(self._suspect_until) >= SUSPECTS_MAX:
            self._suspect_until = {k: v for k, v in self._suspect_until.items() if v > now}
            if len(self._suspect_until) >= SUSPECTS_MAX:
                self._suspect_until.clear()
        self._suspect_until[node_id] = now + self.config.suspect_period

    def clear_suspect(self, node_id: bytes) -> None:
        self._suspect_until.pop(node_id, None)

    def note_reply(self, node: Node, result: wire.DHTResult | None, now: float) -> None:
        """Account for a request's outcome: welcome a live node, evict a dead one."""
        if result is None:
            self.mark_suspect(node.id, now)
            count = self._failures.get(node.id, 0) + 1
            if count >= self.config.failures_before_eviction:
                self._failures.pop(node.id, None)
                if self.table.remove(node.id):
                    self.stats["evictions"] += 1
            else:
                self._failures[node.id] = count
            return
        self._failures.pop(node.id, None)
        self._suspect_until.pop(node.id, None)
        self.seen(node, now)

    # ------------------------------------------------------------------ operations

    def start_lookup(
        self,
        target: bytes,
        now: float,
        on_done: Callable[[LookupResult], None],
        *,
        find_value: bool = False,
        seeds: list[Node] | None = None,
    ) -> None:
        self.now = max(self.now, now)
        config = self.config
        lookup = Lookup(
            target,
            find_value=find_value,
            k=config.ksize,
            alpha=config.alpha,
            max_rpcs=config.lookup_max_rpcs,
            quorum=config.value_quorum,
            started=now,
            deadline=now + config.lookup_deadline,
            own_id=self.node_id,
            seeds=seeds if seeds is not None else self.table.closest(target, config.ksize),
            skip=lambda node_id: self.is_suspect(node_id, self.now),
        )
        self.table.touch(target, now)
        run = _LookupRun(self, lookup, on_done)
        self._schedule(lookup.deadline, _DEADLINE, run)
        run.pump(now)

    def among_closest(self, key: bytes, closest: list[Node]) -> bool:
        """Whether this node is among the k closest to ``key``, given a lookup's result."""
        if len(closest) < self.config.ksize:
            return True
        target = int.from_bytes(key, "big")
        return bool((self.node.long_id ^ target) < max(n.long_id ^ target for n in closest))

    def gather(
        self,
        calls: list[tuple[Node, str, list[Any]]],
        now: float,
        on_done: Callable[[list[wire.DHTResult | None]], None],
    ) -> None:
        """Send several requests; ``on_done`` gets every result, in order, once all ended."""
        _Gather(self, calls, on_done).start(now)

    def _put_at(
        self,
        nodes: list[Node],
        method: str,
        key: bytes,
        value: bytes,
        local: int,
        on_done: Callable[[int], None],
    ) -> None:
        """Send ``method(key, value)`` to each node; report ``local`` + the acceptances."""
        self.gather(
            [(n, method, [key, value]) for n in nodes],
            self.now,
            lambda replies: on_done(local + sum(1 for r in replies if r is True)),
        )

    def start_store(
        self, key: bytes, value: bytes, now: float, on_done: Callable[[int], None]
    ) -> None:
        """Store at the k closest nodes (and here, if among them); reports the copies."""

        def found(result: LookupResult) -> None:
            local = 0
            if self.among_closest(key, result.closest):
                local = int(self.storage.offer(key, value) in (Verdict.ACCEPT, Verdict.SAME))
            self._put_at(result.closest, "store", key, value, local, on_done)

        self.start_lookup(key, now, found)

    def start_resolve(
        self,
        key: bytes,
        now: float,
        wall: float,
        accept_key: Callable[[bytes], bool],
        on_done: Callable[[tuple[Resolution, LookupResult]], None],
    ) -> None:
        """Which claim under ``key`` to believe (p2pd/claims.py), among the keys that
        ``accept_key`` allows."""

        def found(result: LookupResult) -> None:
            answers = [Answer(n.id, n.ip, v, result.seen.get(n.id)) for n, v in result.values]
            local = self.storage.get(key)
            resolution = resolve_claims(
                answers,
                wall,
                key=key,
                accept_key=accept_key,
                local=local,
                defences=self.config.defences,
            )
            best = resolution.record
            if resolution.status == "ok" and best is not None:
                # Repair (Kademlia section 2.3): only the closest replicas that hold an
                # older record of the same key get the newest; a replica holding another
                # key, or nothing, is left to the storage rule and to replication.
                encoded = best.encode()
                closest = {n.id for n in result.closest}
                for node, value in result.values:
                    if node.id in closest and value != encoded and _older(value, best, wall):
                        self.stats["repair_stores"] += 1
                        self.request(node, "store", [key, encoded], self.now)
                if local is not None and local != encoded:
                    self.storage.offer(key, encoded)
            on_done((resolution, result))

        self.start_lookup(key, now, found, find_value=True)

    def start_bootstrap(
        self, addresses: list[Address], now: float, on_done: Callable[[int], None]
    ) -> None:
        """Ping the given addresses, then look up our own id. Reports contacts known."""
        probes = [Node(bytes(wire.NODE_ID_LEN), host, port) for host, port in addresses]

        def pinged(replies: list[wire.DHTResult | None]) -> None:
            seeds = []
            for probe, reply in zip(probes, replies, strict=True):
                if isinstance(reply, bytes) and reply != self.node_id:
                    node = Node(reply, probe.ip, probe.port)
                    self.seen(node, self.now)
                    seeds.append(node)
            if not seeds:
                on_done(len(self.table))
                return
            # We hear the network again: what went silent while we could not reach
            # anyone (a partition, a laptop asleep, our own link down) deserves another
            # chance, instead of being skipped for suspect_period.
            self._suspect_until.clear()
            self._failures.clear()
            self.start_lookup(
                self.node_id, self.now, lambda _: on_done(len(self.table)), seeds=seeds
            )

        _Gather(self, [(p, "ping", []) for p in probes], pinged, probe=True).start(now)

    # ------------------------------------------------------------------ mailboxes

    def _mailbox_nodes(
        self, owner: bytes, now: float, then: Callable[[bytes, list[Node], bool], None]
    ) -> None:
        key = mailbox_key(owner)
        self.start_lookup(
            key,
            now,
            lambda result: then(key, result.closest, self.among_closest(key, result.closest)),
        )

    def start_mailbox_put(
        self, owner: bytes, entry: bytes, now: float, on_done: Callable[[int], None]
    ) -> None:
        """Leave ``entry`` in ``owner``'s mailbox on the k closest nodes; reports copies."""

        def found(key: bytes, nodes: list[Node], local: bool) -> None:
            stored = int(local and self.mailboxes is not None and self.mailboxes.put(key, entry))
            self._put_at(nodes, "mailbox_put", key, entry, stored, on_done)

        self._mailbox_nodes(owner, now, found)

    def start_mailbox_fetch(
        self,
        owner: bytes,
        sign: Callable[[bytes], bytes],
        wall: Callable[[], float],
        now: float,
        on_done: Callable[[list[tuple[bytes, bytes]]], None],
    ) -> None:
        """Every entry in ``owner``'s mailbox, from every node that holds a copy."""

        def found(key: bytes, nodes: list[Node], local: bool) -> None:
            fetch = _MailboxFetch(self, owner, sign, wall, nodes, on_done)
            if local and self.mailboxes is not None:
                after = b""
                for _ in range(MAILBOX_MAX_PAGES):
                    ts, sig = fetch.signed(after)
                    page = self.mailboxes.fetch(owner, ts, after, sig)
                    if not page or not page[0]:
                        break
                    fetch.found.update(page[0])
                    after = page[0][-1][0]
                    if not page[1]:
                        break
            fetch.start(self.now)

        self._mailbox_nodes(owner, now, found)

    def start_mailbox_delete(
        self,
        owner: bytes,
        ids: list[bytes],
        sign: Callable[[bytes], bytes],
        wall: Callable[[], float],
        now: float,
        on_done: Callable[[int], None],
    ) -> None:
        """Delete entries (that the owner has safely processed) from every copy."""

        def found(key: bytes, nodes: list[Node], local: bool) -> None:
            deleted = 0
            calls: list[tuple[Node, str, list[Any]]] = []
            for start in range(0, len(ids), wire.MAILBOX_DELETE_MAX):
                chunk = tuple(ids[start : start + wire.MAILBOX_DELETE_MAX])
                ts = int(wall())
                sig = sign(delete_message(owner, ts, chunk))
                if local and self.mailboxes is not None:
                    deleted += self.mailboxes.delete(owner, ts, chunk, sig) or 0
                calls += [(n, "mailbox_delete", [owner, ts, list(chunk), sig]) for n in nodes]

            def done(replies: list[wire.DHTResult | None]) -> None:
                counts = (r for r in replies if isinstance(r, int) and not isinstance(r, bool))
                on_done(deleted + sum(counts))

            self.gather(calls, self.now, done)

        self._mailbox_nodes(owner, now, found)

    # ------------------------------------------------------------------ maintenance

    def _maintain(self, now: float) -> None:
        """Forget what expired, refresh lonely buckets, re-replicate stored records."""
        self.storage.cull()
        if self.mailboxes is not None:
            self.mailboxes.cull()
        for low, high in self.table.stale_buckets(now, self.config.refresh_interval):
            span = max(high - low, 1)
            target = low + int.from_bytes(self._randbytes(20), "big") % span
            self.stats["refresh_lookups"] += 1
            self.start_lookup(target.to_bytes(20, "big"), now, lambda _: None)
        due = self.storage.older_than(self.config.replicate_interval)
        for key, value in due[:REPLICATE_BATCH]:
            self.storage.mark_replicated(key)
            self.stats["replications"] += 1
            self.start_store(key, value, now, lambda _: None)

    # ------------------------------------------------------------------ introspection

    def statistics(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id.hex(),
            "routing_table_size": len(self.table),
            "records_stored": len(self.storage),
            "mailbox_entries_held": self.mailboxes.count() if self.mailboxes else 0,
            "refused_records": dict(self.storage.refused),
            "rotated_claims": self.storage.rotated,
            "counters": dict(self.stats),
        }

    def contacts(self) -> list[tuple[bytes, str, int]]:
        return [(n.id, n.ip, n.port) for n in self.table]


# ---------------------------------------------------------------------- operations


def _older(value: bytes, newest: HandleRecord, wall: float) -> bool:
    """Whether ``value`` is a valid claim by ``newest``'s key with a lower sequence number."""
    try:
        record = verify_claim(value, wall, key=newest.key)
    except WireError:
        return False
    return record.public_key == newest.public_key and record.seq < newest.seq


class _LookupRun:
    """Drives a :class:`Lookup` with the core's requests and timers."""

    __slots__ = ("core", "finished", "lookup", "on_done")

    def __init__(
        self, core: DHTCore, lookup: Lookup, on_done: Callable[[LookupResult], None]
    ) -> None:
        self.core = core
        self.lookup = lookup
        self.on_done = on_done
        self.finished = False

    def pump(self, now: float) -> None:
        if self.finished:
            return
        lookup = self.lookup
        for node in lookup.next_requests(now):
            self.core.request(node, lookup.method, [lookup.target], now, self)
        if lookup.done:
            self.finished = True
            self.on_done(lookup.result)

    def rpc_done(self, node: Node, result: wire.DHTResult | None, now: float) -> None:
        if self.finished:
            return
        if result is None:
            self.lookup.failed(node.id)
        elif self.lookup.replied(node.id, result):
            # Its reply came after our own "slow" mark: clear the suspicion again.
            self.core.clear_suspect(node.id)
        self.pump(now)

    def rpc_slow(self, node: Node, now: float) -> None:
        if self.finished:
            return
        if self.lookup.slow(node.id):
            # Other lookups need not wait on it too; a late reply clears this.
            self.core.mark_suspect(node.id, now)
            self.core.stats["soft_timeouts"] += 1
            self.pump(now)


class _Gather:
    """Several requests at once; one callback with every result when all have ended."""

    __slots__ = ("calls", "core", "left", "on_done", "probe", "results")

    def __init__(
        self,
        core: DHTCore,
        calls: list[tuple[Node, str, list[Any]]],
        on_done: Callable[[list[wire.DHTResult | None]], None],
        *,
        probe: bool = False,
    ) -> None:
        self.core = core
        self.calls = calls
        self.on_done = on_done
        self.probe = probe
        self.results: dict[int, wire.DHTResult | None] = {}
        self.left = len(calls)

    def start(self, now: float) -> None:
        if not self.calls:
            self.on_done([])
            return
        for index, (node, method, args) in enumerate(self.calls):
            self.core.request(node, method, args, now, _Slot(self, index), probe=self.probe)

    def done(self, index: int, result: wire.DHTResult | None) -> None:
        self.results[index] = result
        self.left -= 1
        if self.left == 0:
            self.on_done([self.results[i] for i in range(len(self.calls))])


class _Slot:
    __slots__ = ("gather", "index")

    def __init__(self, gather: _Gather, index: int) -> None:
        self.gather = gather
        self.index = index

    def rpc_done(self, node: Node, result: wire.DHTResult | None, now: float) -> None:
        self.gather.done(self.index, result)

    def rpc_slow(self, node: Node, now: float) -> None:
        pass


class _HeadCheck:
    """The head of a full bucket was pinged: silent, it makes room for the newcomer."""

    __slots__ = ("core", "head")

    def __init__(self, core: DHTCore, head: Node) -> None:
        self.core = core
        self.head = head

    def rpc_done(self, node: Node, result: wire.DHTResult | None, now: float) -> None:
        self.core._checking.discard(self.head.id)
        if result is None and self.core.table.remove(self.head.id):
            self.core.stats["evictions"] += 1

    def rpc_slow(self, node: Node, now: float) -> None:
        pass


class _MailboxFetch:
    """Pages of one mailbox from each of several nodes, deduplicated by entry id."""

    def __init__(
        self,
        core: DHTCore,
        owner: bytes,
        sign: Callable[[bytes], bytes],
        wall: Callable[[], float],
        nodes: list[Node],
        on_done: Callable[[list[tuple[bytes, bytes]]], None],
    ) -> None:
        self.core = core
        self.owner = owner
        self.sign = sign
        self.wall = wall
        self.nodes = nodes
        self.on_done = on_done
        self.found: dict[bytes, bytes] = {}
        self.pages: dict[bytes, int] = {}
        self.left = len(nodes)

    def signed(self, after: bytes) -> tuple[int, bytes]:
        ts = int(self.wall())
        return ts, self.sign(fetch_message(self.owner, ts, after))

    def start(self, now: float) -> None:
        if not self.nodes:
            self.on_done(sorted(self.found.items()))
            return
        for node in self.nodes:
            self._ask(node, b"", now)

    def _ask(self, node: Node, after: bytes, now: float) -> None:
        self.pages[node.id] = self.pages.get(node.id, 0) + 1
        ts, sig = self.signed(after)
        self.core.request(node, "mailbox_fetch", [self.owner, ts, after, sig], now, self)

    def rpc_done(self, node: Node, result: wire.DHTResult | None, now: float) -> None:
        if isinstance(result, wire.MailboxPage) and result.entries:
            for ident, entry in result.entries:
                if entry_id(entry) == ident:  # a node cannot rewrite an entry unseen
                    self.found[ident] = entry
            if result.more and self.pages[node.id] < MAILBOX_MAX_PAGES:
                self._ask(node, result.entries[-1][0], now)
                return
        self.left -= 1
        if self.left == 0:
            self.on_done(sorted(self.found.items()))

    def rpc_slow(self, node: Node, now: float) -> None:
        pass
