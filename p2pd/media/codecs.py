"""Opus and VP8 through PyAV (FFmpeg), and the one thing PyAV cannot do: Opus FEC.

Encoders are PyAV's: ``libopus`` (48 kHz mono, 20 ms frames, in-band FEC on with an
expected loss percentage, which is what makes libopus add LBRR data) and ``libvpx``
(VP8, realtime deadline, no look-ahead, keyframes on request).

Decoding Opus with FEC needs ``opus_decode(..., decode_fec=1)``, and FFmpeg cannot do it:
its libopus wrapper (``libavcodec/libopusdec.c``) passes ``decode_fec = 0``, hard-coded,
to ``opus_multistream_decode`` and has no option for it (its only private option is
``apply_phase_inv``), and FFmpeg's native Opus decoder skips the LBRR frames. Nor can it
run Opus's packet loss concealment directly: an empty packet means "drain" to
``avcodec_send_packet``. So :class:`LibopusDecoder` calls libopus itself through
:mod:`ctypes`: the copy PyAV's wheel bundles (``av.libs/libopus-*.so*``, the same library
its encoder uses) or the system's ``libopus``. Where neither loads,
:class:`PyAVOpusDecoder` decodes through FFmpeg and conceals by feeding a packet made of
the last TOC byte alone: libopus reads a frame of length 0 as a lost one (``len <= 1``
in ``opus_decode_frame``) and runs its PLC; FEC is then impossible and every loss is
concealed.

What libopus 1.6 puts in LBRR, measured (see docs/_media.md): only frames its voice
activity detector calls active, in SILK or hybrid mode. A steady sine stops counting as
active after about 0.7 s, so a ``tone:`` source carries FEC only at the start; speech and
anything with an envelope carry it throughout.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import av
import numpy as np
import numpy.typing as npt

from ..errors import LocalError, UsageError
from .wire import MediaWireError

__all__ = [
    "FRAME_SAMPLES",
    "SAMPLE_RATE",
    "LibopusDecoder",
    "OpusDecoder",
    "OpusEncoder",
    "PyAVOpusDecoder",
    "Vp8Decoder",
    "Vp8Encoder",
    "load_libopus",
    "open_opus_decoder",
]

log = logging.getLogger(__name__)

SAMPLE_RATE = 48000
#: 20 ms at 48 kHz.
FRAME_SAMPLES = 960
#: Largest Opus frame (120 ms), what ``opus_decode`` may return for one packet.
_MAX_OPUS_SAMPLES = 5760

Pcm = npt.NDArray[np.int16]


# --------------------------------------------------------------------------- Opus


class OpusEncoder:
    """PCM (int16, mono, 48 kHz, 960 samples) in, one Opus packet out per frame."""

    def __init__(self, *, bitrate: int = 32000, packet_loss: int = 10, fec: bool = True) -> None:
        if not 6000 <= bitrate <= 510000:
            raise UsageError("Opus bitrate must be 6..510 kbit/s")
        if not 0 <= packet_loss <= 100:
            raise UsageError("packet_loss is a percentage")
        ctx: Any = av.CodecContext.create("libopus", "w")
        ctx.sample_rate = SAMPLE_RATE
        ctx.layout = "mono"
        ctx.format = "s16"
        ctx.bit_rate = bitrate
        ctx.time_base = Fraction(1, SAMPLE_RATE)
        # libopus only adds LBRR (in-band FEC) when told to expect loss: "fec" needs a
        # non-zero "packet_loss" (FFmpeg's libopusenc option help says so too).
        ctx.options = {
            "application": "voip",
            "frame_duration": "20",
            "fec": "1" if fec else "0",
            "packet_loss": str(packet_loss if fec else 0),
        }
        if not fec:
            # Without FEC (and packet_loss 0) libopus 1.6 codes a steady tone in CELT and
            # its unconstrained VBR overshoots: 64 kbit/s for a 48 kbit/s target, measured
            # (speech: 43 either way); constrained VBR keeps it at 48.6.
            ctx.options = {**ctx.options, "vbr": "constrained"}
        ctx.open()
        self._ctx = ctx
        self._pts = 0

    def encode(self, pcm: Pcm) -> list[bytes]:
        """Encode one frame; normally returns one packet."""
        if pcm.shape != (FRAME_SAMPLES,) or pcm.dtype != np.int16:
            raise UsageError("Opus frames are 960 int16 samples")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        frame.time_base = Fraction(1, SAMPLE_RATE)
        self._pts += FRAME_SAMPLES
        return [bytes(p) for p in self._ctx.encode(frame)]


class OpusDecoder(Protocol):
    """What the call needs of an Opus decoder; every method returns 960 samples."""

    #: Whether :meth:`decode_fec` can really use in-band FEC.
    fec_capable: bool
    name: str

    def decode(self, packet: bytes) -> Pcm: ...

    def decode_fec(self, next_packet: bytes) -> tuple[Pcm, bool]:
        """The missing frame before ``next_packet``, from its in-band FEC; the flag is
        False if there was none (the samples are then concealment)."""
        ...

    def conceal(self) -> Pcm: ...


def _fit(samples: Pcm) -> Pcm:
    """Exactly one frame: the timeline counts frames, so a longer packet (the peer may
    send 40 ms) is cut and a shorter one padded."""
    if samples.shape[0] == FRAME_SAMPLES:
        return samples
    if samples.shape[0] > FRAME_SAMPLES:
        return samples[:FRAME_SAMPLES].copy()
    return np.concatenate([samples, np.zeros(FRAME_SAMPLES - samples.shape[0], np.int16)])


def _libopus_candidates() -> list[str]:
    """PyAV's bundled copy first (it is the one its encoder uses), then the system's."""
    here = Path(av.__file__).resolve().parent
    found: list[str] = []
    for folder, pattern in (
        (here.parent / "av.libs", "libopus*.so*"),  # Linux (auditwheel)
        (here / ".dylibs", "libopus*.dylib"),  # macOS (delocate)
        (here.parent / "av.libs", "opus*.dll"),  # Windows (delvewheel)
        (here.parent / "av.libs", "libopus*.dll"),
    ):
        if folder.is_dir():
            found.extend(str(p) for p in sorted(folder.glob(pattern)))
    system = ctypes.util.find_library("opus")
    if system:
        found.append(system)
    return found


_libopus: ctypes.CDLL | None = None
_libopus_tried = False


def load_libopus() -> ctypes.CDLL | None:
    """libopus with the prototypes we use declared, or None if none loads."""
    global _libopus, _libopus_tried
    if _libopus_tried:
        return _libopus
    _libopus_tried = True
    for candidate in _libopus_candidates():
        try:
            lib = ctypes.CDLL(candidate)
            lib.opus_decoder_create.restype = ctypes.c_void_p
            lib.opus_decoder_create.argtypes = [
                ctypes.c_int32,
                ctypes.c_int,
                ctypes.POINTER(ctypes.c_int),
            ]
            lib.opus_decode.restype = ctypes.c_int
            lib.opus_decode.argtypes = [
                ctypes.c_void_p,
                ctypes.c_char_p,
                ctypes.c_int32,
                ctypes.POINTER(ctypes.c_int16),
                ctypes.c_int,
                ctypes.c_int,
            ]
            lib.opus_decoder_destroy.restype = None
            lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
            lib.opus_packet_has_lbrr.restype = ctypes.c_int
            lib.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, ctypes.c_int32]
            lib.opus_get_version_string.restype = ctypes.c_char_p
            lib.opus_get_version_string.argtypes = []
        except (OSError, AttributeError) as exc:
            # AttributeError: an old libopus without opus_packet_has_lbrr (before 1.5).
            log.debug("libopus at %s unusable: %s", candidate, exc)
            continue
        _libopus = lib
        return lib
    return None


class LibopusDecoder:
    """libopus's own decoder (through ctypes): decodes, runs FEC and PLC."""

    fec_capable = True

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        error = ctypes.c_int(0)
        state = lib.opus_decoder_create(SAMPLE_RATE, 1, ctypes.byref(error))
        if not state or error.value != 0:
            raise LocalError(f"libopus could not create a decoder (error {error.value})")
        self._state: int = state
        self._buffer = (ctypes.c_int16 * _MAX_OPUS_SAMPLES)()
        version = lib.opus_get_version_string()
        self.name = version.decode("ascii", "replace") if isinstance(version, bytes) else "libopus"

    def _run(self, data: bytes | None, frame_size: int, fec: int) -> Pcm:
        if not self._state:
            raise LocalError("this Opus decoder is closed")
        n = self._lib.opus_decode(
            self._state, data, len(data) if data else 0, self._buffer, frame_size, fec
        )
        if n < 0:
            raise MediaWireError(f"Opus packet does not decode (libopus error {n})")
        samples = np.frombuffer(memoryview(self._buffer).cast("B"), dtype=np.int16, count=n).copy()
        return _fit(samples)

    def decode(self, packet: bytes) -> Pcm:
        return self._run(packet, _MAX_OPUS_SAMPLES, 0)

    def decode_fec(self, next_packet: bytes) -> tuple[Pcm, bool]:
        has_fec = self._lib.opus_packet_has_lbrr(next_packet, len(next_packet)) == 1
        # With decode_fec=1 and no LBRR in the packet libopus runs its PLC instead.
        return self._run(next_packet, FRAME_SAMPLES, 1), has_fec

    def conceal(self) -> Pcm:
        return self._run(None, FRAME_SAMPLES, 0)

    def close(self) -> None:
        if self._state:
            self._lib.opus_decoder_destroy(self._state)
            self._state = 0

    def __del__(self) -> None:
        self.close()


