"""What a lookup returns (:class:`LookupResult`): the k closest that answered, the
values and who voted, and where the time and the requests went. Its own room, so that
p2pd/dht/density.py (which a lookup's limits come from) can name it without a circle
through p2pd/dht/lookup.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import wire
from .routing import Node


@dataclass(slots=True)
class LookupResult:
    #: The k closest nodes that answered, nearest first.
    closest: list[Node]
    #: (node, value) for every answering node that held a value.
    values: list[tuple[Node, bytes]] = field(default_factory=list)
    #: Answering nodes that held no value (candidates for a repairing store).
    without_value: list[Node] = field(default_factory=list)
    #: node id -> the first-seen time it stated for its value (find_value "seen").
    seen: dict[bytes, int] = field(default_factory=dict)
    #: The answering nodes among the k closest *known* to the target when the lookup
    #: ended (asked or not): the replicas whose values may count. A node far from the
    #: key that answers with a value (a liar answers every key) is not one of them.
    voters: set[bytes] = field(default_factory=set)
    rpcs: int = 0
    elapsed: float = 0.0
    #: Replies that moved the lookup, by round: 1 + the longest chain of replies that
    #: each named a contact asked next (what "hops" means for an iterative lookup).
    hops: int = 0
    #: Answering nodes the density rule set aside (p2pd/dht/density.py): packed around
    #: the target nearer than the last voter. Asked, but not voters: counted against
    #: any winner (p2pd/claims.py ``set_aside``).
    packed: set[bytes] = field(default_factory=set)
    #: The same nodes (a store sends them the record too: p2pd/dht/operations.py
    #: ``store_targets``).
    packed_nodes: list[Node] = field(default_factory=list)
    #: For each of them, how many honest nodes the density rule expected nearer the
    #: target (its lambda): a resolve credits a cluster's votes against a winner only
    #: as far as chance could place that many that near (p2pd/claims.py ``chance``).
    packed_expected: dict[bytes, float] = field(default_factory=dict)
    #: Where the time and the requests went (scripts/bench_adversary.py prints them):
    #: contacts whose soft deadline passed (they stopped being waited on), contacts that
    #: never answered (hard timeout or a malformed reply), every node asked, and the
    #: value replies by node (a resolve's second round reuses them instead of asking
    #: the same nodes again: p2pd/dht/resolve.py).
    slow: int = 0
    failed: int = 0
    #: Contacts given up on at their soft deadline and not heard from by the end (nor
    #: timed out): on a busy host mostly live replicas whose answer came too late (a
    #: resolve short of votes asks them again and waits: p2pd/dht/resolve.py).
    given_up: list[Node] = field(default_factory=list)
    #: Contacts asked that never answered well: a hard timeout (on a busy host or a
    #: lossy path, often a live replica whose request or reply was lost or late) or a
    #: malformed reply. A store sends them its record all the same (``store_targets``).
    timed_out: list[Node] = field(default_factory=list)
    asked: set[bytes] = field(default_factory=set)
    replies: dict[bytes, tuple[Node, wire.FindValueReply]] = field(default_factory=dict)
    #: A resolve: its rounds, and the first round's requests and time; whether it took
    #: its round that waits for the contacts given up on (p2pd/dht/resolve.py).
    rounds: int = 1
    first_rpcs: int = 0
    first_elapsed: float = 0.0
    waited: bool = False
