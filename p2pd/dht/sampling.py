"""When a DHT node takes a sample of the network's size, and what waits for one.

The density rule's size estimate (p2pd/dht/density.py ``SizeEstimate``) is the pool of
samples: node lookups of ids the node draws at random, whose k closest no one can place
ids next to in advance. :class:`SizeSampler` decides when one runs (when the table first
holds 2k contacts, each maintenance round, when the newest is old or the table grew,
and one every ``SIZE_TOPUP`` seconds while fewer than ``SIZE_WANTED`` count), runs one
at a time, and lets a store or a resolve wait for one (docs/SECURITY.md, "A resolver's
table filled depth by depth", "A crowd near a key")."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import wire
from .density import SIZE_SAMPLE_AGE, SIZE_SAMPLE_REFRESH, SIZE_TOPUP, SIZE_WANTED
from .result import LookupResult

if TYPE_CHECKING:
    from .core import DHTCore


class SizeSampler:
    """A DHT core's size samples: one sampling lookup at a time, and what waits for it."""

    def __init__(self, core: DHTCore, randbytes: Callable[[int], bytes]) -> None:
        self.core = core
        self._randbytes = randbytes
        #: A sampling lookup is running; what waits for it (start).
        self._running = False
        self._waiters: list[Callable[[], None]] = []
        self._started = -SIZE_SAMPLE_REFRESH
        #: The table's size when the last sample started (a network that grew shows here).
        self._table_at_start = 0
        #: When the next top-up is due (:meth:`pump`; None: none planned).
        self._planned: float | None = None

    def start(self, now: float, then: Callable[[], None] | None = None) -> None:
        """A node lookup of an id drawn here at random: its k closest are a sample of the
        network's size (p2pd/dht/density.py ``SizeEstimate``) that no one can place ids
        next to in advance. Only these lookups sample (docs/SECURITY.md, "A resolver's
        table filled depth by depth"): a lookup of our own id, of a deep bucket of our
        table, or of a key we replicate (near our id) is a lookup of the neighbourhood an
        attacker fills to inflate our estimate, and its sample was inflated with it.
        ``then``: called when the sample ends (one lookup at a time; later callers wait
        for the running one)."""
        if then is not None:
            self._waiters.append(then)
        elif now - self._started < SIZE_SAMPLE_REFRESH:
            return  # a background sample at most every SIZE_SAMPLE_REFRESH
        if not self._running:
            self._begin(now)

    def _begin(self, now: float) -> None:
        self._running = True
        self._started = now
        self._table_at_start = len(self.core.table)
        self.core.stats["size_samples"] += 1

        def done(_: LookupResult) -> None:
            self._running = False
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter()
            self._plan(self.core.now)

        # In the half of the id space away from our id (its first bit flipped): the
        # depths of our table that an attacker fills (1 and deeper) lie in our half, and
        # ids ground there, 2^(d + 1) times as dense as k at random over the space at
        # depth d, made a random target's sample too large when it fell among them
        # (bench_adversary's "depth-filled resolver" at N=40: 2 wrong keys of 3). In the
        # far half the attacker must raise the density of half the network to move it.
        drawn = bytearray(self._randbytes(wire.NODE_ID_LEN))
        drawn[0] = (drawn[0] & 0x7F) | (~self.core.node_id[0] & 0x80)
        self.core.start_lookup(bytes(drawn), now, done, sample=True)

    def _plan(self, now: float) -> None:
        """The next top-up (:meth:`pump`): while fewer than SIZE_WANTED samples count, one
        every SIZE_TOPUP seconds; with enough, when the oldest stops counting."""
        core = self.core
        if self._planned is not None or not self._on():
            return
        current = core.sizes.fresh(now, core.table_depth())
        if len(current) < SIZE_WANTED:
            when = now + SIZE_TOPUP
        else:
            when = max(now + SIZE_TOPUP, current[0][0] + SIZE_SAMPLE_AGE)
        self._planned = when
        core.schedule_pump(when, self)

    def take_now(self, now: float) -> bool:
        """A sample at once if fewer than SIZE_WANTED count and none runs (whether one
        started): a benchmark's fast-forward to a node that has been up for minutes
        (scripts/bench_adversary.py); the top-ups planned stay as they were."""
        core = self.core
        if self._running or not self._on():
            return False
        if len(core.sizes.fresh(now, core.table_depth())) >= SIZE_WANTED:
            return False
        self._begin(now)
        return True

    def resume(self, now: float) -> None:
        """Top the samples up if no top-up is planned (:meth:`_plan` plans none while
        the table holds under 2k contacts): each maintenance round."""
        if self._planned is None and not self._running:
            self.pump(now)

    def pump(self, now: float) -> None:
        """A top-up is due: a sample if fewer than SIZE_WANTED count (and none runs),
        then the next one planned when it ends."""
        self._planned = None
        core = self.core
        if not self._on():
            return  # planned again by the next start
        if self._running:
            return  # its end plans the next
        if len(core.sizes.fresh(now, core.table_depth())) < SIZE_WANTED:
            self._begin(now)
        else:
            self._plan(now)

    def _on(self) -> bool:
        """Samples are taken: the density rule on, 2k contacts or more (with fewer, a
        lookup of a random id from a young table finds nodes short of the k closest,
        and the sample is too small)."""
        core = self.core
        return (
            core.defended and core.config.packed_check and len(core.table) >= 2 * core.config.ksize
        )

    def needed(self, now: float, *, grown: bool = False) -> bool:
        """Whether the density rule's estimate lacks a recent size sample (and would be
        our table's alone): only with the rule on and 2k contacts or more. ``grown``:
        also when our table grew by k contacts or more since the last sample started
        (the network about doubled: a sample taken at 40 nodes capped a store's estimate
        at 80 in a network of 120, and tests/test_dht_replicas.py's stores reached 91 %
        of their true replicas instead of 97 %). Starts a fresh sample without waiting
        when the newest is over ``SIZE_SAMPLE_REFRESH`` old, or the table grew so."""
        k = self.core.config.ksize
        if not self._on():
            return False
        age = self.core.sizes.age(now, self.core.table_depth())
        more = len(self.core.table) >= self._table_at_start + k
        if age is not None and (age > SIZE_SAMPLE_REFRESH or more):
            self.start(now)
        return age is None or (grown and more)

    @property
    def running_since(self) -> float | None:
        """When the sampling lookup that runs now started (None: none runs)."""
        return self._started if self._running else None

    def idle(self, since: float | None, then: Callable[[], None]) -> None:
        """``then()`` once the sampling lookup that started at ``since`` (None: none) has
        ended: at once if it has, or none ran. A resolve's second round waits so
        (p2pd/dht/resolve.py) for the sample that ran when the resolve started (begun
        then because the newest was over ``SIZE_SAMPLE_REFRESH`` old): the round is then
        judged by it. Not for a later one, so that the wait ends within a lookup's
        deadline of the resolve's start, as its first round does."""
        if since is not None and self.running_since == since:
            self.core.stats["size_sample_idle_waits"] += 1
            self._waiters.append(then)
        else:
            then()

    def after(self, now: float, then: Callable[[], None]) -> None:
        """``then()`` once the density rule's size estimate has a recent sample, so that
        its cap (twice the largest) holds whatever our routing table holds, and one
        taken since the table last grew by k: at once if it has one or needs none
        (:meth:`needed`), else after a sampling lookup. A store waits so; a
        resolve runs a sample beside its first round only when it has none at all
        (p2pd/dht/resolve.py): a sample from a smaller network makes its rule stricter
        for a while, not looser."""
        if self.needed(now, grown=True):
            self.core.stats["size_sample_waits"] += 1
            self.start(now, then)
        else:
            then()
