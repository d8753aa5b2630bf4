"""Fuzzing ``SessionManager.decrypt`` with hypothesis: arbitrary, mutated and forged
envelopes raise only EnvelopeError or SessionError, a refused envelope leaves every
stored row as it was (the sessions table and our prekeys), and an altered envelope
never decrypts. (The byte decoders are fuzzed in tests/test_fuzz_decoders.py.)"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from fuzz_helpers import (
    FUZZ_SLOW,
    NOW,
    ciphertexts,
    counters,
    exactly,
    initial_headers,
    keys32,
    mutate,
)
from hypothesis import given
from hypothesis import strategies as st

from p2pd.errors import (
    EnvelopeError,
    SessionError,
)
from p2pd.identity import Identity
from p2pd.session import SessionManager
from p2pd.session.envelope import (
    ENVELOPE_VERSION,
    TYPE_INITIAL,
    TYPE_NORMAL,
    Envelope,
    InitialHeader,
    RatchetHeader,
)
from p2pd.session.manager import PREKEYS_META_KEY
from p2pd.store import open_database


class Node:
    """One node's session layer on its own in-memory database (as tests/test_session.py)."""

    def __init__(self, handle: str) -> None:
        self.identity = Identity.generate(handle)
        self.conn = open_database(None)
        self.sessions = SessionManager.open(self.conn, self.identity, now=NOW)

    @property
    def key(self) -> bytes:
        return self.identity.public_key

    def send(self, to: Node, text: bytes) -> bytes:
        bundle = None if self.sessions.has_session(to.key) else to.sessions.prekey_bundle()
        return self.sessions.encrypt(to.key, text, now=NOW, peer_bundle=bundle)

    def recv(self, envelope: bytes) -> bytes:
        return self.sessions.decrypt(envelope, now=NOW).plaintext

    def snapshot(self) -> tuple[Any, ...]:
        """Everything the session layer persists, and the bundle flag."""
        rows = self.conn.execute("SELECT * FROM sessions ORDER BY session_id").fetchall()
        meta = self.conn.execute(
            "SELECT value FROM meta WHERE key=?", (PREKEYS_META_KEY,)
        ).fetchone()
        return tuple(rows), meta, self.sessions.bundle_changed


@dataclass(frozen=True)
class World:
    """Bob receives. Alice has a confirmed session with him, Carol has only sent a first
    message he has not read. Every envelope named here would still decrypt at Bob, except
    ``replay`` and ``first`` (already decrypted)."""

    bob: Node
    alice: Node
    carol: Node
    #: Carol's first message: an initial envelope, X3DH with one of Bob's one-time prekeys.
    initial: bytes
    #: Alice's next message in the confirmed session (a normal envelope).
    normal: bytes
    #: A message Alice sent before ``skipped_after``: Bob holds its skipped message key.
    skipped: bytes
    #: A message Bob already decrypted.
    replay: bytes
    #: Alice's first message (initial, X3DH), which Bob already decrypted.
    first: bytes

    @property
    def fresh(self) -> dict[str, bytes]:
        return {"initial": self.initial, "normal": self.normal, "skipped": self.skipped}


@functools.cache
def world() -> World:
    """Built once: a refused envelope changes nothing (the property under test), so the
    examples can share it, and X3DH set-up per example would dominate the run time."""
    bob, alice, carol = Node("bob"), Node("alice"), Node("carol")
    first = alice.send(bob, b"hello")
    assert bob.recv(first) == b"hello"
    assert alice.recv(bob.send(alice, b"hi")) == b"hi"
    replay = alice.send(bob, b"read")
    assert bob.recv(replay) == b"read"
    skipped = alice.send(bob, b"late")
    assert bob.recv(alice.send(bob, b"overtakes")) == b"overtakes"
    normal = alice.send(bob, b"next")
    initial = carol.send(bob, b"first")
    assert Envelope.decode(initial).initial is not None
    assert Envelope.decode(normal).session is not None
    return World(bob, alice, carol, initial, normal, skipped, replay, first)


def assert_refused_and_unchanged(envelope: bytes, sender_key: bytes | None) -> None:
    """Bob refuses ``envelope`` with a declared error and stores nothing new."""
    bob = world().bob
    before = bob.snapshot()
    try:
        result = bob.sessions.decrypt(envelope, now=NOW, sender_key=sender_key)
    except (EnvelopeError, SessionError):
        assert bob.snapshot() == before, "a refused envelope changed the stored state"
        return
    raise AssertionError(f"an altered or replayed envelope decrypted: {result!r}")


