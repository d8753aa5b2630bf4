"""Sybil defences of the DHT (issue 11, items 1 and 2), sans I/O: cores in memory,
datagrams moved by hand or by :class:`CoreNet`, time advanced by hand.

Node ids are earned (a node key, a signed reply from the address claimed), few ids per
address count, a lying lookup path cannot steer a disjoint lookup, a node far from a key
does not store under it, frames of version 1 are refused, and a node's DHT traffic never
names the identity (handle) it serves."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest
from test_dht_core import CONFIG, WALL, CoreNet, _Owner, make_record, node_key

from p2pd import wire
from p2pd.config import DHTConfig
from p2pd.dht.core import DHTCore
from p2pd.dht.disjoint import DisjointLookup
from p2pd.dht.lookup import Lookup
from p2pd.dht.mailbox import MailboxStorage
from p2pd.dht.nodekey import NODE_KEY_FILE, NodeKey, load_or_create_node_key
from p2pd.dht.proofs import COOKIE_PERIOD
from p2pd.dht.routing import AddressLimit, Node, subnet_of
from p2pd.dht.storage import RecordStorage
from p2pd.identity import HandleRef, Identity
from p2pd.records import dht_key

SYBIL_IP = "203.0.113.5"


def key_n(label: str, i: int) -> NodeKey:
    return NodeKey.from_seed(hashlib.sha256(b"%s %d" % (label.encode(), i)).digest())


def add_core(
    net: CoreNet, key: NodeKey, address: tuple[str, int], config: DHTConfig = CONFIG
) -> DHTCore:
    core = DHTCore(key, config, RecordStorage(None, clock=net.wall), None, net.now)
    net.cores[address] = core
    return core


def frames_to(core: DHTCore) -> list[tuple[bytes, tuple[str, int]]]:
    return core.datagrams_to_send()


def request_of(frame: bytes) -> wire.DHTRequest:
    kind, msg_id, payload = wire.split_frame(frame)
    assert kind == wire.FRAME_REQUEST
    return wire.decode_request(msg_id, payload)


# ---------------------------------------------------------------------- earned ids


def test_node_ids_are_hashes_of_node_keys_never_of_identity_keys() -> None:
    key = node_key(1)
    assert key.node_id == hashlib.sha256(b"p2pd node id v2\x00" + key.public_key).digest()[:20]
    identity = Identity.generate("alice")
    assert key.public_key != identity.public_key


def test_the_daemon_node_key_is_kept_0600_and_made_again_if_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = load_or_create_node_key(tmp_path)
    path = tmp_path / NODE_KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_node_key(tmp_path).node_id == first.node_id  # stable
    path.write_bytes(b"damaged")
    with caplog.at_level(logging.INFO):
        again = load_or_create_node_key(tmp_path)
    assert again.node_id != first.node_id
    assert "damaged" in caplog.text
    seed = path.read_bytes()
    assert len(seed) == 32 and seed.hex() not in caplog.text and seed.hex() not in repr(again)


def test_a_forged_proof_is_refused() -> None:
    """A reply that comes from the right address with the right message id but is signed
    by another key (or not at all) is no reply: the contact does not enter the table."""
    net = CoreNet()
    a = net.add(1)
    claimed = node_key(2)  # the id the liar claims to be
    liar_address = ("198.51.100.7", 4000)
    target = Node(claimed.node_id, *liar_address, claimed.public_key)
    for signer in (node_key(3).sign, None):
        results: list[Any] = []
        a.request(target, "find_node", [bytes(20)], net.now, _Owner(results))
        ((frame, dst),) = frames_to(a)
        req = request_of(frame)
        assert dst == liar_address and req.prove  # an unproven contact must prove
        reply = wire.encode_response(req.msg_id, [], signer)
        a.datagram_received(reply, liar_address, net.now)
        assert results == [None]
    assert a.stats["bad_proofs"] == 2
    assert not a.table.contains(claimed.node_id)


def test_a_ping_answered_with_another_key_than_the_contact_named_is_refused() -> None:
    net = CoreNet()
    a = net.add(1)
    named, actual = node_key(2), node_key(3)
    address = ("198.51.100.8", 4000)
    results: list[Any] = []
    a.request(Node(named.node_id, *address, named.public_key), "ping", [], net.now, _Owner(results))
    ((frame, _),) = frames_to(a)
    req = request_of(frame)
    # a validly signed proof, but of another key than the id we asked for
    a.datagram_received(
        wire.encode_response(req.msg_id, actual.public_key, actual.sign), address, net.now
    )
    assert results == [None] and a.stats["bad_proofs"] == 1


def test_a_contact_named_in_a_reply_enters_the_table_only_after_its_own_proof() -> None:
    net = CoreNet()
    a, b, c = net.add(1), net.add(2), net.add(3)
    # a and b know each other; b knows c; a has never heard of c
    net.call(lambda done: a.start_bootstrap([net.address_of(b)], net.now, done))
    net.call(lambda done: c.start_bootstrap([net.address_of(b)], net.now, done))
    net.run_until(lambda: not net.flight)
    a.table.remove(c.node_id)  # (the joins may have introduced them)
    a.proofs._verified.clear()
    assert b.table.contains(c.node_id) and not a.table.contains(c.node_id)
    # a asks b, by hand, who is near c
    results: list[Any] = []
    a.request(net.node_of(b), "find_node", [c.node_id], net.now, _Owner(results))
    ((frame, _),) = frames_to(a)
    b.datagram_received(frame, net.address_of(a), net.now)
    (reply,) = [d for d, _ in frames_to(b) if d[0] == wire.FRAME_RESPONSE]
    a.datagram_received(reply, net.address_of(b), net.now)
    (contacts,) = results
    assert c.node_id in {x.node_id for x in contacts}
    assert not a.table.contains(c.node_id)  # named is not proven
    # a lookup asks c itself, with prove set; c's own signed answer lets it in
    a.start_lookup(c.node_id, net.now, lambda _: None, seeds=[net.node_of(b)])
    asked_c = False
    for _ in range(50):
        for data, dst in frames_to(a):
            if dst == net.address_of(c) and data[0] == wire.FRAME_REQUEST:
                assert request_of(data).prove
                asked_c = True
            net.cores[dst].datagram_received(data, net.address_of(a), net.now)
        for core in (b, c):
            for data, dst in frames_to(core):
                if dst == net.address_of(a):
                    a.datagram_received(data, net.address_of(core), net.now)
        if a.table.contains(c.node_id):
            break
    assert asked_c and a.table.contains(c.node_id)


def test_a_reply_from_another_address_is_ignored() -> None:
    """The message id is right and the proof is valid, but it comes from elsewhere."""
    net = CoreNet()
    a, c = net.add(1), net.add(3)
    results: list[Any] = []
    a.request(net.node_of(c), "ping", [], net.now, _Owner(results))
    ((frame, _),) = frames_to(a)
    c.datagram_received(frame, net.address_of(a), net.now)
    (reply,) = [d for d, _ in frames_to(c) if d[0] == wire.FRAME_RESPONSE]
    a.datagram_received(reply, ("198.51.100.9", 4003), net.now)
    assert results == [] and a.stats["unexpected_replies"] == 1
    assert not a.table.contains(c.node_id)


def cookie_of(reply: bytes) -> bytes | None:
    _, _, payload = wire.split_frame(reply)
    return wire.split_response(payload)[2]


def proof_frame(key: NodeKey, responder_key: bytes, cookie: bytes) -> bytes:
    signature = key.sign(wire.proof_message(responder_key, cookie))
    return wire.encode_request(os.urandom(20), "proof", [key.public_key, cookie, signature])


def test_a_request_from_an_unproven_sender_is_answered_but_only_a_proof_adds_it() -> None:
    net = CoreNet()
    a = net.add(1)
    stranger = node_key(9)
    spoofed = ("198.51.100.10", 4009)
    # padded, as a stranger's requests are (p2pd/dht/budget.py): room for the reply
    ping = wire.encode_request(b"\x01" * 20, "ping", [stranger.public_key], True, pad_to=160)
    for _ in range(3):
        a.datagram_received(ping, spoofed, net.now)
    sent = frames_to(a)
    # answered each time, with a cookie, and nothing else: no proving ping, no state
    assert len(sent) == 3 and all(d[0] == wire.FRAME_RESPONSE for d, _ in sent)
    cookies = {cookie_of(d) for d, _ in sent}
    assert len(cookies) == 1 and None not in cookies
    assert not a.table.contains(stranger.node_id)  # the source never answers: never added
    # the key's holder sends the cookie back from that address, signed: in
    (cookie,) = cookies
    assert cookie is not None
    a.datagram_received(proof_frame(stranger, a.node_key.public_key, cookie), spoofed, net.now)
    assert a.table.contains(stranger.node_id)
    assert a.proofs.is_verified(stranger.node_id, spoofed, net.now)
    assert not frames_to(a)  # a proof is never answered
    # a proven sender is answered without a cookie
    a.datagram_received(ping, spoofed, net.now)
    ((reply, _),) = frames_to(a)
    assert cookie_of(reply) is None


def _cookie_for(a: DHTCore, key: NodeKey, address: tuple[str, int], now: float) -> bytes:
    ping = wire.encode_request(os.urandom(20), "ping", [key.public_key], pad_to=160)
    a.datagram_received(ping, address, now)
    ((reply, dst),) = frames_to(a)
    cookie = cookie_of(reply)
    assert dst == address and cookie is not None
    return cookie


def test_a_cookie_proves_only_its_own_key_address_responder_and_time() -> None:
    """A cookie sent back from another address, for another key, signed by another key,
    signed for another responder, or too late, proves nothing; nor does a forged one."""
    net = CoreNet()
    a, other = net.add(1), net.add(2)
    holder, thief = node_key(9), node_key(10)
    address = ("198.51.100.11", 4010)
    elsewhere = ("198.51.100.12", 4010)
    cookie = _cookie_for(a, holder, address, net.now)
    refused = [
        (proof_frame(holder, a.node_key.public_key, cookie), elsewhere),  # replayed elsewhere
        (proof_frame(thief, a.node_key.public_key, cookie), address),  # for another key
        (proof_frame(holder, other.node_key.public_key, cookie), address),  # another responder
        (proof_frame(holder, a.node_key.public_key, bytes(16)), address),  # forged cookie
    ]
    # the right cookie and key, but signed by another
    forged = wire.encode_request(
        os.urandom(20),
        "proof",
        [holder.public_key, cookie, thief.sign(wire.proof_message(a.node_key.public_key, cookie))],
    )
    refused.append((forged, address))
    for frame, source in refused:
        a.datagram_received(frame, source, net.now)
    assert a.stats["bad_cookies"] == 3 and a.stats["bad_proofs"] == 2
    assert not frames_to(a)
    # a cookie whose proof failed once costs no second signature check (even a good one:
    # only the node at the address, or one on the path, has the cookie to spend it)
    assert a.stats["proofs_checked"] == 1
    a.datagram_received(proof_frame(holder, a.node_key.public_key, cookie), address, net.now)
    assert a.stats["proofs_checked"] == 1 and a.stats["bad_proofs"] == 3
    for key in (holder, thief):
        assert not a.table.contains(key.node_id)
    # the next period brings a new cookie
    later = net.now + COOKIE_PERIOD
    fresh = _cookie_for(a, holder, address, later)
    assert fresh != cookie
    a.datagram_received(proof_frame(holder, a.node_key.public_key, fresh), address, later)
    assert a.table.contains(holder.node_id)
    # a right proof works within the cookie's life (60 to 120 s) ...
    other_holder, other_address = node_key(14), ("198.51.100.15", 4010)
    cookie = _cookie_for(a, other_holder, other_address, net.now)
    proof = proof_frame(other_holder, a.node_key.public_key, cookie)
    a.datagram_received(proof, other_address, later)
    assert a.table.contains(other_holder.node_id)
    # ... and not after it
    late, late_address = node_key(11), ("198.51.100.16", 4010)
    cookie = _cookie_for(a, late, late_address, net.now)
    too_late = net.now + 2 * COOKIE_PERIOD
    a.datagram_received(proof_frame(late, a.node_key.public_key, cookie), late_address, too_late)
    assert a.stats["bad_cookies"] == 4 and not a.table.contains(late.node_id)


def test_a_spoofed_source_never_enters_a_table_and_costs_no_verification() -> None:
    """An off-path spoofer names a key it holds and a source address it does not: the
    cookie goes to that address, never to the spoofer, so guessing it is all it can do."""
    net = CoreNet()
    a = net.add(1)
    spoofer = node_key(12)
    victim = ("198.51.100.13", 4011)
    for i in range(20):
        ping = wire.encode_request(bytes([i]) * 20, "ping", [spoofer.public_key], pad_to=160)
        a.datagram_received(ping, victim, net.now)
        guess = os.urandom(wire.COOKIE_LEN)
        a.datagram_received(proof_frame(spoofer, a.node_key.public_key, guess), victim, net.now)
    sent = frames_to(a)
    assert len(sent) == 20 and {dst for _, dst in sent} == {victim}  # one reply each
    assert a.stats["bad_cookies"] == 20 and a.stats["proofs_checked"] == 0
    assert not a.table.contains(spoofer.node_id)


def test_a_proof_replayed_after_it_was_taken_costs_nothing() -> None:
    net = CoreNet()
    a = net.add(1)
    holder = node_key(13)
    address = ("198.51.100.14", 4012)
    proof = proof_frame(holder, a.node_key.public_key, _cookie_for(a, holder, address, net.now))
    for _ in range(5):
        a.datagram_received(proof, address, net.now)
    assert a.table.contains(holder.node_id)
    assert a.stats["proofs_checked"] == 1 and a.stats["proofs_unneeded"] == 4


def test_two_cores_prove_each_other_in_three_datagrams() -> None:
    """a asks b (never met): b's signed reply proves b to a and carries a cookie; a's
    proof proves a to b. No proving ping."""
    net = CoreNet()
    a, b = net.add(1), net.add(2)
    results: list[Any] = []
    a.request(net.node_of(b), "find_node", [bytes(20)], net.now, _Owner(results))
    net.run_until(lambda: not net.flight)
    assert len(results) == 1 and results[0] is not None
    assert a.table.contains(b.node_id) and b.table.contains(a.node_id)
    assert net.delivered == 3
    assert a.stats["proofs_sent"] == 1 and b.stats["proofs_checked"] == 1
    assert b.stats["requests_out"] == 0


# ---------------------------------------------------------------------- address limits


def test_subnets_and_exemptions() -> None:
    assert subnet_of("198.18.3.4") == subnet_of("198.18.3.200") == "198.18.3.0/24"
    assert subnet_of("127.0.5.1") == "127.0.5.0/24"  # loopback is not exempt
    assert subnet_of("2001:db8:1:2::1") == "2001:db8:1::/48"
    for private in ("10.1.2.3", "192.168.1.9", "172.20.0.1", "169.254.1.1", "fd00::1", "fe80::1"):
        assert subnet_of(private) is None
    limit = AddressLimit(2, 3)
    same_ip = [Node(node_key(i).node_id, "10.0.0.1", 1000 + i) for i in range(5)]
    assert len(limit.select(same_ip, 20)) == 2  # the per-IP limit holds on a LAN
    lan = [Node(node_key(i).node_id, f"10.0.0.{i + 1}", 1000) for i in range(5)]
    assert len(limit.select(lan, 20)) == 5  # the subnet limit does not
    net24 = [Node(node_key(i).node_id, f"198.18.7.{i + 1}", 1000) for i in range(5)]
    assert len(limit.select(net24, 20)) == 3


def test_twenty_made_up_ids_on_one_address_hold_at_most_max_per_ip_slots() -> None:
    """One socket address answering as 20 ids (each with a real key, each proving it):
    at most ``max_per_ip`` of them in any bucket, and in any lookup's answer."""
    net = CoreNet()
    honest = [net.add(i) for i in range(1, 12)]
    first = honest[0]
    net.join_all(first)
    sybils = [add_core(net, key_n("sybil", i), (SYBIL_IP, 6000 + i)) for i in range(20)]
    for sybil in sybils:
        for core in honest[:4]:
            net.call(
                lambda done, s=sybil, c=core: s.start_bootstrap([net.address_of(c)], net.now, done)
            )
    net.run_until(lambda: not net.flight)
    for core in honest:
        in_table = [n for n in core.table if n.ip == SYBIL_IP]
        assert len(in_table) <= CONFIG.max_per_ip, len(in_table)
    # they did get in (up to the limit): the limit, not a lack of contact, kept them out
    assert any(n.ip == SYBIL_IP for c in honest for n in c.table)
    # a lookup aimed right at the sybils' ids still answers with at most 2 of them
    for sybil in sybils[:5]:
        result = net.call(lambda done, s=sybil: honest[5].start_lookup(s.node_id, net.now, done))
        assert sum(1 for n in result.closest if n.ip == SYBIL_IP) <= CONFIG.max_per_ip
        assert len(result.closest) >= len(honest) - 1


