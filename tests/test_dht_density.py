"""The density rule against a targeted attacker (issue 11, item 1; p2pd/dht/density.py),
sans I/O: node ids placed by hand, a core's table filled by hand.

The attack: ids ground to share many leading bits with one handle's DHT key, each on a
/24 of its own (the address limits see nothing wrong), become all of the key's k
closest: the replicas and the voters. The rule lets such a cluster have the few slots
that chance allows at its distance, and the replicas are made up further out. Each
test runs the attack with the rule off too (``size=None``, ``packed_check=False``) and
asserts that it succeeds there, so the assertions can fail."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from test_dht_core import CoreNet, node_key
from test_dht_sybil import add_core

from p2pd.claims import CONTESTED, OK, PACKED_CLUSTER, Answer, Resolution, resolve_claims
from p2pd.config import DHTConfig, load_config
from p2pd.dht.density import (
    SIZE_WANTED,
    SizeEstimate,
    SpreadLimit,
    depth_bound,
    estimate_size,
    plausible_count,
    poisson_threshold,
)
from p2pd.dht.result import LookupResult
from p2pd.dht.routing import ID_SPACE, AddressLimit, Node
from p2pd.errors import UsageError
from p2pd.identity import Identity
from p2pd.records import HandleRecord, dht_key
from p2pd.testing.adversary import grind_node_key, shared_bits

BASE = AddressLimit(2, 3)
NOW = 1_700_000_000
OWNER = Identity.from_seed("alice", bytes(range(32)))
OWNER_KEY = OWNER.public_key
OWNER_CLAIM = HandleRecord.create(OWNER, [], seq=1, now=NOW, lifetime=86400).encode()
RIVAL_CLAIM = HandleRecord.create(
    Identity.from_seed("alice", bytes(range(1, 33))), [], seq=1, now=NOW, lifetime=86400
).encode()
K = 20


def honest_nodes(count: int, rng: random.Random, first: int = 0) -> list[Node]:
    """Random ids (a hash of a random key is uniform), each on a /24 of its own."""
    return [
        Node(rng.randbytes(20), f"198.{18 + (first + i) // 256}.{(first + i) % 256}.1", 4000)
        for i in range(count)
    ]


def ground_nodes(key: bytes, bits: int, count: int, rng: random.Random) -> list[Node]:
    """Ids sharing ``bits`` leading bits with ``key``, each on a /24 of its own (what
    grind_node_key gives an attacker, without the 60 µs per key)."""
    out = []
    target = int.from_bytes(key, "big")
    for i in range(count):
        low = rng.getrandbits(160 - bits)
        node_id = ((target >> (160 - bits)) << (160 - bits) | low).to_bytes(20, "big")
        out.append(Node(node_id, f"203.0.{i}.1", 4000))
    return out


def nearest(nodes: list[Node], key: bytes) -> list[Node]:
    target = int.from_bytes(key, "big")
    return sorted(nodes, key=lambda n: n.long_id ^ target)


def test_a_cluster_ground_next_to_a_key_gets_a_few_of_the_k_closest_not_all() -> None:
    rng = random.Random(1)
    key = dht_key("alice")
    honest = honest_nodes(160, rng)
    ground = ground_nodes(key, 10, 40, rng)  # 20 % of 200, all spent on one handle
    ordered = nearest(honest + ground, key)
    ids = {n.id for n in ground}
    off = SpreadLimit(BASE, key, None).select(ordered, K)
    on = SpreadLimit(BASE, key, 200).select(ordered, K)
    assert sum(n.id in ids for n in off) == K  # the attack without the rule: all 20
    assert sum(n.id in ids for n in on) <= 4  # with it: what chance allows that near
    assert len(on) == K  # and the rest are the honest nodes further out


def test_an_attacker_placing_ids_along_the_limit_cannot_reach_two_thirds() -> None:
    """The best an attacker with unbounded ids does against the rule: as many ids as
    chance allows at each distance, nearer than the honest nodes there. It then holds
    every voting slot near the key, but every honest node it pushed out is set aside,
    and counts against any winner (p2pd/claims.py ``set_aside``): over the 3k = 60
    replicas of round 2 its key never has 2/3."""
    key = dht_key("alice")
    target = int.from_bytes(key, "big")
    replicas = 3 * K
    for seed in range(20):
        rng = random.Random(seed)
        honest = honest_nodes(1000, rng)
        curve = [
            Node(
                (target ^ (int(poisson_threshold(c) * ID_SPACE / 1000) + 1)).to_bytes(20, "big"),
                f"203.0.{c}.1",
                4000,
            )
            for c in range(replicas)
        ]
        limit = SpreadLimit(BASE, key, 1000)
        chosen = limit.select(nearest(honest + curve, key), replicas)
        held = sum(n in curve for n in chosen)
        assert held >= replicas // 2  # it does hold the voting slots...
        assert 3 * held < 2 * (len(chosen) + limit.skipped)  # ...but never 2/3 of votes
        # ...also with the set-aside honest replicas credited as far as chance places
        # them (p2pd/claims.py ``credited``): they lie where chance puts honest ids.
        outcome = vote(limit, chosen, curve)
        assert outcome.status == CONTESTED, (seed, held, limit.skipped)


def vote(limit: SpreadLimit, chosen: list[Node], hostile: list[Node]) -> Resolution:
    """The resolve of ``limit``'s round: the chosen voters and the set-aside nodes
    answering, the honest ones with the owner's claim, the hostile with the rival's;
    each set-aside one credited by its distance, as p2pd/dht/resolve.py does."""
    bad = {n.id for n in hostile}

    def held(node: Node) -> bytes:
        return RIVAL_CLAIM if node.id in bad else OWNER_CLAIM

    voters = [Answer(n.id, n.ip, held(n)) for n in chosen]
    aside = [
        Answer(n.id, n.ip, held(n), chance=plausible_count(limit.expected(n) or 0.0))
        for n in limit.passed
    ]
    return resolve_claims(voters, NOW, key=dht_key("alice"), set_aside_answers=aside)


def test_a_cluster_ground_next_to_a_key_denies_the_owner_nothing() -> None:
    """bench_adversary's "targeted /24s" at N=1000: 100 ids ground to 12 bits next to
    alice's key (lambda under 0.25), each on a /24 of its own, holding the rival's
    claim, beside 800 honest nodes; a resolve's 4k = 80 voters. The density rule lets
    the cluster have the 3 slots chance allows there and sets the other 97 aside; each
    of those counted as a vote against alice, and her lookups were all "contested".
    Credited as what chance puts that near, they are 3 votes: alice's key, in every
    network. The control, each set-aside id a vote: contested in every one."""
    key = dht_key("alice")
    for seed in range(10):
        rng = random.Random(seed)
        honest = honest_nodes(800, rng)
        cluster = ground_nodes(key, 12, 100, rng)
        limit = SpreadLimit(BASE, key, 1000)
        chosen = limit.select(nearest(honest + cluster, key), 4 * K)
        assert sum(n in cluster for n in chosen) <= 4 and limit.skipped >= 90
        outcome = vote(limit, chosen, cluster)
        assert outcome.status == OK and outcome.record is not None, seed
        assert outcome.record.public_key == OWNER_KEY
        uncredited = [Answer(n.id, n.ip, RIVAL_CLAIM) for n in limit.passed]
        voters = [Answer(n.id, n.ip, RIVAL_CLAIM if n in cluster else OWNER_CLAIM) for n in chosen]
        control = resolve_claims(voters, NOW, key=key, set_aside_answers=uncredited)
        assert control.status == CONTESTED


def test_ids_spread_over_the_replicas_neighbourhood_deny_the_handle_at_an_honest_estimate() -> None:
    """What the credit does not defend (docs/SECURITY.md, "Not defended"): the same 100
    ids spread over the neighbourhood of a key's 80 voters (3-5 shared bits, among 50-100
    honest nodes) instead of ground into a sliver. They take 34-56 of the 80 admitted
    slots, up to 70 % (more than 2/3 of the voters), and push honest replicas aside;
    those lie where chance puts honest ids and count in full, so at a resolver whose
    estimate is the network's size the rival's key does not win: "contested", a denial
    the rule cannot lift (nothing tells the honest half of a crowd from the rest). At a
    resolver whose estimate is 1.4-2x the size, the crowd looks like chance and wins:
    2 and 4 of 10 placements at 4 bits, 10 of 10 at 5 bits and 2x, with this rule and
    with every set-aside id a vote alike (bench_adversary ``--grind-bits 4`` at N=1000:
    2 and 5 wrong keys of 100; docs/SECURITY.md). What keeps estimates from straying
    that far is the next test's."""
    key = dht_key("alice")
    for bits in (3, 4, 5):
        for seed in range(4):
            rng = random.Random(seed)
            honest = honest_nodes(800, rng)
            spread = ground_nodes(key, bits, 100, rng)
            limit = SpreadLimit(BASE, key, 1000)
            chosen = limit.select(nearest(honest + spread, key), 4 * K)
            assert sum(n in spread for n in chosen) >= 30  # a crowd, not a sliver
            outcome = vote(limit, chosen, spread)
            assert outcome.status == CONTESTED, (bits, seed)
            assert outcome.record is None


