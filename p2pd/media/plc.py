"""A floor under Opus's packet loss concealment (sans-I/O, numpy only).

libopus conceals a lost frame well while its voice activity detector calls the signal
active. Once it calls it inactive (a steady tone does after about 0.7 s, see
:mod:`p2pd.media.codecs`) it conceals with a low, noise-like signal: measured on a 440 Hz
tone at -10 dBFS, -15 dB on the first lost frame and down to -47 dB within two, an
audible hole. :class:`ConcealmentFloor` keeps what libopus made whenever it holds at
least half the energy expected, and otherwise replaces it by the last good frame's final
pitch period, repeated (ITU-T G.711 Appendix I's idea) at the expected energy: the last
good frame's, then 0.8x per further lost frame, and nothing after ``max_frames``. The
first ``crossfade`` samples after the loss blend the repetition into the decoder's output,
so the return to real audio does not click.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["ConcealmentFloor", "Loudness"]

Pcm = npt.NDArray[np.int16]


def _rms(x: npt.NDArray[np.float64]) -> float:
    return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


class ConcealmentFloor:
    """Feed every played frame through :meth:`good` or :meth:`conceal`."""

    def __init__(
        self,
        frame_samples: int = 960,
        *,
        min_period: int = 32,
        max_frames: int = 15,
        decay: float = 0.8,
        crossfade: int = 120,
    ) -> None:
        self.frame_samples = frame_samples
        self.min_period = min_period
        self.max_frames = max_frames
        self.decay = decay
        self.crossfade = crossfade
        self._last: npt.NDArray[np.float64] | None = None
        self._last_rms = 0.0
        self._period: npt.NDArray[np.float64] | None = None
        self._phase = 0
        self._run = 0
        self._synthesized = False
        #: Frames whose libopus concealment was replaced.
        self.replaced = 0

    def good(self, pcm: Pcm) -> Pcm:
        """A frame decoded from real data; returns it (its start blended after a loss)."""
        x = pcm.astype(np.float64)
        if self._synthesized and self._period is not None:
            n = min(self.crossfade, x.size)
            tail = self._continue(n) * self._gain(self._run + 1)
            ramp = np.linspace(0.0, 1.0, n, endpoint=False)
            x[:n] = x[:n] * ramp + tail * (1.0 - ramp)
            pcm = np.clip(x, -32768, 32767).astype(np.int16)
        self._last = x
        self._last_rms = _rms(x)
        self._period = None
        self._run = 0
        self._synthesized = False
        return pcm

    def conceal(self, plc: Pcm) -> Pcm:
        """A concealed frame from the decoder; returns it or its replacement."""
        self._run += 1
        gain = self._gain(self._run)
        expected = self._last_rms * gain
        if self._last is None or expected < 1.0 or _rms(plc.astype(np.float64)) >= 0.5 * expected:
            self._synthesized = False
            return plc
        if self._period is None:
            self._period = self._pitch_period(self._last)
            self._phase = 0
        out = self._continue(self.frame_samples)
        level = _rms(self._period)
        if level > 0:
            out = out * (expected / level)
        self._synthesized = True
        self.replaced += 1
        return np.clip(out, -32768, 32767).astype(np.int16)

    def _gain(self, run: int) -> float:
        if run > self.max_frames:
            return 0.0
        return float(self.decay ** max(0, run - 1))

    def _continue(self, n: int) -> npt.NDArray[np.float64]:
        assert self._period is not None
        period = self._period
        idx = (self._phase + np.arange(n)) % period.size
        self._phase = int((self._phase + n) % period.size)
        return period[idx]

    def _pitch_period(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The last pitch period of ``x`` (autocorrelation peak), as a loop that picks up
        where ``x`` ends."""
        n = x.size
        max_lag = n // 2
        if max_lag <= self.min_period:
            return x.copy()
        seg = x - x.mean()
        spectrum = np.fft.rfft(seg, 2 * n)
        corr = np.fft.irfft(spectrum * np.conj(spectrum))[: max_lag + 1]
        lag = self.min_period + int(np.argmax(corr[self.min_period : max_lag + 1]))
        # The period ends with the frame's last sample, so repeating it from its start
        # continues the waveform.
        return x[n - lag :].copy()


class Loudness:
    """Whether a played frame is quiet: 20 dB under the recent speech level (a peak of
    frame energies that decays 20 dB in about 9 s), or nearly silent. The jitter buffer
    stretches and drops frames only after a quiet one, in a pause."""

    #: Per-frame decay of the peak energy (0.99 ** 458 = 0.01: -20 dB in ~9 s).
    DECAY = 0.99
    #: Quiet: under this fraction of the peak energy (-20 dB) ...
    RELATIVE = 0.01
    #: ... or under this mean square (an RMS of 10 of 32767: -70 dBFS).
    FLOOR = 100.0

    def __init__(self) -> None:
        self._peak = 0.0

    def quiet(self, pcm: Pcm) -> bool:
        x = pcm.astype(np.float64)
        energy = float(np.dot(x, x)) / max(1, x.size)
        self._peak = max(energy, self._peak * self.DECAY)
        return bool(energy <= max(self.RELATIVE * self._peak, self.FLOOR))
