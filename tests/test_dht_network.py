"""A real DHT of 22 nodes on loopback in one process: registration, resolution, and
every kind of attack on a handle record that an honest node must refuse."""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import pytest
import trio

from p2pd.claims import OK, Resolution, contested_error
from p2pd.dht import driver
from p2pd.dht.result import LookupResult
from p2pd.dht.routing import Node, subnet_of
from p2pd.errors import Contested, NotFound
from p2pd.identity import HandleRef, Identity
from p2pd.records import HandleRecord, dht_key
from p2pd.testing.adversary import grind_node_key
from p2pd.testing.swarm import Swarm, SwarmNode, open_swarm
from p2pd.wire import Address, FindValueReply

N_NODES = 22
N_HANDLES = 10

pytestmark = pytest.mark.slow


def node_of(n: SwarmNode) -> Node:
    return Node(n.dht.node_id, n.address.host, n.address.port, n.node_key.public_key)


async def store_everywhere(swarm: Swarm, sender: SwarmNode, key: bytes, value: bytes) -> list:
    """Send one STORE straight to every other live node; return their replies."""
    targets = [n for n in swarm.nodes if n.alive and n is not sender]
    return await sender.dht.gather([(node_of(t), "store", [key, value]) for t in targets])


async def held_by(swarm: Swarm, key: bytes) -> list[HandleRecord | None]:
    """What each live node's own storage holds under ``key``."""
    return [node.dht.core.storage.record(key) for node in swarm.nodes if node.alive]


async def test_every_node_resolves_every_handle() -> None:
    with trio.fail_after(120):
        async with open_swarm(N_NODES) as swarm:
            # each node on a loopback /24 of its own: the address limits leave them all in
            assert len({subnet_of(n.address.host) for n in swarm.nodes}) == N_NODES
            published = [await swarm.publish(i) for i in range(N_HANDLES)]
            for asker in swarm.nodes:
                for record in published:
                    found = await asker.dht.resolve(HandleRef(record.handle))
                    assert found.public_key == record.public_key
                    assert found.addresses == record.addresses
                    assert found.seq == record.seq
            # the record sits on about k nodes, not just its owner
            holders = [r for r in await held_by(swarm, published[0].key) if r is not None]
            assert len(holders) >= min(N_NODES, 20) - 2


@pytest.mark.parametrize("others", [1, 2])
async def test_an_owner_whose_id_sits_next_to_her_key_resolves_in_a_tiny_network(
    others: int,
) -> None:
    """Issue 11's CI flake (tests/test_messages_e2e.py, about 1 clean-clone run in 30):
    in a network of 2 or 3 nodes a send was refused as "contested" with one key shown,
    the owner's, "(1 of the replicas)". Her node's id happened to sit so near her
    handle's key that the density rule set it aside (about one lookup in 1,100-2,000 in
    so small a network: the resolver's estimate is its 1-2 contacts and itself), and a
    key held by any set-aside replica needed 8 votes, more than such a network has. Here
    her id is ground to that place: no attacker, and the resolver must get her key."""
    key = dht_key("alice")
    with trio.fail_after(60):
        async with open_swarm(others) as swarm:
            alice = await swarm.start_node(
                Identity.generate("alice"),
                node_key=grind_node_key(key, 12, random.Random(others)),
            )
            alice.index = len(swarm.nodes)
            swarm.nodes.append(alice)  # closed with the swarm
            await alice.dht.bootstrap([n.address for n in swarm.nodes[:-1]])
            await swarm.publish(alice.index)
            resolver = swarm.nodes[0]
            resolution, details = await resolver.dht.resolve_claim(HandleRef("alice"))
            # The precondition: the rule did set her node aside (2^-12 of the id space
            # is under the 1e-3 / 3 that chance allows the nearest of 3 nodes).
            assert alice.node_key.node_id in details.packed
            assert resolution.status == "ok", contested_error("alice", resolution)
            assert resolution.record is not None
            assert resolution.record.public_key == alice.identity.public_key
            found = await resolver.dht.resolve(HandleRef("alice"))
            assert found.public_key == alice.identity.public_key


async def test_unknown_handle_is_not_found() -> None:
    with trio.fail_after(60):
        async with open_swarm(8) as swarm:
            await swarm.publish(0)
            with pytest.raises(NotFound):
                await swarm.nodes[5].dht.resolve(HandleRef("nobody_here"))


