"""Reception statistics of one media stream, as RTP receivers keep them (sans-I/O).

Loss follows RFC 3550 appendix A.3 (expected = highest extended sequence number - first +
1; lost = expected - received; the fraction lost since the last report from the interval
counts) and jitter appendix A.8 (the interarrival jitter ``J += (|D| - J) / 16``, where
``D`` is the difference of two packets' transit times). Audio feeds it one packet per
sequence number; video one *frame* per frame id (a frame is received when it is complete).
"""

from __future__ import annotations

from dataclasses import dataclass

from .jitter import extend
from .wire import U32, ReportBlock

__all__ = ["ReceptionStats", "RttEstimator"]


@dataclass
class ReceptionStats:
    """Counts for one stream; ``clock_rate`` is its timestamps' rate (Hz)."""

    clock_rate: int

    def __post_init__(self) -> None:
        self.received = 0
        self.first: int | None = None
        self.highest: int | None = None
        self._highest_ts: int | None = None
        self._last_transit: float | None = None
        self.jitter = 0.0  # seconds
        self._expected_prior = 0
        self._received_prior = 0

    def packet(self, seq: int, timestamp: int, now: float) -> None:
        """A packet (or a complete frame) arrived at ``now``."""
        ext = extend(seq, self.highest)
        ts = extend(timestamp, self._highest_ts)
        if self.first is None or ext < self.first:
            self.first = ext
        if self.highest is None or ext > self.highest:
            self.highest = ext
            self._highest_ts = ts
        self.received += 1
        transit = now - ts / self.clock_rate
        if self._last_transit is not None:
            d = abs(transit - self._last_transit)
            self.jitter += (d - self.jitter) / 16
        self._last_transit = transit

    @property
    def expected(self) -> int:
        if self.first is None or self.highest is None:
            return 0
        return self.highest - self.first + 1

    @property
    def lost(self) -> int:
        """Packets expected and not received (duplicates can make it negative; clamped)."""
        return max(0, self.expected - self.received)

    @property
    def loss_fraction(self) -> float:
        expected = self.expected
        return self.lost / expected if expected else 0.0

    def report(self) -> ReportBlock:
        """The block for the next receiver report; starts a new interval."""
        if self.highest is None:
            return ReportBlock()
        expected, received = self.expected, self.received
        interval_expected = expected - self._expected_prior
        interval_received = received - self._received_prior
        self._expected_prior, self._received_prior = expected, received
        interval_lost = interval_expected - interval_received
        fraction = 0
        if interval_expected > 0 and interval_lost > 0:
            fraction = min(255, (interval_lost << 8) // interval_expected)
        return ReportBlock(
            fraction_lost=fraction,
            cumulative_lost=min(self.lost, U32),
            highest_seq=self.highest % (U32 + 1),
            jitter_us=min(int(self.jitter * 1e6), U32),
        )


@dataclass
class RttEstimator:
    """Round-trip time from receiver reports' echoes (RFC 3550 section 6.4.1, LSR/DLSR),
    smoothed as RFC 6298 does (alpha 1/8). Times in seconds; wire values are µs mod 2**32."""

    def __post_init__(self) -> None:
        self.latest: float | None = None
        self.smoothed: float | None = None
        self._peer_send_us = 0
        self._peer_received_at: float | None = None

    @staticmethod
    def clock_us(now: float) -> int:
        return int(now * 1e6) % (U32 + 1)

    def report_received(
        self, send_time_us: int, echo_us: int, echo_delay_us: int, now: float
    ) -> None:
        """The peer's report arrived at ``now``: remember it for our echo, and if it echoes
        one of ours, take an RTT sample."""
        self._peer_send_us = send_time_us
        self._peer_received_at = now
        if echo_us == 0 and echo_delay_us == 0:
            return
        rtt_us = (self.clock_us(now) - echo_us - echo_delay_us) % (U32 + 1)
        if rtt_us > 60_000_000:  # more than a minute: a stale or bogus echo
            return
        sample = rtt_us / 1e6
        self.latest = sample
        self.smoothed = (
            sample if self.smoothed is None else self.smoothed + (sample - self.smoothed) / 8
        )

    def echo(self, now: float) -> tuple[int, int]:
        """(echo, delay) for our next report."""
        if self._peer_received_at is None:
            return 0, 0
        delay = int((now - self._peer_received_at) * 1e6)
        return self._peer_send_us, min(max(delay, 0), U32)
