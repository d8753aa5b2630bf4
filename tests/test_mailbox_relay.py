"""Mailbox puts relayed through a third node (p2pd/dht/mailbox_relay.py): the storing
nodes see the relay's address, not the sender's; a lying relay confirms nothing alone;
the relay's own budget holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
from mailbox_helpers import readable

import p2pd.dht.core
from p2pd import wire
from p2pd.config import DHTConfig
from p2pd.dht.mailbox import CONTACTS, MailboxLimits, mailbox_key
from p2pd.dht.mailbox_find import (
    FIND_BURST,
    FIND_RATE,
    FINDS_PER_REQUESTER_HOUR,
    MAX_FINDING,
    FindRelay,
    targets,
)
from p2pd.dht.mailbox_pass import issue_pass
from p2pd.dht.mailbox_relay import (
    MAX_RELAYING,
    PER_REQUESTER_HOUR,
    RELAY_BURST,
    RELAY_RATE,
    PutRelay,
)
from p2pd.dht.nodekey import NodeKey
from p2pd.dht.routing import Node
from p2pd.identity import Identity
from p2pd.testing.swarm import Swarm, SwarmNode, loopback_address, open_swarm

#: Five replicas per mailbox among ten nodes: the others can relay.
CONFIG = DHTConfig(ksize=5, postage_bits=4)


def holders(swarm: Swarm, key: bytes) -> list[SwarmNode]:
    """The nodes that hold an entry of mailbox ``key``."""
    return [
        n
        for n in swarm.nodes
        if n.dht.core.mailboxes is not None
        and any(k == key for k, *_ in n.dht.core.mailboxes.rows())
    ]


def sources_seen(node: SwarmNode) -> set[str]:
    """The source addresses a storing node charged the entries it holds to: what it saw
    of who put them."""
    quota = node.dht.core.mailboxes.quota  # type: ignore[union-attr]
    assert quota is not None
    return {host for host, _ in quota._source.values()}


def test_the_relay_budget_holds() -> None:
    relay = PutRelay()

    def admitted(now: float, requester: str, n: int = 1000) -> int:
        return sum(relay.admit(now, requester) is None for _ in range(n))

    first = admitted(0.0, "192.0.2.1")
    assert first == min(RELAY_BURST, MAX_RELAYING)  # in flight caps it first
    relay.in_flight = 0
    assert first + admitted(0.0, "192.0.2.2") == RELAY_BURST  # then the bucket
    relay.in_flight = 0
    assert admitted(1.0, "198.51.100.1") == RELAY_RATE  # its rate a second
    # one requester's /24 gets PER_REQUESTER_HOUR an hour, whatever the relay's rate
    relay, total = PutRelay(), 0
    for second in range(1, 60):
        relay.in_flight = 0
        total += admitted(float(second), f"203.0.113.{second}")
    assert total == PER_REQUESTER_HOUR + 59 * PER_REQUESTER_HOUR // 3600
    assert relay.admit(60.0, "203.0.113.77") == "requester"
    assert relay.admit(60.0, "203.0.114.1") is None  # another /24


@pytest.mark.slow
async def test_a_storing_node_sees_the_relays_address_not_the_senders() -> None:
    with trio.fail_after(90):
        async with open_swarm(10, config=CONFIG) as swarm:
            sender, owner = swarm.nodes[3], swarm.nodes[6]
            bob = owner.identity
            key = mailbox_key(bob.public_key)
            copies = await sender.dht.mailbox_put(bob.public_key, b"through a relay")
            assert copies >= 2
            assert sender.dht.core.stats["mailbox_puts_relayed"] == 1
            stored = [n for n in holders(swarm, key) if n is not sender]
            assert len(stored) >= 2
            relays = {n.address.host for n in swarm.nodes if n.dht.core.stats["mailbox_relayed"]}
            assert relays and sender.address.host not in relays
            for node in stored:
                seen = sources_seen(node)
                assert sender.address.host not in seen and seen <= relays, (seen, relays)
            # the relays hold nothing of bob's mailbox (they are not replicas)
            assert not any(n.address.host in relays for n in holders(swarm, key))
            got = await owner.dht.mailbox_fetch(bob)
            assert readable(bob, got) == [b"through a relay"]
            # a contact's put (bob's pass, p2pd/dht/mailbox_pass.py) goes the same way
            bobs = issue_pass(bob.public_key, bob.sign, time.time())
            sender.dht.mailbox_passes = lambda key: bobs if key == bob.public_key else None
            assert await sender.dht.mailbox_put(bob.public_key, b"a contact, relayed") >= 2
            contacts = [n for n in holders(swarm, key) if n.dht.core.mailboxes.count(CONTACTS)]  # type: ignore[union-attr]
            assert len(contacts) >= 2
            assert all(sender.address.host not in sources_seen(n) for n in contacts)
            got = await owner.dht.mailbox_fetch(bob)
            assert sorted(readable(bob, got)) == [b"a contact, relayed", b"through a relay"]


@pytest.mark.slow
async def test_a_lying_relay_confirms_nothing_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every replica refuses (bob's mailbox is full everywhere); the first relay asked
    answers "stored" for every put it carries without sending anything on, the other
    is honest. The put is not confirmed: the sender hears 0 and will try again. (The
    rule it fails without: replicas in two networks said "stored".)"""

    def say_stored(
        core: Any, req: wire.DHTRequest, address: Any, cookie: Any, size: int, now: float
    ) -> None:
        core._send(wire.encode_response(req.msg_id, True, None, cookie, address), address)

    liar = _first_asked_lies(monkeypatch, "relay_requested", say_stored)
    with trio.fail_after(90):
        async with open_swarm(10, config=CONFIG) as swarm:
            sender, owner = swarm.nodes[3], swarm.nodes[6]
            for node in swarm.nodes:
                node.dht.core.mailboxes.limits = MailboxLimits(per_mailbox_count=0)  # type: ignore[union-attr]
            assert await sender.dht.mailbox_put(owner.identity.public_key, b"x") == 0
            assert liar and liar[0].stats["lies"] >= 2  # it carried half of the puts
            honest = [n for n in swarm.nodes if n.dht.core.stats["mailbox_relay_not_stored"]]
            assert len(honest) == 1 and honest[0].dht.core is not liar[0]
            assert sender.dht.core.stats["mailbox_put_unconfirmed"] == 1