class PyAVOpusDecoder:
    """FFmpeg's libopus decoder: decodes and conceals (TOC-only packets), no FEC."""

    fec_capable = False
    name = "ffmpeg libopus (no FEC)"

    def __init__(self) -> None:
        ctx: Any = av.CodecContext.create("libopus", "r")
        ctx.sample_rate = SAMPLE_RATE
        ctx.layout = "mono"
        ctx.format = "s16"
        ctx.open()
        self._ctx = ctx
        self._toc: int | None = None

    def decode(self, packet: bytes) -> Pcm:
        try:
            frames = self._ctx.decode(av.Packet(packet))
        except av.FFmpegError as exc:
            raise MediaWireError(f"Opus packet does not decode ({exc})") from exc
        parts = [np.asarray(f.to_ndarray(), dtype=np.int16).reshape(-1) for f in frames]
        # Code 0 (one frame per packet) keeps the TOC's configuration and stereo bit.
        self._toc = packet[0] & 0xFC
        if not parts:
            return np.zeros(FRAME_SAMPLES, np.int16)
        return _fit(np.concatenate(parts))

    def decode_fec(self, next_packet: bytes) -> tuple[Pcm, bool]:
        return self.conceal(), False

    def conceal(self) -> Pcm:
        if self._toc is None:
            return np.zeros(FRAME_SAMPLES, np.int16)
        return self.decode(bytes([self._toc]))

    def close(self) -> None:
        pass


