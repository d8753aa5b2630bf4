"""Inflated size samples (docs/SECURITY.md, "Inflated size samples").

The density rule (p2pd/dht/density.py) judges the ids next to a key by the network's
size as one resolver estimates it: the pool of its size samples (node lookups of ids it
draws at random) and its own neighbourhood. An attacker who sees a sampling lookup's
target places ids next to it while it runs (k ids ground to share 8 bits with it, each
on a /24 of its own): k ids within 1/256 of the id space where chance puts 0.25 of
60. Were the lookup to take them as the target's k closest, the sample would read
about 30 times the network; with enough samples so inflated the estimate is theirs, a
crowd ground next to a handle's key looks like chance, and a plain lookup returns the
crowd's key.

Here the attacker knows the targets in advance (the resolver's sampler draws them from
a list the test gave the attacker): an upper bound on one who must grind within the
lookup's second or two. Two defences:

- the sampling lookup is held to the density rule of the estimate it has (its
  ``spread_limit``, as every lookup is): the ids packed next to its target are set
  aside while the estimate is honest. Three of eight samples attacked: the estimate
  stayed under 1.2x and the handle alice's; the control, all eight attacked on
  lookups not held to the rule: 30x, and the crowd's key. All eight attacked and held
  to the rule ratchet within the round (each sample judged by the estimate the earlier
  ones raised): the crowd's key. Not defended;
- the samples more than 2x from their median are left out: three inflated of eight
  change nothing, four are the estimate (sans-I/O, below): the budget
  docs/SECURITY.md states.

A simulated network (FakeNetwork, virtual time, seeded): the daemon's own DHT code in
every node."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from test_adversary_depth import size_for

from p2pd import wire
from p2pd.config import DHTConfig
from p2pd.dht.density import SIZE_WANTED, SizeEstimate, SpreadLimit
from p2pd.dht.routing import Node
from p2pd.errors import Contested, NotFound
from p2pd.identity import HandleRef, Identity
from p2pd.records import dht_key
from p2pd.testing.adversary import Behaviour, open_coalition, shared_bits
from p2pd.testing.fakenet import FakeNetwork
from p2pd.testing.swarm import open_swarm

pytestmark = pytest.mark.slow

NODES = 60
K = 8
#: The ids placed next to a sample's target share this many bits with it (above).
SAMPLE_BITS = 8
#: This many per target, k + 4: a lookup still gives up on some of a target's placed ids
#: at their soft deadline (late by jitter), and with k the control lost its majority.
PLACED = K + 4
#: The crowd next to alice's key (LIAR: it serves a rival claim): k ids sharing this many
#: bits with it (as tests/test_adversary_depth.py's cluster): chance at an estimate of
#: about 2,000, packed at 130.
CROWD_BITS = 9
SEED = 3
#: Every node there is when the resolver samples: honest, placed, the crowd.
NETWORK = NODES + PLACED * SIZE_WANTED + K


@dataclass
class Seen:
    outcome: str  # "alice", "rival", "contested", "not-found"
    estimate: float  # the resolver's size estimate for alice's key before the resolve
    samples: list[int]  # the sizes its samples read (rounded)


def far_half(target: bytes, own: bytes) -> bytes:
    """``target`` in the half of the id space away from ``own`` (the sampler draws there:
    p2pd/dht/sampling.py), so that the sampler's own flip of the first bit changes nothing."""
    first = (target[0] & 0x7F) | (~own[0] & 0x80)
    return bytes([first]) + target[1:]


