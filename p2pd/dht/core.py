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

What this node does with what it hears, and why (stock kademlia hardened: the table
"What changed against stock kademlia's behaviour" in docs/ARCHITECTURE.md, and
docs/SECURITY.md), is mostly kept in modules of their own, which the core calls:

- frames: :mod:`p2pd.wire` (bounded and type-checked; malformed: dropped and counted);
- earned ids: :mod:`.proofs`; budgets, quotas and reply sizes: :mod:`.budget`;
- contacts gone silent: :mod:`.suspects`; adaptive timeouts: :mod:`.rtt`, :mod:`.pacing`;
- address limits and the density rule: :mod:`.routing`, :mod:`.density`;
- the first-claim rule: :mod:`.storage`; lookups: :mod:`.lookup`, :mod:`.disjoint`;
- operations: :mod:`.operations`, :mod:`.resolve`, :mod:`.mailbox_ops` (methods of the
  core, bound as class attributes); figures for ``status``: :mod:`.introspection`.

Kept here: matching a reply to its request by message id *and* address, answering
requests within their budget, the routing table's upkeep (a full bucket's head pinged,
a contact evicted after ``failures_before_eviction`` lost replies), the records a
newcomer is handed (at most ``2 * WELCOME_SCAN``), the density rule's view of our table.
"""

from __future__ import annotations

import functools
import heapq
import logging
import os
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from .. import wire
from ..config import DHTConfig
from ..errors import OldFrameVersion, WireError
from ..records import Verdict
from . import introspection, mailbox_ops, operations, resolve
from .budget import RequestBudget, fit_reply
from .density import SizeEstimate, SpreadLimit, full_depths
from .disjoint import DisjointLookup
from .mailbox import MailboxStorage
from .mailbox_find import FindRelay, find_requested
from .mailbox_relay import PutRelay, relay_requested
from .nodekey import NodeKey
from .operations import Gather, HeadCheck, LookupRun
from .pacing import PacedRun
from .proofs import Proofs
from .reachability import Reachability
from .result import LookupResult
from .routing import AddressLimit, Node, RoutingTable
from .rtt import RttTable
from .sampling import SizeSampler
from .storage import RecordStorage
from .suspects import Suspects

log = logging.getLogger(__name__)

Address = tuple[str, int]
#: A newcomer in our own bucket is offered at most twice this many records.
WELCOME_SCAN = 8

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
    #: A request whose outcome says nothing of the node's place in our table: a ping to
    #: an address whose id we do not know yet (bootstrap), or a proving ping to a sender.
    probe: bool
    #: The reply must carry a valid signature by the node's key.
    prove: bool
    #: Sent under a one-off sender key (a mailbox put): never prove ourselves for it.
    anonymous: bool = False


@functools.lru_cache(maxsize=16384)
def _wire_contact(node_key: bytes, host: str, port: int) -> tuple[Any, ...]:
    """A contact as a find reply names it (``wire.encode_contacts``), checked once per
    (key, host, port): the same contacts go out in reply after reply, and building a
    checked ``Contact``/``Address`` for each of the 32 per reply was 8 % of the CPU of
    building a 200-core network (cProfile, tests/test_dht_core.py's CoreNet)."""
    (contact,) = wire.encode_contacts([wire.Contact(node_key, wire.Address(host, port))])
    return tuple(contact)


class DHTCore:
    """One DHT node's protocol state: routing table, pending requests, operations."""

    def __init__(
        self,
        node_key: NodeKey,
        config: DHTConfig,
        storage: RecordStorage,
        mailboxes: MailboxStorage | None,
        now: float,
        *,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.node_key = node_key
        self.node_id = node_id = node_key.node_id
        self.node = Node(node_id, key=node_key.public_key)
        self.config = config
        #: How many closest nodes hold a handle record (DHTConfig.claim_factor).
        self.replicas = max(1, config.claim_factor) * config.ksize
        self.storage = storage
        self.mailboxes = mailboxes
        #: The Sybil defences, off only in benchmarks (DHTConfig.defences).
        self.defended = config.defences
        self.limit = (
            AddressLimit(config.max_per_ip, config.max_per_subnet) if self.defended else None
        )
        self.table = RoutingTable(node_id, config.ksize, now, self.limit)
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
        #: Lost replies per contact, and until when lookups skip it (:mod:`.suspects`).
        self.suspects = Suspects(config.suspect_period, config.failures_before_eviction)
        self._checking: set[bytes] = set()  # heads of full buckets being pinged
        #: Request rates, storage quotas, reply sizes (:mod:`.budget`).
        self.budget = budget = RequestBudget(config)
        #: Which (id, address) pairs proved their key; our address cookies (:mod:`.proofs`).
        self.proofs = Proofs(node_key, config, budget, self.stats, randbytes)
        self._size_in = 0
        self.put_relay = PutRelay()  # relaying others' mailbox puts (mailbox_relay.py)
        self.find_relay = FindRelay()  # and their lookups before (mailbox_find.py)
        storage.quota = budget.records
        if mailboxes is not None:
            mailboxes.quota = budget.mailbox
            mailboxes.postage_bits = config.postage_bits  # p2pd/dht/mailbox_entry.py
        self._maintenance_period = min(config.refresh_interval, config.replicate_interval) / 4
        self.reach = Reachability(self, now)  # address discovery, dial-back, client mode
        #: The network's size, for the density rule (p2pd/dht/density.py).
        self.sizes = SizeEstimate()
        #: When to take size samples, and what waits for one (p2pd/dht/sampling.py).
        self.sampler = SizeSampler(self, randbytes)
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
                    self.budget.forget(pending.address)  # pad the next request there
                    self._finish(pending, None, now)
            elif kind == _DEADLINE:
                ref.pump(now)
            else:
                self._maintain(now)
                self._schedule(now + self._maintenance_period, _MAINTAIN, None)

    def schedule_pump(self, when: float, ref: Any) -> None:
        """``ref.pump(now)`` at ``when`` (a lookup's deadline, the sampler's top-up)."""
        self._schedule(when, _DEADLINE, ref)

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
                if self.budget.allow(payload, address, now):  # before decoding it
                    self._size_in = len(data)  # what a reply to it may weigh
                    self._on_request(wire.decode_request(msg_id, payload), address, now)
            else:
                self._on_response(msg_id, payload, address, now)
        except OldFrameVersion:
            self.stats["old_version"] += 1
            self.budget.log_old_version(address[0], now)
        except WireError as exc:
            self.stats["malformed"] += 1
            log.debug("dropped malformed DHT datagram from %s: %s", address, exc)

    def _on_request(self, req: wire.DHTRequest, address: Address, now: float) -> None:
        sender_id = req.sender_id
        if sender_id == self.node_id:
            self.stats["malformed"] += 1
            return
        sender = Node(sender_id, address[0], address[1], req.sender_key)
        if req.method == "proof":  # never answered
            if self.proofs.on_proof(req, sender, now):
                self.suspects.heard_from(sender.id)
                if self.table.wants(sender):  # (every unproven sender gets a cookie: budget.py)
                    self.seen(sender, now)
            return
        if req.method == "dialed":  # a dial-back nonce (p2pd/dht/reachability.py)
            return self.reach.dialed(req, address, now)
        self.stats["requests_in"] += 1
        cookie = self.note_sender(sender, now)
        result: Any
        if req.method == "ping":
            result = self.node_key.public_key
        elif req.method == "store":
            assert req.key is not None and req.value is not None
            if self.defended and not self.is_close_to(req.key, self.replicas):
                self.stats["store_refused_far"] += 1
                result = False
            else:
                verdict = self.storage.offer(req.key, req.value, source=address[0])
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
        elif req.method == "dialback":
            result = self.reach.dialback_requested(req, address, now)
        elif req.method == "mailbox_relay":  # answered once the storing node has
            return relay_requested(self, req, address, cookie, self._size_in, now)
        elif req.method == "mailbox_find":  # answered once our lookup has ended
            return find_requested(self, req, address, cookie, self._size_in, now)
        else:
            result = mailbox_ops.on_mailbox_request(self, req, address[0])
        self.answer(req, address, cookie, result, self._size_in, now)

    def note_sender(self, sender: Node, now: float) -> bytes | None:
        """A request came from ``sender`` (its key as the request named it, the datagram's
        source as its address): refresh it in the table if it proved that pair, else
        return the cookie our reply should carry (a proof validates its address)."""
        if not self.defended or self.proofs.is_verified(sender.id, (sender.ip, sender.port), now):
            self.suspects.heard_from(sender.id)
            self.seen(sender, now)
            return None
        return self.proofs.cookie_for(sender, now)  # prove yourself: send it back, signed

    def answer(
        self,
        req: wire.DHTRequest,
        address: tuple[str, int],
        cookie: bytes | None,
        result: Any,
        size_in: int,
        now: float,
    ) -> None:
        """Send ``result`` for ``req`` (of ``size_in`` bytes): signed if asked (for a
        source not validated, within the signature budget), and while the source is not
        validated (``cookie``) cut to the request's size, or dropped if it cannot be."""
        sign = None
        if req.prove:
            if cookie is not None and not self.budget.unvalidated_signatures.take(None, 1.0, now):
                self.budget.dropped["unvalidated_limited_signature"] += 1
                return
            self.stats["proofs_signed"] += 1
            sign = self.node_key.sign
        if cookie is not None:  # not validated: no reply larger than the request
            result, fits = fit_reply(
                req.method, result, size_in, signed=sign is not None, cookie=True
            )
            if not fits:
                self.budget.dropped["reply_too_large_" + req.method] += 1
                return
        self._send(wire.encode_response(req.msg_id, result, sign, cookie, address), address)

    def _neighbors(self, key: bytes, exclude: bytes) -> list[tuple[Any, ...]]:
        nodes = self.table.closest(key, wire.MAX_CONTACTS, exclude=exclude)
        return [_wire_contact(n.key, n.ip, n.port) for n in nodes if n.key is not None]

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
            raw, signature, cookie, observed = wire.split_response_observed(payload)
            result = wire.decode_response(pending.method, raw)
        except WireError:
            result = None
            self.stats["malformed"] += 1
        else:
            key = pending.node.key
            if pending.prove:
                key = self.proofs.check_reply(pending, msg_id, raw, signature, result, address, now)
                if key is None:
                    result = None
            if observed is not None and result is not None:
                self.reach.observed(address, observed, now)
            # Our address is (or will be) valid there, unless the proof is withheld (client
            # mode): then it still cuts what it sends us, so we go on padding. Never for an
            # anonymous request: a proof would name our node key.
            if result is not None and not pending.anonymous:
                valid = not cookie or (key is not None and self._send_proof(key, cookie, address))
                if valid:
                    self.budget.note_reply(address, now)
        self._finish(pending, result, now)

    def _send_proof(self, responder_key: bytes, cookie: bytes, address: Address) -> bool:
        """Our proof for a node's cookie (:meth:`.Proofs.proof`); False if withheld."""
        if not self.reach.may_prove(responder_key, cookie, address):
            return False  # client mode, or not decided yet (p2pd/dht/reachability.py)
        self._send(self.proofs.proof(responder_key, cookie), address)
        return True

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
        anonymous: bool = False,
    ) -> bytes | None:
        """Send one RPC; ``owner`` hears of its reply or its loss (after ``timeout``,
        by default the configured ``rpc_timeout``). The reply must prove the node's key
        if it is a find_value (always), or, with the defences on, a probe or a request
        to a node that has not proved its id from that address lately. ``anonymous``:
        under a one-off random sender key instead of our node key, never proven (the
        receiver answers but does not add the sender; a mailbox put is not linked to
        this node's other puts or traffic by its key). Returns the request's message
        id (None: it could not be encoded, and ``owner`` heard so)."""
        self.now = max(self.now, now)
        msg_id = self._randbytes(wire.MSG_ID_LEN)
        address = (node.ip, node.port)
        prove = method == "find_value" or (
            self.defended and (probe or not self.proofs.is_verified(node.id, address, now))
        )
        try:
            sender = self._randbytes(32) if anonymous else self.node_key.public_key
            pad = self.budget.padding(method, address, now, anonymous=anonymous)
            frame = wire.encode_request(msg_id, method, [sender, *args], prove, pad)
        except WireError:
            log.exception("could not encode a %s request", method)
            if owner is not None:
                owner.rpc_done(node, None, now)
            return None
        self._pending[msg_id] = _Pending(node, address, method, now, owner, probe, prove, anonymous)
        if owner is not None:
            self._schedule(now + self.rtt.rto(address), _SOFT, msg_id)
        hard = self.config.rpc_timeout if timeout is None else timeout
        self._schedule(now + hard, _HARD, msg_id)
        self.stats["requests_out"] += 1
        self._send(frame, address)
        return msg_id

    def soft_check(self, msg_id: bytes, when: float) -> None:
        """Tell the owner of request ``msg_id`` ``rpc_slow`` at ``when`` as well, if it is
        still unanswered then (a lookup's own pace: p2pd/dht/pacing.py)."""
        self._schedule(when, _SOFT, msg_id)

    # ------------------------------------------------------------------ contacts

    def seen(self, node: Node, now: float) -> None:
        """``node`` spoke to us (or answered): add or refresh it in the routing table."""
        if node.id == self.node_id or node.key is None:
            return
        new = not self.table.contains(node.id)
        head = self.table.add(node, now)
        if head is not None:
            if head.id not in self._checking:
                self._checking.add(head.id)
                self.request(head, "ping", [], now, HeadCheck(self, head))
        elif new and self.table.contains(node.id):
            self._welcome(node, now)
            if len(self.table) >= 2 * self.config.ksize:
                # Enough contacts for an estimate from the table: a sample at once (in
                # the background), so that the first resolve need not wait for one
                # (resume: only when none runs and no top-up is planned, which after
                # the first is always the case: p2pd/dht/sampling.py).
                self.sampler.resume(now)

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
        """Whether lookups skip ``node_id`` now (:meth:`.Suspects.is_suspect`; a method
        of the core so that a test can stand in for it on one instance)."""
        return self.suspects.is_suspect(node_id, now)

    def note_reply(self, node: Node, result: wire.DHTResult | None, now: float) -> None:
        """Account for a request's outcome: welcome a live node, evict a dead one."""
        if result is None:
            if self.suspects.lost(node.id, now) and self.table.remove(node.id):
                self.stats["evictions"] += 1
            return
        self.suspects.heard_from(node.id)
        self.seen(node, now)

    # ------------------------------------------------------------------ the density rule
    # Our table seen through p2pd/dht/density.py: where we store, where a lookup starts.
    # Kept here: each reads the core's own table, limits, size estimate and clock, and
    # scripts/_adversary_diagnostics.py wraps ``is_close_to`` on the core instance.

    def is_close_to(self, key: bytes, k: int | None = None) -> bool:
        """Whether fewer than k of the nodes we know are nearer ``key`` than we are: only
        then do we store under it (S/Kademlia: a node far from a key, e.g. an attacker's
        target, has no business holding it). Nodes packed around the key (:mod:`.density`)
        do not count: a ground cluster must not push the honest replicas out."""
        k = k or self.config.ksize
        target = int.from_bytes(key, "big")
        mine = self.node.long_id ^ target
        nearer = [n for n in self.table.closest(key, 4 * k) if (n.long_id ^ target) < mine]
        spread = self.spread_limit(key)
        return len(spread.select(nearer, k) if spread is not None else nearer) < k

    def spread_limit(self, target: bytes) -> SpreadLimit | None:
        """The address limits and the density rule for a lookup of ``target`` (None with
        the defences off)."""
        if self.limit is None:
            return None
        size = None
        if self.config.packed_check:
            # Every contact, not the 4k nearest ours: when our id shares many bits with
            # the target, the target's bucket (left out) can hold all 4k of them (a
            # cluster ground next to that key sits there), and the estimate fell back to
            # the few left (1-14 for a network of 1,000: p2pd/dht/density.py).
            size = self.sizes.estimate(
                self.node_id,
                self.table,
                self.config.ksize,
                self.now,
                target,
                len(self.table),
                self.table_depth(),  # (its depth bound too: the table walked once)
            )
        return SpreadLimit(self.limit, target, size)

    def table_depth(self) -> int | None:
        """Our table's full depths (p2pd/dht/density.py ``full_depths``)."""
        return full_depths(self.node_id, self.table, self.config.ksize)

    def lookup_seeds(self, target: bytes, k: int, limit: AddressLimit | None = None) -> list[Node]:
        """Where a lookup of ``target`` starts: our k contacts closest to it, and with
        the density rule every contact nearer than the k-th it admits (the ones it sets
        aside on the way come along: they are asked too, and their answers counted).

        A cluster ground next to a key fills our buckets near it: kademlia splits a full
        bucket whose contacts share a prefix that is not a multiple of 5 bits, and ids
        sharing 12 bits with the key do, so a node whose own id shares 6 or more with
        the key holds all 100 ids of a cluster, all of its 80 contacts nearest the key
        (tests/test_dht_density.py). Seeded with those alone, a lookup the cluster
        eclipses hears of nothing else: no honest replica answers, the self-certifying
        form is not found and the plain one went to the rival's 2-3 voters before the
        rule asked 8 (scripts/bench_adversary.py, N=1000, targeted /24s)."""
        if not isinstance(limit, SpreadLimit):
            limit = self.spread_limit(target)
        if not isinstance(limit, SpreadLimit) or limit.scale is None:
            return self.table.closest(target, k)
        ordered = self.table.closest(target, len(self.table))
        admitted = limit.select(ordered, k)
        if not admitted:
            return ordered[:k]
        return ordered[: max(k, ordered.index(admitted[-1]) + 1)]

    # ------------------------------------------------------------------ operations

    def start_lookup(
        self,
        target: bytes,
        now: float,
        on_done: Callable[[LookupResult], None],
        *,
        find_value: bool = False,
        seeds: list[Node] | None = None,
        claim_of: Callable[[bytes], bytes | None] = bytes,
        k: int | None = None,
        quorum: int | None = None,
        prior: dict[bytes, tuple[Node, wire.FindValueReply]] | None = None,
        patient: bool = False,
        again: Collection[bytes] = (),
        deadline: float | None = None,
        sample: bool = False,
    ) -> None:
        """``k``: how many closest nodes to find (default ksize); ``quorum``: a value
        lookup's early end (default value_quorum; k waits for all k); ``prior``: value
        replies already heard for ``target``, taken instead of asking those nodes;
        ``patient``: a value lookup waits for its slow contacts (lookup.py); ``again``:
        nodes asked even if suspect; ``deadline``: seconds (default lookup_deadline);
        ``sample``: a node lookup whose k closest are a size sample (SizeSampler.start),
        patient (it waits for the slow contacts that would rank among its k closest)."""
        self.now = max(self.now, now)
        config = self.config
        k = k or config.ksize
        # Disjoint paths for value lookups: what a lookup returns there is trusted (a
        # record, a replica's signed statement). A node lookup (where to store, refresh)
        # takes one path; its result is still held to the address limits.
        paths = config.disjoint_paths if self.defended and find_value else 1
        limit = self.spread_limit(target)
        if seeds is None:
            seeds = self.lookup_seeds(target, k, limit)
        if seeds and all(n.id not in again and self.is_suspect(n.id, self.now) for n in seeds):
            # Every seed suspect (a busy host's lookups gave up on each of its few
            # contacts, for 60 s): ask them anyway. Skipped, the lookup asked no one
            # and a resolve answered "not found" at once (test_upgrade_netns' "no
            # record for 'bob'" in a clean-clone CI run; tests/test_dht_core.py).
            again = {*again, *(n.id for n in seeds)}
        lookup = DisjointLookup(
            target,
            paths=paths,
            find_value=find_value,
            k=k,
            alpha=config.alpha,
            max_rpcs=config.lookup_max_rpcs,
            quorum=quorum or config.value_quorum,
            started=now,
            deadline=now + (config.lookup_deadline if deadline is None else deadline),
            own_id=self.node_id,
            seeds=seeds,
            skip=lambda node_id: node_id not in again and self.is_suspect(node_id, self.now),
            limit=limit,
            claim_of=claim_of,
            max_width=config.ksize,
            probe_from=config.ksize if k > config.ksize else 0,
            prior=prior,
            # A sample waits for its slow near contacts (lookup.py): it is read from
            # its k-th distance, and a resolve seldom waits for one.
            patient=patient or (sample and not find_value),
        )
        self.table.touch(target, now)
        if sample and not find_value and self.defended and len(self.table) >= 2 * config.ksize:
            on_done = self.sizes.sampling(target, k, now, self.table_depth(), on_done)  # a sample
        # A value lookup (a resolve, a mailbox fetch) also follows its own pace
        # (p2pd/dht/pacing.py). A node lookup does not: its k closest are a size sample
        # or where a store goes, and a live contact given up on sooner, on a busy host,
        # would leave them short (a sample too small sets honest replicas aside).
        run = (PacedRun if find_value else LookupRun)(self, lookup, on_done)
        self._schedule(lookup.deadline, _DEADLINE, run)
        run.pump(now)

    def among_closest(self, key: bytes, closest: list[Node], k: int | None = None) -> bool:
        """Whether this node is among the k closest to ``key``, given a lookup's result."""
        if len(closest) < (k or self.config.ksize):
            return True
        target = int.from_bytes(key, "big")
        return bool((self.node.long_id ^ target) < max(n.long_id ^ target for n in closest))

    def gather(
        self,
        calls: list[tuple[Node, str, list[Any]]],
        now: float,
        on_done: Callable[[list[wire.DHTResult | None]], None],
        *,
        anonymous: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Send several requests; ``on_done`` gets every result, in order, once all ended."""
        Gather(self, calls, on_done, anonymous=anonymous, timeout=timeout).start(now)

    def _put_at(
        self,
        nodes: list[Node],
        method: str,
        key: bytes,
        value: bytes,
        local: int,
        on_done: Callable[[int], None],
    ) -> None:
        """Send ``method(key, value)`` to each node; report ``local`` + the acceptances:
        a store's sends (operations.py ``start_store``; a mailbox put's are
        :class:`~.operations.MailboxPut`). On the core: scripts/_adversary_diagnostics.py
        wraps it per instance."""
        self.gather(
            [(n, method, [key, value]) for n in nodes],
            self.now,
            lambda replies: on_done(local + sum(1 for r in replies if r is True)),
        )

    # Store a handle record at the claim_factor * ksize closest (operations.py).
    start_store = operations.start_store

    # Which claim to believe, in up to three rounds (resolve.py).
    start_resolve = resolve.start_resolve

    # Ping the seeds, then look up our own id (operations.py).
    start_bootstrap = operations.start_bootstrap

    # Mailboxes: put, fetch and delete at the k closest to the mailbox key (mailbox_ops.py).
    start_mailbox_put = mailbox_ops.start_mailbox_put
    start_mailbox_fetch = mailbox_ops.start_mailbox_fetch
    start_mailbox_delete = mailbox_ops.start_mailbox_delete
    start_mailbox_revoke = mailbox_ops.start_mailbox_revoke

    # Forget what expired, refresh lonely buckets, re-replicate (operations.py).
    _maintain = operations.maintenance_round

    # What the node shows of itself, for ``status`` (introspection.py).
    statistics = introspection.statistics
    contacts = introspection.contacts