def eight_samples(sizes: SizeEstimate, everyone: list[Node], rng: random.Random) -> None:
    """Eight node lookups of random ids (SIZE_WANTED: what the sampler takes), each
    finding the true k closest, a crowd's ids among them where the target fell in it."""
    for _ in range(SIZE_WANTED):
        target = rng.randbytes(20)
        result = LookupResult(closest=nearest(everyone, target)[:K])
        sizes.sampling(target, K, 0.0, None, lambda _: None)(result)


@pytest.mark.parametrize("bits", [4, 5])
def test_a_resolver_inside_a_crowd_estimates_the_network_and_the_crowd_does_not_win(
    bits: int,
) -> None:
    """The crowd of the test above (100 ids over the 1/2^bits of the id space around
    alice's key, beside 800 honest nodes), resolved by an honest node whose own id lies
    inside it: its own neighbourhood is 3-6x as dense as the network (the key's bucket
    left out or not, the crowd is all around it). Before, that was its estimate, capped
    at twice its largest sample (about 2x N), and the crowd took alice's handle there:
    the control, 7 of 20 networks at 4 bits, 20 of 20 at 5 (bench_adversary
    ``--grind-bits 4`` at N=1000: 2 and 5 of 100 lookups returned the attacker's key).
    Now the estimate is the pool of its eight samples, its own left out for being over
    twice theirs (p2pd/dht/density.py ``SizeEstimate``): under 1.3 N, and the crowd
    wins in none."""
    key = dht_key("alice")
    before = after = 0
    for seed in range(20):
        rng = random.Random(seed)
        honest = honest_nodes(800, rng)
        crowd = ground_nodes(key, bits, 100, rng)
        everyone = honest + crowd
        me = ground_nodes(key, bits, 1, rng)[0].id  # an honest id inside the crowd
        neighbours = nearest(everyone, me)[: 2 * K]
        sizes = SizeEstimate()
        eight_samples(sizes, everyone, rng)
        own = estimate_size(me, neighbours, K, key)
        assert own is not None and own > 1.5 * len(everyone)  # the crowd all around
        size = sizes.estimate(me, neighbours, K, 0.0, key, 2 * K)
        assert size is not None and size < 1.3 * len(everyone)
        was = min(own, 2 * max(sample for _, sample, _ in sizes.samples))
        for estimate in (was, size):
            limit = SpreadLimit(BASE, key, estimate)
            outcome = vote(limit, limit.select(nearest(everyone, key), 4 * K), crowd)
            taken = outcome.record is not None and outcome.record.public_key != OWNER_KEY
            before += taken and estimate == was
            after += taken and estimate == size
    assert after == 0, before
    assert before >= 5, after  # the control: the estimate as it was


