"""Putting a new Opus encoder in mid-call without a stall or a click (the trio side of
p2pd/media/audiorate.py).

Opening an encoder is cheap (~1 ms), but PyAV's first encode on it sets up its
resampler, 20-40 ms here (measured, see ``CallMedia._open_encoder``): done in the audio
loop, that is a capture tick late and a frame late at the peer. So
:meth:`EncoderSwitcher.serve` opens and warms up the new encoder in a worker thread while
the old one keeps encoding, and :meth:`EncoderSwitcher.take` puts it in at the next
quiet frame (a pause; at most ``max_defer`` frames, 0.2 s, later), primed first with the frame
before: a fresh encoder's first packet decodes to its look-ahead (6.5 ms) of silence
before the signal, a click in speech; primed, its first packet continues the sound.
The peer's decoder sees nothing but packets (a new encoder needs no signalling: each
Opus packet's TOC byte says how to decode it).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import trio

from .audiorate import AudioRateController, OpusSettings
from .codecs import FRAME_SAMPLES, OpusEncoder, Pcm
from .plc import Loudness

__all__ = ["EncoderSwitcher", "open_warm_encoder"]

log = logging.getLogger(__name__)


def open_warm_encoder(settings: OpusSettings) -> OpusEncoder:
    """An Opus encoder with ``settings`` that has encoded one frame of silence (its
    output not sent), so its next encode is quick."""
    encoder = OpusEncoder(
        bitrate=settings.bitrate, packet_loss=settings.packet_loss, fec=settings.fec
    )
    encoder.encode(np.zeros(FRAME_SAMPLES, np.int16))
    return encoder


class EncoderSwitcher:
    """Asks ``controller`` after each report, opens what it wants in a thread, hands the
    encoder over in a pause. Run :meth:`serve` in the call's nursery."""

    def __init__(self, controller: AudioRateController, *, max_defer: int = 10) -> None:
        self.controller = controller
        self.max_defer = max_defer
        self._wanted: OpusSettings | None = None
        self._wake = trio.Event()
        self._ready: tuple[OpusEncoder, OpusSettings] | None = None
        self._deferred = 0
        self._loudness = Loudness()
        self._previous: Pcm | None = None
        #: Seconds each new encoder took to open and warm up (in the worker thread).
        self.open_seconds: list[float] = []

    def report(self, now: float, loss: float | None) -> None:
        """A receiver report's loss (see AudioRateController.report)."""
        self.controller.report(now, loss)
        if self._wanted is None and self._ready is None:
            wanted = self.controller.wanted(now)
            if wanted is not None:
                self._wanted = wanted
                self._wake.set()

    async def serve(self) -> None:
        """Open each wanted encoder off the trio thread, one at a time."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            settings = self._wanted
            if settings is None:
                continue
            started = time.perf_counter()
            encoder = await trio.to_thread.run_sync(open_warm_encoder, settings)
            self.open_seconds.append(time.perf_counter() - started)
            self._ready = (encoder, settings)

    def take(self, now: float, pcm: Pcm, encoder: OpusEncoder) -> OpusEncoder:
        """The encoder to encode ``pcm`` (the frame just captured) with: ``encoder``, or
        the new one if it is ready and this frame is quiet (or it waited long enough)."""
        quiet = self._loudness.quiet(pcm)
        previous, self._previous = self._previous, pcm
        if self._ready is None:
            return encoder
        if not quiet and self._deferred < self.max_defer:
            self._deferred += 1
            return encoder
        new, settings = self._ready
        self._ready, self._wanted, self._deferred = None, None, 0
        if previous is not None:
            new.encode(previous)  # primed: its look-ahead holds real samples
        self.controller.switched(now, settings)
        log.debug("Opus encoder now %s", settings)
        return new

    def statistics(self) -> dict[str, object]:
        opens = sorted(self.open_seconds)
        return {
            **self.controller.statistics(),
            "audio_encoder_open_ms_max": round(1000 * opens[-1], 1) if opens else None,
        }