def sender_keys() -> st.SearchStrategy[bytes | None]:
    """Mostly None (a mailbox entry: nothing vouches for the sender), else a QUIC peer."""
    w = world()
    return st.sampled_from([None, None, None, w.alice.key, w.carol.key])


def test_world_envelopes_are_valid() -> None:
    """The fresh envelopes would decrypt (on a copy of Bob's database): a mutation that
    fails below fails because of the mutation."""
    w = world()
    for name, envelope in w.fresh.items():
        copy = open_database(None)
        w.bob.conn.backup(copy)
        sessions = SessionManager.open(copy, w.bob.identity, now=NOW)
        assert sessions.decrypt(envelope, now=NOW).plaintext, name
        copy.close()


@FUZZ_SLOW
@given(st.binary(max_size=400), st.data())
def test_decrypt_arbitrary_bytes(data: bytes, draw: st.DataObject) -> None:
    assert_refused_and_unchanged(data, draw.draw(sender_keys()))


@FUZZ_SLOW
@given(st.sampled_from(["initial", "normal", "skipped", "replay", "first"]), st.data())
def test_decrypt_mutated_envelopes(which: str, data: st.DataObject) -> None:
    w = world()
    replays = {"replay": w.replay, "first": w.first}
    valid = replays[which] if which in replays else w.fresh[which]
    # One flipped bit keeps the envelope parseable more often than not, so it reaches
    # X3DH and the ratchet; the general edits mostly exercise the parser.
    at = data.draw(st.integers(0, len(valid) * 8 - 1), label="flipped bit")
    flipped = bytearray(valid)
    flipped[at // 8] ^= 1 << (at % 8)
    assert_refused_and_unchanged(bytes(flipped), data.draw(sender_keys()))
    candidate = mutate(data, valid)
    if candidate == valid and which not in replays:
        return  # edits that cancelled out, e.g. a bit flipped twice
    assert_refused_and_unchanged(candidate, data.draw(sender_keys()))


# Envelopes that decode, with real session ids and X3DH headers but forged contents: they
# get past the parser into X3DH and the ratchet, which is where a stray exception would
# hide. Ratchet keys include the X25519 points of small order (RFC 7748 section 6.1).
SMALL_ORDER = [
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]


@st.composite
def forged_envelopes(draw: st.DrawFn) -> bytes:
    w = world()
    real_normal = Envelope.decode(w.normal)
    real_initial = Envelope.decode(w.initial)
    assert real_normal.session is not None and real_initial.initial is not None
    prefix = draw(
        st.one_of(
            st.just(bytes([ENVELOPE_VERSION, TYPE_NORMAL]) + real_normal.session),
            st.just(real_initial.prefix),
            initial_headers.map(lambda h: bytes([ENVELOPE_VERSION, TYPE_INITIAL]) + h.encode()),
            st.builds(
                lambda h, ik: (
                    bytes([ENVELOPE_VERSION, TYPE_INITIAL])
                    + InitialHeader(
                        ik,
                        h.ephemeral_key,
                        real_initial.initial.signed_prekey,  # type: ignore[union-attr]
                        h.initiated_at,
                        h.one_time_prekey,
                    ).encode()
                ),
                initial_headers,
                st.sampled_from([w.alice.key, w.carol.key, *SMALL_ORDER]),
            ),
            exactly(16).map(lambda s: bytes([ENVELOPE_VERSION, TYPE_NORMAL]) + s),
        )
    )
    ratchet_key = draw(
        st.sampled_from(
            [real_normal.ratchet.ratchet_key, real_initial.ratchet.ratchet_key, *SMALL_ORDER]
        )
        | keys32
    )
    numbers = st.sampled_from([0, 1, 2, 999, 1000, 1001, 5000, (1 << 32) - 1]) | counters
    header = RatchetHeader(ratchet_key, draw(numbers), draw(numbers))
    ciphertext = draw(st.just(real_normal.ciphertext) | ciphertexts)
    return prefix + header.encode() + ciphertext


@FUZZ_SLOW
@given(forged_envelopes(), st.data())
def test_decrypt_forged_envelopes(envelope: bytes, data: st.DataObject) -> None:
    assert_refused_and_unchanged(envelope, data.draw(sender_keys()))
