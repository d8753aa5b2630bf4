"""Mailbox passes (issue 12, item 3): a contact's put lands in a share of the mailbox that
a flood of stamped junk cannot fill; forged, replayed, stale passes are refused and
counted; a storing node learns nothing that links two puts of one contact."""

from __future__ import annotations

import contextlib
import json
import random
import struct
import time

import nacl.public
import nacl.signing
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from mailbox_helpers import readable

from p2pd.config import DHTConfig
from p2pd.dht.mailbox import (
    CONTACTS,
    STRANGERS,
    MailboxLimits,
    MailboxStorage,
    fetch_message,
    mailbox_key,
)
from p2pd.dht.mailbox_entry import POSTAGE_WINDOW, seal, stamp
from p2pd.dht.mailbox_pass import (
    CERT_CONTEXT,
    CONTACT_PUT,
    MAX_PASS_LIFETIME,
    PASS_PERIOD,
    MailboxPass,
    issue_pass,
    wrap,
)
from p2pd.dht.mailbox_pass_share import decode_pass, encode_pass
from p2pd.dht.routing import Node
from p2pd.identity import Identity
from p2pd.store import open_database
from p2pd.testing.flood import junk_entry
from p2pd.testing.swarm import open_swarm

NOW = float(int(time.time()))
BOB = Identity.generate("bob")
CAROL = Identity.generate("carol")
MALLORY = Identity.generate("mallory")
KEY = mailbox_key(BOB.public_key)
#: Few entries per share, so that a test fills one with a handful of puts.
SMALL = MailboxLimits(per_mailbox_count=4, contact_count=4)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def entry(text: bytes, wall: float = NOW, bits: int = 0) -> bytes:
    return stamp(KEY, seal(BOB.public_key, text), wall, bits)


def fetched(store: MailboxStorage, owner: Identity) -> list[bytes]:
    ts, after, entries = int(store._clock()), b"", []
    for _ in range(100):
        signature = owner.sign(fetch_message(owner.public_key, ts, after))
        page = store.fetch(owner.public_key, ts, after, signature)
        assert page is not None
        entries += page[0]
        if not page[1]:
            break
        after = page[0][-1][0]
    return readable(owner, entries)


def cert_signed(owner: Identity, signer: Identity, expires: int, seed: bytes) -> MailboxPass:
    """A pass for ``owner``'s mailbox whose certificate ``signer`` signed."""
    pub = bytes(nacl.signing.SigningKey(seed).verify_key)
    message = CERT_CONTEXT + owner.public_key + struct.pack(">Q", expires) + pub
    return MailboxPass(owner.public_key, expires, seed, signer.sign(message))


def test_a_pass_is_the_weeks_own_and_round_trips() -> None:
    first = issue_pass(BOB.public_key, BOB.sign, NOW)
    assert issue_pass(BOB.public_key, BOB.sign, NOW) == first  # nothing to store
    later = issue_pass(BOB.public_key, BOB.sign, NOW + PASS_PERIOD)
    assert later.seed != first.seed and later.expires == first.expires + PASS_PERIOD
    assert first.valid(NOW) and first.expires - NOW > PASS_PERIOD
    assert MailboxPass.from_bytes(first.to_bytes()) == first
    assert first.seed.hex() not in repr(first)
    forged = cert_signed(BOB, MALLORY, first.expires, first.seed)
    with pytest.raises(ValueError, match="not signed"):
        MailboxPass.from_bytes(forged.to_bytes())
    swapped = later.seed + first.certificate
    with pytest.raises(ValueError, match="does not match"):
        MailboxPass.from_bytes(swapped)
    with pytest.raises(ValueError):
        MailboxPass.from_bytes(first.to_bytes()[:-1])


