"""Address discovery, dial-back and DHT client mode (p2pd/dht/reachability.py, issue 13).

First the pure parts by hand (observations with ``now``, the helper's budget, a dial-back
round), then the whole of it on the simulated network (p2pd/testing/fakenet.py, virtual
time): public nodes find themselves public and reachable, a node behind an
endpoint-independent NAT learns its mapped address, one behind an endpoint-dependent NAT
learns that, and both stay out of the public nodes' routing tables while they still
publish and resolve.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from p2pd import wire
from p2pd.config import DHTConfig
from p2pd.dht import core as dht_core
from p2pd.dht import reachability as reach_mod
from p2pd.dht.core import DHTCore
from p2pd.dht.nodekey import NodeKey
from p2pd.dht.reachability import (
    HELP_GROUP_INTERVAL,
    HELP_PER_MINUTE,
    OBSERVATION_TTL,
    DialbackRound,
    HelpBudget,
    Observations,
    group_of,
)
from p2pd.dht.routing import Node
from p2pd.dht.storage import RecordStorage
from p2pd.errors import WireError
from p2pd.identity import HandleRef, Identity
from p2pd.records import HandleRecord
from p2pd.testing.fakenet import FakeNetwork
from p2pd.testing.swarm import FAKE_PORT, Swarm, SwarmNode, open_swarm
from p2pd.wire import Address

LOCAL = ["10.0.0.5"]
MAPPED = Address("203.0.113.7", 40000)


def test_timer_kind_matches_the_core() -> None:
    assert reach_mod._DEADLINE == dht_core._DEADLINE


def test_observer_groups_are_slash_24_and_slash_48() -> None:
    assert group_of("198.51.100.7") == group_of("198.51.100.200") == "198.51.100.0/24"
    assert group_of("198.51.101.7") != group_of("198.51.100.7")
    assert group_of("2001:db8:1:2::1") == "2001:db8:1::/48"
    assert group_of("::ffff:198.51.100.7") == "198.51.100.0/24"


def test_two_observer_groups_agree_on_an_endpoint_independent_mapping() -> None:
    obs = Observations()
    assert obs.mapping(0.0, LOCAL) == ("unknown", None)
    obs.add("198.51.100.1", MAPPED, 1.0)
    assert obs.mapping(1.0, LOCAL) == ("unknown", None)  # one observer is no quorum
    obs.add("192.0.2.1", MAPPED, 2.0)
    assert obs.mapping(2.0, LOCAL) == ("endpoint-independent", MAPPED)
    assert obs.reflexive(2.0) == [(MAPPED, 2)]


def test_observers_in_one_slash_24_count_once() -> None:
    obs = Observations()
    for i in range(10):  # one operator's ten nodes, all in 198.51.100.0/24
        obs.add(f"198.51.100.{i + 1}", MAPPED, float(i))
    assert obs.mapping(10.0, LOCAL) == ("unknown", None)
    assert obs.reflexive(10.0) == [(MAPPED, 1)]


def test_a_single_liar_moves_nothing() -> None:
    obs = Observations()
    obs.add("198.51.100.1", MAPPED, 1.0)
    obs.add("192.0.2.1", MAPPED, 1.0)
    # the liar says another address, again and again, from one /24
    for i in range(20):
        obs.add(f"203.0.113.{i + 1}", Address("203.0.113.66", 1234), 2.0)
    assert obs.mapping(2.0, LOCAL) == ("endpoint-independent", MAPPED)
    # and it cannot make an endpoint-independent NAT look endpoint-dependent either
    obs2 = Observations()
    obs2.add("198.51.100.1", MAPPED, 1.0)
    obs2.add("203.0.113.1", Address(MAPPED.host, 999), 1.0)
    assert obs2.mapping(1.0, LOCAL) == ("unknown", None)


def test_endpoint_dependent_needs_three_groups_with_different_ports() -> None:
    obs = Observations()
    for i, group in enumerate(("198.51.100.1", "192.0.2.1", "203.0.113.1")):
        obs.add(group, Address(MAPPED.host, 40000 + i), 1.0)
    assert obs.mapping(1.0, LOCAL) == ("endpoint-dependent", None)


def test_seen_at_our_own_address_means_no_nat() -> None:
    obs = Observations()
    own = Address("198.18.3.11", 4747)
    obs.add("198.51.100.1", own, 1.0)
    obs.add("192.0.2.1", own, 1.0)
    assert obs.mapping(1.0, [own.host]) == ("none", None)


def test_observations_expire() -> None:
    obs = Observations()
    obs.add("198.51.100.1", MAPPED, 0.0)
    obs.add("192.0.2.1", MAPPED, 0.0)
    assert obs.mapping(OBSERVATION_TTL - 1, LOCAL)[0] == "endpoint-independent"
    assert obs.mapping(OBSERVATION_TTL, LOCAL) == ("unknown", None)


def test_observer_memory_is_bounded() -> None:
    obs = Observations()
    for i in range(1000):
        obs.add(f"10.{i // 256}.{i % 256}.1", MAPPED, float(i))
    assert len(obs.current(1000.0)) == reach_mod.OBSERVERS_MAX


def test_helper_budget_per_group_and_per_minute() -> None:
    budget = HelpBudget()
    assert budget.allow("198.51.100.1", 0.0)
    assert not budget.allow("198.51.100.2", 1.0)  # same /24, too soon
    assert budget.allow("198.51.100.2", HELP_GROUP_INTERVAL)
    allowed = sum(budget.allow(f"10.0.{i}.1", 100.0) for i in range(HELP_PER_MINUTE * 3))
    assert allowed == HELP_PER_MINUTE
    assert budget.allow("10.99.0.1", 160.0)  # a minute later there is room again


def _node(i: int, ip: str, port: int = 4747) -> Node:
    return Node(wire.node_id_for(bytes([i]) * 32), ip, port, bytes([i]) * 32)


def test_dialback_round_counts_only_unsolicited_nonces_of_its_own() -> None:
    h1, h2 = _node(1, "198.51.100.1"), _node(2, "192.0.2.1")
    r = DialbackRound(deadline=5.0, helpers={b"a" * 16: h1, b"b" * 16: h2})
    # a nonce from the helper's own DHT address proves nothing (our NAT has that flow)
    assert not r.nonce_arrived(b"a" * 16, Address("198.51.100.1", 4747))
    assert not r.nonce_arrived(b"z" * 16, Address("198.51.100.1", 5000))  # not ours
    assert r.verdict() == "unknown"
    assert r.nonce_arrived(b"a" * 16, Address("198.51.100.1", 4748))
    assert r.verdict() == "unknown"  # one helper is no quorum
    assert r.nonce_arrived(b"b" * 16, Address("192.0.2.1", 4748))
    assert r.verdict() == "reachable"


def test_dialback_round_unreachable_when_helpers_agreed_and_nothing_came() -> None:
    r = DialbackRound(deadline=5.0)
    r.agreed |= {"198.51.100.0/24"}
    assert r.verdict() == "unknown"
    r.agreed |= {"192.0.2.0/24"}
    assert r.verdict() == "unreachable"


def test_dialback_frames_are_smaller_than_the_request() -> None:
    """No amplification: what a (possibly spoofed) request makes a helper send, the ack
    and the nonce, is smaller than the request."""
    key = bytes(32)
    nonce = bytes(range(16))
    request = wire.encode_request(
        bytes(20), "dialback", [key, nonce, bytes(wire.DIALBACK_PAD)], prove=True
    )
    ack = wire.encode_response(bytes(20), True, lambda m: bytes(64), None, ("1.2.3.4", 9))
    dialed = wire.encode_request(bytes(20), "dialed", [key, nonce])
    assert len(ack) + len(dialed) <= len(request), (len(ack), len(dialed), len(request))


def test_observed_round_trip_and_old_replies() -> None:
    for observed in (("198.51.100.7", 4747), ("2001:db8::1", 65535)):
        for cookie in (None, b"\x07" * 16):
            for sign in (None, lambda m: b"\x01" * 64):
                frame = wire.encode_response(b"\x01" * 20, [1, 2], sign, cookie, observed)
                raw, sig, got_cookie, seen = wire.split_response_observed(frame[21:])
                assert wire._unpack(raw) == [1, 2]
                assert got_cookie == cookie and (sig is None) == (sign is None)
                assert seen == Address(*observed)
    old = wire.encode_response(b"\x01" * 20, [1, 2], None, b"\x07" * 16)
    assert wire.split_response_observed(old[21:])[2:] == (b"\x07" * 16, None)


# --- on the simulated network ---------------------------------------------------------


async def _start(swarm: Swarm, net: FakeNetwork, nat: str | None = None) -> SwarmNode:
    host = net.add_host(nat=nat)
    index = len(swarm.nodes)
    node = await swarm.start_node(Identity.generate(f"user{index}"), host=host)
    node.index = index
    swarm.nodes.append(node)
    node.dht.enable_reachability([host.private_ip or host.ip], host.bind(FAKE_PORT + 1))
    return node


async def test_public_eim_and_edm_nodes_learn_what_they_are(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNetwork(seed=5, median_rtt=0.05)
    with trio.fail_after(3600):  # virtual seconds
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            async with open_swarm(0, network=net, seed=5) as swarm:
                publics = [await _start(swarm, net) for _ in range(6)]
                for node in publics[1:]:
                    await node.dht.bootstrap([publics[0].address])
                eim = await _start(swarm, net, "eim")
                edm = await _start(swarm, net, "edm")
                for node in (eim, edm):
                    await node.dht.bootstrap([p.address for p in publics[:3]])
                await trio.sleep(60)  # probes start a second in, a round takes 5 s

                for node in publics:
                    status = node.dht.reachability()
                    assert (status.mapping, status.reachability) == ("none", "reachable")
                    assert status.server
                s = eim.dht.reachability()
                assert eim.host is not None
                assert s.mapping == "endpoint-independent"
                assert s.public_address is not None and s.public_address.host == eim.host.ip
                assert (s.reachability, s.server) == ("unreachable", False)
                s = edm.dht.reachability()
                assert (s.mapping, s.reachability, s.server) == (
                    "endpoint-dependent",
                    "unreachable",
                    False,
                )
                assert s.public_address is None

                # client mode: no public node holds a NATed node as a contact...
                natted = {eim.node_key.node_id, edm.node_key.node_id}
                for node in publics:
                    assert not natted & {c[0] for c in node.dht.contacts()}
                # ...while they publish, and resolve what the public nodes publish
                for node in (eim, edm):
                    record = HandleRecord.create(
                        node.identity, [node.address], seq=1, now=int(swarm.wall()), lifetime=3600
                    )
                    assert await node.dht.publish(record) > 0
                    assert await publics[2].dht.resolve(HandleRef(node.identity.handle)) == record
                published = await swarm.publish(4)
                for node in (eim, edm):
                    assert await node.dht.resolve(HandleRef(published.handle)) == published
                nursery.cancel_scope.cancel()


async def test_reachability_off_by_default_keeps_server_mode(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A DHT whose driver never enabled reachability (tests of the core, tools) still
    learns its observed addresses but never goes client mode."""
    net = FakeNetwork(seed=6, median_rtt=0.05)
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            async with open_swarm(4, network=net, seed=6) as swarm:
                host = net.add_host(nat="eim")
                node = await swarm.start_node(Identity.generate("natted"), host=host)
                swarm.nodes.append(node)
                await node.dht.bootstrap([n.address for n in swarm.nodes[:3]])
                await trio.sleep(30)
                status = node.dht.reachability()
                assert status.mapping == "endpoint-independent" and status.server
                assert any(
                    node.node_key.node_id in {c[0] for c in n.dht.contacts()}
                    for n in swarm.nodes[:4]
                )
                nursery.cancel_scope.cancel()


