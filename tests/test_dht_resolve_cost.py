"""What a resolve costs (issue 11, latency): with ``DHTConfig.reuse_replies`` (the
default; off is bench_adversary's "again" mode, see docs/SECURITY.md) its second round
(all ``claim_factor * k`` replicas, p2pd/dht/resolve.py) takes the replies its first
round heard instead of asking those nodes again. Before, every node the first round
asked was asked again: about 60 of a resolve's 80 RPCs under bench_adversary's combined
attack, and a node asked twice is also one more chance to stall on a slow one.

On a FakeNetwork in virtual time (seeded): the figures are the protocol's own."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

from p2pd.claims import NOT_FOUND, OK
from p2pd.config import DHTConfig
from p2pd.dht.core import DHTCore
from p2pd.identity import HandleRef
from p2pd.records import dht_key
from p2pd.testing.fakenet import FakeNetwork
from p2pd.testing.swarm import open_swarm
from p2pd.wire import FindValueReply

NODES = 60
K = 8  # 32 replicas per handle record: round 2 is four times round 1's k


def count_value_requests(
    core: DHTCore, key: bytes
) -> tuple[Counter[bytes], Counter[bytes], list[bytes]]:
    """Every find_value of ``key`` that ``core`` sends from now on, by node id; every
    probe of a node's own neighbourhood (find_node of its own id: the second round's
    far candidates, p2pd/dht/lookup.py ``probe_from``); and the nodes asked for the
    value in a round that began after their value reply had come (what the reuse
    takes instead of asking)."""
    asked: Counter[bytes] = Counter()
    probed: Counter[bytes] = Counter()
    again: list[bytes] = []
    answered: dict[bytes, float] = {}
    rounds: list[float] = []  # when each value lookup of the key began
    send, note, start = core.request, core.note_reply, core.start_lookup

    def request(node: Any, method: str, args: list[Any], *rest: Any, **kw: Any) -> None:
        if method == "find_value" and args and args[0] == key:
            asked[node.id] += 1
            came = answered.get(node.id)
            if came is not None and came < rounds[-1]:
                again.append(node.id)
        elif method == "find_node" and args and args[0] == node.id:
            probed[node.id] += 1
        send(node, method, args, *rest, **kw)

    def note_reply(node: Any, result: Any, now: float) -> None:
        if isinstance(result, FindValueReply):
            answered.setdefault(node.id, now)
        note(node, result, now)

    def start_lookup(target: bytes, now: float, *args: Any, **kw: Any) -> None:
        if target == key and kw.get("find_value"):
            rounds.append(now)
        start(target, now, *args, **kw)

    core.request = request  # type: ignore[method-assign]
    core.note_reply = note_reply  # type: ignore[method-assign]
    core.start_lookup = start_lookup  # type: ignore[method-assign]
    return asked, probed, again


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "ask-again control"])
async def test_a_resolve_asks_no_node_twice(
    autojump_clock: trio.testing.MockClock, reuse: bool
) -> None:
    net = FakeNetwork(seed=5, median_rtt=0.05)
    config = DHTConfig(ksize=K, reuse_replies=reuse)
    twice = heard_twice = rpcs = two_rounds = 0
    voters: list[int] = []
    with trio.fail_after(3600):  # virtual seconds
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            async with open_swarm(NODES, network=net, seed=5, config=config) as swarm:
                owners = {}
                for i in range(0, NODES, 10):
                    record = await swarm.publish(i)
                    owners[record.handle] = record.public_key
                # Handles that exist, and handles that do not (those always take the
                # second round: nothing settles the first).
                handles = [*owners, "nobody1", "nobody2", "nobody3"]
                for n, handle in enumerate(handles):
                    asker = swarm.nodes[(7 * n + 3) % NODES]
                    core = asker.dht.core
                    saved, noted, started = core.request, core.note_reply, core.start_lookup
                    asked, probed, again = count_value_requests(core, dht_key(handle))
                    try:
                        resolution, details = await asker.dht.resolve_claim(HandleRef(handle))
                    finally:
                        core.request = saved  # type: ignore[method-assign]
                        core.note_reply = noted  # type: ignore[method-assign]
                        core.start_lookup = started  # type: ignore[method-assign]
                    if handle in owners:
                        assert resolution.status == OK, handle
                        assert resolution.record is not None
                        assert resolution.record.public_key == owners[handle]
                    else:
                        assert resolution.status == NOT_FOUND, handle
                    # The RPCs the result reports are the requests sent (a far
                    # candidate of round 2: a probe, then its find_value).
                    assert details.rpcs == sum(asked.values()) + sum(probed.values())
                    twice += sum(1 for c in asked.values() if c > 1)
                    heard_twice += len(again)
                    rpcs += details.rpcs
                    two_rounds += details.rounds == 2
                    if details.rounds == 2:
                        voters.append(len(details.voters))
            nursery.cancel_scope.cancel()
    print(
        f"reuse={reuse}: {rpcs} RPCs, {twice} asked twice ({heard_twice} in a round begun "
        f"after their reply came), {two_rounds} two rounds, {voters=}"
    )
    assert two_rounds >= 3  # the missing handles at least
    # Every one of the replicas answered (no loss here) and voted, either way.
    assert voters and min(voters) == config.claim_factor * K, voters
    if reuse:
        # No round asks a node whose reply came before it began: it takes that reply.
        # A request the first round left in flight (it ends once its k closest
        # answered) whose reply comes only after the second began is asked again:
        # 1 of the 9 resolves here since the size samples changed the timing (0
        # before). Not fixed: the second round taking such a reply when it comes
        # (tried, a ``later`` view of the first round's replies) moved the disjoint
        # paths' windows, and true replicas went unasked in
        # tests/test_dht_wide_round.py.
        assert heard_twice == 0
        assert twice <= 1, twice
    else:  # the old resolve: the measurement sees the repeats
        assert heard_twice >= 3 * K, (heard_twice, rpcs)
