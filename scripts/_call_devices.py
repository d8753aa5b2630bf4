"""scripts/bench_call.py's device path: a call through virtual sound devices.

Each side runs in a process of its own (scripts/_call_side.py) with ``--audio-in
mic:pulse --audio-out speaker:pulse``, against a private PulseAudio server
(:class:`p2pd.testing.pulse.PulseServer`) as tests/test_audio_devices.py sets it up:
``paplay`` plays each talker's speech into a null sink whose monitor is that side's
microphone, and ``parec`` records the monitor of the other side's speaker sink. So the
audio goes through everything a desktop's would (sounddevice, PortAudio, ALSA's pulse
plugin, PulseAudio, the call's microphone and speaker threads and device-clock playout),
and the recording is scored as the recorder path's is: cut into chunks of at most 12 s,
each aligned on the speech by cross-correlation and scored with wideband PESQ, beside
the same stretch of speech through the codec alone.

The sides run MediaConfig's defaults: ``--set``, ``--bitrate`` and the other experiment
flags of bench_call.py do not reach them. At most 2 calls (``--runs`` caps it).

Not measured here: mouth-to-ear. The two recordings and the players run in separate
processes with no common sample clock, so the delay between what a microphone heard and
what the other speaker played cannot be read to the millisecond.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _call_audio import (
    Speech,
    _summary,
    best_offset,
    chunks,
    pesq_wb,
    read_wav,
    source_frames,
)
from _call_common import CALL_SLACK, FRAME, progress
from _call_media import codec_reference

from p2pd.media import MediaConfig
from p2pd.media.codecs import SAMPLE_RATE
from p2pd.testing.pulse import TOOLS, PulseServer, stop_process
from p2pd.testing.speech import write_wav

SIDE_SCRIPT = Path(__file__).resolve().parent / "_call_side.py"
NAMES = ("alice", "bob")


def devices_missing() -> str | None:
    """Why the device path cannot run here, or None."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"PulseAudio tools missing: {', '.join(missing)} (scripts/_system_deps.sh audio)"
    probe = subprocess.run(
        [sys.executable, "-c", "import sounddevice"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        return "sounddevice does not load (pip install -e '.[audio]', libportaudio2)"
    return None


def device_call(workdir: Path, speech: Speech, seconds: float, run: int) -> dict[str, Any]:
    """One call through the virtual devices; per direction, what the sender's microphone
    was played (48 kHz) and what the receiver's speaker played, and each side's stats."""
    frames = int((seconds + 5) / FRAME)
    said = {}
    for name in NAMES:  # 48 kHz, so that paplay does not resample; longer than the call
        said[name] = np.concatenate(source_frames(speech.paths[name], frames))
        write_wav(workdir / f"dev_says_{name}.wav", said[name])
    root = Path(tempfile.mkdtemp(prefix="p2pd-pa-"))  # short: a unix socket lives there
    server = PulseServer(root, [f"{n}_{d}" for n in NAMES for d in ("mic", "speaker")])
    helpers: list[subprocess.Popen[bytes]] = []
    sides: dict[str, subprocess.Popen[str]] = {}
    heard = {name: workdir / f"dev_heard_{name}_{run}.wav" for name in NAMES}
    try:
        helpers += [server.record(f"{n}_speaker.monitor", heard[n]) for n in NAMES]
        helpers += [server.play(f"{n}_mic", workdir / f"dev_says_{n}.wav") for n in NAMES]

        def start(name: str, role: str, *extra: str) -> subprocess.Popen[str]:
            env = {
                **os.environ,
                **server.env,
                "PULSE_SOURCE": f"{name}_mic.monitor",
                "PULSE_SINK": f"{name}_speaker",
            }
            command = [
                sys.executable, str(SIDE_SCRIPT), role, "--duration", str(seconds),
                "--audio-in", "mic:pulse", "--audio-out", "speaker:pulse", *extra,
            ]  # fmt: skip
            return subprocess.Popen(
                command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env
            )

        sides["bob"] = start("bob", "answer")
        assert sides["bob"].stdout is not None
        hello = json.loads(sides["bob"].stdout.readline() or "null")
        if hello is None:
            raise SystemExit(f"{SIDE_SCRIPT.name} answer (devices) exited before listening")
        sides["alice"] = start("alice", "call", "--peer", str(hello["port"]), "--key", hello["key"])
        outputs = {n: sides[n].communicate(timeout=seconds + CALL_SLACK)[0] for n in NAMES}
    finally:
        for proc in sides.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for helper in helpers:
            stop_process(helper)
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    stats = {}
    for name in NAMES:
        lines = outputs[name].strip().splitlines()
        if sides[name].returncode != 0 or not lines:
            raise SystemExit(f"{SIDE_SCRIPT.name} ({name}, devices) failed")
        stats[name] = json.loads(lines[-1])["stats"]
    return {"said": said, "heard": heard, "stats": stats}


def score_direction(said: np.ndarray, heard: Path, config: MediaConfig) -> dict[str, Any]:
    """PESQ per chunk of what a speaker played, and of the same speech through the codec."""
    received = read_wav(heard)
    level = np.abs(received.astype(np.int32))
    loud = np.flatnonzero(level > 300)
    scores: list[float] = []
    codec_scores: list[float] = []
    if loud.size == 0:
        return {"pesq": scores, "pesq_codec": codec_scores, "seconds": 0.0}
    # From the first sound the speaker played to the last (the call's start and end).
    played = received[loud[0] : loud[-1]]
    frame_samples = round(FRAME * SAMPLE_RATE)
    reference = codec_reference(
        [
            said[i : i + frame_samples]
            for i in range(0, said.size - frame_samples + 1, frame_samples)
        ],
        config,
    )
    for start, end in chunks(played.size):
        if end - start < SAMPLE_RATE:
            continue
        piece = played[start:end]
        at = best_offset(said, piece)
        if at + piece.size > said.size:
            continue
        score = pesq_wb(said[at : at + piece.size], piece)
        codec = pesq_wb(said[at : at + piece.size], reference[at : at + piece.size])
        if score is not None and codec is not None:
            scores.append(score)
            codec_scores.append(codec)
    return {"pesq": scores, "pesq_codec": codec_scores, "seconds": played.size / SAMPLE_RATE}


def run_devices(
    workdir: Path, speech: Speech, seconds: float, runs: int, config: MediaConfig
) -> dict[str, Any]:
    """``runs`` device calls of ``seconds``; PESQ of both directions, the device counters."""
    why = devices_missing()
    if why is not None:
        progress(f"device path: NOT RUN: {why}")
        return {"skipped": why}
    scores: list[float] = []
    codec_scores: list[float] = []
    counters: dict[str, int] = {}
    for run in range(runs):
        progress(f"device path: call {run + 1}/{runs}, {seconds:g} s, PulseAudio null sinks")
        call = device_call(workdir, speech, seconds, run)
        for sender, receiver in (("alice", "bob"), ("bob", "alice")):
            result = score_direction(call["said"][sender], call["heard"][receiver], config)
            progress(
                f"  {sender} -> {receiver}'s speaker: {result['seconds']:.1f} s played, PESQ "
                f"{', '.join(f'{x:.2f}' for x in result['pesq']) or '-'} (codec only "
                f"{', '.join(f'{x:.2f}' for x in result['pesq_codec']) or '-'})"
            )
            scores += result["pesq"]
            codec_scores += result["pesq_codec"]
        for side_stats in call["stats"].values():
            for key in (
                "speaker_underruns",
                "mic_dropped_frames",
                "audio_frames_concealed",
                "audio_stretched",
                "audio_dropped",
                "audio_start_skipped",
            ):
                counters[key] = counters.get(key, 0) + int(side_stats.get(key) or 0)
    gaps = [c - x for x, c in zip(scores, codec_scores, strict=True)]
    return {
        "runs": runs,
        "seconds": seconds,
        "pesq": _summary(scores),
        "pesq_codec": _summary(codec_scores),
        "pesq_gap_mean": sum(gaps) / len(gaps) if gaps else None,
        "counters": counters,
    }
