"""Glue to Syndace's ``x3dh`` and ``doubleratchet``: our parameters, encodings and driver.

Both libraries are pinned (pyproject.toml) because their state is persisted. What they
leave to the application, and what we chose:

X3DH (x3dh 1.3.0, ``BaseState``)
    - Identity key format ``ED_25519``: the X3DH identity key *is* the node's Ed25519
      identity key, the one its handle record binds and its QUIC certificate carries.
      The library converts it where X3DH needs Diffie-Hellman: the private scalar is
      the clamped first half of SHA-512(seed), and the public key goes through the
      birational map (libsodium's ``crypto_sign_ed25519_{sk,pk}_to_curve25519``;
      tests/test_session_codecs.py checks both against PyNaCl). The signed prekey's
      signature is an ordinary Ed25519 signature that PyNaCl verifies. So the key a
      user pins (TOFU, safety numbers) is exactly the key that authenticates every
      session: no second identity key to publish, pin or lose. The other choice,
      ``CURVE_25519`` with XEdDSA, would put a Montgomery key in headers and need a
      conversion, with a sign bit, back to the pinned Ed25519 key on every check, for
      nothing gained. Using one key for signatures and DH is what Signal's XEdDSA
      design does too; every signature we make carries its own context string, so the
      uses cannot be confused.
    - Hash SHA-256, info ``"p2pd x3dh v1"``.
    - We use ``BaseState``, not ``State``: ``State`` reads ``time.time()`` (signed
      prekey age, and even a rotation check inside ``from_json``), publishes from inside
      its constructor and deletes a used one-time prekey *before* the first message has
      been authenticated. ``BaseState`` lets the session layer take ``now`` from the
      caller and consume a prekey only once the message it opened has decrypted.

Double Ratchet (doubleratchet 1.3.0), Signal's recommended algorithms (spec section 5.2)
    - DH ratchet: X25519 (``recommended.diffie_hellman_ratchet_curve25519``).
    - Root chain KDF: HKDF-SHA-256, info ``"p2pd ratchet root v1"``.
    - Message chain KDF: HMAC-SHA-256 with constant ``0x02 0x01``: chain key =
      HMAC(ck, 0x02), message key = HMAC(ck, 0x01), as in Signal.
    - AEAD: AES-256-CBC + HMAC-SHA-256, keys and IV from HKDF-SHA-256 (info
      ``"p2pd message keys v1"``), full 32-byte tag. :class:`MessageAEAD` replaces the
      library's ``decrypt`` only to compare tags in constant time (see there).
    - The associated data of every message: ``IK_initiator || IK_responder`` (from X3DH),
      the envelope prefix, and the ratchet header (:func:`Ratchet._build_associated_data`).

The libraries' coroutines are ``async`` but never suspend: they only ``await`` each other
and ``cryptography`` calls; neither package imports asyncio (checked for these versions).
So :func:`run_sync` drives them to completion with no event loop at all, and the session
layer stays synchronous: a trio task calling it cannot be interleaved with another between
reading a session from SQLite and writing it back. tests/test_session_codecs.py also
awaits them directly under trio to show that works.
"""

from __future__ import annotations

import copy
import hmac
import warnings
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

import doubleratchet
import x3dh
import x3dh.base_state
import x3dh.pre_key_pair
import x3dh.signed_pre_key_pair
import xeddsa
from doubleratchet.kdf_chain import KDFChain
from doubleratchet.recommended import (
    HashFunction,
    aead_aes_hmac,
    diffie_hellman_ratchet_curve25519,
    kdf_hkdf,
    kdf_separate_hmacs,
)
from doubleratchet.recommended.crypto_provider_impl import CryptoProviderImpl
from doubleratchet.symmetric_key_ratchet import SymmetricKeyRatchet

from .bundle import SIGNED_PREKEY_CONTEXT
from .envelope import AES_BLOCK, TAG_LEN, RatchetHeader

T = TypeVar("T")

X3DH_INFO = b"p2pd x3dh v1"
X3DH_HASH = x3dh.HashFunction.SHA_256
IDENTITY_KEY_FORMAT = x3dh.IdentityKeyFormat.ED_25519
ROOT_KDF_INFO = b"p2pd ratchet root v1"
MESSAGE_KEY_INFO = b"p2pd message keys v1"
#: Fed to the message chain KDF: the first HMAC output becomes the next chain key, the
#: second the message key (KDFChain.step keeps the first ``len(key)`` bytes as the key).
MESSAGE_CHAIN_CONSTANT = b"\x02\x01"
# The name of this parameter set, SUITE, is in p2pd/session/config.py (importable without
# the libraries).

