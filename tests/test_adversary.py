"""Each attack of p2pd/testing/adversary.py at small scale, asserting what a user sees:
the owner's key, or "contested", never another key silently.

In-process swarms on real loopback sockets (each honest node on a 127.a.b.1 of its own),
one on a FakeNetwork in virtual time (an owner offline for longer than her presence), and
real daemon processes driven through the CLI. ``test_control_*`` runs an attack with the
defences off and asserts that it succeeds: the assertions here can fail."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pd.config import DHTConfig
from p2pd.dht.driver import DHT
from p2pd.dht.routing import Node
from p2pd.errors import Contested, NotFound
from p2pd.identity import HandleRef, Identity, fingerprint, self_certifying
from p2pd.records import dht_key
from p2pd.testing.adversary import (
    FABRICATE_IP,
    Behaviour,
    Coalition,
    can_spoof,
    grind_depth_key,
    grind_node_key,
    open_coalition,
    shared_bits,
)
from p2pd.testing.daemons import DaemonProcess, run_cli, short_tempdir
from p2pd.testing.fakenet import FakeNetwork
from p2pd.testing.swarm import Swarm, open_swarm

pytestmark = pytest.mark.slow

HONEST = 15
#: Every in-process test ends within this many (real) seconds.
GUARD = 120


async def resolve_outcome(dht: DHT, ref: HandleRef) -> bytes | str:
    """The key a user would be shown, or "contested" / "not-found"."""
    try:
        with trio.fail_after(30):
            return (await dht.resolve(ref)).public_key
    except Contested:
        return "contested"
    except NotFound:
        return "not-found"


async def outcomes(swarm: Swarm, ref: HandleRef, skip: int) -> list[bytes | str]:
    return [await resolve_outcome(n.dht, ref) for n in swarm.nodes if n.alive and n.index != skip]


async def add_alice(swarm: Swarm) -> tuple[int, bytes]:
    node = await swarm.add(Identity.generate("alice"))
    await swarm.publish(node.index)
    return node.index, node.identity.public_key


def test_grinding_puts_ids_next_to_a_target() -> None:
    target = dht_key("alice")
    key = grind_node_key(target, 8, random.Random(1))
    assert shared_bits(key.node_id, target) >= 8


async def takeover_attempt(config: DHTConfig) -> tuple[list[bytes | str], bytes, bytes]:
    """One IP, 20 ids next to alice's key, each serving a rival claim with the earliest
    ``seen``: what every honest resolver shows, alice's key and the rival's."""
    with trio.fail_after(GUARD):
        async with (
            open_swarm(HONEST, config=config) as swarm,
            open_coalition(
                swarm,
                20,
                Behaviour.FABRICATE | Behaviour.LIAR,
                ip=FABRICATE_IP,
                near=dht_key("alice"),
                seed=1,
            ) as coalition,
        ):
            rival = coalition.add_rival("alice", swarm.wall())
            index, alice = await add_alice(swarm)
            seen = await outcomes(swarm, HandleRef("alice"), skip=index)
            assert coalition.lies_told() > 0
            return seen, alice, rival


async def test_twenty_fabricated_ids_on_one_ip_next_to_alice_and_lying_take_nothing() -> None:
    """(a) This was a full takeover before the defences."""
    seen, alice, rival = await takeover_attempt(DHTConfig())
    assert rival not in seen
    assert seen == [alice] * len(seen)


async def test_control_with_the_defences_off_the_same_attack_takes_the_handle() -> None:
    """(g) The control: the attack of (a) with ``DHTConfig(defences=False)`` succeeds, so
    the test above can fail."""
    seen, _, rival = await takeover_attempt(DHTConfig(defences=False))
    assert "contested" not in seen  # the old rule never says so
    assert seen.count(rival) >= len(seen) // 2


async def settle_size_samples(swarm: Swarm, wanted: int = 3) -> None:
    """Every honest node takes size samples now until it holds ``wanted`` (a node tops
    them up one a minute by itself: a network up for a few minutes), as
    bench_adversary's ``settle_samples`` does. A node just joined holds one, and on a
    busy host one sample can read the network 3x small (19 for 61, in 2 of 480 resolves
    of this attempt on a slow machine, 2026-12-05: the resolver then set alice's own
    replicas aside, "contested", as in four clean-clone runs that day); a young
    node's "contested" is in docs/SECURITY.md, not what this test measures. Bounded:
    at most 20 rounds of 0.2 s."""
    for _ in range(20):
        short = [
            n
            for n in swarm.nodes
            if n.alive
            and len(n.dht.core.sizes.fresh(n.dht.core.now, n.dht.core.table_depth())) < wanted
        ]
        if not short:
            return
        for n in short:
            if n.dht.core.sampler.take_now(n.dht.core.now):
                n.dht.flush()
        await trio.sleep(0.2)


async def targeted_attempt(config: DHTConfig) -> tuple[list[bytes | str], bytes, bytes]:
    """The targeted attacker (issue 11): 20 nodes, each on a /24 of its own (the address
    limits see nothing), ids ground to share 10 bits with alice's key (nearer it than
    any of the 40 honest nodes), each serving a rival claim: what every honest resolver
    shows, alice's key and the rival's, once the resolvers hold three size samples
    (:func:`settle_size_samples`). k = 8, so that 40 nodes are a large network (the
    density rule needs 2k contacts to know the network's size)."""
    with trio.fail_after(2 * GUARD):
        async with (
            open_swarm(40, config=config) as swarm,
            open_coalition(
                swarm, 20, Behaviour.LIAR, near=dht_key("alice"), bits=10, seed=1, config=config
            ) as coalition,
        ):
            rival = coalition.add_rival("alice", swarm.wall())
            index, alice = await add_alice(swarm)
            await settle_size_samples(swarm)
            seen = await outcomes(swarm, HandleRef("alice"), skip=index)
            assert coalition.lies_told() > 0
            return seen, alice, rival


async def test_a_targeted_attacker_on_many_networks_takes_nothing_and_blocks_nothing() -> None:
    """Item 1: ids ground next to alice's key on 20 networks, lying. With the density
    rule (p2pd/dht/density.py) no honest node shows the rival's key, and every one shows
    alice's: the ids the rule sets aside count against her only as far as chance could
    place that many that near the key (p2pd/claims.py ``credited``: about 2 here).
    Counted one vote each, as before, they made every resolver answer "contested" (40
    of 40, in each of 3 swarms: a denial of the handle, never a takeover); credited,
    alice's key on 40 of 40 in each of 10 swarms."""
    seen, alice, rival = await targeted_attempt(DHTConfig(ksize=8))
    # Before the size estimate left out the key's bucket (p2pd/dht/density.py), one
    # resolver of 40 showed the rival's key in 2 of 12 runs: an honest node whose id is
    # near alice's key took the cluster for its own neighbourhood and let it vote. The
    # control below gives the rival to at least half.
    assert rival not in seen
    assert seen == [alice] * len(seen)


async def test_control_without_the_density_rule_the_targeted_attacker_takes_the_handle() -> None:
    """The control: the same attack with every other defence on (address limits, earned
    ids, disjoint paths, the 2/3 rule) but ``packed_check=False`` hands most resolvers
    the rival's key, so the test above can fail. In some swarms (1 of 4 runs alone here, since
    the resolve's second round keeps the first round's replies: ``reuse_replies``)
    every resolver ends "contested" instead, a denial: so up to three fresh swarms, and
    the takeover in one of them is the proof."""
    for _ in range(3):
        seen, alice, rival = await targeted_attempt(DHTConfig(ksize=8, packed_check=False))
        assert seen.count(alice) < len(seen) // 2  # never the owner's handle for most
        if seen.count(rival) >= len(seen) // 2:
            return
    pytest.fail(f"the rival took no swarm of three: {seen}")


async def test_a_resolver_whose_table_a_cluster_filled_still_reaches_the_owner() -> None:
    """Why no honest replica voted in bench_adversary's wrong-key lookups at N=1000
    (docs/SECURITY.md, "Where a lookup's time went"): kademlia splits a full bucket
    whose contacts share a prefix that is not a multiple of 5 bits, so a node whose id
    shares a few bits with alice's key takes every id of a cluster ground next to it into
    its table, and they are all of its contacts nearest the key. A lookup seeded with
    those alone, which the cluster eclipses (naming only its own), heard no honest node:
    ``alice#<16 characters>`` was not found, and the plain handle was contested with
    the rival's key the only one shown (2-3 cluster ids admitted as voters crowned it
    before the rule asked 8 votes). Now the seeds reach past the ids the density rule
    sets aside (``DHTCore.lookup_seeds``)."""
    config = DHTConfig(ksize=8)  # 32 replicas
    key = dht_key("alice")
    with trio.fail_after(2 * GUARD):
        async with (
            open_swarm(30, config=config) as swarm,
            # The cluster shares 6 bits with the key, bob 5: bob's bucket that takes the
            # cluster splits at its contacts' shared prefix of 6, 7, 8 and 9 bits (not a
            # multiple of 5, as 12 at N=1000), down to 8 contacts a bucket. (It was 11
            # bits, bob 6-10: 82,000 keys ground, 1.8 s of the test's 4 s of CPU; 6 bits
            # take 2,600. With the lookup seeded with bob's closest alone, 8 of 8 runs
            # at 6 bits still ended "not found", as described above.)
            open_coalition(
                swarm, 40, Behaviour.HONEST, near=key, bits=6, seed=1, config=config
            ) as coalition,
        ):
            coalition.add_rival("alice", swarm.wall())
            index, alice = await add_alice(swarm)
            bob = await swarm.start_node(
                Identity.generate("bob"), node_key=grind_depth_key(key, 5, random.Random(3))
            )
            bob.index = len(swarm.nodes)
            swarm.nodes.append(bob)  # closed with the swarm
            assert shared_bits(bob.node_key.node_id, key) == 5
            await bob.dht.bootstrap([swarm.nodes[0].address, swarm.nodes[index].address])
            core = bob.dht.core
            # Every member contacted bob (what a cluster does), and he knows the network.
            for m in coalition.members:
                core.table.add(Node(m.node_id, m.address.host, m.address.port, m.contact.node_key))
            for n in swarm.nodes[:-1]:
                core.table.add(
                    Node(n.node_key.node_id, n.address.host, n.address.port, n.node_key.public_key)
                )
            wide = config.claim_factor * config.ksize
            # An honest node inside the ground prefix (about one run in two: 30 / 2^6)
            # would lead the lookup past the cluster whatever the seeds: not the case
            # under test, so bob forgets those.
            target = int.from_bytes(key, "big")
            edge = max(n.long_id ^ target for n in core.table if n.id in coalition.ids)
            for _ in range(5):  # a contact removed may be replaced from the bucket's cache
                for n in list(core.table):
                    if n.id not in coalition.ids and n.long_id ^ target < edge:
                        core.table.remove(n.id)
            # The precondition: the cluster is all of bob's contacts nearest the key,
            # and he knows honest nodes beyond it.
            assert {n.id for n in core.table.closest(key, wide)} <= coalition.ids
            assert len(core.table) > len(coalition.members) + config.ksize
            coalition.behaviours = Behaviour.ECLIPSE | Behaviour.LIAR
            certified = HandleRef.parse(self_certifying("alice", alice))
            assert await resolve_outcome(bob.dht, certified) == alice
            resolution, details = await bob.dht.resolve_claim(HandleRef("alice"))
            shown = {c.public_key for c in resolution.claims}
            assert alice in shown  # contested or not, her key is among what bob sees
            assert resolution.record is None or resolution.record.public_key == alice
            assert details.voters - coalition.ids  # honest replicas voted
            # The rival's key may be shown beside hers (the votes of the cluster ids the
            # density rule admitted), outvoted or "contested", never crowned (above).
            assert coalition.lies_told() > 0


async def test_eclipse_and_fabricated_ids_cannot_deny_the_self_certifying_form() -> None:
    """(b) Before the defences, this made ``alice#prefix`` fail on 25 of 25 nodes."""
    with trio.fail_after(GUARD):
        async with (
            open_swarm(HONEST) as swarm,
            open_coalition(
                swarm,
                20,
                Behaviour.FABRICATE | Behaviour.ECLIPSE | Behaviour.LIAR,
                ip=FABRICATE_IP,
                near=dht_key("alice"),
                seed=2,
            ) as coalition,
        ):
            rival = coalition.add_rival("alice", swarm.wall())
            index, alice = await add_alice(swarm)
            ref = HandleRef.parse(self_certifying("alice", alice))
            assert len(ref.fingerprint_prefix or "") == 16
            assert await outcomes(swarm, ref, skip=index) == [alice] * HONEST
            plain = await outcomes(swarm, HandleRef("alice"), skip=index)
            assert rival not in plain


async def test_a_stale_record_of_the_owner_cannot_roll_her_back() -> None:
    with trio.fail_after(GUARD):
        async with (
            open_swarm(HONEST) as swarm,
            open_coalition(
                swarm, 6, Behaviour.LIAR, near=dht_key("alice"), bits=6, seed=3
            ) as coalition,
        ):
            index, alice = await add_alice(swarm)
            old = swarm.nodes[index].published[-1]
            coalition.add_stale(old)
            newest = await swarm.publish(index)
            assert newest.seq > old.seq
            for node in swarm.nodes:
                if node.index != index:
                    with trio.fail_after(30):
                        record = await node.dht.resolve(HandleRef("alice"))
                    assert (record.public_key, record.seq) == (alice, newest.seq)


async def test_black_hole_replicas_do_not_hide_a_record() -> None:
    """(d) Hostile nodes next to alice's key say "stored" and keep nothing."""
    with trio.fail_after(GUARD):
        async with (
            open_swarm(HONEST) as swarm,
            open_coalition(
                swarm, 8, Behaviour.BLACKHOLE, near=dht_key("alice"), bits=6, seed=4
            ) as coalition,
        ):
            index, alice = await add_alice(swarm)
            assert all(len(m.dht.core.storage) == 0 for m in coalition.members)
            assert await outcomes(swarm, HandleRef("alice"), skip=index) == [alice] * HONEST


async def test_a_squatter_while_alice_is_offline_takes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """(c) alice goes offline for longer than her presence (10 minutes here; a day for
    the daemon); a squatter claims her handle meanwhile. Her claim lives a year: the
    replicas refuse the rival, resolvers find her key (no addresses), and her republish
    is accepted when she is back."""
    net = FakeNetwork(seed=11, median_rtt=0.05)
    with trio.fail_after(4 * 3600):  # virtual seconds
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            async with (
                open_swarm(20, network=net, seed=11) as swarm,
                open_coalition(swarm, 5, Behaviour.SQUATTER, seed=11) as coalition,
            ):
                node = await swarm.add(Identity.generate("alice"))
                alice = node.identity.public_key
                await swarm.publish(node.index, lifetime=600)
                await swarm.stop(node.index)
                await trio.sleep(1200)
                await coalition.squat(["alice"], swarm.wall())
                seen = await outcomes(swarm, HandleRef("alice"), skip=node.index)
                assert seen == [alice] * (len(swarm.nodes) - 1)
                found = await swarm.nodes[0].dht.resolve(HandleRef("alice"))
                assert found.addresses == ()  # the presence expired; the claim did not
                await swarm.restart(node.index)
                await swarm.nodes[node.index].dht.bootstrap([swarm.nodes[0].address])
                back = await swarm.publish(node.index, lifetime=600)
                assert await resolve_outcome(swarm.nodes[3].dht, HandleRef("alice")) == alice
                record = await swarm.nodes[3].dht.resolve(HandleRef("alice"))
                assert record.seq == back.seq and record.addresses
            nursery.cancel_scope.cancel()


async def spoof_and_check(swarm: Swarm, coalition: Coalition, settle: float) -> None:
    attacker = coalition.members[0]
    victim, honest = swarm.nodes[1], swarm.nodes[2]
    core = victim.dht.core
    assert not core.table.contains(attacker.node_id)
    for method in ("ping", "find_node", "ping"):
        coalition.spoof(attacker, honest.address, victim.address, method)
    await trio.sleep(settle)
    assert core.stats["requests_in"] > 0
    # The victim answered with an address cookie, to the honest address: the attacker
    # never sees it, so it cannot prove the (its id, that address) pair.
    assert core.stats["cookies_sent"] >= 1
    assert honest.dht.core.stats["unexpected_replies"] >= 1
    assert not core.table.contains(attacker.node_id)
    # The control: the same request sent by the attacker's own node from its own
    # address gets the cookie, proves it, and does get in.
    victim_node = Node(core.node_id, victim.address.host, victim.address.port, core.node.key)
    await attacker.dht.gather([(victim_node, "find_node", [attacker.node_id])])
    await trio.sleep(settle)
    assert core.table.contains(attacker.node_id)


@pytest.mark.skipif(not can_spoof(), reason="a raw socket needs root")
async def test_spoofed_sources_put_no_attacker_id_in_a_table() -> None:
    """(e) on real sockets: requests by the attacker's key from an honest node's address."""
    with trio.fail_after(GUARD):
        async with (
            open_swarm(5) as swarm,
            open_coalition(swarm, 1, Behaviour.SPOOF, bootstrap=0, seed=5) as coalition,
        ):
            await spoof_and_check(swarm, coalition, 1.0)


async def test_spoofed_sources_on_a_fake_network(autojump_clock: trio.testing.MockClock) -> None:
    """(e) the same on a FakeNetwork (the datagram handed to it with a forged source)."""
    net = FakeNetwork(seed=12, median_rtt=0.05)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            async with (
                open_swarm(5, network=net, seed=12) as swarm,
                open_coalition(swarm, 1, Behaviour.SPOOF, bootstrap=0, seed=12) as coalition,
            ):
                await spoof_and_check(swarm, coalition, 5.0)
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- real daemons


@pytest.fixture
def home() -> Iterator[Path]:
    path = short_tempdir("p2pd-adv-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_daemons_a_pinned_contact_is_never_affected_by_a_liar(home: Path) -> None:
    """(f) Real daemons bootstrapped into an in-process swarm on loopback. bob writes to
    alice (her key is pinned); then 4 liars on /24s of their own next to alice's key serve
    a rival claim (4 of 14 nodes: every lookup hears at least 8 values, so at most half
    are the rival's). ``whois alice`` shows alice's fingerprint or "contested" (exit 1),
    never the rival's; bob's sends still go to alice's pinned key and are delivered.
    With 8 liars (8 of 18, and all among the closest to her key) whois did show the
    rival's key silently now and then: docs/SECURITY.md, "targeted /24s"."""

    async def cli(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return await trio.to_thread.run_sync(lambda: run_cli(home / name, *args, timeout=90))

    with trio.fail_after(300):
        async with open_swarm(8) as swarm:
            seed = str(swarm.nodes[0].address)
            for handle in ("alice", "bob"):
                proc = await cli(handle, "init", handle, "--no-passphrase")
                assert proc.returncode == 0, proc.stderr
            daemons: list[DaemonProcess] = []
            try:
                for handle in ("alice", "bob"):
                    daemon = DaemonProcess(home / handle, bootstrap=[seed])
                    daemons.append(daemon)
                    await trio.to_thread.run_sync(daemon.wait_ready)
                alice_fp = daemons[0].fingerprint
                sent = await cli("bob", "send", "alice", "before", "--wait", "--timeout", "60")
                assert sent.returncode == 0, sent.stderr
                async with open_coalition(
                    swarm, 4, Behaviour.LIAR, near=dht_key("alice"), bits=6, seed=6
                ) as coalition:
                    rival_fp = fingerprint(coalition.add_rival("alice", swarm.wall()))
                    proc = await cli("bob", "whois", "alice", "--json")
                    if proc.returncode == 0:
                        assert json.loads(proc.stdout)["fingerprint"] == alice_fp
                    else:
                        assert proc.returncode == 1, proc.stderr
                        assert json.loads(proc.stdout)["status"] == "contested"
                    assert coalition.lies_told() > 0, proc.stdout
                    sent = await cli("bob", "send", "alice", "during", "--wait", "--timeout", "60")
                    assert sent.returncode == 0, sent.stderr
                inbox = await cli("alice", "inbox", "--json")
                assert '"before"' in inbox.stdout and '"during"' in inbox.stdout
                contacts = await cli("bob", "contacts", "--json")
                assert alice_fp in contacts.stdout and rival_fp not in contacts.stdout
            finally:
                for daemon in daemons:
                    await trio.to_thread.run_sync(daemon.stop)