async def inflate() -> tuple[Seen, Seen]:
    """A resolver takes SIZE_WANTED samples, three of them at targets the attacker
    placed ids next to, then resolves alice, next to whose key a crowd serves a rival;
    then eight at the attacker's targets with its sampling lookups of those not held to
    the density rule (what an attacker that places its ids as densely as the rule
    allows, sample after sample, would reach in the end), and resolves again. One
    network for both: the attacker's 104 joins are most of the CPU (6 s of 8)."""
    net = FakeNetwork(seed=SEED, median_rtt=0.05)
    config = DHTConfig(ksize=K)
    key = dht_key("alice")
    rng = random.Random(SEED)
    with trio.fail_after(3600):  # virtual seconds
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            async with open_swarm(NODES, network=net, seed=SEED, config=config) as swarm:
                resolver = swarm.nodes[NODES // 2]
                core = resolver.dht.core
                targets = [
                    far_half(rng.randbytes(wire.NODE_ID_LEN), core.node_id)
                    for _ in range(SIZE_WANTED)
                ]
                async with (
                    open_coalition(
                        swarm,
                        PLACED * SIZE_WANTED,
                        Behaviour.HONEST,  # they only need to be there and answer
                        near=targets,
                        bits=SAMPLE_BITS,
                        # each also contacts the resolver (the attacker knows whom it
                        # attacks): its lookups start from them
                        seeds=[resolver.address],
                        seed=SEED,
                    ) as placed,
                    open_coalition(
                        swarm,
                        K,
                        Behaviour.LIAR,
                        near=key,
                        bits=CROWD_BITS,
                        seed=SEED + 1,
                        first_index=PLACED * SIZE_WANTED,
                    ) as crowd,
                ):
                    rival = crowd.add_rival("alice", swarm.wall())
                    alice = await swarm.add(Identity.generate("alice"))
                    await swarm.publish(alice.index)
                    # A minute for the joins to settle (the resolver's table takes in
                    # the placed ids that reached it).
                    await trio.sleep(65.0)
                    # The attacker at its best: each of its ids is asked, the placed
                    # ones and the crowd (without, the control lost 1 run of 8). (Here the
                    # lookups gave up on 1-5 of a target's ids at their soft deadline and
                    # skipped them as suspect for a minute: pairs whose round trip is in
                    # the simulation's lognormal tail, 1.6 s, and near ones whose reply's
                    # jitter passed an RTO of a few tens of ms. An attacker would pick
                    # ids near the resolver.)
                    ours = placed.ids | crowd.ids
                    suspect = core.is_suspect

                    def never_ours(node_id: bytes, now: float) -> bool:
                        return node_id not in ours and suspect(node_id, now)

                    core.is_suspect = never_ours  # type: ignore[method-assign]
                    outcome = {alice.identity.public_key: "alice", rival: "rival"}

                    async def attacked(chosen: list[bytes]) -> Seen:
                        """Eight samples at the attacker's targets, then a resolve."""
                        for _ in range(60):  # one running from before ends first
                            if core.sampler.running_since is None:
                                break
                            await trio.sleep(1.0)
                        assert core.sampler.running_since is None
                        core.sizes.samples.clear()
                        feed = iter(chosen)
                        core.sampler._randbytes = lambda n: next(feed)[:n]
                        for _ in range(2 * SIZE_WANTED):  # a sample each, or wait for one
                            if len(core.sizes.samples) >= SIZE_WANTED:
                                break
                            core.sampler.take_now(trio.current_time())
                            await trio.sleep(2.0)
                        # (the top-ups an idle node takes: not of these targets)
                        core.sampler._randbytes = rng.randbytes
                        samples = [round(size) for _, size, _ in core.sizes.samples]
                        assert len(samples) == SIZE_WANTED, samples
                        estimate = size_for(core, key)
                        try:
                            with trio.fail_after(60):
                                record = await resolver.dht.resolve(HandleRef("alice"))
                            seen = outcome[record.public_key]
                        except Contested:
                            seen = "contested"
                        except NotFound:
                            seen = "not-found"
                        return Seen(seen, estimate, samples)

                    # Held to the rule: three of the eight samples attacked (under half:
                    # four or more, taken one after another, ratchet: below).
                    # (The other five away from every placed region: a random draw
                    # lands in one of the eight, 1/256 of the id space each, 3 % of the
                    # time, and one did, a fourth sample attacked unawares.)
                    drawn = (
                        far_half(rng.randbytes(wire.NODE_ID_LEN), core.node_id) for _ in range(64)
                    )
                    honest = [
                        t for t in drawn if all(shared_bits(t, p) < SAMPLE_BITS for p in targets)
                    ][:5]
                    held = await attacked([*targets[:3], *honest])
                    limit_of = core.spread_limit

                    def lifted(target: bytes) -> SpreadLimit | None:
                        return None if target in targets else limit_of(target)

                    core.spread_limit = lifted  # type: ignore[method-assign]
                    unheld = await attacked(targets)
                    assert placed.members and crowd.lies_told() > 0  # the attacker ran
            nursery.cancel_scope.cancel()
    print(f"held to the rule: {held}\nnot held: {unheld}")
    return held, unheld


async def test_three_attacked_samples_of_eight_leave_the_handle_and_eight_unheld_take_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Three of the resolver's eight samples attacked, its sampling lookups held to the
    density rule: the estimate stays under 2.5x the network, and the crowd does not
    take the handle. The control, all eight attacked on lookups not held to the rule:
    the samples read about 30x the network, so does the estimate, and the crowd takes
    alice's handle. (All eight attacked *and* held to the rule ratcheted within the
    round: each sample judged by the estimate the earlier ones raised; the rival's key,
    estimate 2,449: not defended, docs/SECURITY.md.)"""
    held, unheld = await inflate()
    assert held.estimate < 2.5 * NETWORK, held
    assert held.outcome in ("alice", "contested"), held
    assert sum(s > 8 * NETWORK for s in unheld.samples) >= SIZE_WANTED // 2 + 1, unheld
    assert unheld.estimate > 8 * NETWORK, unheld
    assert unheld.outcome == "rival", unheld


def test_half_of_eight_inflated_samples_are_the_estimate() -> None:
    """Sans-I/O, the budget docs/SECURITY.md states: eight samples, some of them f times
    the network. Three inflated change nothing (more than 2x from the median: left
    out); four put the median between the halves, the honest half is left out and the
    estimate is f times N, however large. (The lower median, which would need five,
    gave a crowd the handle in bench_adversary: reverted.)"""
    n = 1000
    rng = random.Random(5)
    ids = [rng.randbytes(wire.NODE_ID_LEN) for _ in range(n)]
    own = ids[0]
    near = sorted(ids[1:], key=lambda i: int.from_bytes(i, "big") ^ int.from_bytes(own, "big"))
    neighbours = [Node(i, "127.0.0.1", 1) for i in near[: 2 * 20]]
    for factor in (4, 8, 100):
        for inflated, honest_estimate in ((3, True), (4, False)):
            sizes = SizeEstimate()
            for i in range(SIZE_WANTED):
                size = factor * n if i < inflated else n * rng.uniform(0.85, 1.15)
                sizes.samples.append((0.0, size, None))
            estimate = sizes.estimate(own, neighbours, 20, 1.0)
            assert estimate is not None
            if honest_estimate:
                assert 0.7 * n < estimate < 1.3 * n, (factor, inflated, estimate)
            else:
                assert estimate > 0.9 * factor * n, (factor, inflated, estimate)