def test_a_lookup_keeps_at_most_max_per_ip_candidates_but_keeps_the_rest_aside() -> None:
    target = bytes(20)
    keys = sorted((key_n("c", i) for i in range(40)), key=lambda k: k.node_id)
    same = [Node(k.node_id, SYBIL_IP, 7000 + i, k.public_key) for i, k in enumerate(keys[:20])]
    others = [Node(k.node_id, f"198.18.{i}.1", 7000, k.public_key) for i, k in enumerate(keys[20:])]
    lookup = Lookup(
        target,
        find_value=False,
        k=10,
        alpha=20,
        max_rpcs=100,
        started=0.0,
        deadline=10.0,
        own_id=b"\xff" * 20,
        seeds=same + others,
        limit=AddressLimit(2, 3),
    )
    asked = lookup.next_requests(0.0)
    assert sum(1 for n in asked if n.ip == SYBIL_IP) == 2
    # the two sybils fail: the next two of that address become eligible
    for node in asked:
        if node.ip == SYBIL_IP:
            lookup.failed(node.id)
        else:
            lookup.replied(node.id, ())
    again = lookup.next_requests(0.0)
    assert sum(1 for n in again if n.ip == SYBIL_IP) == 2
    for node in again:
        lookup.replied(node.id, ())
    while not lookup.done:
        for node in lookup.next_requests(0.0):
            lookup.replied(node.id, ())
    assert sum(1 for n in lookup.result.closest if n.ip == SYBIL_IP) <= 2


