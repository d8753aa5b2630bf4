"""A store reaches the true replicas its lookup did not keep (issue 11: plain lookups
"contested" at N=1000, spread placement). Two kinds: replicas that answer late (on a
busy host replies come after the adaptive RTO, 10 ms at its floor on loopback; a node
lookup with k others heard ends without them), and replicas the density rule set aside
as packed because the publisher took the network for smaller than it is. The record
went to nodes ranked past them instead; at N=1000 the replicas so missed later took a
squatter's rival claim first, or answered resolvers without the owner's. The store now
goes to both kinds as well (p2pd/dht/operations.py ``store_targets``).

Sans-I/O cores in virtual time (tests/test_dht_core.py's CoreNet): the busy replicas
answer every request, 0.3 s late, within the 2 s hard timeout."""

from __future__ import annotations

from typing import Any

from test_dht_core import CoreNet, make_record, small_network

from p2pd.config import DHTConfig
from p2pd.dht.core import DHTCore
from p2pd.dht.result import LookupResult
from p2pd.records import HandleRecord

NODES = 40
K = 5  # 20 replicas (claim_factor 4): half the network, so the lookup has k without them
LATE = 0.3  # seconds on top of the network's 10 ms: past the RTO, under rpc_timeout
CONFIG = DHTConfig(ksize=K)
REPLICAS = CONFIG.claim_factor * K


def network() -> tuple[CoreNet, DHTCore, list[DHTCore], HandleRecord]:
    """The publisher, the other cores nearest alice's key first, and her record."""
    net, cores = small_network(NODES, CONFIG)
    _, alice = make_record("alice")
    target = int.from_bytes(alice.key, "big")
    others = sorted(cores[1:], key=lambda c: c.node.long_id ^ target)
    return net, cores[0], others, alice


def test_a_store_reaches_the_true_replicas_that_answer_late() -> None:
    net, publisher, others, alice = network()
    late = others[:REPLICAS:3]  # 7 of the 20 true replicas, the nearest among them
    for core in late:
        net.busy[net.address_of(core)] = LATE
    started = net.now
    stored = net.call(lambda done: publisher.start_store(alice.key, alice.encode(), net.now, done))
    assert publisher.stats["soft_timeouts"] >= len(late)  # given up on, at first
    holders = [i for i, c in enumerate(others) if c.storage.get(alice.key) == alice.encode()]
    # Before: the 7 late ones held nothing, and 7 nodes ranked past 20 held it instead.
    assert holders[:REPLICAS] == list(range(REPLICAS)), holders
    assert stored >= REPLICAS
    assert net.now - started < CONFIG.rpc_timeout  # their answers, not a hard timeout


def test_a_store_with_silent_replicas_ends_at_their_hard_timeout() -> None:
    """Replicas that never answer cost a store one hard timeout at most (they are not
    waited for twice), and it reports the copies the others took."""
    net, publisher, others, alice = network()
    silent = others[:REPLICAS:3]
    for core in silent:
        net.dead.add(net.address_of(core))
    started = net.now
    stored = net.call(lambda done: publisher.start_store(alice.key, alice.encode(), net.now, done))
    assert net.now - started <= CONFIG.lookup_deadline + CONFIG.rpc_timeout
    live = [c for c in others[:REPLICAS] if c not in silent]
    assert all(c.storage.get(alice.key) == alice.encode() for c in live)
    assert all(c.storage.get(alice.key) is None for c in silent)
    assert stored >= len(live)


def test_a_publisher_with_a_low_size_estimate_still_stores_at_the_true_replicas() -> None:
    """A publisher that takes the network for smaller than it is sets true replicas
    aside as packed (p2pd/dht/density.py); they get the record all the same, so that a
    squatter's later claim finds them taken (the first claim wins there). Before, the
    store went to nodes further out instead, and the set-aside replicas held nothing."""
    net, publisher, others, alice = network()
    # One size sample of an eighth of the network, and no fresh one: the estimate is
    # capped at twice it (a quarter of the network).
    publisher.sampler.needed = lambda now, grown=False: False  # type: ignore[method-assign]
    publisher.sizes.samples.append((net.now, NODES / 8, publisher.table_depth()))
    found: list[LookupResult] = []
    lookup = publisher.start_lookup

    def start_lookup(target: bytes, now: float, on_done: Any, **kw: Any) -> None:
        lookup(target, now, lambda result: (found.append(result), on_done(result)), **kw)

    publisher.start_lookup = start_lookup  # type: ignore[method-assign]
    stored = net.call(lambda done: publisher.start_store(alice.key, alice.encode(), net.now, done))
    assert publisher.stats["soft_timeouts"] == 0  # nobody late: the density rule alone
    assert len(found[0].packed) >= 5  # true replicas set aside as packed
    holders = [i for i, c in enumerate(others) if c.storage.get(alice.key) == alice.encode()]
    assert holders[:REPLICAS] == list(range(REPLICAS)), holders
    assert stored >= REPLICAS


def test_a_store_reaches_the_true_replicas_that_timed_out_in_its_lookup() -> None:
    """Replicas whose replies come after the hard timeout, in a lookup that runs past
    it (every reply slow, a busy network): their find requests time out, but they are
    live and take the record when it is sent. At N=1000 under load the owner's store
    lookup timed out on 3-20 contacts, true replicas among them, and those later took a
    squatter's rival. Before, a store sent nothing to a contact that had timed out."""
    net, publisher, others, alice = network()
    for core in others:
        net.busy[net.address_of(core)] = 0.6 * CONFIG.rpc_timeout  # answers, late
    timed_out = others[:REPLICAS:3]  # 7 of the 20 true replicas, the nearest among them
    for core in timed_out:
        net.busy[net.address_of(core)] = 1.5 * CONFIG.rpc_timeout  # never in time
    found: list[LookupResult] = []
    lookup = publisher.start_lookup

    def start_lookup(target: bytes, now: float, on_done: Any, **kw: Any) -> None:
        def done(result: LookupResult) -> None:
            if target == alice.key:
                found.append(result)
            on_done(result)

        lookup(target, now, done, **kw)

    publisher.start_lookup = start_lookup  # type: ignore[method-assign]
    net.call(lambda done: publisher.start_store(alice.key, alice.encode(), net.now, done))
    (store,) = found  # (the others: size samples the publisher takes)
    ids = {core.node_id for core in timed_out}
    assert ids <= {n.id for n in store.timed_out}, "the lookup must have timed them out"
    assert not ids & {n.id for n in store.given_up}
    holders = [i for i, c in enumerate(others) if c.storage.get(alice.key) == alice.encode()]
    assert holders[:REPLICAS] == list(range(REPLICAS)), holders
