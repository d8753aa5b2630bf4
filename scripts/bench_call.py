#!/usr/bin/env python3
"""Calls on loopback: mouth-to-ear latency, speech quality (PESQ) under loss, CPU per call.

Every call here is two in-process ``QuicEndpoint`` s on 127.0.0.1 and one connection, with
a :class:`~p2pd.media.CallMedia` on each side, as tests/test_media_call.py runs them.

1. **Speech.** espeak-ng synthesises IEEE "Harvard" sentences (list 1), one voice per
   side (``en-us`` and ``en-us+f3``). If espeak-ng is missing or fails, a speech-like
   synthetic signal (voiced harmonics under moving formants, syllable envelopes, pauses)
   stands in and the output says so in capitals. Either way PESQ is used outside its
   calibration: P.862.3 section 7.5 advises against artificial voices (TTS included), so
   read absolute scores as indicative and compare rows with the baseline.
2. **Baseline, same run:** "codec only": each speech stream through the call's own Opus
   encoder and decoder (the libopus decoder, the concealment floor, FEC from the next
   packet when one is lost), no network and no jitter buffer, with the same loss rates
   drawn i.i.d. per packet (``--runs`` patterns per talker): the ceiling a call can
   reach with these settings. Lossy rows come twice: FEC alone, and FEC plus the
   redundancy a call switches on under loss (each datagram carries the previous packet
   again, RFC 2198-style, so the receiver decodes a lost frame from the copy, or from the
   copy's FEC when two in a row are lost). Then the same with other settings, to show
   what the codec allows: no FEC, 32, 48 and 64 kbit/s.
3. **Calls at 0 %, 5 % and 10 % datagram loss** (``--runs`` calls per rate, ``--duration``
   seconds each), through :func:`p2pd.testing.proxy.open_lossy_proxy` (at 0 % too, so every
   rate takes the same path; its loss hits both directions, seed = ``--seed`` + run
   index). Both sides send speech and record WAV, so each call gives two directions.
   Each received recording is cut into chunks of at most 12 s, each chunk aligned on the
   sent samples by cross-correlation (search +-0.5 s around where the frame sequence
   numbers put it), both resampled 48 -> 16 kHz with PyAV, and scored with wideband PESQ
   (ITU-T P.862.2, the ``pesq`` package).
4. **CPU per call:** process CPU time (``time.process_time``, all threads) over a
   ``--cpu-duration`` call with no proxy, both sides in this one process, so one side is
   half of it: an idle connection (baseline), audio only, audio + video (``testsrc``
   640x480 at 30 fps), and audio + video recorded to WebM.
5. **Video through loss:** ``--runs`` calls of ``--video-duration`` seconds per loss rate
   (0, 5, 10 %) through the same proxy (same seeds), a 440 Hz tone and ``testsrc``
   640x480@30 both ways, once with keyframe requests only (``video_nack=False``: what
   main did before NACKs) and once with NACK retransmission (the default). Per rate:
   the share of sent frames that played (decoded on the other side), the frozen time
   (gaps between played frames over 100 ms, beyond the first 100 ms, as a share of the
   call) and the longest gap, and what retransmission cost (bytes resent / video bytes).
   ``--video-only`` runs this part alone.

Mouth-to-ear latency, per received 20 ms frame that played (decoded or rebuilt by FEC;
concealed frames carry no sender audio and do not count)::

    mouth-to-ear = (playout - capture) + 20 ms framing + Opus algorithmic delay

``capture`` is when the sender's ``CallMedia`` took the frame from its source, ``playout``
when the receiver's handed the decoded frame to its recorder (both on trio's clock, one
process, so no clock offset). In between: Opus encode, the DATAGRAM through our QUIC
driver, two UDP hops on loopback (via the proxy), the jitter buffer's target delay and
the wait for the receiver's next 20 ms tick, Opus decode, the concealment floor.
``framing``: a live microphone hands over a frame when its last sample is in, so its
first sample was spoken 20 ms before the capture moment. The Opus delay (its 6.5 ms
look-ahead) is measured in the baseline by cross-correlation. Not included: sound device
buffers on either side, and the network (loopback here). A cross-check measures the same
figure acoustically, per PESQ chunk, from where the sent audio lands in the recording.

How the timestamps are taken, without changing p2pd (benchmark-only seams):
``CallMedia``'s ``peer`` is a wrapper (the ``MediaPeer`` protocol) that notes each audio
packet's sequence number as it is sent; ``p2pd.media.call.open_audio_source`` and
``open_recorder`` are patched for the duration of the instrumented calls to wrap the
source (read times, the PCM sent) and the WAV recorder (write times); and each
``CallMedia``'s private ``_jitter`` is replaced, before any packet arrives, by a
``JitterBuffer`` subclass that remembers its last playout decision (which sequence number
played, and how). CPU runs use none of this.

The two sides of a real call tick with an arbitrary phase between them; in-process both
would start within a few milliseconds, always alike. So the answering side of run k
starts ``(k + u) / runs * 20 ms`` after the calling side (u seeded uniform, the same for
all k): the phases are spread evenly over a tick. The phases that resulted (opening a
source adds ~10 ms) are measured from the first source reads and printed. (A receiver
plays on a clock of its own, set just after frames fall due, whatever that phase;
``--no-align`` plays on the capture tick instead, where a frame waits up to 20 ms for
it.)

Also printed: the worst lateness of the 20 ms capture ticks on either side and the
longest gap between two playout ticks (a stalled trio thread), and the full garbage
collections during the calls (the benchmark collects its own garbage before each call;
a full collection of a big heap stalls the thread for 15-20 ms here).

    .venv/bin/python scripts/bench_call.py                   # 4 runs x 12 s per loss rate
    .venv/bin/python scripts/bench_call.py --runs 5 --duration 20 --json
    .venv/bin/python scripts/bench_call.py --keep /tmp/calls  # keep speech and recordings
    .venv/bin/python scripts/bench_call.py --min-delay 20 --bitrate 32  # other settings
    .venv/bin/python scripts/bench_call.py --no-redundancy --no-align   # FEC only, capture tick

Goals: mouth-to-ear p95 <= 60 ms at 0 % loss (G.114 allows 150 ms; the rest belongs to
the network), PESQ >= 4.0 at 0 % and >= 3.5 at 5 % loss, an audio + video call under half
a core per side. Only 127.0.0.1 is used; every call has a deadline; progress on stderr.
Needs the ``bench`` extra (``pip install -e '.[bench]'``: the ``pesq`` package) and,
for real speech, ``espeak-ng`` on PATH.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import logging
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import av
import numpy as np
import trio
from _bench import percentile, progress_printer

import p2pd.media.call as media_call
from p2pd.identity import Identity
from p2pd.media import CallMedia, MediaConfig
from p2pd.media.codecs import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    OpusEncoder,
    Vp8Decoder,
    open_opus_decoder,
)
from p2pd.media.jitter import JitterBuffer, Playout, PlayoutKind
from p2pd.media.plc import ConcealmentFloor
from p2pd.media.sinks import WavRecorder, open_recorder
from p2pd.media.sources import AudioSource, FileAudioSource, open_audio_source
from p2pd.media.wire import AudioPacket, Kind, decode
from p2pd.testing.proxy import open_lossy_proxy
from p2pd.transport.quic import QuicEndpoint, QuicPeer, open_quic_endpoint
from p2pd.transport.udp import UdpEndpoint
from p2pd.wire import Address

try:
    from pesq import PesqError, pesq
except ImportError:  # reported in main(): the bench extra is not installed
    pesq = None

LOCALHOST = "127.0.0.1"
FRAME = FRAME_SAMPLES / SAMPLE_RATE  # 20 ms
PESQ_RATE = 16000
#: PESQ wants samples of several seconds with pauses (P.862.3 section 7.1; application
#: guides say 8-30 s): a recording is scored in chunks of at most this many seconds.
PESQ_CHUNK = 12.0
#: The alignment of a chunk is searched this far either side of where the sequence
#: numbers put it (seconds).
ALIGN_SEARCH = 0.5
#: Connecting, opening sources and closing may take this long on top of a call.
CALL_SLACK = 30.0
ESPEAK_TIMEOUT = 60.0
LOSSES = (0.0, 0.05, 0.10)
#: Audio datagrams: plain, and with a redundant copy of the previous packet.
AUDIO_KINDS = (Kind.AUDIO, Kind.AUDIO_RED)
GOALS = {
    "m2e_p95_ms_at_0": 60.0,  # <=
    "pesq_at_0": 4.0,  # >=
    "pesq_at_5": 3.5,  # >=
    "av_cpu_pct_per_side": 50.0,  # <
}
#: IEEE Recommended Practice for Speech Quality Measurements (1969), list 1.
HARVARD = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
)
VOICES = {"alice": "en-us", "bob": "en-us+f3"}

log = logging.getLogger("bench_call")

progress = progress_printer("bench_call")


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


# --------------------------------------------------------------------------- speech


@dataclass
class Speech:
    """The two talkers' WAV files and how they were made."""

    paths: dict[str, Path]
    synthetic: bool
    how: str


