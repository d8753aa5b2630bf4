"""Replicas that are suspiciously close-packed around a key do not all count.

The attack (issue 11, "targeted"): node ids cost an attacker nothing, and the address
limits cost it one /24 per 3 ids. An attacker holding 20 % of the nodes, each on a /24
of its own, grinds node keys whose ids share b leading bits with one handle's DHT key
(2^b keys of 60 µs each: 2^8 take 15 ms) and so becomes all of that key's k closest:
the replicas that store the handle's record and vote on it are then all its own. No
address rule sees anything wrong (every id on its own network, every id proven).

What it cannot hide is the *density*: honest ids are uniform (a hash of a random key),
so around any key the number of honest nodes within a distance ``d`` is Poisson with
mean ``lambda = N * d / 2^160``, where N is the network's size. Twenty ids within
2^-8 of the space of a 200-node network (lambda 0.8) happen by chance about never. The
rule (in the spirit of Cholez et al., "Efficient DHT attack mitigation through peers' ID
distribution", HotP2P 2010, which compares the ids near a key with the distribution
expected from N):

    Walk the candidates nearest first (within the address limits). Admit a node only
    while the number admitted so far, c, is plausible at its distance:
    P(Poisson(lambda) > c) >= PACKED_P. A node that would be one too many for its
    distance is set aside as "packed": still asked (so that a resolver counts the
    answering ones), but not a replica and not a voter; the walk goes on outward.

So a cluster ground next to a key gets the few slots that chance allows at its
distance (about 5 at lambda 0.8, 1 below lambda 0.045), and the k replicas are made up
further out, where honest nodes are. The rule alone does not stop an attacker who places
its ids along the limit curve (as many as chance allows at each distance, nearer than
the honest nodes there): those take every admitted slot, and it is the honest nodes
that get set aside. What stops it is elsewhere: a resolve whose lookup set anything
aside is not settled in its first round, and in the second (4k replicas) every
set-aside node that answered counts against any winner (p2pd/claims.py ``set_aside``),
so that the curve's ids never reach 2/3 of the votes (tests/test_dht_density.py). Those
honest nodes lie as densely as chance places ids; a cluster ground into a sliver next
to the key does not, and counts against a winner only as the few ids chance puts there
(:func:`plausible_count`, p2pd/claims.py ``credited``), not as a denial; and a
first round may end early only when its quorum spans enough expected honest nodes
(p2pd/dht/lookup.py ``EARLY_END_SPAN``).

N comes from up to eight size samples (node lookups of random ids) pooled with the
node's own neighbourhood (:func:`estimate_size`: the distance to its k-th closest
contact), or before any sample from the neighbourhood bounded by the shape of its
table (:class:`SizeEstimate`, :func:`depth_bound`). A cluster or a crowd ground next to
a key is the neighbourhood of the honest nodes whose ids lie inside its prefix: the
samples, whose median leaves out the neighbourhood when it is over twice theirs, are
what keeps them from taking it for the network. An attacker that fills a *resolver's*
table depth by depth loosens the table's bound (a network of 120 taken for 4,000):
what holds then are the samples, and a resolver always has one before it answers
(p2pd/dht/sampling.py ``SizeSampler``; docs/SECURITY.md, "A resolver's table filled
depth by depth"). With fewer than 2k contacts the number of contacts stands for N (a
lower bound: the rule is stricter, never off).

An honest node is set aside about once in 1/PACKED_P placements (a nearest-node
coincidence); it then stores what it is sent but does not vote for that resolver, and
the resolve takes a second round. Pure: no I/O, no clock.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .routing import ID_SPACE, AddressLimit, Node

if TYPE_CHECKING:
    from .result import LookupResult

__all__ = [
    "PACKED_P",
    "SIZE_SAMPLE_REFRESH",
    "SIZE_TOPUP",
    "SIZE_WANTED",
    "SizeEstimate",
    "SpreadLimit",
    "depth_bound",
    "estimate_size",
    "full_depths",
    "plausible_count",
    "poisson_threshold",
]

#: A node is skipped as packed when the count admitted nearer than it would happen by
#: chance with probability below this.
PACKED_P = 1e-3
#: Node lookups whose k closest make the size estimate (SizeEstimate): at most this many
#: kept, and the sampler tops them up to SIZE_WANTED (SIZE_TOPUP).
SIZE_SAMPLES = 16
SIZE_MIN_SAMPLES = 1
#: The pool of 8 samples (and our own neighbourhood) strays by 1 / sqrt(9 * 19), 8 %:
#: over 1.3 N about once in 10^4 (one alone: 23 %, over 1.4 N 6 % of the time), where
#: a crowd of ids over a key's voters takes the handle (docs/SECURITY.md, "A crowd
#: near a key").
SIZE_WANTED = 8
#: A sample taken this many full depths shallower than our table's now counts only while
#: fewer than half of SIZE_WANTED fresh ones do, and one more shallower never: it is of
#: a network half (a quarter) the size or less (SizeEstimate.current). A quarter alone
#: held estimates at 0.4-0.5 N in bench_adversary at N=1000, whose network grows from 0
#: within two minutes: a node that joined at 400 kept its samples of 400 (the median of
#: its eight follows a growth only once half are new, and none was taken while eight
#: counted).
SIZE_STALE_DEPTHS = 1
#: While fewer than SIZE_WANTED count, a node takes one every this many seconds (a node
#: lookup each: 8 in its first 8 minutes, then one as each ages out).
SIZE_TOPUP = 60.0
#: Samples more than this far from their median (either way) are left out of the pool:
#: a sample whose random target fell in a crowd (4x the density over 1/16 of the id
#: space) or a stray.
SIZE_SPREAD = 2.0
#: A sample counts this long (seconds); the top-ups (SIZE_TOPUP) replace each as it ages
#: out, so that an idle node always has SIZE_WANTED.
SIZE_SAMPLE_AGE = 1800.0
#: A resolve or store starts a fresh sample (without waiting for it) when the newest is
#: older than this: a growing network's size is not held down by an old sample for long.
SIZE_SAMPLE_REFRESH = 120.0
#: The table's depth bound (:func:`depth_bound`) is this many times the size its first
#: depth with fewer than k contacts implies: slack for Binomial noise at that depth.
DEPTH_SLACK = 2
#: Thresholds are computed for at most this many admitted nodes (a lookup's k and a bit).
MAX_COUNT = 512


def _poisson_tail(lam: float, c: int) -> float:
    """P(Poisson(lam) > c)."""
    term = math.exp(-lam)
    cdf = term
    for i in range(1, c + 1):
        term *= lam / i
        cdf += term
    return max(0.0, 1.0 - cdf)


@functools.lru_cache(maxsize=MAX_COUNT + 1)
def poisson_threshold(c: int, p: float = PACKED_P) -> float:
    """The smallest lambda at which ``c`` nodes nearer are still plausible: P(Poisson >
    c) = p. Newton's method on the tail (its derivative in lambda is the Poisson
    probability of exactly ``c``), kept inside a bisection bracket: a few steps instead
    of 60 halvings (all 512 thresholds cost a daemon 0.47 s of CPU at its first lookup
    by bisection; tests/test_dht_density.py checks the two agree)."""
    lo, hi = 0.0, float(c + 10 + 10 * math.sqrt(c + 1))
    lam = c + 1.0
    log_factorial = math.lgamma(c + 1)
    for _ in range(100):  # bounded; Newton needs under 10, the bisection fallback 60
        excess = _poisson_tail(lam, c) - p
        if abs(excess) <= 1e-12 * p:
            return lam
        if excess > 0:
            hi = lam
        else:
            lo = lam
        if hi - lo <= 1e-13 * hi:
            break
        pmf = math.exp(c * math.log(lam) - lam - log_factorial) if lam > 0 else 0.0
        step = lam - excess / pmf if pmf > 0 else math.nan
        lam = step if lo < step < hi else (lo + hi) / 2
    return hi


def plausible_count(lam: float) -> int:
    """The most nodes chance places within ``lam`` expected ones of a key, with
    probability ``PACKED_P`` or more: the largest c with P(Poisson(lam) >= c) >= PACKED_P
    (0 below ``poisson_threshold(0)``, about 1e-3). A resolve credits the set-aside
    replicas that count against a winner no further than this at each distance
    (p2pd/claims.py ``chance``): 100 ids ground within lambda 0.25 of a key are 3."""
    count = 0
    while count < MAX_COUNT and poisson_threshold(count) <= lam:
        count += 1
    return count


def depth_bound(own_id: bytes, contacts: Iterable[Node], k: int) -> float | None:
    """An upper bound on the network's size from the shape of our routing table, which
    ids placed near our own cannot raise: ``DEPTH_SLACK * k * 2^(D + 1)``, where D is the
    first depth (leading bits shared with our id) at which the table holds fewer than k
    contacts. A table keeps at least k contacts at every depth where the network has k
    (kademlia splits the bucket that holds our id, and far ones too), so in a network
    of N the depths 0, 1, ... fill while N / 2^(d+1) >= k, and the first that does not
    puts N below about k * 2^(D+1) (between 0.9 and 2.2 N in tables that know their
    network; DEPTH_SLACK 2 for the Binomial noise at that depth).

    What it stops (issue 11, "inflated estimate"): a resolver whose id lies *inside* the
    prefix an attacker ground next to a key holds the cluster in its own neighbourhood
    (the key's bucket left out or not), and the cluster swells its table (360 contacts
    for a network of 300, all split buckets), so ``k * 2^(table_size / k + 1)`` bounded
    nothing: it estimated a network of 300 as 54,000-55,000 in bench_adversary, and the
    cluster took every voting slot (the rival's key without "contested"). The cluster's
    ids share at least the ground bits b with our id, so they only add to depths >= b;
    the depths between log2(N / k) and b stay nearly empty, and D with them. To raise D
    by one an attacker needs k more ids at that depth of *this* resolver's prefix,
    each on a /24 of its own per bucket (tests/test_dht_density.py
    ``test_a_resolver_inside_the_ground_prefix_estimates_the_network_not_the_cluster``).
    None with no contact."""
    return bound_at(full_depths(own_id, contacts, k), k)


def bound_at(first: int | None, k: int) -> float | None:
    """:func:`depth_bound` of a table whose :func:`full_depths` are ``first``."""
    if first is None:
        # Depth 0 (the half of the id space away from ours) not full: a young table (its
        # bootstrap lookup's contacts, all near our id) or a network under 2k. Its
        # depths say nothing of N yet (80-160 whatever N): no bound. Applied there, it
        # set honest replicas aside and their stores were refused as too far
        # (tests/test_dht_replicas.py: 587 of 640 copies held, 97 % asked).
        return None
    return float(DEPTH_SLACK * k * 2.0 ** (first + 1))


def full_depths(own_id: bytes, contacts: Iterable[Node], k: int) -> int | None:
    """The first depth (leading bits shared with our id) at which our table holds fewer
    than k contacts: about log2(N / k), one more each time the network doubles, and not
    moved by the contacts a lookup teaches us at the depths already full (a resolver's
    table grew from 109 to 168 contacts in its first resolve, its full depths stayed 2).
    None with no contact, or depth 0 not full (:func:`depth_bound`)."""
    own = int.from_bytes(own_id, "big")
    counts = [0] * 161
    seen = False
    for node in contacts:
        seen = True
        counts[160 - (node.long_id ^ own).bit_length()] += 1
    if not seen or k < 1 or counts[0] < k:
        return None
    return next(d for d, c in enumerate(counts) if c < k)  # counts[160] is us: 0


def estimate_size(
    own_id: bytes,
    neighbours: Iterable[Node],
    k: int,
    target: bytes | None = None,
    table_size: int | None = None,
    bound: float | None = None,
) -> float | None:
    """The network's size seen from ``own_id``'s neighbourhood: (k - 1) / (distance to
    the k-th closest, as a fraction of the id space), the unbiased estimate for a
    uniform placement. With fewer than 2k contacts (a new node, a small network): the
    number of nodes known, ourselves included, a lower bound (a new node that stored
    or resolved next to a cluster with no rule at all handed the cluster its record).
    None with no contact.

    ``target``: the key the estimate will judge the nodes around. The contacts on the
    target's side of the first bit where our id and the target differ (our table's
    bucket that holds the target) are left out, and the id space they stand for with
    them: the density that judges the nodes near a key is never measured on those
    nodes. Without this, an honest node whose id happens to be near a handle's key
    counted the cluster ground next to that key as its own neighbourhood (estimates 10x
    and more too high, measured), found the cluster plausible, and let it take every
    voting slot: the rival's key without a contested flag (tests/test_adversary.py).

    ``table_size``: how many contacts our routing table holds, for an upper bound that
    no placement of ids near us can raise much: a table holds about k per bucket for
    log2(N / k) buckets and about k more, so N <= k * 2^(table_size / k + 1) (four
    times that relation: slack for a young table, whose far buckets are not full yet).
    It bounds a node whose id is *inside* the prefix an attacker ground next to a key
    (half the cluster in its own neighbourhood, whatever is left out) in a small table:
    36,000 for a network of 60 in the targeted test became 2,200. It bounds nothing
    once the cluster swells the table (360 contacts at N=300: 2^19 k); ``bound`` does.

    ``bound``: :func:`depth_bound` of the whole table (the table-size bound does not
    hold once the cluster swells the table); the estimate never exceeds it, nor falls
    below the nodes we know because of it."""
    own = int.from_bytes(own_id, "big")
    distances = sorted(n.long_id ^ own for n in neighbours)
    if not distances or k < 2:
        return None
    if len(distances) < 2 * k:
        return float(len(distances) + 1)
    known = float(len(distances) + 1)
    low = high = 0  # the left-out range of distances [low, high)
    if target is not None and (split := own ^ int.from_bytes(target, "big")):
        low = 1 << (split.bit_length() - 1)
        high = 2 * low
        distances = [d for d in distances if not low <= d < high]
        if len(distances) < 2:
            return float(len(distances) + 1)
    # Fewer than k left outside the key's bucket (our id shares many bits with the key:
    # the bucket holds most of our neighbourhood): the estimate is taken at the last
    # one, over the id space the ones left stand for. It was their count (at most k,
    # 14 for a network of 1,000, measured: a resolver near the key then set 438 nodes
    # aside as packed, 297 of them honest, asked 465 nodes, and answered "contested":
    # the slowest 1 % of bench_adversary's lookups at N=1000; and in 3.1 % of the
    # lookups of a node that knows 50, 3 or more honest replicas were set aside, 1.2 %
    # now: tests/test_dht_density.py, "chance"). An attacker gains nothing here that
    # k ids placed next to the resolver did not give it before (the normal branch),
    # and the table's bound below holds either way (tests/test_dht_density.py
    # ``test_a_resolver_near_a_targeted_key_estimates_the_network_not_its_bucket``).
    rank = min(k, len(distances))
    kth = distances[rank - 1]
    space = kth - (high - low if kth >= high else 0)
    estimate = float((rank - 1) * ID_SPACE / max(space, 1))
    if rank < k:  # never below the nodes we know (what the fallback was)
        estimate = max(estimate, float(len(distances) + 1))
    if table_size is not None:
        estimate = min(estimate, k * 2.0 ** min(table_size / k + 1, 160))
    if bound is not None:
        estimate = min(estimate, max(bound, known))
    return estimate


def pooled(sizes: Iterable[float]) -> float:
    """One estimate from several ``(k - 1) / d_k``, each over its own stretch of the id
    space, pooled as one count over their summed stretches (the harmonic mean of the
    sizes; all have about k - 1 intervals). A single one strays by ``1 / sqrt(k - 1)``,
    23 % at k = 20; m pooled by ``1 / sqrt(m (k - 1))``."""
    listed = list(sizes)
    return len(listed) / sum(1.0 / max(size, 1e-9) for size in listed)


class SizeEstimate:
    """The network's size for the density rule, robust to a crowd anywhere.

    The estimate is the pool (:func:`pooled`) of recent size samples and of our own
    neighbourhood (:func:`estimate_size`). A sample is ``(k - 1) / d_k`` around the
    target of a node lookup of an id the node drew at random (p2pd/dht/sampling.py
    ``SizeSampler``, which tops them up to ``SIZE_WANTED``, one every ``SIZE_TOPUP``). One
    counts while it is under ``SIZE_SAMPLE_AGE`` seconds old and our table's
    :func:`full_depths` has not grown by ``SIZE_STALE_DEPTHS`` since it was taken (one
    more each time the network doubles: the sample is of a network half the size).

    What goes into the pool, and why (issue 11, "a crowd near a key"): an attacker that
    crowds ids over the 1/2^b of the id space around a key (4 bits, 200 ids at N=1000:
    4x the honest density there) takes the handle at every resolver whose estimate is
    1.4x N or more, and is denied it below (tests/test_dht_density.py). So the
    estimate must not stray that far up:

    - the samples more than ``SIZE_SPREAD`` times from their median are left out: a
      sample whose target fell in the crowd (1 in 2^b), a stray. (The *lower* median,
      tried so that four inflated samples of eight would not be the estimate, gave a
      crowd the handle in bench_adversary: docs/SECURITY.md, "Inflated size samples".)
    - our own neighbourhood joins only when within ``SIZE_SPREAD`` of the samples'
      pool: a resolver whose id lies in a crowd (over 1 in 16 there) saw 4x N in its
      own neighbourhood, and before, that was its estimate, capped at twice its largest
      sample (2x N): 2 and 5 of 100 lookups returned the attacker's key in
      ``bench_adversary --grind-bits 4`` at N=1000;
    - the pool of SIZE_WANTED samples and our own strays by 8 % (9 of k - 1 intervals);
      our own alone by 23 %, over 1.4 N 6 % of the time, and it was never lowered.

    An estimate too low hurts too (the rule then sets honest replicas aside: a
    resolver at 0.4-0.45 N set 31-35 of a key's true 80 replicas aside and answered
    "contested", tests/test_dht_low_estimate.py): the pool strays both ways, and each
    way by less. With no sample counting, our own neighbourhood is the estimate,
    bounded by the table's :func:`depth_bound` and table-size bound (a resolve or a
    store then waits for a sample: SizeSampler)."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        #: (when, size, our table's :func:`full_depths` then)
        self.samples: deque[tuple[float, float, int | None]] = deque(maxlen=SIZE_SAMPLES)

    def fresh(self, now: float, depth: int | None) -> list[tuple[float, float]]:
        """The samples taken at our table's :func:`full_depths` now (``depth``) or
        deeper, under SIZE_SAMPLE_AGE: (when, size), oldest first. The sampler tops
        these up."""
        return self._within(now, depth, 0)

    def current(self, now: float, depth: int | None) -> list[tuple[float, float]]:
        """The samples that count: the fresh ones, and while fewer than half of
        SIZE_WANTED are, those taken one full depth shallower too (a table that learns
        the contacts of a depth it had missed grows a depth in a network that did not
        grow: a resolver in bench_adversary at N=1000 was left with 1 sample of its 8,
        read 1.3x the honest density and returned a crowd's key)."""
        fresh = self.fresh(now, depth)
        if len(fresh) >= SIZE_WANTED // 2:
            return fresh
        return self._within(now, depth, SIZE_STALE_DEPTHS)

    def _within(self, now: float, depth: int | None, grown: int) -> list[tuple[float, float]]:
        # A young table (depth 0 not full: None) counts as depth 0.
        return [
            (when, size)
            for when, size, then in self.samples
            if now - when <= SIZE_SAMPLE_AGE and (depth or 0) <= (then or 0) + grown
        ]

    def age(self, now: float, depth: int | None) -> float | None:
        """How old the newest sample that counts is (None: none counts)."""
        ages = [now - when for when, _ in self.current(now, depth)]
        return min(ages) if ages else None

    def sampling(
        self,
        target: bytes,
        k: int,
        now: float,
        depth: int | None,
        then: Callable[[LookupResult], None],
    ) -> Callable[[LookupResult], None]:
        """``then``, noting first the size seen by a node lookup that found k nodes
        (``depth``: our table's :func:`full_depths` when it started)."""

        def done(result: LookupResult) -> None:
            if len(result.closest) >= k >= 2:
                kth = max(n.long_id ^ int.from_bytes(target, "big") for n in result.closest)
                self.samples.append((now, (k - 1) * ID_SPACE / max(kth, 1), depth))
            then(result)

        return done

    def estimate(
        self,
        own_id: bytes,
        neighbours: Iterable[Node],
        k: int,
        now: float,
        target: bytes | None = None,
        table_size: int | None = None,
        depth: int | None = None,
    ) -> float | None:
        """Our estimate of the network's size (``depth``: our table's
        :func:`full_depths`, which says which samples still count and gives the table's
        :func:`depth_bound`; the other arguments are :func:`estimate_size`'s)."""
        bound = bound_at(depth, k)
        recent = [size for _, size in self.current(now, depth)]
        if len(recent) >= SIZE_MIN_SAMPLES:
            middle = statistics.median(recent)
            low, high = middle / SIZE_SPREAD, middle * SIZE_SPREAD
            recent = [size for size in recent if low <= size <= high]
            # The table's bounds never below the largest sample: a young table (the
            # contacts of its bootstrap lookup, all near our id) has few contacts at
            # the shallow depths, its depth bound is 80-160 and its table-size bound
            # about 300 in a network of 1,000, which set honest replicas aside; a node
            # lookup's k closest do not depend on our table.
            table_size = None
            if bound is not None:
                bound = max(bound, max(recent))
        own = estimate_size(own_id, neighbours, k, target, table_size, bound)
        if own is None or len(recent) < SIZE_MIN_SAMPLES:
            return own
        theirs = pooled(recent)
        if theirs <= SIZE_SPREAD * own and own <= SIZE_SPREAD * theirs:
            return pooled([own, *recent])
        return theirs


