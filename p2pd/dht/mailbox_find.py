"""The lookup before a mailbox put, made by relays (issue 12, item 3; docs/PROTOCOL.md,
"Relayed mailbox lookups").

A relayed put (:mod:`.mailbox_relay`) hides the sender's address from the storing
nodes, but the put needs the k closest nodes to the mailbox key first, and a lookup
from the sender's own address ends at those very nodes: a replica that sees
``find_node(mailbox key)`` from an address, then relayed puts a moment later, links
the two by timing. So the sender asks its relays for the lookup too:
``mailbox_find [sender, mailbox key]`` (under a one-off sender key, like the put). A
relay runs an ordinary node lookup from its own address under its own id and answers
with the closest nodes it found, as a ``find_node`` reply. The sender asks
:attr:`~p2pd.config.DHTConfig.mailbox_relays` relays in distinct networks, none of
them among the nodes of its own table closest to the key (likely replicas), merges
their answers (the k closest of the union) and puts through relays as before.

What each party sees (docs/SECURITY.md, "Relayed mailbox lookups"): a replica, the
relay's lookup (the relay's address and id) and then the puts (relays' addresses);
the relay, the sender's address and the mailbox key (as for the put it may carry).
What a lying relay can do: answer nodes of its choosing, e.g. black holes with ids
ground nearer the key than the true replicas. So the sender puts at the k closest of
all answers *and* at each relay's own k closest (:func:`targets`: a liar cannot push
an honest relay's replicas out), and counts a "stored" towards confirmation only from
a node two sources named (two relays, or a relay and the sender's own table): the
nodes one relay alone names may take the put but never make it look left. Two
colluding relays still can (docs/SECURITY.md, "Relayed mailbox lookups").

Budgets on the relay: the request costs the requester's source what a put does
(:data:`~.budget.REQUEST_COST`); all requesters together start :data:`FIND_RATE`
lookups a second (burst :data:`FIND_BURST`), at most :data:`MAX_FINDING` at once; one
requester's /24 (/48) :data:`FINDS_PER_REQUESTER_HOUR` an hour; an answer is kept
:data:`FIND_CACHE_TTL` seconds (:data:`FIND_CACHE_MAX` keys), so the puts of several
messages to one mailbox cost the DHT one lookup. The reply is padded-for like a
``find_node`` (the request is padded to 1,200 bytes) and cut to the request's size for
an unvalidated source: no amplification towards the requester. The lookup's own
datagrams go to DHT nodes the lookup picks, never to an address the requester names.

Sans-I/O like the core: functions of :class:`~p2pd.dht.core.DHTCore` state.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import wire
from .budget import REQUEST_PAD
from .mailbox_relay import RelayBudget, pick_relays
from .result import LookupResult
from .routing import Node

if TYPE_CHECKING:
    from .core import DHTCore

__all__ = [
    "FINDS_PER_REQUESTER_HOUR",
    "FIND_BURST",
    "FIND_RATE",
    "MAX_FINDING",
    "FindRelay",
    "RelayedMailboxFind",
    "find_requested",
]

#: Lookups started a second for every requester together; and the bucket's depth. A
#: lookup is tens of datagrams: this is the relay's real cost.
FIND_RATE = 5.0
FIND_BURST = 20.0
#: Lookups running for requesters at once.
MAX_FINDING = 8
#: Lookups asked by one requester's /24 (/48) an hour (burst as many): an honest sender
#: asks each relay once per message put to an offline contact.
FINDS_PER_REQUESTER_HOUR = 64
#: An answer is reused for this long (seconds), for this many mailbox keys.
FIND_CACHE_TTL = 60.0
FIND_CACHE_MAX = 256
#: A request smaller than this is refused: the datagrams of the lookup it starts are at
#: most this large (a padded find_node), and so is the answer. Honest senders pad to it.
MIN_REQUEST = REQUEST_PAD["mailbox_find"]


class FindRelay(RelayBudget):
    """The relay's budget for lookups (:class:`~.mailbox_relay.RelayBudget`; a cached
    answer takes only the requester's share) and its cache of answers."""

    __slots__ = ("cache",)

    def __init__(self) -> None:
        super().__init__(FIND_RATE, FIND_BURST, MAX_FINDING, FINDS_PER_REQUESTER_HOUR)
        #: mailbox key -> (when found, the contacts encoded for the wire)
        self.cache: OrderedDict[bytes, tuple[float, list[Any]]] = OrderedDict()

    def cached(self, key: bytes, now: float) -> list[Any] | None:
        hit = self.cache.get(key)
        if hit is None or now - hit[0] > FIND_CACHE_TTL:
            return None
        return hit[1]

    def remember(self, key: bytes, contacts: list[Any], now: float) -> None:
        self.cache[key] = (now, contacts)
        self.cache.move_to_end(key)
        while len(self.cache) > FIND_CACHE_MAX:
            self.cache.popitem(last=False)


