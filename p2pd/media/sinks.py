"""Where a call's received media goes: ``--record FILE``.

- ``.wav``: the audio as played out, 48 kHz mono 16-bit PCM (stdlib :mod:`wave`).
- ``.mkv``, ``.webm``: Matroska / WebM with the audio re-encoded to Opus from what was
  played out, and a video track with the peer's VP8 frames as they arrived (remuxed, not
  re-encoded: exactly the frames that decoded), timed by their sender timestamps. The
  track exists even if no video came (a container declares its tracks up front).
- ``.mka``: Matroska with the audio only.

Audio is written one 20 ms frame per playout tick, concealment included, so the file's
timeline has no holes: a lost frame is replaced by what the decoder made up for it, and
ticks a stalled receiver skipped by silence (:class:`~p2pd.media.call.CallMedia`). One
exception keeps the end clean: concealment after the last real frame (the peer stopped
sending, or hung up first) is held back and dropped when the recording closes, unless
real audio follows it (a pause in the middle stays in). At most ``hold_back`` frames are
held; a longer pause is written out as it happens.
"""

from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from ..errors import LocalError, UsageError
from .codecs import FRAME_SAMPLES, SAMPLE_RATE, Pcm

__all__ = ["MatroskaRecorder", "Recorder", "WavRecorder", "open_recorder"]

#: Suffixes and what they record.
WAV_SUFFIXES = {".wav"}
MATROSKA_SUFFIXES = {".mkv": "matroska", ".mka": "matroska", ".webm": "webm"}


class Recorder:
    """Base: the hold-back of trailing concealment; subclasses store the frames."""

    def __init__(self, *, hold_back: int = 50) -> None:
        self.hold_back = hold_back
        self._held: list[Pcm] = []
        self.frames_written = 0
        self._closed = False

    def write_audio(self, pcm: Pcm, *, concealed: bool, now: float) -> None:
        """One played-out frame; ``concealed``: made up by the decoder, not received."""
        if self._closed:
            return
        if concealed:
            self._held.append(pcm)
            if len(self._held) <= self.hold_back:
                return
        for held in self._held:
            self._store_audio(held, now)
        self._held.clear()
        if not concealed:
            self._store_audio(pcm, now)

    def write_video(self, data: bytes, *, keyframe: bool, timestamp: int, now: float) -> None:
        """One VP8 frame that decoded (``timestamp`` in 90 kHz units)."""

    def _store_audio(self, pcm: Pcm, now: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Finish the file (trailing concealment dropped). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._held.clear()
        self._finish()

    def _finish(self) -> None:
        raise NotImplementedError


class WavRecorder(Recorder):
    """48 kHz mono 16-bit WAV."""

    def __init__(self, path: Path, *, hold_back: int = 50) -> None:
        super().__init__(hold_back=hold_back)
        try:
            # Open for the life of the recorder (closed in _finish), not a with-block.
            self._wav = wave.open(str(path), "wb")  # noqa: SIM115
        except OSError as exc:
            raise LocalError(f"cannot write the recording {path}: {exc}") from exc
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)

    def _store_audio(self, pcm: Pcm, now: float) -> None:
        self._wav.writeframes(pcm.astype("<i2").tobytes())
        self.frames_written += 1

    def _finish(self) -> None:
        self._wav.close()


class MatroskaRecorder(Recorder):
    """Matroska or WebM: Opus audio (re-encoded), VP8 video (remuxed) if ``video``."""

    def __init__(
        self,
        path: Path,
        *,
        start: float,
        video: bool,
        width: int = 640,
        height: int = 480,
        fps: float = 30.0,
        hold_back: int = 50,
    ) -> None:
        super().__init__(hold_back=hold_back)
        fmt = MATROSKA_SUFFIXES[path.suffix.lower()]
        try:
            self._out: Any = av.open(str(path), "w", format=fmt)
        except (av.FFmpegError, OSError) as exc:
            raise LocalError(f"cannot write the recording {path}: {exc}") from exc
        self._start = start
        audio: Any = self._out.add_stream("libopus", rate=SAMPLE_RATE)
        audio.layout = "mono"
        audio.bit_rate = 64000
        self._audio = audio
        self._audio_pts: int | None = None
        self._video: Any = None
        if video:
            stream: Any = self._out.add_stream("libvpx", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            stream.time_base = Fraction(1, 1000)
            self._video = stream
        self._video_origin: tuple[float, int] | None = None
        self._last_video_ms = -1
        self.video_frames_written = 0

    def _store_audio(self, pcm: Pcm, now: float) -> None:
        if self._audio_pts is None:
            # Audio starts where it started in the call, so it stays in sync with video.
            self._audio_pts = max(0, round((now - self._start) * SAMPLE_RATE))
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._audio_pts
        frame.time_base = Fraction(1, SAMPLE_RATE)
        self._audio_pts += FRAME_SAMPLES
        for packet in self._audio.encode(frame):
            self._out.mux(packet)
        self.frames_written += 1

    def write_video(self, data: bytes, *, keyframe: bool, timestamp: int, now: float) -> None:
        if self._closed or self._video is None:
            return
        if self._video_origin is None:
            self._video_origin = (now - self._start, timestamp)
        offset, first = self._video_origin
        # Sender timestamps (90 kHz, wrapping at 2**32) keep the frames' own cadence.
        elapsed = ((timestamp - first) % (1 << 32)) / 90000
        ms = max(round((offset + elapsed) * 1000), self._last_video_ms + 1)
        self._last_video_ms = ms
        packet = av.Packet(data)
        packet.stream = self._video
        packet.pts = packet.dts = ms
        packet.time_base = Fraction(1, 1000)
        packet.is_keyframe = keyframe
        self._out.mux(packet)
        self.video_frames_written += 1

    def _finish(self) -> None:
        try:
            for packet in self._audio.encode(None):
                self._out.mux(packet)
        finally:
            self._out.close()


def open_recorder(
    path: Path, *, start: float, width: int = 640, height: int = 480, fps: float = 30.0
) -> Recorder:
    """A recorder for ``path`` by its suffix (``.wav``, ``.mkv``, ``.mka``, ``.webm``);
    ``start`` is the call's start on the clock later ``now`` values use."""
    suffix = path.suffix.lower()
    if suffix in WAV_SUFFIXES:
        return WavRecorder(path)
    if suffix in MATROSKA_SUFFIXES:
        video = suffix != ".mka"
        return MatroskaRecorder(path, start=start, video=video, width=width, height=height, fps=fps)
    raise UsageError(f"record to .wav, .mkv, .mka or .webm, not {path.name!r}")


def check_record_path(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix not in WAV_SUFFIXES and suffix not in MATROSKA_SUFFIXES:
        raise UsageError(f"record to .wav, .mkv, .mka or .webm, not {path.name!r}")