async def test_attacks_are_refused_by_every_honest_node() -> None:
    with trio.fail_after(120):
        async with open_swarm(N_NODES) as swarm:
            victim = swarm.nodes[0]
            await swarm.publish(0)
            newest = await swarm.publish(0)  # seq 2: the one lookups must return
            oldest = victim.published[0]
            key = dht_key(victim.identity.handle)
            attacker = await swarm.add(Identity.generate("mallory"))
            now = int(time.time())

            # 1. forged: a later seq and another address under the old signature
            forged = dataclasses.replace(
                newest, seq=newest.seq + 5, addresses=(Address("127.0.0.1", 9),)
            )
            # 2. another key claiming the handle, validly self-signed
            usurper = Identity.from_seed(victim.identity.handle, b"\x07" * 32)
            other_key = HandleRecord.create(
                usurper, [attacker.address], seq=newest.seq + 100, now=now, lifetime=3600
            )
            # 3. the owner's own older record replayed (a rollback)
            holds_claim = [h is not None for h in await held_by(swarm, key)]
            assert sum(holds_claim) >= 19  # the k closest (k=20) hold the claim
            for name, value in (
                ("forged", forged.encode()),
                ("other key", other_key.encode()),
                ("rollback", oldest.encode()),
            ):
                replies = await store_everywhere(swarm, attacker, key, value)
                live = [n for n in swarm.nodes if n.alive and n is not attacker]
                for node, reply in zip(live, replies, strict=True):
                    if name != "other key" or holds_claim[node.index]:
                        assert reply is False, (name, node.index)
                    # A node outside the replica set never saw alice's claim, so for it
                    # the usurper's is the first: first-claim is per storing node. The
                    # lookup below must still never return it.

            for index, held in enumerate(await held_by(swarm, key)):
                if holds_claim[index]:
                    assert held == newest
                else:
                    # Replication (a welcome STORE to a newly met node) may since have
                    # handed it the owner's record; anything else must be the usurper's.
                    assert held is None or held == newest or held.public_key == usurper.public_key
            for asker in swarm.nodes[1:N_NODES]:
                found = await asker.dht.resolve(HandleRef(victim.identity.handle))
                assert found == newest
            # the refusals were counted by reason, on a node that holds the claim and is
            # among the k closest it knows (a farther one refuses any store at once)
            holder = next(
                n
                for n in swarm.nodes[1:N_NODES]
                if holds_claim[n.index] and n.dht.core.is_close_to(key)
            )
            stats = holder.dht.statistics()
            assert stats["refused_records"].get("invalid", 0) >= 1
            assert stats["refused_records"].get("other-key", 0) >= 1
            assert stats["refused_records"].get("stale", 0) >= 1


async def test_self_certifying_handle_refuses_another_key() -> None:
    with trio.fail_after(60):
        async with open_swarm(8) as swarm:
            record = await swarm.publish(2)
            good = HandleRef.parse(f"{record.handle}#{record.fingerprint[:12]}")
            assert (await swarm.nodes[6].dht.resolve(good)) == record
            wrong = "a" if record.fingerprint[0] != "a" else "b"
            with pytest.raises(NotFound, match="fingerprint prefix"):
                await swarm.nodes[6].dht.resolve(HandleRef.parse(f"{record.handle}#{wrong * 12}"))


async def test_a_squatter_on_many_replicas_makes_the_handle_contested_not_taken() -> None:
    """A rival key that reached a third or more of the replicas first: every honest
    resolver says "contested" with both keys and where each was seen, never the rival's
    key alone; the self-certifying form of each still resolves to that key."""
    with trio.fail_after(120):
        async with open_swarm(N_NODES) as swarm:
            owner = swarm.nodes[0]
            key = dht_key(owner.identity.handle)
            squatter = Identity.from_seed(owner.identity.handle, b"\x09" * 32)
            rival = HandleRecord.create(squatter, [], seq=1, now=int(time.time()), lifetime=3600)
            planted = swarm.nodes[1:11]
            for node in planted:
                assert node.dht.core.storage.offer(key, rival.encode()) == "accept"
            record = await swarm.publish(0)
            for asker in swarm.nodes[11:14]:
                with pytest.raises(Contested, match="is contested") as caught:
                    await asker.dht.resolve(HandleRef(record.handle))
                fingerprints = {c["fingerprint"] for c in caught.value.claims}
                assert fingerprints == {record.fingerprint, rival.fingerprint}
                for form in (f"{record.handle}#{c[:16]}" for c in fingerprints):
                    assert form[:-4] in caught.value.message  # 12 or 16 characters shown
                rival_claim = next(
                    c for c in caught.value.claims if c["fingerprint"] == rival.fingerprint
                )
                assert rival_claim["seen"] is not None and rival_claim["votes"] >= 3
                # where it was seen: replicas that do hold the rival (a planted one may
                # have handed it on to a newcomer: _welcome), never one that does not
                by_host = {n.address.host: n for n in swarm.nodes}
                shown = set(rival_claim["replicas"]) - {"local"}
                assert shown & {n.address.host for n in planted}
                for host in shown:
                    assert by_host[host].dht.core.storage.get(key) == rival.encode()
                for wanted in (record, rival):
                    ref = HandleRef.parse(f"{wanted.handle}#{wanted.fingerprint[:16]}")
                    assert (await asker.dht.resolve(ref)).public_key == wanted.public_key
            # Later the rival's replicas answer too late to count (a loaded machine): the
            # lookup sees the owner's claim alone. It stays contested on a node that
            # found it so (CONTESTED_MEMORY), and a send would not pin either key.
            asker = swarm.nodes[11]
            real = asker.dht.resolve_claim

            async def rival_late(ref: HandleRef) -> tuple[Resolution, LookupResult]:
                resolution, result = await real(ref)
                mine = tuple(c for c in resolution.claims if c.public_key == record.public_key)
                return Resolution(OK, mine[0].record, mine), result

            asker.dht.resolve_claim = rival_late  # type: ignore[method-assign]
            with pytest.raises(Contested) as caught:
                await asker.dht.resolve(HandleRef(record.handle))
            assert {c["fingerprint"] for c in caught.value.claims} == {
                record.fingerprint,
                rival.fingerprint,
            }
            later = time.time() + driver.CONTESTED_MEMORY + 1
            asker.dht._wall = lambda: later  # the memory has run out: one claim is all
            found = await asker.dht.resolve(HandleRef(record.handle))
            assert found.public_key == record.public_key


