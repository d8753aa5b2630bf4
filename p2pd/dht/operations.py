"""The DHT's operations as small state machines that the core drives (sans I/O, like
the core): a lookup run, several requests gathered, the bootstrap's pings to its seeds
(and ``start_bootstrap``, which starts them), a store (``start_store``: its lookup, then
the record to ``store_targets``), a full bucket's head check, the pages of a mailbox,
and the core's periodic round of refresh lookups and stores (``maintenance_round``).
Each owns the requests it sent and hears of their replies and timeouts through
:class:`~p2pd.dht.core.RpcOwner`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import wire
from ..claims import network_of
from ..errors import WireError
from ..records import HandleRecord, Verdict, verify_claim
from .disjoint import DisjointLookup
from .lookup import SAMPLE_PATIENCE, Lookup
from .mailbox import entry_id, fetch_message
from .result import LookupResult
from .routing import AddressLimit, Node

if TYPE_CHECKING:
    from .core import DHTCore

#: Most mailbox pages fetched from one node in one fetch.
MAILBOX_MAX_PAGES = 100
#: Most records re-replicated by one maintenance round (the rest wait for the next).
REPLICATE_BATCH = 32


def older_claim(value: bytes, newest: HandleRecord, wall: float) -> bool:
    """Whether ``value`` is a valid claim by ``newest``'s key with a lower sequence number."""
    try:
        record = verify_claim(value, wall, key=newest.key)
    except WireError:
        return False
    return record.public_key == newest.public_key and record.seq < newest.seq


def store_targets(
    result: LookupResult, key: bytes, k: int, limit: AddressLimit | None
) -> list[Node]:
    """Where a store sends a record after its node lookup: the ``k`` closest nodes that
    answered, and two kinds of node it found that rank among them but are not in them:

    - the answering nodes the density rule set aside as packed (p2pd/dht/density.py).
      A publisher whose size estimate is low (484-688 for a network of 1,000 happens)
      sets aside honest true replicas by the dozen, and stored its claim further out
      instead; those replicas then took a squatter's rival claim first, or answered a
      resolver without the owner's: "contested" (scripts/bench_adversary.py, N=1000,
      spread placement: 8-31 set aside, 4-19 honest replicas holding the rival). A
      copy at a packed node costs one request and gives a cluster there nothing it
      could not read anyway (a claim is public and signed); the replicas the rule
      admits further out get theirs as before;
    - the contacts it gave up on at their soft deadline (never heard by its end). A
      node lookup with k others heard does not wait for them, and on a busy host they
      are mostly live replicas whose reply came after the adaptive RTO (10 ms at its
      floor on loopback); silent ones cost the store one hard timeout;
    - the contacts that timed out (or answered malformed): a request or reply lost, or
      a host so busy its reply came after the hard timeout. At N=1000 under load the
      owner's store lookup (3-8 s) timed out on 3-20 contacts, true replicas among
      them, and those later took the squatter's rival (the contested lookups left
      after issue 11's cause 3). A dead one costs the store one more hard timeout; a
      hostile one gets a copy of a public, signed record.
    Both within the address limits beside the rest, and only where they rank among the
    nodes kept.

    tests/test_dht_late_replicas.py."""
    chosen = {n.id for n in result.closest}
    target = int.from_bytes(key, "big")
    aside = [n for n in result.packed_nodes if n.id not in chosen]
    chosen.update(n.id for n in aside)
    unheard = {n.id: n for n in result.given_up + result.timed_out if n.id not in chosen}
    late = sorted(unheard.values(), key=lambda n: n.long_id ^ target)
    if late and len(result.closest) >= k:
        edge = max(n.long_id ^ target for n in result.closest)
        late = [n for n in late if n.long_id ^ target < edge]
    if limit is not None:
        kept, admitted = result.closest + aside, []
        for node in late:
            if limit.admits(node, kept):
                kept.append(node)
                admitted.append(node)
        late = admitted
    return result.closest + aside + late