class SpreadLimit(AddressLimit):
    """The address limits, plus: set aside nodes packed around ``target`` (module
    docstring). ``size`` None (no contact yet): the address limits only."""

    __slots__ = ("passed", "scale", "skipped", "target", "thresholds")

    def __init__(self, base: AddressLimit, target: bytes, size: float | None) -> None:
        super().__init__(base.per_ip, base.per_subnet)
        self.target = int.from_bytes(target, "big")
        #: The distance the (c+1)-th admitted node must be at least at, for each c,
        #: filled as far as a select needs (all 512 for every limit, one per lookup and
        #: per store, were 3 % of bench_adversary's CPU; a select needs about k).
        self.thresholds: list[int] | None = None
        #: The distance at which one honest node is expected (None: size unknown).
        self.scale: float | None = None
        if size is not None and size > 0:
            self.scale = ID_SPACE / size
            self.thresholds = []
        #: Nodes skipped as packed by the last select (nearer than its last node).
        self.skipped = 0
        self.passed: list[Node] = []

    def expected(self, node: Node) -> float | None:
        """How many honest nodes are expected nearer ``target`` than ``node`` (lambda)."""
        if self.scale is None:
            return None
        return float((node.long_id ^ self.target) / self.scale)

    def packed(self, node: Node, admitted: int) -> bool:
        """Whether ``node`` would be one too many, with ``admitted`` nodes nearer."""
        limits = self.thresholds
        if limits is None or admitted >= MAX_COUNT or self.scale is None:
            return False
        while len(limits) <= admitted:
            limits.append(int(poisson_threshold(len(limits)) * self.scale))
        return bool((node.long_id ^ self.target) < limits[admitted])

    def select(self, nodes: Iterable[Node], count: int) -> list[Node]:
        """The first ``count`` of ``nodes`` (nearest ``target`` first) within the address
        limits and not packed. Packed nodes count toward nothing."""
        out: list[Node] = []
        self.passed = passed = []
        # The address limits first: ids over them (many on one address) are not
        # candidates at all, so they are not set aside either (a set-aside node counts
        # against a winner; 40 ids on one IP must cost 2 slots, not 40 votes). A
        # set-aside node takes its address's slot too (``admitted`` counts it).
        for node in self.admitted(nodes):
            if len(out) >= count:
                break
            if self.packed(node, len(out)):
                passed.append(node)
                continue
            out.append(node)
        self.skipped = len(passed)
        return out
