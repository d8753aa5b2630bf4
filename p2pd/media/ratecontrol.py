"""The video bitrate that follows the measured loss and round-trip time (sans-I/O).

Three small parts, one per question, none reading a clock (every call takes ``now``):

- :class:`SendLossMeter`: what share of *our* datagrams the peer missed over the last
  report interval. From what the wire already carries: the peer's receiver report
  (kind 0x13) has the RFC 3550 "fraction lost" of our audio over its interval, and its
  NACKs (kind 0x16) name our video fragments it missed (each counted the first time
  only, by :class:`~p2pd.media.nack.RetransmitHistory`, and only if we sent it). Audio
  and video share one QUIC connection, so both sample the same path, and a datagram
  that our own congestion window held back until the queue overflowed is a loss to the
  peer too.
- :class:`VideoRateController`: the target bitrate, as GCC's loss-based controller
  (draft-ietf-rmcat-gcc-02 section 6) with a delay signal from the reports' RTT: loss
  over ``loss_high`` (10 %) cuts the target to ``(1 - loss / 2)`` of itself; an RTT that
  stays ``rtt_margin`` (and ``rtt_ratio`` of the base) over the smallest RTT of the last
  ``rtt_window`` seconds (queues building, here mostly datagrams waiting for the QUIC
  congestion window) cuts it to ``delay_decrease`` (0.85, deeper for a longer queue);
  a datagram our own congestion window's queue dropped, or more than ``queue_limit``
  waiting in it (:meth:`local_queue`, local facts) cut it to ``local_drop_decrease``
  (0.7); loss under ``loss_low`` (2 %) and no queue let it grow, additively
  (``additive_bps`` a second) for ``additive_hold`` after a cut, where the path's limit
  was just found, else by ``increase_per_s`` (8 %) a second; in between it holds. Always
  within
  [``floor_bps``, ceiling].
- :meth:`VideoRateController.encoder_bitrate`: when the encoder should take a new
  target. libvpx through FFmpeg cannot change its bitrate once open (PyAV 18.1 / FFmpeg
  62: setting ``bit_rate`` on the open context changes nothing, measured), so a new
  target means a new encoder, whose first frame is a keyframe (~4-5 KB at 640x480
  against ~1-2 KB for a delta frame, ~6 ms to open). So it changes only by a step worth
  that (``switch_step``, 15 %), not more often than ``switch_down_interval`` (down) or
  ``switch_up_interval`` (up), and sooner when a keyframe is due anyway (the peer
  asked for one).

What a hostile peer can do with its reports and NACKs: claim loss or delay its echoes,
which lowers *our* video bitrate, never under ``floor_bps``; claim no loss, which lets
it grow at the clean-path pace, never over the ceiling (our configured bitrate). Cuts
come at most once per ``min_decrease_interval`` and growth is by elapsed time, so a
flood of reports moves nothing faster than one report per interval would. Every
input is clamped (a loss fraction to 0..1, a gap between reports to 2 s, an RTT to
0..60 s) before it is used. tests/test_media_ratecontrol.py runs these.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .wire import ReportBlock

__all__ = ["RateConfig", "SendLossMeter", "VideoRateController"]


@dataclass(frozen=True)
class RateConfig:
    """Tuning of the video bitrate's adaptation; rates in bit/s, times in seconds. The
    ceiling is ``MediaConfig.video_bitrate``."""

    #: Never under this: 640x480 testsrc needs ~200 kbit/s even at libvpx's coarsest
    #: quantizer (measured: a 100 kbit/s target gave 218), so lower would only be a
    #: number.
    floor_bps: int = 150_000
    #: Where a call starts (within [floor, ceiling]), as GCC starts at 300 kbit/s: the
    #: path's capacity is not known yet, and overshooting it fills our QUIC congestion
    #: window's queue within the first second (measured at 10 % loss through
    #: aioquic's NewReno: a window of 3-7 KB, 64 datagrams queued, reports 1.3 s late),
    #: while growing to an 800 kbit/s ceiling on a clean path takes ~13 s.
    start_bps: int = 300_000
    #: Loss over this (a fraction) cuts the target to (1 - loss / 2) of itself (GCC).
    loss_high: float = 0.10
    #: Loss under this (and no queue) lets the target grow (GCC: 2 %).
    loss_low: float = 0.02
    #: Growth far from the last cut: this fraction a second (GCC's 1.05 per ~1 s report,
    #: a little faster since ours come every 0.5 s and growth is by elapsed time).
    increase_per_s: float = 0.08
    #: Growth within ``additive_hold`` of a cut: this many bit/s a second.
    additive_bps: int = 40_000
    additive_hold: float = 10.0
    #: A queue: the RTT over the window's smallest by both this (seconds) ...
    rtt_margin: float = 0.02
    #: ... and this share of the smallest, in ``overuse_reports`` reports in a row (one
    #: stalled thread on a loaded machine makes one late report, not two).
    rtt_ratio: float = 0.5
    overuse_reports: int = 2
    rtt_window: float = 10.0
    #: A queue cuts the target to this share of itself, or, when the RTT stands more
    #: than 0.15 s over its base, to (1 - excess / 1 s) of itself (a queue of ``excess``
    #: seconds drains within a second), but not under ``max_decrease``.
    delay_decrease: float = 0.85
    max_decrease: float = 0.5
    #: Datagrams our own QUIC congestion window held back until its queue was full
    #: (``QuicConfig.max_pending_datagrams``, 64) and dropped, or more than
    #: ``queue_limit`` of them waiting at a video frame's tick (~19 KB: 0.2 s at 800
    #: kbit/s): the connection carries less than we send, and a full queue drops. Cut to
    #: this share of itself. Local facts, seen a report interval or more before the
    #: peer's RTT shows the queue.
    local_drop_decrease: float = 0.7
    queue_limit: int = 16
    #: Cuts at most this often, however many reports say so.
    min_decrease_interval: float = 0.3
    #: Reports further apart than this count as this far apart (a pause in reports is
    #: no evidence of a clean path).
    max_report_gap: float = 2.0
    #: A report interval with fewer datagrams than this says nothing about loss.
    min_samples: int = 10
    #: The encoder takes a new target when it differs from the one it has by this share
    #: (a new encoder costs a keyframe) ...
    switch_step: float = 0.15
    #: ... at most this often going down, and going up ...
    switch_down_interval: float = 0.5
    switch_up_interval: float = 4.0
    #: ... or by this share when a keyframe is due anyway, then at most this often.
    keyframe_switch_step: float = 0.05
    keyframe_switch_interval: float = 0.5

    def __post_init__(self) -> None:
        if self.floor_bps < 10_000:
            raise UsageError("the video bitrate floor is at least 10 kbit/s")
        if not 0 <= self.loss_low <= self.loss_high <= 1:
            raise UsageError("need 0 <= loss_low <= loss_high <= 1")
        if not 0 < self.max_decrease <= self.delay_decrease < 1:
            raise UsageError("need 0 < max_decrease <= delay_decrease < 1")
        if not 0 < self.local_drop_decrease < 1:
            raise UsageError("local_drop_decrease is a share, in (0, 1)")
        if self.overuse_reports < 1 or self.min_samples < 1:
            raise UsageError("overuse_reports and min_samples must be positive")


class SendLossMeter:
    """The share of our datagrams the peer missed, per receiver report. See the module
    docstring."""

    #: An interval's audio packets counted at most (the report block's extended highest
    #: sequence number moved by more than this: a jump, a wrap or a lie).
    MAX_AUDIO_PER_REPORT = 500

    def __init__(self, min_samples: int = 10) -> None:
        self.min_samples = min_samples
        self._audio_highest: int | None = None
        self._fragments_sent = 0
        self._nacked_seen: int | None = None
        self.last: float | None = None

    def fragments_sent(self, count: int) -> None:
        """We sent ``count`` original video fragments."""
        self._fragments_sent += max(0, count)

    def report(self, audio: ReportBlock, nacked_total: int) -> float | None:
        """A receiver report came with ``audio`` (the peer's view of our audio), and the
        fragments NACKed so far (first NACKs only: ``RetransmitHistory.first_nacked``).
        Returns the loss over the interval since the last report (0..1), or None when
        fewer than ``RateConfig.min_samples`` datagrams say anything."""
        expected = 0
        if audio.highest_seq or audio.cumulative_lost:
            if self._audio_highest is not None:
                moved = (audio.highest_seq - self._audio_highest) % (1 << 32)
                expected = moved if moved <= self.MAX_AUDIO_PER_REPORT else 0
            self._audio_highest = audio.highest_seq
        audio_lost = audio.loss_fraction * expected
        nacked = 0
        if self._nacked_seen is not None:
            nacked = max(0, nacked_total - self._nacked_seen)
        self._nacked_seen = nacked_total
        sent, self._fragments_sent = self._fragments_sent, 0
        # NACKs in this interval can name fragments sent in the last one: never more
        # lost than sent.
        video_lost = min(nacked, sent)
        total = expected + sent
        if total < self.min_samples:
            return None
        self.last = min(1.0, (audio_lost + video_lost) / total)
        return self.last


class VideoRateController:
    """The video target bitrate. See the module docstring."""

    def __init__(self, config: RateConfig, *, ceiling: int) -> None:
        if ceiling <= 0:
            raise UsageError("the video bitrate must be positive")
        self.config = config
        self.ceiling = ceiling
        #: A configured bitrate under the floor is kept as it is.
        self.floor = min(config.floor_bps, ceiling)
        self.target = float(min(ceiling, max(self.floor, config.start_bps)))
        self._last_report: float | None = None
        self._last_decrease = -math.inf
        self._last_switch = -math.inf
        #: (time, rtt) of recent reports, the window's minimum at the front (a monotonic
        #: deque: each new sample drops the larger ones before it).
        self._rtts: deque[tuple[float, float]] = deque()
        self._overuse = 0
        self._excess = 0.0
        self._drops_seen = 0
        self.decreases_loss = 0
        self.decreases_delay = 0
        self.decreases_local = 0
        self.switches = 0

    @property
    def base_rtt(self) -> float | None:
        """The smallest RTT of the last ``rtt_window`` seconds."""
        return self._rtts[0][1] if self._rtts else None

    def report(self, now: float, loss: float | None, rtt: float | None) -> float:
        """A receiver report at ``now``: ``loss`` over its interval (0..1, or None: not
        known), the RTT it measured (seconds, or None). Returns the new target."""
        c = self.config
        gap = 0.0 if self._last_report is None else now - self._last_report
        gap = min(max(gap, 0.0), c.max_report_gap)
        self._last_report = now if self._last_report is None else max(now, self._last_report)
        if loss is not None:
            loss = min(max(loss, 0.0), 1.0) if math.isfinite(loss) else None
        queue = self._queue(now, rtt)
        if loss is not None and loss > c.loss_high:
            if self._may_decrease(now):
                self._set(self.target * (1 - loss / 2))
                self.decreases_loss += 1
        elif queue:
            if self._may_decrease(now):
                factor = min(c.delay_decrease, max(c.max_decrease, 1 - self._excess))
                self._set(self.target * factor)
                self.decreases_delay += 1
        elif loss is None or loss < c.loss_low:
            if now - self._last_decrease < c.additive_hold:
                self._set(self.target + c.additive_bps * gap)
            else:
                self._set(self.target * (1 + c.increase_per_s) ** gap)
        return self.target

    def _queue(self, now: float, rtt: float | None) -> bool:
        """Take an RTT sample; whether the RTT has stood over the base for
        ``overuse_reports`` reports in a row."""
        c = self.config
        if rtt is None or not math.isfinite(rtt) or not 0 <= rtt <= 60:
            return False
        while self._rtts and self._rtts[0][0] < now - c.rtt_window:
            self._rtts.popleft()
        base = self.base_rtt
        over = base is not None and rtt > base + max(c.rtt_margin, c.rtt_ratio * base)
        self._excess = rtt - base if base is not None else 0.0
        while self._rtts and self._rtts[-1][1] >= rtt:
            self._rtts.pop()
        self._rtts.append((now, rtt))
        self._overuse = self._overuse + 1 if over else 0
        return self._overuse >= c.overuse_reports

    def local_queue(self, now: float, dropped: int, queued: int = 0) -> float:
        """``dropped``: the datagrams our side dropped so far because its QUIC congestion
        window's queue was full; ``queued``: how many wait in it now (local, so to be
        trusted). A new drop, or more than ``queue_limit`` waiting, cuts the target.
        Returns the target."""
        over = dropped > self._drops_seen or queued > self.config.queue_limit
        if over and self._may_decrease(now):
            self._set(self.target * self.config.local_drop_decrease)
            self.decreases_local += 1
        self._drops_seen = max(self._drops_seen, dropped)
        return self.target

    def _may_decrease(self, now: float) -> bool:
        if now - self._last_decrease < self.config.min_decrease_interval:
            return False
        self._last_decrease = now
        return True

    def _set(self, value: float) -> None:
        self.target = min(float(self.ceiling), max(float(self.floor), value))

    def encoder_bitrate(
        self, now: float, current: int, *, keyframe_due: bool = False
    ) -> int | None:
        """The bitrate to open a new encoder at now, or None to keep the one at
        ``current`` (see the module docstring)."""
        c = self.config
        target = round(self.target)
        step = abs(target - current) / max(1, current)
        if step < (c.keyframe_switch_step if keyframe_due else c.switch_step):
            return None
        if keyframe_due:
            interval = c.keyframe_switch_interval
        else:
            interval = c.switch_down_interval if target < current else c.switch_up_interval
        if now - self._last_switch < interval:
            return None
        self._last_switch = now
        self.switches += 1
        return target

    def statistics(self) -> dict[str, Any]:
        return {
            "video_target_kbps": round(self.target / 1000, 1),
            "video_rate_decreases_loss": self.decreases_loss,
            "video_rate_decreases_delay": self.decreases_delay,
            "video_rate_decreases_local": self.decreases_local,
            "video_encoder_switches": self.switches,
        }
