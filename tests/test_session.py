"""Sessions end to end: X3DH + Double Ratchet through SessionManager, with the real
x3dh/doubleratchet crypto and real SQLite. No network, no clock but ``now``."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sqlite3
import stat
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pd.at_rest import CLEAR, AtRest
from p2pd.errors import (
    BundleError,
    DecryptError,
    DuplicateMessage,
    EnvelopeError,
    NoSession,
    PrekeyUnavailable,
    SenderKeyMismatch,
    SessionError,
    SessionStateCorrupt,
    TooManySkipped,
    UnknownSession,
    UsageError,
)
from p2pd.identity import Identity
from p2pd.records import HandleRecord, verify_record
from p2pd.session import MAX_PLAINTEXT, PrekeyBundle, SessionConfig, SessionManager
from p2pd.session.envelope import TYPE_INITIAL, TYPE_NORMAL, Envelope, RatchetHeader
from p2pd.session.manager import INITIATOR, PREKEYS_META_KEY, RESPONDER
from p2pd.store import open_database

T0 = 1_700_000_000.0
DAY = 86_400.0


@pytest.fixture(autouse=True, params=["clear", "at-rest"])
def _storage(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs on a clear database and on one encrypted at rest
    (p2pd/at_rest.py): the session layer must behave the same."""
    at_rest = CLEAR if request.param == "clear" else AtRest(os.urandom(32))
    monkeypatch.setattr(Node, "at_rest", at_rest)


class Node:
    """One node's session layer on its own database."""

    _handles = iter(f"node{i}" for i in range(10_000))
    #: How its database stores secrets (the _storage fixture sets it per test).
    at_rest: AtRest = CLEAR

    def __init__(
        self,
        *,
        identity: Identity | None = None,
        path: Path | None = None,
        config: SessionConfig | None = None,
        now: float = T0,
    ) -> None:
        self.identity = identity or Identity.generate(next(self._handles))
        self.path = path
        self.config = config
        self.conn = open_database(path)
        self.sessions = SessionManager.open(
            self.conn, self.identity, now=now, config=config, at_rest=self.at_rest
        )

    @property
    def key(self) -> bytes:
        return self.identity.public_key

    def bundle(self) -> bytes:
        return self.sessions.prekey_bundle()

    def send(self, to: Node, text: bytes, now: float = T0) -> bytes:
        bundle = None if self.sessions.has_session(to.key) else to.bundle()
        return self.sessions.encrypt(to.key, text, now=now, peer_bundle=bundle)

    def recv(self, envelope: bytes, now: float = T0, sender: Node | None = None) -> bytes:
        peer, plaintext = self.sessions.decrypt(
            envelope, now=now, sender_key=None if sender is None else sender.key
        )
        if sender is not None:
            assert peer == sender.key
        return plaintext

    def restart(self, now: float = T0) -> None:
        assert self.path is not None
        self.conn.close()
        self.conn = open_database(self.path)
        self.sessions = SessionManager.open(
            self.conn, self.identity, now=now, config=self.config, at_rest=self.at_rest
        )

    def snapshot(self) -> tuple[Any, ...]:
        """Everything the session layer persists."""
        rows = self.conn.execute("SELECT * FROM sessions ORDER BY session_id").fetchall()
        meta = self.conn.execute(
            "SELECT value FROM meta WHERE key=?", (PREKEYS_META_KEY,)
        ).fetchone()
        return tuple(rows), meta

    def active_id(self, peer: Node) -> bytes:
        info = self.sessions.session_info(peer.key)
        assert info is not None
        return info.session_id


def kind(envelope: bytes) -> int:
    return envelope[1]


def established(config: SessionConfig | None = None) -> tuple[Node, Node]:
    alice, bob = Node(config=config), Node(config=config)
    assert bob.recv(alice.send(bob, b"hello"), sender=alice) == b"hello"
    assert alice.recv(bob.send(alice, b"hi"), sender=bob) == b"hi"
    return alice, bob


# --------------------------------------------------------------------------- basics


