"""The session layer's pure parts: bundle and envelope codecs, safety numbers, and what we
rely on in the x3dh/doubleratchet libraries (checked against the libraries themselves)."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Generator
from typing import Any

import doubleratchet
import nacl.bindings
import pytest
import x3dh
import xeddsa
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import VerifyKey
from x3dh.identity_key_pair import IdentityKeyPairSeed

from p2pd.errors import BundleError, EnvelopeError, UsageError
from p2pd.identity import Identity
from p2pd.records import MAX_EXTENSION, HandleRecord
from p2pd.session import safety
from p2pd.session.bundle import (
    MAX_BUNDLE_SIZE,
    MAX_ONE_TIME_PREKEYS,
    MIN_BUNDLE_SIZE,
    PrekeyBundle,
    signed_prekey_message,
)
from p2pd.session.crypto import (
    IDENTITY_KEY_FORMAT,
    X3DH_HASH,
    X3DH_INFO,
    MessageAEAD,
    X3DHState,
    decrypt_quietly,
    load_ratchet,
    ratchet_state,
    run_sync,
    start_as_initiator,
    start_as_responder,
)
from p2pd.session.envelope import (
    INITIAL_PREFIX_MAX,
    MAX_CIPHERTEXT,
    MAX_ENVELOPE,
    MAX_OVERHEAD,
    MAX_PLAINTEXT,
    MIN_CIPHERTEXT,
    NORMAL_PREFIX_LEN,
    RATCHET_HEADER_LEN,
    Envelope,
    InitialHeader,
    RatchetHeader,
    ciphertext_length,
    session_id,
)
from p2pd.session.safety import key_digits, safety_number

keys32 = st.binary(min_size=32, max_size=32)

# --------------------------------------------------------------------------- bundle


def bundles() -> st.SearchStrategy[PrekeyBundle]:
    return st.builds(
        lambda spk, sig, keys: PrekeyBundle(spk, sig, tuple(sorted(keys))),
        keys32,
        st.binary(min_size=64, max_size=64),
        st.sets(keys32, max_size=MAX_ONE_TIME_PREKEYS),
    )


def test_bundle_sizes_fit_the_record_extension() -> None:
    assert MIN_BUNDLE_SIZE == 102
    assert MAX_BUNDLE_SIZE == 102 + 40 * 32 == 1382
    assert MAX_EXTENSION - MAX_BUNDLE_SIZE == 666  # room left in the extension
    identity = Identity.generate("alice")
    state = X3DHState.create(
        IDENTITY_KEY_FORMAT, X3DH_HASH, X3DH_INFO, IdentityKeyPairSeed(identity.seed)
    )
    state.generate_pre_keys(MAX_ONE_TIME_PREKEYS)
    encoded = PrekeyBundle.from_x3dh(state.bundle).encode()
    assert len(encoded) == MAX_BUNDLE_SIZE
    record = HandleRecord.create(identity, [], seq=1, now=1000, lifetime=3600, extension=encoded)
    assert HandleRecord.decode(record.encode()).extension == encoded


@settings(max_examples=300, deadline=None)
@given(bundles())
def test_bundle_round_trip(bundle: PrekeyBundle) -> None:
    encoded = bundle.encode()
    assert len(encoded) == MIN_BUNDLE_SIZE + 32 * len(bundle.one_time_prekeys)
    assert PrekeyBundle.decode(encoded) == bundle


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_BUNDLE_SIZE + 64))
def test_bundle_garbage_raises_only_bundle_error(data: bytes) -> None:
    with contextlib.suppress(BundleError):
        PrekeyBundle.decode(data)


@settings(max_examples=300, deadline=None)
@given(bundles(), st.data())
def test_bundle_mutations_raise_only_bundle_error(bundle: PrekeyBundle, data: Any) -> None:
    encoded = bytearray(bundle.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(encoded) - 1))
        encoded[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    for candidate in (bytes(encoded), bytes(encoded[:cut]), bytes(encoded) + b"\x00"):
        try:
            decoded = PrekeyBundle.decode(candidate)
        except BundleError:
            continue
        assert decoded.encode() == candidate  # canonical: what decodes re-encodes the same


def test_bundle_rejects_non_canonical() -> None:
    a, b = b"\x01" * 32, b"\x02" * 32
    good = PrekeyBundle(b"\x00" * 32, b"\x00" * 64, (a, b)).encode()
    swapped = good[:102] + b + a
    with pytest.raises(BundleError):
        PrekeyBundle.decode(swapped)
    with pytest.raises(BundleError):  # duplicates
        PrekeyBundle.decode(good[:102] + a + a)
    with pytest.raises(BundleError):  # count says 41
        PrekeyBundle.decode(good[:101] + bytes([41]) + a * 41)
    with pytest.raises(BundleError):
        PrekeyBundle.decode(good + b"\x00")
    with pytest.raises(BundleError):
        PrekeyBundle.decode(b"P2PB\x02" + good[5:])
    with pytest.raises(BundleError):
        PrekeyBundle(b"\x00" * 32, b"\x00" * 64, tuple(bytes([i]) * 32 for i in range(41)))


# --------------------------------------------------------------------------- envelope


def initial_headers() -> st.SearchStrategy[InitialHeader]:
    return st.builds(
        InitialHeader, keys32, keys32, keys32, st.integers(0, (1 << 64) - 1), st.none() | keys32
    )


def envelopes() -> st.SearchStrategy[Envelope]:
    counters = st.integers(0, (1 << 32) - 1)
    ratchets = st.builds(RatchetHeader, keys32, counters, counters)
    ciphertexts = st.integers(0, 64).map(lambda n: os.urandom(n * 16 + 48))
    return st.one_of(
        st.builds(
            lambda r, c, h: Envelope(r, c, initial=h), ratchets, ciphertexts, initial_headers()
        ),
        st.builds(
            lambda r, c, s: Envelope(r, c, session=s),
            ratchets,
            ciphertexts,
            st.binary(min_size=16, max_size=16),
        ),
    )


def test_envelope_bounds() -> None:
    assert INITIAL_PREFIX_MAX == 139
    assert NORMAL_PREFIX_LEN == 18
    assert RATCHET_HEADER_LEN == 40
    assert MIN_CIPHERTEXT == 48
    assert MAX_PLAINTEXT == 66_560
    assert MAX_CIPHERTEXT == ciphertext_length(MAX_PLAINTEXT) == 66_608
    assert MAX_ENVELOPE == 139 + 40 + 66_608 == 66_787
    assert MAX_OVERHEAD == 227
    # what p2pd.wire's message frame can carry: an id and an envelope
    from p2pd.wire import MAX_STREAM_FRAME, MESSAGE_ID_LEN

    assert MAX_ENVELOPE + MESSAGE_ID_LEN <= MAX_STREAM_FRAME


@settings(max_examples=300, deadline=None)
@given(envelopes())
def test_envelope_round_trip(envelope: Envelope) -> None:
    encoded = envelope.encode()
    assert Envelope.decode(encoded) == envelope
    assert encoded.startswith(envelope.prefix)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_envelope_garbage_raises_only_envelope_error(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        Envelope.decode(data)


@settings(max_examples=300, deadline=None)
@given(envelopes(), st.data())
def test_envelope_mutations_raise_only_envelope_error(envelope: Envelope, data: Any) -> None:
    encoded = bytearray(envelope.encode())
    i = data.draw(st.integers(0, len(encoded) - 1))
    encoded[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    for candidate in (bytes(encoded), bytes(encoded[:cut])):
        try:
            decoded = Envelope.decode(candidate)
        except EnvelopeError:
            continue
        assert decoded.encode() == candidate


def test_envelope_refuses_oversize_and_bad_fields() -> None:
    ratchet = RatchetHeader(b"\x00" * 32, 0, 0)
    good = Envelope(ratchet, b"\x00" * 48, session=b"\x00" * 16).encode()
    for bad in (
        b"\x02" + good[1:],  # version
        good[:1] + b"\x03" + good[2:],  # type
        good[:-1],  # ciphertext not a whole block + tag
        good[:-16],  # shorter than one block + tag
        good[:58] + b"\x00" * (MAX_CIPHERTEXT + 16),  # too long
    ):
        with pytest.raises(EnvelopeError):
            Envelope.decode(bad)
    key = b"\x01" * 32
    initial = Envelope(ratchet, b"\x00" * 48, initial=InitialHeader(key, key, key, 7)).encode()
    assert initial[98:107] == bytes(7) + b"\x07\x00"
    with pytest.raises(EnvelopeError):  # one-time prekey flag must be 0 or 1
        Envelope.decode(initial[:106] + b"\x02" + initial[107:])
    with pytest.raises(EnvelopeError):
        Envelope(ratchet, b"\x00" * 48)  # neither header nor session id


def test_session_id_binds_all_three_keys() -> None:
    a, b, e = os.urandom(32), os.urandom(32), os.urandom(32)
    sid = session_id(a, b, e)
    assert len(sid) == 16
    assert len({sid, session_id(b, a, e), session_id(a, b, os.urandom(32))}) == 3


# --------------------------------------------------------------------------- libraries


def test_x3dh_uses_the_ed25519_identity_key_itself() -> None:
    """The X3DH identity key is the node's Ed25519 key, and its X25519 form is the one
    libsodium derives: what the record pins is what authenticates sessions."""
    identity = Identity.generate("alice")
    seed, public = identity.seed, identity.public_key
    state = X3DHState.create(IDENTITY_KEY_FORMAT, X3DH_HASH, X3DH_INFO, IdentityKeyPairSeed(seed))
    bundle = state.bundle
    assert bundle.identity_key == public
    priv = IdentityKeyPairSeed(seed).as_priv().priv
    assert priv == nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(seed + public)
    assert xeddsa.ed25519_pub_to_curve25519_pub(
        public
    ) == nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(public)
    # the signed prekey's signature is plain Ed25519, over our context string
    ours = PrekeyBundle.from_x3dh(bundle)
    assert ours.verify(public)
    assert not ours.verify(Identity.generate("bobby").public_key)
    assert ours.signature == bundle.signed_pre_key_sig
    VerifyKey(public).verify(
        signed_prekey_message(bundle.signed_pre_key), bundle.signed_pre_key_sig
    )


def test_message_aead_opens_what_the_library_seals() -> None:
    key, ad = os.urandom(32), b"associated"
    for size in (0, 1, 15, 16, 17, 1000):
        plaintext = os.urandom(size)
        sealed = run_sync(MessageAEAD.encrypt(plaintext, key, ad))
        assert len(sealed) == ciphertext_length(size)
        assert run_sync(MessageAEAD.decrypt(sealed, key, ad)) == plaintext
        for bad in (
            sealed[:-1] + bytes([sealed[-1] ^ 1]),  # tag
            bytes([sealed[0] ^ 1]) + sealed[1:],  # body
            sealed[:-16],  # length
            sealed[-32:],  # tag only
        ):
            with pytest.raises(doubleratchet.AuthenticationFailedException):
                run_sync(MessageAEAD.decrypt(bad, key, ad))
        with pytest.raises(doubleratchet.AuthenticationFailedException):
            run_sync(MessageAEAD.decrypt(sealed, key, ad + b"x"))


def ratchet_pair(*, max_skip: int, max_skipped_keys: int) -> tuple[Any, Any, bytes]:
    """Two ratchets started from a shared secret, as X3DH would (associated data b"ad");
    and the plaintext of the first message, which the responder decrypted."""
    shared, spk_priv, ad = os.urandom(32), os.urandom(32), b"ad"
    alice, first = run_sync(
        start_as_initiator(
            max_skip=max_skip,
            max_skipped_keys=max_skipped_keys,
            shared_secret=shared,
            recipient_ratchet_key=xeddsa.priv_to_curve25519_pub(spk_priv),
            plaintext=b"m0",
            associated_data=ad,
        )
    )
    bob, plaintext = run_sync(
        start_as_responder(
            max_skip=max_skip,
            max_skipped_keys=max_skipped_keys,
            shared_secret=shared,
            own_ratchet_priv=spk_priv,
            message=first,
            associated_data=ad,
        )
    )
    return alice, bob, plaintext


def test_library_decrypt_commits_only_on_success() -> None:
    """doubleratchet's decrypt works on a copy of the ratchet: a refused message leaves
    the in-memory state exactly as it was (the session layer adds the same for SQLite)."""
    alice, bob, plaintext = ratchet_pair(max_skip=10, max_skipped_keys=20)
    ad = b"ad"
    assert plaintext == b"m0"
    message = run_sync(alice.encrypt_message(b"m1", ad))
    before = bob.json
    flipped = message.ciphertext[:-1] + bytes([message.ciphertext[-1] ^ 1])
    forgeries = [
        doubleratchet.EncryptedMessage(message.header, flipped),
        # a new ratchet key: the copy ratchets and skips, then fails to authenticate
        doubleratchet.EncryptedMessage(
            doubleratchet.Header(os.urandom(32), 3, 2), message.ciphertext
        ),
        doubleratchet.EncryptedMessage(message.header._replace(sending_chain_length=5), flipped),
    ]
    for forged in forgeries:
        with pytest.raises(doubleratchet.AuthenticationFailedException):
            run_sync(bob.decrypt_message(forged, ad))
        assert bob.json == before
    assert run_sync(bob.decrypt_message(message, ad)) == b"m1"
    assert bob.json != before


def test_the_fast_ratchet_copy_is_a_deep_copy() -> None:
    """decrypt_message deep-copies the DH ratchet for every message; ours copies field by
    field (crypto._DHRatchet). The copy must hold the same state and share nothing that
    a step changes: stepping it leaves the original alone."""
    alice, bob, _ = ratchet_pair(max_skip=10, max_skipped_keys=20)
    for ratchet in (alice, bob):
        dh = ratchet._DoubleRatchet__diffie_hellman_ratchet  # type: ignore[attr-defined]
        clone = copy.deepcopy(dh)
        assert type(clone) is type(dh)
        assert clone.model == dh.model

        def mutable_parts(obj: Any) -> set[int]:
            found = {id(obj)}
            for value in vars(obj).values():
                if not isinstance(value, (bytes, int, type, type(None))):
                    found |= mutable_parts(value)
            return found

        assert not mutable_parts(clone) & mutable_parts(dh)
        before = dh.model
        run_sync(clone.next_encryption_key())
        assert clone.model != before
        assert dh.model == before


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "deliver-a", "deliver-b"]), max_size=40), st.randoms())
def test_ratchet_state_is_the_librarys_json(steps: list[str], rng: Any) -> None:
    """crypto.ratchet_state reads the library's private fields; it must give exactly the
    library's own ``json``, for every state a conversation goes through (both chains,
    DH steps, skipped keys from out-of-order delivery), and load back to the same."""
    alice, bob, _ = ratchet_pair(max_skip=50, max_skipped_keys=100)
    ad = b"ad"
    ratchets = {"a": alice, "b": bob}
    in_flight: dict[str, list[Any]] = {"a": [], "b": []}  # sent by a / by b
    for step in steps:
        if step in ratchets:
            in_flight[step].append(run_sync(ratchets[step].encrypt_message(b"x", ad)))
        else:
            sender = step[-1]
            receiver = "b" if sender == "a" else "a"
            if in_flight[sender]:
                message = in_flight[sender].pop(rng.randrange(len(in_flight[sender])))
                run_sync(decrypt_quietly(ratchets[receiver].decrypt_message(message, ad)))
        for ratchet in ratchets.values():
            state = ratchet_state(ratchet)
            assert state == ratchet.json
            again = load_ratchet(state, max_skip=50, max_skipped_keys=100)
            assert again.json == ratchet.json


def test_run_sync_refuses_a_coroutine_that_suspends() -> None:
    class Suspend:
        def __await__(self) -> Generator[None, None, None]:
            yield

    async def suspends() -> int:
        await Suspend()
        return 1

    with pytest.raises(RuntimeError):
        run_sync(suspends())


async def test_library_coroutines_can_be_awaited_from_trio() -> None:
    """Run under pytest-trio: the libraries' async methods need no asyncio loop."""
    alice = X3DHState.create(IDENTITY_KEY_FORMAT, X3DH_HASH, X3DH_INFO)
    bob = X3DHState.create(IDENTITY_KEY_FORMAT, X3DH_HASH, X3DH_INFO)
    bob.generate_pre_keys(2)
    shared_a, ad_a, header = await alice.get_shared_secret_active(bob.bundle)
    shared_b, ad_b, _ = await bob.get_shared_secret_passive(header)
    assert (shared_a, ad_a) == (shared_b, ad_b)
    sealed = await MessageAEAD.encrypt(b"hi", shared_a, ad_a)
    assert await MessageAEAD.decrypt(sealed, shared_b, ad_b) == b"hi"
    assert isinstance(header, x3dh.Header)


