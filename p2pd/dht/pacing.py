"""How long a value lookup waits on a silent contact: its adaptive RTO, or less once the
lookup's own replies show the network answers faster (sans I/O, like the core).

A contact's RTO (p2pd/dht/rtt.py, RFC 6298's srtt + 4 rttvar) comes from the round
trips last measured with that address, however long ago. A contact that has died since
keeps the RTO of its last exchanges; measured in a burst (a store's 80 requests, a join),
that is many times the round trip of the day. bench_dht.py traced it (``--breakdown``,
N=200, 20 % of the nodes dead): every live replica of a defended resolve had answered
within 10 ms, and the lookup then sat idle 80-275 ms until the soft deadlines of its 3-4
dead contacts passed, one after the other (the next one asked only then was often dead
too), each disjoint path waiting for its own; the lookup's CPU was 13 ms of its 109 ms
(p50). The defences made it worse: two paths each need their own k/2 closest answered
(one path with an early end at 8 needed fewer), and the setup's heavier bursts had left
larger RTOs behind.

:class:`PacedRun`, once ``PACE_HEARD`` replies came, calls a contact silent for
``PACE_FACTOR`` times as long as the *slowest* of them (at least ``soft_timeout_min``)
*late*: the next candidate is asked at once, but the lookup does not end while a late
contact ranks where that end needs answers (:meth:`~p2pd.dht.lookup.Lookup.late`), as
if it were still in flight. It is given up on (as at its RTO: asked no more, suspect
until it speaks, a late reply still taken while the lookup runs) at the later of that
pace and ``OWN_FACTOR`` times its own smoothed round trip (the network's, if never
measured), when that comes before its RTO. So the one change in what a lookup can
conclude is that a contact whose RTO is above twice its srtt (a high variance: measured
in bursts) is given up on at ``max(pace, 2 srtt)`` instead: however fast an attacker's
ids answer, an honest replica that answers within twice its usual round trip counts,
and the early end still needs its unanimous, spread quorum (p2pd/dht/lookup.py). A
replica slower than that (a busy host) was given up on at its RTO before, and a resolve
whose answer would then be contested waits for it in its third round, as before
(p2pd/dht/resolve.py). tests/test_dht_pacing.py.

Value lookups only (p2pd/dht/core.py ``start_lookup``): a node lookup's k closest are a
size sample or where a store goes, and there a live contact given up on sooner (a busy
host) could leave them short; a smaller sample sets honest replicas aside (not measured:
left out by caution).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import wire
from .disjoint import DisjointLookup
from .lookup import Lookup
from .operations import LookupRun
from .result import LookupResult
from .routing import Node

if TYPE_CHECKING:
    from .core import DHTCore

#: A silent contact is late after this many times the slowest reply the lookup has had
#: (the next candidate is asked), and given up on then if its RTO has not come first ...
PACE_FACTOR = 3.0
#: ... and never before this many times its own smoothed round trip (the network's, if
#: it was never measured): whatever the lookup's other replies show, a contact is
#: waited for as long as its own past replies took, twice over.
OWN_FACTOR = 2.0
#: Replies a lookup must have had before its own pace counts.
PACE_HEARD = 3


class PacedRun(LookupRun):
    """A :class:`LookupRun` whose soft deadlines also follow the lookup's own replies."""

    __slots__ = ("_heard", "_sent", "_slowest")

    def __init__(
        self,
        core: DHTCore,
        lookup: Lookup | DisjointLookup,
        on_done: Callable[[LookupResult], None],
    ) -> None:
        super().__init__(core, lookup, on_done)
        #: node id -> its request in flight
        self._sent: dict[bytes, _Sent] = {}
        self._slowest = 0.0
        self._heard = 0

    def requested(self, node: Node, msg_id: bytes, now: float) -> None:
        address = (node.ip, node.port)
        own = self.core.rtt.smoothed(address)
        if own is not None:
            soft = now + self.core.rtt.rto(address)  # what core.request scheduled
            sent = self._sent[node.id] = _Sent(now, msg_id, soft, OWN_FACTOR * own)
            self._pace(sent)

    def ended(self) -> None:
        self._sent.clear()

    def _times(self, sent: _Sent) -> tuple[float, float] | None:
        """When ``sent`` is late by this lookup's pace, and when it is given up on (None:
        no pace yet)."""
        if self._heard < PACE_HEARD:
            return None
        pace = max(self.core.config.soft_timeout_min, PACE_FACTOR * self._slowest)
        return sent.at + pace, sent.at + max(pace, sent.own)

    def _pace(self, sent: _Sent) -> None:
        """Check ``sent`` again when it turns late, or is given up on, if that comes
        before its RTO's soft deadline."""
        times = self._times(sent)
        if sent.check is not None or times is None:
            return
        when = times[1] if sent.late else times[0]
        if when < sent.soft:
            sent.check = when
            self.core.soft_check(sent.msg_id, when)

    def rpc_done(self, node: Node, result: wire.DHTResult | None, now: float) -> None:
        sent = self._sent.pop(node.id, None)
        if result is not None and sent is not None and not self.finished:
            self._heard += 1
            self._slowest = max(self._slowest, now - sent.at)
            if self._heard >= PACE_HEARD:
                for other in self._sent.values():
                    self._pace(other)
        super().rpc_done(node, result, now)

    def rpc_slow(self, node: Node, now: float) -> None:
        sent = self._sent.get(node.id)
        if sent is None or now >= sent.soft or self.finished:  # its RTO: as always
            super().rpc_slow(node, now)
            return
        sent.check = None  # one of ours
        times = self._times(sent)
        if times is not None and now >= times[1]:
            super().rpc_slow(node, now)  # given up on
            return
        if times is not None and now >= times[0] and not sent.late:
            sent.late = True
            if self.lookup.late(node.id):
                self.core.stats["paced_late"] += 1
                self.pump(now)
        self._pace(sent)  # the next check (replies since may have pushed it back)


@dataclass(slots=True)
class _Sent:
    """A request in flight: when it was sent, its message id, its RTO's soft deadline,
    the least it is waited for by its own round trip, and the pace's next check if one
    is scheduled."""

    at: float
    msg_id: bytes
    soft: float
    own: float
    check: float | None = None
    #: Past the lookup's pace: the next candidate was asked (Lookup.late).
    late: bool = False
