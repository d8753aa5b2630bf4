"""Which claim of a handle a node believes: the resolve of a handle's DHT key in up to
two rounds (docs/SECURITY.md, "Claims, presence and contested handles"). A method of
:class:`~p2pd.dht.core.DHTCore` (bound there as a class attribute, as mailbox_ops.py's
are), kept apart so that core.py stays under the project's size limit; sans-I/O like
the core: the rule itself is p2pd/claims.py's :func:`~p2pd.claims.resolve_claims`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..claims import Answer, Resolution, resolve_claims
from ..records import claimed_key
from .lookup import LookupResult
from .operations import older_claim

if TYPE_CHECKING:
    from .core import DHTCore


def start_resolve(
    core: DHTCore,
    key: bytes,
    now: float,
    wall: float,
    accept_key: Callable[[bytes], bool],
    on_done: Callable[[tuple[Resolution, LookupResult]], None],
    *,
    certified: bool = False,
) -> None:
    """Which claim under ``key`` to believe (p2pd/claims.py), among the keys that
    ``accept_key`` allows, in up to two rounds (docs/SECURITY.md, "Claims").
    ``certified``: ``accept_key`` admits one key only (a self-certifying form): the
    replicas the density rule set aside cannot hide a rival there, and do not count.

    1. the k closest (all of them: with the defences on there is no early end, which
       a few ids placed next to the key could decide). One key, no other, and no
       replica set aside as packed: that key.
    2. otherwise all ``claim_factor * ksize`` closest, which hold the record too, and
       the 2/3 rule decides alone, counting the replicas set aside against the
       winner: with 20 % liars at random places, a third of 20 voters are liars 9 %
       of the time, a third of 80 about 0.2 % (binomial; DHTConfig.claim_factor)."""
    defended = core.defended
    wide = core.replicas if defended else 0

    def found(result: LookupResult, first: LookupResult | None = None) -> None:
        if first is not None:
            # Round 2 took round 1's replies instead of asking those nodes again.
            core.stats["resolve_asked_again"] += len(result.asked & first.asked)
            result.rounds = 2
            result.first_rpcs, result.first_elapsed = first.rpcs, first.elapsed
            result.rpcs += first.rpcs
            result.slow += first.slow
            result.failed += first.failed
            result.elapsed += first.elapsed
        else:
            result.first_rpcs, result.first_elapsed = result.rpcs, result.elapsed
        # Only replicas among the k closest known to the key vote (with the defences
        # on): a liar far from the key answers with a value too.
        voting = [(n, v) for n, v in result.values if not defended or n.id in result.voters]
        answers = [Answer(n.id, n.ip, v, result.seen.get(n.id)) for n, v in voting]
        aside = [Answer(n.id, n.ip, v) for n, v in result.values if n.id in result.packed]
        local = core.storage.get(key)
        resolution = resolve_claims(
            answers,
            wall,
            key=key,
            accept_key=accept_key,
            local=local,
            defences=core.config.defences,
            set_aside=0 if certified else len(result.packed) - len(aside),
            set_aside_answers=() if certified else aside,
        )
        # Settled in round 1: one key, no other, nothing set aside (a handle that
        # does not exist, or is held only by black holes, takes round 2 as well).
        settled = resolution.status == "ok" and len(resolution.claims) == 1
        if first is None and wide > core.config.ksize and not (settled and not result.packed):
            core.stats["resolve_widened"] += 1
            core.start_lookup(
                key,
                core.now,
                lambda more: found(more, result),
                find_value=True,
                claim_of=claimed_key,
                k=wide,
                quorum=wide,
                seeds=result.closest + core.lookup_seeds(key, wide),
                prior=dict(result.replies) if core.config.reuse_replies else None,
            )
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
            if local is not None and local != encoded:
                core.storage.offer(key, encoded)
        on_done((resolution, result))

    # With the defences on, round 1 may end early only once the 3k/5 (12) closest
    # agree and span 2/3 of that many expected honest nodes (lookup.py): a value
    # quorum of 8 could be 8 ids placed next to the key (no honest node that near:
    # 1 key in 12), 12 spanning 8 only in e^-8 of the keys.
    quorum = max(core.config.value_quorum, 3 * core.config.ksize // 5) if defended else None
    core.start_lookup(key, now, found, find_value=True, claim_of=claimed_key, quorum=quorum)
