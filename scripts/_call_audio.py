"""scripts/bench_call.py's speech and signal work: the speech it sends, alignment, PESQ, and
the codec-only baseline it compares calls with."""

from __future__ import annotations

import itertools
import math
import random
import shutil
import statistics
import subprocess
import sys
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import av
import numpy as np
from _bench import percentile
from _call_common import (
    ESPEAK_TIMEOUT,
    FRAME,
    HARVARD,
    LOSSES,
    PESQ_CHUNK,
    PESQ_RATE,
    VOICES,
    PesqError,
    log,
    pesq,
    progress,
)

from p2pd.media import MediaConfig
from p2pd.media.codecs import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    OpusEncoder,
    open_opus_decoder,
)
from p2pd.media.plc import ConcealmentFloor
from p2pd.media.sources import FileAudioSource
from p2pd.testing.speech import speech_like, write_wav

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
    through the concealment floor, as ``AudioPlayout.play`` (p2pd/media/playout.py)
    does. Returns the output, the compute time (s) per frame (encode plus decode) and
    the bytes of Opus sent.

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
    speech: Speech,
    frames_per_call: int,
    seed: int,
    runs: int,
    config: MediaConfig,
    *,
    losses: tuple[float, ...] = LOSSES,
    what_ifs: bool = True,
) -> dict[str, Any]:
    """Codec-only PESQ per loss rate with the calls' Opus settings, the same with other
    settings (what the codec alone allows), and the codec's delay and compute time.
    Lossy rows draw ``runs`` loss patterns per talker, as many as the calls get."""
    sent = {side: source_frames(path, frames_per_call) for side, path in speech.paths.items()}
    bitrate = config.audio_bitrate
    # (label, bitrate, FEC, RED, loss): the calls' settings first, then what-ifs.
    variants = [("codec only", bitrate, True, False, drop) for drop in losses]
    variants += [("codec only, RED + FEC", bitrate, True, True, d) for d in losses if d]
    if what_ifs:
        variants.append(("codec only, no FEC", bitrate, False, False, 0.0))
    for other, drops in ((32000, (0.0, 0.05)), (48000, (0.0, 0.05)), (64000, (0.0,))):
        if other != bitrate and what_ifs:
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