def test_junk_fills_the_strangers_share_and_a_contact_still_puts() -> None:
    clock = Clock()
    store = MailboxStorage(open_database(None), SMALL, clock=clock)
    store.postage_bits = 6
    rng = random.Random(1)
    for _ in range(SMALL.per_mailbox_count):
        assert store.put(KEY, junk_entry(rng, KEY, 6), source="192.0.2.7")
    honest_stranger = entry(b"from a stranger", bits=6)
    assert not store.put(KEY, honest_stranger, source="198.51.100.1")
    assert store.refused == {"mailbox-full": 1}
    bob_pass = issue_pass(BOB.public_key, BOB.sign, NOW)
    assert store.put(KEY, wrap(bob_pass, KEY, entry(b"from a contact")), source="198.51.100.2")
    assert store.count(STRANGERS) == 4 and store.count(CONTACTS) == 1
    assert fetched(store, BOB).count(b"from a contact") == 1
    # The contacts' share is bounded too: a leaked pass fills it and nothing more.
    for i in range(SMALL.contact_count - 1):
        assert store.put(KEY, wrap(bob_pass, KEY, entry(b"%d" % i)))
    assert not store.put(KEY, wrap(bob_pass, KEY, entry(b"one too many")))
    assert store.refused["contacts-full"] == 1


def test_forged_replayed_and_stale_passes_are_refused_and_counted() -> None:
    clock = Clock()
    store = MailboxStorage(open_database(None), SMALL, clock=clock)
    store.postage_bits = 17  # a contact's put pays none of it
    bob_pass = issue_pass(BOB.public_key, BOB.sign, NOW)
    good = wrap(bob_pass, KEY, entry(b"hello"))
    refused = {
        # mallory signs a certificate for bob's mailbox
        "pass-forged": wrap(
            cert_signed(BOB, MALLORY, bob_pass.expires, b"m" * 32), KEY, entry(b"x")
        ),
        # carol's pass into bob's mailbox
        "pass-wrong-mailbox": wrap(issue_pass(CAROL.public_key, CAROL.sign, NOW), KEY, entry(b"x")),
        # a seen put's pass and signature on another entry (replayed onto new content)
        "pass-signature": good[: len(good) - len(entry(b"y"))] + entry(b"y"),
        # a certificate bob signed, but far beyond the longest a pass may live
        "pass-too-long": wrap(
            cert_signed(BOB, BOB, int(NOW + MAX_PASS_LIFETIME + 60), b"b" * 32), KEY, entry(b"x")
        ),
        # a put made with an old window (captured, replayed later)
        "stale-postage": wrap(bob_pass, KEY, entry(b"old", wall=NOW - 3 * POSTAGE_WINDOW)),
        # a truncated put
        "size": good[:150],
    }
    for why, put in refused.items():
        assert not store.put(KEY, put), why
        assert store.refused.get(why) == 1, (why, store.refused)
    assert store.count() == 0
    assert store.put(KEY, good) and store.put(KEY, good)  # the same put again: held once
    assert store.count() == 1 and store.refused["duplicate"] == 1
    clock.now = bob_pass.expires + 1  # a stale pass
    late = wrap(bob_pass, KEY, entry(b"late", wall=clock.now))
    assert not store.put(KEY, late) and store.refused["pass-expired"] == 1
    assert store.put(KEY, wrap(issue_pass(BOB.public_key, BOB.sign, clock.now), KEY, late[-512:]))


def test_a_storing_node_keeps_no_pass_and_cannot_link_two_puts() -> None:
    store = MailboxStorage(open_database(None), clock=Clock())
    bob_pass = issue_pass(BOB.public_key, BOB.sign, NOW)
    for text in (b"one", b"two"):
        assert store.put(KEY, wrap(bob_pass, KEY, entry(text)))
    (_, _, a, _), (_, _, b, _) = store.rows()
    for held in (a, b):
        assert len(held) == 512 and held[0] == 1  # a plain entry: the pass is dropped
        for secret in (bob_pass.certificate, bob_pass.public_key, BOB.public_key, bob_pass.seed):
            assert all(secret[i : i + 8] not in held for i in range(len(secret) - 7))
    # Version and window alike; the rest (nonce 0 aside) shares no 8-byte run.
    assert a[:5] == b[:5]
    assert all(a[i : i + 8] not in b for i in range(13, len(a) - 7))


