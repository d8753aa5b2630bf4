"""A file transfer yields to messages and calls: LEDBAT's idea (RFC 6817) applied to how
much of a file a QUIC stream may have written and not yet acknowledged.

Why: QUIC's congestion control (Reno in aioquic) grows its window until a packet is lost.
On a path whose bottleneck is the receiver itself (loopback, a LAN: the receiving daemon
decrypts and hashes slower than the sender writes) that loss comes only once the
receiver's UDP queue is full, and a DM or a call's audio then waits behind a megabyte of
file data (measured: a DM during a transfer p50 156 ms against 16 ms idle).

What: the round-trip time a transfer sees, less the lowest seen recently (the path's own
delay), is the queue the transfer built. Keep it near ``target`` (25 ms by default): the
stream's allowed backlog grows while the queue is shorter and shrinks while it is longer,
between ``floor`` and ``ceiling``. A lone transfer still keeps the path busy (the queue
never runs dry at the target); anything else on the connection waits at most about
``target`` behind it.

Sans-I/O: :meth:`Scavenger.update` takes ``now`` and the latest RTT sample, returns the
backlog allowed. ``tests/test_files_scavenger.py`` drives it with a model queue.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

#: Queueing delay a transfer aims at (seconds): what a DM may wait behind it.
TARGET = 0.025
#: The path's own delay is the lowest RTT of the last BASE_HISTORY intervals of
#: BASE_INTERVAL seconds (RFC 6817 section 3.4.2 keeps 10 one-minute minima; a route
#: that changes to a slower one is learnt within that time).
BASE_INTERVAL = 60.0
BASE_HISTORY = 10
#: The window changes at most once per this many seconds or per RTT, whichever is longer.
MIN_STEP = 0.005
#: Most the window grows (x1.25) or shrinks (x0.75) in one step (0.5 oscillated on a
#: 2 Mbit/s, 80 ms model link: tests/test_files_scavenger.py).
GAIN = 0.25


@dataclass
class Scavenger:
    """The backlog a bulk stream may have: see the module's docstring."""

    floor: int
    ceiling: int
    target: float = TARGET
    window: int = 0
    _minima: deque[tuple[float, float]] = field(default_factory=deque)  # (start, min rtt)
    _stepped: float = -math.inf
    queue_delay: float = 0.0  # the last estimate, for statistics

    def __post_init__(self) -> None:
        if not 0 < self.floor <= self.ceiling:
            raise ValueError("need 0 < floor <= ceiling")
        if not self.target > 0:
            raise ValueError("target must be positive")
        self.window = self.window or self.floor

    def base_delay(self) -> float:
        return min((m for _, m in self._minima), default=math.inf)

    def update(self, now: float, rtt: float | None) -> int:
        """The backlog allowed now, given the connection's latest RTT sample (seconds;
        None or not positive: none yet, the window stays)."""
        if rtt is None or not rtt > 0 or not math.isfinite(rtt):
            return self.window
        if not self._minima or now - self._minima[-1][0] >= BASE_INTERVAL:
            self._minima.append((now, rtt))
            while len(self._minima) > BASE_HISTORY:
                self._minima.popleft()
        elif rtt < self._minima[-1][1]:
            self._minima[-1] = (self._minima[-1][0], rtt)
        base = self.base_delay()
        if now - self._stepped < max(MIN_STEP, base):
            return self.window
        self._stepped = now
        self.queue_delay = max(0.0, rtt - base)
        # +1 with no queue, 0 at the target, -1 at twice the target or more
        off_target = max(-1.0, (self.target - self.queue_delay) / self.target)
        scaled = self.window * (1.0 + GAIN * off_target)
        self.window = int(min(self.ceiling, max(self.floor, scaled)))
        return self.window