# ---------------------------------------------------------------------- disjoint paths


class _World:
    """A target, honest replicas holding a value, and liars nearer the target than any
    honest node who answer only with more liars."""

    def __init__(self) -> None:
        self.target = hashlib.sha256(b"target").digest()[:20]
        t = int.from_bytes(self.target, "big")
        pool = sorted(
            (key_n("w", i) for i in range(300)),
            key=lambda k: int.from_bytes(k.node_id, "big") ^ t,
        )
        self.liars = [self._node(k, i) for i, k in enumerate(pool[:120])]
        self.honest = [self._node(k, 200 + i) for i, k in enumerate(pool[120:150])]
        self.liar_ids = {n.id for n in self.liars}
        self.next_liar = 0

    @staticmethod
    def _node(key: NodeKey, i: int) -> Node:
        return Node(key.node_id, f"198.18.{i}.1", 4000, key.public_key)

    def contact(self, node: Node) -> wire.Contact:
        return wire.Contact(node.key or b"", wire.Address(node.ip, node.port))

    def answer(self, node: Node) -> wire.FindValueReply:
        if node.id in self.liar_ids:
            # the next three liars, each nearer than the honest replicas
            batch = self.liars[self.next_liar : self.next_liar + 3]
            self.next_liar += 3
            return wire.FindValueReply(None, tuple(self.contact(n) for n in batch))
        return wire.FindValueReply(b"the value", tuple(self.contact(n) for n in self.honest[:8]))


