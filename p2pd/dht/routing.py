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
"to check" and the core pings it; ``closest`` reads every bucket that can hold one
of the nearest contacts (by the block of ids each covers), always right.

Address limits (BEP 42's spirit, docs/ARCHITECTURE.md "Earned ids"): a bucket holds at
most ``max_per_ip`` contacts with one IP address and ``max_per_subnet`` in one /24 (IPv4)
or /48 (IPv6). Private (RFC 1918), unique-local and link-local addresses are exempt from
the subnet limit (a LAN is one /24), never from the per-IP one; loopback is not exempt,
so a swarm on 127.0.0.1 alone behaves as one host (test swarms use distinct 127.a.b.1).
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import operator
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from kademlia.node import Node as _KademliaNode
from kademlia.routing import KBucket

__all__ = ["AddressLimit", "Node", "RoutingTable", "subnet_of"]

ID_SPACE = 2**160

_EXEMPT = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")
) + tuple(ipaddress.ip_network(n) for n in ("fc00::/7", "fe80::/10"))


class Node(_KademliaNode):  # type: ignore[misc]
    """A contact: id, address, and the node public key its id is derived from (None only
    for an address we have not heard from yet, e.g. a bootstrap address)."""

    def __init__(
        self,
        node_id: bytes,
        ip: str | None = None,
        port: int | None = None,
        key: bytes | None = None,
    ) -> None:
        # kademlia's Node.__init__, inlined (a lookup makes a Node of every contact a
        # reply names: ~1,500 per join of a 200-node network); int.from_bytes is its
        # int(node_id.hex(), 16). (Typed Any as kademlia's untyped attributes were.)
        self.id: Any = node_id
        self.ip: Any = ip
        self.port: Any = port
        self.long_id: Any = int.from_bytes(node_id, "big")
        self.key = key


