"""Mailbox puts relayed through a third node (p2pd/dht/mailbox_relay.py): the storing
nodes see the relay's address, not the sender's; a lying relay confirms nothing alone;
the relay's own budget holds."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
from mailbox_helpers import readable

import p2pd.dht.core
from p2pd import wire
from p2pd.config import DHTConfig
from p2pd.dht.mailbox import CONTACTS, MailboxLimits, mailbox_key
from p2pd.dht.mailbox_pass import issue_pass
from p2pd.dht.mailbox_relay import (
    MAX_RELAYING,
    PER_REQUESTER_HOUR,
    RELAY_BURST,
    RELAY_RATE,
    PutRelay,
)
from p2pd.dht.routing import Node
from p2pd.identity import Identity
from p2pd.testing.swarm import Swarm, SwarmNode, open_swarm

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
    real = p2pd.dht.core.relay_requested
    liar: list[Any] = []

    def maybe_lie(
        core: Any, req: wire.DHTRequest, address: Any, cookie: Any, size: int, now: float
    ) -> None:
        if not liar:
            liar.append(core)
        if core is not liar[0]:
            return real(core, req, address, cookie, size, now)
        core.stats["lies"] += 1
        core._send(wire.encode_response(req.msg_id, True, None, cookie, address), address)

    monkeypatch.setattr(p2pd.dht.core, "relay_requested", maybe_lie)
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