def make_speech(workdir: Path, *, force_synthetic: bool, seed: int) -> Speech:
    espeak = shutil.which("espeak-ng")
    why = "--synthetic given" if force_synthetic else "espeak-ng not found on PATH"
    if espeak is not None and not force_synthetic:
        paths = {}
        try:
            for side, voice in VOICES.items():
                path = workdir / f"speech_{side}.wav"
                # -s 160: words per minute, a calm speaking rate; -g 4: 40 ms between words.
                command = [espeak, "-v", voice, "-s", "160", "-g", "4", "-w", str(path)]
                subprocess.run(
                    [*command, " ".join(HARVARD)],
                    check=True,
                    capture_output=True,
                    timeout=ESPEAK_TIMEOUT,
                )
                paths[side] = path
            version = subprocess.run(
                [espeak, "--version"], capture_output=True, text=True, timeout=ESPEAK_TIMEOUT
            ).stdout.split("  ")[0]
            seconds = wav_seconds(paths["alice"])
            return Speech(
                paths,
                False,
                f"{version.strip()}, Harvard sentences list 1 ({len(HARVARD)}), voices "
                f"{VOICES['alice']} / {VOICES['bob']}, {seconds:.1f} s, looped by the source",
            )
        except (OSError, subprocess.SubprocessError) as exc:
            why = f"espeak-ng failed: {exc}"
    progress(f"NO REAL SPEECH ({why}): using a synthetic speech-like signal")
    rng = np.random.default_rng(seed)
    paths = {}
    for i, side in enumerate(VOICES):
        path = workdir / f"speech_{side}.wav"
        write_wav(path, speech_like(rng, f0=120.0 if i == 0 else 210.0, seconds=16.0))
        paths[side] = path
    return Speech(
        paths,
        True,
        f"SYNTHETIC SPEECH-LIKE SIGNAL ({why}): PESQ is calibrated for real speech only, "
        "treat its scores as relative",
    )


#: (F1, F2, F3) of a few vowels, Hz (Peterson & Barney, adult averages).
_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480))


def speech_like(rng: np.random.Generator, *, f0: float, seconds: float) -> np.ndarray:
    """48 kHz int16: syllables of voiced harmonics shaped by vowel formants, with a
    gliding pitch, a raised-cosine envelope, some noise bursts and pauses."""
    out: list[np.ndarray] = []
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
    pcm: np.ndarray = (x / np.abs(x).max() * 0.5 * 32767).astype(np.int16)
    return pcm