async def test_restarted_node_still_serves_stored_records(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with open_swarm(12, home=tmp_path) as swarm:
            records = [await swarm.publish(i) for i in range(6)]
            # the node (not an owner) that holds the most records for others
            storage_of = {n.index: n.dht.core.storage for n in swarm.nodes[6:]}
            held = {
                index: {r.key for r in records if storage.record(r.key)}
                for index, storage in storage_of.items()
            }
            holder = swarm.nodes[max(held, key=lambda i: len(held[i]))]
            before = held[holder.index]
            assert before
            restarted = await swarm.restart(holder.index)
            storage = restarted.dht.core.storage
            for key in before:  # straight from SQLite, before any peer could resend it
                assert storage.record(key) is not None
            asker = swarm.nodes[1].dht
            for key in before:
                (reply,) = await asker.gather([(node_of(restarted), "find_value", [key])])
                assert isinstance(reply, FindValueReply) and reply.value is not None
                assert HandleRecord.decode(reply.value).key == key


async def test_malformed_datagrams_are_dropped_and_counted() -> None:
    with trio.fail_after(60):
        async with open_swarm(6) as swarm:
            record = await swarm.publish(0)
            target = swarm.nodes[3]
            before = target.dht.statistics()["counters"].get("malformed", 0)
            garbage = [
                b"\x02",  # too short
                b"\x02" + b"\x11" * 20 + b"\xc1",  # reserved msgpack byte
                b"\x02" + b"\x11" * 20 + b"\x93\xa4ping\x90\xc2",  # ping without sender key
                b"\x02" + b"\x11" * 20 + b"\x93\xa5store\x93\xc4\x20" + b"a" * 32 + b"\x01\x02\xc2",
                b"\x02" + b"\x11" * 20 + b"\x91" * 3000 + b"\xc0",  # nested too deep
                b"\x02" + b"\x11" * 20 + b"\xc4\xff" * 4000,  # oversize frame
                b"\x03" + b"\x22" * 20 + b"\x92\xc0\xc0",  # a reply nobody asked for
                # frame version 1 (an older p2pd): refused and counted apart
                b"\x00" + b"\x11" * 20 + b"\x92\xa4ping\x91\xc4\x14" + b"i" * 20,
                b"\x01" + b"\x22" * 20 + b"\xc0",
            ]
            sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            with sock:
                for datagram in garbage:
                    await sock.sendto(datagram, target.address.as_tuple())
            for _ in range(100):  # bounded wait for the counters to move
                stats = target.dht.statistics()
                counters = stats["counters"]
                if (
                    counters.get("malformed", 0) - before >= 6
                    and counters.get("unexpected_replies")
                    and counters.get("old_version", 0) >= 2
                ):
                    break
                await trio.sleep(0.02)
            assert stats["counters"]["malformed"] - before == 6
            assert stats["counters"].get("unexpected_replies", 0) >= 1
            assert stats["counters"]["old_version"] == 2
            # and it still serves
            found = await swarm.nodes[5].dht.resolve(HandleRef(record.handle))
            assert found == record


async def test_lookups_survive_twenty_percent_of_nodes_dying() -> None:
    with trio.fail_after(120):
        async with open_swarm(25) as swarm:
            records = [await swarm.publish(i) for i in range(25)]
            for index in range(5, 25, 4):  # 5 of 25 go silent, owners included
                await swarm.stop(index)
            for asker in (n for n in swarm.nodes if n.alive):
                for record in records[::3]:
                    assert await asker.dht.resolve(HandleRef(record.handle)) == record
            # they did meet the dead, and did not wait for the 2 s hard timeout on them
            met = 0
            for node in swarm.nodes:
                if node.alive:
                    met += node.dht.statistics()["counters"].get("soft_timeouts", 0)
            assert met >= 5
