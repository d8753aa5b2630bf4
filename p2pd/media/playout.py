"""A call's playout: what is received, decoded and played (to a speaker, a recording, or
both) on a clock of its own. :class:`AudioPlayout` and :class:`VideoPlayout`;
:class:`~p2pd.media.call.CallMedia` builds and wires them, and runs their loops.

Audio. One playout decision per 20 ms from the :class:`~p2pd.media.jitter.JitterBuffer`
(play, rebuild from FEC or a redundant copy, conceal), decoded, passed through the
:class:`~p2pd.media.plc.ConcealmentFloor` and written. Without a speaker the tick is
trio's clock, kept just after the moment frames fall due (:func:`~p2pd.media.jitter.align_tick`)
rather than on the capture clock, whose phase against the peer's is arbitrary; after a
stall of over 200 ms it skips ahead instead of bursting, and the recording gets the
skipped ticks as silence. With a speaker the device's clock paces playout
(:mod:`p2pd.media.devices`). With ``align_playout`` off the capture loop plays, on its
own tick (:meth:`AudioPlayout.play`).

Video. Frames the :class:`~p2pd.media.assembler.FrameAssembler` completed are queued
(from before the call runs too), decoded as they come and recorded; a frame the decoder
refuses counts as lost to the assembler (which asks for a keyframe).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import trio

from ..errors import LocalError
from .assembler import AssembledFrame
from .codecs import FRAME_SAMPLES, SAMPLE_RATE, LibopusDecoder, PyAVOpusDecoder, Vp8Decoder
from .devices import SpeakerSink
from .jitter import JitterBuffer, Playout, PlayoutKind, align_tick
from .plc import ConcealmentFloor, Loudness
from .sinks import Recorder
from .wire import MediaWireError

__all__ = ["FRAME_DURATION", "AudioPlayout", "PlayoutCounters", "PlayoutTiming", "VideoPlayout"]

log = logging.getLogger(__name__)

#: One audio frame (20 ms): the playout tick.
FRAME_DURATION = FRAME_SAMPLES / SAMPLE_RATE


class PlayoutTiming(Protocol):
    """What the playout clock reads of the call's settings: :class:`~p2pd.media.call.MediaConfig`'s
    fields of these names, which document them."""

    @property
    def align_playout(self) -> bool: ...
    @property
    def playout_margin(self) -> float: ...
    @property
    def playout_tolerance(self) -> float: ...
    @property
    def playout_underrun_hold(self) -> float: ...
    @property
    def playout_underrun_repeats(self) -> int: ...
    @property
    def playout_underrun_merge(self) -> float: ...


@dataclass
class PlayoutCounters:
    """What audio playout did (the call's statistics show them)."""

    frames_played: int = 0
    concealed: int = 0
    fec_recovered: int = 0
    red_recovered: int = 0
    decode_errors: int = 0
    #: Ticks the playout clock skipped after a stall (silence in the recording).
    skipped: int = 0


class AudioPlayout:
    """Plays the jitter buffer's decisions (see the module docstring). Built once the
    call's decoder, recording and speaker are open (``recorder`` / ``speaker`` None: none);
    ``device_failed(message)`` is the call's: a speaker that failed for good ends it."""

    def __init__(
        self,
        timing: PlayoutTiming,
        jitter: JitterBuffer,
        decoder: LibopusDecoder | PyAVOpusDecoder,
        *,
        recorder: Recorder | None,
        speaker: SpeakerSink | None,
        device_failed: Callable[[str], None],
    ) -> None:
        self.timing = timing
        self.jitter = jitter
        self.decoder = decoder
        self.recorder = recorder
        self.speaker = speaker
        self._device_failed = device_failed
        self.counters = PlayoutCounters()
        self.floor = ConcealmentFloor(FRAME_SAMPLES)
        self._loudness = Loudness()
        #: Whether the last frame played was quiet: the jitter buffer and the clock
        #: move the timeline only then.
        self._quiet = True

    async def run(self, start: float) -> None:
        """One playout decision per 20 ms, on a clock of its own (see the module
        docstring): the first tick with the capture clock, then each one frame after the
        last, moved by :func:`align_tick` to just after the moment frames fall due."""
        t = self.timing
        if self.speaker is not None:
            await self._run_device(self.speaker)
            return
        if not t.align_playout:
            return  # the capture loop plays
        tick = start
        # When each underrun began (those within playout_underrun_merge are one), for
        # the hold; and when the last underrun tick was.
        underruns: deque[float] = deque(maxlen=max(1, t.playout_underrun_repeats))
        last_underrun = -math.inf
        while True:
            await trio.sleep_until(tick)
            now = trio.current_time()
            # Decide as of the tick's own time, not of a late wake-up: a stalled thread
            # makes frames look overdue, and the jitter buffer would drop one, then find
            # itself empty on the next, back-to-back tick and stretch (measured: a drop
            # and a stretch within 20 ms, both audible, after each ~50 ms stall).
            decision = self.play(now, tick)
            # A concealed tick that stands for no frame, once playing: the next frame
            # is late (an underrun) or not due (the target grew).
            waiting = decision is not None and decision.seq is None
            if decision is not None and decision.underrun:
                if not underruns or now - last_underrun > t.playout_underrun_merge:
                    underruns.append(now)
                last_underrun = now
            nominal = tick + FRAME_DURATION
            behind = trio.current_time() - nominal
            if behind > 10 * FRAME_DURATION:
                # Starved of CPU for over 200 ms: skip ahead rather than burst; the
                # jitter buffer drops or jumps over what is overdue by then.
                skipped = int(behind / FRAME_DURATION)
                nominal += skipped * FRAME_DURATION
                self._record_skipped(skipped, now)
            # The clock moves only after a quiet frame, in a pause: moving it by up to
            # half a frame is then as good as adding or cutting that much silence, which
            # a receiver playing to a sound device would do to follow (here playout feeds
            # a recorder, and the samples do not move). Nor while the buffer waits for a
            # late frame: catching up would only conceal faster.
            rephase = self._quiet and not waiting
            tick = align_tick(
                nominal,
                self.jitter.next_due() if rephase else None,
                FRAME_DURATION,
                margin=t.playout_margin,
                tolerance=t.playout_tolerance,
                catch_up=not self._hold_for_underruns(underruns, now),
            )

    def _record_skipped(self, ticks: int, now: float) -> None:
        """Playout skipped ``ticks`` after a stall: the recording gets as many frames of
        silence (concealment, so trailing ones are held back as any), as a speaker would
        have played nothing then. Without them the recording's audio is short of the
        call by the stall and, in a .mkv / .webm, early against the video, which is
        placed by its timestamps (measured under CPU starvation: 0.4-1.2 s of audio for
        a 3 s call, against 25-42 video frames spread over it)."""
        self.counters.skipped += ticks
        if self.recorder is None or not self.jitter.started:
            return  # the recording starts at the first frame played
        silence = np.zeros(FRAME_SAMPLES, np.int16)
        for _ in range(ticks):  # bounded: the ticks the stall lasted
            self.recorder.write_audio(silence, concealed=True, now=now)

    def _hold_for_underruns(self, underruns: deque[float], now: float) -> bool:
        """Whether the playout clock keeps the delay underruns added: the last
        ``playout_underrun_repeats`` of them came within ``playout_underrun_hold`` of each
        other, the last of them within ``playout_underrun_hold`` of now."""
        t = self.timing
        return (
            bool(underruns)
            and len(underruns) >= t.playout_underrun_repeats
            and underruns[-1] - underruns[0] < t.playout_underrun_hold
            and now - underruns[-1] < t.playout_underrun_hold
        )

    async def _run_device(self, speaker: SpeakerSink) -> None:
        """Playout on the speaker's clock: whenever the device's queue falls under its
        low-water mark, frames are taken from the jitter buffer until it is above again.

        The device consumes samples at its own rate, which differs from the sender's
        capture clock by up to a few hundred ppm; the jitter buffer absorbs that as it
        absorbs a changing network delay, by stretching (a frame of concealment) when
        frames are not due yet and dropping one when they pile up two frames overdue,
        both waiting for a quiet frame (tests/test_media_drift.py runs 200 and 1000 ppm
        for minutes: no underrun, no overflow, bounded depth). Before the first frame is
        due the device gets silence."""
        try:
            while True:
                try:
                    await speaker.wait_for_room()
                except LocalError as exc:
                    self._device_failed(exc.message)
                    return
                now = trio.current_time()
                for _ in range(64):  # bounded: a few frames at most are missing
                    if not speaker.needs_more:
                        break
                    if self.play(now) is None:  # not started: silence until then
                        speaker.write(np.zeros(FRAME_SAMPLES, np.int16), audio=False)
        finally:
            speaker.stop_feeding()

    def play(self, now: float, tick: float | None = None) -> Playout | None:
        """Play one tick: the jitter buffer's decision for ``tick`` (default ``now``),
        decoded and recorded at ``now``."""
        decision = self.jitter.pop(now if tick is None else tick, quiet=self._quiet)
        if decision is None:
            return decision
        c = self.counters
        decoder = self.decoder
        concealed = True
        try:
            if decision.kind is PlayoutKind.FRAME:
                assert decision.payload is not None
                pcm = decoder.decode(decision.payload)
                concealed = False
            elif decision.kind is PlayoutKind.REDUNDANT:
                assert decision.payload is not None
                pcm = decoder.decode(decision.payload)
                c.red_recovered += 1
                concealed = False
            elif decision.kind is PlayoutKind.FEC:
                assert decision.payload is not None
                pcm, recovered = decoder.decode_fec(decision.payload)
                if recovered:
                    c.fec_recovered += 1
                    concealed = False
                else:
                    c.concealed += 1
            else:
                pcm = decoder.conceal()
                c.concealed += 1
        except MediaWireError:
            c.decode_errors += 1
            pcm = decoder.conceal()
            c.concealed += 1
        pcm = self.floor.conceal(pcm) if concealed else self.floor.good(pcm)
        self._quiet = self._loudness.quiet(pcm)
        c.frames_played += 1
        if self.speaker is not None:
            self.speaker.write(pcm)
        if self.recorder is not None:
            self.recorder.write_audio(pcm, concealed=concealed, now=now)
        return decision


class VideoPlayout:
    """Decodes and records the video frames the assembler completed (see the module
    docstring); ``decode_failed(now)`` is the assembler's: a refused frame is a loss."""

    def __init__(self, decode_failed: Callable[[float], None]) -> None:
        self._decode_failed = decode_failed
        self._frames: deque[AssembledFrame] = deque()
        self._ready = trio.Event()
        self.frames_received = 0
        self.decode_errors = 0

    def push(self, frames: list[AssembledFrame]) -> None:
        """Queue completed frames for :meth:`run` (taken before it runs too)."""
        self._frames.extend(frames)
        if frames:
            self._ready.set()

    async def run(self, recorder: Recorder | None) -> None:
        """Decode what is queued as it comes, and record it, until cancelled."""
        decoder = Vp8Decoder()
        while True:
            await self._ready.wait()
            self._ready = trio.Event()
            while self._frames:
                frame = self._frames.popleft()
                now = trio.current_time()
                try:
                    pictures = decoder.decode(frame.data)
                except MediaWireError:
                    self.decode_errors += 1
                    self._decode_failed(now)
                    self._frames.clear()
                    continue
                if not pictures:
                    continue
                self.frames_received += 1
                if recorder is not None:
                    recorder.write_video(
                        frame.data, keyframe=frame.keyframe, timestamp=frame.timestamp, now=now
                    )
            await trio.lowlevel.checkpoint()
