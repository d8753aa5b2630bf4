"""The session envelope: one Double Ratchet message on the wire, and what it authenticates.

Two types share one layout (docs/_session.md, "Envelope"); integers are big-endian::

    0    1    version = 1
    1    1    type: 1 = initial (carries the X3DH header), 2 = normal
    initial:
    2    32   sender's identity key (Ed25519 public key)
    34   32   X3DH ephemeral key (X25519)
    66   32   recipient's signed prekey that was used (X25519)
    98   8    initiated at (u64, Unix seconds, the initiator's clock): ranks sessions
    106  1    one-time prekey flag: 0 = none used, 1 = one follows
    107  0|32 recipient's one-time prekey that was used (X25519)
    normal:
    2    16   session id
    both, then:
         32   ratchet public key (X25519)
         4    previous sending chain length (u32)
         4    message number in the current sending chain (u32)
         C    ciphertext: AES-256-CBC (PKCS#7) || HMAC-SHA-256 tag (32);
              C >= 48, C - 32 a multiple of 16, C <= MAX_CIPHERTEXT

The ciphertext is the rest of the envelope: there is no length field to disagree with.

*How the recipient finds the session.* An initial envelope names its sender (the identity
key in the X3DH header); a normal one carries a 16-byte session id that both sides derive
from the X3DH run (:func:`session_id`). Neither needs the transport's help: a direct QUIC
connection already knows the peer's key (and the recipient checks it against the
session), but a mailbox entry is sealed-sender and may come from anyone, so the envelope
alone must be enough. The id is only ever seen by the recipient: envelopes travel inside
QUIC (TLS 1.3) or inside a mailbox entry sealed to the recipient.

*What is authenticated.* The AEAD's associated data is
``IK_initiator || IK_responder || every envelope byte before the ciphertext``: both
identity keys (as X3DH section 3.3 asks) and the whole header, so no bit of an envelope can
change without the message failing to decrypt.

Pure: no I/O, no clock. Decoding raises only :class:`~p2pd.errors.EnvelopeError`.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from ..errors import EnvelopeError, WireError
from ..wire import Reader

ENVELOPE_VERSION = 1
TYPE_INITIAL = 1
TYPE_NORMAL = 2
KEY_LEN = 32
SESSION_ID_LEN = 16
#: ratchet public key, previous chain length (u32), message number (u32)
RATCHET_HEADER_LEN = KEY_LEN + 4 + 4
MAX_CHAIN_LENGTH = (1 << 32) - 1
AES_BLOCK = 16
TAG_LEN = 32
#: The largest plaintext a session encrypts: 64 KiB of message text plus room for the
#: messaging layer's own header (p2pd.wire.MessagePayload).
MAX_PLAINTEXT = 65 * 1024
MIN_CIPHERTEXT = AES_BLOCK + TAG_LEN
MAX_CIPHERTEXT = (MAX_PLAINTEXT // AES_BLOCK + 1) * AES_BLOCK + TAG_LEN
MAX_U64 = (1 << 64) - 1
INITIAL_PREFIX_MAX = 2 + 3 * KEY_LEN + 8 + 1 + KEY_LEN  # 139
NORMAL_PREFIX_LEN = 2 + SESSION_ID_LEN  # 18
#: Bytes an envelope adds to its plaintext, at most: the initial header, the ratchet
#: header, up to one block of padding and the tag.
MAX_OVERHEAD = INITIAL_PREFIX_MAX + RATCHET_HEADER_LEN + AES_BLOCK + TAG_LEN  # 227
MAX_ENVELOPE = INITIAL_PREFIX_MAX + RATCHET_HEADER_LEN + MAX_CIPHERTEXT
SESSION_ID_CONTEXT = b"p2pd session id v1\x00"


def session_id(initiator_key: bytes, responder_key: bytes, ephemeral_key: bytes) -> bytes:
    """The id both sides derive for the session one X3DH run started.

    ``SHA-256("p2pd session id v1\\x00" || IK_initiator || IK_responder || EK)[:16]``.
    The ephemeral key is fresh for every run, so every session has its own id; the
    identity keys make it impossible to present someone else's session as one's own.
    """
    digest = hashlib.sha256(SESSION_ID_CONTEXT + initiator_key + responder_key + ephemeral_key)
    return digest.digest()[:SESSION_ID_LEN]


def ciphertext_length(plaintext_length: int) -> int:
    """The ciphertext size of a plaintext of that length (PKCS#7 always adds a block)."""
    return (plaintext_length // AES_BLOCK + 1) * AES_BLOCK + TAG_LEN


@dataclass(frozen=True, slots=True)
class InitialHeader:
    """The X3DH header (X3DH section 3.3): who starts the session, with which keys, and
    when by the initiator's clock (p2pd.session.manager uses it to rank sessions)."""

    identity_key: bytes
    ephemeral_key: bytes
    signed_prekey: bytes
    initiated_at: int
    one_time_prekey: bytes | None = None

    def __post_init__(self) -> None:
        keys = [self.identity_key, self.ephemeral_key, self.signed_prekey]
        if self.one_time_prekey is not None:
            keys.append(self.one_time_prekey)
        if any(len(k) != KEY_LEN for k in keys):
            raise EnvelopeError("X3DH header keys must be 32 bytes")
        if not 0 <= self.initiated_at <= MAX_U64:
            raise EnvelopeError("session start time out of range")

    def encode(self) -> bytes:
        otpk = self.one_time_prekey
        return (
            self.identity_key
            + self.ephemeral_key
            + self.signed_prekey
            + struct.pack(">Q", self.initiated_at)
            + (b"\x00" if otpk is None else b"\x01" + otpk)
        )


@dataclass(frozen=True, slots=True)
class RatchetHeader:
    """The Double Ratchet header (Double Ratchet section 3.1, HEADER): DHs, PN, N."""

    ratchet_key: bytes
    previous_chain_length: int
    message_number: int

    def __post_init__(self) -> None:
        if len(self.ratchet_key) != KEY_LEN:
            raise EnvelopeError("ratchet key must be 32 bytes")
        for n in (self.previous_chain_length, self.message_number):
            if not 0 <= n <= MAX_CHAIN_LENGTH:
                raise EnvelopeError("ratchet counter out of range")

    def encode(self) -> bytes:
        return self.ratchet_key + struct.pack(
            ">II", self.previous_chain_length, self.message_number
        )


@dataclass(frozen=True, slots=True)
class Envelope:
    """One envelope: either ``initial`` or ``session`` is set, never both."""

    ratchet: RatchetHeader
    ciphertext: bytes
    initial: InitialHeader | None = None
    session: bytes | None = None

    def __post_init__(self) -> None:
        if (self.initial is None) == (self.session is None):
            raise EnvelopeError("an envelope has either an X3DH header or a session id")
        if self.session is not None and len(self.session) != SESSION_ID_LEN:
            raise EnvelopeError("session id must be 16 bytes")
        n = len(self.ciphertext)
        if n < MIN_CIPHERTEXT or n > MAX_CIPHERTEXT or (n - TAG_LEN) % AES_BLOCK:
            raise EnvelopeError("ciphertext length out of bounds")

    @property
    def prefix(self) -> bytes:
        """Version, type and the X3DH header or session id: part of the associated data."""
        if self.initial is not None:
            return initial_prefix(self.initial)
        assert self.session is not None
        return normal_prefix(self.session)

    def encode(self) -> bytes:
        return self.prefix + self.ratchet.encode() + self.ciphertext

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        if not isinstance(data, bytes) or len(data) > MAX_ENVELOPE:
            raise EnvelopeError("an envelope is bytes, at most 66,787 of them")
        try:
            r = Reader(data)
            if r.u8() != ENVELOPE_VERSION:
                raise EnvelopeError("unknown envelope version")
            kind = r.u8()
            initial: InitialHeader | None = None
            session: bytes | None = None
            if kind == TYPE_INITIAL:
                ik, ek, spk = r.take(KEY_LEN), r.take(KEY_LEN), r.take(KEY_LEN)
                initiated_at = r.u64()
                flag = r.u8()
                if flag not in (0, 1):
                    raise EnvelopeError("bad one-time prekey flag")
                otpk = r.take(KEY_LEN) if flag else None
                initial = InitialHeader(ik, ek, spk, initiated_at, otpk)
            elif kind == TYPE_NORMAL:
                session = r.take(SESSION_ID_LEN)
            else:
                raise EnvelopeError("unknown envelope type")
            ratchet_key = r.take(KEY_LEN)
            pn, n = struct.unpack(">II", r.take(8))
            ratchet = RatchetHeader(ratchet_key, pn, n)
            ciphertext = data[r.position :]
        except EnvelopeError:
            raise
        except WireError as exc:
            raise EnvelopeError(f"malformed envelope: {exc}") from None
        return cls(ratchet, ciphertext, initial, session)


def initial_prefix(header: InitialHeader) -> bytes:
    return bytes([ENVELOPE_VERSION, TYPE_INITIAL]) + header.encode()


def normal_prefix(session: bytes) -> bytes:
    return bytes([ENVELOPE_VERSION, TYPE_NORMAL]) + session
