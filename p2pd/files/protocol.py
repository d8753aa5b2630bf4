"""Files on the wire, sans I/O: the offer, the chunk cipher, the stream frames, and the
two ends of a transfer stream as state machines that take bytes and return what to
write (docs/PROTOCOL.md, "Files").

A file is cut into chunks (``chunk_size`` bytes, the last one shorter) and the chunks
into groups of ``group_chunks``. The sender hashes each group's plaintext with BLAKE3;
the *root* is BLAKE3 of the concatenated group hashes, and travels in the offer, inside
the end-to-end session. On the data stream the receiver first gets the list of group
hashes (checked against the root before anything else is used), then the chunks, each
sealed with XChaCha20-Poly1305 under the offer's per-file key with nonce = transfer id
(16 bytes) + chunk index (8 bytes, big-endian): a chunk cannot be moved to another
index, another file, or replayed into another transfer. The receiver hashes each group
as its chunks arrive and records it as verified once its hash matches; a chunk whose tag
fails, or a group whose hash does not match, is refused and asked for again.

No clock, no sockets, no files here: :class:`ReceiverStream` returns the plaintext to
write and the groups verified; :class:`SenderStream` says which group to start from.
"""

from __future__ import annotations

import math
import os
import re
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import nacl.bindings
import nacl.exceptions

from ..errors import WireError

# ---------------------------------------------------------------------------- bounds

OFFER_VERSION = 1
TRANSFER_ID_LEN = 16
KEY_LEN = 32
HASH_LEN = 32
#: The default chunk: one AEAD seal, one frame. 64 KiB keeps the per-chunk overhead
#: (29 bytes: frame header, index, tag) under 0.05 % while a chunk is still small next to
#: QUIC's 1 MiB stream window.
DEFAULT_CHUNK = 64 * 1024
MIN_CHUNK = 4 * 1024
MAX_CHUNK = 1024 * 1024
#: Default chunks per group: a 1 MiB group, the unit of verification and of resume.
DEFAULT_GROUP_CHUNKS = 16
MAX_GROUP_CHUNKS = 4096
#: Most groups a file may have: the hash list is then at most 2 MiB.
MAX_GROUPS = 65536
#: Largest file an offer may describe (1 TiB).
MAX_FILE_SIZE = 1 << 40
#: A name as offered, in UTF-8 bytes (sanitised and shortened further on receipt).
MAX_OFFER_NAME = 1024
#: A name on disk, in UTF-8 bytes, before any " (n)" suffix.
MAX_NAME_BYTES = 200
MAX_MEDIA_TYPE = 127
#: The offer as a message's text (hex): at most this many characters.
MAX_OFFER_TEXT = 2 * (1 + TRANSFER_ID_LEN + KEY_LEN + 8 + 4 + 2 + HASH_LEN + 2
                      + MAX_OFFER_NAME + 1 + MAX_MEDIA_TYPE)  # fmt: skip
_MEDIA_TYPE = re.compile(
    r"^[a-zA-Z0-9][a-zA-Z0-9!#$&^_.+-]{0,62}/[a-zA-Z0-9][a-zA-Z0-9!#$&^_.+-]{0,62}$"
)
_TAG = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES

# ---------------------------------------------------------------------------- stream frames