def test_first_contact_via_bundle_in_a_handle_record_and_both_ways() -> None:
    alice, bob = Node(), Node()
    # Bob publishes his bundle in his record; Alice resolves and verifies the record.
    record = HandleRecord.create(
        bob.identity, [], seq=1, now=int(T0), lifetime=3600, extension=bob.bundle()
    )
    found = verify_record(record.encode(), T0)
    first = alice.sessions.encrypt(
        found.public_key, b"hello bob", now=T0, peer_bundle=found.extension
    )
    assert kind(first) == TYPE_INITIAL
    assert Envelope.decode(first).initial is not None
    assert bob.recv(first, sender=alice) == b"hello bob"
    reply = bob.sessions.encrypt(alice.key, b"hello alice", now=T0)  # no bundle needed
    assert kind(reply) == TYPE_NORMAL
    assert alice.recv(reply, sender=bob) == b"hello alice"
    third = alice.send(bob, b"how are you")
    assert kind(third) == TYPE_NORMAL  # answered: no more X3DH header
    assert bob.recv(third, sender=alice) == b"how are you"
    assert alice.active_id(bob) == bob.active_id(alice)
    a_info, b_info = alice.sessions.session_info(bob.key), bob.sessions.session_info(alice.key)
    assert a_info is not None and b_info is not None
    assert (a_info.role, b_info.role) == (INITIATOR, RESPONDER)
    assert a_info.confirmed and b_info.confirmed


def test_initiator_repeats_the_x3dh_header_until_answered() -> None:
    alice, bob = Node(), Node()
    envelopes = [alice.send(bob, f"m{i}".encode()) for i in range(3)]
    assert [kind(e) for e in envelopes] == [TYPE_INITIAL] * 3
    # any of them may arrive first; the others join the session it started
    assert bob.recv(envelopes[2]) == b"m2"
    assert bob.recv(envelopes[0]) == b"m0"
    assert bob.recv(envelopes[1]) == b"m1"
    assert alice.recv(bob.send(alice, b"ok")) == b"ok"
    assert kind(alice.send(bob, b"m3")) == TYPE_NORMAL


def test_encrypt_refuses_misuse() -> None:
    alice, bob = Node(), Node()
    with pytest.raises(NoSession):
        alice.sessions.encrypt(bob.key, b"x", now=T0)
    with pytest.raises(UsageError):
        alice.sessions.encrypt(alice.key, b"x", now=T0, peer_bundle=alice.bundle())
    with pytest.raises(UsageError):
        alice.sessions.encrypt(b"short", b"x", now=T0, peer_bundle=bob.bundle())
    with pytest.raises(UsageError):
        alice.sessions.encrypt(bob.key, bytes(MAX_PLAINTEXT + 1), now=T0, peer_bundle=bob.bundle())
    with pytest.raises(BundleError):
        alice.sessions.encrypt(bob.key, b"x", now=T0, peer_bundle=b"not a bundle")
    assert not alice.sessions.has_session(bob.key)
    # the largest plaintext goes through
    big = os.urandom(MAX_PLAINTEXT)
    assert bob.recv(alice.send(bob, big)) == big


def test_hundred_messages_each_way_interleaved() -> None:
    alice, bob = Node(), Node()
    rng = random.Random(1)
    to_bob: list[bytes] = []
    to_alice: list[bytes] = []
    sent = {"a": 0, "b": 0}
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    now = T0
    while sent["a"] < 100 or sent["b"] < 100 or to_bob or to_alice:
        now += 1
        choices = []
        if sent["a"] < 100:
            choices.append("a-send")
        if sent["b"] < 100 and got_b:  # Bob answers once Alice's first message arrived
            choices.append("b-send")
        if to_bob:
            choices.append("to-bob")
        if to_alice:
            choices.append("to-alice")
        action = rng.choice(choices)
        if action == "a-send":
            to_bob.append(alice.send(bob, b"a%d" % sent["a"], now))
            sent["a"] += 1
        elif action == "b-send":
            to_alice.append(bob.send(alice, b"b%d" % sent["b"], now))
            sent["b"] += 1
        elif action == "to-bob":
            got_b.append(bob.recv(to_bob.pop(0), now, sender=alice))
        else:
            got_a.append(alice.recv(to_alice.pop(0), now, sender=bob))
    assert got_b == [b"a%d" % i for i in range(100)]
    assert got_a == [b"b%d" % i for i in range(100)]


T = TypeVar("T")