def open_opus_decoder(*, use_libopus: bool = True) -> LibopusDecoder | PyAVOpusDecoder:
    """The best decoder this machine has: libopus with FEC, else FFmpeg's without."""
    lib = load_libopus() if use_libopus else None
    if lib is not None:
        return LibopusDecoder(lib)
    if use_libopus:
        log.warning("libopus not loadable through ctypes: Opus FEC is off, losses are concealed")
    return PyAVOpusDecoder()


# --------------------------------------------------------------------------- VP8


class Vp8Encoder:
    """640x480 (or any even size) yuv420p frames in, VP8 frames out, realtime settings."""

    def __init__(
        self,
        *,
        width: int = 640,
        height: int = 480,
        fps: float = 30.0,
        bitrate: int = 800_000,
        keyframe_interval: float = 10.0,
    ) -> None:
        if width % 2 or height % 2 or not 16 <= width <= 4096 or not 16 <= height <= 4096:
            raise UsageError("video size must be even and 16..4096")
        if not 1 <= fps <= 60:
            raise UsageError("video frame rate must be 1..60 fps")
        rate = Fraction(fps).limit_denominator(1001)
        ctx: Any = av.CodecContext.create("libvpx", "w")
        ctx.width = width
        ctx.height = height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = 1 / rate
        ctx.framerate = rate
        ctx.bit_rate = bitrate
        # Keyframes come on request (keyframe requests after a loss); the periodic ones
        # are only a backstop for a request that never arrives.
        ctx.gop_size = max(1, int(keyframe_interval * fps))
        ctx.thread_count = 1
        ctx.options = {
            # libvpx's realtime mode: encode within the frame interval, speed 8 of 16.
            "deadline": "realtime",
            "cpu-used": "8",
            # No look-ahead: every frame leaves the encoder as soon as it went in.
            "lag-in-frames": "0",
            # Entropy contexts are reset per frame, so one lost frame does not spoil the
            # probabilities of the next ones (libvpx's VPX_ERROR_RESILIENT_DEFAULT).
            "error-resilient": "1",
            # Keyframes at most 3x the average frame, so one fits in a few datagrams.
            "max-intra-rate": "300",
        }
        ctx.open()
        self._ctx = ctx
        self.width, self.height = width, height
        #: Fixed once open: FFmpeg's libvpx wrapper reads ``bit_rate`` only then, so a new
        #: bitrate takes a new encoder (p2pd/media/ratecontrol.py).
        self.bitrate = bitrate
        self._pts = 0

    def encode(self, frame: av.VideoFrame, *, keyframe: bool = False) -> list[tuple[bytes, bool]]:
        """Encode one frame; returns (VP8 frame, is keyframe) pairs (normally one)."""
        if (
            frame.width != self.width
            or frame.height != self.height
            or frame.format.name != "yuv420p"
        ):
            frame = frame.reformat(width=self.width, height=self.height, format="yuv420p")
        frame.pts = self._pts
        frame.time_base = self._ctx.time_base
        self._pts += 1
        frame.pict_type = (
            av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
        )
        return [(bytes(p), bool(p.is_keyframe)) for p in self._ctx.encode(frame)]


class Vp8Decoder:
    """VP8 frames in, decoded pictures out (FFmpeg's native VP8 decoder)."""

    def __init__(self) -> None:
        ctx: Any = av.CodecContext.create("vp8", "r")
        ctx.thread_count = 1
        ctx.open()
        self._ctx = ctx

    def decode(self, data: bytes) -> list[av.VideoFrame]:
        try:
            return list(self._ctx.decode(av.Packet(data)))
        except av.FFmpegError as exc:
            raise MediaWireError(f"VP8 frame does not decode ({exc})") from exc


def libopus_version() -> str | None:
    """The loadable libopus's version string, or None."""
    lib = load_libopus()
    if lib is None:
        return None
    value = lib.opus_get_version_string()
    return value.decode("ascii", "replace") if isinstance(value, bytes) else None