def start_store(
    core: DHTCore, key: bytes, value: bytes, now: float, on_done: Callable[[int], None]
) -> None:
    """Store a handle record at the ``claim_factor * ksize`` closest nodes (and here, if
    among them); reports the copies. (A method of :class:`~p2pd.dht.core.DHTCore`, bound
    there as a class attribute, as ``start_bootstrap`` is; it sends through
    ``core._put_at``, looked up on the instance at each store.)"""
    # The lookup may start later (after a size sample), at core.now: the clock must be
    # ours now. A core that heard nothing for a while held an old time, and a lookup
    # started at once under it was past its deadline before it asked anyone (a store
    # reached 1 replica of 7: tests/test_reachability.py, a NATed node after 60 s).
    core.now = max(core.now, now)
    replicas = core.replicas

    def found(result: LookupResult) -> None:
        local = 0
        if core.among_closest(key, result.closest, replicas):
            local = int(core.storage.offer(key, value) in (Verdict.ACCEPT, Verdict.SAME))
        # The set-aside and the late replicas too (store_targets).
        targets = store_targets(result, key, replicas, core.limit)
        core._put_at(targets, "store", key, value, local, on_done)

    core.sampler.after(now, lambda: core.start_lookup(key, core.now, found, k=replicas))


def maintenance_round(core: DHTCore, now: float) -> None:
    """Forget what expired, refresh lonely buckets, re-replicate stored records: the
    core's periodic round (its ``_maintain``, bound there as a class attribute). It
    only starts operations: refresh lookups and stores (``start_store``)."""
    core.storage.cull()
    if core.mailboxes is not None:
        core.mailboxes.cull()
    core.sampler.resume(now)  # the size samples topped up, if they stopped
    for low, high in core.table.stale_buckets(now, core.config.refresh_interval):
        span = max(high - low, 1)
        target = low + int.from_bytes(core._randbytes(20), "big") % span
        core.stats["refresh_lookups"] += 1
        core.start_lookup(target.to_bytes(20, "big"), now, lambda _: None)
    due = core.storage.older_than(core.config.replicate_interval)
    for key, value in due[:REPLICATE_BATCH]:
        core.storage.mark_replicated(key)
        core.stats["replications"] += 1
        core.start_store(key, value, now, lambda _: None)