# --- the attack: dial-back as a reflector ---------------------------------------------


def _helper() -> DHTCore:
    core = DHTCore(NodeKey.from_seed(bytes(32)), DHTConfig(), RecordStorage(None), None, 100.0)
    core.reach.enable(["198.51.100.1"], can_dial_back=True, now=100.0)
    return core


def _dialback_frame(i: int) -> bytes:
    args = [NodeKey.from_seed(bytes([1 + i % 255]) * 32).public_key, bytes(16), bytes(160)]
    return wire.encode_request(i.to_bytes(20, "big"), "dialback", args, prove=False)


def test_spoofed_dialback_requests_reflect_little_and_only_to_their_source() -> None:
    """A flood of dialback requests with spoofed sources: the helper sends nonces only
    to those sources, at most one per /24 per 30 s and 30 a minute, and fewer bytes than
    it received; the attacker's own address (not the source) is never a target."""
    core = _helper()
    sent_in = 0
    sources = []
    for i in range(1000):  # a victim /24 and 999 others, within one second
        source = ("203.0.113.9", 5000 + i) if i % 2 else (f"10.{i // 256}.{i % 256}.1", 9)
        frame = _dialback_frame(i)
        sent_in += len(frame)
        sources.append(source)
        core.datagram_received(frame, source, 100.0 + i / 1000)
    dialed = core.reach.dialbacks_to_send()
    replies = core.datagrams_to_send()
    assert len(dialed) == reach_mod.HELP_PER_MINUTE
    assert all(dst in sources for _, dst in dialed)
    assert sum(dst[0] == "203.0.113.9" for _, dst in dialed) == 1  # the victim: once
    out = sum(len(d) for d, _ in dialed) + sum(len(d) for d, _ in replies)
    assert out < sent_in
    # every other request was refused by the helper, or earlier by the DHT's rate
    # budget (the victim's address and /24 share a bucket: p2pd/dht/budget.py)
    limited = sum(n for k, n in core.budget.dropped.items() if k.endswith("_dialback"))
    assert core.stats["dialback_refused"] + limited == 1000 - reach_mod.HELP_PER_MINUTE


