"""When a node's upkeep is due: publishing its record, rejoining the DHT while alone,
saving routing contacts, session clean-up.

:class:`MaintenanceSchedule` is sans-I/O: it is told what was done and when (``now`` in
seconds of trio's clock) and says what is due and when the next thing will be.
:meth:`p2pd.daemon.Node.maintain` sleeps until that deadline, or until a :class:`Wakeup`
is set by something that changes the plan (a one-time prekey used: the bundle must be
republished; a LAN peer appeared while we are alone: join through it now; the routing
table lost its last contact: rejoin now).
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

#: While the routing table is empty, retry the bootstrap this often.
REJOIN_INTERVAL = 15.0
#: A changed record (a one-time prekey used, an address or a relay changed) is republished
#: at most this often: the default of ``[node] republish_min`` (p2pd/config.py).
BUNDLE_REPUBLISH_MIN = 10.0
#: Session clean-up (expired prekeys, archived sessions). (The DHT wakes the loop when
#: its routing table loses its last contact: ``open_dht(on_alone=...)``.)
UPKEEP_INTERVAL = 60.0


@dataclass(frozen=True)
class Due:
    """What to do now, in this order."""

    join: bool
    publish: bool
    save_contacts: bool
    upkeep: bool

    def __bool__(self) -> bool:
        return self.join or self.publish or self.save_contacts or self.upkeep


class MaintenanceSchedule:
    """The node's upkeep deadlines. ``alone`` (the routing table is empty) and
    ``bundle_changed`` (our prekey bundle differs from the published one) are facts the
    caller reads when it asks; everything else is what the caller reported done."""

    def __init__(
        self,
        now: float,
        *,
        republish_interval: float,
        save_contacts_interval: float,
        rejoin_interval: float = REJOIN_INTERVAL,
        bundle_republish_min: float = BUNDLE_REPUBLISH_MIN,
        upkeep_interval: float = UPKEEP_INTERVAL,
    ) -> None:
        self.republish_interval = republish_interval
        self.save_contacts_interval = save_contacts_interval
        self.rejoin_interval = rejoin_interval
        self.bundle_republish_min = bundle_republish_min
        self.upkeep_interval = upkeep_interval
        # The node joined and published just before its maintenance starts.
        self.last_publish = self.last_save = self.last_join = self.last_upkeep = now
        self._join_requested = False
        #: After a publish that reached too few replicas (:meth:`stored`), publish again
        #: this long after it (0: the last one was stored).
        self._retry = 0.0

    def request_join(self) -> None:
        """A new way in (a LAN peer): if we are alone, join now, not at the next retry."""
        self._join_requested = True

    def next_deadline(self, *, alone: bool, bundle_changed: bool) -> float:
        """When the next thing is due (in the past if something is due now)."""
        deadlines = [
            self.last_publish + self.republish_interval,
            self.last_save + self.save_contacts_interval,
            self.last_upkeep + self.upkeep_interval,
        ]
        if alone:
            deadlines.append(-float("inf") if self._join_requested else
                             self.last_join + self.rejoin_interval)  # fmt: skip
        if bundle_changed:
            deadlines.append(self.last_publish + self.bundle_republish_min)
        if self._retry:
            deadlines.append(self.last_publish + self._retry)
        return min(deadlines)

    def due(self, now: float, *, alone: bool, bundle_changed: bool) -> Due:
        join = alone and (self._join_requested or now >= self.last_join + self.rejoin_interval)
        self._join_requested = False  # asked while connected: nothing to do
        return Due(
            join=join,
            publish=now >= self.last_publish + self.republish_interval
            or (bundle_changed and now >= self.last_publish + self.bundle_republish_min)
            or (self._retry > 0 and now >= self.last_publish + self._retry),
            save_contacts=now >= self.last_save + self.save_contacts_interval,
            upkeep=now >= self.last_upkeep + self.upkeep_interval,
        )

    def joined(self, now: float) -> None:
        self.last_join = now

    def published(self, now: float) -> None:
        self.last_publish = now

    def stored(self, copies: int, wanted: int) -> None:
        """What the publish begun at :meth:`published` came to: ``copies`` replicas took
        the record, where ``wanted`` could have (the DHT's k, or its routing table if
        smaller). Under half is short, and the record is published again after
        ``bundle_republish_min``, not after ``republish_interval``: until it is stored,
        a rival's claim of our handle would be the first the network sees (a busy
        moment's store can meet nothing but timeouts: bench_adversary at N=1000 with
        its core starved, 2026-12-05, a store of 3 RPCs in 16 s reached no replica, and
        a squatter's claim was then the only one there). Each short publish in a row
        doubles the wait, up to ``republish_interval``: replicas that refuse us (they
        hold a rival's claim) would otherwise cost a store every 10 s for good."""
        if copies >= wanted / 2:
            self._retry = 0.0
        else:
            retry = 2 * self._retry if self._retry else self.bundle_republish_min
            self._retry = min(retry, self.republish_interval)

    def saved_contacts(self, now: float) -> None:
        self.last_save = now

    def kept_up(self, now: float) -> None:
        self.last_upkeep = now


class Wakeup:
    """A trio.Event that can be set again: :meth:`wait_until` returns early when set."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait_until(self, deadline: float) -> None:
        """Until ``deadline`` (trio's clock) or :meth:`set`, whichever comes first; a
        checkpoint even when the deadline has passed."""
        with trio.move_on_at(max(deadline, trio.current_time())):
            await self._event.wait()
        self._event = trio.Event()
