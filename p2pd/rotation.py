"""Key rotation notices: the only proof that lets a pinned key change by itself.

``p2pd rotate-key`` makes a new identity key for the same handle and a notice that binds
the old key to the new one. The old key signs it (so only the owner of the pinned key can
move a pin) and the new key signs it too (so nobody can rotate a handle onto a key they
do not hold). Contacts that have the old key pinned accept the new one on seeing a valid
notice; storing DHT nodes that hold the old key's claim let the new key's record replace
it. Anything else that shows a different key is only evidence (docs/SECURITY.md).

Layout (docs/PROTOCOL.md, "Rotation notices")::

    "P2RN" | version (1) | handle length (1) | handle | old key (32) | new key (32)
    | issued (u64, Unix seconds) | signature by the old key (64) | by the new key (64)

Both signatures cover ``SIGNATURE_CONTEXT || everything before the signatures``.
Everything here is pure.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .errors import RecordError, WireError
from .identity import HANDLE_MAX, Identity, is_valid_handle, verify_signature
from .wire import Reader

MAGIC = b"P2RN"
VERSION = 1
SIGNATURE_CONTEXT = b"p2pd key rotation v1\x00"
MAX_NOTICE_SIZE = len(MAGIC) + 1 + 1 + HANDLE_MAX + 32 + 32 + 8 + 64 + 64


@dataclass(frozen=True, slots=True)
class RotationNotice:
    handle: str
    old_key: bytes
    new_key: bytes
    issued: int
    old_signature: bytes = field(default=b"", repr=False)
    new_signature: bytes = field(default=b"", repr=False)

    @classmethod
    def create(cls, old: Identity, new: Identity, *, now: int) -> RotationNotice:
        """The notice that moves ``old.handle`` from ``old``'s key to ``new``'s."""
        if old.handle != new.handle:
            raise RecordError("a rotation keeps the handle")
        if old.public_key == new.public_key:
            raise RecordError("a rotation needs a new key")
        unsigned = cls(old.handle, old.public_key, new.public_key, now)
        unsigned._check_bounds()
        body = SIGNATURE_CONTEXT + unsigned.encode_body()
        return cls(old.handle, old.public_key, new.public_key, now, old.sign(body), new.sign(body))

    def _check_bounds(self) -> None:
        if not is_valid_handle(self.handle):
            raise RecordError("rotation notice handle is invalid")
        if len(self.old_key) != 32 or len(self.new_key) != 32:
            raise RecordError("rotation notice keys must be 32 bytes")
        if self.old_key == self.new_key:
            raise RecordError("rotation notice names the same key twice")
        if not 0 <= self.issued < 1 << 63:
            raise RecordError("rotation notice time out of range")

    def encode_body(self) -> bytes:
        handle = self.handle.encode("ascii")
        return b"".join(
            [
                MAGIC,
                bytes([VERSION, len(handle)]),
                handle,
                self.old_key,
                self.new_key,
                struct.pack(">Q", self.issued),
            ]
        )

    def encode(self) -> bytes:
        if len(self.old_signature) != 64 or len(self.new_signature) != 64:
            raise RecordError("rotation notice is not signed")
        return self.encode_body() + self.old_signature + self.new_signature

    @classmethod
    def decode(cls, data: bytes) -> RotationNotice:
        """Parse the canonical encoding. Checks syntax and bounds, *not* the signatures."""
        if not isinstance(data, bytes) or len(data) > MAX_NOTICE_SIZE:
            raise RecordError("rotation notice too large")
        try:
            r = Reader(data)
            if r.take(4) != MAGIC:
                raise RecordError("not a rotation notice")
            if r.u8() != VERSION:
                raise RecordError("unknown rotation notice version")
            raw_handle = r.take(r.u8())
            try:
                handle = raw_handle.decode("ascii")
            except UnicodeDecodeError:
                raise RecordError("rotation notice handle is not ASCII") from None
            old_key, new_key = r.take(32), r.take(32)
            issued = r.u64()
            old_signature, new_signature = r.take(64), r.take(64)
            r.end()
        except WireError as exc:
            raise RecordError(f"malformed rotation notice: {exc}") from None
        notice = cls(handle, old_key, new_key, issued, old_signature, new_signature)
        notice._check_bounds()
        return notice

    def verify(self) -> None:
        """Raise RecordError unless both keys signed this notice."""
        self._check_bounds()
        body = SIGNATURE_CONTEXT + self.encode_body()
        if not verify_signature(self.old_key, body, self.old_signature):
            raise RecordError("rotation notice is not signed by the old key")
        if not verify_signature(self.new_key, body, self.new_signature):
            raise RecordError("rotation notice is not signed by the new key")

    def moves(self, handle: str, old_key: bytes, new_key: bytes) -> bool:
        """Whether this (verified) notice moves ``handle`` from ``old_key`` to ``new_key``."""
        return (self.handle, self.old_key, self.new_key) == (handle, old_key, new_key)


def verify_notice(data: bytes) -> RotationNotice:
    """Decode and verify; raises RecordError."""
    notice = RotationNotice.decode(data)
    notice.verify()
    return notice
