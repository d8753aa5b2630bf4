"""scripts/bench_call.py's instrumented calls: two sides in one process through the lossy
proxy, what each packet and playout decision was, and the analysis per loss rate."""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import random
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import trio
from _bench import percentile
from _call_audio import (
    Speech,
    _mean,
    _summary,
    best_offset,
    chunks,
    codec_delay,
    codec_only,
    pesq_wb,
    read_wav,
)
from _call_common import (
    ALIGN_SEARCH,
    AUDIO_KINDS,
    CALL_SLACK,
    FRAME,
    LOCALHOST,
    fmt,
    progress,
)

import p2pd.media.call as media_call
from p2pd.identity import Identity
from p2pd.media import CallMedia, MediaConfig
from p2pd.media.codecs import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
)
from p2pd.media.jitter import JitterBuffer, Playout, PlayoutKind
from p2pd.media.sinks import WavRecorder, open_recorder
from p2pd.media.sources import AudioSource, open_audio_source
from p2pd.media.wire import AudioPacket, decode
from p2pd.testing.proxy import open_lossy_proxy
from p2pd.transport.quic import QuicEndpoint, QuicPeer, open_quic_endpoint
from p2pd.transport.udp import UdpEndpoint
from p2pd.wire import Address

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

    def send_datagram(self, data: bytes, *, urgent: bool = False) -> bool:
        if data and data[0] in AUDIO_KINDS and self.trace.reads:
            packet = decode(data)
            assert isinstance(packet, AudioPacket)
            self.trace.capture[packet.seq] = self.trace.reads[-1]
            self.trace.sent_at[packet.seq] = trio.current_time()
        return self.inner.send_datagram(data, urgent=urgent)

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


def codec_reference(frames: list[np.ndarray], config: MediaConfig) -> np.ndarray:
    """What the call's codec alone makes of ``frames`` (the call's Opus settings, no loss,
    no network, no jitter buffer), shifted by its measured delay so that sample ``i`` of
    the result stands for sample ``i`` of the input."""
    # The settings a clean call's encoder ends with: with adaptation, FEC off after 10 s
    # (audiorate.py), so the stricter reference (codec alone without FEC: +0.09 PESQ).
    fec = not config.audio_rate_adaptation
    out, _, _ = codec_only(frames, 0.0, 0, bitrate=config.audio_bitrate, fec=fec, red=False)
    x = np.concatenate(frames)
    delay = codec_delay(x, out)
    return np.concatenate([out[delay:], np.zeros(delay, np.int16)])


