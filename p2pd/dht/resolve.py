"""Which claim of a handle a node believes: the resolve of a handle's DHT key in up to
three rounds (docs/SECURITY.md, "Claims, presence and contested handles"). A method of
:class:`~p2pd.dht.core.DHTCore` (bound there as a class attribute, as mailbox_ops.py's
are), kept apart so that core.py stays under the project's size limit; sans-I/O like
the core: the rule itself is p2pd/claims.py's :func:`~p2pd.claims.resolve_claims`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..claims import CONTESTED, Answer, Resolution, resolve_claims
from ..records import claimed_key
from .density import plausible_count
from .operations import older_claim
from .result import LookupResult
from .routing import ID_SPACE, Node

if TYPE_CHECKING:
    from .core import DHTCore

#: A resolve whose first round was judged by a size estimate over this many times the
#: one a size sample then gave is started again. Honest tables give about the sample
#: (the cap is twice it); a table filled depth by depth gave 30 times it and more
#: (tests/test_adversary_depth.py).
SAMPLED_CUT = 1.5


def chance(result: LookupResult, node_id: bytes) -> int | None:
    """How many nodes chance places as near the key as this set-aside one (None: the
    lookup had no size estimate for it)."""
    lam = result.packed_expected.get(node_id)
    return None if lam is None else plausible_count(lam)


def start_resolve(
    core: DHTCore,
    key: bytes,
    now: float,
    wall: float,
    accept_key: Callable[[bytes], bool],
    on_done: Callable[[tuple[Resolution, LookupResult]], None],
    *,
    certified: bool = False,
    resampled: bool = False,
) -> None:
    """Which claim under ``key`` to believe (p2pd/claims.py), among the keys that
    ``accept_key`` allows, in up to three rounds (docs/SECURITY.md, "Claims").
    ``certified``: ``accept_key`` admits one key only (a self-certifying form): the
    replicas the density rule set aside cannot hide a rival there, and do not count.

    1. the k closest (all of them: with the defences on there is no early end, which
       a few ids placed next to the key could decide). One key, no other, and no
       replica set aside as packed: that key.
    2. otherwise all ``claim_factor * ksize`` closest, which hold the record too, and
       the 2/3 rule decides alone, counting the replicas set aside against the
       winner: with 20 % liars at random places, a third of 20 voters are liars 9 %
       of the time, a third of 80 about 0.2 % (binomial; DHTConfig.claim_factor).
       Its far candidates (ranked past ksize) are asked for their own neighbourhood
       first, as a store's are (lookup.py ``probe_from``): the voters must be the
       key's true closest, or honest nodes past them (holding nothing, or a
       squatter's widely stored rival) and liars there decide
       (tests/test_dht_wide_round.py).
       It starts once the size sample running when the resolve started (if any) is
       in, and is judged by it: samples of a smaller network held the density rule's
       estimate under 0.5 N and it set the true replicas aside by the dozen
       (tests/test_dht_low_estimate.py).
    3. once at most, when the answer would be "contested" and the contacts given up on
       at their soft deadline (never heard: ``LookupResult.given_up``) could settle
       it, had each held one of the keys found: the same lookup again, those asked
       again and *waited for* (an answer or their hard timeout, ``rpc_timeout``; the
       round ends within ``2 * rpc_timeout``), every reply heard so far taken as it
       came. A resolver on a busy host, whose replies come after a 10 ms RTO, gave up
       on 12 of 15 honest replicas at once: the owner's 5 votes beside a rival's 1
       were under the 8 the rule asks when two keys are claimed, and a handle nobody
       disputes showed "contested" (issue 11; tests/test_dht_slow_replicas.py).

    ``resampled``: started again after a size sample cut the estimate (below)."""
    defended = core.defended
    wide = core.replicas if defended else 0
    config = core.config

    def decide(result: LookupResult, extra: tuple[Answer, ...] = ()) -> Resolution:
        """The rule over a round's answers (``extra``: answers that did not come)."""
        # Only replicas among the k closest known to the key vote (with the defences
        # on): a liar far from the key answers with a value too.
        voting = [(n, v) for n, v in result.values if not defended or n.id in result.voters]
        answers = [Answer(n.id, n.ip, v, result.seen.get(n.id)) for n, v in voting]
        # The set-aside replicas that answered, with a value or without (b""): each
        # credited against a winner only as far as chance places that many that near
        # the key (p2pd/claims.py ``credited``).
        held = {n.id: v for n, v in result.values if n.id in result.packed}
        aside = [
            Answer(n.id, n.ip, held.get(n.id, b""), chance=chance(result, n.id))
            for n in result.packed_nodes
        ]
        return resolve_claims(
            [*answers, *extra],
            wall,
            key=key,
            accept_key=accept_key,
            local=core.storage.get(key),
            defences=config.defences,
            set_aside_answers=() if certified else aside,
        )

    def could_settle(result: LookupResult, resolution: Resolution) -> bool:
        """Whether the given-up contacts, all holding one of the keys found and all
        voting, would make it the answer: an upper bound, to decide on a wait only."""
        unheard = result.given_up
        if resolution.status != CONTESTED or not unheard:
            return False
        return any(
            decide(result, tuple(Answer(n.id, n.ip, c.record.encode()) for n in unheard)).status
            != CONTESTED
            for c in resolution.claims
        )

    def found(
        result: LookupResult, earlier: LookupResult | None = None, waited: bool = False
    ) -> None:
        if earlier is not None:
            # A later round took the earlier rounds' replies instead of asking again.
            if not waited:
                core.stats["resolve_asked_again"] += len(result.asked & earlier.asked)
            heard = result.replies
            unheard = {n.id: n for n in earlier.given_up + result.given_up if n.id not in heard}
            result.given_up = list(unheard.values())
            result.waited = earlier.waited or waited
            result.rounds = earlier.rounds + 1
            result.first_rpcs, result.first_elapsed = earlier.first_rpcs, earlier.first_elapsed
            result.rpcs += earlier.rpcs
            result.slow += earlier.slow
            result.failed += earlier.failed
            result.elapsed += earlier.elapsed
        else:
            result.first_rpcs, result.first_elapsed = result.rpcs, result.elapsed
        resolution = decide(result)
        # Settled in round 1: one key, no other, nothing set aside (a handle that
        # does not exist, or is held only by black holes, takes round 2 as well).
        settled = resolution.status == "ok" and len(resolution.claims) == 1
        if earlier is None and wide > config.ksize and not (settled and not result.packed):
            core.stats["resolve_widened"] += 1
            # Judged under the size sample this resolve started (its newest was over
            # SIZE_SAMPLE_REFRESH old) if one runs: samples from a smaller network hold the
            # estimate down, and the density rule then set the true replicas aside by
            # the dozen (issue 11, "cause 3"; docs/SECURITY.md).
            core.sampler.idle(sample_began, lambda: next_round(result, wide))
            return
        if young and resolution.status == CONTESTED and len(core.table) >= 2 * config.ksize:
            # Begun with a young table (under 2k contacts: the estimate was their count,
            # strict) that the lookups took past 2k: judged again from the start, under
            # the table it has now and a size sample, rather than waiting for given-up
            # contacts. A newcomer's resolve came back "contested" so and waited for
            # dead contacts' hard timeouts (3 s, tests/test_dht_sim.py's churn).
            core.stats["resolve_grown"] += 1
            start_resolve(core, key, core.now, wall, accept_key, on_done, certified=certified)
            return
        if not result.waited and could_settle(result, resolution):
            core.stats["resolve_waited"] += 1
            next_round(result, max(wide, config.ksize), patient=result.given_up)
            return
        best = resolution.record
        if resolution.status == "ok" and best is not None:
            # Repair (Kademlia section 2.3): only the closest replicas that hold an
            # older record of the same key get the newest; a replica holding another
            # key, or nothing, is left to the storage rule and to replication.
            encoded = best.encode()
            closest = {n.id for n in result.closest}
            for node, value in result.values:
                if node.id in closest and value != encoded and older_claim(value, best, wall):
                    core.stats["repair_stores"] += 1
                    core.request(node, "store", [key, encoded], core.now)
            local = core.storage.get(key)
            if local is not None and local != encoded:
                core.storage.offer(key, encoded)
        on_done((resolution, result))

    def next_round(result: LookupResult, k: int, patient: list[Node] | None = None) -> None:
        """The next round: the ``k`` closest, every reply heard so far taken as it came;
        ``patient``: the given-up contacts, asked again (suspect or not) and waited for."""
        wait = patient or []
        core.start_lookup(
            key,
            core.now,
            lambda more: found(more, result, patient is not None),
            find_value=True,
            claim_of=claimed_key,
            k=k,
            quorum=k,
            seeds=wait + result.closest + core.lookup_seeds(key, k),
            prior=dict(result.replies) if config.reuse_replies else None,
            patient=patient is not None,
            again={n.id for n in wait},
            deadline=2 * config.rpc_timeout if patient is not None else None,
        )

    # With the defences on, round 1 may end early only once the 3k/5 (12) closest
    # agree and span 2/3 of that many expected honest nodes (lookup.py): a value
    # quorum of 8 could be 8 ids placed next to the key (no honest node that near:
    # 1 key in 12), 12 spanning 8 only in e^-8 of the keys.
    quorum = max(config.value_quorum, 3 * config.ksize // 5) if defended else None
    # A recent size sample (p2pd/dht/sampling.py): without one, the
    # density rule's estimate is our routing table's, which an attacker that chose us in
    # advance can fill depth by depth (docs/SECURITY.md). The sampling lookup runs beside
    # round 1, so the round's answer waits for the slower of two lookups (a node rarely
    # lacks a sample: SizeSampler.start); if the sample cut the estimate the
    # round was judged by (more than SAMPLED_CUT), the resolve starts again under it.
    # (A background sample that ends during the round and cuts it so does the same.)
    limit = core.spread_limit(key)
    judged_by = ID_SPACE / limit.scale if limit is not None and limit.scale else None
    waiting: list[LookupResult] = []
    sampled = [resampled or not core.sampler.needed(now)]
    # The sample running now (needed() starts one when the newest is old): the second
    # round waits for it (found()).
    sample_began = core.sampler.running_since
    young = defended and len(core.table) < 2 * config.ksize

    def first_round(result: LookupResult) -> None:
        if not sampled[0]:
            waiting.append(result)  # answered once the sample is in
            return
        again = core.spread_limit(key)
        size = ID_SPACE / again.scale if again is not None and again.scale else None
        if judged_by is not None and size is not None and judged_by > SAMPLED_CUT * size:
            core.stats["resolve_resampled"] += 1
            start_resolve(
                core, key, core.now, wall, accept_key, on_done, certified=certified, resampled=True
            )
            return
        found(result)

    def sample_in() -> None:
        sampled[0] = True
        if waiting:
            first_round(waiting.pop())

    if not sampled[0]:
        core.sampler.start(now, sample_in)
    core.start_lookup(key, now, first_round, find_value=True, claim_of=claimed_key, quorum=quorum)
