"""The mailbox entry format: a padded sealed box, stamped with postage.

A storing node holds entries for others; what it may learn of one is its length and the
time it arrived, so (docs/PROTOCOL.md, "Mailbox entries"):

- **Padding.** The plaintext is length-prefixed and padded with zeros before sealing, so
  that the whole entry is one of :data:`BUCKETS` bytes long. A storing node learns the
  bucket, not the length (an ack and a short message share the smallest bucket).
- **Postage.** A put carries a proof of work bound to the mailbox key, the sealed bytes
  and a ten-minute window of the wall clock: BLAKE2b over them and a nonce must have
  ``bits`` leading zero bits (``DHTConfig.postage_bits``). Checking a stamp is one hash;
  finding one is about ``2**bits`` (scripts/bench_postage.py measures it). A stamp cannot
  be moved to another entry or mailbox, nor made ahead of time beyond the window.

Layout (docs/PROTOCOL.md)::

    entry  = version (1, 0x01) | window (u32) | nonce (u64) | sealed
    sealed = crypto_box_seal(owner's X25519 key, length (u16) | plaintext | zeros)
    len(entry) in BUCKETS

Pure functions (no I/O, no clock but the ``wall`` passed in). The stamp search is CPU
work of tens of milliseconds: the trio driver runs :func:`stamp` in a worker thread.
"""

from __future__ import annotations

import hashlib
import struct
import time

import nacl.bindings
import nacl.exceptions
import nacl.public

from ..errors import WireError

ENTRY_VERSION = 1
#: The sizes an entry may have (docs/PROTOCOL.md, "Mailbox entries"). Real entries: an
#: ack's plaintext is 50 bytes; a normal message's 188 + 16 per 16 bytes of text (a
#: 100-byte text: 284), an initial one's 121 more. The smallest bucket holds an ack and a
#: text of up to 265 bytes (137-169 in an initial message) alike, so a storing node cannot
#: tell acks from short messages; doubling steps waste at most half of an entry and tell
#: a storing node at most which of three sizes. 2,048 is the cap entries always had.
BUCKETS = (512, 1024, 2048)
#: version, window, nonce.
HEADER_LEN = 1 + 4 + 8
_SEAL = nacl.bindings.crypto_box_SEALBYTES
_LENGTH = 2
#: The largest plaintext an entry can carry (2,048 - 13 - 48 - 2).
MAX_PLAINTEXT = BUCKETS[-1] - HEADER_LEN - _SEAL - _LENGTH
#: The postage window (seconds) a stamp is bound to; the window before and after the
#: storing node's own are accepted too (clocks differ; a lookup takes seconds).
POSTAGE_WINDOW = 600
_PERSON = b"p2pd postage v1"  # BLAKE2b personalisation (at most 16 bytes)


class MailboxEntryError(WireError):
    """A mailbox entry that is malformed, not stamped well enough, or does not open."""


def bucket_for(plaintext_len: int) -> int:
    """The entry size that carries a plaintext of this length."""
    need = plaintext_len + HEADER_LEN + _SEAL + _LENGTH
    for size in BUCKETS:
        if need <= size:
            return size
    raise MailboxEntryError(f"a mailbox plaintext holds at most {MAX_PLAINTEXT} bytes")


def pad(plaintext: bytes) -> bytes:
    """``plaintext`` length-prefixed and zero-padded to fill its bucket once sealed."""
    size = bucket_for(len(plaintext)) - HEADER_LEN - _SEAL
    body = struct.pack(">H", len(plaintext)) + plaintext
    return body + bytes(size - len(body))


def unpad(padded: bytes) -> bytes:
    """The plaintext inside ``padded``; the length is checked against what holds it."""
    if len(padded) < _LENGTH:
        raise MailboxEntryError("mailbox entry too short")
    (length,) = struct.unpack_from(">H", padded)
    if length > len(padded) - _LENGTH or length > MAX_PLAINTEXT:
        raise MailboxEntryError("mailbox entry length out of bounds")
    if any(padded[_LENGTH + length :]):
        raise MailboxEntryError("mailbox entry padding is not zero")
    return padded[_LENGTH : _LENGTH + length]


