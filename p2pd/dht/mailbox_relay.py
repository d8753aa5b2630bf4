"""Mailbox puts relayed through a third node, so that the storing node does not see the
sender's address (issue 12, item 3; docs/PROTOCOL.md, "Relayed mailbox puts").

The sender finds the k closest to the mailbox key as before, then, instead of sending
``mailbox_put`` to each, asks a relay (a node of its routing table that is not one of
them) to put it there: ``mailbox_relay [sender, node key, host, port, mailbox key,
put]``. The relay sends an ordinary ``mailbox_put`` under a one-off key of its own from
its own address, and answers the sender with the storing node's ``true``/``false``. The
puts of one message are spread over :attr:`~p2pd.config.DHTConfig.mailbox_relays`
relays in distinct networks, and a put counts as confirmed only if replicas in enough
networks took it *through* enough distinct relays: one lying relay cannot make a put
look stored.

What each party sees (docs/SECURITY.md, "Relayed mailbox puts"):

- the storing node: the relay's address, not the sender's; the put as before;
- the relay: the sender's address, the storing node's address and key, the mailbox key
  (so, for anyone who knows the recipient's public key, the recipient), the entry's
  size and, for a contact's put, that it is one (the pass names the owner), never the
  text (sealed to the recipient).

Budgets on the relay (no open amplifier): the request costs the sender's source what a
``mailbox_put`` costs (:data:`~.budget.REQUEST_COST`); all requesters together get
:data:`RELAY_RATE` forwards a second (burst :data:`RELAY_BURST`) and at most
:data:`MAX_RELAYING` in flight, one requester's /24 (/48) :data:`PER_REQUESTER_HOUR`
an hour; the reply is a boolean (never larger than the request,
cut like every reply to an unvalidated source); what the relay sends on is the put it
received, to a node key and address the request named (one datagram per request, no
bigger than the request: a reflector at most, at 1:1, for what a requester could send
itself).

Sans-I/O like the core: functions of :class:`~p2pd.dht.core.DHTCore` state.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import wire
from ..claims import network_of
from .budget import TokenBuckets, subnet_of
from .mailbox_entry import BUCKETS
from .mailbox_pass import PASS_OVERHEAD
from .operations import MailboxPut
from .routing import Node

if TYPE_CHECKING:
    from .core import DHTCore

__all__ = [
    "MAX_RELAYING",
    "RELAY_BURST",
    "RELAY_RATE",
    "PutRelay",
    "RelayBudget",
    "RelayedMailboxPut",
    "pick_relays",
    "relay_requested",
]

#: Forwards a second, every requester together; and the bucket's depth.
RELAY_RATE = 50.0
RELAY_BURST = 100.0
#: Forwards waiting for the storing node's answer at once.
MAX_RELAYING = 64
#: Puts relayed for one requester's /24 (/48) an hour (burst as many): a storing node
#: charges a relayed put to the relay's address, so without this one requester could
#: spend the relay's quota there (docs/SECURITY.md, "Relayed mailbox puts").
PER_REQUESTER_HOUR = 256
#: Requesters remembered (an LRU: spoofed sources cannot grow it).
REQUESTERS_MAX = 4096
#: The sizes a put may have (an entry, or a contact's put): nothing else is sent on, so
#: what goes on is never padded (p2pd/dht/budget.py) beyond the request that asked.
PUT_SIZES = frozenset((*BUCKETS, *(size + PASS_OVERHEAD for size in BUCKETS)))


class RelayBudget:
    """What a relay spends on others: a token bucket over all requesters (``rate`` a
    second, ``burst`` deep), at most ``max_in_flight`` at once, and ``per_hour`` for one
    requester's /24 (/48). Pure: the core passes ``now``."""

    __slots__ = ("burst", "in_flight", "last", "max_in_flight", "rate", "requesters", "tokens")

    def __init__(self, rate: float, burst: float, max_in_flight: int, per_hour: float) -> None:
        self.rate, self.burst, self.max_in_flight = rate, burst, max_in_flight
        self.tokens = burst
        self.last = 0.0
        self.in_flight = 0
        self.requesters = TokenBuckets(per_hour / 3600, per_hour, REQUESTERS_MAX)

    def admit(self, now: float, requester: str = "", *, spend: bool = True) -> str | None:
        """Why a request from ``requester`` (an IP address) is refused now (None: it is
        not; with ``spend``, it takes a token and counts as in flight until
        :attr:`in_flight` is lowered; without, it takes only the requester's budget)."""
        self.tokens = min(self.burst, self.tokens + max(now - self.last, 0.0) * self.rate)
        self.last = now
        if spend and (self.in_flight >= self.max_in_flight or self.tokens < 1.0):
            return "busy"
        if not self.requesters.take(subnet_of(requester), 1.0, now):
            return "requester"
        if spend:
            self.tokens -= 1.0
            self.in_flight += 1
        return None