@pytest.mark.slow
async def test_a_relay_refuses_to_relay_to_itself_or_back() -> None:
    with trio.fail_after(60):
        async with open_swarm(4, config=CONFIG) as swarm:
            sender, relay = swarm.nodes[1], swarm.nodes[2]
            key = mailbox_key(Identity.generate("bob").public_key)
            at = Node(relay.dht.node_id, relay.address.host, relay.address.port)
            me = sender.address
            calls = [
                (at, "mailbox_relay", [relay.dht.core.node_key.public_key, relay.address.host,
                                       relay.address.port, key, b"\x01" * 512]),
                (at, "mailbox_relay", [sender.dht.core.node_key.public_key, me.host, me.port,
                                       key, b"\x01" * 512]),
            ]  # fmt: skip
            assert await sender.dht.gather(calls) == [False, False]
            counters = relay.dht.statistics()["counters"]
            assert counters["mailbox_relay_refused_self"] == 1
            assert counters["mailbox_relay_refused_loop"] == 1


def test_the_lookup_relay_budget_holds() -> None:
    relay = FindRelay()

    def admitted(now: float, requester: str, n: int = 100, *, lookup: bool = True) -> int:
        return sum(relay.admit(now, requester, spend=lookup) is None for _ in range(n))

    def drained(now: float) -> int:  # lookups that end at once: only the bucket holds
        total = 0
        for i in range(100):
            relay.in_flight = 0
            total += relay.admit(now, f"192.0.{i}.1") is None
        return total

    assert admitted(0.0, "192.0.2.1") == MAX_FINDING  # running lookups cap it first
    relay.in_flight = 0
    assert MAX_FINDING + drained(0.0) == FIND_BURST  # then the bucket
    assert drained(1.0) == FIND_RATE
    # one requester's /24 gets FINDS_PER_REQUESTER_HOUR an hour, cached answers included
    relay = FindRelay()
    assert admitted(2.0, "203.0.113.5", 1000, lookup=False) == FINDS_PER_REQUESTER_HOUR
    assert relay.admit(2.0, "203.0.113.6", spend=False) == "requester"
    assert relay.in_flight == 0 and relay.admit(2.0, "203.0.114.1") is None
    # answers are cached for a minute, at most FIND_CACHE_MAX keys
    relay.remember(b"k" * 20, [[b"x"]], 10.0)
    assert relay.cached(b"k" * 20, 69.0) == [[b"x"]]
    assert relay.cached(b"k" * 20, 71.0) is None