#: The first byte of every file stream (delivery's frames start with 1..3): the QUIC
#: stream handler routes on it (p2pd/files/service.py, ``route_stream``).
STREAM_MAGIC = 0x46  # "F"
STREAM_VERSION = 1
STREAM_HEADER = bytes([STREAM_MAGIC, STREAM_VERSION])
# sender -> receiver, on a stream the sender opened
F_OPEN = 1  # transfer id: "I have this transfer for you"
F_HASHES = 2  # first index u32 | hashes (n * 32, 1 <= n <= HASHES_PER_FRAME)
F_CHUNK = 3  # index u64 | sealed chunk
F_END = 4  # every chunk asked for was sent
# receiver -> sender, on a stream the receiver opened (the sender then opens one)
F_NUDGE = 5  # transfer id: "open a stream for it now" (accepted, or back online)
# either way, on a stream of its own
F_CANCEL = 6  # transfer id | reason u8: the other side gave up (reject, cancel)
# receiver -> sender, answers on the sender's stream
F_REQUEST = 16  # from group u32 | flags u8 (1: send the hash list)
F_WAIT = 17  # no offer yet, or not accepted yet: come back when nudged
F_REFUSE = 18  # reason u8: will never take it
F_ACK = 19  # next group u32: every group before it is verified and recorded
F_DONE = 20  # the root matched: the file is in place
_KINDS = frozenset(
    {
        F_OPEN,
        F_HASHES,
        F_CHUNK,
        F_END,
        F_NUDGE,
        F_CANCEL,
        F_REQUEST,
        F_WAIT,
        F_REFUSE,
        F_ACK,
        F_DONE,
    }
)
HASHES_PER_FRAME = 2048
#: Largest frame payload: a sealed chunk of MAX_CHUNK with its index.
MAX_FRAME = 8 + MAX_CHUNK + _TAG
FRAME_HEADER = 5  # kind u8 | length u32
REQUEST_HASHES = 1
REASON_REJECTED, REASON_CANCELLED, REASON_UNKNOWN, REASON_CORRUPT = 1, 2, 3, 4
#: In CANCEL only: the sender cannot read the file any more (gone, or changed size).
REASON_UNREADABLE = 5
#: In REFUSE only: the receiver failed to write the file (its disk full, a quota, the
#: directory gone); the transfer is over.
REASON_CANNOT_SAVE = 6
REASONS = {
    REASON_REJECTED: "rejected",
    REASON_CANCELLED: "cancelled",
    REASON_UNKNOWN: "unknown",
    REASON_CORRUPT: "corrupt",
    REASON_UNREADABLE: "the sender cannot read the file",
    REASON_CANNOT_SAVE: "the receiver cannot save it",
}


class FileProtocolError(WireError):
    """A peer broke the file protocol (bad frame, bad hash list, forged chunk)."""


def encode_frame(kind: int, payload: bytes = b"") -> bytes:
    if kind not in _KINDS or len(payload) > MAX_FRAME:
        raise FileProtocolError("bad file frame")
    return struct.pack(">BI", kind, len(payload)) + payload


class FrameDecoder:
    """``kind u8 | length u32 | payload`` frames after the 2-byte stream header; every
    length is checked against MAX_FRAME before a byte of it is buffered."""

    def __init__(self, *, header: bool) -> None:
        self._buffer = bytearray()
        self._header = header

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        if self._header:
            if len(self._buffer) < len(STREAM_HEADER):
                return []
            if self._buffer[: len(STREAM_HEADER)] != STREAM_HEADER:
                raise FileProtocolError("not a file stream of a version we speak")
            del self._buffer[: len(STREAM_HEADER)]
            self._header = False
        frames: list[tuple[int, bytes]] = []
        while len(self._buffer) >= FRAME_HEADER:
            kind, length = struct.unpack_from(">BI", self._buffer)
            if kind not in _KINDS or length > MAX_FRAME:
                raise FileProtocolError(f"bad file frame header ({kind}, {length})")
            if len(self._buffer) < FRAME_HEADER + length:
                break
            frames.append((kind, bytes(self._buffer[FRAME_HEADER : FRAME_HEADER + length])))
            del self._buffer[: FRAME_HEADER + length]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)


# ---------------------------------------------------------------------------- the offer


@dataclass(frozen=True, slots=True)
class Layout:
    """How a file of ``size`` bytes is cut into chunks and groups."""

    size: int
    chunk_size: int = DEFAULT_CHUNK
    group_chunks: int = DEFAULT_GROUP_CHUNKS

    @classmethod
    def for_size(cls, size: int, chunk_size: int = DEFAULT_CHUNK) -> Layout:
        """The default layout, groups made larger for a file that would have more than
        MAX_GROUPS of them."""
        group_chunks = max(DEFAULT_GROUP_CHUNKS, math.ceil(size / (chunk_size * MAX_GROUPS)))
        return cls(size, chunk_size, group_chunks)

    @property
    def group_size(self) -> int:
        return self.chunk_size * self.group_chunks

    @property
    def chunks(self) -> int:
        return math.ceil(self.size / self.chunk_size)

    @property
    def groups(self) -> int:
        return math.ceil(self.size / self.group_size)

    def check(self) -> None:
        if not 0 <= self.size <= MAX_FILE_SIZE:
            raise FileProtocolError(f"file size out of bounds (at most {MAX_FILE_SIZE})")
        if not MIN_CHUNK <= self.chunk_size <= MAX_CHUNK:
            raise FileProtocolError("chunk size out of bounds")
        if not 1 <= self.group_chunks <= MAX_GROUP_CHUNKS:
            raise FileProtocolError("chunks per group out of bounds")
        if self.groups > MAX_GROUPS:
            raise FileProtocolError("too many chunk groups")

    def chunk_span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        offset = index * self.chunk_size
        return offset, max(0, min(self.chunk_size, self.size - offset))

    def group_span(self, group: int) -> tuple[int, int]:
        """(first chunk, end chunk) of ``group``."""
        first = group * self.group_chunks
        return first, min(first + self.group_chunks, self.chunks)


