"""The routing table's ``closest`` (p2pd/dht/routing.py): it reads only the buckets that
can hold the nearest contacts, by the id-space block each bucket covers, and must give
exactly what a sort of the whole table gives: the nodes a find request's reply names, a
lookup's seeds, a store's replicas all come from it."""

from __future__ import annotations

import random

from p2pd.dht.routing import ID_SPACE, Node, RoutingTable


def full_sort(table: RoutingTable, key: bytes, count: int, exclude: bytes | None) -> list[bytes]:
    target = int.from_bytes(key, "big")
    nodes = [n for n in table if n.id != exclude]
    return [n.id for n in sorted(nodes, key=lambda n: n.long_id ^ target)[:count]]


def test_closest_names_the_same_nodes_in_the_same_order_as_a_full_sort() -> None:
    rng = random.Random(11)
    checked = 0
    for trial in range(12):
        own = rng.randbytes(20)
        mine = int.from_bytes(own, "big")
        table = RoutingTable(own, 8, 0.0)  # small buckets: many splits
        # Ids exactly at the points where buckets split (kademlia's split puts an id
        # equal to the midpoint in the lower half, past that bucket's block), then ids
        # near our own (the deep buckets), then ids anywhere.
        edges = [i * (ID_SPACE >> depth) for depth in range(1, 5) for i in range(1, 2**depth)]
        near = [mine ^ rng.getrandbits(160 - rng.randrange(1, 40)) for _ in range(60)]
        anywhere = [rng.getrandbits(160) for _ in range(200 + 40 * trial)]
        for n, long_id in enumerate(edges + near + anywhere):
            node_id = long_id.to_bytes(20, "big")
            table.add(Node(node_id, f"127.{n // 250}.{n % 250}.1", 4000), 0.0)
        members = [n.id for n in table]
        assert len(members) > 60 and len(table.buckets) > 5
        keys = [rng.randbytes(20) for _ in range(20)] + [own] + members[:5]
        keys += [e.to_bytes(20, "big") for e in edges[:4]]
        for key in keys:
            for count in (1, 8, 20, 32, len(members)):
                for exclude in (None, rng.choice(members)):
                    got = [n.id for n in table.closest(key, count, exclude=exclude)]
                    assert got == full_sort(table, key, count, exclude), (trial, count)
                    checked += 1
    assert checked > 2000