class LookupRun:
    """Drives a :class:`Lookup` with the core's requests and timers."""

    __slots__ = ("core", "finished", "lookup", "on_done")

    def __init__(
        self,
        core: DHTCore,
        lookup: Lookup | DisjointLookup,
        on_done: Callable[[LookupResult], None],
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
            msg_id = self.core.request(
                node, lookup.method_for(node.id), [lookup.target_for(node.id)], now, self
            )
            if msg_id is not None:
                self.requested(node, msg_id, now)
        if lookup.done:
            self.finished = True
            self.ended()
            self.on_done(lookup.result)

    def requested(self, node: Node, msg_id: bytes, now: float) -> None:
        """A request to ``node`` went out (a subclass's hook: p2pd/dht/pacing.py)."""

    def ended(self) -> None:
        """The lookup is done, before ``on_done`` hears of it (a subclass's hook)."""

    def rpc_done(self, node: Node, result: wire.DHTResult | None, now: float) -> None:
        if self.finished:
            # Late, but a value reply is kept for the next round (Lookup.replied_after).
            # The node stays suspect as it was (a lookup that gave up on it marked it):
            # a slow node is still skipped by the lookups of the next 60 s.
            if result is not None:
                self.lookup.replied_after(node.id, result)
            return
        if result is None:
            self.lookup.failed(node.id)
        elif self.lookup.replied(node.id, result):
            # Its reply came after our own "slow" mark: clear the suspicion again.
            self.core.suspects.clear(node.id)
        self.pump(now)

    def rpc_slow(self, node: Node, now: float) -> None:
        if self.finished:
            return
        if self.lookup.slow(node.id):
            # Other lookups need not wait on it too; a late reply clears this.
            self.core.suspects.mark(node.id, now)
            self.core.stats["soft_timeouts"] += 1
            if self.lookup.waits_for_slow:  # a size sample waits a while longer
                self.core.schedule_pump(now + SAMPLE_PATIENCE, _PatienceOver(self, node))
            self.pump(now)

    def patience_over(self, node: Node, now: float) -> None:
        """A patient lookup's wait for a slow contact ran out (lookup.py SAMPLE_PATIENCE)."""
        if not self.finished and self.lookup.stop_waiting(node.id):
            self.pump(now)


class _PatienceOver:
    """The timer that ends a patient lookup's wait for one slow contact."""

    __slots__ = ("node", "run")

    def __init__(self, run: LookupRun, node: Node) -> None:
        self.run = run
        self.node = node

    def pump(self, now: float) -> None:
        self.run.patience_over(self.node, now)


class Gather:
    """Several requests at once; one callback with every result when all have ended."""

    __slots__ = ("anonymous", "calls", "core", "left", "on_done", "probe", "results", "timeout")

    def __init__(
        self,
        core: DHTCore,
        calls: list[tuple[Node, str, list[Any]]],
        on_done: Callable[[list[wire.DHTResult | None]], None],
        *,
        probe: bool = False,
        anonymous: bool = False,
        timeout: float | None = None,
    ) -> None:
        self.core = core
        self.calls = calls
        self.on_done = on_done
        self.probe = probe
        self.anonymous = anonymous
        self.timeout = timeout
        self.results: dict[int, wire.DHTResult | None] = {}
        self.left = len(calls)

    def start(self, now: float) -> None:
        if not self.calls:
            self.on_done([])
            return
        for index, (node, method, args) in enumerate(self.calls):
            self.core.request(
                node,
                method,
                args,
                now,
                Slot(self, index),
                probe=self.probe,
                anonymous=self.anonymous,
                timeout=self.timeout,
            )

    def done(self, index: int, result: wire.DHTResult | None) -> None:
        self.results[index] = result
        self.left -= 1
        if self.left == 0:
            self.on_done([self.results[i] for i in range(len(self.calls))])

    def went_slow(self, index: int) -> None:
        """Request ``index`` passed its soft deadline (a plain Gather waits on)."""


class SeedPings(Gather):
    """The bootstrap's pings to its seeds: a :class:`Gather` that is done once every seed
    answered or failed, or, after one seed answered, once each one left has passed its
    soft deadline: a dead seed (a saved contact gone since) no longer holds the join for
    the whole ``rpc_timeout`` (a restarted daemon was ready 4.7 s after its start
    instead of 0.8 s, test_messages_e2e). A seed that answers after that goes to
    ``on_late``."""

    __slots__ = ("finished", "on_late", "slow")

    def __init__(
        self,
        core: DHTCore,
        probes: list[Node],
        on_done: Callable[[list[wire.DHTResult | None]], None],
        on_late: Callable[[Node, wire.DHTResult], object],
    ) -> None:
        super().__init__(core, [(p, "ping", []) for p in probes], on_done, probe=True)
        self.on_late = on_late
        self.slow: set[int] = set()
        self.finished = False

    def done(self, index: int, result: wire.DHTResult | None) -> None:
        if self.finished:
            if result is not None:
                self.on_late(self.calls[index][0], result)
            return
        self.results[index] = result
        self._check()

    def went_slow(self, index: int) -> None:
        if not self.finished and index not in self.results:
            self.slow.add(index)
            self._check()

    def _check(self) -> None:
        waiting = set(range(len(self.calls))) - self.results.keys()
        answered = any(isinstance(r, bytes) for r in self.results.values())
        if not waiting or (answered and waiting <= self.slow):
            self.finished = True
            self.on_done([self.results.get(i) for i in range(len(self.calls))])


def start_bootstrap(
    core: DHTCore, addresses: list[tuple[str, int]], now: float, on_done: Callable[[int], None]
) -> None:
    """Ping the given addresses, then look up our own id. Reports contacts known. (A
    method of :class:`~p2pd.dht.core.DHTCore`, bound there as a class attribute, as
    resolve.py's and mailbox_ops.py's are.)"""
    probes = [Node(bytes(wire.NODE_ID_LEN), host, port) for host, port in addresses]

    def seed(probe: Node, reply: wire.DHTResult | None) -> Node | None:
        # The reply is the node key, proven (a signed reply from that address).
        if isinstance(reply, bytes) and wire.node_id_for(reply) != core.node_id:
            node = Node(wire.node_id_for(reply), probe.ip, probe.port, reply)
            core.seen(node, core.now)
            return node
        return None

    def pinged(replies: list[wire.DHTResult | None]) -> None:
        seeds = [
            node
            for probe, reply in zip(probes, replies, strict=True)
            if (node := seed(probe, reply)) is not None
        ]
        if not seeds:
            on_done(len(core.table))
            return
        # We hear the network again: what went silent while we could not reach
        # anyone (a partition, a laptop asleep, our own link down) deserves another
        # chance, instead of being skipped for suspect_period.
        core.suspects.forgive_all()
        core.start_lookup(core.node_id, core.now, lambda _: on_done(len(core.table)), seeds=seeds)

    # A seed that answers after the join went on (SeedPings) is a contact all the same.
    SeedPings(core, probes, pinged, on_late=seed).start(now)


class Slot:
    __slots__ = ("gather", "index")

    def __init__(self, gather: Gather, index: int) -> None:
        self.gather = gather
        self.index = index

    def rpc_done(self, node: Node, result: wire.DHTResult | None, now: float) -> None:
        self.gather.done(self.index, result)

    def rpc_slow(self, node: Node, now: float) -> None:
        self.gather.went_slow(self.index)


class HeadCheck:
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


class MailboxFetch:
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


class MailboxPut:
    """One entry put at every node found for its mailbox, sent under a one-off sender key
    (:meth:`~p2pd.dht.core.DHTCore.request`, ``anonymous``).

    A "stored" answer proves nothing (a black hole says it and keeps nothing), and only
    the owner may fetch, so the sender cannot read a copy back. What it can require is
    that the entry was taken by several replicas that are not one party: ``required``
    acceptances from distinct networks (:func:`~p2pd.claims.network_of`: a /24 or /48;
    this node's own copy counts as one). Short of that, ``on_done`` gets 0 and the sender
    tries again later (p2pd/delivery: backoff), instead of counting a lie as delivered.
    One black hole, or many ids of one network, among the replicas then loses nothing;
    ``required`` colluding black holes in as many networks still can (docs/SECURITY.md).
    """

    __slots__ = ("core", "entry", "key", "local", "nodes", "on_done", "required", "vouched")

    def __init__(
        self,
        core: DHTCore,
        key: bytes,
        entry: bytes,
        nodes: list[Node],
        local: bool,
        required: int,
        on_done: Callable[[int], None],
        vouched: frozenset[bytes] | None = None,
    ) -> None:
        self.core = core
        self.key = key
        self.entry = entry
        self.nodes = nodes
        self.local = local
        #: The ids whose "stored" counts (None: every node's). After a relayed lookup,
        #: those that two sources named (p2pd/dht/mailbox_find.py ``targets``): the
        #: nodes one lying relay alone names may take the put, never confirm it.
        self.vouched = vouched
        # Never more than there are replicas to ask (a network of two nodes).
        self.required = max(1, min(required, sum(map(self.counts, nodes)) + int(local)))
        self.on_done = on_done

    def counts(self, node: Node) -> bool:
        """Whether ``node``'s "stored" confirms the put."""
        return self.vouched is None or node.id in self.vouched

    def start(self, now: float) -> None:
        calls: list[tuple[Node, str, list[Any]]] = [
            (n, "mailbox_put", [self.key, self.entry]) for n in self.nodes
        ]
        self.core.gather(calls, now, self.replied, anonymous=True)

    def replied(self, replies: list[wire.DHTResult | None]) -> None:
        takers = [
            n for n, r in zip(self.nodes, replies, strict=True) if r is True and self.counts(n)
        ]
        networks = {network_of(n.ip) for n in takers}
        confirmed = len(networks) + int(self.local) >= self.required
        if not confirmed:
            self.core.stats["mailbox_put_unconfirmed"] += 1
        self.on_done(len(takers) + int(self.local) if confirmed else 0)
