"""The prekey bundle: what a node publishes so that others can start a session with it.

The bundle travels in the ``extension`` field of the owner's handle record (at most
``records.MAX_EXTENSION`` = 2048 bytes), which the owner signs as a whole; the identity
key is the record's ``public_key`` and is therefore not repeated here. The signed prekey
carries its own signature as X3DH requires (X3DH section 3.2), so a bundle is verifiable
on its own, whoever hands it over.

Layout (docs/_session.md, "Prekey bundle")::

    0    4      magic "P2PB"
    4    1      version = 1
    5    32     signed prekey, X25519 public key
    37   64     Ed25519 signature by the identity key over
                "p2pd signed prekey v1\\x00" || signed prekey
    101  1      one-time prekey count N, 0..40
    102  N x 32 one-time prekeys, X25519 public keys, strictly ascending

Size: 102 + 32 N bytes, at most 1,382 (N = 40), leaving 666 bytes of the 2,048-byte
extension unused for later fields. Canonical: the keys are sorted and distinct and
nothing follows them, so one bundle has exactly one encoding.

Pure: no I/O, no clock. Decoding raises only :class:`~p2pd.errors.BundleError`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import BundleError, WireError
from ..identity import verify_signature
from ..wire import Reader

if TYPE_CHECKING:  # x3dh (and pydantic) load only where an agreement needs them
    import x3dh

BUNDLE_MAGIC = b"P2PB"
BUNDLE_VERSION = 1
KEY_LEN = 32
SIGNATURE_LEN = 64
#: How many one-time prekeys a bundle carries at most.
MAX_ONE_TIME_PREKEYS = 40
#: Domain separation for the signed-prekey signature: the identity key also signs handle
#: records, mailbox requests and the TLS handshake, each under its own context string, so
#: no signature made for one purpose is ever valid for another.
SIGNED_PREKEY_CONTEXT = b"p2pd signed prekey v1\x00"
_FIXED = len(BUNDLE_MAGIC) + 1 + KEY_LEN + SIGNATURE_LEN + 1
MIN_BUNDLE_SIZE = _FIXED  # 102
MAX_BUNDLE_SIZE = _FIXED + MAX_ONE_TIME_PREKEYS * KEY_LEN  # 1,382


def signed_prekey_message(signed_prekey: bytes) -> bytes:
    """The bytes the identity key signs to vouch for a signed prekey."""
    return SIGNED_PREKEY_CONTEXT + signed_prekey


@dataclass(frozen=True, slots=True)
class PrekeyBundle:
    """A signed prekey with its signature, and up to 40 one-time prekeys (sorted)."""

    signed_prekey: bytes
    signature: bytes
    one_time_prekeys: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if len(self.signed_prekey) != KEY_LEN:
            raise BundleError("signed prekey must be 32 bytes")
        if len(self.signature) != SIGNATURE_LEN:
            raise BundleError("signed prekey signature must be 64 bytes")
        keys = self.one_time_prekeys
        if len(keys) > MAX_ONE_TIME_PREKEYS:
            raise BundleError(f"a bundle carries at most {MAX_ONE_TIME_PREKEYS} one-time prekeys")
        if any(len(k) != KEY_LEN for k in keys):
            raise BundleError("one-time prekeys must be 32 bytes")
        if any(a >= b for a, b in itertools.pairwise(keys)):
            raise BundleError("one-time prekeys must be sorted and distinct")

    # ------------------------------------------------------------------ encoding

    def encode(self) -> bytes:
        return b"".join(
            [
                BUNDLE_MAGIC,
                bytes([BUNDLE_VERSION]),
                self.signed_prekey,
                self.signature,
                bytes([len(self.one_time_prekeys)]),
                *self.one_time_prekeys,
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> PrekeyBundle:
        """Parse the canonical encoding. Checks syntax and bounds, *not* the signature."""
        if not isinstance(data, bytes) or len(data) > MAX_BUNDLE_SIZE:
            raise BundleError("a prekey bundle is bytes, at most 1,382 of them")
        try:
            r = Reader(data)
            if r.take(len(BUNDLE_MAGIC)) != BUNDLE_MAGIC:
                raise BundleError("not a prekey bundle")
            if r.u8() != BUNDLE_VERSION:
                raise BundleError("unknown prekey bundle version")
            signed_prekey = r.take(KEY_LEN)
            signature = r.take(SIGNATURE_LEN)
            count = r.u8()
            if count > MAX_ONE_TIME_PREKEYS:
                raise BundleError("too many one-time prekeys in bundle")
            keys = tuple(r.take(KEY_LEN) for _ in range(count))
            r.end()
        except BundleError:
            raise
        except WireError as exc:
            raise BundleError(f"malformed prekey bundle: {exc}") from None
        return cls(signed_prekey, signature, keys)  # __post_init__ enforces the order

    # ------------------------------------------------------------------ checking

    def verify(self, identity_key: bytes) -> bool:
        """True if ``identity_key`` signed this bundle's signed prekey."""
        return verify_signature(
            identity_key, signed_prekey_message(self.signed_prekey), self.signature
        )

    # ------------------------------------------------------------------ x3dh

    def to_x3dh(self, identity_key: bytes) -> x3dh.Bundle:
        import x3dh  # not at module level: an idle daemon never needs it (issue 9)

        return x3dh.Bundle(
            identity_key=identity_key,
            signed_pre_key=self.signed_prekey,
            signed_pre_key_sig=self.signature,
            pre_keys=frozenset(self.one_time_prekeys),
        )

    @classmethod
    def from_x3dh(cls, bundle: x3dh.Bundle) -> PrekeyBundle:
        return cls(
            bundle.signed_pre_key,
            bundle.signed_pre_key_sig,
            tuple(sorted(bundle.pre_keys)),
        )