class PutRelay(RelayBudget):
    """The budget for relaying others' mailbox puts."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(RELAY_RATE, RELAY_BURST, MAX_RELAYING, PER_REQUESTER_HOUR)


class _Forward:
    """One put being relayed: answers the requester when the storing node has."""

    __slots__ = ("address", "cookie", "core", "req", "size_in")

    def __init__(
        self,
        core: DHTCore,
        req: wire.DHTRequest,
        address: tuple[str, int],
        cookie: bytes | None,
        size_in: int,
    ) -> None:
        self.core, self.req, self.address = core, req, address
        self.cookie, self.size_in = cookie, size_in

    def rpc_done(self, node: Node, result: wire.DHTResult | None, now: float) -> None:
        self.core.put_relay.in_flight -= 1
        stored = result is True
        self.core.stats["mailbox_relayed" if stored else "mailbox_relay_not_stored"] += 1
        self.core.answer(self.req, self.address, self.cookie, stored, self.size_in, now)

    def rpc_slow(self, node: Node, now: float) -> None:
        pass


def relay_requested(
    core: DHTCore,
    req: wire.DHTRequest,
    address: tuple[str, int],
    cookie: bytes | None,
    size_in: int,
    now: float,
) -> None:
    """A ``mailbox_relay`` request: send its put on to the node it names, or refuse
    (answered ``false``, counted ``mailbox_relay_refused_<why>``)."""
    target = req.target
    assert target is not None and req.key is not None and req.value is not None
    why = None
    if len(req.value) not in PUT_SIZES:
        why = "size"  # not an entry: nothing a storing node would take
    elif target.node_key == core.node_key.public_key:
        why = "self"  # we are a replica: the sender should not have picked us
    elif (target.address.host, target.address.port) == address:
        why = "loop"  # back to the requester
    else:
        why = core.put_relay.admit(now, address[0])
    if why is not None:
        core.stats["mailbox_relay_refused_" + why] += 1
        core.answer(req, address, cookie, False, size_in, now)
        return
    node = Node(target.node_id, target.address.host, target.address.port, target.node_key)
    core.request(
        node,
        "mailbox_put",
        [req.key, req.value],
        now,
        _Forward(core, req, address, cookie, size_in),
        anonymous=True,  # under a one-off key: not linked to the relay's own traffic
    )


def pick_relays(core: DHTCore, targets: list[Node], count: int) -> list[Node]:
    """Up to ``count`` nodes of our routing table, none of them a target, each in a
    network of its own, chosen at random among those that proved their key from their
    address lately and are not suspected dead (a dead relay costs the put a retry)."""
    if count <= 0:
        return []
    exclude = {n.id for n in targets}
    now = core.now
    candidates = [
        n
        for n in core.table
        if n.key is not None
        and n.id not in exclude
        and core.suspects.until(n.id) <= now
        and (not core.defended or core.proofs.is_verified(n.id, (n.ip, n.port), now))
    ]
    random.Random(core._randbytes(8)).shuffle(candidates)
    chosen: list[Node] = []
    networks: set[str] = set()
    for n in candidates:
        net = network_of(n.ip)
        if net not in networks:
            chosen.append(n)
            networks.add(net)
            if len(chosen) == count:
                break
    return chosen


class RelayedMailboxPut(MailboxPut):
    """One entry put at every node found for its mailbox, each through one of
    ``relays`` (in turn). Confirmed like :class:`~.operations.MailboxPut` (takers in
    ``required`` distinct networks, our own copy counting as one, only those
    ``vouched`` for), and also only if the
    takers' answers came through relays in as many distinct networks (as many as there
    are): a relay that lies "stored" for every put it carries confirms nothing alone."""

    __slots__ = ("relays",)

    def __init__(
        self,
        core: DHTCore,
        key: bytes,
        entry: bytes,
        nodes: list[Node],
        local: bool,
        required: int,
        relays: list[Node],
        on_done: Callable[[int], None],
        vouched: frozenset[bytes] | None = None,
    ) -> None:
        super().__init__(core, key, entry, nodes, local, required, on_done, vouched)
        self.relays = relays

    def relay_of(self, index: int) -> Node:
        return self.relays[index % len(self.relays)]

    def start(self, now: float) -> None:
        calls: list[tuple[Node, str, list[Any]]] = [
            (self.relay_of(i), "mailbox_relay", [n.key, n.ip, n.port, self.key, self.entry])
            for i, n in enumerate(self.nodes)
        ]
        # The relay waits up to rpc_timeout for the storing node: wait for both.
        timeout = 2 * self.core.config.rpc_timeout
        self.core.gather(calls, now, self.replied, anonymous=True, timeout=timeout)
        if self.nodes:
            self.core.stats["mailbox_puts_relayed"] += 1

    def replied(self, replies: list[wire.DHTResult | None]) -> None:
        takers = [i for i, r in enumerate(replies) if r is True and self.counts(self.nodes[i])]
        networks = {network_of(self.nodes[i].ip) for i in takers}
        via = {network_of(self.relay_of(i).ip) for i in takers}
        local = int(self.local)
        confirmed = len(networks) + local >= self.required and len(via) + local >= min(
            self.required, len(self.relays) + local
        )
        if not confirmed:
            self.core.stats["mailbox_put_unconfirmed"] += 1
        self.on_done(len(takers) + local if confirmed else 0)