def disjoint(world: _World, paths: int, seeds: list[Node], **options: Any) -> DisjointLookup:
    args: dict[str, Any] = dict(
        find_value=True, k=5, alpha=1, max_rpcs=300, started=0.0, deadline=10.0
    )
    args.update(options)
    return DisjointLookup(world.target, paths=paths, own_id=b"\xff" * 20, seeds=seeds, **args)


def run_lookup(lookup: Lookup | DisjointLookup, world: _World) -> None:
    for _ in range(500):
        asked = lookup.next_requests(0.0)
        if lookup.done:
            return
        for node in asked:
            lookup.replied(node.id, world.answer(node))
    raise AssertionError("lookup did not end")


@pytest.mark.parametrize("paths", [1, 2])
def test_one_lying_path_cannot_steer_a_two_path_lookup(paths: int) -> None:
    world = _World()
    liar, honest = world.liars[-1], world.honest[-1]  # one seed each: liar dealt first
    lookup = disjoint(world, paths, [liar, honest], quorum=2, limit=AddressLimit(2, 3))
    run_lookup(lookup, world)
    values = [v for _, v in lookup.result.values]
    if paths == 1:
        assert values == []  # steered: the liars' nearer contacts crowd out the honest
    else:
        assert values and set(values) == {b"the value"}
        holders = {n.id for n, _ in lookup.result.values}
        assert holders <= {n.id for n in world.honest}


