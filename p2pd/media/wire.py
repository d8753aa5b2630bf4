"""The media datagram format: what one QUIC DATAGRAM frame (RFC 9221) of a call carries.

Every DATAGRAM frame on a p2pd connection is media (messages travel on streams only), and
each starts with one *type byte*: the high nibble is the format version (1), the low
nibble the kind. A receiver drops, and counts, a datagram of another version or an unknown
kind, so a later version can add kinds without confusing this one. All integers are
big-endian (network order); sizes below are in bytes. See docs/_media.md for the table
with the reasons.

::

    audio (0x11)             video fragment (0x12)         receiver report (0x13)
    0  u8  type              0  u8  type                   0  u8  type
    1  u8  flags             1  u8  flags (bit0 key)       1  u8  flags (0)
    2  u32 sequence number   2  u32 frame id               2  u32 send time, µs
    6  u32 timestamp, 48 kHz 6  u16 fragment index         6  u32 echoed send time, µs
    10 ... Opus packet       8  u16 fragment count         10 u32 echo delay, µs
                             10 u32 timestamp, 90 kHz      14 audio block (13 bytes)
                             14 ... VP8 bytes              27 video block (13 bytes)

    keyframe request (0x14)  report block (RFC 3550 section 6.4.1, simplified)
    0  u8  type              0  u8  fraction lost since the last report, /256
    1  u32 request number    1  u32 cumulative packets lost
                             5  u32 extended highest sequence number received
                             9  u32 interarrival jitter, µs

Decoders check every bound and raise only :class:`MediaWireError` (a
:class:`~p2pd.errors.WireError`); encoders raise :class:`~p2pd.errors.UsageError` for
values that do not fit (our own mistake, never the peer's).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ..errors import UsageError, WireError

__all__ = [
    "AUDIO_HEADER",
    "MAX_DATAGRAM",
    "MAX_FRAGMENTS",
    "VERSION",
    "VIDEO_HEADER",
    "AudioPacket",
    "KeyframeRequest",
    "Kind",
    "MediaDatagram",
    "MediaWireError",
    "ReceiverReport",
    "ReportBlock",
    "VideoFragment",
    "decode",
    "fragment",
]

#: Format version, the high nibble of the type byte.
VERSION = 1
#: The largest datagram we accept: 65535 is the most a DATAGRAM frame can carry in any
#: packet we would accept (our max_datagram_frame_size), so anything longer is garbage.
MAX_DATAGRAM = 65535
#: Fragments of one video frame at most: 1024 x ~1144 bytes is over 1 MB, far more than
#: a 640x480 VP8 keyframe, and it bounds what a receiver holds for one frame id.
MAX_FRAGMENTS = 1024
#: Header sizes: what ``max_datagram_size`` minus these leaves for the codec's bytes.
AUDIO_HEADER = 10
VIDEO_HEADER = 14
REPORT_BLOCK = 13
REPORT_SIZE = 14 + 2 * REPORT_BLOCK
KEYFRAME_REQUEST_SIZE = 5

U32 = 0xFFFF_FFFF

_AUDIO = struct.Struct("!BBII")
_VIDEO = struct.Struct("!BBIHHI")
_REPORT = struct.Struct("!BBIII")
_BLOCK = struct.Struct("!BIII")
_KEYFRAME = struct.Struct("!BI")

#: Flag bits of an audio datagram.
AUDIO_FLAG_START = 0x01
#: Flag bits of a video fragment.
VIDEO_FLAG_KEYFRAME = 0x01


class MediaWireError(WireError):
    """A media datagram that does not decode (malformed, truncated, unknown kind)."""


class Kind(enum.IntEnum):
    """The type byte: version 1 in the high nibble, the kind in the low one."""

    AUDIO = 0x11
    VIDEO = 0x12
    REPORT = 0x13
    KEYFRAME_REQUEST = 0x14


def _u32(name: str, value: int) -> None:
    if not 0 <= value <= U32:
        raise UsageError(f"{name} must fit in 32 bits, not {value}")


@dataclass(frozen=True, slots=True)
class AudioPacket:
    """One 20 ms Opus frame.

    ``seq`` counts packets (one per frame, +1 each, wrapping at 2**32); ``timestamp`` is
    the first sample's time in 48 kHz units (wrapping at 2**32, RTP-style: only
    differences count); ``start`` marks the first packet of a stream (the receiver resets
    its jitter buffer); ``payload`` is the Opus packet (RFC 6716), never empty.
    """

    seq: int
    timestamp: int
    payload: bytes
    start: bool = False

    def encode(self) -> bytes:
        _u32("seq", self.seq)
        _u32("timestamp", self.timestamp)
        if not self.payload:
            raise UsageError("an audio packet needs a payload")
        flags = AUDIO_FLAG_START if self.start else 0
        return _AUDIO.pack(Kind.AUDIO, flags, self.seq, self.timestamp) + self.payload


@dataclass(frozen=True, slots=True)
class VideoFragment:
    """One piece of one encoded VP8 frame.

    ``frame_id`` counts encoded frames (+1 each); ``index`` < ``count`` <=
    :data:`MAX_FRAGMENTS`; every fragment of a frame repeats its ``keyframe`` flag and
    ``timestamp`` (90 kHz units, as RTP video uses, RFC 7741 section 4.1).
    """

    frame_id: int
    index: int
    count: int
    timestamp: int
    payload: bytes
    keyframe: bool = False

    def encode(self) -> bytes:
        _u32("frame_id", self.frame_id)
        _u32("timestamp", self.timestamp)
        if not 1 <= self.count <= MAX_FRAGMENTS or not 0 <= self.index < self.count:
            raise UsageError(f"fragment {self.index} of {self.count} is out of range")
        if not self.payload:
            raise UsageError("a video fragment needs a payload")
        flags = VIDEO_FLAG_KEYFRAME if self.keyframe else 0
        head = _VIDEO.pack(Kind.VIDEO, flags, self.frame_id, self.index, self.count, self.timestamp)
        return head + self.payload


@dataclass(frozen=True, slots=True)
class ReportBlock:
    """What a receiver saw of one of the peer's streams (RFC 3550 section 6.4.1's report
    block without SSRC and with jitter in microseconds). All zero: nothing received."""

    fraction_lost: int = 0
    cumulative_lost: int = 0
    highest_seq: int = 0
    jitter_us: int = 0

    def _pack(self) -> bytes:
        if not 0 <= self.fraction_lost <= 255:
            raise UsageError("fraction_lost is a fraction of 256")
        _u32("cumulative_lost", self.cumulative_lost)
        _u32("highest_seq", self.highest_seq)
        _u32("jitter_us", self.jitter_us)
        return _BLOCK.pack(
            self.fraction_lost, self.cumulative_lost, self.highest_seq, self.jitter_us
        )

    @property
    def loss_fraction(self) -> float:
        return self.fraction_lost / 256.0


@dataclass(frozen=True, slots=True)
class ReceiverReport:
    """Reception statistics and an RTT probe, sent by each side every half second.

    RTT works as RTCP's LSR/DLSR (RFC 3550 section 6.4.1): ``send_time_us`` is the
    sender's clock (microseconds mod 2**32); ``echo_us`` repeats the ``send_time_us`` of
    the last report received from the peer (0: none yet) and ``echo_delay_us`` how long
    ago that was. The peer computes RTT = now - echo - delay, in its own clock only.
    """

    send_time_us: int
    echo_us: int = 0
    echo_delay_us: int = 0
    audio: ReportBlock = ReportBlock()
    video: ReportBlock = ReportBlock()

    def encode(self) -> bytes:
        _u32("send_time_us", self.send_time_us)
        _u32("echo_us", self.echo_us)
        _u32("echo_delay_us", self.echo_delay_us)
        head = _REPORT.pack(Kind.REPORT, 0, self.send_time_us, self.echo_us, self.echo_delay_us)
        return head + self.audio._pack() + self.video._pack()


@dataclass(frozen=True, slots=True)
class KeyframeRequest:
    """Please send a keyframe (RFC 4585 section 6.3.1's Picture Loss Indication).

    ``request`` numbers the receiver's requests (+1 per new loss), so a sender answers
    each loss once however many copies of the request arrive.
    """

    request: int

    def encode(self) -> bytes:
        _u32("request", self.request)
        return _KEYFRAME.pack(Kind.KEYFRAME_REQUEST, self.request)


MediaDatagram = AudioPacket | VideoFragment | ReceiverReport | KeyframeRequest


def decode(data: bytes) -> MediaDatagram:
    """Parse one media datagram; raises only :class:`MediaWireError`."""
    size = len(data)
    if size == 0:
        raise MediaWireError("empty media datagram")
    if size > MAX_DATAGRAM:
        raise MediaWireError(f"media datagram of {size} bytes is too long")
    kind = data[0]
    if kind >> 4 != VERSION:
        raise MediaWireError(f"media datagram of unknown version {kind >> 4}")
    if kind == Kind.AUDIO:
        if size <= AUDIO_HEADER:
            raise MediaWireError("audio datagram without payload")
        _, flags, seq, timestamp = _AUDIO.unpack_from(data)
        return AudioPacket(seq, timestamp, bytes(data[AUDIO_HEADER:]), bool(flags & 1))
    if kind == Kind.VIDEO:
        if size <= VIDEO_HEADER:
            raise MediaWireError("video datagram without payload")
        _, flags, frame_id, index, count, timestamp = _VIDEO.unpack_from(data)
        if not 1 <= count <= MAX_FRAGMENTS or index >= count:
            raise MediaWireError(f"video fragment {index} of {count} is out of range")
        return VideoFragment(
            frame_id, index, count, timestamp, bytes(data[VIDEO_HEADER:]), bool(flags & 1)
        )
    if kind == Kind.REPORT:
        if size != REPORT_SIZE:
            raise MediaWireError(f"receiver report of {size} bytes, not {REPORT_SIZE}")
        _, _, send_time, echo, delay = _REPORT.unpack_from(data)
        audio = ReportBlock(*_BLOCK.unpack_from(data, 14))
        video = ReportBlock(*_BLOCK.unpack_from(data, 14 + REPORT_BLOCK))
        return ReceiverReport(send_time, echo, delay, audio, video)
    if kind == Kind.KEYFRAME_REQUEST:
        if size != KEYFRAME_REQUEST_SIZE:
            raise MediaWireError(f"keyframe request of {size} bytes, not 5")
        return KeyframeRequest(_KEYFRAME.unpack_from(data)[1])
    raise MediaWireError(f"unknown media datagram kind {kind:#04x}")


def fragment(
    frame_id: int, timestamp: int, data: bytes, *, keyframe: bool, max_datagram: int
) -> list[VideoFragment]:
    """Split one encoded frame into fragments whose datagrams are at most
    ``max_datagram`` bytes (``peer.max_datagram_size``), in nearly equal pieces."""
    room = max_datagram - VIDEO_HEADER
    if room <= 0:
        raise UsageError(f"datagrams of {max_datagram} bytes cannot carry video")
    if not data:
        raise UsageError("an empty frame cannot be sent")
    count = -(-len(data) // room)
    if count > MAX_FRAGMENTS:
        raise UsageError(f"a frame of {len(data)} bytes needs more than {MAX_FRAGMENTS} pieces")
    # Nearly equal pieces rather than full ones and a runt: the same count, no tiny
    # datagram. The first ``extra`` pieces are one byte longer.
    base, extra = divmod(len(data), count)
    pieces, start = [], 0
    for i in range(count):
        end = start + base + (1 if i < extra else 0)
        pieces.append(VideoFragment(frame_id, i, count, timestamp, data[start:end], keyframe))
        start = end
    return pieces