@dataclass(frozen=True, slots=True)
class Offer:
    """What the sender tells the receiver, inside the session (message kind KIND_FILE)."""

    transfer_id: bytes
    key: bytes
    layout: Layout
    root: bytes
    name: str
    media_type: str = "application/octet-stream"

    @property
    def size(self) -> int:
        return self.layout.size

    def encode(self) -> bytes:
        name = self.name.encode("utf-8")
        media = self.media_type.encode("ascii")
        if len(name) > MAX_OFFER_NAME or len(media) > MAX_MEDIA_TYPE:
            raise FileProtocolError("name or media type too long")
        if len(self.transfer_id) != TRANSFER_ID_LEN or len(self.key) != KEY_LEN:
            raise FileProtocolError("bad transfer id or key length")
        self.layout.check()
        lay = self.layout
        return (
            bytes([OFFER_VERSION])
            + self.transfer_id
            + self.key
            + struct.pack(">QIH", lay.size, lay.chunk_size, lay.group_chunks)
            + self.root
            + struct.pack(">H", len(name))
            + name
            + bytes([len(media)])
            + media
        )

    @classmethod
    def decode(cls, data: bytes) -> Offer:
        """Raises FileProtocolError for anything out of bounds (the name is checked
        later, by :func:`safe_name`, which never fails)."""
        try:
            if not data or data[0] != OFFER_VERSION:
                raise FileProtocolError("unknown file offer version")
            pos = 1
            tid = data[pos : pos + TRANSFER_ID_LEN]
            pos += TRANSFER_ID_LEN
            key = data[pos : pos + KEY_LEN]
            pos += KEY_LEN
            size, chunk, group_chunks = struct.unpack_from(">QIH", data, pos)
            pos += 14
            root = data[pos : pos + HASH_LEN]
            pos += HASH_LEN
            (name_len,) = struct.unpack_from(">H", data, pos)
            pos += 2
            if name_len > MAX_OFFER_NAME:
                raise FileProtocolError("file name too long")
            name_bytes = data[pos : pos + name_len]
            pos += name_len
            media_len = data[pos]
            pos += 1
            if media_len > MAX_MEDIA_TYPE:
                raise FileProtocolError("media type too long")
            media_bytes = data[pos : pos + media_len]
            pos += media_len
        except (struct.error, IndexError):
            raise FileProtocolError("truncated file offer") from None
        if (
            pos != len(data)
            or len(tid) != TRANSFER_ID_LEN
            or len(root) != HASH_LEN
            or len(name_bytes) != name_len
            or len(media_bytes) != media_len
        ):
            raise FileProtocolError("truncated or overlong file offer")
        layout = Layout(size, chunk, group_chunks)
        layout.check()
        name = name_bytes.decode("utf-8", errors="replace")
        media = media_bytes.decode("ascii", errors="replace")
        if not _MEDIA_TYPE.fullmatch(media):
            media = "application/octet-stream"
        return cls(tid, key, layout, root, name, media)

    def to_text(self) -> str:
        return self.encode().hex()

    @classmethod
    def from_text(cls, text: str) -> Offer:
        if len(text) > MAX_OFFER_TEXT:
            raise FileProtocolError("file offer too long")
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise FileProtocolError("file offer is not hex") from None
        return cls.decode(raw)


# ---------------------------------------------------------------------------- hashing


