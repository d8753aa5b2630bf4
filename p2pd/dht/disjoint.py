"""A lookup over disjoint paths (S/Kademlia, Baumgart and Mies 2007, section 4.4): ``d``
:class:`~p2pd.dht.lookup.Lookup` paths for one target that never ask the same node,
merged into one result. Sans-I/O, and driven like one lookup (p2pd/dht/operations.py
``LookupRun``): a reply, a "slow" or a "failed" goes to the path that asked the node.

Here is the paths' bookkeeping (one path's state machine is lookup.py's):

- the deal: the seeds, nearest first, round-robin, and earlier value replies (a resolve's
  first round) the same way, each to one path; every path gets its share of ``k``, of
  the RPC cap, of the width and of the value quorum;
- ``taken``: the set of nodes any path asked, shared, so that no node is asked twice;
- the merge: every path's values and counters, the k closest answering nodes of all
  paths within the address limits, and the voters, ranked over what *all* paths knew
  (a path that liars eclipsed knows only liars: its own k closest must not all vote),
  with the nodes the density rule set aside (p2pd/dht/density.py) and what chance
  expected of each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from .. import wire
from .density import SpreadLimit
from .lookup import FAILED, OK, SLOW, Lookup, closest
from .result import LookupResult
from .routing import AddressLimit, Node


class DisjointLookup:
    """``paths`` lookups for one target over disjoint sets of nodes, merged (S/Kademlia,
    section 4.4). Driven like a :class:`Lookup`.

    The seeds are dealt round-robin, nearest first; each path keeps ``alpha`` and a
    share of ``k`` (it ends when its ``k / paths`` closest live nodes answered), of the
    RPC cap and of the value quorum: together the paths ask about as many nodes as one
    lookup would, and they partition the k closest between them. A node one path asked
    (or is asking) is never asked by another. The result is every path's answers: their
    values, and the k closest nodes that answered on any path (within the address
    limits)."""

    def __init__(
        self,
        target: bytes,
        *,
        paths: int,
        find_value: bool,
        k: int,
        alpha: int,
        max_rpcs: int,
        quorum: int | None = None,
        started: float,
        deadline: float,
        own_id: bytes,
        seeds: Iterable[Node],
        skip: Callable[[bytes], bool] = lambda _: False,
        limit: AddressLimit | None = None,
        claim_of: Callable[[bytes], bytes | None] = bytes,
        max_width: int = 0,
        probe_from: int = 0,
        prior: dict[bytes, tuple[Node, wire.FindValueReply]] | None = None,
        patient: bool = False,
    ) -> None:
        paths = max(1, paths)
        self.target = target
        self.find_value = find_value
        self.method = "find_value" if find_value else "find_node"
        self.started = started
        self.deadline = deadline
        self._k = k
        self._limit = limit
        self._taken: set[bytes] = set()
        dealt: list[list[Node]] = [[] for _ in range(paths)]
        for index, node in enumerate(seeds):
            dealt[index % paths].append(node)
        share = quorum if quorum is None else math.ceil(quorum / paths)
        # Earlier replies are dealt like the seeds, nearest first, each to one path, and
        # are taken by no other: one path that took them all (it heard them at once, and
        # their contacts led it to the rest) ended with its share of the k closest asked
        # while the nodes it knew beyond them went unasked by either path (measured: 65
        # voters of 80 instead of 79; a liar's share of the votes grows).
        priors: list[dict[bytes, tuple[Node, wire.FindValueReply]]] = [{} for _ in range(paths)]
        if prior and find_value:
            goal = int.from_bytes(target, "big")
            nearest = sorted(prior, key=lambda i: int.from_bytes(i, "big") ^ goal)
            for index, node_id in enumerate(nearest):
                priors[index % paths][node_id] = prior[node_id]
                self._taken.add(node_id)
        self.paths = [
            Lookup(
                target,
                find_value=find_value,
                k=math.ceil(k / paths),
                alpha=alpha,
                max_rpcs=math.ceil(max_rpcs / paths),
                quorum=share,
                started=started,
                deadline=deadline,
                own_id=own_id,
                seeds=path_seeds,
                skip=skip,
                limit=limit,
                taken=self._taken,
                claim_of=claim_of,
                max_width=math.ceil(max_width / paths) if max_width else 0,
                probe_from=math.ceil(probe_from / paths),
                prior=path_prior,
                patient=patient,
            )
            for path_seeds, path_prior in zip(dealt, priors, strict=True)
        ]
        #: Which path asked each node (a reply goes to the path that asked).
        self._owner: dict[bytes, Lookup] = {}
        self.result = LookupResult(closest=[])
        self.done = False

    def next_requests(self, now: float) -> list[Node]:
        if self.done:
            return []
        out: list[Node] = []
        for path in self.paths:
            for node in path.next_requests(now):
                self._owner[node.id] = path
                out.append(node)
        if all(path.done for path in self.paths):
            self._finish(now)
        return out

    def _finish(self, now: float) -> None:
        self.done = True
        result = self.result
        for path in self.paths:
            result.values += path.result.values
            result.without_value += path.result.without_value
            result.seen.update(path.result.seen)  # the replicas' first-seen receipts
            result.rpcs += path.result.rpcs
            result.slow += path.result.slow
            result.failed += path.result.failed
            result.given_up += path.result.given_up
            result.timed_out += path.result.timed_out
            result.asked |= path.result.asked
            result.replies.update(path.result.replies)
            result.hops = max(result.hops, path.result.hops)
        answered = {n.id: n for path in self.paths for n in path.result.closest}
        target = int.from_bytes(self.target, "big")
        result.closest = closest(answered.values(), target, self._k, self._limit)
        result.voters = self._voters(target)
        result.elapsed = now - self.started

    def _voters(self, target: int) -> set[bytes]:
        """The answering nodes among the k closest that *any* path knew of, ranked
        together: a path that liars eclipsed (they name only each other) knows only
        liars, and its own k closest must not all vote."""
        known: dict[bytes, Node] = {}
        answered: set[bytes] = set()
        dead: set[bytes] = set()
        for path in self.paths:
            for node, state in path.known():
                known[node.id] = node
                if state == OK:
                    answered.add(node.id)
                elif state in (SLOW, FAILED):
                    dead.add(node.id)
        live = sorted(
            (n for i, n in known.items() if i in answered or i not in dead),
            key=lambda n: n.long_id ^ target,
        )
        if self._limit is None:
            return {n.id for n in live[: self._k] if n.id in answered}
        nearest = self._limit.select(live, self._k)
        if isinstance(self._limit, SpreadLimit):
            limit = self._limit
            self.result.packed_nodes = [n for n in limit.passed if n.id in answered]
            self.result.packed = {n.id for n in self.result.packed_nodes}
            self.result.packed_expected = {
                n.id: lam
                for n in self.result.packed_nodes
                if (lam := limit.expected(n)) is not None
            }
        return {n.id for n in nearest if n.id in answered}

    def target_for(self, node_id: bytes) -> bytes:
        path = self._owner.get(node_id)
        return self.target if path is None else path.target_for(node_id)

    def method_for(self, node_id: bytes) -> str:
        path = self._owner.get(node_id)
        return self.method if path is None else path.method_for(node_id)

    def late(self, node_id: bytes) -> bool:
        path = self._owner.get(node_id)
        return path is not None and path.late(node_id)

    def slow(self, node_id: bytes) -> bool:
        path = self._owner.get(node_id)
        return path is not None and path.slow(node_id)

    @property
    def waits_for_slow(self) -> bool:
        return self.paths[0].waits_for_slow

    def stop_waiting(self, node_id: bytes) -> bool:
        path = self._owner.get(node_id)
        return path is not None and path.stop_waiting(node_id)

    def failed(self, node_id: bytes) -> None:
        path = self._owner.get(node_id)
        if path is not None:
            path.failed(node_id)

    def replied(self, node_id: bytes, reply: wire.DHTResult) -> bool:
        path = self._owner.get(node_id)
        return path is not None and path.replied(node_id, reply)

    def replied_after(self, node_id: bytes, reply: wire.DHTResult) -> bool:
        """:meth:`Lookup.replied_after` on the path that asked (the merged replies too)."""
        path = self._owner.get(node_id)
        if path is None or not self.done or not path.replied_after(node_id, reply):
            return False
        self.result.replies[node_id] = path.result.replies[node_id]
        return True

    @property
    def in_flight(self) -> int:
        return sum(path.in_flight for path in self.paths)