def analyse(direction: Direction, config: MediaConfig) -> dict[str, Any]:
    """Per-frame latency, PESQ per chunk and the acoustic cross-check of one direction.

    Each chunk is scored twice: the call's recording against what was sent, and the same
    stretch of what was sent through the codec alone (:func:`codec_reference`) against
    it. The difference is what the call's path (network, jitter buffer, playout) costs,
    on the same speech: PESQ varies by 0.3 or more between stretches of one talker, so
    only a score of the same samples is a fair baseline."""
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
    reference = np.concatenate(
        [np.zeros(margin, np.int16), codec_reference(sent_trace.sent, config)]
    )
    received = read_wav(direction.recording)
    reads = sent_trace.reads

    def spoken_at(i: int) -> float:
        """When sent sample ``i`` (0 = the source's first) was spoken, for a live
        microphone: a frame's first sample came FRAME before the frame was read."""
        frame = min(max(i // FRAME_SAMPLES, 0), len(reads) - 1)
        return reads[frame] - FRAME + (i - frame * FRAME_SAMPLES) / SAMPLE_RATE

    scores: list[float] = []
    codec_scores: list[float] = []
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
        codec = pesq_wb(sent[at : at + end - start], reference[at : at + end - start])
        if score is not None and codec is not None:
            scores.append(score)
            codec_scores.append(codec)
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
        "pesq_codec": codec_scores,
        "acoustic_m2e": acoustic,
        "tick_phase_ms": _ms(phase),
        "capture_late_max_ms": _ms(_max_lateness(reads)),
        "playout_late_max_ms": _ms(_max_gap([t for t, *_ in heard.played])),
        "frames_played": s["audio_frames_played"],
        "frames_concealed": s["audio_frames_concealed"],
        "fec_recovered": s["audio_fec_recovered"],
        "red_recovered": s["audio_red_recovered"],
        "red_sent_by_peer": direction.sender_stats["audio_red_sent"],
        "opus_end": (
            f"{direction.sender_stats.get('audio_encoder_kbps')} kbit/s, FEC "
            f"{direction.sender_stats.get('audio_fec_packet_loss_pct')} %, "
            f"{direction.sender_stats.get('audio_encoder_switches')} switches"
        ),
        "loss_pct": s["loss_pct"],
        "late": s["audio_late"],
        "late_concealed": s.get("audio_late_concealed", 0),
        "peaks_held": s.get("audio_delay_peaks_held", 0),
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
    # Opus adaptation on (the default, graded) and, with --audio-modes, fixed settings
    # (48 kbit/s, FEC planned for 10 %: what calls sent before); per loss rate, each
    # mode's calls back to back (same seeds and tick phases).
    configs = {
        "adapt": media_config(args),
        "fixed": replace(media_config(args), audio_rate_adaptation=False),
    }
    for drop in args.losses:
        for mode in args.audio_modes:
            rng = random.Random(args.seed + round(drop * 1000))  # same phases per mode
            rows.append(_run_loss(args, workdir, speech, opus_delay, drop, mode, configs, rng))
    return rows


def _run_loss(
    args: argparse.Namespace,
    workdir: Path,
    speech: Speech,
    opus_delay: float,
    drop: float,
    mode: str,
    configs: dict[str, MediaConfig],
    rng: random.Random,
) -> dict[str, Any]:
    config = configs[mode]
    per_run = []
    gc_pauses = GcPauses()
    # Systematic sampling of the tick phase: one random start, then evenly spaced.
    # (Each call gives both directions, phases p and 20 ms - p, which stay even too.)
    first = rng.random()
    offsets = [(k + first) / args.runs * FRAME for k in range(args.runs)]
    for k, offset in enumerate(offsets):
        seed = args.seed + k
        progress(
            f"call ({mode}) {drop:.0%} loss, run {k + 1}/{args.runs} (proxy seed {seed}, "
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
            result = analyse(d, config)
            result["seed"], result["offset_ms"] = seed, offset * 1000
            lat = result["latencies"]
            progress(
                f"  {d.sender} -> other: tick phase {fmt(result['tick_phase_ms'])} ms, "
                f"pipeline p50/p95 "
                f"{fmt(_ms(percentile(lat, 50)))}/{fmt(_ms(percentile(lat, 95)))} ms, "
                f"PESQ {', '.join(f'{x:.2f}' for x in result['pesq']) or '-'} "
                f"(codec only {', '.join(f'{x:.2f}' for x in result['pesq_codec']) or '-'}), "
                f"loss {result['loss_pct']:.1f} %, concealed {result['frames_concealed']}, "
                f"FEC {result['fec_recovered']}, RED {result['red_recovered']} "
                f"(copies sent {result['red_sent_by_peer']}); Opus at the end "
                f"{result['opus_end']}"
            )
            per_run.append(result)
    row = summarise_loss(drop, per_run, opus_delay)
    row["gc_full_collections"] = len(gc_pauses.pauses)
    row["gc_full_max_ms"] = _ms(max(gc_pauses.pauses, default=None))
    row["mode"] = mode
    row["opus_end"] = [r.get("opus_end") for r in per_run]
    return row


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
    for item in getattr(args, "set", None) or []:
        name, _, text = item.partition("=")
        target: Any = config.jitter if name.startswith("jitter.") else config
        field_name = name.removeprefix("jitter.")
        current = getattr(target, field_name, None)
        if current is None or isinstance(current, str) or not text:
            raise SystemExit(f"--set {item}: not a numeric MediaConfig (or jitter.) field")
        value: Any
        if isinstance(current, bool):
            value = bool(int(text))  # 0 or 1
        elif isinstance(current, int):
            value = int(float(text))
        else:
            value = float(text)
        if name.startswith("jitter."):
            config = replace(config, jitter=replace(config.jitter, **{field_name: value}))
        else:
            config = replace(config, **{field_name: value})
    return config


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def summarise_loss(drop: float, per_run: list[dict[str, Any]], opus_delay: float) -> dict[str, Any]:
    latencies = sorted(x for r in per_run for x in r["latencies"])
    scores = [x for r in per_run for x in r["pesq"]]
    codec_scores = [x for r in per_run for x in r["pesq_codec"]]
    gaps = [c - x for r in per_run for x, c in zip(r["pesq"], r["pesq_codec"], strict=True)]
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
        # The same chunks through the codec alone, and what the call lost against that.
        "pesq_codec": _summary(codec_scores),
        "pesq_gap": {
            "mean": _mean(gaps),
            "max": max(gaps, default=None),
        },
        "measured_loss_pct": _mean([r["loss_pct"] for r in per_run]),
        "bitrate_kbps": _mean([r["bitrate_kbps"] for r in per_run]),
        "concealed_pct": (
            100 * sum(r["frames_concealed"] for r in per_run) / played if played else None
        ),
        "fec_recovered": sum(r["fec_recovered"] for r in per_run),
        "red_recovered": sum(r["red_recovered"] for r in per_run),
        "red_sent": sum(r["red_sent_by_peer"] for r in per_run),
        "late": sum(r["late"] for r in per_run),
        "late_concealed": sum(r["late_concealed"] for r in per_run),
        "peaks_held": sum(r["peaks_held"] for r in per_run),
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
