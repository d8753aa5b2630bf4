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
4. **CPU per call:** each side in a process of its own (scripts/_call_side.py: its own
   trio thread, QUIC endpoint and codecs), its process CPU time (``time.process_time``,
   all its threads) over a ``--cpu-duration`` call with no proxy, per side: an idle
   connection (baseline), audio only, audio + video (``testsrc`` 640x480 at 30 fps), and
   audio + video recorded to WebM. (With both sides in one process on one thread, the
   figure could hardly pass 50 % of a core per side: the goal could not fail.)
5. **Video through loss:** ``--runs`` calls of ``--video-duration`` seconds per loss rate
   (0, 5, 10 %) through the same proxy (same seeds), a 440 Hz tone and ``testsrc``
   640x480@30 both ways, in up to three modes (``--video-modes``): keyframe requests
   only (``video_nack=False``, ``video_rate_adaptation=False``: what main did before
   NACKs), NACK retransmission at the fixed 800 kbit/s (``video_rate_adaptation=False``),
   and NACK with the bitrate following loss and RTT (the default). Per rate and mode:
   the share of sent frames that played (decoded on the other side), the frozen time
   (gaps between played frames over 100 ms, beyond the first 100 ms, as a share of the
   call) and the longest gap, what retransmission cost (bytes resent / video bytes), and
   the video bitrate: the target each side's controller settled at (its last value,
   mean and range over sides and calls), the encoders' bitrate averaged over the last
   half of each call, and the video actually sent. The modes take turns call by call
   (run 1 of each mode, then run 2, ...), so a change in the machine's load hits them
   alike. ``--video-only`` runs this part alone.

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

Each call chunk is also scored against the same stretch of sent speech through the codec
alone (no loss, no network): PESQ moves by 0.3 or more between stretches of one talker,
so that paired score, not the whole-file codec rows, is what the call's path is measured
against ("codec" and "gap" columns).

Goals (issue 15, ``_call_common.GOALS``), graded at the end, each on the workload it
names; every other figure is printed and not graded: at 0 % loss the call within 0.1
PESQ of the same chunks through the codec alone and every chunk >= 3.9; PESQ >= 3.9 at
5 % and >= 3.5 at 10 % loss; mouth-to-ear p95 <= 45 ms at 0 % loss (G.114 allows 150 ms;
the rest belongs to the network); one side of an audio + video call under half a core
(the busier side, in its own process); >= 95 % of video frames played at 5 % loss and
>= 85 % at 10 %. The machine's load average is printed before and after: on a shared
machine other work stalls the calls (the stalls show as capture tick lateness, playout
gaps and underruns), and only figures from one run compare. Only 127.0.0.1 is used;
every call has a deadline; progress on stderr.
Needs the ``bench`` extra (``pip install -e '.[bench]'``: the ``pesq`` package) and,
for real speech, ``espeak-ng`` on PATH.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio
from _call_audio import (
    Speech,
    make_speech,
    run_baseline,
)
from _call_common import (
    CALL_SLACK,
    FRAME,
    LOSSES,
    fmt,
    grade,
    pesq,
    progress,
)
from _call_devices import run_devices
from _call_media import (
    media_config,
    open_call,
    run_losses,
)

import p2pd.media.call as media_call
from p2pd.media import CallMedia, MediaConfig
from p2pd.media.codecs import (
    Vp8Decoder,
    open_opus_decoder,
)
from p2pd.media.wire import Kind
from p2pd.transport.quic import QuicPeer

# --------------------------------------------------------------------------- CPU


CPU_CASES = (
    ("idle connection (baseline)", None, None, None),
    ("audio only", "speech", None, None),
    ("audio + video 640x480@30", "speech", "testsrc", None),
    ("audio + video, WebM recording", "speech", "testsrc", ".webm"),
)


SIDE_SCRIPT = Path(__file__).resolve().parent / "_call_side.py"


