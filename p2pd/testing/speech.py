"""A deterministic speech-like test signal, for call tests and scripts/bench_call.py.

No speech recording ships with p2pd, and espeak-ng (what the benchmark prefers) is not on
every machine; tests need a signal that makes Opus behave as it does on speech, which a
steady tone does not: libopus's voice activity detector stops calling a steady sine
active after about 0.7 s, and from then on it puts no in-band FEC (LBRR) in its packets
(p2pd/media/codecs.py), so a tone cannot show whether FEC works.

:func:`speech_like` makes syllables of voiced harmonics (a gliding pitch) shaped by the
formants of a few vowels under a raised-cosine envelope, some noise bursts (fricatives)
and pauses between words: an envelope and a spectrum that move as speech does. It is
not speech: PESQ is calibrated on real speech only, so its scores of this signal are
for comparing paths with each other, not absolute.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["speech_like", "write_wav"]

SAMPLE_RATE = 48000

#: (F1, F2, F3) of a few vowels, Hz (Peterson & Barney, adult averages).
_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480))


def speech_like(rng: np.random.Generator, *, f0: float, seconds: float) -> npt.NDArray[np.int16]:
    """48 kHz mono int16, peak at half of full scale: syllables of 120-300 ms, a pause
    of 100-400 ms after about one in four. The same ``rng`` state gives the same
    samples."""
    out: list[npt.NDArray[np.float64]] = []
    total = int(seconds * SAMPLE_RATE)
    produced = 0
    while produced < total:  # bounded: every pass adds at least one syllable
        n = int(rng.uniform(0.12, 0.3) * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        pitch = f0 * (1 + 0.15 * rng.uniform(-1, 1) + 0.1 * t / t[-1])
        phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
        formants = _VOWELS[rng.integers(len(_VOWELS))]
        voiced = np.zeros(n)
        for k in range(1, int(7000 / f0)):
            freq = k * pitch.mean()
            gain = sum(1 / (1 + ((freq - f) / (0.1 * f + 60)) ** 2) for f in formants) / k**0.5
            voiced += gain * np.sin(k * phase)
        syllable = voiced * np.sin(np.pi * t / t[-1]) ** 2
        if rng.random() < 0.3:  # a fricative
            syllable[: n // 4] += rng.normal(0, 0.15, n // 4)
        out.append(syllable)
        produced += n
        if rng.random() < 0.25:  # a pause between words
            out.append(np.zeros(int(rng.uniform(0.1, 0.4) * SAMPLE_RATE)))
            produced += out[-1].size
    x = np.concatenate(out)[:total]
    pcm: npt.NDArray[np.int16] = (x / np.abs(x).max() * 0.5 * 32767).astype(np.int16)
    return pcm


def write_wav(path: Path, pcm: npt.NDArray[np.int16], rate: int = SAMPLE_RATE) -> None:
    """``pcm`` as a mono 16-bit WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())