def find_requested(
    core: DHTCore,
    req: wire.DHTRequest,
    address: tuple[str, int],
    cookie: bytes | None,
    size_in: int,
    now: float,
) -> None:
    """A ``mailbox_find`` request: run a node lookup for its key and answer the closest
    nodes found, or refuse (an empty list, counted ``mailbox_find_refused_<why>``)."""
    key = req.key
    assert key is not None
    relay = core.find_relay
    hit = relay.cached(key, now)
    # Small requests refused: each datagram of our lookup may be this large (no
    # amplifier). No refusal for a key we are close to: the sender already avoids the
    # nodes it knows near the key, a hostile replica would not refuse, and an honest
    # node's view of "close" in a network of a few k nodes would refuse honest senders.
    why = "size" if size_in < MIN_REQUEST else relay.admit(now, address[0], spend=hit is None)
    if why is not None:
        core.stats["mailbox_find_refused_" + why] += 1
        core.answer(req, address, cookie, [], size_in, now)
        return
    if hit is not None:
        core.stats["mailbox_find_cached"] += 1
        core.answer(req, address, cookie, hit, size_in, now)
        return

    def found(result: LookupResult) -> None:
        relay.in_flight -= 1
        contacts = wire.encode_contacts(
            [wire.Contact(n.key, wire.Address(n.ip, n.port)) for n in result.closest if n.key]
        )
        relay.remember(key, contacts, core.now)
        core.stats["mailbox_found"] += 1
        core.answer(req, address, cookie, contacts, size_in, core.now)

    core.start_lookup(key, now, found)


def find_relays(core: DHTCore, key: bytes) -> list[Node]:
    """The relays to ask for a lookup of mailbox ``key``: as for a put, but none among
    the nodes of our table closest to the key (they are likely its replicas)."""
    near = core.table.closest(key, core.config.ksize)
    return pick_relays(core, near, core.config.mailbox_relays)


class RelayedMailboxFind:
    """Ask ``relays`` for the nodes closest to mailbox ``key``; ``then(key, nodes,
    local, vouched)`` with the nodes to put at (empty if no relay answered) and the ids
    among them that two sources named (:func:`targets`)."""

    __slots__ = ("core", "key", "relays", "then")

    def __init__(
        self,
        core: DHTCore,
        key: bytes,
        relays: list[Node],
        then: Callable[[bytes, list[Node], bool, frozenset[bytes] | None], None],
    ) -> None:
        self.core, self.key, self.relays, self.then = core, key, relays, then

    def start(self, now: float) -> None:
        calls: list[tuple[Node, str, list[Any]]] = [
            (relay, "mailbox_find", [self.key]) for relay in self.relays
        ]
        # The relay runs a lookup before it answers: give it the lookup's deadline.
        timeout = self.core.config.lookup_deadline + self.core.config.rpc_timeout
        self.core.gather(calls, now, self.replied, anonymous=True, timeout=timeout)
        self.core.stats["mailbox_finds_relayed"] += 1

    def replied(self, replies: list[wire.DHTResult | None]) -> None:
        core, key = self.core, self.key
        answers: list[list[Node]] = []
        for reply in replies:
            if not isinstance(reply, tuple):
                continue
            named: dict[bytes, Node] = {}
            for contact in reply:
                if isinstance(contact, wire.Contact) and contact.node_id != core.node_id:
                    host, port = contact.address.host, contact.address.port
                    node = Node(contact.node_id, host, port, contact.node_key)
                    named.setdefault(node.id, node)
            if named:
                answers.append(list(named.values()))
        # What we already know near the key is a source too (no datagram): among the k
        # nearest of all, and a second voice for the nodes a relay names.
        ours = [n for n in core.table.closest(key, core.config.ksize) if n.key is not None]
        nodes, nearest, vouched = targets(key, answers, ours, core.config.ksize)
        if not nodes:
            core.stats["mailbox_find_failed"] += 1
        relay_ids = {r.id for r in self.relays}
        if any(n.id in relay_ids for n in nodes):
            core.stats["mailbox_find_relay_was_replica"] += 1
        if len(vouched) < len(nodes):
            core.stats["mailbox_find_unvouched"] += len(nodes) - len(vouched)
        # Nothing found: our own copy must not confirm the put alone.
        self.then(key, nodes, bool(nearest) and core.among_closest(key, nearest), vouched)


def targets(
    key: bytes, answers: list[list[Node]], ours: list[Node], k: int
) -> tuple[list[Node], list[Node], frozenset[bytes]]:
    """Where to put an entry for mailbox ``key``, from the relays' ``answers`` (each
    relay's nodes) and ``ours`` (the nodes of our table nearest the key): the ``k``
    nearest of them all, and each answer's own ``k`` nearest too, so that a lying
    relay naming nodes nearer the key than the true replicas cannot push out the
    honest relays' (at most (answers + 1) * k nodes, nearest first); those ``k``
    nearest of all (for whether we are a replica ourselves); and the ids that two
    sources named (two relays, or a relay and our table): only these confirm a put
    (:class:`~.mailbox_relay.RelayedMailboxPut`), so the nodes one relay alone names
    can take a put but never make it count as left. Without any answer, no nodes."""
    if not answers:
        return [], [], frozenset()
    target = int.from_bytes(key, "big")

    def nearest(nodes: list[Node]) -> list[Node]:
        return sorted(nodes, key=lambda n: n.long_id ^ target)[:k]

    every: dict[bytes, Node] = {}
    named: dict[bytes, int] = {}
    for source in [*answers, ours]:  # each without repeats
        for node in source:
            every.setdefault(node.id, node)
            named[node.id] = named.get(node.id, 0) + 1
    top = nearest(list(every.values()))
    chosen = {n.id: n for n in top}
    for answer in answers:
        for node in nearest(answer):
            chosen.setdefault(node.id, node)
    nodes = sorted(chosen.values(), key=lambda n: n.long_id ^ target)
    return nodes, top, frozenset(i for i in chosen if named[i] >= 2)