# What the ratchet raises for a message that does not authenticate. Besides its own
# exceptions: ValueError (X25519 refuses a low-order ratchet key), XEdDSAException, and
# AssertionError/TypeError: doubleratchet 1.3.0 asserts (TypeError under -O) where it
# should raise when an initiator that has not received anything yet is sent a message
# under the peer's signed prekey; SessionManager._open refuses that case first, this is
# the backstop.
UNAUTHENTIC = (
    doubleratchet.AuthenticationFailedException,
    doubleratchet.DecryptionFailedException,
    doubleratchet.ChainNotAvailableException,
    xeddsa.XEdDSAException,
    ValueError,
    AssertionError,
    TypeError,
)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to completion, without an event loop.

    Raises RuntimeError (after closing the coroutine) if it does suspend: a future
    library version that really awaited I/O would need a different integration, and we
    would rather fail loudly than block or silently interleave.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise RuntimeError("a session crypto coroutine suspended; it needs an event loop now")


# --------------------------------------------------------------------------- X3DH


def _cached_pub(pair: Any) -> bytes:
    """A prekey pair's public key, worked out from its private key once and kept in the
    instance's own ``__dict__`` (see :class:`_PreKeyPair`)."""
    cached: bytes | None = pair.__dict__.get("pub")
    if cached is None:
        cached = pair.__dict__["pub"] = xeddsa.priv_to_curve25519_pub(pair.priv)
    return cached


class _PreKeyPair(x3dh.pre_key_pair.PreKeyPair):
    """x3dh's one-time prekey, its public key worked out once.

    x3dh 1.3.0's ``PreKeyPair.pub`` derives the public key from the private one (a
    curve25519 scalar multiplication, ~45 us) every time it is read, and the state
    reads it for every one-time prekey it holds each time it builds its ``bundle``
    (every first message we receive, and every publish) and in the scan for the prekey
    a first message names (the whole list when the name matches none: any forged or
    replayed first message). A first message cost ~100 of them with 40 prekeys;
    tests/test_session.py's tampered first messages spent 1.8 of their 2 s of CPU there.
    The public key is kept in the instance's own ``__dict__`` (a subclass of the
    NamedTuple can have one), so it lives and dies with the key pair: a deleted prekey
    leaves nothing behind. Equality, hashing, ``priv`` and the model are the tuple's,
    as before."""

    pub = property(_cached_pub)


class _SignedPreKeyPair(x3dh.signed_pre_key_pair.SignedPreKeyPair):
    """x3dh's signed prekey, its public key worked out once (as :class:`_PreKeyPair`).

    The state reads the signed prekey's ``pub`` in its ``bundle`` and again in a passive
    agreement, and OwnPrekeys reads it once more to store and check the public fields
    PublicPrekeys reads without x3dh (p2pd/session/prekeys.py); each read was a
    curve25519 scalar multiplication."""

    pub = property(_cached_pub)

    @staticmethod
    def from_model(model: x3dh.SignedPreKeyPairModel) -> _SignedPreKeyPair:
        # The library's from_model builds its own class by name; the state calls this
        # one through the module global patched below.
        return _SignedPreKeyPair(priv=model.priv, sig=model.sig, timestamp=model.timestamp)


# The state builds its one-time and signed prekeys (generated, or loaded from its model)
# through these module globals of x3dh.base_state; ours are drop-in subclasses.
x3dh.base_state.PreKeyPair = _PreKeyPair  # type: ignore[attr-defined]
x3dh.base_state.SignedPreKeyPair = _SignedPreKeyPair  # type: ignore[attr-defined]


class X3DHState(x3dh.BaseState):
    """Our X3DH state: the identity key, signed prekeys and one-time prekeys."""

    @staticmethod
    def _encode_public_key(key_format: x3dh.IdentityKeyFormat, pub: bytes) -> bytes:
        # x3dh 1.3.0 calls this with CURVE_25519 only to build the message the identity
        # key signs for a signed prekey, and with our identity format (ED_25519) only to
        # build the associated data IK_A || IK_B. So the first gets our signature context
        # (p2pd.session.bundle.signed_prekey_message), the second the bare 32-byte key:
        # fixed length keeps IK_A || IK_B unambiguous.
        if key_format is x3dh.IdentityKeyFormat.CURVE_25519:
            return SIGNED_PREKEY_CONTEXT + pub
        return pub


# --------------------------------------------------------------------------- Double Ratchet


class _RootKDF(kdf_hkdf.KDF):
    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256

    @staticmethod
    def _get_info() -> bytes:
        return ROOT_KDF_INFO


class _ChainKDF(kdf_separate_hmacs.KDF):
    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256


