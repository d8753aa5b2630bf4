"""Signed handle records: the DHT's only kind of value.

A record binds a handle to an Ed25519 public key and the addresses where its owner can be
reached. It is signed by that key; the storing nodes keep the first valid claim to a
handle and accept later records only from the same key with a higher sequence number,
until the claim expires (BEP 44 / IPNS style). The byte layout is in docs/PROTOCOL.md.

Everything here is pure: times are passed in as ``now`` (Unix seconds).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import RecordError, WireError
from .identity import Identity, fingerprint, is_valid_handle, verify_signature
from .wire import Address, Reader

MAGIC = b"P2HR"
VERSION = 1
SIGNATURE_CONTEXT = b"p2pd handle record v1\x00"
MAX_ADDRESSES = 8
#: Opaque signed bytes reserved for the prekey bundle (docs/PROTOCOL.md).
MAX_EXTENSION = 2048
#: The longest claim one record can make; the owner republishes well before it ends.
MAX_LIFETIME = 7 * 24 * 3600
#: How far in the future `issued` may lie: clocks of peers disagree.
MAX_CLOCK_SKEW = 600
MAX_SEQ = (1 << 63) - 1
MAX_RECORD_SIZE = (
    len(MAGIC)
    + 1
    + 1
    + 32
    + 32
    + 8
    + 8
    + 8
    + 1
    + MAX_ADDRESSES * (1 + 16 + 2)
    + 2
    + MAX_EXTENSION
    + 64
)
DHT_KEY_CONTEXT = b"p2pd handle key v1\x00"


def dht_key(handle: str) -> bytes:
    """The 160-bit DHT key under which ``handle``'s record is stored."""
    return hashlib.sha256(DHT_KEY_CONTEXT + handle.encode("ascii")).digest()[:20]


@dataclass(frozen=True, slots=True)
class HandleRecord:
    handle: str
    public_key: bytes
    addresses: tuple[Address, ...]
    seq: int
    issued: int
    expires: int
    extension: bytes = b""
    signature: bytes = field(default=b"", repr=False)

    # ------------------------------------------------------------------ building

    @classmethod
    def create(
        cls,
        identity: Identity,
        addresses: list[Address] | tuple[Address, ...],
        *,
        seq: int,
        now: int,
        lifetime: int,
        extension: bytes = b"",
    ) -> HandleRecord:
        unsigned = cls(
            identity.handle,
            identity.public_key,
            tuple(addresses),
            seq,
            now,
            now + lifetime,
            extension,
        )
        unsigned._check_bounds()
        signature = identity.sign(SIGNATURE_CONTEXT + unsigned.encode_body())
        return cls(
            unsigned.handle,
            unsigned.public_key,
            unsigned.addresses,
            seq,
            unsigned.issued,
            unsigned.expires,
            extension,
            signature,
        )

    def _check_bounds(self) -> None:
        if not is_valid_handle(self.handle):
            raise RecordError("record handle is invalid")
        if len(self.public_key) != 32:
            raise RecordError("record public key must be 32 bytes")
        if len(self.addresses) > MAX_ADDRESSES:
            raise RecordError(f"a record carries at most {MAX_ADDRESSES} addresses")
        if any(a.port == 0 for a in self.addresses):
            raise RecordError("record address with port 0")
        if not 0 <= self.seq <= MAX_SEQ:
            raise RecordError("record sequence number out of range")
        if not 0 <= self.issued < self.expires <= self.issued + MAX_LIFETIME:
            raise RecordError("record lifetime out of bounds")
        if len(self.extension) > MAX_EXTENSION:
            raise RecordError("record extension too large")

    # ------------------------------------------------------------------ encoding

    def encode_body(self) -> bytes:
        handle = self.handle.encode("ascii")
        parts = [
            MAGIC,
            bytes([VERSION, len(handle)]),
            handle,
            self.public_key,
            struct.pack(">QQQ", self.seq, self.issued, self.expires),
            bytes([len(self.addresses)]),
            *(a.encode() for a in self.addresses),
            struct.pack(">H", len(self.extension)),
            self.extension,
        ]
        return b"".join(parts)

    def encode(self) -> bytes:
        if len(self.signature) != 64:
            raise RecordError("record is not signed")
        return self.encode_body() + self.signature

    @classmethod
    def decode(cls, data: bytes) -> HandleRecord:
        """Parse the canonical encoding. Checks syntax and bounds, *not* the signature."""
        if not isinstance(data, bytes) or len(data) > MAX_RECORD_SIZE:
            raise RecordError("record too large")
        try:
            r = Reader(data)
            if r.take(4) != MAGIC:
                raise RecordError("not a handle record")
            if r.u8() != VERSION:
                raise RecordError("unknown record version")
            handle_len = r.u8()
            raw_handle = r.take(handle_len)
            try:
                handle = raw_handle.decode("ascii")
            except UnicodeDecodeError:
                raise RecordError("record handle is not ASCII") from None
            public_key = r.take(32)
            seq, issued, expires = r.u64(), r.u64(), r.u64()
            count = r.u8()
            if count > MAX_ADDRESSES:
                raise RecordError("too many addresses in record")
            addresses = tuple(Address.decode_from(r) for _ in range(count))
            ext_len = r.u16()
            if ext_len > MAX_EXTENSION:
                raise RecordError("record extension too large")
            extension = r.take(ext_len)
            signature = r.take(64)
            r.end()
        except RecordError:
            raise
        except WireError as exc:
            raise RecordError(f"malformed record: {exc}") from None
        record = cls(handle, public_key, addresses, seq, issued, expires, extension, signature)
        record._check_bounds()
        if record.encode() != data:  # one canonical encoding
            raise RecordError("record is not canonically encoded")
        return record

    # ------------------------------------------------------------------ checking

    @property
    def key(self) -> bytes:
        return dht_key(self.handle)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def signature_valid(self) -> bool:
        return verify_signature(
            self.public_key, SIGNATURE_CONTEXT + self.encode_body(), self.signature
        )

    def verify(self, now: float) -> None:
        """Raise RecordError unless the record is well formed, signed and current."""
        self._check_bounds()
        if not self.signature_valid():
            raise RecordError("record signature does not verify")
        if self.issued > now + MAX_CLOCK_SKEW:
            raise RecordError("record is issued in the future")
        if self.expires <= now:
            raise RecordError("record has expired")


