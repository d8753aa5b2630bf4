"""Signed handle records: the DHT's only kind of value.

A record makes two statements, signed by the key it names, that live for different times:

- the *claim*, handle -> public key. A storing replica keeps it for ``CLAIM_LIFETIME``
  (a year) after its last refresh, so an owner who is offline for a weekend or a month
  keeps the handle;
- the *presence*, the addresses where the owner can be reached, current until
  ``expires`` (owners publish a day, at most ``MAX_LIFETIME``).

The storing replicas keep the first claim they see and accept later records only from
the same key with a higher sequence number, or from a new key that the record's rotation
notice (p2pd/rotation.py) moves the handle to (BEP 44 / IPNS style, plus key rotation).
The byte layout is in docs/PROTOCOL.md, "Handle record".

Everything here is pure: times are passed in as ``now`` (Unix seconds).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field, replace

from .errors import RecordError, WireError
from .identity import Identity, fingerprint, is_valid_handle, verify_signature
from .rotation import MAX_NOTICE_SIZE, verify_notice
from .wire import Address, Reader

MAGIC = b"P2HR"
VERSION = 2
SIGNATURE_CONTEXT = b"p2pd handle record v2\x00"
MAX_ADDRESSES = 8
#: Relays a NATed owner lists (p2pd/relay/): 2-3 in practice.
MAX_RELAYS = 4
#: Opaque signed bytes reserved for the prekey bundle (docs/PROTOCOL.md).
MAX_EXTENSION = 2048
#: The longest presence (addresses) one record can state; owners publish a day and
#: republish well before it ends.
MAX_LIFETIME = 7 * 24 * 3600
#: How long a storing replica keeps a claim after its last refresh (docs/PROTOCOL.md,
#: "Claim and presence"): being offline for a month never loses a handle.
CLAIM_LIFETIME = 365 * 24 * 3600
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
    + 2
    + MAX_NOTICE_SIZE
    + 1
    + MAX_RELAYS * (1 + 16 + 2)
    + 64
)
DHT_KEY_CONTEXT = b"p2pd handle key v1\x00"
#: Why a version-1 record is refused (storage counts these apart, as "old-version").
OLD_VERSION_REFUSED = "record version 1 (an older p2pd) is no longer accepted"


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
    #: A rotation notice (p2pd/rotation.py) moving this handle to this record's key, or b"".
    rotation: bytes = b""
    #: Relays that hold a registration for the owner (p2pd/relay/): where to ask for a
    #: circuit when no address answers. Encoded only when there are any (docs/PROTOCOL.md).
    relays: tuple[Address, ...] = ()
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
        rotation: bytes = b"",
        relays: list[Address] | tuple[Address, ...] = (),
    ) -> HandleRecord:
        unsigned = cls(
            identity.handle,
            identity.public_key,
            tuple(addresses),
            seq,
            now,
            now + lifetime,
            extension,
            rotation,
            tuple(relays),
        )
        unsigned._check_bounds()
        signature = identity.sign(SIGNATURE_CONTEXT + unsigned.encode_body())
        return replace(unsigned, signature=signature)

    def _check_bounds(self) -> None:
        if not is_valid_handle(self.handle):
            raise RecordError("record handle is invalid")
        if len(self.public_key) != 32:
            raise RecordError("record public key must be 32 bytes")
        if len(self.addresses) > MAX_ADDRESSES:
            raise RecordError(f"a record carries at most {MAX_ADDRESSES} addresses")
        if any(a.port == 0 for a in self.addresses):
            raise RecordError("record address with port 0")
        if len(self.relays) > MAX_RELAYS:
            raise RecordError(f"a record lists at most {MAX_RELAYS} relays")
        if any(a.port == 0 for a in self.relays):
            raise RecordError("record relay with port 0")
        if not 0 <= self.seq <= MAX_SEQ:
            raise RecordError("record sequence number out of range")
        if not 0 <= self.issued < self.expires <= self.issued + MAX_LIFETIME:
            raise RecordError("record lifetime out of bounds")
        if len(self.extension) > MAX_EXTENSION:
            raise RecordError("record extension too large")
        if len(self.rotation) > MAX_NOTICE_SIZE:
            raise RecordError("record rotation notice too large")

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
            struct.pack(">H", len(self.rotation)),
            self.rotation,
        ]
        if self.relays:
            # Optional: a record without relays is byte for byte what it was before
            # relays existed; an older decoder refuses one with relays (trailing bytes).
            parts += [bytes([len(self.relays)]), *(a.encode() for a in self.relays)]
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
            version = r.u8()
            if version == 1:
                raise RecordError(OLD_VERSION_REFUSED)
            if version != VERSION:
                raise RecordError(f"unknown record version {version}")
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
            rotation_len = r.u16()
            if rotation_len > MAX_NOTICE_SIZE:
                raise RecordError("record rotation notice too large")
            rotation = r.take(rotation_len)
            relays: tuple[Address, ...] = ()
            if len(data) - r.position > 64:
                relay_count = r.u8()
                if not 0 < relay_count <= MAX_RELAYS:
                    raise RecordError("bad relay count in record")
                relays = tuple(Address.decode_from(r) for _ in range(relay_count))
            signature = r.take(64)
            r.end()
        except RecordError:
            raise
        except WireError as exc:
            raise RecordError(f"malformed record: {exc}") from None
        record = cls(
            handle,
            public_key,
            addresses,
            seq,
            issued,
            expires,
            extension,
            rotation,
            relays,
            signature,
        )
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

    def verify_claim(self, now: float) -> None:
        """Raise RecordError unless the record is a valid *claim*: well formed, signed,
        not issued in the future, its rotation notice (if any) signed by both keys and
        naming this handle and this key. Its presence may have expired."""
        self._check_bounds()
        if not self.signature_valid():
            raise RecordError("record signature does not verify")
        if self.issued > now + MAX_CLOCK_SKEW:
            raise RecordError("record is issued in the future")
        if self.rotation:
            notice = verify_notice(self.rotation)
            if notice.handle != self.handle or notice.new_key != self.public_key:
                raise RecordError("record carries a rotation notice for another handle or key")

    def verify(self, now: float) -> None:
        """Raise RecordError unless the record is a valid claim with a current presence."""
        self.verify_claim(now)
        if not self.present(now):
            raise RecordError("record has expired")

    def present(self, now: float) -> bool:
        """Whether its addresses are current (the claim may outlive them)."""
        return self.expires > now

    def without_presence(self) -> HandleRecord:
        """The claim alone, for a resolver to hand on when the presence has expired: no
        addresses, so delivery goes to the mailbox. Its signature no longer covers it:
        for local use only, never encoded for anyone (repair and storage use the bytes
        the replicas sent)."""
        return replace(self, addresses=(), relays=())

    def rotated_from(self, old_key: bytes) -> bool:
        """Whether this (verified) record's notice moves its handle from ``old_key``."""
        if not self.rotation:
            return False
        return verify_notice(self.rotation).moves(self.handle, old_key, self.public_key)


