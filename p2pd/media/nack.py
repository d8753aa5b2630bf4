"""Retransmission of lost video fragments (RFC 4585 generic NACK, in spirit; sans-I/O).

Two halves, one per side of a video stream:

- :class:`NackScheduler` (receiver): the :class:`~p2pd.media.assembler.FrameAssembler`
  tells it which fragments it misses now (:meth:`NackScheduler.due`); it says which of
  them to ask for in a :class:`~p2pd.media.wire.VideoNack` now. A fragment is asked for
  once it has been missing for ``reorder_delay`` (a reordered datagram is not a loss), and
  again after ``retry_interval`` (or 1.5 RTT + 10 ms, if longer) if it is still missing,
  ``max_nacks`` times at most. The assembler holds the frames after a missing one for
  ``deadline`` before it gives up and falls back to keyframe requests (RFC 4585 PLI).
- :class:`RetransmitHistory` (sender): the datagrams of the fragments sent in the last
  ``max_age`` seconds, ``max_fragments`` at most. A NACK resends each fragment it names
  at most once, a fragment at most ``max_resends`` (3) times in all, and only within a byte
  budget: every original fragment sent earns ``budget_fraction`` of its size (so
  retransmissions stay under 20% of the video bytes, by default), the balance capped at
  ``burst_bytes``. A NACK from a hostile peer can so cost at most that budget.

Neither reads a clock: every call takes ``now`` (seconds, any monotonic origin).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from .wire import MAX_NACK_ENTRIES, NACK_WHOLE_FRAME, VideoFragment, VideoNack

__all__ = ["NackConfig", "NackScheduler", "RetransmitConfig", "RetransmitHistory"]

#: (frame id, fragment index); index NACK_WHOLE_FRAME: the whole frame.
FragmentKey = tuple[int, int]


@dataclass(frozen=True)
class NackConfig:
    """Tuning of the receiver's NACKs; times in seconds."""

    #: A fragment must be missing this long before it is asked for.
    reorder_delay: float = 0.01
    #: Ask again for a fragment still missing this long after the last NACK (at least;
    #: 1.5 RTT + 10 ms when an RTT is known and that is longer).
    retry_interval: float = 0.03
    #: NACKs per fragment at most: later ones cover a lost NACK or retransmission (5%
    #: loss each way: ~10% of attempts fail, so ~0.1% of fragments after three).
    max_nacks: int = 3
    #: How long frames behind a missing one wait for it (its retransmission) before the
    #: assembler counts it lost and asks for a keyframe instead: as long as the
    #: ``max_nacks`` attempts take at the current RTT (:meth:`NackScheduler.deadline`),
    #: but at least this and at most ``max_deadline``. The price of NACK: a freeze this
    #: long when the retransmissions fail too.
    deadline: float = 0.1
    max_deadline: float = 0.4
    #: Fragments tracked at most (bounds the receiver's state, whatever the peer sends).
    max_tracked: int = 2048

    def __post_init__(self) -> None:
        if self.reorder_delay < 0 or self.retry_interval <= 0 or self.deadline <= 0:
            raise UsageError("NACK delays must be >= 0 and the deadline positive")
        if self.max_deadline < self.deadline:
            raise UsageError("max_deadline must be >= deadline")
        if self.max_nacks < 1 or self.max_tracked < 1:
            raise UsageError("max_nacks and max_tracked must be positive")


@dataclass
class _Tracked:
    noticed: float
    nacks: int = 0
    last: float = 0.0


@dataclass
class NackScheduler:
    """Which missing fragments to NACK now. See the module docstring."""

    config: NackConfig = field(default_factory=NackConfig)

    def __post_init__(self) -> None:
        self._tracked: dict[FragmentKey, _Tracked] = {}
        self.nacks_sent = 0
        self.fragments_nacked = 0
        self.recovered = 0

    def retry(self, rtt: float | None) -> float:
        """The time between two NACKs for the same fragment."""
        c = self.config
        return c.retry_interval if rtt is None else max(c.retry_interval, 1.5 * rtt + 0.01)

    def deadline(self, rtt: float | None) -> float:
        """How long a missing frame holds the later ones: ``reorder_delay``, a 20 ms tick
        of slack, the retries, and one RTT for the last retransmission to arrive."""
        c = self.config
        needed = c.reorder_delay + 0.02 + (c.max_nacks - 1) * self.retry(rtt) + (rtt or 0.0)
        return min(c.max_deadline, max(c.deadline, needed + 0.01))

    def due(
        self, missing: list[FragmentKey], now: float, rtt: float | None = None
    ) -> VideoNack | None:
        """``missing``: every fragment the assembler still lacks and could use, now. Returns
        the NACK to send now, or None. Fragments no longer listed are forgotten (arrived,
        or given up on)."""
        c = self.config
        listed = set(missing)
        for key in [k for k in self._tracked if k not in listed]:
            del self._tracked[key]
        retry = self.retry(rtt)
        ask: list[FragmentKey] = []
        for key in missing:
            t = self._tracked.get(key)
            if t is None:
                if len(self._tracked) >= c.max_tracked:
                    continue
                t = self._tracked[key] = _Tracked(now)
            if t.nacks >= c.max_nacks or now - t.noticed < c.reorder_delay:
                continue
            if t.nacks and now - t.last < retry:
                continue
            ask.append(key)
        if not ask:
            return None
        nack = VideoNack.from_missing(ask)
        if len(nack.entries) > MAX_NACK_ENTRIES:
            # Oldest frames first (from_missing sorts): the rest wait for the next NACK.
            nack = VideoNack(nack.entries[:MAX_NACK_ENTRIES])
        for entry in nack.entries:
            keys = (
                [(entry.frame_id, NACK_WHOLE_FRAME)]
                if entry.whole
                else [(entry.frame_id, i) for i in entry.fragments()]
            )
            for key in keys:
                t = self._tracked[key]
                t.nacks += 1
                t.last = now
                self.fragments_nacked += 1
        self.nacks_sent += 1
        return nack

    def arrived(self, frame_id: int, index: int) -> None:
        """A fragment arrived: if we had asked for it, a retransmission (probably) did it."""
        t = self._tracked.pop((frame_id, index), None)
        whole = self._tracked.pop((frame_id, NACK_WHOLE_FRAME), None)
        if (t is not None and t.nacks) or (whole is not None and whole.nacks):
            self.recovered += 1

    def statistics(self) -> dict[str, Any]:
        return {
            "nacks_sent": self.nacks_sent,
            "fragments_nacked": self.fragments_nacked,
            "nack_recovered": self.recovered,
        }


