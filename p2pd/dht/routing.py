"""The routing table, sans I/O: kademlia's ``KBucket`` and ``Node``, our table around them.

What we take from bmuller's kademlia, and why:

- ``Node``: a contact (id, ip, port) and its id as an integer (``long_id``) for XOR
  distances. A plain value object.
- ``KBucket``: k contacts in least-recently-seen order plus a bounded replacement cache
  (Kademlia section 4.1), and ``split``. Its one impurity, ``touch_last_updated`` reading
  ``time.monotonic()``, is never relied on: this table keeps each bucket's last lookup
  time itself, from the ``now`` it is given.

What we do not take: kademlia's ``RoutingTable``. When a full bucket cannot split it
pings the bucket's head with ``asyncio.ensure_future`` (I/O inside a data structure), and
its ``find_neighbors`` (``TableTraverser``) returns nothing at all in some bucket layouts
after splits (seen in the N=1000 benchmark). Here a full bucket reports its head as
"to check" and the core pings it; ``closest`` is a full scan, at most a few hundred
contacts, always right.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from kademlia.node import Node
from kademlia.routing import KBucket

__all__ = ["Node", "RoutingTable"]

ID_SPACE = 2**160


class RoutingTable:
    """Contacts in k-buckets split around our own id (Kademlia section 2.4)."""

    def __init__(self, own_id: bytes, ksize: int, now: float) -> None:
        self.own = Node(own_id)
        self.ksize = ksize
        self.buckets: list[KBucket] = [KBucket(0, ID_SPACE, ksize)]
        #: When each bucket was last the target of a lookup, parallel to ``buckets``.
        self.refreshed: list[float] = [now]

    def _index(self, long_id: int) -> int:
        for index, bucket in enumerate(self.buckets):
            if long_id < bucket.range[1]:
                return index
        return len(self.buckets) - 1

    def bucket_of(self, node: Node) -> KBucket:
        bucket: KBucket = self.buckets[self._index(node.long_id)]
        return bucket

    def contains(self, node_id: bytes) -> bool:
        node = Node(node_id)
        return node_id in self.bucket_of(node).nodes

    def add(self, node: Node, now: float | None = None) -> Node | None:
        """Add or refresh ``node``, heard from at ``now``. Returns None, or the head of a
        full bucket that cannot split: the caller pings it, and evicts it (its replacement
        moves up) if it fails. The newcomer then waits in that bucket's replacement cache.

        A bucket that gains or hears from a contact needs no refresh lookup for a while
        (BEP 5's "last changed"): with traffic flowing, only idle buckets are refreshed."""
        if node.id == self.own.id:
            return None
        while True:
            index = self._index(node.long_id)
            bucket = self.buckets[index]
            if bucket.add_node(node):
                if now is not None:
                    self.refreshed[index] = now
                return None
            # Kademlia section 4.2: split the bucket that holds our own id, or one whose
            # depth is not a multiple of 5 (kademlia's rule for unbalanced trees).
            if bucket.has_in_range(self.own) or bucket.depth() % 5 != 0:
                one, two = bucket.split()
                self.buckets[index : index + 1] = [one, two]
                when = self.refreshed[index]
                self.refreshed[index : index + 1] = [when, when]
                continue
            head: Node = bucket.head()
            return head

    def remove(self, node_id: bytes) -> bool:
        """Drop a contact; a replacement from the cache takes its place. True if it was
        in the table."""
        node = Node(node_id)
        bucket = self.bucket_of(node)
        known = node_id in bucket.nodes
        bucket.remove_node(node)
        return known

    def touch(self, target: bytes, now: float) -> None:
        """A lookup for ``target`` ran: its bucket needs no refresh for a while."""
        self.refreshed[self._index(int.from_bytes(target, "big"))] = now

    def stale_buckets(self, now: float, interval: float) -> list[tuple[int, int]]:
        """The (low, high) ranges of buckets no lookup touched for ``interval`` seconds."""
        return [
            b.range
            for b, when in zip(self.buckets, self.refreshed, strict=True)
            if now - when >= interval
        ]

    def closest(self, key: bytes, count: int, exclude: bytes | None = None) -> list[Node]:
        """The ``count`` contacts closest to ``key``, nearest first (a full scan)."""
        target = int.from_bytes(key, "big")
        candidates = (n for b in self.buckets for n in b.nodes.values() if n.id != exclude)
        return heapq.nsmallest(count, candidates, key=lambda n: n.long_id ^ target)

    def in_own_bucket(self, node: Node) -> bool:
        """Whether ``node`` falls in the bucket that holds our own id: our nearest
        neighbourhood, where a newcomer may take over records we store."""
        return self._index(node.long_id) == self._index(self.own.long_id)

    def __iter__(self) -> Iterator[Node]:
        for bucket in self.buckets:
            yield from bucket.nodes.values()

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)