def shuffled_in_windows(items: list[T], window: int, rng: random.Random) -> list[T]:
    out: list[T] = []
    for i in range(0, len(items), window):
        chunk = items[i : i + window]
        rng.shuffle(chunk)
        out.extend(chunk)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_out_of_order_delivery_within_a_window(seed: int) -> None:
    rng = random.Random(seed)
    alice, bob = Node(), Node()
    stream: list[bytes] = []
    expected: list[bytes] = []
    # Alice writes in bursts; between bursts she hears from Bob, so her chain ratchets
    # and Bob's windows span chains (skipped keys of old chains via PN).
    first = alice.send(bob, b"m0")
    assert bob.recv(first) == b"m0"
    n = 1
    for _burst in range(5):
        for _ in range(10):
            stream.append(alice.send(bob, b"m%d" % n))
            expected.append(b"m%d" % n)
            n += 1
        assert alice.recv(bob.send(alice, b"r")) == b"r"
    # windows of 7 do not line up with the bursts of 10: they span chains
    order = shuffled_in_windows(list(range(len(stream))), 7, rng)
    assert order != sorted(order)
    received = {i: bob.recv(stream[i]) for i in order}
    assert [received[i] for i in range(len(stream))] == expected
    # and the other way
    replies = [bob.send(alice, b"b%d" % i) for i in range(25)]
    got = {alice.recv(e) for e in shuffled_in_windows(replies, 7, rng)}
    assert got == {b"b%d" % i for i in range(25)}


# --------------------------------------------------------------------------- bounds


def test_skipping_beyond_the_bound_fails_cleanly() -> None:
    config = SessionConfig(max_skip=5, max_skipped_keys=10)
    alice, bob = established(config)
    burst = [alice.send(bob, b"m%d" % i) for i in range(7)]
    before = bob.snapshot()
    with pytest.raises(TooManySkipped):
        bob.recv(burst[6])  # would skip 6 > 5
    assert bob.snapshot() == before  # nothing changed
    assert bob.recv(burst[5]) == b"m5"  # skips exactly 5
    for i in range(5):
        assert bob.recv(burst[i]) == b"m%d" % i  # from the skipped keys
    assert bob.recv(burst[6]) == b"m6"


def test_skipping_beyond_the_bound_at_session_start_spends_no_prekey() -> None:
    config = SessionConfig(max_skip=5, max_skipped_keys=10)
    alice, bob = Node(config=config), Node(config=config)
    burst = [alice.send(bob, b"m%d" % i) for i in range(7)]
    before = bob.snapshot()
    with pytest.raises(TooManySkipped):
        bob.recv(burst[6])
    assert bob.snapshot() == before  # the one-time prekey is still there
    assert not bob.sessions.has_session(alice.key)
    assert bob.recv(burst[0]) == b"m0"
    assert bob.recv(burst[6]) == b"m6"  # now a skip of 5


def test_total_skipped_keys_are_capped_oldest_first() -> None:
    config = SessionConfig(max_skip=5, max_skipped_keys=6)
    alice, bob = established(config)
    first = [alice.send(bob, b"a%d" % i) for i in range(5)]
    assert bob.recv(first[4]) == b"a4"  # 4 keys stored
    assert alice.recv(bob.send(alice, b"r")) == b"r"  # Alice's next chain
    second = [alice.send(bob, b"b%d" % i) for i in range(5)]
    assert bob.recv(second[4]) == b"b4"  # 4 more: 8 > 6, the two oldest dropped
    for envelope in first[:2]:
        with pytest.raises(SessionError):
            bob.recv(envelope)
    for i in (2, 3):
        assert bob.recv(first[i]) == b"a%d" % i
    for i in range(4):
        assert bob.recv(second[i]) == b"b%d" % i


# --------------------------------------------------------------------------- refusals


def test_replays_are_rejected() -> None:
    alice, bob = Node(), Node()
    first = alice.send(bob, b"one")
    assert bob.recv(first) == b"one"
    with pytest.raises(DuplicateMessage):
        bob.recv(first)  # an initial message again: the session exists, the key is spent
    second = alice.send(bob, b"two")
    third = alice.send(bob, b"three")
    assert bob.recv(third) == b"three"
    assert bob.recv(second) == b"two"  # from a skipped key, which is then deleted
    for envelope in (second, third):
        with pytest.raises(DuplicateMessage):
            bob.recv(envelope)
    # after ratchet steps, a message of an old chain is refused too
    assert alice.recv(bob.send(alice, b"r1")) == b"r1"
    fourth = alice.send(bob, b"four")
    assert bob.recv(fourth) == b"four"
    before = bob.snapshot()
    for envelope in (first, second, third, fourth):
        with pytest.raises(SessionError):
            bob.recv(envelope)
    assert bob.snapshot() == before


def tampered(envelope: bytes) -> list[bytes]:
    """The envelope with one bit flipped, at every header byte and some of the rest."""
    positions = set(range(min(len(envelope), 200))) | {len(envelope) - 1, len(envelope) - 33}
    out = []
    for i in sorted(positions):
        for bit in (0x01, 0x80):
            out.append(envelope[:i] + bytes([envelope[i] ^ bit]) + envelope[i + 1 :])
    out.append(envelope[:-16])
    out.append(envelope + bytes(16))
    return out