def test_honest_estimates_stray_under_a_third_up_where_one_neighbourhood_strays_a_tenth() -> None:
    """200 honest resolvers of a network of 1,000 (no attacker), each with eight
    samples: their estimates stray over 1.3 N in none (the pool of nine
    neighbourhoods strays by 8 %) and under 0.7 N in none; their own neighbourhoods
    alone (the estimate before, never lowered) over 1.3 N in about one in ten."""
    rng = random.Random(8)
    n = 1000
    nodes = honest_nodes(n, rng)
    pool = []  # the samples' sizes, each from a lookup of a random id
    for _ in range(400):
        target = rng.randbytes(20)
        kth = nearest(nodes, target)[K - 1].long_id ^ int.from_bytes(target, "big")
        pool.append((K - 1) * ID_SPACE / kth)
    high = low = alone = 0
    for resolver in rng.sample(nodes, 200):
        sizes = SizeEstimate()
        for value in rng.sample(pool, SIZE_WANTED):
            sizes.samples.append((0.0, value, None))
        neighbours = nearest(nodes, resolver.id)[1 : 2 * K + 1]
        own = estimate_size(resolver.id, neighbours, K)
        size = sizes.estimate(resolver.id, neighbours, K, 0.0, None, 2 * K)
        assert own is not None and size is not None
        alone += own > 1.3 * n
        high += size > 1.3 * n
        low += size < 0.7 * n
    assert (high, low) == (0, 0)
    assert alone >= 10  # the control: one neighbourhood alone strays so


