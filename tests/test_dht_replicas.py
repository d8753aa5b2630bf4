"""A handle record reaches its replicas (issue 11: the squatter's claim at the replicas
the owner's store missed). A record lives on the ``claim_factor * k`` closest nodes, more
than the contacts one reply names, so a store lookup must find the nodes ranked past k
too: replies name up to ``wire.MAX_CONTACTS`` contacts and a node lookup for more than k
nodes asks the far candidates for their own neighbourhood (p2pd/dht/lookup.py,
``probe_from``). Before both, a store at N=160 missed 9 % of its true replicas
(scripts/bench_adversary.py prints the coverage); the assertions below fail there.

Sans-I/O cores in virtual time (tests/test_dht_core.py's CoreNet; the first test ran on
a trio FakeNetwork swarm until 2026-12-05, the same outcome at 1.7 times the CPU), so the
figures do not depend on the load."""

from __future__ import annotations

import pytest
from test_dht_core import make_record, small_network

from p2pd.config import DHTConfig

NODES = 120
K = 8  # 24 replicas: three times the 8 contacts a reply named before


def test_a_store_reaches_the_true_replicas_ranked_past_k() -> None:
    """A store from every sixth node reaches (nearly) all of its key's true 24 closest.

    Sans-I/O cores in virtual time (tests/test_dht_core.py's CoreNet), not a trio swarm:
    the same DHTCore answers and stores, at 2.7 s of CPU instead of 4.7 s (the store is
    the core's ``start_store``, as ``DHTDriver.publish`` runs it). Measured on this
    network: all 480 of the replicas ranked past k and all 640 in all held the record;
    with replies naming k contacts and no probes (the code before), 393 of 480 and 553
    of 640; with replies naming k contacts alone, 433 and 593 (both assertions fail);
    without the probes alone, all 640 (at N=120 the 32 contacts a reply names suffice:
    the probes are for the subtrees no one names, the test below)."""
    config = DHTConfig(ksize=K)
    net, cores = small_network(NODES, config)
    replicas = config.claim_factor * K
    held = far_held = far_total = 0
    publishers = range(0, NODES, 6)
    for i in publishers:
        _, record = make_record(f"handle{i}")
        key = record.key
        owner = cores[i]
        net.call(lambda done, r=record, o=owner: o.start_store(r.key, r.encode(), net.now, done))
        target = int.from_bytes(key, "big")
        truth = sorted(cores, key=lambda c: c.node.long_id ^ target)
        for rank, core in enumerate(truth[:replicas]):
            has = core.storage.get(key) is not None
            held += has
            if rank >= K:
                far_total += 1
                far_held += has
    total = replicas * len(publishers)
    # All of them here; 0.5-1 % short at N=160 on real sockets.
    assert held >= 0.97 * total, (held, total)
    assert far_held >= 0.95 * far_total, (far_held, far_total)


@pytest.mark.slow  # 300 cores (7.5 s of CPU to build) and 7 stores: about 8.5 s of CPU
def test_a_store_reaches_the_subtree_of_the_true_replicas_no_one_named() -> None:
    """Every store reaches (nearly) all of the key's true 80 closest, k = 20 as deployed.

    Sans-I/O cores in virtual time (tests/test_dht_core.py's CoreNet). A probed node that
    is asked for its own id names its own neighbours, and a subtree of the true 80 where
    the lookup knew no one went unnamed: with every probe asking for the node's own id,
    2 of the first 17 stores here missed 5 and 31 of the 80, true ranks 43-79 (the 7th
    and the 17th; at N=200 none of 80 stores missed any, so N=300). On main 291b633
    (eight size samples, topped up) the 7th still missed 5 (ranks 75-79) and the 17th
    none, so the stores stop at the 7th (17 stores: 1.2 s more CPU); with
    random keys 7 of 150 stores at N=300 reached 42-79 of the 80, 14 of 80 at N=1000 53-78
    (scripts/bench_adversary.py at N=1000: ranks 51-79 took the squatter's rival). A
    third of the probes now ask for the point nearest the key of the node's own
    subtree, a third for that of the subtree one out (p2pd/dht/lookup.py
    ``target_for``): 150 of 150 stores at N=300 reached all 80 (own id and outward
    only: 148; of 30 stores like these, 2 missed 3 and 4). The bound leaves 2 to chance."""
    import random

    config = DHTConfig(ksize=20)
    replicas = config.claim_factor * config.ksize
    net, cores = small_network(300, config)
    rng = random.Random(1)
    short: list[tuple[int, list[int]]] = []
    for i in range(7):
        _, record = make_record(f"store{i}")
        key = record.key
        owner = rng.choice(cores)
        target = int.from_bytes(key, "big")
        order = sorted((c for c in cores if c is not owner), key=lambda c: c.node.long_id ^ target)
        net.call(lambda done, r=record, o=owner: o.start_store(r.key, r.encode(), net.now, done))
        missed = [r for r, c in enumerate(order[:replicas]) if c.storage.get(key) is None]
        if len(missed) > 2:
            short.append((i, missed))
    assert not short, short