def cpu_call(
    workdir: Path,
    speech: Speech,
    audio: str | None,
    video: str | None,
    suffix: str | None,
    seconds: float,
) -> dict[str, dict[str, Any]]:
    """One call, each side in a process of its own (scripts/_call_side.py): each side's
    CPU time, wall time and statistics, by name."""
    deadline = seconds + CALL_SLACK

    def command(name: str, role: str, *extra: str) -> list[str]:
        out = [sys.executable, str(SIDE_SCRIPT), role, "--duration", str(seconds), *extra]
        if audio is not None:
            out += ["--audio-in", f"file:{speech.paths[name]}"]
        if video is not None:
            out += ["--video-in", video]
        if suffix is not None:
            out += ["--record", str(workdir / f"{name}_cpu{suffix}")]
        return out

    bob = subprocess.Popen(
        command("bob", "answer"), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    alice: subprocess.Popen[str] | None = None
    try:
        assert bob.stdout is not None
        first = bob.stdout.readline()  # the answering side's port and key
        if not first:
            raise SystemExit(f"{SIDE_SCRIPT.name} answer exited before listening")
        hello = json.loads(first)
        alice = subprocess.Popen(
            command("alice", "call", "--peer", str(hello["port"]), "--key", hello["key"]),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        out_alice, _ = alice.communicate(timeout=deadline)
        out_bob, _ = bob.communicate(timeout=deadline)
    finally:
        for proc in (alice, bob):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    results = {}
    for name, proc, out in (("alice", alice, out_alice), ("bob", bob, out_bob)):
        lines = out.strip().splitlines()
        if proc is None or proc.returncode != 0 or not lines:
            raise SystemExit(f"{SIDE_SCRIPT.name} ({name}) failed: exit {proc and proc.returncode}")
        results[name] = json.loads(lines[-1])
    return results


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


#: --video-modes: name -> (label, MediaConfig fields).
VIDEO_MODES: dict[str, tuple[str, dict[str, bool]]] = {
    "kf": ("keyframe requests only", {"video_nack": False, "video_rate_adaptation": False}),
    "nack": ("NACK, fixed 800 kbit/s", {"video_nack": True, "video_rate_adaptation": False}),
    "adapt": ("NACK + rate adaptation", {"video_nack": True, "video_rate_adaptation": True}),
}


class _CountingPeer:
    """A ``MediaPeer`` in front of a ``QuicPeer`` that counts the video bytes sent."""

    def __init__(self, inner: QuicPeer) -> None:
        self.inner = inner
        self.video_bytes = 0

    @property
    def max_datagram_size(self) -> int:
        return self.inner.max_datagram_size

    def send_datagram(self, data: bytes) -> bool:
        sent = self.inner.send_datagram(data)
        if sent and data[:1] == bytes([Kind.VIDEO]):
            self.video_bytes += len(data)
        return sent

    async def wait_closed(self) -> None:
        await self.inner.wait_closed()


async def video_call(
    drop: float, seed: int, seconds: float, fields: dict[str, bool]
) -> dict[str, Any]:
    config = MediaConfig(**fields)
    _TimedVp8Decoder.played = []
    with trio.fail_after(seconds + CALL_SLACK):
        async with open_call(drop, seed) as (alice, bob, peer):
            counting = [_CountingPeer(peer), _CountingPeer(bob.incoming[0])]
            for side, quic_peer in zip((alice, bob), counting, strict=True):
                side.media = CallMedia(
                    quic_peer,
                    audio_in="tone:440",
                    video_in="testsrc",
                    record=None,
                    duration=seconds,
                    config=config,
                )
            assert alice.media is not None and bob.media is not None
            medias = (alice.media, bob.media)
            # The encoders' bitrate over the second half of the call: where it settled.
            encoder_kbps: list[float] = []
            async with trio.open_nursery() as nursery:
                await nursery.start(alice.media.run)
                await nursery.start(bob.media.run)
                await trio.sleep(seconds / 2)
                for _ in range(int(seconds * 5)):  # bounded: the call ends by itself
                    if any(m.statistics()["state"] == "ended" for m in medias):
                        break
                    encoder_kbps += [m.statistics()["video_encoder_kbps"] for m in medias]
                    await trio.sleep(0.2)
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
        "target_kbps": [s["video_target_kbps"] for s in stats],
        "encoder_kbps": encoder_kbps,
        "switches": sum(s["video_encoder_switches"] for s in stats),
        "video_bytes": sum(p.video_bytes for p in counting),
        "send_dropped": sum(s["datagrams_send_dropped"] for s in stats),
        "send_loss_pct": [s["video_send_loss_pct"] for s in stats],
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
        for drop in args.losses:
            # The modes take turns, call by call, so that each sees the same load (on this
            # shared machine one row run after another can see a load of 2, the next 6).
            by_mode: dict[str, list[dict[str, Any]]] = {m: [] for m in args.video_modes}
            for run in range(args.runs):
                for mode in args.video_modes:
                    label, fields = VIDEO_MODES[mode]
                    progress(f"video: {drop:.0%} loss, {label}, run {run + 1}/{args.runs}")
                    gc.collect()
                    by_mode[mode].append(
                        trio.run(video_call, drop, args.seed + run, args.video_duration, fields)
                    )
            for mode, runs in by_mode.items():
                label, fields = VIDEO_MODES[mode]
                sent = sum(r["sent"] for r in runs)
                played = sum(r["played"] for r in runs)
                targets = [t for r in runs for t in r["target_kbps"]]
                encoder = [k for r in runs for k in r["encoder_kbps"]]
                rows.append(
                    {
                        "loss": drop,
                        "recovery": label,
                        "mode": mode,
                        "nack": fields["video_nack"],
                        "adaptation": fields["video_rate_adaptation"],
                        "settled_target_kbps": sum(targets) / len(targets),
                        "settled_target_kbps_range": [min(targets), max(targets)],
                        "encoder_kbps_second_half": (
                            sum(encoder) / len(encoder) if encoder else None
                        ),
                        "encoder_switches": sum(r["switches"] for r in runs),
                        "send_dropped": sum(r["send_dropped"] for r in runs),
                        "video_sent_kbps": sum(r["video_bytes"] for r in runs)
                        * 8
                        / 1000
                        / max(1e-9, sum(r["call_s"] for r in runs)),
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
        f"{'loss':>4} {'recovery':<24} {'played':>7} {'per run':>16} {'frozen':>6} "
        f"{'max gap':>7} {'keyfr':>5} {'resent':>6} {'target kbit/s (range)':>21} "
        f"{'enc':>4} {'sent':>4} {'sw':>3} {'qdrop':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        per_run = "/".join(f"{x:.0f}" for x in r["played_pct_per_run"])
        low, high = r["settled_target_kbps_range"]
        target = f"{r['settled_target_kbps']:.0f} ({low:.0f}-{high:.0f})"
        encoder = fmt(r["encoder_kbps_second_half"], ".0f")
        print(
            f"{r['loss']:>4.0%} {r['recovery']:<24} {fmt(r['played_pct'], '.1f', '%'):>7} "
            f"{per_run:>16} {r['frozen_pct']:>5.1f}% {r['longest_gap_ms']:>5.0f}ms "
            f"{r['keyframes_sent']:>5} {r['retransmitted_pct']:>5.1f}% {target:>21} "
            f"{encoder:>4} {r['video_sent_kbps']:>4.0f} {r['encoder_switches']:>3} "
            f"{r['send_dropped']:>5}"
        )
    print(
        f"played = frames decoded by the receiver / frames sent; frozen = time in gaps "
        f"between played frames beyond {FREEZE * 1000:g} ms, share of the call; keyfr = "
        "keyframes sent; resent = retransmitted bytes / all bytes sent (audio, video, "
        "reports); target = each side's video target bitrate at the end of its call, mean "
        "(range); enc = the encoders' bitrate over the second half of the calls; sent = "
        "video sent per side (kbit/s, retransmissions included); sw = encoder switches; "
        "qdrop = datagrams dropped before sending, both sides, all calls (our QUIC congestion "
        "window's queue was full). "
        "Goals (issue 15), graded on the default (NACK + rate adaptation): >= 95 % played "
        "at 5 % loss, >= 85 % at 10 %."
    )


def run_cpu(args: argparse.Namespace, workdir: Path, speech: Speech) -> list[dict[str, Any]]:
    rows = []
    for label, audio, video, suffix in CPU_CASES:
        progress(f"CPU: {label}, {args.cpu_duration:g} s, each side in its own process")
        sides = cpu_call(workdir, speech, audio, video, suffix, args.cpu_duration)
        per_side = {name: 100 * r["cpu_s"] / r["wall_s"] for name, r in sides.items()}
        stats = [r["stats"] for r in sides.values() if r["stats"]]
        row = {
            "case": label,
            "cpu_pct_by_side": per_side,
            # Graded: the busier side.
            "cpu_pct_per_side": max(per_side.values()),
            "wall_s": max(r["wall_s"] for r in sides.values()),
            "video_frames_sent": sum(s["video_frames_sent"] for s in stats),
            "video_frames_received": sum(s["video_frames_received"] for s in stats),
            "audio_frames_concealed": sum(s["audio_frames_concealed"] for s in stats),
            "ticks_late": sum(s["ticks_late"] for s in stats),
        }
        progress(
            "  "
            + ", ".join(f"{name} {pct:.1f} %" for name, pct in per_side.items())
            + " of one core"
        )
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


def verdicts(
    losses: list[dict[str, Any]], cpu: list[dict[str, Any]], video: list[dict[str, Any]]
) -> dict[str, Any]:
    """Issue 15's goals (``_call_common.GOALS``), each on the workload it names."""
    by_loss = {r["loss"]: r for r in losses if r.get("mode", "adapt") == "adapt"}
    out: dict[str, Any] = {}
    if 0.0 in by_loss:
        zero = by_loss[0.0]
        out["pesq_gap_at_0"] = grade("pesq_gap_at_0", zero["pesq_gap"]["mean"])
        out["pesq_min_chunk_at_0"] = grade("pesq_min_chunk_at_0", zero["pesq"]["min"])
        out["m2e_p95_ms_at_0"] = grade("m2e_p95_ms_at_0", zero["m2e_ms"]["p95"])
    for drop, name in ((0.05, "pesq_at_5"), (0.10, "pesq_at_10")):
        if drop in by_loss:
            out[name] = grade(name, by_loss[drop]["pesq"]["mean"])
    av_row = next((r for r in cpu if r["case"].startswith("audio + video 640")), None)
    if av_row is not None:
        out["av_cpu_pct_per_side"] = grade("av_cpu_pct_per_side", av_row["cpu_pct_per_side"])
    # Graded: the default configuration (NACK and rate adaptation).
    played = {r["loss"]: r["played_pct"] for r in video if r["mode"] == "adapt"}
    if played:
        out["video_played_pct_at_5"] = grade("video_played_pct_at_5", played.get(0.05))
        out["video_played_pct_at_10"] = grade("video_played_pct_at_10", played.get(0.10))
    return out


def print_report(doc: dict[str, Any]) -> None:
    p, base = doc["params"], doc["baseline"]
    print(
        f"\nCalls on loopback: {p['runs']} call(s) of {p['duration_s']:g} s per loss rate, "
        f"both directions scored, proxy seeds {p['seed']}..{p['seed'] + p['runs'] - 1}, "
        f"Opus {p['audio_bitrate'] / 1000:g} kbit/s, jitter buffer min delay "
        f"{p['jitter_min_delay_ms']:g} ms, redundancy under loss "
        f"{'on' if p['audio_redundancy'] else 'OFF'}, playout "
        f"{'aligned to due frames' if p['align_playout'] else 'on the capture tick'}"
        f"; {_cpus()} CPU(s), one process; load average {p['load_before']} before, "
        f"{p['load_after']} after (other work on the machine stalls the calls: see the "
        "capture tick lateness and playout gaps below)."
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
        f"{'codec':>5} {'gap':>5} {'conceal':>7} {'FEC':>4} {'RED':>4} {'JB ms':>6}"
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
            f"{row['pesq']['n']:>3} {'-':>5} {'-':>5} {'-':>7} {'-':>4} {'-':>4} {'-':>6}"
        )
    for row in doc["calls"]:
        targets = row["jitter_target_ms"]
        jb = f"{min(targets):g}-{max(targets):g}" if targets else "-"
        if targets and min(targets) == max(targets):
            jb = f"{targets[0]:g}"
        label = "call via lossy proxy" if row.get("mode") == "adapt" else "call, Opus fixed"
        print(
            f"{label:<24} {row['bitrate_kbps']:>6.1f} {row['loss']:>4.0%} "
            f"{fmt(row['m2e_ms']['p50']):>7} {fmt(row['m2e_ms']['p95']):>7} "
            f"{fmt(row['pipeline_ms']['p50']):>8} {fmt(row['pipeline_ms']['p95']):>8} "
            f"{fmt(row['pipeline_ms']['max']):>8} {fmt(row['pesq']['mean'], '.2f'):>5} "
            f"{fmt(row['pesq']['min'], '.2f'):>5} {row['pesq']['n']:>3} "
            f"{fmt(row['pesq_codec']['mean'], '.2f'):>5} {fmt(row['pesq_gap']['mean'], '.2f'):>5} "
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
        "FEC (or RED) once packets are lost; their PESQ is of whole 12 s stretches. codec / "
        "gap (call rows): the mean PESQ of the same chunks of sent speech through the codec "
        "alone (no loss), and the mean of (codec - call) per chunk: what the call's path "
        "costs, on the same samples."
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
            f"measured loss {fmt(row['measured_loss_pct'], '.1f')} %; late {row['late']} "
            f"(concealed in speech as lost {row['late_concealed']}; delay peaks held "
            f"{row['peaks_held']}), "
            f"accelerate-dropped {row['dropped']}; redundant copies sent {row['red_sent']}; "
            f"worst capture tick lateness {fmt(row['capture_late_max_ms'])} ms, longest "
            f"playout gap over 20 ms {fmt(row['playout_late_max_ms'])} ms; "
            f"full GCs {row['gc_full_collections']} (max {fmt(row['gc_full_max_ms'])} ms)"
        )
    print()
    print_devices(doc["devices"])
    header = (
        f"{'CPU case':<32} {'alice %':>7} {'bob %':>7} {'wall s':>7} {'video rx/tx':>12} "
        f"{'late ticks':>10} {'concealed':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in doc["cpu"]:
        video = (
            f"{row['video_frames_received']}/{row['video_frames_sent']}"
            if row["video_frames_sent"]
            else "-"
        )
        by = row["cpu_pct_by_side"]
        print(
            f"{row['case']:<32} {by['alice']:>7.1f} {by['bob']:>7.1f} {row['wall_s']:>7.2f} "
            f"{video:>12} {row['ticks_late']:>10} {row['audio_frames_concealed']:>9}"
        )
    print(
        "% = one side's process CPU time (all its threads) during its call / its wall "
        "time: each side runs in a process of its own (scripts/_call_side.py), with its "
        "QUIC endpoint and codecs, on 127.0.0.1, no proxy; no recording unless named. "
        "testsrc video both ways. late ticks: 20 ms capture ticks skipped after a stall "
        "(over 200 ms behind); video rx/tx: frames decoded / sent, both sides. The goal "
        "grades the busier side of the audio + video call."
    )


def print_devices(dev: dict[str, Any]) -> None:
    if "skipped" in dev:
        print(f"Device path (PulseAudio null sinks): NOT RUN: {dev['skipped']}\n")
        return
    c = dev["counters"]
    print(
        f"Device path: {dev['runs']} call(s) of {dev['seconds']:g} s, each side in its own "
        "process, mic:pulse -> speaker:pulse through a private PulseAudio's null sinks (no "
        f"proxy): PESQ {fmt(dev['pesq']['mean'], '.2f')} (min {fmt(dev['pesq']['min'], '.2f')}, "
        f"n={dev['pesq']['n']}), the same chunks through the codec alone "
        f"{fmt(dev['pesq_codec']['mean'], '.2f')}, gap {fmt(dev['pesq_gap_mean'], '.2f')}; "
        f"speaker underruns {c.get('speaker_underruns', 0)}, microphone frames dropped "
        f"{c.get('mic_dropped_frames', 0)}, concealed {c.get('audio_frames_concealed', 0)}, "
        f"stretched {c.get('audio_stretched', 0)}, accelerate-dropped "
        f"{c.get('audio_dropped', 0)}, skipped before playout started "
        f"{c.get('audio_start_skipped', 0)} (both sides, all calls). Not graded; mouth-to-ear is "
        "not measured on this path (no common clock between the recordings).\n"
    )


def print_goals(doc: dict[str, Any]) -> None:
    print()
    for name, v in doc["goals"].items():
        print(f"goal {name}: {fmt(v['value'], '.3f')} {v['goal']}: {'PASS' if v['ok'] else 'MISS'}")
    print("(every other figure above is not graded)")
    if doc["speech_synthetic"]:
        print("WARNING: SYNTHETIC SPEECH-LIKE SIGNAL, NOT SPEECH: PESQ SCORES ARE NOT CALIBRATED")


def _load() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` shows them."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


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
        "--video-modes",
        default=",".join(VIDEO_MODES),
        metavar="MODE,...",
        help="video-through-loss modes, in order (default kf,nack,adapt: keyframe requests "
        "only; NACK at a fixed bitrate; NACK + rate adaptation, the default and graded)",
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
    parser.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="experiment: a numeric (or 0/1) MediaConfig field for the calls (jitter.FIELD for "
        "the jitter buffer's), e.g. --set playout_underrun_hold=2 --set "
        "jitter.late_in_speech_lost=0",
    )
    parser.add_argument(
        "--audio-modes",
        default="adapt",
        metavar="MODE,...",
        help="calls with Opus adaptation (adapt, the default and graded) and/or fixed "
        "settings (fixed: 48 kbit/s, FEC for 10 %%, as before adaptation)",
    )
    parser.add_argument(
        "--losses",
        default=",".join(f"{x * 100:g}" for x in LOSSES),
        metavar="PCT,...",
        help="datagram loss rates in percent (default 0,5,10: what the goals name)",
    )
    parser.add_argument(
        "--skip",
        default="",
        metavar="PART,...",
        help="experiment: leave out parts: what-ifs (the other codec settings), devices, cpu, "
        "video",
    )
    args = parser.parse_args()
    try:
        args.losses = tuple(float(x) / 100 for x in args.losses.split(","))
    except ValueError:
        parser.error("--losses takes percentages, e.g. 0,5,10")
    if not all(0 <= x < 1 for x in args.losses):
        parser.error("--losses: each rate in [0, 100)")
    args.skip = {x for x in args.skip.split(",") if x}
    args.audio_modes = [x for x in args.audio_modes.split(",") if x]
    if not args.audio_modes or set(args.audio_modes) - {"adapt", "fixed"}:
        parser.error("--audio-modes takes adapt,fixed")
    if args.skip - {"what-ifs", "devices", "cpu", "video"}:
        parser.error("--skip takes what-ifs, devices, cpu, video")
    if not 1 <= args.runs <= 100 or not 2 <= args.duration <= 600:
        parser.error("need 1 <= --runs <= 100 and 2 <= --duration <= 600")
    if not 1 <= args.cpu_duration <= 600:
        parser.error("need 1 <= --cpu-duration <= 600")
    if not 2 <= args.video_duration <= 600:
        parser.error("need 2 <= --video-duration <= 600")
    args.video_modes = [x for x in args.video_modes.split(",") if x]
    if not args.video_modes or set(args.video_modes) - set(VIDEO_MODES):
        parser.error(f"--video-modes takes {','.join(VIDEO_MODES)}")
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
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="bench_call_") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        speech = make_speech(workdir, force_synthetic=args.synthetic, seed=args.seed)
        progress(f"speech: {speech.how}")
        frames = round(args.duration / FRAME)
        baseline = run_baseline(
            speech,
            frames,
            args.seed,
            args.runs,
            media_config(args),
            losses=args.losses,
            what_ifs="what-ifs" not in args.skip,
        )
        progress(f"Opus delay {baseline['opus_delay_ms']:.2f} ms")
        calls = run_losses(args, workdir, speech, baseline["opus_delay_ms"])
        devices = (
            {"skipped": "--skip devices"}
            if "devices" in args.skip
            else run_devices(workdir, speech, args.duration, min(args.runs, 2), media_config(args))
        )
        cpu = [] if "cpu" in args.skip else run_cpu(args, workdir, speech)
        video = [] if "video" in args.skip else run_video(args)
    decoder = open_opus_decoder()
    doc = {
        "params": {
            "duration_s": args.duration,
            "runs": args.runs,
            "cpu_duration_s": args.cpu_duration,
            "seed": args.seed,
            "losses": list(args.losses),
            "load_before": load_before,
            "load_after": _load(),
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
        "devices": devices,
        "cpu": cpu,
        "video": video,
        "goals": verdicts(calls, cpu, video),
        "wall_s": time.perf_counter() - started,
    }
    decoder.close()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_report(doc)
        if video:
            print_video(video, args)
        print_goals(doc)
        print(f"wall time {doc['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