def root_of(group_hashes: list[bytes]) -> bytes:
    """The root an offer commits to: BLAKE3 of the group hashes, in order."""
    return blake3.blake3(b"".join(group_hashes)).digest()


def group_hash(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def hash_file(path: Path, layout: Layout) -> list[bytes]:
    """The group hashes of the file at ``path`` (read one group at a time). Raises
    OSError; a file that changed size since ``layout`` was made is an OSError too."""
    hashes = []
    with open(path, "rb") as f:
        for _ in range(layout.groups):
            data = f.read(layout.group_size)
            hashes.append(blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest())
        if f.tell() != layout.size or f.read(1):
            raise OSError(f"{path} changed while it was hashed")
    return hashes


def verify_file(path: Path, layout: Layout, root: bytes) -> bool:
    """Does the file at ``path`` hash to ``root`` (and have the layout's size)?"""
    try:
        if path.stat().st_size != layout.size:
            return False
        return root_of(hash_file(path, layout)) == root
    except OSError:
        return False


# ---------------------------------------------------------------------------- chunk cipher


class ChunkCipher:
    """XChaCha20-Poly1305 under the file's key; nonce = transfer id | chunk index."""

    def __init__(self, key: bytes, transfer_id: bytes) -> None:
        if len(key) != KEY_LEN or len(transfer_id) != TRANSFER_ID_LEN:
            raise FileProtocolError("bad key or transfer id")
        self._key = key
        self._tid = transfer_id

    def _nonce(self, index: int) -> bytes:
        return self._tid + struct.pack(">Q", index)

    def seal(self, index: int, plain: bytes) -> bytes:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plain, None, self._nonce(index), self._key
        )

    def open(self, index: int, sealed: bytes) -> bytes:
        try:
            return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed, None, self._nonce(index), self._key
            )
        except nacl.exceptions.CryptoError:
            raise FileProtocolError(f"chunk {index} does not authenticate") from None


# ---------------------------------------------------------------------------- names


_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
             *(f"lpt{i}" for i in range(10))}  # fmt: skip


def safe_name(offered: str, fallback: str = "file") -> str:
    """A name that is safe as one path component in any directory: no separators, no
    ``..``, no control or format characters, no leading dot (a file that would hide
    itself), no trailing dots or spaces, not a Windows device name, at most
    MAX_NAME_BYTES of UTF-8. Never fails: what is left of a hostile name, or
    ``fallback``."""
    name = unicodedata.normalize("NFC", offered)
    # Only the last component: "a/b\\c" is "c".
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(
        "_" if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") else c for c in name
    )
    name = name.replace(":", "_").strip().lstrip(".").rstrip(". ")
    if not name or name in (".", ".."):
        name = fallback
    stem = name.split(".")[0].lower()
    if stem in _RESERVED:
        name = "_" + name
    encoded = name.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        _, dot, ext = name.rpartition(".")
        ext_bytes = (dot + ext).encode("utf-8") if dot and 0 < len(ext) <= 16 else b""
        keep = encoded[: MAX_NAME_BYTES - len(ext_bytes)].decode("utf-8", errors="ignore")
        name = keep.rstrip(". ") + ext_bytes.decode("utf-8")
    return name


def candidate_names(name: str, limit: int = 1000) -> list[str]:
    """``name``, then ``stem (1).ext``, ``stem (2).ext``...: what to try in the target dir."""
    stem, dot, ext = name.rpartition(".")
    if not stem:
        stem, dot, ext = name, "", ""
    return [name] + [f"{stem} ({i}){dot}{ext}" for i in range(1, limit)]


def place_file(partial: Path, directory: Path, name: str) -> Path:
    """Move ``partial`` into ``directory`` as ``name``, or with a suffix if that exists:
    never over an existing file (a hard link fails if the name is taken; then the
    partial is unlinked). Raises OSError if no name is free."""
    for candidate in candidate_names(name):
        target = directory / candidate
        try:
            os.link(partial, target)
        except FileExistsError:
            continue
        except OSError:  # no hard links here (some file systems): check, then rename
            if target.exists():
                continue
            os.replace(partial, target)
            return target
        os.unlink(partial)
        return target
    raise OSError(f"no free name for {name!r} in {directory}")


# ---------------------------------------------------------------------------- stream ends