def test_an_eclipsed_path_does_not_bring_its_liars_into_the_vote() -> None:
    """One path is fed only liars (far from the target, each answering with a rival
    value and more liars); the other reaches the honest replicas near it. The voters
    are the k closest known to *either* path, ranked together: the honest ones. (Each
    path's own k closest, merged, let a whole eclipsed path vote: sim_dht --hostile.)"""
    world = _World()
    near, far = world.liars[:30], world.liars[60:120]  # reuse the pool: near and far ids
    near_ids, far_ids = {n.id for n in near}, {n.id for n in far}
    cursor = [0]

    def answer(node: Node) -> wire.FindValueReply:
        if node.id in far_ids:
            batch = far[cursor[0] : cursor[0] + 3]
            cursor[0] += 3
            return wire.FindValueReply(b"rival", tuple(world.contact(n) for n in batch))
        return wire.FindValueReply(b"owner", tuple(world.contact(n) for n in near[:10]))

    lookup = disjoint(world, 2, [far[-1], near[-1]], k=6, alpha=2, quorum=6)
    for _ in range(500):
        asked = lookup.next_requests(0.0)
        if lookup.done:
            break
        for node in asked:
            lookup.replied(node.id, answer(node))
    assert lookup.done
    assert any(v == b"rival" for _, v in lookup.result.values)  # the liars did answer
    assert lookup.result.voters and lookup.result.voters <= near_ids


