"""Where a call's audio and video come from.

Audio sources give 20 ms frames of 48 kHz mono int16 PCM; video sources give a yuv420p
picture of the call's size for a media time. Specs, as the CLI takes them:

============== ===============================================================
``tone:FREQ``  a sine of FREQ Hz (20..20000) at -10 dBFS, phase-continuous
``testsrc``    a generated test pattern: colour bars, a scrolling zone plate, a moving
               square and the frame number in binary (white blocks = 1 bits)
``file:PATH``  any file PyAV (FFmpeg) reads, decoded and resampled to 48 kHz
or ``PATH``    mono / scaled to the call's size; it loops at its end
``mic[:NAME]`` a microphone (:mod:`p2pd.media.devices`, sounddevice over PortAudio;
               NAME as ``p2pd devices`` lists it, default: the default input)
``camera[:DEV]`` a V4L2 camera (DEV defaults to ``/dev/video0``)
============== ===============================================================

Devices are optional: the machine may have none (tests/test_audio_devices.py makes a
virtual one). A microphone is ``paced``: the call awaits its frames, so its clock sets
the pace of what is sent. A camera's reads block until it has a picture, so it has
``live = True`` and the call runs it in a worker thread; every other source is cheap and
runs inline (measured: a tone frame ~20 µs, a 640x480 test pattern ~0.3 ms).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import av
import numpy as np

from ..errors import LocalError, UsageError
from .codecs import FRAME_SAMPLES, SAMPLE_RATE, Pcm

__all__ = [
    "AudioSource",
    "FileAudioSource",
    "FileVideoSource",
    "TestPattern",
    "ToneSource",
    "VideoSource",
    "check_audio_spec",
    "check_video_spec",
    "open_audio_source",
    "open_video_source",
]

#: -10 dBFS: loud enough to measure, far from clipping.
TONE_AMPLITUDE = 0.316 * 32767


class AudioSource(Protocol):
    #: True when :meth:`read` blocks on a device (run it in a thread).
    live: bool
    description: str

    def read(self) -> Pcm:
        """The next 20 ms: 960 int16 samples."""
        ...

    def close(self) -> None: ...


class VideoSource(Protocol):
    live: bool
    description: str

    def read(self, t: float) -> av.VideoFrame:
        """The picture for media time ``t`` (seconds since the call started)."""
        ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- specs


#: ``--video-in camera`` without a device: V4L2's first.
DEFAULT_CAMERA = "/dev/video0"


def _split(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    return kind, arg


def check_audio_spec(spec: str) -> None:
    """Raise UsageError unless ``spec`` names an audio source (files must exist)."""
    kind, arg = _split(spec)
    if kind == "tone":
        _tone_frequency(arg)
    elif kind == "mic":
        pass
    else:
        _file_path(spec)


def check_video_spec(spec: str) -> None:
    """Raise UsageError unless ``spec`` names a video source (files must exist), and
    LocalError for a camera that is not there: before anyone is rung, not once the
    call is answered (it was: the caller saw "did not answer")."""
    kind, arg = _split(spec)
    if kind == "camera":
        device = Path(arg or DEFAULT_CAMERA)
        if not device.exists():
            cameras = ", ".join(sorted(str(p) for p in Path("/dev").glob("video*"))) or "none"
            raise LocalError(
                f"cannot open the media device {str(device)!r}: no such device "
                f"(cameras here: {cameras})"
            )
        return
    if spec == "testsrc":
        return
    _file_path(spec)


def _tone_frequency(arg: str) -> float:
    try:
        freq = float(arg)
    except ValueError:
        raise UsageError(f"tone:FREQ needs a frequency in Hz, not {arg!r}") from None
    if not 20.0 <= freq <= 20000.0 or not math.isfinite(freq):
        raise UsageError(f"tone frequency must be 20..20000 Hz, not {arg}")
    return freq


def _file_path(spec: str) -> Path:
    path = Path(spec[5:] if spec.startswith("file:") else spec)
    if not path.is_file():
        raise UsageError(
            f"unknown media source {spec!r}: not tone:FREQ, testsrc, mic, camera, or a file"
        )
    return path


def open_audio_source(spec: str) -> AudioSource:
    kind, arg = _split(spec)
    if kind == "tone":
        return ToneSource(_tone_frequency(arg))
    if kind == "mic":
        from .devices import MicSource  # sounddevice: only when a device is used

        return MicSource(arg)
    return FileAudioSource(str(_file_path(spec)))


def open_video_source(spec: str, *, width: int = 640, height: int = 480) -> VideoSource:
    kind, arg = _split(spec)
    if spec == "testsrc":
        return TestPattern(width, height)
    if kind == "camera":
        return FileVideoSource(arg or DEFAULT_CAMERA, width, height, device=True)
    return FileVideoSource(str(_file_path(spec)), width, height)


def _open_container(target: str, *, device: bool, audio: bool) -> Any:
    try:
        if not device:
            return av.open(target)
        if audio:
            fmt = "pulse" if "pulse" in av.formats_available else "alsa"
            return av.open(target, format=fmt)
        return av.open(target, format="v4l2", options={"video_size": "640x480", "framerate": "30"})
    except (av.FFmpegError, OSError) as exc:
        what = "device" if device else "file"
        raise LocalError(f"cannot open the media {what} {target!r}: {exc}") from exc


# --------------------------------------------------------------------------- audio


class ToneSource:
    """A sine of ``frequency`` Hz, its phase carried across frames (no clicks)."""

    live = False

    def __init__(self, frequency: float) -> None:
        self.frequency = frequency
        self.description = f"tone:{frequency:g}"
        self._step = 2 * math.pi * frequency / SAMPLE_RATE
        self._phase = 0.0
        self._ramp = np.arange(FRAME_SAMPLES, dtype=np.float64) * self._step

    def read(self) -> Pcm:
        samples = np.sin(self._phase + self._ramp) * TONE_AMPLITUDE
        self._phase = (self._phase + FRAME_SAMPLES * self._step) % (2 * math.pi)
        return samples.astype(np.int16)

    def close(self) -> None:
        pass


class FileAudioSource:
    """The first audio stream of a file (looped) or a capture device, as 48 kHz mono."""

    def __init__(self, target: str, *, device: bool = False) -> None:
        self.live = device
        self.description = ("mic:" if device else "file:") + target
        self._target = target
        self._device = device
        self._pending = np.zeros(0, np.int16)
        self._container: Any = None
        self._frames: Iterator[Any] = iter(())
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        self._open()

    def _open(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = _open_container(self._target, device=self._device, audio=True)
        if not self._container.streams.audio:
            raise LocalError(f"{self._target!r} has no audio stream")
        self._frames = iter(self._container.decode(audio=0))

    def read(self) -> Pcm:
        rewinds = 0
        while self._pending.shape[0] < FRAME_SAMPLES:
            try:
                frame = next(self._frames)
            except StopIteration:
                if self._device or rewinds:
                    # A device that ended, or a file with no samples: silence from now on.
                    self._pending = np.concatenate(
                        [self._pending, np.zeros(FRAME_SAMPLES, np.int16)]
                    )
                    continue
                rewinds += 1
                self._open()
                continue
            except av.FFmpegError:
                continue  # a damaged packet: skip it
            for out in self._resampler.resample(frame):
                data = np.asarray(out.to_ndarray(), dtype=np.int16).reshape(-1)
                self._pending = np.concatenate([self._pending, data])
            rewinds = 0
        chunk, self._pending = self._pending[:FRAME_SAMPLES], self._pending[FRAME_SAMPLES:]
        return chunk

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


# --------------------------------------------------------------------------- video

# ITU-R BT.601 limited-range YUV of 75% colour bars: white, yellow, cyan, green,
# magenta, red, blue, black.
_BARS = [
    (180, 128, 128),
    (162, 44, 142),
    (131, 156, 44),
    (112, 72, 58),
    (84, 184, 198),
    (65, 100, 212),
    (35, 212, 114),
    (16, 128, 128),
]


class TestPattern:
    """A generated moving test pattern (yuv420p, built with numpy)."""

    live = False
    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, width: int = 640, height: int = 480) -> None:
        if width % 16 or height % 16:
            raise UsageError("the test pattern needs a size divisible by 16")
        self.description = "testsrc"
        self.width, self.height = width, height
        y = np.empty((height, width), np.uint8)
        u = np.empty((height // 2, width // 2), np.uint8)
        v = np.empty((height // 2, width // 2), np.uint8)
        bar_w = width // len(_BARS)
        for i, (by, bu, bv) in enumerate(_BARS):
            y[:, i * bar_w : (i + 1) * bar_w] = by
            u[:, i * bar_w // 2 : (i + 1) * bar_w // 2] = bu
            v[:, i * bar_w // 2 : (i + 1) * bar_w // 2] = bv
        self._band = height * 2 // 3
        y[self._band :, :] = 16
        u[self._band // 2 :, :] = 128
        v[self._band // 2 :, :] = 128
        self._planes = (y, u, v)
        # A zone plate (concentric rings whose spacing shrinks outwards: every spatial
        # frequency at once, the classic codec stress pattern), twice as wide as the
        # frame so that it can scroll.
        rows = np.arange(height - self._band, dtype=np.float64)[:, None] - (height - self._band) / 2
        cols = np.arange(2 * width, dtype=np.float64)[None, :] - width
        rings = np.cos((rows * rows + cols * cols) * (math.pi / (4 * width)))
        self._plate = (126 + 100 * rings).astype(np.uint8)
        self._frame = 0

    def read(self, t: float) -> av.VideoFrame:
        y0, u0, v0 = self._planes
        y = y0.copy()
        n = self._frame
        self._frame += 1
        w, h, band = self.width, self.height, self._band
        shift = (n * 4) % w
        y[band:, :] = self._plate[:, shift : shift + w]
        side = h // 8
        x = int((math.sin(t * 1.3) * 0.5 + 0.5) * (w - side))
        top = int((math.cos(t * 0.9) * 0.5 + 0.5) * (band - side))
        y[top : top + side, x : x + side] = 235
        for bit in range(16):  # the frame number, most significant bit first
            if n >> (15 - bit) & 1:
                y[8:24, 8 + bit * 20 : 24 + bit * 20] = 235
        data = np.concatenate([y.reshape(-1), u0.reshape(-1), v0.reshape(-1)])
        return av.VideoFrame.from_ndarray(data.reshape(h * 3 // 2, w), format="yuv420p")

    def close(self) -> None:
        pass


class FileVideoSource:
    """The first video stream of a file (looped, its own frame times honoured) or a
    camera, scaled to the call's size."""

    def __init__(self, target: str, width: int, height: int, *, device: bool = False) -> None:
        self.live = device
        self.description = ("camera:" if device else "file:") + target
        self._target, self._device = target, device
        self.width, self.height = width, height
        self._container: Any = None
        self._frames: Iterator[Any] = iter(())
        self._offset = 0.0  # media time at which the current loop of the file began
        self._last_time = 0.0
        self._current: av.VideoFrame | None = None
        self._ahead: tuple[float, av.VideoFrame] | None = None
        self._open()

    def _open(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = _open_container(self._target, device=self._device, audio=False)
        if not self._container.streams.video:
            raise LocalError(f"{self._target!r} has no video stream")
        self._frames = iter(self._container.decode(video=0))
        self._first: float | None = None

    def _next(self) -> tuple[float, av.VideoFrame] | None:
        for _ in range(2):
            try:
                frame = next(self._frames)
            except StopIteration:
                if self._device:
                    return None
                self._offset = self._last_time + 1 / 30
                self._open()
                continue
            except av.FFmpegError:
                continue
            when = float(frame.time) if frame.time is not None else self._last_time
            if self._first is None:
                self._first = when
            when = when - self._first + self._offset
            self._last_time = when
            scaled = frame.reformat(width=self.width, height=self.height, format="yuv420p")
            return when, scaled
        return None

    def read(self, t: float) -> av.VideoFrame:
        if self._device:
            item = self._next()
            if item is not None:
                self._current = item[1]
        else:
            # The latest frame whose time has come (frames of a 60 fps file are skipped,
            # those of a 10 fps file repeated).
            while True:
                if self._ahead is None:
                    self._ahead = self._next()
                    if self._ahead is None:
                        break
                when, frame = self._ahead
                if when > t and self._current is not None:
                    break
                self._current, self._ahead = frame, None
        if self._current is None:
            black = np.zeros((self.height * 3 // 2, self.width), np.uint8)
            black[: self.height] = 16
            black[self.height :] = 128
            return av.VideoFrame.from_ndarray(black, format="yuv420p")
        return self._current

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
