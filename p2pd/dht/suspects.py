"""Contacts that went silent: how many replies each lost in a row, and until when
lookups skip it. Sans-I/O, as the core that owns it (:class:`~p2pd.dht.core.DHTCore`,
``core.suspects``): every call takes ``now``; what a lost reply changes in the routing
table (eviction) stays in the core.

Peers keep naming a dead node in their replies long after we evicted it, so a node
whose request went unanswered is *suspect* for ``suspect_period`` (DHTConfig): lookups
do not ask it (``DHTCore.is_suspect``), nor does a mailbox put take it as a relay
(p2pd/dht/mailbox_relay.py ``pick_relays``). Any word from it (a reply, a proven
request) clears that, and its count of lost replies.
"""

from __future__ import annotations

#: Most node ids remembered as unresponsive.
SUSPECTS_MAX = 10_000


class Suspects:
    """Lost replies per contact, and the contacts lookups skip for a while."""

    __slots__ = ("_evict_after", "_failures", "_period", "_until")

    def __init__(self, period: float, evict_after: int) -> None:
        #: How long a silent contact is skipped (DHTConfig.suspect_period).
        self._period = period
        #: Lost replies in a row that evict a contact (DHTConfig.failures_before_eviction).
        self._evict_after = evict_after
        self._failures: dict[bytes, int] = {}
        # Node ids whose last request went unanswered, and until when they are skipped.
        self._until: dict[bytes, float] = {}

    def is_suspect(self, node_id: bytes, now: float) -> bool:
        """Whether lookups skip ``node_id`` now (an expired mark is forgotten here)."""
        until = self._until.get(node_id)
        if until is None:
            return False
        if until < now:
            del self._until[node_id]
            return False
        return True

    def until(self, node_id: bytes) -> float:
        """Until when ``node_id`` is suspect (0.0: it is not); reads, forgets nothing."""
        return self._until.get(node_id, 0.0)

    def mark(self, node_id: bytes, now: float) -> None:
        """Skip this node in lookups for a while; any word from it clears that."""
        if len(self._until) >= SUSPECTS_MAX:
            self._until = {k: v for k, v in self._until.items() if v > now}
            if len(self._until) >= SUSPECTS_MAX:
                self._until.clear()
        self._until[node_id] = now + self._period

    def clear(self, node_id: bytes) -> None:
        """A reply came after all (a lookup's own "slow" mark is taken back)."""
        self._until.pop(node_id, None)

    def heard_from(self, node_id: bytes) -> None:
        """Any word from ``node_id`` (a reply, a proven request) undoes its lost replies."""
        self._failures.pop(node_id, None)
        self._until.pop(node_id, None)

    def lost(self, node_id: bytes, now: float) -> bool:
        """A request to ``node_id`` went unanswered: it is suspect, and one more reply
        is lost. True once ``evict_after`` were lost in a row: the core evicts it (its
        count starts again)."""
        self.mark(node_id, now)
        count = self._failures.get(node_id, 0) + 1
        if count >= self._evict_after:
            self._failures.pop(node_id, None)
            return True
        self._failures[node_id] = count
        return False

    def forgive_all(self) -> None:
        """We hear the network again after hearing no one (the bootstrap's seeds
        answered): what went silent meanwhile gets another chance."""
        self._until.clear()
        self._failures.clear()