def verify_record(data: bytes, now: float, *, key: bytes | None = None) -> HandleRecord:
    """Decode and fully verify a record; with ``key``, check it belongs under that key."""
    record = HandleRecord.decode(data)
    record.verify(now)
    if key is not None and record.key != key:
        raise RecordError("record stored under the wrong key")
    return record


class Verdict:
    """Why a storing node accepted or refused an offered record."""

    ACCEPT = "accept"
    SAME = "same"  # byte-identical to what is held
    INVALID = "invalid"
    OTHER_KEY = "other-key"  # the handle is claimed by another key
    STALE = "stale"  # same key, sequence number not higher


def judge(offered: HandleRecord, held: HandleRecord | None, now: float) -> str:
    """The storage rule, for an ``offered`` record that has already been verified.

    First valid claim wins; only the same key with a higher sequence number replaces it;
    a claim that has expired no longer binds the handle.
    """
    if held is None or held.expires <= now:
        return Verdict.ACCEPT
    if held.public_key != offered.public_key:
        return Verdict.OTHER_KEY
    if offered.seq > held.seq:
        return Verdict.ACCEPT
    if offered.seq == held.seq and offered.encode() == held.encode():
        return Verdict.SAME
    return Verdict.STALE


def choose_best(
    candidates: list[bytes], now: float, *, key: bytes, accept_key: Callable[[bytes], bool]
) -> HandleRecord | None:
    """Pick the record a lookup returns from the values the storing nodes sent.

    Invalid records and records whose key ``accept_key`` refuses (the fingerprint prefix of
    a self-certifying handle, later the pinned key) are dropped. If valid claims by
    different keys remain (only possible if storing nodes lie), the key held by the most
    responding nodes wins, then the earliest issue time; within that key the highest
    sequence number wins, i.e. the newest record, never simply "the most common value".
    """
    by_key: dict[bytes, list[HandleRecord]] = {}
    for data in candidates:
        try:
            record = verify_record(data, now, key=key)
        except RecordError:
            continue
        if accept_key(record.public_key):
            by_key.setdefault(record.public_key, []).append(record)
    if not by_key:
        return None
    _, records = max(
        by_key.items(), key=lambda kv: (len(kv[1]), -min(r.issued for r in kv[1]), kv[0])
    )
    return max(records, key=lambda r: r.seq)