class MessageAEAD(aead_aes_hmac.AEAD):
    """The recommended AES-256-CBC + HMAC-SHA-256 AEAD, with a constant-time tag check.

    doubleratchet 1.3.0's ``decrypt`` compares the tag with ``!=``, which stops at the
    first differing byte; and it slices the tag off without checking the length. This
    ``decrypt`` derives the same keys with the library's own primitives (so it opens
    exactly what the inherited ``encrypt`` seals; a test checks that), refuses a
    ciphertext of impossible length, and compares with :func:`hmac.compare_digest`.
    """

    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256

    @staticmethod
    def _get_info() -> bytes:
        return MESSAGE_KEY_INFO

    @classmethod
    async def decrypt(cls, ciphertext: bytes, key: bytes, associated_data: bytes) -> bytes:
        hash_function = cls._get_hash_function()
        body, tag = ciphertext[:-TAG_LEN], ciphertext[-TAG_LEN:]
        if len(body) < AES_BLOCK or len(body) % AES_BLOCK:
            raise doubleratchet.AuthenticationFailedException("ciphertext length is impossible")
        okm = await CryptoProviderImpl.hkdf_derive(
            hash_function=hash_function,
            length=80,
            salt=b"\x00" * hash_function.hash_size,
            info=cls._get_info(),
            key_material=key,
        )
        encryption_key, authentication_key, iv = okm[:32], okm[32:64], okm[64:]
        expected = await CryptoProviderImpl.hmac_calculate(
            authentication_key, hash_function, associated_data + body
        )
        if not hmac.compare_digest(expected, tag):
            raise doubleratchet.AuthenticationFailedException("authentication tags do not match")
        return await CryptoProviderImpl.aes_cbc_decrypt(encryption_key, iv, body)


class Ratchet(doubleratchet.DoubleRatchet):
    """One Double Ratchet session."""

    @staticmethod
    def _build_associated_data(associated_data: bytes, header: doubleratchet.Header) -> bytes:
        # ``associated_data`` is IK_i || IK_r || envelope prefix (fixed-length fields
        # after a type byte), so appending the fixed-length header stays unambiguous.
        return associated_data + ratchet_header(header).encode()


def ratchet_header(header: doubleratchet.Header) -> RatchetHeader:
    return RatchetHeader(
        header.ratchet_pub, header.previous_sending_chain_length, header.sending_chain_length
    )


def library_header(header: RatchetHeader) -> doubleratchet.Header:
    return doubleratchet.Header(
        ratchet_pub=header.ratchet_key,
        previous_sending_chain_length=header.previous_chain_length,
        sending_chain_length=header.message_number,
    )


# What the ratchet's state is made of (doubleratchet 1.3.0): these copy as themselves.
_IMMUTABLE = (bytes, int, str, float, bool, type(None), type)


def _clone(obj: Any) -> Any:
    """A deep copy of the library's ratchet objects, field by field.

    Their fields are bytes, ints, None, classes (the KDFs), and the nested KDFChain and
    SymmetricKeyRatchet objects; anything else goes through :func:`copy.deepcopy`, so a
    new field in a later version is still copied deeply.
    """
    new = object.__new__(type(obj))
    fields = new.__dict__
    for name, value in obj.__dict__.items():
        if isinstance(value, _IMMUTABLE):
            fields[name] = value
        elif isinstance(value, _CLONED):
            fields[name] = _clone(value)
        else:
            fields[name] = copy.deepcopy(value)
    return new