@pytest.mark.slow
async def test_a_contact_reaches_a_mailbox_flooded_with_stamped_junk() -> None:
    """Real nodes on loopback: an attacker pays (low) postage for junk until every
    replica's strangers' share of bob's mailbox is full; a stranger's honest put is then
    refused everywhere, and alice's put with bob's pass is stored and read by bob. A put
    with a forged pass is refused and counted by the replicas (and alice's node then
    pays postage instead, which the full share refuses)."""
    config = DHTConfig(postage_bits=6)
    with trio.fail_after(90):
        async with open_swarm(6, config=config) as swarm:
            attacker, alice, bob_node, stranger = swarm.nodes[1:5]
            bob = bob_node.identity
            key = mailbox_key(bob.public_key)
            for node in swarm.nodes:
                assert node.dht.core.mailboxes is not None
                node.dht.core.mailboxes.limits = SMALL
            # Every node is a replica (k=20 > 6): the attacker fills each one's share.
            rng = random.Random(7)
            targets = [
                Node(n.dht.node_id, n.address.host, n.address.port)
                for n in swarm.nodes
                if n is not attacker
            ]
            for _ in range(SMALL.per_mailbox_count):
                calls = [(t, "mailbox_put", [key, junk_entry(rng, key)]) for t in targets]
                assert all(r is True for r in await attacker.dht.gather(calls))
                attacker.dht.core.mailboxes.put(key, junk_entry(rng, key))  # type: ignore[union-attr]
            assert all(n.dht.core.mailboxes.count(STRANGERS) == 4 for n in swarm.nodes)  # type: ignore[union-attr]
            assert await stranger.dht.mailbox_put(bob.public_key, b"stranger") == 0

            forged = cert_signed(
                bob, MALLORY, issue_pass(bob.public_key, bob.sign, time.time()).expires, b"f" * 32
            )
            alice.dht.mailbox_passes = lambda owner: forged if owner == bob.public_key else None
            assert await alice.dht.mailbox_put(bob.public_key, b"forged") == 0
            assert bob_node.dht.statistics()["counters"]["mailbox_refused_pass-forged"] == 1
            assert alice.dht.statistics()["counters"]["mailbox_pass_unconfirmed"] == 1

            good = issue_pass(bob.public_key, bob.sign, time.time())
            alice.dht.mailbox_passes = lambda owner: good if owner == bob.public_key else None
            assert await alice.dht.mailbox_put(bob.public_key, b"from alice") >= 2
            got = await bob_node.dht.mailbox_fetch(bob)
            texts = set(readable(bob, got))
            assert b"from alice" in texts and b"stranger" not in texts
            assert bob_node.dht.core.mailboxes.count(CONTACTS) == 1  # type: ignore[union-attr]


# ---------------------------------------------------------------------- garbage


@given(st.binary(max_size=2600))
def test_a_storing_node_refuses_garbage_passes_without_raising(garbage: bytes) -> None:
    store = MailboxStorage(open_database(None), SMALL, clock=Clock())
    store.postage_bits = 6
    assert not store.put(KEY, bytes([CONTACT_PUT]) + garbage)
    assert store.count() == 0 and sum(store.refused.values()) == 1


@given(st.binary(max_size=400), st.text(max_size=600))
def test_pass_decoders_raise_only_value_error(data: bytes, text: str) -> None:
    for attempt in (
        lambda: MailboxPass.from_bytes(data),
        lambda: decode_pass(text),
        lambda: decode_pass(json.dumps({"type": "mailbox_pass", "pass": text[:400]})),
        lambda: decode_pass(json.dumps({"type": "mailbox_pass", "pass": data.hex()})),
    ):
        with contextlib.suppress(ValueError):
            attempt()


def test_a_pass_round_trips_through_its_signal() -> None:
    bobs = issue_pass(BOB.public_key, BOB.sign, NOW)
    assert decode_pass(encode_pass(bobs)) == bobs