def test_samples_of_a_smaller_network_stop_counting_once_fresh_ones_are_in() -> None:
    """A sample is of the network as it was when our table's full depths were what they
    were then (one more per doubling): eight taken at depth 3 still count at depth 4
    (a table that learned the contacts of a depth it had missed, or a network that
    grew: bench_adversary at N=1000 left a resolver with 1 of its 8, which read 1.3x
    the honest density, and it returned a crowd's key) until four fresh ones are in,
    then only those; at depth 5 (a network four times larger) none."""
    sizes = SizeEstimate()
    for i in range(SIZE_WANTED):
        sizes.samples.append((float(i), 500.0, 3))
    assert len(sizes.current(10.0, 3)) == SIZE_WANTED
    assert len(sizes.current(10.0, 4)) == SIZE_WANTED and sizes.fresh(10.0, 4) == []
    for i in range(SIZE_WANTED // 2):
        sizes.samples.append((20.0 + i, 1000.0, 4))
    assert [size for _, size in sizes.current(30.0, 4)] == [1000.0] * (SIZE_WANTED // 2)
    assert len(sizes.current(30.0, 5)) == SIZE_WANTED // 2  # the depth-4 ones, now stale by one
    sizes.samples.clear()
    sizes.samples.append((0.0, 500.0, 3))
    assert sizes.current(10.0, 5) == []


def test_honest_nodes_alone_are_almost_never_skipped() -> None:
    rng = random.Random(2)
    honest = honest_nodes(1000, rng)
    skipped = 0
    for _ in range(200):
        key = rng.randbytes(20)
        limit = SpreadLimit(BASE, key, 1000)
        limit.select(nearest(honest, key), K)
        skipped += limit.skipped
    assert skipped <= 4  # of 4,000 slots (about one in 1/PACKED_P placements is unlucky)


def set_aside_by_chance(contacts: int, trials: int, rng: random.Random) -> list[int]:
    """For each of ``trials`` honest networks of ``contacts`` + 1 random ids: how many
    of a resolver's contacts the density rule sets aside around a random key, with the
    size the resolver estimates as a lookup does (its contacts, the key's bucket left
    out, its table size, its table's depth bound) and a resolve's 4k voters."""
    out = []
    for _ in range(trials):
        me = rng.randbytes(20)
        known = honest_nodes(contacts, rng)
        key = rng.randbytes(20)
        size = estimate_size(me, known, K, key, contacts, depth_bound(me, known, K))
        limit = SpreadLimit(BASE, key, size)
        limit.select(nearest(known, key), 4 * K)
        out.append(limit.skipped)
    return out


@pytest.mark.parametrize("contacts", [1, 2, 5, 10, 20, 50])
def test_how_often_chance_sets_an_honest_replica_aside(contacts: int) -> None:
    """Issue 11's CI flake: in a 2-node network the owner's node was set aside (its id
    by chance next to her key) and her key needed 8 votes. The rates here (printed,
    ``-s``; docs/SECURITY.md) are per lookup of a random key. With fewer than 2k
    contacts the size is their number, exact when a node knows the whole network, so
    a set-aside stays near PACKED_P per admitted slot: rarer than 1e-3 with 1-2
    contacts, not likelier. What resolve_claims needs: in a network of up to 11 nodes,
    where 8 votes cannot always be had, chance never sets PACKED_CLUSTER aside."""
    rng = random.Random(contacts)
    trials = 10_000
    counts = set_aside_by_chance(contacts, trials, rng)
    rates = [sum(c >= m for c in counts) / trials for m in (1, 2, PACKED_CLUSTER)]
    shown = ", ".join(f"{rate:.1e}" for rate in rates)
    print(f"{contacts} contacts: lookups with >= 1, 2, 3 set aside: {shown}")
    if contacts <= 10:
        assert rates[0] <= 5e-3  # about PACKED_P per slot
        assert rates[2] == 0  # never the floor's mark


def test_the_size_estimate_from_a_neighbourhood_is_within_a_factor_of_two() -> None:
    rng = random.Random(3)
    for n in (200, 1000, 5000):
        nodes = honest_nodes(n, rng)
        own = rng.randbytes(20)
        estimate = estimate_size(own, nearest(nodes, own)[: 2 * K], K)
        assert estimate is not None and n / 2 < estimate < 2 * n
    small = estimate_size(b"\x00" * 20, honest_nodes(2 * K - 1, rng), K)
    assert small == 2 * K  # a lower bound: the contacts known and ourselves


def test_a_cluster_next_to_a_node_does_not_inflate_its_estimate_once_it_looked_elsewhere() -> None:
    rng = random.Random(4)
    honest = honest_nodes(200, rng)
    own = rng.randbytes(20)
    cluster = ground_nodes(own, 14, 20, rng)
    sizes = SizeEstimate()
    inflated = sizes.estimate(own, nearest(honest + cluster, own)[: 2 * K], K, 0.0)
    assert inflated is not None and inflated > 1000  # 20 ids where chance puts none
    for _ in range(5):  # node lookups of random keys (publishing, refreshing)
        target = rng.randbytes(20)
        result = LookupResult(closest=nearest(honest, target)[:K])
        sizes.sampling(target, K, 0.0, None, lambda _: None)(result)
    estimate = sizes.estimate(own, nearest(honest + cluster, own)[: 2 * K], K, 0.0)
    # The samples' pool: its own neighbourhood, over twice theirs, is left out (it was
    # capped at twice the largest sample).
    assert estimate is not None and 0.7 * 200 < estimate < 1.3 * 200


def test_a_node_near_a_targeted_key_does_not_count_the_cluster_as_its_neighbourhood() -> None:
    """An honest node whose id shares 10 bits with a handle's key, 40 ids ground to 12
    bits next to the key, no lookup samples to cap anything (a fresh network): without
    the target its estimate is 100x too high and the rule admits the cluster into 2/3
    of the k closest (the rival's key, silently: the rare case of tests/test_adversary.py);
    judged for that key, the cluster is left out of the estimate and set aside."""
    rng = random.Random(5)
    key = dht_key("alice")
    honest = honest_nodes(300, rng)
    cluster = ground_nodes(key, 12, 40, rng)
    # Exactly 10 bits shared with the key: the key is in our table's bucket 10.
    own = (int.from_bytes(key, "big") ^ (1 << 149)) >> 149 << 149 | rng.getrandbits(149)
    own_id = own.to_bytes(20, "big")
    neighbours = nearest(honest + cluster, own_id)[: 4 * K]
    blind = estimate_size(own_id, neighbours, K)
    judged = estimate_size(own_id, neighbours, K, key)
    assert blind is not None and blind > 20_000  # the cluster taken for the neighbourhood
    assert judged is not None and 150 < judged < 600  # 340 nodes
    closest = nearest(honest + cluster, key)
    taken = {}
    for name, size in (("blind", blind), ("judged", judged)):
        chosen = SpreadLimit(BASE, key, size).select(closest, K)
        taken[name] = sum(1 for n in chosen if n in cluster)
    assert 3 * taken["blind"] >= 2 * K  # the control: 2/3 of the votes the attacker's
    assert taken["judged"] <= 5, taken
    # An estimate for a key far from our id is as before.
    far = bytes(b ^ 0x80 if i == 0 else b for i, b in enumerate(own_id))
    assert estimate_size(own_id, neighbours, K, far) == blind


def test_a_node_inside_the_ground_prefix_is_bounded_by_its_table() -> None:
    """A node whose id shares *more* bits with the key than the cluster was ground to
    (12 against 10) has half the cluster in its own neighbourhood, whatever is left out:
    the routing table's size bounds its estimate (a table of a network of 340 holds a
    hundred-odd contacts, not the thousands a network of 20,000 would give)."""
    rng = random.Random(6)
    key = dht_key("alice")
    honest = honest_nodes(300, rng)
    cluster = ground_nodes(key, 10, 40, rng)
    own = (int.from_bytes(key, "big") ^ (1 << 147)) >> 147 << 147 | rng.getrandbits(147)
    own_id = own.to_bytes(20, "big")
    neighbours = nearest(honest + cluster, own_id)[: 4 * K]
    table = 5 * K  # a table in a network of 340: about k * log2(340 / k) + k contacts
    unbounded = estimate_size(own_id, neighbours, K, key)
    bounded = estimate_size(own_id, neighbours, K, key, table)
    assert unbounded is not None and unbounded > 5000  # the cluster as its neighbourhood
    assert bounded is not None and 340 <= bounded <= 4 * 340
    closest = nearest(honest + cluster, key)
    taken = {}
    for name, size in (("unbounded", unbounded), ("bounded", bounded)):
        chosen = SpreadLimit(BASE, key, size).select(closest, K)
        taken[name] = sum(1 for n in chosen if n in cluster)
    assert 3 * taken["unbounded"] >= 2 * K, taken  # the control
    assert 3 * taken["bounded"] < K, taken


def test_an_honest_replica_behind_a_cluster_still_stores_the_record() -> None:
    """A node with a few honest nodes nearer a key than it (of 300), and 40 ids ground
    nearer still: it refuses a store there without the rule (over 40 nodes nearer: not
    among the k closest) and takes it with the rule (only the few it admits count)."""
    results = {}
    for check in (True, False):
        rng = random.Random(5)
        net = CoreNet()
        config = DHTConfig(packed_check=check)
        me = add_core(net, node_key(7), ("198.51.100.7", 4000), config)
        honest = honest_nodes(300, rng)
        mine = me.node.long_id
        radius = 6 * ID_SPACE // 300
        for _ in range(10_000):  # a key with 2 to 8 honest nodes nearer than us
            key = (mine ^ rng.randrange(radius)).to_bytes(20, "big")
            target = int.from_bytes(key, "big")
            if 2 <= sum((n.long_id ^ target) < (mine ^ target) for n in honest) <= 8:
                break
        else:
            raise AssertionError("no such key")
        for node in honest + ground_nodes(key, 12, 40, rng):
            node.key = b"k" * 32
            me.table.add(node, net.now)
        results[check] = me.is_close_to(key, K)
    assert results == {True: True, False: False}


@pytest.mark.parametrize("shared", [6, 8, 10])
def test_a_cluster_that_filled_our_table_near_a_key_does_not_fill_our_seeds(shared: int) -> None:
    """Why no honest replica voted in bench_adversary's 2-vote wrong keys at N=1000.
    Kademlia splits a full bucket whose contacts share a prefix that is not a multiple of
    5 bits, so 100 ids ground to 12 bits next to a key all enter the table of a node
    whose id shares 6 or more bits with it (800 other nodes known): they are all of its 80
    contacts nearest the key, and a lookup seeded with those alone hears of nothing
    else if they name only each other (eclipse). The seeds now reach past the ids the
    density rule sets aside: the 80 nearest it admits, honest nodes but for a few."""
    rng = random.Random(8)
    key = dht_key("alice")
    net = CoreNet()
    me = add_core(net, grind_node_key(key, shared, rng), ("198.51.100.7", 4000))
    assert shared <= shared_bits(me.node_id, key) < 12
    honest = honest_nodes(800, rng)
    cluster = ground_nodes(key, 12, 100, rng)
    everyone = honest + cluster
    rng.shuffle(everyone)
    for node in everyone:
        node.key = b"k" * 32
        me.table.add(node, net.now)
    ids = {n.id for n in cluster}
    wide = 4 * K
    # The control: the table's 80 nearest the key are the cluster.
    assert sum(n.id in ids for n in me.table) >= wide
    assert all(n.id in ids for n in me.table.closest(key, wide))
    seeds = me.lookup_seeds(key, wide)
    assert seeds[:wide] == me.table.closest(key, wide)  # nearest first, as before
    honest_seeds = [n for n in seeds if n.id not in ids]
    assert len(honest_seeds) >= wide - 5
    # ...and they are the honest contacts nearest the key that we know.
    target = int.from_bytes(key, "big")
    known = sorted((n for n in me.table if n.id not in ids), key=lambda n: n.long_id ^ target)
    assert honest_seeds == known[: len(honest_seeds)]


def test_the_threshold_is_the_poisson_tail() -> None:
    assert poisson_threshold(0) < 0.002  # one node nearer than 1/1000 of the mean gap
    assert 8.5 < poisson_threshold(19) < 9.5  # the 20th node: where 9 are expected
    assert all(poisson_threshold(c) < poisson_threshold(c + 1) for c in range(100))


def test_ids_over_the_address_limits_are_not_set_aside_and_count_against_nobody() -> None:
    """40 ids ground next to a key on one IP: the address limits keep 2 of them; the
    other 38 are not candidates at all, so they are not set aside (a set-aside node
    counts against any winner: 38 such votes would make every handle near them
    contested)."""
    rng = random.Random(6)
    key = dht_key("alice")
    ground = [
        Node(n.id, "203.0.113.5", 4000 + i) for i, n in enumerate(ground_nodes(key, 10, 40, rng))
    ]
    limit = SpreadLimit(BASE, key, 200)
    chosen = limit.select(nearest(honest_nodes(160, rng) + ground, key), K)
    assert sum(n.ip == "203.0.113.5" for n in chosen) + limit.skipped <= 2


def test_the_configuration_file_cannot_turn_the_rule_off(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[dht]\npacked_check = false\n")
    with pytest.raises(UsageError, match="packed_check is a benchmark switch"):
        load_config(tmp_path)


def test_the_threshold_agrees_with_a_plain_bisection() -> None:
    """poisson_threshold takes Newton steps (a daemon computes 512 at its first lookup);
    a plain 60-step bisection of the same tail must give the same lambda."""
    from p2pd.dht.density import MAX_COUNT, PACKED_P, _poisson_tail

    def bisection(c: int) -> float:
        lo, hi = 0.0, float(c + 10 + 10 * math.sqrt(c + 1))
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if _poisson_tail(mid, c) >= PACKED_P else (mid, hi)
        return hi

    for c in [*range(0, 60), *range(60, MAX_COUNT, 13), MAX_COUNT - 1]:
        assert math.isclose(poisson_threshold(c), bisection(c), rel_tol=1e-9), c


@pytest.mark.parametrize("shared", [6, 8, 10])
def test_a_resolver_near_a_targeted_key_estimates_the_network_not_its_bucket(
    shared: int,
) -> None:
    """A resolver whose id shares ``shared`` bits with a handle's key, in a network of
    1,000 honest nodes and 100 ids ground to 12 bits next to the key (bench_adversary's
    targeted placement at N=1000). Its table holds the whole cluster in the key's bucket
    (the unbalanced splits above), and the cluster was most of its 4k contacts nearest
    its own id: with that bucket left out, fewer than k were left, and the estimate was
    their count (14 in the benchmark). Every node near the key then looked packed:
    honest replicas by the dozen were set aside (counted against the owner:
    "contested"), and the lookup asked up to its cap (465 RPCs, the slowest 1 %). Now
    the estimate is taken over every contact (p2pd/dht/core.py ``spread_limit``), the
    ones left scaled by the space they stand for: near N, the honest replicas are
    admitted, and the cluster still gets only the few slots chance allows."""
    rng = random.Random(20 + shared)
    key = dht_key("alice")
    honest = honest_nodes(1000, rng)
    cluster = ground_nodes(key, 12, 100, rng)
    everyone = honest + cluster
    closest = nearest(everyone, key)
    honest_replicas = {n.id for n in nearest(honest, key)[: 4 * K]}
    low = 1 << (159 - shared)
    checked = 0
    for _ in range(6):
        net = CoreNet()
        me = add_core(net, grind_node_key(key, shared, rng), ("198.51.100.7", 4000))
        rng.shuffle(everyone)
        for node in everyone:
            node.key = b"k" * 32
            me.table.add(node, net.now)
        own = me.node.long_id
        left = [
            n for n in me.table.closest(me.node_id, 4 * K) if not low <= (n.long_id ^ own) < 2 * low
        ]
        if len(left) >= K:
            continue  # the normal branch before: not this case
        checked += 1
        old = float(len(left) + 1)  # what the 4k nearest and the count gave
        limit = me.spread_limit(key)
        assert limit is not None and limit.scale is not None
        new = ID_SPACE / limit.scale
        assert 1100 / 4 < new < 4 * 1100, (new, len(left), len(me.table))
        for size, honest_aside_max in ((old, None), (new, 4)):
            chosen = SpreadLimit(BASE, key, size)
            voters = chosen.select(closest, 4 * K)
            aside = sum(1 for n in chosen.passed if n.id in honest_replicas)
            admitted = sum(1 for n in voters if n in cluster)
            if honest_aside_max is None:
                assert aside >= 20, aside  # the control: the old estimate's harm
            else:
                assert aside <= honest_aside_max, (aside, new)
                assert admitted <= 5, (admitted, new)  # as for a resolver far away
    assert checked >= 3  # the case was met


@pytest.mark.parametrize("samples", [0, 1])
def test_a_resolver_inside_the_ground_prefix_estimates_the_network_not_the_cluster(
    samples: int,
) -> None:
    """bench_adversary's 2 wrong keys at N=300 (targeted /24s): a resolver whose id
    shares 13 bits with a handle's key, 60 ids ground to 11 bits next to it, a real
    routing table that knows the whole network (the cluster swells it to 360 contacts:
    the table-size bound is 2^19 k), and 0 or 1 node lookup samples (the cap needed 2).
    The cluster is its own neighbourhood whatever bucket is left out: it estimated 300
    as 100,000 and more, and the cluster took every voting slot (the rival's key
    without "contested"). Now one sample caps it, and with none the table's depth
    bound does (p2pd/dht/density.py ``depth_bound``): the estimate is
    within 5x of N (twice what the depth it is taken at implies) and the cluster gets
    what chance allows."""
    key = dht_key("alice")
    n = 300
    for run in range(3):
        rng = random.Random(40 + 10 * samples + run)
        honest = honest_nodes(n, rng)
        cluster = ground_nodes(key, 11, 60, rng)
        everyone = honest + cluster
        net = CoreNet()
        me = add_core(net, grind_node_key(key, 13, rng), ("198.51.100.7", 4000))
        rng.shuffle(everyone)
        for node in everyone:
            node.key = b"k" * 32
            me.table.add(node, net.now)
        assert len(me.table) > 2 * n / 2  # swollen: far buckets split too
        for _ in range(samples):  # a node lookup of a random key (a publish)
            target = rng.randbytes(20)
            result = LookupResult(closest=nearest(honest, target)[:K])
            me.sizes.sampling(target, K, net.now, me.table_depth(), lambda _: None)(result)
        # What it was: the neighbourhood, the key's bucket left out, the table-size bound
        # (one sample did not cap it).
        unbounded = estimate_size(me.node_id, me.table, K, key, len(me.table))
        limit = me.spread_limit(key)
        assert limit is not None and limit.scale is not None
        size = ID_SPACE / limit.scale
        closest = nearest(everyone, key)
        ids = {node.id for node in cluster}
        assert unbounded is not None and unbounded > 20 * n  # the control: inflated...
        control = SpreadLimit(BASE, key, unbounded).select(closest, K)
        assert 3 * sum(node.id in ids for node in control) >= 2 * K  # ...and it wins
        assert n / 2 < size <= 5 * n, (size, len(me.table))
        voters = SpreadLimit(BASE, key, size).select(closest, 4 * K)
        assert sum(node.id in ids for node in voters[:K]) <= 5
        assert sum(node.id in ids for node in voters) <= 6


def test_a_young_table_with_one_lookup_sample_is_not_held_down_by_its_depths() -> None:
    """The other side of the depth bound: a node that has just joined a network of
    1,000 knows the contacts of its bootstrap lookup (the 60 nearest its own id) and a
    few others, so its shallow depths hold few contacts and its depth bound is about
    80: that alone would make every node near a key look packed. So there is no depth
    bound while depth 0 is not full, and once one node lookup sampled the network the
    bound is never below the sample."""
    rng = random.Random(50)
    n = 1000
    honest = honest_nodes(n, rng)
    net = CoreNet()
    me = add_core(net, node_key(8), ("198.51.100.8", 4000))
    for node in nearest(honest, me.node_id)[:60] + rng.sample(honest, 5):
        node.key = b"k" * 32
        me.table.add(node, net.now)
    key = dht_key("alice")
    counts = [0] * 161
    for node in me.table:
        counts[160 - (node.long_id ^ int.from_bytes(me.node_id, "big")).bit_length()] += 1
    assert counts[0] < K  # the young table's shape: its depths say nothing of N yet
    assert depth_bound(me.node_id, me.table, K) is None
    target = rng.randbytes(20)
    me.sizes.sampling(target, K, net.now, me.table_depth(), lambda _: None)(
        LookupResult(closest=nearest(honest, target)[:K])
    )
    limit = me.spread_limit(key)
    assert limit is not None and limit.scale is not None
    assert n / 2 < ID_SPACE / limit.scale < 2 * n
    limit.select(nearest(honest, key), 4 * K)
    assert limit.skipped <= 1  # the honest replicas are not set aside