def test_dialback_without_a_second_socket_is_refused() -> None:
    core = _helper()
    core.reach.can_dial_back = False
    core.datagram_received(_dialback_frame(1), ("192.0.2.1", 9), 100.0)
    assert core.reach.dialbacks_to_send() == []
    ((reply, dst),) = core.datagrams_to_send()
    raw, _, _, observed = wire.split_response_observed(reply[21:])
    assert wire.decode_response("dialback", raw) is False
    assert observed == Address("192.0.2.1", 9) and dst == ("192.0.2.1", 9)


def test_malformed_observed_drops_the_reply_and_changes_nothing() -> None:
    core = _helper()
    before = core.reach.observations.current(100.0)
    bad = wire.encode_response(bytes(20), True, None, None, ("192.0.2.1", 9))
    bad = bad[:-2] + b"\x00\x00"  # port 0
    core.datagram_received(bad, ("192.0.2.1", 9), 100.0)
    assert core.stats["unexpected_replies"] == 1  # no such request: dropped before it
    with pytest.raises(WireError):
        wire.split_response_observed(bad[21:])
    assert core.reach.observations.current(100.0) == before


@pytest.mark.parametrize("host", ["0.0.0.0", "224.0.0.1", "::", "ff02::1"])
def test_an_observed_address_nobody_can_have_is_malformed(host: str) -> None:
    # IPv4 ones travel IPv4-mapped: as IPv6, ::ffff:0.0.0.0 is not unspecified and
    # ::ffff:224.0.0.1 not multicast; the IPv4 address itself is checked.
    raw = wire.encode_observed((host, 4747))
    with pytest.raises(WireError, match="out of range"):
        wire.decode_observed(raw)
    assert wire.decode_observed(wire.encode_observed(("192.0.2.1", 4747))) == Address(
        "192.0.2.1", 4747
    )


def test_status_lines() -> None:
    from p2pd_cli import render

    base = {
        "self_certifying": "bob#u6cmphjezpfb",
        "fingerprint_display": "u6cm phje",
        "listen": "0.0.0.0:4747",
        "addresses": [],
        "routing_table_size": 3,
        "records_stored": 0,
        "record_seq": None,
        "replicas": 0,
        "record_expires": None,
        "uptime": 1.6,
    }
    natted = {
        "reachability": "unreachable",
        "nat_mapping": "endpoint-independent",
        "reflexive_addresses": [{"address": "198.18.10.1:4747", "observers": 3}],
        "public_address": "198.18.10.1:4747",
        "dht_mode": "client",
    }
    lines = render.status_text({**base, **natted}).splitlines()
    assert lines[-2:] == [
        "reachability    unreachable (behind an endpoint-independent NAT); DHT client mode",
        "seen as         198.18.10.1:4747 (3 observers)",
    ]
    public = {**natted, "reachability": "reachable", "nat_mapping": "none", "dht_mode": "server"}
    assert render.status_text({**base, **public}).splitlines()[-2] == (
        "reachability    reachable (public); DHT server mode"
    )
    # an older daemon's status has none of it
    assert len(render.status_text(base).splitlines()) == 8
