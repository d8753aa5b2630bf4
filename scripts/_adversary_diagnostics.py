"""bench_adversary's diagnostics: where a contested or wrong plain lookup's votes came
from and where the owner's claim is missing (``StoreLog``, ``why_contested``,
``no_honest_voter``, ``closest_only_owner``), how far the publishing reached
(``coverage``), estimates an attack inflated (``inflated_estimates``) and who read a
first message (``first_message``). They only read the swarm and the lookups' results;
scripts/bench_adversary.py runs the network and the rows, scripts/_adversary_report.py
prints the tables."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _adversary_report import (
    fmt,
)

from p2pd.claims import OK, Answer, resolve_claims
from p2pd.dht.density import depth_bound, estimate_size, pooled
from p2pd.dht.result import LookupResult
from p2pd.dht.routing import ID_SPACE
from p2pd.identity import HandleRef
from p2pd.records import HandleRecord, claimed_key, dht_key
from p2pd.testing.adversary import (
    Coalition,
)
from p2pd.testing.swarm import Swarm
from p2pd.wire import Address


class StoreLog:
    """Where each handle record's stores went and what became of them (a diagnostic for
    contested lookups, installed on the honest nodes' cores before the publishing):
    the nodes each publisher sent a store to, and each refusal a node gave, by key
    ("far": not among the replicas it knows, or the storage's verdict)."""

    def __init__(self) -> None:
        self.sent: dict[bytes, set[bytes]] = {}
        self.refused: dict[tuple[bytes, bytes], str] = {}
        #: The store's node lookup by key: the publisher's size estimate, its result.
        self.lookups: dict[bytes, tuple[float, LookupResult]] = {}

    def install(self, swarm: Swarm) -> None:
        for node in swarm.nodes:
            core = node.dht.core
            self._wrap(core)

    def _wrap(self, core: Any) -> None:
        put_at, close_to, offer = core._put_at, core.is_close_to, core.storage.offer
        start_lookup = core.start_lookup
        me = core.node_id
        replicas = core.replicas

        def logged_lookup(target: bytes, now: float, on_done: Any, **kw: Any) -> None:
            if kw.get("find_value") or kw.get("k") != replicas:
                start_lookup(target, now, on_done, **kw)
                return
            limit = core.spread_limit(target)
            size = ID_SPACE / limit.scale if limit is not None and limit.scale else 0.0

            def done(result: LookupResult) -> None:
                self.lookups[target] = (size, result)
                on_done(result)

            start_lookup(target, now, done, **kw)

        def logged_put_at(nodes: list[Any], method: str, key: bytes, *rest: Any) -> None:
            if method == "store":
                self.sent.setdefault(key, set()).update(n.id for n in nodes)
            put_at(nodes, method, key, *rest)

        def logged_close_to(key: bytes, k: int | None = None) -> bool:
            close = bool(close_to(key, k))
            if not close:
                self.refused[(me, key)] = "far"
            return close

        def logged_offer(key: bytes, value: bytes, *args: Any, **kwargs: Any) -> str:
            verdict = str(offer(key, value, *args, **kwargs))
            if verdict not in ("accept", "same", "rotated"):
                self.refused[(me, key)] = verdict
            return verdict

        core.start_lookup = logged_lookup
        core._put_at, core.is_close_to, core.storage.offer = (
            logged_put_at,
            logged_close_to,
            logged_offer,
        )

    def report(
        self,
        swarm: Swarm,
        coalition: Coalition,
        handle: str,
        details: LookupResult,
        owner: bytes,
    ) -> str:
        """For a contested lookup of ``handle``: the honest voters without the owner's
        claim, and the honest nodes among the key's ``claim_factor * k`` closest in the
        network that do not hold it, each by why (never sent a store, refused and by
        which rule, or took it and lost it)."""
        replicas = swarm.config.claim_factor * swarm.config.ksize
        key = dht_key(handle)
        target = int.from_bytes(key, "big")
        honest = {n.dht.core.node_id: n for n in swarm.nodes if n.alive}
        everyone = sorted(
            list(honest) + [m.node_id for m in coalition.members],
            key=lambda i: int.from_bytes(i, "big") ^ target,
        )
        rank = {node_id: r for r, node_id in enumerate(everyone)}
        true = set(everyone[:replicas])
        sent = self.sent.get(key, set())

        def why(node_id: bytes) -> str:
            held = honest[node_id].dht.core.storage.record(key)
            if held is not None:
                return "holds the owner's" if held.public_key == owner else "holds a rival"
            refused = self.refused.get((node_id, key))
            if refused is not None:
                return f"refused {refused}"
            return "sent, not held" if node_id in sent else "never sent"

        def tally(ids: Iterable[bytes]) -> str:
            counts = Counter(why(i) for i in ids)
            return ", ".join(f"{v} {k}" for k, v in counts.most_common()) or "none"

        without = [
            i
            for i in details.voters
            if i in honest
            and (
                honest[i].dht.core.storage.record(key) is None
                or honest[i].dht.core.storage.record(key).public_key != owner
            )
        ]
        ranks = sorted(rank[i] for i in without)
        missing = [i for i in true if i in honest and why(i) != "holds the owner's"]
        asked = details.asked
        voted_ranks = sorted(rank[i] for i in details.voters if i in rank)
        store = ""
        if key in self.lookups:
            size, found = self.lookups[key]
            closest = sorted(rank.get(n.id, -1) for n in found.closest)
            late = sorted(rank.get(n.id, -1) for n in found.given_up)
            store = (
                f"; the store's lookup: size estimate {size:.0f}, {found.rpcs} RPCs, "
                f"{found.elapsed * 1000:.0f} ms, closest {len(closest)} (true ranks max "
                f"{closest[-1] if closest else None}, {sum(r < replicas for r in closest)} "
                f"in the true {replicas}), given up on {len(late)} (true ranks {late}), "
                f"never answered (hard timeout, a bad reply) {found.failed}, "
                f"missing ones asked {sum(i in found.asked for i in missing)}, "
                f"packed {len(found.packed)}"
            )
        return store + (
            f"; honest voters without the owner's claim {len(without)} (true ranks {ranks}; "
            f"{sum(i in true for i in without)} in the true {replicas} closest): "
            f"{tally(without)}; honest in the true {replicas} closest not holding it "
            f"{len(missing)} of {sum(i in honest for i in true)}: {tally(missing)}, "
            f"asked {sum(i in asked for i in missing)}, voters "
            f"{sum(i in details.voters for i in missing)}; voters' true ranks max "
            f"{voted_ranks[-1] if voted_ranks else None}, "
            f"{sum(r >= replicas for r in voted_ranks)} beyond {replicas}; "
            f"true {replicas} closest asked {sum(i in asked for i in true)}"
        )


def coverage(swarm: Swarm, coalition: Coalition, handles: list[str]) -> str:
    """How well the publishing reached the replicas (a diagnostic): of the honest nodes
    among each handle's ``claim_factor * k`` closest nodes in the network (hostile ones
    included), the share that holds its record, and the stores refused as too far."""
    replicas = swarm.config.claim_factor * swarm.config.ksize
    honest = {n.dht.core.node_id: n for n in swarm.nodes if n.alive}
    everyone = list(honest) + [m.node_id for m in coalition.members]
    held = total = 0
    for handle in handles:
        key = dht_key(handle)
        target = int.from_bytes(key, "big")
        closest = sorted(everyone, key=lambda i: int.from_bytes(i, "big") ^ target)[:replicas]
        for node_id in closest:
            if node_id in honest:
                total += 1
                held += honest[node_id].dht.core.storage.get(key) is not None
    refused = sum(n.dht.core.stats["store_refused_far"] for n in honest.values())
    share = 100 * held / total if total else 0.0
    return (
        f"publish coverage: {held} of {total} honest replica slots hold the record "
        f"({share:.1f} %); stores refused as too far: {refused}"
    )


def inflated_estimates(swarm: Swarm, targets: list[str], n: int) -> str:
    """The honest nodes' size estimates for the targeted keys (a diagnostic: the density
    rule judges a cluster by them, p2pd/dht/density.py): how many are over 4 N, and
    where the worst few came from."""
    out = []
    for handle in targets:
        key = dht_key(handle)
        goal = int.from_bytes(key, "big")
        sizes = []
        for node in swarm.nodes:
            core = node.dht.core
            limit = core.spread_limit(key)
            if limit is not None and limit.scale:
                sizes.append((ID_SPACE / limit.scale, node))
        sizes.sort(key=lambda pair: -pair[0])
        worst = [
            f"{size:.0f} (shares "
            f"{160 - (int.from_bytes(node.dht.core.node_id, 'big') ^ goal).bit_length()} bits, "
            f"table {len(node.dht.core.table)}, samples {len(node.dht.core.sizes.samples)})"
            for size, node in sizes[:3]
        ]
        over = sum(size > 4 * n for size, _ in sizes)
        median = sizes[len(sizes) // 2][0] if sizes else 0.0
        out.append(
            f"{handle}: median {median:.0f}, over 4N {over} of {len(sizes)}; "
            f"largest {', '.join(worst)}"
        )
    return "size estimates for the targeted keys: " + "; ".join(out)


def first_message(record: HandleRecord, owner: bytes, receivers: dict[Address, list[Any]]) -> str:
    """Send a first message as p2pd would to a resolved handle, in miniature: sealed to
    the resolved key (a libsodium sealed box standing for the X3DH first message, which
    only that key's holder can open) and handed to whoever listens at the record's first
    address (an in-process map standing for the QUIC connection). Returns who read it:
    "owner", "attacker" (anyone else), or "nobody"."""
    curve = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(record.public_key)
    box = nacl.public.SealedBox(nacl.public.PublicKey(curve)).encrypt(b"hello, first message")
    for identity in receivers.get(record.addresses[0], []) if record.addresses else []:
        secret = nacl.signing.SigningKey(identity.seed).to_curve25519_private_key()
        try:
            nacl.public.SealedBox(secret).decrypt(box)
        except nacl.exceptions.CryptoError:
            continue
        return "owner" if identity.public_key == owner else "attacker"
    return "nobody"


def why_contested(
    resolution: Any, details: LookupResult, owner: bytes, hostile: set[bytes]
) -> tuple[str, str]:
    """The main cause of one contested plain lookup (a diagnostic) and its figures:
    the votes for the owner and for other keys, the set-aside replicas counted
    against the winner, and how many of the voters were hostile or answered with no
    value."""
    votes = {c.public_key: c.votes for c in resolution.claims}
    mine = votes.get(owner, 0)
    others = sum(v for k, v in votes.items() if k != owner)
    packed = len(details.packed)
    empty = {n.id for n in details.without_value} & details.voters
    hostile_voters = len(details.voters & hostile)
    figures = (
        f"owner {mine}, others {others}, set aside {len(details.packed)} "
        f"({len(details.packed & hostile)} hostile), voters {len(details.voters)} "
        f"({hostile_voters} hostile, {len(empty)} without a value, "
        f"{len(empty - hostile)} of them honest), rpcs {details.rpcs}"
    )
    if mine + others + packed == 0:
        why = "no vote"
    elif 3 * mine >= 2 * (mine + others + packed) and mine < 8:
        why = "the owner under 8 votes"
    elif 3 * mine >= 2 * (mine + others):
        why = "set-aside replicas"
    else:
        why = "rival votes over 1/3"
    return why, figures


def no_honest_voter(
    asker: Any, handle: str, details: LookupResult, owner: bytes, hostile: set[bytes]
) -> str:
    """Where the honest replicas were in a lookup none of whose voters was honest (a
    diagnostic): the asker's place and its table near the key, its size estimate, and
    what the honest nodes that answered said and how they were counted."""
    core = asker.dht.core
    key = dht_key(handle)
    target = int.from_bytes(key, "big")
    shared = 160 - (int.from_bytes(core.node_id, "big") ^ target).bit_length()
    table20 = core.table.closest(key, 20)
    table80 = core.table.closest(key, 80)
    limit = core.spread_limit(key)
    size = f"{ID_SPACE / limit.scale:.0f}" if limit is not None and limit.scale else "none"
    # Where the size estimate came from (p2pd/dht/density.py): the node's neighbourhood
    # with the target's bucket left out, the same without the table-size bound, the
    # bound, the table's depth bound, and the node lookups' samples that cap it.
    k = core.config.ksize
    near = core.table.closest(core.node_id, 4 * k)
    own = estimate_size(core.node_id, near, k, key, len(core.table))
    unbounded = estimate_size(core.node_id, near, k, key)
    recent = [v for _, v in core.sizes.current(core.now, core.table_depth())]
    size += (
        f" (own {fmt(own, '.0f')}, unbounded {fmt(unbounded, '.0f')}, table "
        f"{len(core.table)} contacts: bound {k * 2.0 ** min(len(core.table) / k + 1, 160):.0f},"
        f" depth bound {fmt(depth_bound(core.node_id, core.table, k), '.0f')};"
        f" {len(recent)} recent samples, max {fmt(max(recent, default=None), '.0f')})"
    )
    honest_replies = [i for i in details.replies if i not in hostile]
    owner_holders = {
        n.id for n, v in details.values if n.id not in hostile and claimed_key(v) == owner
    }
    return (
        f"asker shares {shared} bits with the key, size estimate {size}; its table's 20 "
        f"closest {sum(n.id in hostile for n in table20)} hostile of {len(table20)}, 80 "
        f"closest {sum(n.id in hostile for n in table80)} of {len(table80)}; rounds "
        f"{details.rounds}, rpcs {details.rpcs} (round 1 {details.first_rpcs}); replies "
        f"{len(details.replies)} ({len(honest_replies)} honest); values "
        f"{len(details.values)}; honest holding the owner's key {len(owner_holders)} "
        f"(voters {len(owner_holders & details.voters)}, set aside "
        f"{len(owner_holders & details.packed)}); voters {len(details.voters)}, set aside "
        f"{len(details.packed)} ({len(details.packed & hostile)} hostile); closest "
        f"{len(details.closest)} ({sum(n.id in hostile for n in details.closest)} hostile)"
    )


def closest_only_owner(asker: Any, ref: HandleRef, details: LookupResult, owner: bytes) -> int:
    """1 if the claim rule, given only the values of the lookup's k closest answering
    nodes, picks the owner's key."""
    closest = {n.id for n in details.closest}
    answers = [
        Answer(n.id, n.ip, v, details.seen.get(n.id)) for n, v in details.values if n.id in closest
    ]
    key = dht_key(ref.handle)
    resolution = resolve_claims(
        answers, time.time(), key=key, accept_key=ref.matches, local=asker.dht.core.storage.get(key)
    )
    record = resolution.record
    return int(resolution.status == OK and record is not None and record.public_key == owner)


# --------------------------------------------------------------------------- printing


def estimate_spread(swarm: Swarm, handles: list[str], n: int, per_node: int = 8) -> str:
    """How far the honest nodes' size estimates for handles' keys (the density rule's N,
    p2pd/dht/density.py ``SizeEstimate``) stray from the network's true size ``n`` (a
    diagnostic for the honest replicas a resolver's own rule sets aside, issue 11 cause
    3, and for the resolvers a crowd of ids near a key takes at 1.4 N and over):
    quantiles of estimate / n over ``per_node`` keys per node, the share under 0.7 n and
    0.5 n and over 1.3 n, and for the ones under 0.7 or over 1.3 what made them: the
    node's own neighbourhood alone (no sample counts; "few" when fewer than k contacts
    lie outside the key's bucket), the samples' pool with it ("pool") or without it
    ("samples": it was over twice theirs or under half), and how many samples
    counted."""
    k = swarm.config.ksize
    ratios: list[float] = []
    odd: Counter[str] = Counter()
    for index, node in enumerate(swarm.nodes):
        if not node.alive:
            continue
        core = node.dht.core
        recent = [v for _, v in core.sizes.current(core.now, core.table_depth())]
        for j in range(per_node):
            key = dht_key(handles[(index * per_node + j) % len(handles)])
            limit = core.spread_limit(key)
            if limit is None or not limit.scale:
                continue
            ratio = ID_SPACE / limit.scale / n
            ratios.append(ratio)
            if 0.7 <= ratio <= 1.3:
                continue
            own = estimate_size(
                core.node_id, core.table, k, key, None, depth_bound(core.node_id, core.table, k)
            )
            split = int.from_bytes(core.node_id, "big") ^ int.from_bytes(key, "big")
            bucket = 1 << (split.bit_length() - 1)
            outside = sum(
                not bucket <= (c.long_id ^ int.from_bytes(core.node_id, "big")) < 2 * bucket
                for c in core.table
            )
            theirs = pooled(recent) if recent else None
            part = (
                "own"
                if theirs is None
                else "pool"
                if own is not None and theirs / 2 <= own <= 2 * theirs
                else "samples"
            )
            few = ", few outside the bucket" if outside < k else ""
            band = ">1.3" if ratio > 1.3 else "<0.5" if ratio < 0.5 else "<0.7"
            odd[f"{band} {part}{few}, {len(recent)} samples"] += 1
    if not ratios:
        return "size estimates: none"
    ratios.sort()

    def q(p: float) -> float:
        return ratios[min(len(ratios) - 1, int(p * len(ratios)))]

    under = [sum(r < b for r in ratios) / len(ratios) for b in (0.7, 0.5)]
    over = sum(r > 1.3 for r in ratios) / len(ratios)
    return (
        f"size estimates / N over {len(ratios)} (node, key): p1 {q(0.01):.2f}, p10 "
        f"{q(0.1):.2f}, p50 {q(0.5):.2f}, p90 {q(0.9):.2f}, p99 {q(0.99):.2f}, max "
        f"{ratios[-1]:.2f}; under 0.7 {100 * under[0]:.1f} %, under 0.5 {100 * under[1]:.1f} %,"
        f" over 1.3 {100 * over:.1f} %; the low and high ones: "
        + (", ".join(f"{v} {w}" for w, v in odd.most_common(8)) or "none")
    )