def write_wav(path: Path, pcm: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (SAMPLE_RATE, 1, 2):
            raise SystemExit(f"{path}: expected 48 kHz mono 16-bit")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").copy()


def wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        frames: int = w.getnframes()
        rate: int = w.getframerate()
    return frames / rate


# --------------------------------------------------------------------------- signal work


def resample(pcm: np.ndarray, rate: int) -> np.ndarray:
    """48 kHz int16 mono to ``rate`` with FFmpeg's swresample (through PyAV)."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
    )
    frame.sample_rate = SAMPLE_RATE
    pieces = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(pieces).astype(np.int16) if pieces else np.zeros(0, np.int16)


def best_offset(reference: np.ndarray, chunk: np.ndarray) -> int:
    """The ``o`` that makes ``chunk`` most like ``reference[o : o + len(chunk)]``
    (normalised cross-correlation through the FFT)."""
    ref = reference.astype(np.float64)
    x = chunk.astype(np.float64)
    size = 1 << math.ceil(math.log2(ref.size + x.size))
    corr = np.fft.irfft(np.fft.rfft(ref, size) * np.conj(np.fft.rfft(x, size)), size)
    valid = ref.size - x.size + 1
    energy = np.concatenate([[0.0], np.cumsum(ref * ref)])
    norm = np.sqrt(np.maximum(energy[x.size : x.size + valid] - energy[:valid], 1e-9))
    return int(np.argmax(corr[:valid] / norm))


def pesq_wb(sent: np.ndarray, received: np.ndarray) -> float | None:
    """Wideband PESQ (MOS-LQO) of two aligned 48 kHz int16 signals of equal length."""
    ref, deg = resample(sent, PESQ_RATE), resample(received, PESQ_RATE)
    n = min(ref.size, deg.size)
    try:
        return float(pesq(PESQ_RATE, ref[:n], deg[:n], "wb"))
    except PesqError as exc:
        log.warning("PESQ failed: %r", exc)
        return None


def chunks(total: int) -> list[tuple[int, int]]:
    """[start, end) sample ranges: ``total`` cut evenly into pieces of at most PESQ_CHUNK."""
    limit = int(PESQ_CHUNK * SAMPLE_RATE)
    count = max(1, -(-total // limit))
    edges = [total * i // count for i in range(count + 1)]
    return list(itertools.pairwise(edges))


# --------------------------------------------------------------------------- baseline


def source_frames(path: Path, count: int) -> list[np.ndarray]:
    """The first ``count`` frames a call's source gives for ``path`` (48 kHz, looped)."""
    source = FileAudioSource(str(path))
    try:
        return [source.read() for _ in range(count)]
    finally:
        source.close()


def codec_only(
    frames: list[np.ndarray], drop: float, seed: int, *, bitrate: int, fec: bool, red: bool
) -> tuple[np.ndarray, list[float], int]:
    """The frames through Opus as a call sends and plays them, without network or jitter
    buffer: packet ``n`` is lost with probability ``drop``; a lost one is rebuilt from
    the next packet's FEC when that one arrived, else concealed, and every frame goes
    through the concealment floor, as ``CallMedia._play`` does. Returns the output, the
    compute time (s) per frame (encode plus decode) and the bytes of Opus sent.

    ``red``: every datagram also carries a copy of the previous packet (RFC 2198-style
    redundancy, what a call sends while its peer reports loss), so a lost packet whose
    successor arrived is decoded in full instead of from FEC, and one whose successor is
    lost too from the FEC in the copy of that successor; it doubles the audio bitrate."""
    encoder = OpusEncoder(bitrate=bitrate, packet_loss=MediaConfig().opus_packet_loss, fec=fec)
    decoder = open_opus_decoder()
    floor = ConcealmentFloor(FRAME_SAMPLES)
    rng = random.Random(seed)
    payloads: list[bytes] = []
    packets: list[bytes | None] = []
    costs = []
    size = 0
    for pcm in frames:
        started = time.perf_counter()
        (payload,) = encoder.encode(pcm)
        costs.append(time.perf_counter() - started)
        size += len(payload) * (2 if red else 1)
        payloads.append(payload)
        packets.append(None if rng.random() < drop else payload)
    out = []
    for n, packet in enumerate(packets):
        started = time.perf_counter()
        following = packets[n + 1] if n + 1 < len(packets) else None
        if red and following is None and n + 2 < len(packets) and packets[n + 2] is not None:
            following = payloads[n + 1]  # the copy of n + 1 in n + 2
        if packet is not None:
            pcm, concealed = decoder.decode(packet), False
        elif red and n + 1 < len(packets) and packets[n + 1] is not None:
            pcm, concealed = decoder.decode(payloads[n]), False
        elif following is not None:
            pcm, recovered = decoder.decode_fec(following)
            concealed = not recovered
        else:
            pcm, concealed = decoder.conceal(), True
        out.append(floor.conceal(pcm) if concealed else floor.good(pcm))
        costs[n] += time.perf_counter() - started
    decoder.close()
    return np.concatenate(out), costs, size


def codec_delay(sent: np.ndarray, out: np.ndarray) -> int:
    """Samples by which the decoded output lags the input (Opus's look-ahead)."""
    search = SAMPLE_RATE // 10
    probe = sent[: min(4 * SAMPLE_RATE, sent.size - search)]
    return best_offset(out[: probe.size + search], probe)


def run_baseline(
    speech: Speech, frames_per_call: int, seed: int, runs: int, config: MediaConfig
) -> dict[str, Any]:
    """Codec-only PESQ per loss rate with the calls' Opus settings, the same with other
    settings (what the codec alone allows), and the codec's delay and compute time.
    Lossy rows draw ``runs`` loss patterns per talker, as many as the calls get."""
    sent = {side: source_frames(path, frames_per_call) for side, path in speech.paths.items()}
    bitrate = config.audio_bitrate
    # (label, bitrate, FEC, RED, loss): the calls' settings first, then what-ifs.
    variants = [("codec only", bitrate, True, False, drop) for drop in LOSSES]
    variants += [("codec only, RED + FEC", bitrate, True, True, d) for d in LOSSES if d]
    variants.append(("codec only, no FEC", bitrate, False, False, 0.0))
    for other, drops in ((32000, (0.0, 0.05)), (48000, (0.0, 0.05)), (64000, (0.0,))):
        if other != bitrate:
            label = f"codec only, {other // 1000} kbit/s"
            variants += [(label, other, True, False, drop) for drop in drops]
    rows = []
    delays: list[int] = []
    costs_all: list[float] = []
    for label, rate, fec, red, drop in variants:
        scores = []
        size = 0
        patterns = runs if drop else 1
        for i, (side, frames) in enumerate(sent.items()):
            x = np.concatenate(frames)
            side_scores = []
            for k in range(patterns):
                out, costs, nbytes = codec_only(
                    frames, drop, seed * 1000 + k * 10 + i, bitrate=rate, fec=fec, red=red
                )
                size += nbytes
                delay = codec_delay(x, out)
                if rate == bitrate and fec and not red and not drop:
                    costs_all += costs
                    delays.append(delay)
                aligned = out[delay:]
                for start, end in chunks(aligned.size):
                    score = pesq_wb(x[start:end], aligned[start:end])
                    if score is not None:
                        side_scores.append(score)
            scores += side_scores
            progress(
                f"baseline {label}, {drop:.0%} loss, {side}: PESQ "
                f"{', '.join(f'{v:.2f}' for v in side_scores) or '-'}"
            )
        kbps = size * 8 / (len(sent) * patterns * frames_per_call * FRAME) / 1000
        rows.append(
            {
                "path": label,
                "loss": drop,
                "bitrate_kbps": kbps,
                "fec": fec,
                "red": red,
                "pesq": _summary(scores),
            }
        )
    costs_all.sort()
    return {
        "opus_delay_ms": statistics.median(delays) / SAMPLE_RATE * 1000,
        "compute_ms_p50": percentile(costs_all, 50) * 1000,  # type: ignore[operator]
        "compute_ms_p95": percentile(costs_all, 95) * 1000,  # type: ignore[operator]
        "rows": rows,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summary(scores: list[float]) -> dict[str, Any]:
    return {
        "mean": _mean(scores),
        "min": min(scores) if scores else None,
        "max": max(scores) if scores else None,
        "n": len(scores),
    }


# --------------------------------------------------------------------------- instrumentation


@dataclass
class Trace:
    """One side's timestamps, all on trio's clock."""

    #: When each source frame was taken, and the frames themselves (what was sent).
    reads: list[float] = field(default_factory=list)
    sent: list[np.ndarray] = field(default_factory=list)
    #: audio sequence number -> read time of the frame it carries, and when it was sent
    capture: dict[int, float] = field(default_factory=dict)
    sent_at: dict[int, float] = field(default_factory=dict)
    #: the peer's audio sequence number -> when its datagram reached this side
    arrived: dict[int, float] = field(default_factory=dict)
    #: one per frame handed to the recorder: (time, kind, seq, concealed)
    played: list[tuple[float, PlayoutKind, int | None, bool]] = field(default_factory=list)
    last_decision: Playout | None = None


class TimedSource:
    """An audio source that notes when each frame is taken, and keeps the frames."""

    def __init__(self, inner: AudioSource, trace: Trace) -> None:
        self.inner, self.trace = inner, trace
        self.live = inner.live
        self.description = inner.description

    def read(self) -> np.ndarray:
        now = trio.current_time()
        pcm = self.inner.read()
        self.trace.reads.append(now)
        self.trace.sent.append(pcm.copy())
        return pcm

    def close(self) -> None:
        self.inner.close()


class TimedPeer:
    """A ``MediaPeer`` in front of a ``QuicPeer`` that maps each audio packet's sequence
    number to the capture time of the frame it carries (the last read before it)."""

    def __init__(self, inner: QuicPeer, trace: Trace) -> None:
        self.inner, self.trace = inner, trace

    @property
    def max_datagram_size(self) -> int:
        return self.inner.max_datagram_size

    def send_datagram(self, data: bytes) -> bool:
        if data and data[0] in AUDIO_KINDS and self.trace.reads:
            packet = decode(data)
            assert isinstance(packet, AudioPacket)
            self.trace.capture[packet.seq] = self.trace.reads[-1]
            self.trace.sent_at[packet.seq] = trio.current_time()
        return self.inner.send_datagram(data)

    async def wait_closed(self) -> None:
        await self.inner.wait_closed()


class TimedJitterBuffer(JitterBuffer):
    """Remembers its last playout decision, for the recorder to pick up."""

    trace: Trace | None = None

    def pop(self, now: float, *, quiet: bool = True) -> Playout | None:
        decision = super().pop(now, quiet=quiet)
        if self.trace is not None:
            self.trace.last_decision = decision
        return decision


class TimedWavRecorder(WavRecorder):
    """The call's WAV recorder, noting when each frame is handed over and what it was."""

    def __init__(self, path: Path, trace: Trace) -> None:
        super().__init__(path)
        self.trace = trace

    def write_audio(self, pcm: Any, *, concealed: bool, now: float) -> None:
        d = self.trace.last_decision
        kind, seq = (d.kind, d.seq) if d is not None else (PlayoutKind.CONCEAL, None)
        self.trace.played.append((trio.current_time(), kind, seq, concealed))
        super().write_audio(pcm, concealed=concealed, now=now)


@contextmanager
def instrumented(by_source: dict[str, Trace], by_record: dict[Path, Trace]) -> Iterator[None]:
    """Patch ``p2pd.media.call``'s source and recorder openers so that the sources and
    recordings named in the maps get timed wrappers; restored on exit."""

    def timed_source(spec: str) -> AudioSource:
        source = open_audio_source(spec)
        trace = by_source.get(spec)
        return source if trace is None else TimedSource(source, trace)

    def timed_recorder(path: Path, **kwargs: Any) -> Any:
        trace = by_record.get(path)
        if trace is None or path.suffix != ".wav":
            return open_recorder(path, **kwargs)
        return TimedWavRecorder(path, trace)

    # The names call.py looks up when a call starts -> (the original, the wrapper).
    patches = {
        "open_audio_source": (open_audio_source, timed_source),
        "open_recorder": (open_recorder, timed_recorder),
    }
    for name, (original, wrapper) in patches.items():
        if getattr(media_call, name) is not original:
            raise SystemExit(f"p2pd.media.call.{name} is not the one this benchmark wraps")
        setattr(media_call, name, wrapper)
    try:
        yield
    finally:
        for name, (original, _) in patches.items():
            setattr(media_call, name, original)


# --------------------------------------------------------------------------- calls


@dataclass
class Side:
    name: str
    identity: Identity
    udp: UdpEndpoint
    quic: QuicEndpoint
    incoming: list[QuicPeer] = field(default_factory=list)
    connected: trio.Event = field(default_factory=trio.Event)
    media: CallMedia | None = None
    trace: Trace | None = None

    def on_datagram(self, peer: QuicPeer, data: bytes) -> None:
        if self.trace is not None and data and data[0] in AUDIO_KINDS:
            packet = decode(data)
            assert isinstance(packet, AudioPacket)
            self.trace.arrived.setdefault(packet.seq, trio.current_time())
        if self.media is not None:
            self.media.datagram_received(data)

    def on_connection(self, peer: QuicPeer) -> None:
        self.incoming.append(peer)
        self.connected.set()


@asynccontextmanager
async def open_side(name: str) -> AsyncIterator[Side]:
    identity = Identity.generate(name)
    udp = UdpEndpoint.bind(Address(LOCALHOST, 0))
    holder: list[Side] = []
    try:
        async with (
            open_quic_endpoint(
                udp,
                identity,
                on_datagram=lambda p, d: holder[0].on_datagram(p, d),
                on_connection=lambda p: holder[0].on_connection(p),
            ) as quic,
            trio.open_nursery() as nursery,
        ):
            side = Side(name, identity, udp, quic)
            holder.append(side)
            await nursery.start(udp.serve, lambda data, addr: None, quic.datagram_received)
            yield side
            nursery.cancel_scope.cancel()
    finally:
        udp.close()


@asynccontextmanager
async def open_call(drop: float | None, seed: int) -> AsyncIterator[tuple[Side, Side, QuicPeer]]:
    """Alice connected to Bob (through the lossy proxy unless ``drop`` is None)."""
    async with open_side("alice") as alice, open_side("bob") as bob:
        target = bob.udp.local_address.as_tuple()
        if drop is None:
            peer = await alice.quic.connect(bob.udp.local_address, bob.identity.public_key)
            await bob.connected.wait()
            yield alice, bob, peer
            return
        async with open_lossy_proxy(target, drop=drop, seed=seed) as proxy:
            peer = await alice.quic.connect(proxy.address, bob.identity.public_key)
            await bob.connected.wait()
            yield alice, bob, peer


@dataclass
class Direction:
    """What one side sent and the other played, with the receiver's statistics."""

    sender: str
    sent: Trace
    received: Trace
    recording: Path
    stats: dict[str, Any]
    sender_stats: dict[str, Any]


async def instrumented_call(
    workdir: Path,
    speech: Speech,
    *,
    drop: float,
    seed: int,
    duration: float,
    offset: float,
    config: MediaConfig,
) -> list[Direction]:
    traces = {"alice": Trace(), "bob": Trace()}
    specs = {side: f"file:{speech.paths[side]}" for side in traces}
    records = {side: workdir / f"{side}_heard_{drop:.2f}_{seed}.wav" for side in traces}
    with (
        instrumented(
            {specs[s]: traces[s] for s in traces}, {records[s]: traces[s] for s in traces}
        ),
        trio.fail_after(duration + offset + CALL_SLACK),
    ):
        async with open_call(drop, seed) as (alice, bob, peer):
            for side, quic_peer in ((alice, peer), (bob, bob.incoming[0])):
                trace = traces[side.name]
                media = CallMedia(
                    TimedPeer(quic_peer, trace),
                    audio_in=specs[side.name],
                    video_in=None,
                    record=records[side.name],
                    duration=duration,
                    config=config,
                )
                # Benchmark seam: a JitterBuffer that remembers its decisions, in place
                # before the first datagram can reach this CallMedia.
                jitter = TimedJitterBuffer(media._jitter.config)  # the one CallMedia chose
                jitter.trace = trace
                media._jitter = jitter
                side.media, side.trace = media, trace
            assert alice.media is not None and bob.media is not None
            async with trio.open_nursery() as nursery:
                await nursery.start(alice.media.run)
                await trio.sleep(offset)
                await nursery.start(bob.media.run)
            stats = {"alice": alice.media.statistics(), "bob": bob.media.statistics()}
    return [
        Direction(
            "alice", traces["alice"], traces["bob"], records["bob"], stats["bob"], stats["alice"]
        ),
        Direction(
            "bob", traces["bob"], traces["alice"], records["alice"], stats["alice"], stats["bob"]
        ),
    ]


def analyse(direction: Direction) -> dict[str, Any]:
    """Per-frame latency, PESQ per chunk and the acoustic cross-check of one direction."""
    sent_trace, heard = direction.sent, direction.received
    timed = [
        (t, seq)
        for t, _, seq, concealed in heard.played
        if not concealed and seq is not None and seq in sent_trace.capture
    ]
    latencies = sorted(t - sent_trace.capture[seq] for t, seq in timed)
    # Where the time goes, per frame: capture to send (read, Opus encode), send to arrival
    # (QUIC, two UDP hops through the proxy, the trio tasks between), arrival to playout
    # (the jitter buffer's target, the wait for the tick, decode).
    stages: dict[str, list[float]] = {"encode": [], "transport": [], "buffer": []}
    for t, seq in timed:
        sent_at, arrived = sent_trace.sent_at.get(seq), heard.arrived.get(seq)
        if sent_at is None or arrived is None:
            continue
        stages["encode"].append(sent_at - sent_trace.capture[seq])
        stages["transport"].append(arrived - sent_at)
        stages["buffer"].append(t - arrived)
    # The sent audio, with silence in front: the start of the first frame played is Opus's
    # look-ahead, sound from before the source's first sample.
    margin = int(ALIGN_SEARCH * SAMPLE_RATE)
    sent = np.concatenate([np.zeros(margin, np.int16), *sent_trace.sent])
    received = read_wav(direction.recording)
    reads = sent_trace.reads

    def spoken_at(i: int) -> float:
        """When sent sample ``i`` (0 = the source's first) was spoken, for a live
        microphone: a frame's first sample came FRAME before the frame was read."""
        frame = min(max(i // FRAME_SAMPLES, 0), len(reads) - 1)
        return reads[frame] - FRAME + (i - frame * FRAME_SAMPLES) / SAMPLE_RATE

    scores: list[float] = []
    acoustic: list[float] = []
    for start, end in chunks(received.size):
        if end - start < SAMPLE_RATE:
            continue  # PESQ needs speech to work on; a sub-second tail says little
        # Where the sequence numbers put this chunk in the sent audio ...
        frame = start // FRAME_SAMPLES
        expected = None
        for j in range(frame, min(len(heard.played), frame + 50)):  # bounded look-ahead
            _, _, played_seq, concealed = heard.played[j]
            if played_seq is not None and not concealed:
                expected = margin + start + (played_seq - j) * FRAME_SAMPLES
                break
        if expected is None:
            continue
        # ... and where the audio itself says it is.
        low = max(0, expected - margin)
        high = min(sent.size, expected + (end - start) + margin)
        if high - low < end - start:
            continue
        at = low + best_offset(sent[low:high], received[start:end])
        score = pesq_wb(sent[at : at + end - start], received[start:end])
        if score is not None:
            scores.append(score)
        # Acoustic mouth-to-ear of the chunk's first sample: when it was played (handed to
        # the recorder) minus when the sound it carries was spoken.
        played_at = heard.played[frame][0] + (start - frame * FRAME_SAMPLES) / SAMPLE_RATE
        acoustic.append(played_at - spoken_at(at - margin))
    # The receiver's tick phase against the sender's: how long after a sender tick the
    # receiver's next tick comes (the wait a frame may add on top of the target delay).
    phase = (heard.reads[0] - reads[0]) % FRAME if heard.reads and reads else None
    s = direction.stats
    return {
        "sender": direction.sender,
        "latencies": latencies,
        "stages": stages,
        "pesq": scores,
        "acoustic_m2e": acoustic,
        "tick_phase_ms": _ms(phase),
        "capture_late_max_ms": _ms(_max_lateness(reads)),
        "playout_late_max_ms": _ms(_max_gap([t for t, *_ in heard.played])),
        "frames_played": s["audio_frames_played"],
        "frames_concealed": s["audio_frames_concealed"],
        "fec_recovered": s["audio_fec_recovered"],
        "red_recovered": s["audio_red_recovered"],
        "red_sent_by_peer": direction.sender_stats["audio_red_sent"],
        "loss_pct": s["loss_pct"],
        "late": s["audio_late"],
        "dropped": s["audio_dropped"],
        "jitter_target_ms": s["jitter_buffer_target_ms"],
        "ticks_late": s["ticks_late"],
        "bitrate_kbps": s["bitrate_received_kbps"],
    }


def _max_lateness(times: list[float]) -> float | None:
    """How far the worst of a run of 20 ms ticks came after its schedule (the first
    tick's time + n x 20 ms): a stalled trio thread shows here."""
    if not times:
        return None
    return max(t - (times[0] + n * FRAME) for n, t in enumerate(times))


def _max_gap(times: list[float]) -> float | None:
    """How much longer than 20 ms the longest interval between two playout ticks was: a
    stalled trio thread shows here (the playout clock's own phase shifts, at most half a
    frame each, do too)."""
    if len(times) < 2:
        return None
    return max(b - a for a, b in itertools.pairwise(times)) - FRAME


@dataclass
class GcPauses:
    """Full (generation 2) garbage collections and how long each held the thread."""

    pauses: list[float] = field(default_factory=list)
    _started: float = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._started)


def run_losses(
    args: argparse.Namespace, workdir: Path, speech: Speech, opus_delay: float
) -> list[dict[str, Any]]:
    rows = []
    rng = random.Random(args.seed)
    config = media_config(args)
    for drop in LOSSES:
        per_run = []
        gc_pauses = GcPauses()
        # Systematic sampling of the tick phase: one random start, then evenly spaced.
        # (Each call gives both directions, phases p and 20 ms - p, which stay even too.)
        first = rng.random()
        offsets = [(k + first) / args.runs * FRAME for k in range(args.runs)]
        for k, offset in enumerate(offsets):
            seed = args.seed + k
            progress(
                f"call {drop:.0%} loss, run {k + 1}/{args.runs} (proxy seed {seed}, "
                f"bob starts {offset * 1000:.1f} ms after alice), {args.duration:g} s"
            )
            # The benchmark's own garbage (PESQ, the last call's recordings) is not the
            # call's: collect it before, then watch the collections during the call.
            gc.collect()
            gc.callbacks.append(gc_pauses)
            try:
                call = functools.partial(
                    instrumented_call,
                    workdir,
                    speech,
                    drop=drop,
                    seed=seed,
                    duration=args.duration,
                    offset=offset,
                    config=config,
                )
                directions = trio.run(call)
            finally:
                gc.callbacks.remove(gc_pauses)
            for d in directions:
                result = analyse(d)
                result["seed"], result["offset_ms"] = seed, offset * 1000
                lat = result["latencies"]
                progress(
                    f"  {d.sender} -> other: tick phase {fmt(result['tick_phase_ms'])} ms, "
                    f"pipeline p50/p95 "
                    f"{fmt(_ms(percentile(lat, 50)))}/{fmt(_ms(percentile(lat, 95)))} ms, "
                    f"PESQ {', '.join(f'{x:.2f}' for x in result['pesq']) or '-'}, "
                    f"loss {result['loss_pct']:.1f} %, concealed {result['frames_concealed']}, "
                    f"FEC {result['fec_recovered']}, RED {result['red_recovered']} "
                    f"(copies sent {result['red_sent_by_peer']})"
                )
                per_run.append(result)
        row = summarise_loss(drop, per_run, opus_delay)
        row["gc_full_collections"] = len(gc_pauses.pauses)
        row["gc_full_max_ms"] = _ms(max(gc_pauses.pauses, default=None))
        rows.append(row)
    return rows


def media_config(args: argparse.Namespace) -> MediaConfig:
    """The calls' MediaConfig: the defaults, but for the knobs given on the command line."""
    config = MediaConfig()
    if args.min_delay is not None:
        config = replace(config, jitter=replace(config.jitter, min_delay=args.min_delay / 1000))
    if args.bitrate is not None:
        config = replace(config, audio_bitrate=round(args.bitrate * 1000))
    if args.no_redundancy:
        config = replace(config, audio_redundancy=False)
    if args.no_align:
        config = replace(config, align_playout=False)
    return config


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def summarise_loss(drop: float, per_run: list[dict[str, Any]], opus_delay: float) -> dict[str, Any]:
    latencies = sorted(x for r in per_run for x in r["latencies"])
    scores = [x for r in per_run for x in r["pesq"]]
    acoustic = sorted(x for r in per_run for x in r["acoustic_m2e"])
    # Mouth-to-ear adds what no timestamp sees: the 20 ms a live frame takes to fill, and
    # Opus's look-ahead (measured in the baseline).
    extra = FRAME + opus_delay / 1000
    played = sum(r["frames_played"] for r in per_run)
    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
    return {
        "loss": drop,
        "directions": len(per_run),
        "frames_timed": len(latencies),
        "pipeline_ms": {
            "p50": _ms(p50),
            "p95": _ms(p95),
            "min": _ms(latencies[0]) if latencies else None,
            "max": _ms(latencies[-1]) if latencies else None,
        },
        "m2e_ms": {
            "p50": _ms(p50 + extra) if p50 is not None else None,
            "p95": _ms(p95 + extra) if p95 is not None else None,
        },
        "acoustic_m2e_ms": {
            "p50": _ms(percentile(acoustic, 50)),
            "max": _ms(acoustic[-1]) if acoustic else None,
            "n": len(acoustic),
        },
        "stages_ms": {
            name: {
                "p50": _ms(percentile(values, 50)),
                "p95": _ms(percentile(values, 95)),
            }
            for name in ("encode", "transport", "buffer")
            for values in [sorted(x for r in per_run for x in r["stages"][name])]
        },
        "pesq": _summary(scores),
        "measured_loss_pct": _mean([r["loss_pct"] for r in per_run]),
        "bitrate_kbps": _mean([r["bitrate_kbps"] for r in per_run]),
        "concealed_pct": (
            100 * sum(r["frames_concealed"] for r in per_run) / played if played else None
        ),
        "fec_recovered": sum(r["fec_recovered"] for r in per_run),
        "red_recovered": sum(r["red_recovered"] for r in per_run),
        "red_sent": sum(r["red_sent_by_peer"] for r in per_run),
        "late": sum(r["late"] for r in per_run),
        "dropped": sum(r["dropped"] for r in per_run),
        "jitter_target_ms": [r["jitter_target_ms"] for r in per_run],
        "ticks_late": sum(r["ticks_late"] for r in per_run),
        "tick_phases_ms": sorted(
            r["tick_phase_ms"] for r in per_run if r["tick_phase_ms"] is not None
        ),
        "capture_late_max_ms": max(
            (r["capture_late_max_ms"] for r in per_run if r["capture_late_max_ms"] is not None),
            default=None,
        ),
        "playout_late_max_ms": max(
            (r["playout_late_max_ms"] for r in per_run if r["playout_late_max_ms"] is not None),
            default=None,
        ),
        "runs": [
            {k: v for k, v in r.items() if k not in ("latencies", "acoustic_m2e", "stages")}
            | {
                "pipeline_p50_ms": _ms(percentile(sorted(r["latencies"]), 50)),
                "pipeline_p95_ms": _ms(percentile(sorted(r["latencies"]), 95)),
            }
            for r in per_run
        ],
    }


# --------------------------------------------------------------------------- CPU


CPU_CASES = (
    ("idle connection (baseline)", None, None, None),
    ("audio only", "speech", None, None),
    ("audio + video 640x480@30", "speech", "testsrc", None),
    ("audio + video, WebM recording", "speech", "testsrc", ".webm"),
)


async def cpu_call(
    workdir: Path,
    speech: Speech,
    audio: str | None,
    video: str | None,
    suffix: str | None,
    seconds: float,
) -> dict[str, Any]:
    with trio.fail_after(seconds + CALL_SLACK):
        async with open_call(None, 0) as (alice, bob, peer):
            if audio is None:
                cpu0, wall0 = time.process_time(), time.perf_counter()
                await trio.sleep(seconds)
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                return {"cpu_s": cpu, "wall_s": wall, "stats": {}}
            for side, quic_peer in ((alice, peer), (bob, bob.incoming[0])):
                side.media = CallMedia(
                    quic_peer,
                    audio_in=f"file:{speech.paths[side.name]}",
                    video_in=video,
                    record=workdir / f"{side.name}_cpu{suffix}" if suffix else None,
                    duration=seconds,
                )
            assert alice.media is not None and bob.media is not None
            async with trio.open_nursery() as nursery:
                await nursery.start(alice.media.run)
                await nursery.start(bob.media.run)
                cpu0, wall0 = time.process_time(), time.perf_counter()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            return {
                "cpu_s": cpu,
                "wall_s": wall,
                "stats": {"alice": alice.media.statistics(), "bob": bob.media.statistics()},
            }


class _TimedVp8Decoder(Vp8Decoder):
    """Benchmark seam: a VP8 decoder that notes when each picture came out."""

    played: ClassVar[list[list[float]]] = []  # one list per decoder made, in order

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        _TimedVp8Decoder.played.append(self.times)

    def decode(self, data: bytes) -> list[Any]:
        pictures = super().decode(data)
        if pictures:
            self.times.append(trio.current_time())
        return pictures


#: A gap between two played video frames longer than this is a freeze (seconds).
FREEZE = 0.1


async def video_call(drop: float, seed: int, seconds: float, nack: bool) -> dict[str, Any]:
    config = MediaConfig(video_nack=nack)
    _TimedVp8Decoder.played = []
    with trio.fail_after(seconds + CALL_SLACK):
        async with open_call(drop, seed) as (alice, bob, peer):
            for side, quic_peer in ((alice, peer), (bob, bob.incoming[0])):
                side.media = CallMedia(
                    quic_peer,
                    audio_in="tone:440",
                    video_in="testsrc",
                    record=None,
                    duration=seconds,
                    config=config,
                )
            assert alice.media is not None and bob.media is not None
            async with trio.open_nursery() as nursery:
                await nursery.start(alice.media.run)
                await nursery.start(bob.media.run)
            stats = [alice.media.statistics(), bob.media.statistics()]
    frozen, longest = 0.0, 0.0
    for times in _TimedVp8Decoder.played:
        for a, b in itertools.pairwise(times):
            longest = max(longest, b - a)
            if b - a > FREEZE:
                frozen += b - a - FREEZE
    return {
        "sent": sum(s["video_frames_sent"] for s in stats),
        "played": sum(s["video_frames_received"] for s in stats),
        "frozen_s": frozen,
        "longest_gap_s": longest,
        "call_s": sum(s["duration_s"] for s in stats),
        "keyframes": sum(s["video_keyframes_sent"] for s in stats),
        "retransmitted_bytes": sum(s["video_retransmitted_bytes"] for s in stats),
        "nack_recovered": sum(s["video_nack_recovered"] for s in stats),
        "bytes_sent": sum(s["bitrate_sent_kbps"] * s["duration_s"] * 125 for s in stats),
    }


@contextmanager
def patched(module: Any, name: str, value: Any) -> Iterator[None]:
    """``module.name = value`` for the duration (a benchmark seam), restored on exit."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def run_video(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with patched(media_call, "Vp8Decoder", _TimedVp8Decoder):
        for drop in LOSSES:
            for nack in (False, True):
                label = "NACK + keyframe requests" if nack else "keyframe requests only"
                runs = []
                for run in range(args.runs):
                    progress(f"video: {drop:.0%} loss, {label}, run {run + 1}/{args.runs}")
                    gc.collect()
                    runs.append(
                        trio.run(video_call, drop, args.seed + run, args.video_duration, nack)
                    )
                sent = sum(r["sent"] for r in runs)
                played = sum(r["played"] for r in runs)
                rows.append(
                    {
                        "loss": drop,
                        "recovery": label,
                        "nack": nack,
                        "frames_sent": sent,
                        "frames_played": played,
                        "played_pct": 100 * played / sent if sent else None,
                        "played_pct_per_run": [
                            round(100 * r["played"] / r["sent"], 1) for r in runs if r["sent"]
                        ],
                        "frozen_pct": 100
                        * sum(r["frozen_s"] for r in runs)
                        / max(1e-9, sum(r["call_s"] for r in runs)),
                        "longest_gap_ms": 1000 * max(r["longest_gap_s"] for r in runs),
                        "keyframes_sent": sum(r["keyframes"] for r in runs),
                        "nack_recovered": sum(r["nack_recovered"] for r in runs),
                        "retransmitted_pct": 100
                        * sum(r["retransmitted_bytes"] for r in runs)
                        / max(1.0, sum(r["bytes_sent"] for r in runs)),
                    }
                )
                progress(f"  {rows[-1]['played_pct']:.1f} % of frames played")
    return rows


def print_video(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nVideo through the lossy proxy: testsrc 640x480@30 + tone both ways, {args.runs} "
        f"call(s) of {args.video_duration:g} s per row, seeds {args.seed}.."
        f"{args.seed + args.runs - 1}, both directions counted."
    )
    header = (
        f"{'loss':>4} {'recovery':<26} {'played':>7} {'per run':>22} {'frozen':>6} "
        f"{'max gap':>7} {'keyfr':>5} {'resent':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        per_run = "/".join(f"{x:.0f}" for x in r["played_pct_per_run"])
        print(
            f"{r['loss']:>4.0%} {r['recovery']:<26} {fmt(r['played_pct'], '.1f', '%'):>7} "
            f"{per_run:>22} {r['frozen_pct']:>5.1f}% {r['longest_gap_ms']:>5.0f}ms "
            f"{r['keyframes_sent']:>5} {r['retransmitted_pct']:>5.1f}%"
        )
    print(
        f"played = frames decoded by the receiver / frames sent; frozen = time in gaps "
        f"between played frames beyond {FREEZE * 1000:g} ms, share of the call; keyfr = "
        "keyframes sent; resent = retransmitted bytes / all bytes sent (audio, video, "
        "reports). Goals (issue 15): >= 95 % played at 5 % loss, >= 85 % at 10 %."
    )


def run_cpu(args: argparse.Namespace, workdir: Path, speech: Speech) -> list[dict[str, Any]]:
    rows = []
    for label, audio, video, suffix in CPU_CASES:
        progress(f"CPU: {label}, {args.cpu_duration:g} s")
        r = trio.run(cpu_call, workdir, speech, audio, video, suffix, args.cpu_duration)
        per_side = r["cpu_s"] / r["wall_s"] / 2 * 100
        stats = r["stats"]
        row = {
            "case": label,
            "cpu_s": r["cpu_s"],
            "wall_s": r["wall_s"],
            "cpu_pct_per_side": per_side,
            "video_frames_sent": sum(s["video_frames_sent"] for s in stats.values()),
            "video_frames_received": sum(s["video_frames_received"] for s in stats.values()),
            "audio_frames_concealed": sum(s["audio_frames_concealed"] for s in stats.values()),
            "ticks_late": sum(s["ticks_late"] for s in stats.values()),
        }
        progress(f"  {per_side:.1f} % of one core per side")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


def verdicts(losses: list[dict[str, Any]], cpu: list[dict[str, Any]]) -> dict[str, Any]:
    by_loss = {r["loss"]: r for r in losses}
    av_row = next(r for r in cpu if r["case"].startswith("audio + video 640"))
    m2e = by_loss[0.0]["m2e_ms"]["p95"]
    p0, p5 = by_loss[0.0]["pesq"]["mean"], by_loss[0.05]["pesq"]["mean"]
    return {
        "m2e_p95_ms_at_0": {"value": m2e, "goal": "<= 60", "ok": m2e is not None and m2e <= 60},
        "pesq_at_0": {"value": p0, "goal": ">= 4.0", "ok": p0 is not None and p0 >= 4.0},
        "pesq_at_5": {"value": p5, "goal": ">= 3.5", "ok": p5 is not None and p5 >= 3.5},
        "av_cpu_pct_per_side": {
            "value": av_row["cpu_pct_per_side"],
            "goal": "< 50",
            "ok": av_row["cpu_pct_per_side"] < 50,
        },
    }


def print_report(doc: dict[str, Any]) -> None:
    p, base = doc["params"], doc["baseline"]
    print(
        f"\nCalls on loopback: {p['runs']} call(s) of {p['duration_s']:g} s per loss rate, "
        f"both directions scored, proxy seeds {p['seed']}..{p['seed'] + p['runs'] - 1}, "
        f"Opus {p['audio_bitrate'] / 1000:g} kbit/s, jitter buffer min delay "
        f"{p['jitter_min_delay_ms']:g} ms, redundancy under loss "
        f"{'on' if p['audio_redundancy'] else 'OFF'}, playout "
        f"{'aligned to due frames' if p['align_playout'] else 'on the capture tick'}"
        f"; {_cpus()} CPU(s), one process."
    )
    print(f"speech: {doc['speech']}")
    print(
        f"Opus delay (look-ahead, measured) {base['opus_delay_ms']:.1f} ms; codec compute "
        f"(encode + decode) p50/p95 {base['compute_ms_p50']:.2f}/{base['compute_ms_p95']:.2f} "
        f"ms per frame; Opus decoder {doc['opus_decoder']}."
    )
    header = (
        f"{'path':<24} {'kbit/s':>6} {'loss':>4} {'m2e p50':>7} {'m2e p95':>7} "
        f"{'pipe p50':>8} {'pipe p95':>8} {'pipe max':>8} {'PESQ':>5} {'min':>5} {'n':>3} "
        f"{'conceal':>7} {'FEC':>4} {'RED':>4} {'JB ms':>6}"
    )
    print(header)
    print("-" * len(header))
    codec_m2e = FRAME * 1000 + base["opus_delay_ms"]
    for row in base["rows"]:
        print(
            f"{row['path']:<24} {row['bitrate_kbps']:>6.1f} {row['loss']:>4.0%} "
            f"{codec_m2e + base['compute_ms_p50']:>7.1f} "
            f"{codec_m2e + base['compute_ms_p95']:>7.1f} {'-':>8} {'-':>8} {'-':>8} "
            f"{fmt(row['pesq']['mean'], '.2f'):>5} {fmt(row['pesq']['min'], '.2f'):>5} "
            f"{row['pesq']['n']:>3} {'-':>7} {'-':>4} {'-':>4} {'-':>6}"
        )
    for row in doc["calls"]:
        targets = row["jitter_target_ms"]
        jb = f"{min(targets):g}-{max(targets):g}" if targets else "-"
        if targets and min(targets) == max(targets):
            jb = f"{targets[0]:g}"
        print(
            f"{'call via lossy proxy':<24} {row['bitrate_kbps']:>6.1f} {row['loss']:>4.0%} "
            f"{fmt(row['m2e_ms']['p50']):>7} {fmt(row['m2e_ms']['p95']):>7} "
            f"{fmt(row['pipeline_ms']['p50']):>8} {fmt(row['pipeline_ms']['p95']):>8} "
            f"{fmt(row['pipeline_ms']['max']):>8} {fmt(row['pesq']['mean'], '.2f'):>5} "
            f"{fmt(row['pesq']['min'], '.2f'):>5} {row['pesq']['n']:>3} "
            f"{fmt(row['concealed_pct'], '.1f', '%'):>7} {row['fec_recovered']:>4} "
            f"{row['red_recovered']:>4} {jb:>6}"
        )
    print(
        "m2e = mouth-to-ear = pipe + 20 ms framing + Opus delay (codec rows: framing + "
        "Opus delay + compute). pipe = capture (the sender takes the frame from its source) "
        "to playout (the receiver hands the decoded frame to its recorder): Opus encode, "
        "QUIC DATAGRAM, 2 loopback UDP hops via the proxy, the jitter buffer's target, the "
        "wait for the receiver's next playout tick, decode. Not included: sound device "
        "buffers, the network. Per played frame (decoded, FEC-rebuilt or decoded from a "
        "redundant copy), all runs, both directions. FEC / RED: frames rebuilt from FEC / "
        "decoded from a redundant copy. "
        "PESQ: wideband P.862.2 MOS-LQO per <=12 s chunk (mean, min, count). kbit/s: Opus "
        "payload (calls: the whole datagram stream received, audio, copies and reports). "
        "JB ms: "
        "jitter buffer target at the end of each call. Codec rows: no network, no jitter "
        "buffer, i.i.d. loss; their latency leaves out the frame a receiver must hold to use "
        "FEC (or RED) once packets are lost."
    )
    for row in doc["calls"]:
        parts = [
            f"{label} {fmt(row['stages_ms'][name]['p50'], '.2f')} "
            f"({fmt(row['stages_ms'][name]['p95'], '.2f')})"
            for name, label in (
                ("encode", "capture->send"),
                ("transport", "send->arrival"),
                ("buffer", "arrival->playout"),
            )
        ]
        print(f"  {row['loss']:.0%}: pipe p50 (p95) ms = " + " + ".join(parts))
    for row in doc["calls"]:
        a = row["acoustic_m2e_ms"]
        phases = ", ".join(f"{x:.0f}" for x in row["tick_phases_ms"])
        print(
            f"  {row['loss']:.0%}: acoustic m2e (per PESQ chunk) median {fmt(a['p50'])} ms, "
            f"max {fmt(a['max'])} ms (n={a['n']}); receiver tick phases {phases} ms; "
            f"measured loss {fmt(row['measured_loss_pct'], '.1f')} %; late {row['late']}, "
            f"accelerate-dropped {row['dropped']}; redundant copies sent {row['red_sent']}; "
            f"worst capture tick lateness {fmt(row['capture_late_max_ms'])} ms, longest "
            f"playout gap over 20 ms {fmt(row['playout_late_max_ms'])} ms; "
            f"full GCs {row['gc_full_collections']} (max {fmt(row['gc_full_max_ms'])} ms)"
        )
    print()
    header = f"{'CPU case':<32} {'% core/side':>11} {'cpu s':>7} {'wall s':>7} {'video rx/tx':>12}"
    print(header)
    print("-" * len(header))
    for row in doc["cpu"]:
        video = (
            f"{row['video_frames_received']}/{row['video_frames_sent']}"
            if row["video_frames_sent"]
            else "-"
        )
        print(
            f"{row['case']:<32} {row['cpu_pct_per_side']:>11.1f} {row['cpu_s']:>7.2f} "
            f"{row['wall_s']:>7.2f} {video:>12}"
        )
    print(
        "% core/side = process CPU time (all threads) during the call / wall time / 2: both "
        "sides, their QUIC endpoints and codecs run in this one process (one trio thread); "
        "no proxy; no recording unless named. testsrc video both ways."
    )
    print()
    for name, v in doc["goals"].items():
        print(f"goal {name}: {fmt(v['value'], '.3f')} {v['goal']}: {'PASS' if v['ok'] else 'MISS'}")
    if doc["speech_synthetic"]:
        print("WARNING: SYNTHETIC SPEECH-LIKE SIGNAL, NOT SPEECH: PESQ SCORES ARE NOT CALIBRATED")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=12.0, help="seconds per scored call (default 12)"
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=4,
        help="calls per loss rate (default 4: with both directions, 8 tick phases 2.5 ms apart)",
    )
    parser.add_argument(
        "--cpu-duration", type=float, default=10.0, help="seconds per CPU call (default 10)"
    )
    parser.add_argument("--seed", type=int, default=1, help="first proxy seed (default 1)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="write speech and recordings to DIR and keep them"
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="use the synthetic speech-like signal"
    )
    parser.add_argument(
        "--bitrate",
        type=float,
        metavar="KBIT",
        help="experiment: the Opus bitrate for the calls and the baseline (default: "
        f"MediaConfig's, {MediaConfig().audio_bitrate // 1000} kbit/s)",
    )
    parser.add_argument(
        "--min-delay",
        type=float,
        metavar="MS",
        help="experiment: the jitter buffer's minimum target delay for the calls "
        f"(default: MediaConfig's, {MediaConfig().jitter.min_delay * 1000:g} ms)",
    )
    parser.add_argument(
        "--no-redundancy",
        action="store_true",
        help="experiment: calls without redundant copies under loss (FEC only)",
    )
    parser.add_argument(
        "--video-duration",
        type=float,
        default=10.0,
        help="seconds per video-through-loss call (default 10)",
    )
    parser.add_argument(
        "--video-only",
        action="store_true",
        help="run only the video-through-loss part (no PESQ, no CPU)",
    )
    parser.add_argument(
        "--no-align",
        action="store_true",
        help="experiment: play out on the capture tick instead of just after frames are due",
    )
    args = parser.parse_args()
    if not 1 <= args.runs <= 100 or not 2 <= args.duration <= 600:
        parser.error("need 1 <= --runs <= 100 and 2 <= --duration <= 600")
    if not 1 <= args.cpu_duration <= 600:
        parser.error("need 1 <= --cpu-duration <= 600")
    if not 2 <= args.video_duration <= 600:
        parser.error("need 2 <= --video-duration <= 600")
    if args.video_only:
        logging.basicConfig(level=logging.WARNING)
        video = run_video(args)
        if args.json:
            print(json.dumps({"video": video}, indent=2))
        else:
            print_video(video, args)
        return
    if pesq is None:
        raise SystemExit(
            "the pesq package is missing: .venv/bin/pip install -e '.[bench]' "
            "(it builds a C extension: needs a compiler)"
        )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_call_") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        speech = make_speech(workdir, force_synthetic=args.synthetic, seed=args.seed)
        progress(f"speech: {speech.how}")
        frames = round(args.duration / FRAME)
        baseline = run_baseline(speech, frames, args.seed, args.runs, media_config(args))
        progress(f"Opus delay {baseline['opus_delay_ms']:.2f} ms")
        calls = run_losses(args, workdir, speech, baseline["opus_delay_ms"])
        cpu = run_cpu(args, workdir, speech)
        video = run_video(args)
    decoder = open_opus_decoder()
    doc = {
        "params": {
            "duration_s": args.duration,
            "runs": args.runs,
            "cpu_duration_s": args.cpu_duration,
            "seed": args.seed,
            "losses": list(LOSSES),
            "jitter_min_delay_ms": media_config(args).jitter.min_delay * 1000,
            "audio_bitrate": media_config(args).audio_bitrate,
            "audio_redundancy": media_config(args).audio_redundancy,
            "align_playout": media_config(args).align_playout,
        },
        "speech": speech.how,
        "speech_synthetic": speech.synthetic,
        "opus_decoder": decoder.name,
        "baseline": baseline,
        "calls": calls,
        "cpu": cpu,
        "video": video,
        "goals": verdicts(calls, cpu),
        "wall_s": time.perf_counter() - started,
    }
    decoder.close()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_report(doc)
        print_video(video, args)
        print(f"wall time {doc['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