@dataclass(slots=True)
class ReceiveResult:
    """What one read of the sender's stream produced."""

    #: (offset, plaintext) to write to the partial file, in order, before ``verified``.
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    #: Groups that verified, in order (record each once its writes are done).
    verified: list[int] = field(default_factory=list)
    #: The hash list arrived complete and matched the root.
    hashes: list[bytes] | None = None
    #: Every group is verified.
    complete: bool = False
    #: The sender ended the stream before every group came (ask again).
    ended: bool = False
    #: Frames to write back.
    replies: bytes = b""
    #: Bytes of chunks that were already written once before this stream (resume).
    resent: int = 0


class ReceiverStream:
    """The receiver's end of one data stream, after the OPEN frame: ``start()`` is the
    REQUEST to write; ``data_received`` checks the hash list against the root, opens and
    hashes each chunk, and reports the plaintext to write and the groups that verified.

    Raises FileProtocolError for anything the sender got wrong: a chunk that does not
    authenticate (forged, corrupted), a chunk out of order, a group whose hash does not
    match, a hash list that does not give the root. The caller counts it, resets the
    stream, and asks again from the last verified group on a new one."""

    def __init__(
        self,
        offer: Offer,
        hashes: list[bytes] | None,
        next_group: int,
        *,
        written_until: int = 0,
    ) -> None:
        self.offer = offer
        self.layout = offer.layout
        self.cipher = ChunkCipher(offer.key, offer.transfer_id)
        if hashes is None and self.layout.groups == 0:
            if offer.root != root_of([]):
                raise FileProtocolError("an empty file with another root than the empty list's")
            hashes = []  # an empty file: nothing to ask for
        self.hashes = hashes
        self._incoming_hashes: list[bytes] = []
        self.next_group = next_group
        self._next_chunk = self.layout.group_span(next_group)[0]
        self._hasher = blake3.blake3()
        self._decoder = FrameDecoder(header=False)
        #: Bytes of the partial file already written by an earlier stream (resume):
        #: chunks below it are counted as re-sent.
        self.written_until = written_until

    def start(self) -> bytes:
        flags = REQUEST_HASHES if self.hashes is None else 0
        return encode_frame(F_REQUEST, struct.pack(">IB", self.next_group, flags))

    @property
    def complete(self) -> bool:
        return self.hashes is not None and self.next_group >= self.layout.groups

    def data_received(self, data: bytes) -> ReceiveResult:
        result = ReceiveResult()
        for kind, payload in self._decoder.feed(data):
            if kind == F_HASHES:
                self._hashes_frame(payload, result)
            elif kind == F_CHUNK:
                self._chunk_frame(payload, result)
            elif kind == F_END:
                result.ended = True
            else:
                raise FileProtocolError(f"unexpected frame {kind} from the sender")
        result.complete = self.complete
        return result

    def _hashes_frame(self, payload: bytes, result: ReceiveResult) -> None:
        if self.hashes is not None or len(payload) < 4 or (len(payload) - 4) % HASH_LEN:
            raise FileProtocolError("unexpected or malformed hash list")
        (first,) = struct.unpack_from(">I", payload)
        count = (len(payload) - 4) // HASH_LEN
        if first != len(self._incoming_hashes) or count > HASHES_PER_FRAME:
            raise FileProtocolError("hash list out of order")
        if first + count > self.layout.groups:
            raise FileProtocolError("hash list longer than the file")
        self._incoming_hashes += [payload[4 + i * 32 : 36 + i * 32] for i in range(count)]
        if len(self._incoming_hashes) == self.layout.groups:
            if root_of(self._incoming_hashes) != self.offer.root:
                raise FileProtocolError("the hash list does not match the offer's root")
            self.hashes = self._incoming_hashes
            result.hashes = self.hashes

    def _chunk_frame(self, payload: bytes, result: ReceiveResult) -> None:
        if self.hashes is None:
            raise FileProtocolError("a chunk before the hash list")
        if len(payload) < 8:
            raise FileProtocolError("malformed chunk frame")
        (index,) = struct.unpack_from(">Q", payload)
        if index != self._next_chunk or index >= self.layout.chunks:
            raise FileProtocolError(f"chunk {index} out of order (expected {self._next_chunk})")
        offset, length = self.layout.chunk_span(index)
        if len(payload) - 8 != length + _TAG:
            raise FileProtocolError(f"chunk {index} has the wrong length")
        plain = self.cipher.open(index, payload[8:])
        self._hasher.update(plain)
        result.writes.append((offset, plain))
        if offset < self.written_until:
            result.resent += min(length, self.written_until - offset)
        self._next_chunk += 1
        group = self.next_group
        if self._next_chunk == self.layout.group_span(group)[1]:
            if self._hasher.digest() != self.hashes[group]:
                raise FileProtocolError(f"group {group} does not match its hash")
            self._hasher = blake3.blake3()
            self.next_group += 1
            result.verified.append(group)
            result.replies += encode_frame(F_ACK, struct.pack(">I", self.next_group))


