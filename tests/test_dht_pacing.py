"""A lookup's own pace (p2pd/dht/pacing.py): a dead contact whose RTO was measured long
ago in a burst no longer holds a resolve for that RTO, and a live contact is still
waited for twice its own round trip however fast the others answer (an attacker next
to the resolver answers fast; the honest replicas it would like dropped are farther).

Sans-I/O cores in virtual time (tests/test_dht_core.py's CoreNet: 10 ms one way)."""

from __future__ import annotations

from test_dht_core import WALL, CoreNet, make_record, new_lookup, nid, seed_nodes, small_network

from p2pd import wire
from p2pd.claims import OK
from p2pd.dht.core import DHTCore
from p2pd.dht.routing import Node
from p2pd.dht.rtt import RttEstimate
from p2pd.identity import HandleRef
from p2pd.records import dht_key

NODES = 30


def nearest_first(*ids: int) -> list[Node]:
    """Seed nodes sorted by their distance to the lookups' target (``nid(999)``)."""
    target = int.from_bytes(nid(999), "big")
    return sorted(seed_nodes(*ids), key=lambda n: n.long_id ^ target)


def published(name: str) -> tuple[CoreNet, list[DHTCore], bytes]:
    """cores[0] resolves; the others nearest the record's key first."""
    net, cores = small_network(NODES)
    _, record = make_record(name)
    net.call(lambda done: cores[1].start_store(record.key, record.encode(), net.now, done))
    target = int.from_bytes(record.key, "big")
    cores[1:] = sorted(cores[1:], key=lambda c: c.node.long_id ^ target)
    return net, cores, record.key


def resolve(net: CoreNet, core: DHTCore, name: str) -> tuple[str, float, set[bytes], set[bytes]]:
    """Status, seconds taken, the voters and the nodes given up on."""
    ref = HandleRef(name)
    started = net.now
    resolution, result = net.call(
        lambda done: core.start_resolve(dht_key(name), net.now, WALL, ref.matches, done)
    )
    return (
        resolution.status,
        net.now - started,
        set(result.voters),
        {n.id for n in result.given_up},
    )


def test_dead_replicas_with_a_stale_rto_do_not_hold_the_resolve_for_it() -> None:
    net, cores, _ = published("alice")
    resolver = cores[0]
    dead = cores[1:6]  # five of the nearest replicas die...
    for core in dead:
        address = net.address_of(core)
        net.dead.add(address)
        # ...with the RTO of their last exchanges, measured in a burst: srtt 20 ms,
        # rttvar 100 ms, RTO 420 ms (p2pd/dht/rtt.py)
        resolver.rtt._per[address] = RttEstimate(srtt=0.02, rttvar=0.1)
        assert resolver.rtt.rto(address) > 0.4
    status, took, voters, given_up = resolve(net, resolver, "alice")
    assert status == OK
    # Live replies take 20 ms: given up on after 3 x the slowest (about 60-70 ms), not
    # after 420 ms. Before pacing the resolve took over 0.42 s.
    assert took < 0.25, took
    assert {c.node_id for c in dead} <= given_up
    assert not voters & {c.node_id for c in dead}


def test_a_live_replica_is_waited_for_twice_its_own_round_trip() -> None:
    """The replicas nearest the key answer in 150 ms, the rest in 20 ms: the lookup's pace
    (3 x 20 ms) asks past them, but holds its end until twice their own round trip
    (measured before: 100 ms), and their votes count."""
    net, cores, _ = published("bob")
    resolver = cores[0]
    far = cores[1:5]
    for core in far:
        address = net.address_of(core)
        net.busy[address] = 0.13  # 20 ms of network + 130 ms
        resolver.rtt._per[address] = RttEstimate(srtt=0.1, rttvar=0.05)  # RTO 300 ms
    status, took, voters, given_up = resolve(net, resolver, "bob")
    assert status == OK
    assert {c.node_id for c in far} <= voters  # heard, and voting
    assert not given_up & {c.node_id for c in far}
    assert took < 0.3, took  # within their RTO: nothing timed out
    assert resolver.stats["paced_late"] >= 1  # the next candidates were asked meanwhile


def test_a_late_contact_holds_the_end_until_it_is_slow_or_answers() -> None:
    """Lookup.late: the next candidate is asked at once, but neither the early end nor
    the ordinary one comes while a late contact may still answer."""
    seeds = nearest_first(*range(1, 8))
    lookup = new_lookup(seeds, find_value=True, k=3, alpha=3, quorum=2)
    first = lookup.next_requests(0.0)
    assert [n.id for n in first] == [n.id for n in seeds[:3]]
    assert lookup.late(first[0].id)
    assert not lookup.late(first[0].id)  # once
    (extra,) = lookup.next_requests(0.01)  # the next candidate, asked already
    assert extra.id == seeds[3].id
    for node in (*first[1:], extra):
        lookup.replied(node.id, wire.FindValueReply(b"v", ()))
    assert lookup.next_requests(0.02) == [] and not lookup.done  # held: no early end
    assert lookup.replied(first[0].id, wire.FindValueReply(b"rival", ()))  # it answered
    lookup.next_requests(0.03)
    assert lookup.done
    assert first[0].id in lookup.result.voters  # and its answer counts
    assert b"rival" in [v for _, v in lookup.result.values]


def test_a_late_contact_given_up_on_at_its_soft_deadline() -> None:
    seeds = nearest_first(*range(1, 6))
    lookup = new_lookup(seeds, find_value=False, k=2, alpha=2)
    first = lookup.next_requests(0.0)
    assert lookup.late(first[0].id)
    (extra,) = lookup.next_requests(0.01)
    for node in (first[1], extra):
        lookup.replied(node.id, ())
    assert lookup.next_requests(0.02) == [] and not lookup.done
    assert lookup.slow(first[0].id)  # its soft deadline: given up on now
    assert not lookup.slow(first[0].id)
    lookup.next_requests(0.03)
    assert lookup.done
    assert lookup.result.slow == 1
    assert [n.id for n in lookup.result.given_up] == [first[0].id]


def test_a_late_contact_past_the_quorum_does_not_hold_the_early_end() -> None:
    """In flight it would not have held it either: only the quorum nearest must answer."""
    seeds = nearest_first(*range(1, 8))
    lookup = new_lookup(seeds, find_value=True, k=4, alpha=4, quorum=2)
    first = lookup.next_requests(0.0)
    assert len(first) == 4
    assert lookup.late(first[3].id)  # the farthest of the four
    for node in first[:2]:
        lookup.replied(node.id, wire.FindValueReply(b"v", ()))
    lookup.next_requests(0.01)
    assert lookup.done  # the two nearest agree