def test_no_node_is_asked_by_two_paths() -> None:
    world = _World()
    lookup = disjoint(world, 3, world.honest[-6:], alpha=3, quorum=20)
    asked: list[bytes] = []
    for _ in range(100):
        batch = lookup.next_requests(0.0)
        if lookup.done:
            break
        asked += [n.id for n in batch]
        for node in batch:
            lookup.replied(
                node.id, wire.FindValueReply(None, tuple(world.contact(n) for n in world.honest))
            )
    assert lookup.done and len(asked) == len(set(asked))
    assert [len(p.result.closest) > 0 for p in lookup.paths] == [True, True, True]


# ---------------------------------------------------------------------- store when close


def test_a_store_is_refused_by_a_node_not_among_the_k_closest_it_knows() -> None:
    config = DHTConfig(ksize=3, claim_factor=1)  # records at the k closest, as mailboxes
    net = CoreNet()
    far = net.add(1, config)
    _, record = make_record("erin")
    key = record.key
    t = int.from_bytes(key, "big")
    mine = far.node.long_id ^ t
    nearer = [
        k
        for k in (key_n("near", i) for i in range(200))
        if (int.from_bytes(k.node_id, "big") ^ t) < mine
    ]
    assert len(nearer) >= 3
    sender = node_key(50)

    def store(method: str, value: bytes) -> Any:
        frame = wire.encode_request(os.urandom(20), method, [sender.public_key, key, value])
        far.datagram_received(frame, ("198.51.100.50", 4050), net.now)
        (reply,) = [d for d, _ in frames_to(far) if d[0] == wire.FRAME_RESPONSE]
        return msgpack.unpackb(wire.split_frame(reply)[2])[0]

    assert store("store", record.encode()) is True  # it knows no one nearer: it stores
    for i, k in enumerate(nearer[:3]):
        far.table.add(Node(k.node_id, f"198.18.{100 + i}.1", 4000, k.public_key), net.now)
    assert store("store", record.encode()) is False
    assert store("mailbox_put", b"sealed") is False
    assert far.stats["store_refused_far"] == 2


# ---------------------------------------------------------------------- versions


