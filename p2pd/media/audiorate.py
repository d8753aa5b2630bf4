"""The Opus settings that follow the loss the peer reports (sans-I/O).

:class:`AudioRateController` takes the share of our datagrams the peer missed, one value
per receiver report (:class:`~p2pd.media.ratecontrol.SendLossMeter`, which the video
bitrate uses too), and says which Opus settings the encoder should have:

- **In-band FEC and its expected loss.** libopus sizes its LBRR (the low-bitrate copy of
  the previous frame that ``decode_fec`` rebuilds a lost frame from) by the
  ``packet_loss`` percentage it is told, and takes those bits from the frame's own
  coding. So: FEC on at ``packet_loss`` = the recent loss rounded up to
  ``packet_loss_step`` (at least one step, at most ``packet_loss_max``) while reports
  show loss; off (``packet_loss`` 0) once ``clean_hold`` seconds passed with every
  report under ``loss_on``: a clean path gets every bit for the frame itself
  (the codec alone as scripts/_call_audio.py's codec_only runs it, 48 kbit/s,
  espeak-ng speech, 0 % loss: wideband PESQ 4.22 without FEC, 4.15 / 4.13 / 4.06 with
  it planned for 5 / 10 / 20 %).
  A call starts with FEC planned for ``MediaConfig.opus_packet_loss`` (10 %), as calls
  did before adaptation: started without, a lossy call lost its first second's FEC
  (the first report comes 0.5 s in, the switch up to 0.2 s later), and in
  scripts/bench_call.py's 10 %-loss calls frames rebuilt from FEC fell from 16 to 6.
- **Bitrate.** The configured bitrate (the ceiling) while loss stays under
  ``cut_loss``; over it, loss that heavy is more likely a full queue than random drops,
  so the bitrate comes down to ``ceiling * (1 - (loss - cut_loss) * cut_slope)``, never
  under ``floor_bps``.

"Recent loss" is the mean of the reports of the last ``window`` seconds: one
interval's count over ~25 packets is noisy (at 5 % loss, a quarter of 0.5 s intervals
show none, and at 10 % the largest of ten is often 20-25 %: planning FEC for that costs
quality, see below), and protection that drops at the first lucky interval comes back a
second later at the price of two encoder switches. FEC goes off only after
``clean_hold`` without a single lossy report.

Measured through the codec alone with redundant copies (what a call sends under loss),
FEC planned for 5 / 10 / 20 %: 4.14 / 4.12 / 4.05 at 5 % loss, 3.96 / 3.95 / 3.89 at
10 %; without FEC 3.98 and 3.61. So planning for more loss than there is costs, and
the expected loss is the measured one rounded up to a step, not more.

A change means a new encoder: PyAV 18.1 / FFmpeg 62's libopus wrapper reads ``fec``,
``packet_loss`` and ``bit_rate`` only when the encoder opens, as its libvpx wrapper does
(p2pd/media/ratecontrol.py). So :meth:`AudioRateController.wanted` asks for one at most
every ``more_interval`` seconds towards more protection (FEC on, more expected loss, a
lower bitrate) and every ``less_interval`` back towards less, and only for a change in a
setting (rounded values, so noise within a step switches nothing).
p2pd/media/audioswitch.py opens it in a worker thread and puts it in in a pause.

What a hostile peer can do with its reports: claim loss, which turns our FEC on at up to
``packet_loss_max`` % and lowers our bitrate, never under ``floor_bps``; claim none, which
turns FEC off after ``clean_hold`` (then its own losses are concealed: its problem).
Every input is clamped (a loss fraction to 0..1, a NaN ignored); switches are paced by
time, so a flood of reports moves nothing faster than a report per interval would.
tests/test_media_audiorate.py runs these on ``now``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

__all__ = ["AudioRateConfig", "AudioRateController", "OpusSettings"]


@dataclass(frozen=True, slots=True)
class OpusSettings:
    """What an Opus encoder is opened with."""

    bitrate: int
    fec: bool
    #: The loss (percent) libopus plans its in-band FEC for; 0 when FEC is off.
    packet_loss: int


@dataclass(frozen=True)
class AudioRateConfig:
    """Tuning of the Opus adaptation; rates in bit/s, times in seconds, losses as
    fractions. The ceiling is ``MediaConfig.audio_bitrate``."""

    #: Never under this, whatever the reports say (wideband speech stays intelligible).
    floor_bps: int = 24_000
    #: How a call starts: FEC on, planned for ``start_packet_loss`` % (CallMedia sets it
    #: to ``MediaConfig.opus_packet_loss``); False: off.
    start_fec: bool = True
    start_packet_loss: int = 10
    #: Recent loss: the mean of the reports of this long.
    window: float = 5.0
    #: A report over this counts as loss (FEC on, the clean clock restarts).
    loss_on: float = 0.005
    #: FEC goes off once no report showed loss for this long.
    clean_hold: float = 10.0
    #: ``packet_loss`` in steps of this (percent), at most ``packet_loss_max``.
    packet_loss_step: int = 5
    packet_loss_max: int = 30
    #: Loss over ``cut_loss`` lowers the bitrate by ``cut_slope`` times the excess.
    cut_loss: float = 0.20
    cut_slope: float = 2.0
    #: New settings at most this often towards more protection, and towards less.
    more_interval: float = 1.0
    less_interval: float = 5.0

    def __post_init__(self) -> None:
        if not 6_000 <= self.floor_bps <= 510_000:
            raise UsageError("the Opus bitrate floor must be 6..510 kbit/s")
        if not 0 < self.packet_loss_step <= self.packet_loss_max <= 100:
            raise UsageError("need 0 < packet_loss_step <= packet_loss_max <= 100")
        if not 0 <= self.start_packet_loss <= 100:
            raise UsageError("start_packet_loss is a percentage")
        if not 0 <= self.loss_on <= self.cut_loss <= 1 or self.cut_slope < 0:
            raise UsageError("need 0 <= loss_on <= cut_loss <= 1 and cut_slope >= 0")
        if min(self.window, self.clean_hold, self.more_interval, self.less_interval) < 0:
            raise UsageError("times must be >= 0")


class AudioRateController:
    """Loss reports in, Opus settings out. See the module docstring."""

    #: Reports kept at most (0.5 s apart, a window of 5 s holds 10).
    MAX_REPORTS = 64

    def __init__(self, config: AudioRateConfig, *, ceiling: int) -> None:
        if not 6_000 <= ceiling <= 510_000:
            raise UsageError("Opus bitrate must be 6..510 kbit/s")
        self.config = config
        self.ceiling = ceiling
        #: A configured bitrate under the floor is kept as it is.
        self.floor = min(config.floor_bps, ceiling)
        c = config
        self.current = OpusSettings(
            ceiling, c.start_fec, min(c.start_packet_loss, c.packet_loss_max) if c.start_fec else 0
        )
        #: (time, loss) of the reports of the last ``window`` seconds, and their sum.
        self._recent: deque[tuple[float, float]] = deque()
        self._sum = 0.0
        self._last_loss: float | None = None  # when a report last showed loss
        self._started: float | None = None
        self._last_switch = -math.inf
        self.switches = 0
        self.reports = 0

    def report(self, now: float, loss: float | None) -> None:
        """A receiver report at ``now`` with ``loss`` over its interval (0..1; None: too
        few packets to say)."""
        if self._started is None:
            self._started = now
        if loss is None or not math.isfinite(loss):
            return
        loss = min(max(loss, 0.0), 1.0)
        self.reports += 1
        self._recent.append((now, loss))
        self._sum += loss
        # Bounded however fast reports come (a flood at one instant).
        while len(self._recent) > self.MAX_REPORTS:
            self._sum -= self._recent.popleft()[1]
        if loss > self.config.loss_on:
            self._last_loss = now if self._last_loss is None else max(now, self._last_loss)

    def recent_loss(self, now: float) -> float:
        """The mean loss reported in the last ``window`` seconds (0 if none)."""
        while self._recent and self._recent[0][0] < now - self.config.window:
            self._sum -= self._recent.popleft()[1]
        if not self._recent:
            self._sum = 0.0
            return 0.0
        return min(1.0, max(0.0, self._sum / len(self._recent)))

    def target(self, now: float) -> OpusSettings:
        """The settings the reports ask for at ``now``, switching paces aside."""
        c = self.config
        loss = self.recent_loss(now)
        last = self._last_loss if self._last_loss is not None else self._started
        since_loss = now - (last if last is not None else now)
        # FEC comes on at the first lossy report (the mean of a window that was clean
        # rises slowly); its planned loss follows the mean.
        lossy = self._last_loss is not None and now - self._last_loss < c.window
        if lossy or loss > c.loss_on:
            steps = math.ceil(loss * 100 / c.packet_loss_step - 1e-9)
            fec, packet_loss = True, min(c.packet_loss_max, max(1, steps) * c.packet_loss_step)
        elif self._started is not None and since_loss >= c.clean_hold:
            fec, packet_loss = False, 0
        else:  # no loss seen lately, not for long enough: keep what we have
            fec, packet_loss = self.current.fec, self.current.packet_loss
        bitrate = self.ceiling
        if loss > c.cut_loss:
            bitrate = round(self.ceiling * (1 - (loss - c.cut_loss) * c.cut_slope))
        bitrate = min(self.ceiling, max(self.floor, bitrate))
        # Whole kbit/s: a change of a few bit/s is no reason for a new encoder.
        bitrate = min(self.ceiling, max(self.floor, 1000 * round(bitrate / 1000)))
        return OpusSettings(bitrate, fec, packet_loss)

    def wanted(self, now: float) -> OpusSettings | None:
        """New settings to open an encoder with at ``now``, or None to keep the current
        ones. Once the new encoder is in, call :meth:`switched`."""
        target = self.target(now)
        if target == self.current:
            return None
        more = (
            (target.fec and not self.current.fec)
            or target.packet_loss > self.current.packet_loss
            or target.bitrate < self.current.bitrate
        )
        interval = self.config.more_interval if more else self.config.less_interval
        if now - self._last_switch < interval:
            return None
        return target

    def switched(self, now: float, settings: OpusSettings) -> None:
        """An encoder with ``settings`` is in use from ``now``."""
        self.current = settings
        self._last_switch = now
        self.switches += 1

    def statistics(self) -> dict[str, Any]:
        s = self.current
        return {
            "audio_encoder_kbps": round(s.bitrate / 1000, 1),
            "audio_fec": s.fec,
            "audio_fec_packet_loss_pct": s.packet_loss,
            "audio_encoder_switches": self.switches,
        }