@pytest.mark.parametrize("which", ["initial", "normal"])
def test_tampered_envelopes_are_rejected_and_change_nothing(which: str) -> None:
    if which == "initial":
        alice, bob = Node(), Node()
    else:
        alice, bob = established()
    envelope = alice.send(bob, b"the real one")
    assert kind(envelope) == (TYPE_INITIAL if which == "initial" else TYPE_NORMAL)
    before = bob.snapshot()
    for bad in tampered(envelope):
        with pytest.raises((EnvelopeError, SessionError)):
            bob.sessions.decrypt(bad, now=T0)
        assert bob.snapshot() == before
    assert bob.recv(envelope) == b"the real one"
    assert bob.recv(alice.send(bob, b"and the next")) == b"and the next"


def test_a_first_message_works_out_each_prekeys_public_key_at_most_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first message, forged (a one-time prekey that is not ours) or real, costs at
    most one curve25519 derivation per one-time prekey we hold (40) and per signed
    prekey, plus the one for the prekey made to replace the one it used; not one each
    time x3dh reads a key's ``pub`` (p2pd.session.crypto._PreKeyPair): the real one
    took 156 before. Anyone can send a first message."""
    import xeddsa

    calls = 0
    derive = xeddsa.priv_to_curve25519_pub

    def counted(priv: bytes) -> bytes:
        nonlocal calls
        calls += 1
        return derive(priv)

    alice, bob = Node(), Node()
    real = alice.send(bob, b"the real one")
    first = Envelope.decode(real)
    assert first.initial is not None and first.initial.one_time_prekey is not None
    forged = Envelope(
        first.ratchet,
        first.ciphertext,
        initial=dataclasses.replace(first.initial, one_time_prekey=os.urandom(32)),
    ).encode()
    monkeypatch.setattr(xeddsa, "priv_to_curve25519_pub", counted)
    with pytest.raises(SessionError):
        bob.sessions.decrypt(forged, now=T0)
    assert calls <= 40 + 2, calls  # the signed prekey's too, current and old
    calls = 0
    assert bob.recv(real) == b"the real one"
    assert calls <= 40 + 2 + 1, calls


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_decrypting_garbage_raises_only_declared_errors(data: bytes) -> None:
    bob = _garbage_target()
    with pytest.raises((EnvelopeError, SessionError)):
        bob.sessions.decrypt(data, now=T0)


_GARBAGE: list[Node] = []


def _garbage_target() -> Node:
    if not _GARBAGE:
        _alice, bob = established()
        _GARBAGE.append(bob)
    return _GARBAGE[0]


def test_forged_message_to_a_fresh_initiator_is_refused_not_a_crash() -> None:
    """doubleratchet 1.3.0 asserts in this case (an initiator with no receiving chain,
    sent a message under the peer's signed prekey); we refuse it as unauthentic."""
    alice, bob = Node(), Node()
    first = Envelope.decode(alice.send(bob, b"hi"))
    assert first.initial is not None
    forged = Envelope(
        RatchetHeader(first.initial.signed_prekey, 0, 0),
        os.urandom(48),
        session=alice.active_id(bob),
    ).encode()
    before = alice.snapshot()
    with pytest.raises(DecryptError):
        alice.sessions.decrypt(forged, now=T0)
    assert alice.snapshot() == before


def test_unknown_session_is_refused() -> None:
    alice, bob = established()
    carol = Node()
    with pytest.raises(UnknownSession):
        carol.recv(alice.send(bob, b"not for carol"))


# --------------------------------------------------------------------------- identity


def test_wrong_identity_keys_are_rejected() -> None:
    alice, bob, carol, mallory = Node(), Node(), Node(), Node()
    # a bundle signed by Carol presented as Bob's (e.g. a forged record)
    with pytest.raises(BundleError):
        alice.sessions.encrypt(bob.key, b"x", now=T0, peer_bundle=carol.bundle())
    assert not alice.sessions.has_session(bob.key)
    # the transport says Mallory, the X3DH header says Alice
    first = alice.send(bob, b"from alice")
    with pytest.raises(SenderKeyMismatch):
        bob.recv(first, sender=mallory)
    # Mallory claims to be Alice: her initial message with Alice's identity key put in
    before = bob.snapshot()
    forged = mallory.send(bob, b"i am alice")
    forged = forged[:2] + alice.key + forged[34:]
    with pytest.raises(DecryptError):
        bob.recv(forged)
    assert bob.snapshot() == before  # no one-time prekey spent on it
    # the real one still works, and later messages are checked against the session
    assert bob.recv(first, sender=alice) == b"from alice"
    assert alice.recv(bob.send(alice, b"ok"), sender=bob) == b"ok"
    later = alice.send(bob, b"later")
    with pytest.raises(SenderKeyMismatch):
        bob.recv(later, sender=carol)
    assert bob.recv(later, sender=alice) == b"later"
    # a message claiming to come from Bob himself
    echo = bytearray(mallory.send(bob, b"me"))
    echo[2:34] = bob.key
    with pytest.raises(DecryptError):
        bob.recv(bytes(echo))


# --------------------------------------------------------------------------- prekeys


def test_one_time_prekey_is_consumed_once() -> None:
    alice, bob, carol = Node(), Node(), Node()
    published = PrekeyBundle.decode(bob.bundle())
    assert len(published.one_time_prekeys) == 40
    otpk = published.one_time_prekeys[0]
    only = PrekeyBundle(published.signed_prekey, published.signature, (otpk,))
    first = alice.sessions.encrypt(bob.key, b"a", now=T0, peer_bundle=only)
    assert Envelope.decode(first).initial.one_time_prekey == otpk  # type: ignore[union-attr]
    bob.sessions.mark_bundle_published()
    assert bob.recv(first) == b"a"
    assert bob.sessions.bundle_changed  # time to republish
    fresh = PrekeyBundle.decode(bob.bundle())
    assert otpk not in fresh.one_time_prekeys
    assert len(fresh.one_time_prekeys) == 40  # replenished
    # Carol got the same (stale) bundle and picked the same key: refused (X3DH 3.4)
    second = carol.sessions.encrypt(bob.key, b"c", now=T0, peer_bundle=only)
    before = bob.snapshot()
    with pytest.raises(PrekeyUnavailable):
        bob.recv(second)
    assert bob.snapshot() == before
    # Carol recovers by starting over with the fresh bundle
    assert carol.sessions.reset_session(bob.key, now=T0 + 1)
    with pytest.raises(NoSession):
        carol.sessions.encrypt(bob.key, b"c", now=T0 + 1)
    third = carol.sessions.encrypt(bob.key, b"c2", now=T0 + 1, peer_bundle=bob.bundle())
    assert bob.recv(third) == b"c2"


def test_a_bundle_without_one_time_prekeys_still_works_and_replays_fail() -> None:
    alice, bob = Node(), Node(config=SessionConfig(one_time_prekeys=0))
    assert PrekeyBundle.decode(bob.bundle()).one_time_prekeys == ()
    first = alice.send(bob, b"no otpk")
    assert Envelope.decode(first).initial.one_time_prekey is None  # type: ignore[union-attr]
    assert bob.recv(first) == b"no otpk"
    with pytest.raises(DuplicateMessage):
        bob.recv(first)


def test_signed_prekey_rotation_and_grace() -> None:
    bob = Node()
    bundle0 = bob.bundle()
    assert not bob.sessions.maintain(T0 + 6 * DAY)
    bob.sessions.mark_bundle_published()
    assert bob.sessions.maintain(T0 + 7 * DAY)  # rotated
    assert bob.sessions.bundle_changed
    bundle1 = bob.bundle()
    assert PrekeyBundle.decode(bundle1).signed_prekey != PrekeyBundle.decode(bundle0).signed_prekey
    assert bob.sessions.maintain(T0 + 14 * DAY)  # again: key 0 now older than x3dh keeps
    # key 0 (retired on day 7) still opens first messages until day 21
    late = Node()
    envelope = late.sessions.encrypt(bob.key, b"old bundle", now=T0, peer_bundle=bundle0)
    assert bob.recv(envelope, now=T0 + 20 * DAY) == b"old bundle"
    bob.sessions.maintain(T0 + 21 * DAY)
    later = Node()
    spk0 = PrekeyBundle.decode(bundle0)
    no_otpk = PrekeyBundle(spk0.signed_prekey, spk0.signature)  # only the signed prekey
    envelope = later.sessions.encrypt(bob.key, b"too old", now=T0, peer_bundle=no_otpk)
    with pytest.raises(PrekeyUnavailable):
        bob.recv(envelope, now=T0 + 21 * DAY)
    # key 1 (retired on day 14) still works on day 21. Only its signed prekey: bundle1
    # lists the same one-time prekeys as bundle0, and `late` spent one of them (a sender
    # picking that one would rightly get PrekeyUnavailable, 1 time in 40).
    other = Node()
    spk1 = PrekeyBundle.decode(bundle1)
    envelope = other.sessions.encrypt(
        bob.key, b"key 1", now=T0, peer_bundle=PrekeyBundle(spk1.signed_prekey, spk1.signature)
    )
    assert bob.recv(envelope, now=T0 + 21 * DAY) == b"key 1"


def test_identity_seed_is_never_stored() -> None:
    bob = Node()
    text = bob.at_rest.open_text("meta", "value", PREKEYS_META_KEY, bob.snapshot()[1][0])
    seed = bob.identity.seed
    assert seed.hex() not in text
    assert json.dumps("".join(map(chr, seed)))[1:-1] not in text  # x3dh's byte encoding
    assert "identity_key" not in json.loads(text)["x3dh"]


def test_prekeys_of_another_identity_are_refused() -> None:
    bob = Node()
    with pytest.raises(SessionStateCorrupt):
        SessionManager.open(bob.conn, Identity.generate("other"), now=T0)


# --------------------------------------------------------------------------- persistence


def test_sessions_survive_a_restart(tmp_path: Path) -> None:
    alice = Node(path=tmp_path / "alice.db")
    bob = Node(path=tmp_path / "bob.db")
    for path in (tmp_path / "alice.db", tmp_path / "bob.db"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bob.recv(alice.send(bob, b"before")) == b"before"
    assert alice.recv(bob.send(alice, b"before too")) == b"before too"
    pending = [alice.send(bob, b"p%d" % i) for i in range(3)]
    assert bob.recv(pending[2]) == b"p2"  # two skipped keys to remember
    alice.restart(T0 + 10)
    bob.restart(T0 + 10)
    assert bob.recv(pending[0]) == b"p0"
    assert bob.recv(pending[1]) == b"p1"
    with pytest.raises(DuplicateMessage):
        bob.recv(pending[2])  # replay after restart
    for i in range(5):
        assert bob.recv(alice.send(bob, b"a%d" % i, T0 + 11)) == b"a%d" % i
        assert alice.recv(bob.send(alice, b"b%d" % i, T0 + 11)) == b"b%d" % i
    alice.restart(T0 + 20)
    assert bob.recv(alice.send(bob, b"after")) == b"after"


def test_commit_false_leaves_the_transaction_to_the_caller() -> None:
    alice, bob = established()
    before = alice.snapshot()
    lost = alice.sessions.encrypt(bob.key, b"rolled back", now=T0, commit=False)
    assert alice.conn.in_transaction
    alice.conn.rollback()
    assert alice.snapshot() == before
    kept = alice.sessions.encrypt(bob.key, b"kept", now=T0, commit=False)
    alice.conn.commit()
    assert bob.recv(kept) == b"kept"
    # the rolled-back envelope reused the same message key: it cannot be opened twice
    with pytest.raises(DuplicateMessage):
        bob.recv(lost)


def test_failed_calls_leave_the_callers_transaction_alone() -> None:
    alice, bob = established()
    alice.conn.execute("INSERT INTO meta(key, value) VALUES ('test', 'pending')")
    with pytest.raises(SessionError):
        envelope = bob.send(alice, b"x")  # its last byte flipped (not set: it may be 0)
        alice.sessions.decrypt(envelope[:-1] + bytes([envelope[-1] ^ 1]), now=T0, commit=False)
    assert alice.conn.in_transaction
    alice.conn.commit()
    assert alice.conn.execute("SELECT value FROM meta WHERE key='test'").fetchone() == ("pending",)


def test_stored_state_is_the_document(tmp_path: Path) -> None:
    """What _store writes (JSON spliced from pydantic's) is the session's document."""
    alice, bob = established()
    for node in (alice, bob):
        for sid, state in node.conn.execute("SELECT session_id, state FROM sessions"):
            session = node.sessions._from_row(
                node.conn.execute(
                    "SELECT session_id, peer_key, status, state, created, updated FROM sessions"
                ).fetchone()
            )
            text = node.at_rest.open_text("sessions", "state", sid, state)
            assert json.loads(text) == session.document()
            assert json.loads(session.state_text()) == session.document()


def test_live_sessions_follow_the_database_not_the_other_way(tmp_path: Path) -> None:
    """SessionManager keeps live ratchets between messages. The database stays the truth:
    a second manager on the same file (another writer) steps the ratchet, and the first
    must see it, or it would reuse a message key (bob: DuplicateMessage)."""
    alice = Node(path=tmp_path / "alice.db")
    bob = Node()
    assert bob.recv(alice.send(bob, b"hello"), sender=alice) == b"hello"
    assert alice.recv(bob.send(alice, b"hi"), sender=bob) == b"hi"
    other_conn = open_database(tmp_path / "alice.db")
    other = SessionManager.open(other_conn, alice.identity, now=T0, at_rest=alice.at_rest)
    for i in range(3):
        assert bob.recv(alice.send(bob, b"a%d" % i), sender=alice) == b"a%d" % i
        envelope = other.encrypt(bob.key, b"o%d" % i, now=T0)
        assert bob.recv(envelope, sender=alice) == b"o%d" % i
    # and a reply decrypts on either: both follow the row
    assert other.decrypt(bob.send(alice, b"r1"), now=T0).plaintext == b"r1"
    assert alice.recv(bob.send(alice, b"r2"), sender=bob) == b"r2"
    other_conn.close()


def test_a_refused_message_does_not_leave_a_stepped_live_session() -> None:
    """The ratchet steps in memory before the row is written; when the write fails, the
    live object must not be reused (it is taken out of the cache while in use)."""
    alice, bob = established()
    before = bob.send(alice, b"before")
    assert alice.recv(before, sender=bob) == b"before"
    bob.conn.execute(
        "CREATE TRIGGER refuse BEFORE UPDATE ON sessions BEGIN SELECT RAISE(ABORT, 'no'); END"
    )
    with pytest.raises(sqlite3.DatabaseError):
        bob.send(alice, b"lost")  # the ratchet steps, then the write fails
    bob.conn.execute("DROP TRIGGER refuse")
    again = bob.send(alice, b"again")
    # the failed call left no trace: the next message takes the number "lost" had
    number = Envelope.decode(before).ratchet.message_number
    assert Envelope.decode(again).ratchet.message_number == number + 1
    assert alice.recv(again, sender=bob) == b"again"


def test_corrupt_session_state_is_a_declared_error() -> None:
    alice, bob = established()
    bob.conn.execute("UPDATE sessions SET state='{\"format\": 1}'")
    bob.conn.commit()
    with pytest.raises(SessionStateCorrupt):
        bob.recv(alice.send(bob, b"x"))


# --------------------------------------------------------------------------- session choice


def run_simultaneous(seed: int, alice_now: float, bob_now: float) -> tuple[Node, Node]:
    """Both send a first message before either receives one; then a random schedule of
    sends and out-of-order deliveries; then a drain. Every message must arrive once."""
    rng = random.Random(seed)
    alice, bob = Node(), Node()
    to_bob = [alice.send(bob, b"a0", alice_now)]
    to_alice = [bob.send(alice, b"b0", bob_now)]
    sent = {"a": 1, "b": 1}
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    while sent["a"] < 8 or sent["b"] < 8 or to_bob or to_alice:
        options = [o for o, ok in (("a", sent["a"] < 8), ("b", sent["b"] < 8)) if ok]
        options += ["to-bob"] * bool(to_bob) + ["to-alice"] * bool(to_alice)
        action = rng.choice(options)
        if action == "a":
            to_bob.append(alice.send(bob, b"a%d" % sent["a"], alice_now))
            sent["a"] += 1
        elif action == "b":
            to_alice.append(bob.send(alice, b"b%d" % sent["b"], bob_now))
            sent["b"] += 1
        elif action == "to-bob":
            got_b.append(bob.recv(to_bob.pop(rng.randrange(len(to_bob))), sender=alice))
        else:
            got_a.append(alice.recv(to_alice.pop(rng.randrange(len(to_alice))), sender=bob))
    assert sorted(got_b) == sorted(b"a%d" % i for i in range(8))
    assert sorted(got_a) == sorted(b"b%d" % i for i in range(8))
    for node in (alice, bob):  # both sessions exist on both sides: one lost, archived
        statuses = node.conn.execute("SELECT status FROM sessions ORDER BY status").fetchall()
        assert statuses == [("active",), ("archived",)]
    return alice, bob


@pytest.mark.parametrize("seed", range(8))
def test_simultaneous_initiation_converges_on_the_lower_key_on_a_tie(seed: int) -> None:
    alice, bob = run_simultaneous(seed, T0, T0)
    assert alice.active_id(bob) == bob.active_id(alice)
    lower = min((alice, bob), key=lambda n: n.key)
    higher = bob if lower is alice else alice
    info = lower.sessions.session_info(higher.key)
    assert info is not None and info.role == INITIATOR
    for i in range(10):  # and it works both ways from here on
        assert bob.recv(alice.send(bob, b"x%d" % i)) == b"x%d" % i
        assert alice.recv(bob.send(alice, b"y%d" % i)) == b"y%d" % i
    assert alice.active_id(bob) == bob.active_id(alice)


@pytest.mark.parametrize("seed", range(4))
def test_simultaneous_initiation_converges_on_the_later_start(seed: int) -> None:
    alice, bob = run_simultaneous(seed, T0 + 5, T0)  # Alice started later
    assert alice.active_id(bob) == bob.active_id(alice)
    info = alice.sessions.session_info(bob.key)
    assert info is not None and info.role == INITIATOR


def test_a_delayed_first_message_of_the_losing_session_changes_nothing() -> None:
    """The case that breaks arrival-order rules: the loser's first message arrives after
    the winner has been answered."""
    alice, bob = Node(), Node()
    lower, higher = sorted((alice, bob), key=lambda n: n.key)
    from_lower = lower.send(higher, b"L", T0)
    from_higher = higher.send(lower, b"H", T0)  # delayed
    assert higher.recv(from_lower) == b"L"  # higher switches to the lower's session
    assert lower.recv(higher.send(lower, b"answer")) == b"answer"
    assert lower.recv(from_higher) == b"H"  # arrives last; decrypts, switches nothing
    assert lower.active_id(higher) == higher.active_id(lower)


def test_a_peer_that_lost_its_state_starts_a_session_that_wins() -> None:
    alice, bob = established()
    assert bob.recv(alice.send(bob, b"old")) == b"old"
    reborn = Node(identity=alice.identity, now=T0 + 60)  # same key, empty database
    first = reborn.send(bob, b"i am back", T0 + 60)
    assert bob.recv(first, T0 + 60, sender=reborn) == b"i am back"
    assert bob.active_id(alice) == reborn.active_id(bob)
    assert reborn.recv(bob.send(reborn, b"welcome back")) == b"welcome back"


def test_reset_dates_the_new_session_after_the_peers_even_with_a_slow_clock() -> None:
    alice, bob = Node(), Node()
    assert bob.recv(alice.send(bob, b"a", T0 + 3600)) == b"a"  # Alice's clock is ahead
    assert alice.recv(bob.send(alice, b"b", T0)) == b"b"
    assert bob.sessions.reset_session(alice.key, now=T0)
    restart = bob.sessions.encrypt(alice.key, b"fresh", now=T0, peer_bundle=alice.bundle())
    assert alice.recv(restart) == b"fresh"
    assert alice.active_id(bob) == bob.active_id(alice)


def test_archived_sessions_are_bounded_and_leave_tombstones() -> None:
    config = SessionConfig(max_archived_sessions=2)
    bob = Node(config=config)
    alice_identity = Identity.generate("alice")
    firsts = []
    for i in range(5):  # Alice starts over five times (e.g. reinstalls)
        alice = Node(identity=alice_identity, now=T0 + i)
        firsts.append(alice.send(bob, b"%d" % i, T0 + i))
        assert bob.recv(firsts[-1], T0 + i) == b"%d" % i
    rows = bob.conn.execute("SELECT status FROM sessions ORDER BY created").fetchall()
    assert [r[0] for r in rows] == ["closed", "closed", "archived", "archived", "active"]
    with pytest.raises(DuplicateMessage):
        bob.recv(firsts[0])  # the tombstone refuses a replay of a closed session's start
    assert bob.recv(alice.send(bob, b"still fine", T0 + 5)) == b"still fine"
    # archived sessions unused for too long are closed
    bob.sessions.maintain(T0 + 31 * DAY)  # also rotates: the first signed prekey is "old"
    statuses = [r[0] for r in bob.conn.execute("SELECT status FROM sessions").fetchall()]
    assert sorted(statuses) == ["active", "closed", "closed", "closed", "closed"]
    with pytest.raises(DuplicateMessage):
        bob.recv(firsts[3])
    # tombstones go once their signed prekey is gone (retired day 31, grace 14 days)
    bob.sessions.maintain(T0 + 38 * DAY)
    assert len(bob.conn.execute("SELECT * FROM sessions").fetchall()) == 5
    bob.sessions.maintain(T0 + 45 * DAY)
    statuses = [r[0] for r in bob.conn.execute("SELECT status FROM sessions").fetchall()]
    assert statuses == ["active"]


def test_delete_sessions() -> None:
    alice, bob = established()
    assert bob.sessions.delete_sessions(alice.key) == 1
    assert not bob.sessions.has_session(alice.key)
    with pytest.raises(UnknownSession):
        bob.recv(alice.send(bob, b"x"))


def test_the_sessions_table_keeps_one_active_session_per_peer() -> None:
    alice, bob = established()
    with pytest.raises(sqlite3.IntegrityError):
        bob.conn.execute(
            "INSERT INTO sessions VALUES (?, ?, 'active', '{}', 0, 0)", (b"x" * 16, alice.key)
        )