@functools.lru_cache(maxsize=8192)
def subnet_of(ip: str) -> str | None:
    """The /24 or /48 an address counts in, or None if exempt (private, ULA, link-local)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if any(addr in net for net in _EXEMPT if net.version == addr.version):
        return None
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class AddressLimit:
    """At most ``per_ip`` nodes per IP address and ``per_subnet`` per subnet."""

    __slots__ = ("per_ip", "per_subnet")

    def __init__(self, per_ip: int, per_subnet: int) -> None:
        self.per_ip = per_ip
        self.per_subnet = per_subnet

    def admits(self, node: Node, others: Iterable[Node]) -> bool:
        """Whether ``node`` fits beside ``others`` (``node`` itself is not counted)."""
        net = subnet_of(node.ip) if node.ip is not None else None
        same_ip = same_net = 0
        for other in others:
            if other.id == node.id:
                continue
            if other.ip == node.ip:
                same_ip += 1
            if net is not None and subnet_of(other.ip) == net:
                same_net += 1
        return same_ip < self.per_ip and same_net < self.per_subnet

    def admitted(self, nodes: Iterable[Node]) -> Iterator[Node]:
        """``nodes`` (in order) that keep within the limits, each counted as it is
        yielded."""
        per_ip: Counter[str | None] = Counter()
        per_net: Counter[str] = Counter()
        for node in nodes:
            if per_ip[node.ip] >= self.per_ip:
                continue
            net = subnet_of(node.ip) if node.ip is not None else None
            if net is not None:
                if per_net[net] >= self.per_subnet:
                    continue
                per_net[net] += 1
            per_ip[node.ip] += 1
            yield node

    def select(self, nodes: Iterable[Node], count: int) -> list[Node]:
        """The first ``count`` of ``nodes`` (in order) that keep within the limits."""
        return list(itertools.islice(self.admitted(nodes), count))


#: A (distance, node) pair's distance (no two nodes of a table share one).
_distance = operator.itemgetter(0)


def _depth(bucket: KBucket) -> int:
    """``KBucket.depth()``: how many leading bits all the bucket's ids share (asked of a
    full bucket only). kademlia compares their bit strings character by character; for
    ids of 160 bits the prefix all share is the one the smallest and the largest share
    (1.6 % of the CPU of building a 200-core network)."""
    nodes = bucket.nodes.values()
    if not nodes or any(len(n.id) != 20 for n in nodes):
        return int(bucket.depth())  # (ids of other lengths: kademlia's own reckoning)
    longs: list[int] = [n.long_id for n in nodes]
    return 160 - (max(longs) ^ min(longs)).bit_length()


class RoutingTable:
    """Contacts in k-buckets split around our own id (Kademlia section 2.4)."""

    def __init__(
        self, own_id: bytes, ksize: int, now: float, limit: AddressLimit | None = None
    ) -> None:
        self.own = Node(own_id)
        self.ksize = ksize
        #: Address limits per bucket (None: none, the benchmark's defences-off mode).
        self.limit = limit
        #: Newcomers refused because their bucket holds enough of their address.
        self.refused = 0
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
        return node_id in self.buckets[self._index(int.from_bytes(node_id, "big"))].nodes

    def add(self, node: Node, now: float | None = None) -> Node | None:
        """Add or refresh ``node``, heard from at ``now``. Returns None, or the head of a
        full bucket that cannot split: the caller pings it, and evicts it (its replacement
        moves up) if it fails. The newcomer then waits in that bucket's replacement cache.

        A bucket that gains or hears from a contact needs no refresh lookup for a while
        (BEP 5's "last changed"): with traffic flowing, only idle buckets are refreshed.
        A newcomer over the bucket's address limits is refused (not even cached)."""
        if node.id == self.own.id:
            return None
        while True:
            index = self._index(node.long_id)
            bucket = self.buckets[index]
            if self.limit is not None and not self.limit.admits(node, bucket.nodes.values()):
                self.refused += 1
                return None
            if bucket.add_node(node):
                if now is not None:
                    self.refreshed[index] = now
                return None
            # Kademlia section 4.2: split the bucket that holds our own id, or one whose
            # depth is not a multiple of 5 (kademlia's rule for unbalanced trees).
            if bucket.has_in_range(self.own) or _depth(bucket) % 5 != 0:
                one, two = bucket.split()
                self.buckets[index : index + 1] = [one, two]
                when = self.refreshed[index]
                self.refreshed[index : index + 1] = [when, when]
                continue
            head: Node = bucket.head()
            return head

    def wants(self, node: Node) -> bool:
        """Whether :meth:`add` would place ``node`` in a bucket now (not only in a
        replacement cache): worth asking it to prove its id."""
        bucket = self.bucket_of(node)
        if node.id in bucket.nodes:
            return True
        if self.limit is not None and not self.limit.admits(node, bucket.nodes.values()):
            return False
        return bool(
            len(bucket) < self.ksize or bucket.has_in_range(self.own) or _depth(bucket) % 5 != 0
        )

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
        """The ``count`` contacts closest to ``key``, nearest first.

        It runs for every find request this node answers (a resolve's probing second
        round doubled those): a sort of the whole table was 14-15 % of the CPU of
        bench_adversary's attacked rows (cProfile, N=300). Only the buckets that can hold one
        of the ``count`` nearest are read, nearest bucket first. Each bucket's ids lie
        in an aligned block [start, end) of the id space (kademlia splits at midpoints
        from [0, 2^160); :meth:`_index` puts an id in the first bucket whose end is
        above it), or at ``end`` itself (``KBucket.split`` puts an id equal to the
        midpoint in the lower half): the XOR distances of a block's ids to the key
        all lie at or above the block's start XOR the key with the block's low bits
        cleared, so a bucket whose bound is past the ``count``-th distance found so far
        holds none of the nearest (tests/test_dht_routing.py checks this against a
        full sort)."""
        target = int.from_bytes(key, "big")
        bounds = []
        start = 0
        for index, bucket in enumerate(self.buckets):
            end = bucket.range[1]
            size = end - start
            aligned = size > 0 and not size & (size - 1) and not start & (size - 1)
            low = (start ^ target) & ~(size - 1) if aligned else 0
            bounds.append((min(low, end ^ target), index))
            start = end
        bounds.sort()
        found: list[tuple[int, Node]] = []
        for bound, index in bounds:
            if len(found) >= count:
                found.sort(key=_distance)  # (sorted only when the bound is checked)
                if bound > found[count - 1][0]:
                    break
            nodes = self.buckets[index].nodes.values()
            found += [(n.long_id ^ target, n) for n in nodes if n.id != exclude]
        found.sort(key=_distance)
        return [n for _, n in found[:count]]

    def in_own_bucket(self, node: Node) -> bool:
        """Whether ``node`` falls in the bucket that holds our own id: our nearest
        neighbourhood, where a newcomer may take over records we store."""
        return self._index(node.long_id) == self._index(self.own.long_id)

    def __iter__(self) -> Iterator[Node]:
        for bucket in self.buckets:
            yield from bucket.nodes.values()

    def __len__(self) -> int:
        # (the buckets' dicts, not KBucket.__len__: the trio driver asks at every flush)
        return sum([len(b.nodes) for b in self.buckets])