@pytest.mark.slow
async def test_a_replica_sees_no_datagram_from_the_sender_about_the_mailbox() -> None:
    """The attack: every node records every datagram it receives (a hostile replica
    keeps all it sees). After a put, no node holding bob's mailbox got any datagram
    from the sender's address that names bob's mailbox key: neither the lookup's
    find_node nor the put. (Without relayed lookups, p2pd/dht/mailbox_find.py, the
    sender's find_node for the key reaches every replica from its own address.)"""
    with trio.fail_after(90):
        async with open_swarm(10, config=CONFIG) as swarm:
            sender, owner = swarm.nodes[3], swarm.nodes[6]
            bob = owner.identity
            key = mailbox_key(bob.public_key)
            heard: dict[int, list[tuple[str, bytes]]] = {i: [] for i in range(10)}
            for index, node in enumerate(swarm.nodes):
                core = node.dht.core
                real = core.datagram_received

                def spy(
                    data: bytes, addr: Any, now: float, real: Any = real, i: int = index
                ) -> None:
                    heard[i].append((addr[0], data))
                    real(data, addr, now)

                core.datagram_received = spy  # type: ignore[method-assign]
            assert await sender.dht.mailbox_put(bob.public_key, b"unlinkable") >= 2
            assert sender.dht.core.stats["mailbox_finds_relayed"] == 1
            # the nodes that hold it, and the k closest to the key of the whole swarm
            target = int.from_bytes(key, "big")
            nearest = sorted(swarm.nodes, key=lambda n: n.dht.core.node.long_id ^ target)
            near = [n for n in nearest if n is not sender][: CONFIG.ksize]
            replicas = [
                i for i, n in enumerate(swarm.nodes)
                if n is not sender and (n in holders(swarm, key) or n in near)
            ]  # fmt: skip
            assert len(replicas) >= 2
            for i in replicas:
                from_sender = [d for host, d in heard[i] if host == sender.address.host]
                assert not [d for d in from_sender if key in d], swarm.nodes[i].address
            for i in [swarm.nodes.index(n) for n in holders(swarm, key) if n is not sender]:
                # those that hold it got the key: from relays' lookups and puts
                assert any(key in d for host, d in heard[i] if host != sender.address.host)
            finders = [n for n in swarm.nodes if n.dht.core.stats["mailbox_found"]]
            assert finders and all(n.address.host != sender.address.host for n in finders)
            assert not any(swarm.nodes.index(n) in replicas for n in finders)
            got = await owner.dht.mailbox_fetch(bob)
            assert readable(bob, got) == [b"unlinkable"]


async def _black_holes(
    swarm: Swarm, key: bytes, count: int, stack: AsyncExitStack
) -> tuple[list[SwarmNode], list[int]]:
    """``count`` hostile nodes outside the swarm's DHT (no honest node knows them;
    stopped when ``stack`` closes), each in a /24 of its own, whose node ids are nearer
    ``key`` than every honest node's (node keys ground for it: about 60 µs a try), that
    answer every ``mailbox_put`` "stored" and keep nothing; and how many puts each was
    sent."""
    target = int.from_bytes(key, "big")
    honest = min(n.dht.core.node.long_id ^ target for n in swarm.nodes)
    holes: list[SwarmNode] = []
    puts = [0] * count
    for i in range(count):
        for _ in range(1 << 16):  # bounded: a 2^-10 chance a try for ten honest nodes
            node_key = NodeKey.generate()
            if int.from_bytes(node_key.node_id, "big") ^ target < honest:
                break
        else:
            pytest.fail("no node key nearer the mailbox key")
        hole = await swarm.start_node(
            Identity.generate(f"hole{i}"), listen=loopback_address(200 + i), node_key=node_key
        )
        stack.push_async_callback(hole.stack.aclose)
        boxes = hole.dht.core.mailboxes
        assert boxes is not None

        def drop(mailbox: bytes, entry: bytes, *, source: str | None = None, i: int = i) -> bool:
            puts[i] += 1
            return True  # "stored"; kept nowhere

        boxes.put = drop  # type: ignore[method-assign]
        holes.append(hole)
    return holes, puts


def _lie_about_replicas(monkeypatch: pytest.MonkeyPatch, holes: list[SwarmNode]) -> list[Any]:
    """The first node asked for a ``mailbox_find`` answers the black holes as the nodes
    closest to the key (it runs no lookup); the others answer honestly."""

    def name_the_holes(
        core: Any, req: wire.DHTRequest, address: Any, cookie: Any, size: int, now: float
    ) -> None:
        contacts = [wire.Contact(h.node_key.public_key, h.address) for h in holes]
        core.answer(req, address, cookie, wire.encode_contacts(contacts), size, now)

    return _first_asked_lies(monkeypatch, "find_requested", name_the_holes)