def seal(owner_public_key: bytes, plaintext: bytes) -> bytes:
    """``plaintext`` padded and sealed to the owner (an Ed25519 identity key): the
    entry's body, before postage."""
    curve = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(owner_public_key)
    return bytes(nacl.public.SealedBox(nacl.public.PublicKey(curve)).encrypt(pad(plaintext)))


def window_of(wall: float) -> int:
    return int(wall // POSTAGE_WINDOW) & 0xFFFFFFFF


def _prefix(key: bytes, header: bytes, sealed: bytes) -> hashlib.blake2b:
    # BLAKE2b over the key, version and window, and a hash of the sealed bytes (so a try
    # hashes 8 more bytes, not the whole entry, whatever its size).
    h = hashlib.blake2b(digest_size=32, person=_PERSON)
    h.update(key + header + hashlib.sha256(sealed).digest())
    return h


def _target(bits: int) -> bytes:
    # A digest below this (big-endian, as bytes compare) has ``bits`` leading zero bits.
    return (1 << (256 - bits)).to_bytes(33, "big")[1:] if bits else b"\xff" * 33


def stamp(key: bytes, sealed: bytes, wall: float, bits: int, *, max_tries: int = 1 << 40) -> bytes:
    """The entry: ``sealed`` with postage for mailbox ``key`` (about ``2**bits`` hashes).
    Raises MailboxEntryError if no nonce below ``max_tries`` works (never, in practice)."""
    if len(sealed) + HEADER_LEN not in BUCKETS:
        raise MailboxEntryError("sealed body of a size no bucket has")
    header = struct.pack(">BI", ENTRY_VERSION, window_of(wall))
    prefix = _prefix(key, header, sealed)
    target = _target(bits)
    pack = struct.Struct(">Q").pack
    for nonce in range(max_tries):
        h = prefix.copy()
        h.update(pack(nonce))
        if h.digest() < target:
            return header + pack(nonce) + sealed
        if nonce & 0x7FF == 0x7FF:
            # hashlib holds the GIL for inputs this small: let the trio thread run
            # about every millisecond, not only at the interpreter's 5 ms switch interval
            # (scripts/bench_postage.py measures how late trio is meanwhile).
            time.sleep(0)
    raise MailboxEntryError("no postage found")


def check(key: bytes, entry: bytes, wall: float, bits: int) -> str | None:
    """Why a storing node refuses ``entry`` for mailbox ``key`` (None: it is well formed
    and carries postage worth ``bits`` from a recent window). One hash."""
    if len(entry) not in BUCKETS:
        return "size"
    version, window = struct.unpack_from(">BI", entry)
    if version != ENTRY_VERSION:
        return "version"
    # Windows wrap at 2**32 (in 800 centuries): compare modulo.
    if min((window - window_of(wall)) % (1 << 32), (window_of(wall) - window) % (1 << 32)) > 1:
        return "stale-postage"
    h = _prefix(key, entry[:5], entry[HEADER_LEN:])
    h.update(entry[5:HEADER_LEN])
    if not h.digest() < _target(bits):
        return "postage"
    return None


def open_entry(unseal: nacl.public.SealedBox[nacl.public.PrivateKey], entry: bytes) -> bytes:
    """The plaintext of an entry in our mailbox (``unseal``: a SealedBox of our X25519
    private key). Raises MailboxEntryError if it is not ours or malformed."""
    if len(entry) not in BUCKETS or entry[0] != ENTRY_VERSION:
        raise MailboxEntryError("not a mailbox entry")
    try:
        padded = unseal.decrypt(entry[HEADER_LEN:])
    except nacl.exceptions.CryptoError as exc:
        raise MailboxEntryError("mailbox entry does not open") from exc
    return unpad(padded)