def claimed_key(data: bytes) -> bytes | None:
    """The public key a record's bytes claim, read without checking anything else (None
    if the header is not a record's). Cheap: for a lookup to see whether the replicas
    agree before it pays for verifying; the resolver verifies what it believes."""
    if len(data) < 6 or data[:4] != MAGIC or data[4] != VERSION:
        return None
    start = 6 + data[5]
    key = data[start : start + 32]
    return key if len(key) == 32 else None


def verify_record(data: bytes, now: float, *, key: bytes | None = None) -> HandleRecord:
    """Decode and verify a record with a current presence; with ``key``, check it belongs
    under that key."""
    record = verify_claim(data, now, key=key)
    if not record.present(now):
        raise RecordError("record has expired")
    return record


def verify_claim(data: bytes, now: float, *, key: bytes | None = None) -> HandleRecord:
    """Decode and verify a record as a claim (its presence may have expired); with
    ``key``, check it belongs under that key."""
    record = HandleRecord.decode(data)
    record.verify_claim(now)
    if key is not None and record.key != key:
        raise RecordError("record stored under the wrong key")
    return record


def claim_ends(record: HandleRecord, refreshed: float) -> float:
    """When a replica stops keeping this claim: ``CLAIM_LIFETIME`` after its last refresh
    (``refreshed``: the replica's own time of receipt of ``record``), but counted from no
    later than the record's own ``issued``, so that copies handed from replica to replica
    cannot keep a claim alive once its owner has stopped refreshing it."""
    return min(refreshed, record.issued) + CLAIM_LIFETIME


class Verdict:
    """Why a storing node accepted or refused an offered record."""

    ACCEPT = "accept"
    ROTATED = "rotated"  # accepted: its rotation notice moves the handle from the held key
    SAME = "same"  # byte-identical to what is held
    INVALID = "invalid"
    OTHER_KEY = "other-key"  # the handle is claimed by another key
    STALE = "stale"  # same key, sequence number not higher
    OLD_VERSION = "old-version"  # a version-1 record (an older p2pd)


def judge(offered: HandleRecord, held: HandleRecord | None) -> str:
    """The storage rule, for an ``offered`` record already verified as a claim, against
    the ``held`` claim if one is still alive (the caller decides with :func:`claim_ends`).

    The first claim seen here wins; only the same key with a higher sequence number
    replaces it, or another key whose rotation notice, signed by the held key, moves the
    handle to it.
    """
    if held is None:
        return Verdict.ACCEPT
    if held.public_key != offered.public_key:
        return Verdict.ROTATED if offered.rotated_from(held.public_key) else Verdict.OTHER_KEY
    if offered.seq > held.seq:
        return Verdict.ACCEPT
    if offered.seq == held.seq and offered.encode() == held.encode():
        return Verdict.SAME
    return Verdict.STALE