def test_frames_of_version_1_are_refused_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = CoreNet()
    a = net.add(1)
    v1_ping = b"\x00" + b"\x01" * 20 + msgpack.packb(["ping", [b"\x02" * 20]], use_bin_type=True)
    with caplog.at_level(logging.WARNING, logger="p2pd.dht.core"):
        for _ in range(3):
            a.datagram_received(v1_ping, ("198.51.100.11", 4000), net.now)
        a.datagram_received(b"\x01" + b"\x01" * 20 + b"\xc0", ("198.51.100.12", 4000), net.now)
    assert a.stats["old_version"] == 4 and a.stats["malformed"] == 0
    assert frames_to(a) == []
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "peer 198.51.100.11 speaks DHT frame v1 (an older p2pd); ignored",
        "peer 198.51.100.12 speaks DHT frame v1 (an older p2pd); ignored",
    ]


# ---------------------------------------------------------------------- what travels


def test_dht_traffic_never_names_the_handle_or_identity_it_serves() -> None:
    """Publishing, resolving and leaving mail: the bytes a node sends contain neither its
    identity public key, nor its handle, nor the v1 node id derived from its identity,
    except inside the signed record itself (in store and find_value replies)."""
    net = CoreNet()
    cores = [net.add(i) for i in range(12)]
    net.join_all(cores[0])
    net.run_until(lambda: not net.flight)
    me = cores[4]
    identity, record = make_record("grace")
    value = record.encode()
    bob_identity, bob_record = make_record("henry")
    net.call(lambda done: cores[7].start_store(bob_record.key, bob_record.encode(), net.now, done))
    net.run_until(lambda: not net.flight)
    sent: list[bytes] = []
    original = me._send

    def spy(data: bytes, address: tuple[str, int]) -> None:
        sent.append(data)
        original(data, address)

    me._send = spy  # type: ignore[method-assign]
    net.call(lambda done: me.start_store(record.key, value, net.now, done))
    ref = HandleRef("henry")
    net.call(lambda done: me.start_resolve(dht_key("henry"), net.now, WALL, ref.matches, done))
    net.call(
        lambda done: me.start_mailbox_put(bob_identity.public_key, os.urandom(300), net.now, done)
    )
    net.run_until(lambda: not net.flight)
    assert len(sent) > 20
    v1_id = hashlib.sha1(b"p2pd node id v1\x00" + identity.public_key).digest()
    for data in sent:
        data = data.replace(value, b"")  # the record itself is the one exception
        for secret in (identity.public_key, b"grace", v1_id, identity.seed):
            assert secret not in data
    assert me.node_id != v1_id


def test_a_mailbox_put_names_neither_our_node_key_nor_proves_it() -> None:
    """A put goes under a one-off sender key: the storing nodes cannot link two puts of
    one sender by key, and the cookie they send back is never answered with a proof (a
    proof would be signed by, and name, our node key). The entries are still stored."""
    net = CoreNet()
    cores = [net.add(i) for i in range(12)]
    net.join_all(cores[0])
    net.run_until(lambda: not net.flight)
    for core in cores:
        core.mailboxes = MailboxStorage(None, clock=net.wall)
    me = cores[4]
    _, owner_record = make_record("ivy")
    sent: list[tuple[bytes, tuple[str, int]]] = []
    original = me._send

    def spy(data: bytes, address: tuple[str, int]) -> None:
        sent.append((data, address))
        original(data, address)

    me._send = spy  # type: ignore[method-assign]
    copies = [
        net.call(
            lambda done, e=entry: me.start_mailbox_put(owner_record.public_key, e, net.now, done)
        )
        for entry in (os.urandom(300), os.urandom(300))
    ]
    net.run_until(lambda: not net.flight)
    assert all(c >= 3 for c in copies), copies
    puts = []
    for data, _ in sent:
        kind, msg_id, payload = wire.split_frame(data)
        if kind == wire.FRAME_REQUEST:
            request = wire.decode_request(msg_id, payload)
            if request.method == "mailbox_put":
                puts.append(request.sender_key)
            assert request.method != "proof" or request.sender_key != me.node_key.public_key
    assert len(puts) >= 6
    assert me.node_key.public_key not in puts
    assert len(set(puts)) == len(puts)  # a key of its own for every put