# --------------------------------------------------------------------------- safety numbers


def test_safety_number_is_symmetric_and_well_formed() -> None:
    a, b = os.urandom(32), os.urandom(32)
    number = safety_number(a, b)
    assert number == safety_number(b, a)
    groups = number.split(" ")
    assert len(groups) == 12
    assert all(len(g) == 5 and g.isdigit() for g in groups)
    assert number.replace(" ", "") in (key_digits(a) + key_digits(b), key_digits(b) + key_digits(a))


def test_safety_number_changes_with_either_key() -> None:
    a, b, c = os.urandom(32), os.urandom(32), os.urandom(32)
    base = safety_number(a, b)
    assert safety_number(a, c) != base
    assert safety_number(c, b) != base
    flipped = bytes([a[0] ^ 1]) + a[1:]
    assert safety_number(flipped, b) != base


def test_safety_number_known_answer() -> None:
    """Frozen output, so the algorithm (and what users compare) never changes by accident."""
    assert key_digits(bytes(range(32))) == KNOWN_DIGITS
    assert safety.ITERATIONS == 5200


def test_safety_number_refuses_bad_keys() -> None:
    with pytest.raises(UsageError):
        safety_number(b"short", os.urandom(32))


KNOWN_DIGITS = "257559384113265304292350735074"