class _DHRatchet(diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet):
    """The recommended X25519 DH ratchet, with a fast ``deepcopy``.

    doubleratchet 1.3.0's ``decrypt_message`` deep-copies the DH ratchet for every
    message, so that a message that fails to authenticate leaves the state alone. The
    generic :func:`copy.deepcopy` (reduce, reconstruct, a memo per object) was the
    largest single cost of receiving a message; copying the known fields directly does
    the same for a fraction. tests/test_session_codecs.py checks that a clone has the
    same state and shares nothing mutable with the original.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _DHRatchet:
        clone: _DHRatchet = _clone(self)
        return clone

    # The library derives our ratchet public key from the private one for the header of
    # every message it encrypts (an X25519 scalar multiplication each time). Remember
    # the result for the current private key only: a cache keyed by every private key
    # ever used would keep old ratchet keys in memory, against forward secrecy.
    _pub_of: bytes = b""
    _pub: bytes = b""

    def _derive_pub(self, priv: bytes) -> bytes:  # type: ignore[override]
        if priv != self._pub_of:
            self._pub = diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet._derive_pub(priv)
            self._pub_of = priv
        return self._pub


_CLONED = (_DHRatchet, KDFChain, SymmetricKeyRatchet)
_DH_RATCHET = _DHRatchet


async def start_as_initiator(
    *,
    max_skip: int,
    max_skipped_keys: int,
    shared_secret: bytes,
    recipient_ratchet_key: bytes,
    plaintext: bytes,
    associated_data: bytes,
) -> tuple[Ratchet, doubleratchet.EncryptedMessage]:
    """Alice's side (Double Ratchet section 3.3, RatchetInitAlice). Bob's signed prekey
    is his first ratchet key (Double Ratchet section 5.1, integration with X3DH)."""
    return await Ratchet.encrypt_initial_message(
        _DH_RATCHET,
        _RootKDF,
        _ChainKDF,
        MESSAGE_CHAIN_CONSTANT,
        max_skip,
        max_skipped_keys,
        MessageAEAD,
        shared_secret,
        recipient_ratchet_key,
        plaintext,
        associated_data,
    )


async def start_as_responder(
    *,
    max_skip: int,
    max_skipped_keys: int,
    shared_secret: bytes,
    own_ratchet_priv: bytes,
    message: doubleratchet.EncryptedMessage,
    associated_data: bytes,
) -> tuple[Ratchet, bytes]:
    return await decrypt_quietly(
        Ratchet.decrypt_initial_message(
            _DH_RATCHET,
            _RootKDF,
            _ChainKDF,
            MESSAGE_CHAIN_CONSTANT,
            max_skip,
            max_skipped_keys,
            MessageAEAD,
            shared_secret,
            own_ratchet_priv,
            message,
            associated_data,
        )
    )


def _chain_state(chain: KDFChain | None) -> dict[str, Any] | None:
    if chain is None:
        return None
    fields = chain.__dict__
    return {
        "version": "1.0.0",
        "length": fields["_KDFChain__length"],
        "key": fields["_KDFChain__key"].decode("latin-1"),
    }


def ratchet_state(ratchet: Ratchet) -> dict[str, Any]:
    """``ratchet.json``, read off the objects directly.

    The library's ``json`` builds pydantic models of every part (validating each), dumps
    them to JSON and parses that back: the largest cost of storing a session after every
    message. This gives the same document (DoubleRatchetModel "1.0.0", bytes as latin-1
    strings as the library's JsonBytes writes them) from the private fields, which is
    why doubleratchet is pinned; tests/test_session_codecs.py compares the two over
    random conversations, so a library change that moved a field fails there.
    """
    fields = ratchet.__dict__
    dh = fields["_DoubleRatchet__diffie_hellman_ratchet"].__dict__
    symmetric = dh["_DiffieHellmanRatchet__symmetric_key_ratchet"].__dict__
    skipped = fields["_DoubleRatchet__skipped_message_keys"]
    return {
        "version": "1.0.0",
        "diffie_hellman_ratchet": {
            "version": "1.0.0",
            "own_ratchet_priv": dh["_DiffieHellmanRatchet__own_ratchet_priv"].decode("latin-1"),
            "other_ratchet_pub": dh["_DiffieHellmanRatchet__other_ratchet_pub"].decode("latin-1"),
            "root_chain": _chain_state(dh["_DiffieHellmanRatchet__root_chain"]),
            "symmetric_key_ratchet": {
                "version": "1.0.0",
                "receiving_chain": _chain_state(symmetric["_SymmetricKeyRatchet__receiving_chain"]),
                "sending_chain": _chain_state(symmetric["_SymmetricKeyRatchet__sending_chain"]),
                "previous_sending_chain_length": symmetric[
                    "_SymmetricKeyRatchet__previous_sending_chain_length"
                ],
            },
        },
        "skipped_message_keys": [
            {
                "ratchet_pub": ratchet_pub.decode("latin-1"),
                "index": index,
                "message_key": message_key.decode("latin-1"),
            }
            for (ratchet_pub, index), message_key in skipped.items()
        ],
    }


def load_ratchet(
    serialized: doubleratchet.JSONObject, *, max_skip: int, max_skipped_keys: int
) -> Ratchet:
    """Restore a session (``from_json`` runs the library's model migrations)."""
    return Ratchet.from_json(
        serialized,
        _DH_RATCHET,
        _RootKDF,
        _ChainKDF,
        MESSAGE_CHAIN_CONSTANT,
        max_skip,
        max_skipped_keys,
        MessageAEAD,
    )


async def decrypt_quietly(coro: Coroutine[Any, Any, T]) -> T:
    """Await a library decryption with its one ``warnings.warn`` silenced.

    When a new ratchet key arrives and the sender claims more than ``max_skip`` messages
    in its previous chain, doubleratchet 1.3.0 does not refuse: it *warns*, skips storing
    those keys and ratchets on (so heavy loss cannot wedge a session for good; the
    messages of that old chain are lost). It warns before the message is authenticated,
    so anyone could trigger it, and under ``-W error`` the warning would escape as an
    undeclared exception. The state is still committed only if the message authenticates.
    (``catch_warnings`` swaps the process-wide filter list for the duration; nothing here
    suspends, and no other thread of p2pd changes warning filters.)
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="More than .* message keys skipped")
        return await coro