@dataclass(frozen=True, slots=True)
class SenderEvent:
    """What the receiver answered on the sender's stream: ``kind`` is one of F_REQUEST
    (``group``: start there; ``hashes``: send the hash list first), F_WAIT, F_REFUSE
    (``reason``), F_ACK (``group``: verified up to there), F_DONE."""

    kind: int
    group: int = 0
    hashes: bool = False
    reason: int = 0


class SenderStream:
    """The sender's end of one data stream: the frames it writes, and what the
    receiver's answers mean."""

    def __init__(self, offer: Offer, hashes: list[bytes]) -> None:
        if len(hashes) != offer.layout.groups:
            raise FileProtocolError("hash list does not fit the layout")
        self.offer = offer
        self.layout = offer.layout
        self.hashes = hashes
        self.cipher = ChunkCipher(offer.key, offer.transfer_id)
        self._decoder = FrameDecoder(header=False)

    def open_frames(self) -> bytes:
        return STREAM_HEADER + encode_frame(F_OPEN, self.offer.transfer_id)

    def hash_frames(self) -> bytes:
        out = bytearray()
        for first in range(0, len(self.hashes), HASHES_PER_FRAME):
            part = self.hashes[first : first + HASHES_PER_FRAME]
            out += encode_frame(F_HASHES, struct.pack(">I", first) + b"".join(part))
        return bytes(out)

    def chunk_frame(self, index: int, plain: bytes) -> bytes:
        sealed = self.cipher.seal(index, plain)
        return encode_frame(F_CHUNK, struct.pack(">Q", index) + sealed)

    def data_received(self, data: bytes) -> list[SenderEvent]:
        events = []
        for kind, payload in self._decoder.feed(data):
            if kind == F_REQUEST and len(payload) == 5:
                group, flags = struct.unpack(">IB", payload)
                if group > self.layout.groups:
                    raise FileProtocolError("request beyond the last group")
                events.append(SenderEvent(F_REQUEST, group, bool(flags & REQUEST_HASHES)))
            elif kind == F_ACK and len(payload) == 4:
                (group,) = struct.unpack(">I", payload)
                if group > self.layout.groups:
                    raise FileProtocolError("ack beyond the last group")
                events.append(SenderEvent(F_ACK, group))
            elif kind in (F_WAIT, F_DONE) and not payload:
                events.append(SenderEvent(kind))
            elif kind == F_REFUSE and len(payload) == 1:
                events.append(SenderEvent(F_REFUSE, reason=payload[0]))
            else:
                raise FileProtocolError(f"unexpected frame {kind} from the receiver")
        return events


def control_frames(kind: int, transfer_id: bytes, reason: int = 0) -> bytes:
    """A stream of its own carrying NUDGE or CANCEL for one transfer."""
    body = transfer_id + (bytes([reason]) if kind == F_CANCEL else b"")
    return STREAM_HEADER + encode_frame(kind, body)


def parse_opening(kind: int, payload: bytes) -> tuple[int, bytes, int]:
    """The first frame of a stream a peer opened: (kind, transfer id, reason)."""
    if kind in (F_OPEN, F_NUDGE) and len(payload) == TRANSFER_ID_LEN:
        return kind, payload, 0
    if kind == F_CANCEL and len(payload) == TRANSFER_ID_LEN + 1:
        return kind, payload[:TRANSFER_ID_LEN], payload[TRANSFER_ID_LEN]
    raise FileProtocolError(f"a file stream cannot start with frame {kind}")