@dataclass(frozen=True)
class RetransmitConfig:
    """Tuning of the sender's fragment history; times in seconds."""

    #: Fragments are kept this long after they were sent (a NACK for an older one
    #: could not arrive within any receiver's deadline anyway) ...
    #: Not sized by the RTT (as max(0.5 s, 2 RTT), say), on purpose: a receiver gives a
    #: missing frame up NackConfig.max_deadline (0.4 s) after a later one is complete,
    #: so a fragment resent more than ~0.45 s after it first went out reaches it too
    #: late at any RTT; over an RTT of ~0.4 s no resend plays and keyframe requests do
    #: the work. (Seen: 0.8-1.45 s of RTT on a starved test process, tests/test_media_
    #: call.py's NACK test; fragments kept longer would have been resent for nothing.)
    max_age: float = 0.5
    #: ... and this many at most (30 fps x ~4 datagrams x 0.5 s is ~60; keyframes more).
    max_fragments: int = 512
    #: Retransmitted bytes earned per original video byte sent.
    budget_fraction: float = 0.2
    #: The unspent budget is capped at this many bytes.
    burst_bytes: int = 24_000
    #: Resends of one fragment at most, whatever the NACKs say (a receiver asks up to
    #: NackConfig.max_nacks = 3 times).
    max_resends: int = 3

    def __post_init__(self) -> None:
        if self.max_age <= 0 or self.max_fragments < 1 or self.max_resends < 1:
            raise UsageError("max_age, max_fragments and max_resends must be positive")
        if not 0 <= self.budget_fraction <= 1 or self.burst_bytes < 0:
            raise UsageError("budget_fraction is in 0..1 and burst_bytes >= 0")


@dataclass
class _Sent:
    datagram: bytes
    at: float
    count: int
    resends: int = 0
    nacked: bool = False


@dataclass
class RetransmitHistory:
    """The sender's recent video fragments, resent on NACK. See the module docstring."""

    config: RetransmitConfig = field(default_factory=RetransmitConfig)

    def __post_init__(self) -> None:
        #: (frame id, index) -> the datagram, in the order sent.
        self._sent: OrderedDict[FragmentKey, _Sent] = OrderedDict()
        self._budget = 0.0
        self.original_bytes = 0
        self.resent = 0
        self.resent_bytes = 0
        self.unknown = 0
        self.over_budget = 0
        #: Fragments we hold that a NACK named, each counted once: the peer's view of
        #: our video loss (p2pd/media/ratecontrol.py's SendLossMeter).
        self.first_nacked = 0

    def sent(self, fragment: VideoFragment, datagram: bytes, now: float) -> None:
        """An original fragment went out as ``datagram``."""
        c = self.config
        key = (fragment.frame_id, fragment.index)
        self._sent.pop(key, None)
        self._sent[key] = _Sent(datagram, now, fragment.count)
        self.original_bytes += len(datagram)
        self._budget = min(float(c.burst_bytes), self._budget + c.budget_fraction * len(datagram))
        self._expire(now)

    def nacked(self, nack: VideoNack, now: float) -> list[bytes]:
        """The datagrams to send again for ``nack``: each named fragment we still hold,
        once, within the budget; oldest frames first."""
        self._expire(now)
        keys: list[FragmentKey] = []
        for entry in nack.entries:
            if entry.whole:
                # Fragments leave the history in the order sent: if the first is gone,
                # so is the rest of the frame (or nearly: not worth a resend then).
                first = self._sent.get((entry.frame_id, 0))
                if first is None:
                    self.unknown += 1
                    continue
                keys.extend((entry.frame_id, i) for i in range(first.count))
            else:
                keys.extend((entry.frame_id, i) for i in entry.fragments())
        out: list[bytes] = []
        for key in dict.fromkeys(keys):  # once per NACK, in order
            held = self._sent.get(key)
            if held is None:
                self.unknown += 1
                continue
            if not held.nacked:
                held.nacked = True
                self.first_nacked += 1
            if held.resends >= self.config.max_resends:
                continue
            if len(held.datagram) > self._budget:
                self.over_budget += 1
                continue
            self._budget -= len(held.datagram)
            held.resends += 1
            self.resent += 1
            self.resent_bytes += len(held.datagram)
            out.append(held.datagram)
        return out

    def _expire(self, now: float) -> None:
        c = self.config
        while self._sent:
            key, oldest = next(iter(self._sent.items()))
            if len(self._sent) <= c.max_fragments and now - oldest.at <= c.max_age:
                break
            del self._sent[key]

    def __len__(self) -> int:
        return len(self._sent)

    def statistics(self) -> dict[str, Any]:
        return {
            "video_retransmitted": self.resent,
            "video_retransmitted_bytes": self.resent_bytes,
            "video_retransmit_unknown": self.unknown,
            "video_retransmit_over_budget": self.over_budget,
        }
