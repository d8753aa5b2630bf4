"""Mailbox passes: postage a recipient hands its contacts (issue 12, item 3).

Postage (:mod:`.mailbox_entry`) is a price: a flooder who pays it for 256 junk entries
fills a mailbox for its TTL, and then a contact's put is refused like anyone's. A pass
lets a contact's puts skip the proof of work and land in a second share of the mailbox
(``MailboxLimits.contact_*``) that stamped puts from strangers cannot fill.

How it works (docs/PROTOCOL.md, "Mailbox passes"; the reasoning in docs/SECURITY.md):

- The recipient makes a **pass key** per week (an Ed25519 key pair derived from its
  identity, so nothing is stored) and signs a **certificate** with its identity key:
  ``owner | expires | pass public key``. It gives the pass (the pass key's seed and the
  certificate) to each pinned contact inside the end-to-end session
  (:mod:`.mailbox_pass_share`). All its contacts hold the same pass.
- A contact's put is ``0x02 | certificate | signature | entry``: the entry as a stranger
  would send it (its window checked, its nonce not), and the pass key's signature over
  the mailbox key and a hash of the entry.
- A storing node checks that the certificate is the mailbox owner's (the mailbox key is
  a hash of the owner's key), unexpired and not too long-lived, signed by the owner, and
  that the put's signature holds. It stores the entry alone (the pass is dropped).

Why a signature and not a MAC: the storing node must check a put without being able to
make one. With a shared MAC key every replica (any node that places itself near the
mailbox key) could fill the contacts' share at every other replica. The pass key's
public half is all a storing node learns, so it can check but not forge.

What a pass reveals to a storing node: that the put comes from someone the owner gave
this week's pass (one of its contacts, or the owner itself), and the owner's public key
(which its fetches reveal anyway). It does not tell contacts apart: every contact signs
with the same key, and Ed25519 signatures over distinct entries are unlinkable beyond
that key. What it cannot stop: a contact, or anyone a contact leaks the pass to, filling
the contacts' share until the pass expires (at most :data:`MAX_PASS_LIFETIME`).

Pure functions and a small cache; no I/O, no clock but the ``wall`` passed in.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import nacl.signing

from ..identity import verify_signature
from ..wire import MAX_MAILBOX_ENTRY, MAX_MAILBOX_PUT
from . import mailbox_entry

__all__ = [
    "CONTACT_PUT",
    "MAX_PASS_LIFETIME",
    "PASS_PERIOD",
    "MailboxPass",
    "PassChecker",
    "issue_pass",
    "wrap",
]

#: The first byte of a contact's put (an entry itself starts with its version, 0x01).
CONTACT_PUT = 0x02
#: A new pass key every week; a pass is valid for the week it was made and the next, so
#: contacts who have not heard from the owner this week still hold a valid one.
PASS_PERIOD = 7 * 24 * 3600
#: A storing node refuses a certificate that claims to be valid further ahead than this:
#: a leaked pass is worth at most three weeks.
MAX_PASS_LIFETIME = 3 * PASS_PERIOD
CERT_CONTEXT = b"p2pd mailbox pass v1\x00"
PUT_CONTEXT = b"p2pd mailbox pass put v1\x00"
SEED_CONTEXT = b"p2pd mailbox pass seed v1\x00"
_KEY = 32
_SIG = 64
#: owner (32) | expires (u64) | pass public key (32) | owner's signature (64).
CERT_LEN = _KEY + 8 + _KEY + _SIG
#: What a pass adds to an entry: the kind byte, the certificate, the put's signature.
PASS_OVERHEAD = 1 + CERT_LEN + _SIG
assert MAX_MAILBOX_ENTRY + PASS_OVERHEAD <= MAX_MAILBOX_PUT
#: A pass as a contact keeps it: its seed and certificate.
PASS_LEN = _KEY + CERT_LEN
#: Certificates whose owner signature was checked, kept so that a put costs one check.
CERT_CACHE = 1024


def _cert_message(owner: bytes, expires: int, pass_key: bytes) -> bytes:
    return CERT_CONTEXT + owner + struct.pack(">Q", expires) + pass_key


def _put_message(key: bytes, entry: bytes) -> bytes:
    return PUT_CONTEXT + key + hashlib.sha256(entry).digest()


@dataclass(frozen=True, slots=True)
class MailboxPass:
    """A pass into ``owner``'s mailbox. ``seed`` is secret: only the owner's contacts
    hold it (``repr`` never shows it)."""

    owner: bytes
    expires: int
    seed: bytes
    signature: bytes

    @property
    def public_key(self) -> bytes:
        return bytes(nacl.signing.SigningKey(self.seed).verify_key)

    @property
    def certificate(self) -> bytes:
        return self.owner + struct.pack(">Q", self.expires) + self.public_key + self.signature

    def to_bytes(self) -> bytes:
        return self.seed + self.certificate

    @classmethod
    def from_bytes(cls, data: bytes) -> MailboxPass:
        """A pass as :meth:`to_bytes` wrote it; ValueError unless its certificate is
        well formed and signed by its owner for its key."""
        if len(data) != PASS_LEN:
            raise ValueError("a mailbox pass is 168 bytes")
        seed, cert = data[:_KEY], data[_KEY:]
        owner, (expires,), pass_key, signature = (
            cert[:_KEY],
            struct.unpack_from(">Q", cert, _KEY),
            cert[_KEY + 8 : 2 * _KEY + 8],
            cert[2 * _KEY + 8 :],
        )
        made = cls(owner, expires, seed, signature)
        if made.public_key != pass_key:
            raise ValueError("mailbox pass seed does not match its certificate")
        if not verify_signature(owner, _cert_message(owner, expires, pass_key), signature):
            raise ValueError("mailbox pass certificate not signed by its owner")
        return made

    def valid(self, wall: float, margin: float = 600.0) -> bool:
        """Whether a storing node would take it for the next ``margin`` seconds."""
        return wall + margin < self.expires <= wall + MAX_PASS_LIFETIME

    def __repr__(self) -> str:
        return f"MailboxPass(owner={self.owner[:4].hex()}..., expires={self.expires})"


def issue_pass(
    owner: bytes, sign: Callable[[bytes], bytes], wall: float, epoch: int = 0
) -> MailboxPass:
    """This week's pass into ``owner``'s mailbox (``sign``: the owner's identity key).

    The pass key's seed is a hash of the owner's signature over the week's number (and,
    once the owner has revoked a pass, :mod:`.mailbox_revoke`, its pass ``epoch``):
    Ed25519 signatures are deterministic, so the same week and epoch give the same pass
    on every start, and only the holder of the identity key can compute it (the
    signature is never published)."""
    week = int(wall // PASS_PERIOD)
    message = SEED_CONTEXT + owner + struct.pack(">Q", week)
    if epoch:  # epoch 0 derives as passes did before revocation existed
        message += struct.pack(">Q", epoch)
    seed = hashlib.sha256(sign(message)).digest()
    expires = (week + 2) * PASS_PERIOD
    pass_key = bytes(nacl.signing.SigningKey(seed).verify_key)
    return MailboxPass(owner, expires, seed, sign(_cert_message(owner, expires, pass_key)))


def wrap(mailbox_pass: MailboxPass, key: bytes, entry: bytes) -> bytes:
    """A contact's put of ``entry`` (a stamped or unstamped entry) into mailbox ``key``."""
    signature = nacl.signing.SigningKey(mailbox_pass.seed).sign(_put_message(key, entry)).signature
    return bytes([CONTACT_PUT]) + mailbox_pass.certificate + signature + entry