def _first_asked_lies(
    monkeypatch: pytest.MonkeyPatch, handler: str, lie: Callable[..., None]
) -> list[Any]:
    """The first node whose ``p2pd.dht.core.<handler>`` runs answers with ``lie`` from
    then on (counted in its ``lies``); every other node runs the real handler. Returns
    the list that will hold the liar's core."""
    real = getattr(p2pd.dht.core, handler)
    liar: list[Any] = []

    def maybe_lie(
        core: Any, req: wire.DHTRequest, address: Any, cookie: Any, size: int, now: float
    ) -> None:
        if not liar:
            liar.append(core)
        if core is not liar[0]:
            return real(core, req, address, cookie, size, now)
        core.stats["lies"] += 1
        lie(core, req, address, cookie, size, now)

    monkeypatch.setattr(p2pd.dht.core, handler, maybe_lie)
    return liar


@pytest.mark.slow
async def test_a_relay_naming_closer_black_holes_loses_no_put(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attack: one of the two relays the sender asks for the replicas answers with
    five hostile nodes in five /24s, all nearer the mailbox key than any honest node,
    which answer every put "stored" and keep nothing. Before, the sender took the k
    nearest of all answers (the five black holes), put there only, and counted the put
    as left: the owner never got it, and nothing was retried. Now the put also goes to
    each relay's own k nearest (the honest relay's: the true replicas), and counts as
    left only by takers that two sources named (two relays, or a relay and our own
    table): the honest replicas hold it, the owner reads it."""
    with trio.fail_after(90):
        async with open_swarm(10, config=CONFIG) as swarm, AsyncExitStack() as stack:
            sender, owner = swarm.nodes[3], swarm.nodes[6]
            bob = owner.identity
            key = mailbox_key(bob.public_key)
            holes, puts = await _black_holes(swarm, key, CONFIG.ksize, stack)
            liar = _lie_about_replicas(monkeypatch, holes)
            copies = await sender.dht.mailbox_put(bob.public_key, b"not lost")
            assert liar and liar[0].stats["lies"] == 1
            assert sum(puts) >= 2  # the black holes were sent the put, and said "stored"
            assert copies >= 2  # counted as left: and it is, at the honest replicas
            # the black holes, named by the liar alone, were not counted
            assert sender.dht.core.stats["mailbox_find_unvouched"] >= CONFIG.ksize
            assert len([n for n in holders(swarm, key) if n is not sender]) >= 2
            got = await owner.dht.mailbox_fetch(bob)
            assert readable(bob, got) == [b"not lost"]


@pytest.mark.slow
async def test_closer_black_holes_alone_confirm_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same lying relay and black holes, while every honest replica refuses (bob's
    mailbox is full everywhere): only the black holes say "stored". The put is not
    confirmed (0 copies, ``mailbox_put_unconfirmed``): the sender tries again later
    instead of counting a lost put as left."""
    with trio.fail_after(90):
        async with open_swarm(10, config=CONFIG) as swarm, AsyncExitStack() as stack:
            sender, owner = swarm.nodes[3], swarm.nodes[6]
            key = mailbox_key(owner.identity.public_key)
            for node in swarm.nodes:
                node.dht.core.mailboxes.limits = MailboxLimits(per_mailbox_count=0)  # type: ignore[union-attr]
            holes, puts = await _black_holes(swarm, key, CONFIG.ksize, stack)
            _lie_about_replicas(monkeypatch, holes)
            assert await sender.dht.mailbox_put(owner.identity.public_key, b"x") == 0
            assert sum(puts) >= 2
            assert sender.dht.core.stats["mailbox_put_unconfirmed"] == 1


def test_the_targets_keep_each_relays_nearest_and_count_only_what_two_sources_name() -> None:
    """p2pd/dht/mailbox_find.py ``targets``, on ids alone: a liar's nearer ids do not
    push out the honest relay's; at most (answers + 1) * k nodes; only ids two sources
    named are vouched for; nothing without an answer."""
    key, k = bytes(20), 3

    def at(distance: int) -> Node:  # an id ``distance`` from the key
        return Node(distance.to_bytes(20, "big"), f"198.51.100.{distance % 250}", 4747)

    honest = [at(d) for d in (100, 101, 102, 103)]
    lies = [at(d) for d in (1, 2, 3)]
    ours = [at(d) for d in (101, 102, 500)]
    nodes, top, vouched = targets(key, [lies, honest], ours, k)
    distances = [int.from_bytes(n.id, "big") for n in nodes]
    assert distances == [1, 2, 3, 100, 101, 102]  # the liar's and the honest relay's k
    assert [int.from_bytes(n.id, "big") for n in top] == [1, 2, 3]
    assert {int.from_bytes(i, "big") for i in vouched} == {101, 102}  # honest and ours
    assert len(nodes) <= (2 + 1) * k
    # two relays agreeing vouch for each other; our table alone names nothing to put at
    nodes, _, vouched = targets(key, [honest, honest[:3]], [], k)
    assert len(nodes) == k and vouched == frozenset(n.id for n in honest[:3])
    assert targets(key, [], ours, k) == ([], [], frozenset())
