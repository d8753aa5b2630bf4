"""The media datagram format: what one QUIC DATAGRAM frame (RFC 9221) of a call carries.

Every DATAGRAM frame on a p2pd connection is media (messages travel on streams only), and
each starts with one *type byte*: the high nibble is the format version (1), the low
nibble the kind. A receiver drops, and counts, a datagram of another version or an unknown
kind, so a later version can add kinds without confusing this one. All integers are
big-endian (network order); sizes below are in bytes. See docs/PROTOCOL.md, "Call media", for
the tables with the reasons.

::

    audio (0x11)             video fragment (0x12)         receiver report (0x13)
    0  u8  type              0  u8  type                   0  u8  type
    1  u8  flags             1  u8  flags (bit0 key)       1  u8  flags (bit0 accepts 0x15)
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

    video NACK (0x16: RFC 4585 section 6.2.1's generic NACK, per fragment)
    0  u8  type
    1  u8  entry count n, 1..64
    2  n x 8 bytes: u32 frame id, u16 fragment index (0..1023; 0xFFFF: every fragment
       of that frame), u16 bitmask: bit k set = fragment index + 1 + k is missing too

    audio with a redundant copy (0x15: RFC 2198's redundant audio, one block)
    0    u8  type
    1    u8  flags (bit0 start)
    2    u32 sequence number
    6    u32 timestamp, 48 kHz
    10   u8  distance d, 1..8: the copy is of frame seq - d
    11   u16 the copy's length R, 1 .. size - 14
    13   R   the copy: frame seq - d's Opus packet
    13+R ... Opus packet of frame seq, never empty

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
    "AUDIO_RED_HEADER",
    "MAX_DATAGRAM",
    "MAX_FRAGMENTS",
    "MAX_NACK_ENTRIES",
    "MAX_RED_DISTANCE",
    "NACK_WHOLE_FRAME",
    "VERSION",
    "VIDEO_HEADER",
    "AudioPacket",
    "KeyframeRequest",
    "Kind",
    "MediaDatagram",
    "MediaWireError",
    "NackEntry",
    "ReceiverReport",
    "ReportBlock",
    "VideoFragment",
    "VideoNack",
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
#: An audio datagram with a redundant copy: the audio header, distance and length.
AUDIO_RED_HEADER = 13
#: How far back (in packets) a redundant copy may reach. We send 1 (the previous
#: packet); a receiver holds a few frames, so anything older would come too late anyway.
MAX_RED_DISTANCE = 8
VIDEO_HEADER = 14
REPORT_BLOCK = 13
REPORT_SIZE = 14 + 2 * REPORT_BLOCK
KEYFRAME_REQUEST_SIZE = 5
#: Entries of one NACK at most (each names up to 17 fragments of one frame): 64 x 8 + 2
#: bytes fit any datagram we send, and bound what one NACK can ask to be resent.
MAX_NACK_ENTRIES = 64
#: A NACK entry's index for "every fragment of this frame" (none of it arrived, so the
#: receiver does not know how many there are).
NACK_WHOLE_FRAME = 0xFFFF
NACK_HEADER = 2
NACK_ENTRY = 8

U32 = 0xFFFF_FFFF
#: Samples (48 kHz) per audio packet: one 20 ms frame each.
AUDIO_FRAME_SAMPLES = 960

_AUDIO = struct.Struct("!BBII")
_AUDIO_RED = struct.Struct("!BBIIBH")
_VIDEO = struct.Struct("!BBIHHI")
_REPORT = struct.Struct("!BBIII")
_BLOCK = struct.Struct("!BIII")
_KEYFRAME = struct.Struct("!BI")
_NACK_ENTRY = struct.Struct("!IHH")

#: Flag bits of an audio datagram.
AUDIO_FLAG_START = 0x01
#: Flag bits of a receiver report: we decode audio with a redundant copy (0x15).
REPORT_FLAG_ACCEPTS_RED = 0x01
#: ... and we keep a history of our video fragments and resend them on a NACK (0x16).
REPORT_FLAG_ANSWERS_NACK = 0x02
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
    AUDIO_RED = 0x15
    VIDEO_NACK = 0x16


def _u32(name: str, value: int) -> None:
    if not 0 <= value <= U32:
        raise UsageError(f"{name} must fit in 32 bits, not {value}")


@dataclass(frozen=True, slots=True)
class AudioPacket:
    """One 20 ms Opus frame, and perhaps a copy of an earlier one.

    ``seq`` counts packets (one per frame, +1 each, wrapping at 2**32); ``timestamp`` is
    the first sample's time in 48 kHz units (wrapping at 2**32, RTP-style: only
    differences count); ``start`` marks the first packet of a stream (the receiver resets
    its jitter buffer); ``payload`` is the Opus packet (RFC 6716), never empty.

    ``redundant``, if not empty, is the Opus packet of frame ``seq - distance`` again
    (RFC 2198's redundant audio, one block): a receiver that lost that frame's own
    datagram decodes it from here, exactly, instead of from FEC or concealment. Such a
    packet goes out as kind 0x15 (:data:`Kind.AUDIO_RED`), only to a peer whose receiver
    reports say it accepts that kind; without ``redundant`` it is kind 0x11.
    """

    seq: int
    timestamp: int
    payload: bytes
    start: bool = False
    redundant: bytes = b""
    distance: int = 1

    def encode(self) -> bytes:
        _u32("seq", self.seq)
        _u32("timestamp", self.timestamp)
        if not self.payload:
            raise UsageError("an audio packet needs a payload")
        flags = AUDIO_FLAG_START if self.start else 0
        if not self.redundant:
            return _AUDIO.pack(Kind.AUDIO, flags, self.seq, self.timestamp) + self.payload
        if not 1 <= self.distance <= MAX_RED_DISTANCE:
            raise UsageError(f"a redundant copy reaches back 1..{MAX_RED_DISTANCE} packets")
        if len(self.redundant) > 0xFFFF:
            raise UsageError("a redundant copy is at most 65535 bytes")
        head = _AUDIO_RED.pack(
            Kind.AUDIO_RED, flags, self.seq, self.timestamp, self.distance, len(self.redundant)
        )
        return head + self.redundant + self.payload

    @property
    def redundant_seq(self) -> int:
        """The sequence number (mod 2**32) of the frame ``redundant`` carries."""
        return (self.seq - self.distance) % (U32 + 1)

    @property
    def redundant_timestamp(self) -> int:
        """Its timestamp (mod 2**32): every audio packet is one 20 ms frame (960 samples)."""
        return (self.timestamp - self.distance * AUDIO_FRAME_SAMPLES) % (U32 + 1)


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
    #: The sender of this report decodes audio with a redundant copy (kind 0x15); a peer
    #: sends that kind only to one that says so (an older receiver would drop it all).
    accepts_redundancy: bool = False
    #: The sender of this report resends video fragments a NACK (kind 0x16) names; a
    #: receiver waits for retransmissions (and sends NACKs) only to a peer that says so.
    answers_nacks: bool = False

    def encode(self) -> bytes:
        _u32("send_time_us", self.send_time_us)
        _u32("echo_us", self.echo_us)
        _u32("echo_delay_us", self.echo_delay_us)
        flags = REPORT_FLAG_ACCEPTS_RED if self.accepts_redundancy else 0
        flags |= REPORT_FLAG_ANSWERS_NACK if self.answers_nacks else 0
        head = _REPORT.pack(Kind.REPORT, flags, self.send_time_us, self.echo_us, self.echo_delay_us)
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


@dataclass(frozen=True, slots=True)
class NackEntry:
    """Missing fragments of one frame: ``index`` and each ``index + 1 + k`` whose bit k
    of ``mask`` is set (RFC 4585's PID and BLP), or, with ``index`` =
    :data:`NACK_WHOLE_FRAME` (and ``mask`` 0), every fragment of the frame."""

    frame_id: int
    index: int
    mask: int = 0

    def fragments(self) -> list[int]:
        """The fragment indices named ([] for a whole frame: see ``whole``)."""
        if self.whole:
            return []
        return [self.index] + [self.index + 1 + k for k in range(16) if self.mask >> k & 1]

    @property
    def whole(self) -> bool:
        return self.index == NACK_WHOLE_FRAME

    def _check(self) -> str | None:
        if self.whole:
            return None if self.mask == 0 else "a whole-frame NACK entry has no mask"
        if not 0 <= self.index < MAX_FRAGMENTS or not 0 <= self.mask <= 0xFFFF:
            return f"NACK entry for fragment {self.index} is out of range"
        if self.mask and self.index + self.mask.bit_length() >= MAX_FRAGMENTS:
            return "NACK entry names a fragment past the last possible one"
        return None


@dataclass(frozen=True, slots=True)
class VideoNack:
    """Please resend these video fragments (RFC 4585 section 6.2.1's generic NACK, with
    (frame id, fragment index) in place of RTP sequence numbers). 1..
    :data:`MAX_NACK_ENTRIES` entries."""

    entries: tuple[NackEntry, ...]

    @classmethod
    def from_missing(cls, missing: list[tuple[int, int]]) -> VideoNack:
        """Pack (frame id, index) pairs (index :data:`NACK_WHOLE_FRAME`: all of it) into
        as few entries as the PID + bitmask layout allows, oldest frame first. More than
        :data:`MAX_NACK_ENTRIES` entries do not encode: callers cut the tail."""
        entries: list[NackEntry] = []
        for fid, index in sorted(set(missing)):
            last = entries[-1] if entries else None
            if (
                last is not None
                and last.frame_id == fid
                and not last.whole
                and index != NACK_WHOLE_FRAME
                and 1 <= index - last.index <= 16
            ):
                entries[-1] = NackEntry(fid, last.index, last.mask | 1 << (index - last.index - 1))
            else:
                entries.append(NackEntry(fid, index))
        return cls(tuple(entries))

    def encode(self) -> bytes:
        if not 1 <= len(self.entries) <= MAX_NACK_ENTRIES:
            raise UsageError(f"a NACK has 1..{MAX_NACK_ENTRIES} entries")
        out = [bytes([Kind.VIDEO_NACK, len(self.entries)])]
        for e in self.entries:
            _u32("frame_id", e.frame_id)
            problem = e._check()
            if problem is not None:
                raise UsageError(problem)
            out.append(_NACK_ENTRY.pack(e.frame_id, e.index, e.mask))
        return b"".join(out)


MediaDatagram = AudioPacket | VideoFragment | ReceiverReport | KeyframeRequest | VideoNack


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
    if kind == Kind.AUDIO_RED:
        # Two lengths to check: the copy's (its field) and the primary's (the rest).
        if size <= AUDIO_RED_HEADER + 1:
            raise MediaWireError("redundant audio datagram too short")
        _, flags, seq, timestamp, distance, length = _AUDIO_RED.unpack_from(data)
        if not 1 <= distance <= MAX_RED_DISTANCE:
            raise MediaWireError(f"redundant copy {distance} packets back")
        if not 1 <= length < size - AUDIO_RED_HEADER:
            raise MediaWireError(f"redundant copy of {length} bytes in {size}")
        end = AUDIO_RED_HEADER + length
        return AudioPacket(
            seq,
            timestamp,
            bytes(data[end:]),
            bool(flags & AUDIO_FLAG_START),
            bytes(data[AUDIO_RED_HEADER:end]),
            distance,
        )
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
        _, flags, send_time, echo, delay = _REPORT.unpack_from(data)
        audio = ReportBlock(*_BLOCK.unpack_from(data, 14))
        video = ReportBlock(*_BLOCK.unpack_from(data, 14 + REPORT_BLOCK))
        return ReceiverReport(
            send_time,
            echo,
            delay,
            audio,
            video,
            bool(flags & REPORT_FLAG_ACCEPTS_RED),
            bool(flags & REPORT_FLAG_ANSWERS_NACK),
        )
    if kind == Kind.KEYFRAME_REQUEST:
        if size != KEYFRAME_REQUEST_SIZE:
            raise MediaWireError(f"keyframe request of {size} bytes, not 5")
        return KeyframeRequest(_KEYFRAME.unpack_from(data)[1])
    if kind == Kind.VIDEO_NACK:
        if size < NACK_HEADER + NACK_ENTRY:
            raise MediaWireError("NACK without entries")
        count = data[1]
        if not 1 <= count <= MAX_NACK_ENTRIES or size != NACK_HEADER + NACK_ENTRY * count:
            raise MediaWireError(f"NACK of {size} bytes with {count} entries")
        entries = []
        for i in range(count):
            entry = NackEntry(*_NACK_ENTRY.unpack_from(data, NACK_HEADER + NACK_ENTRY * i))
            problem = entry._check()
            if problem is not None:
                raise MediaWireError(problem)
            entries.append(entry)
        return VideoNack(tuple(entries))
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