class PassChecker:
    """A storing node's check of contacts' puts, with a small cache of certificates
    already checked (so a put costs one signature check, not two)."""

    def __init__(
        self,
        owner_key_of: Callable[[bytes], bytes],
        revoked: Callable[[bytes, int, bytes, float], bool] | None = None,
    ) -> None:
        #: The mailbox key of an owner's key (:func:`~.mailbox.mailbox_key`).
        self._mailbox_key = owner_key_of
        #: Whether (mailbox key, expires, pass key, wall) is revoked by the owner's pin
        #: (:meth:`.mailbox_revoke.PassPins.revoked`).
        self._revoked = revoked
        self._certs: OrderedDict[bytes, None] = OrderedDict()

    def check(self, key: bytes, put: bytes, wall: float) -> tuple[bytes | None, str | None]:
        """(the entry to store, None) for a good contact's put into mailbox ``key``,
        else (None, why it is refused). Cheap checks first; at most two signature
        checks, one once the certificate is cached."""
        if not PASS_OVERHEAD < len(put) <= MAX_MAILBOX_ENTRY + PASS_OVERHEAD:
            return None, "size"
        cert, signature, entry = (
            put[1 : 1 + CERT_LEN],
            put[1 + CERT_LEN : PASS_OVERHEAD],
            put[PASS_OVERHEAD:],
        )
        owner = cert[:_KEY]
        (expires,) = struct.unpack_from(">Q", cert, _KEY)
        pass_key = cert[_KEY + 8 : 2 * _KEY + 8]
        if self._mailbox_key(owner) != key:
            return None, "pass-wrong-mailbox"
        if expires <= wall:
            return None, "pass-expired"
        if expires > wall + MAX_PASS_LIFETIME:
            return None, "pass-too-long"
        if self._revoked is not None and self._revoked(key, expires, pass_key, wall):
            return None, "pass-revoked"
        # The entry's own checks, postage aside (0 bits: its window must be recent).
        why = mailbox_entry.check(key, entry, wall, 0)
        if why is not None:
            return None, why
        if cert not in self._certs:
            if not verify_signature(owner, _cert_message(owner, expires, pass_key), cert[-_SIG:]):
                return None, "pass-forged"
            self._certs[cert] = None
            if len(self._certs) > CERT_CACHE:
                self._certs.popitem(last=False)
        else:
            self._certs.move_to_end(cert)
        if not verify_signature(pass_key, _put_message(key, entry), signature):
            return None, "pass-signature"
        return entry, None
