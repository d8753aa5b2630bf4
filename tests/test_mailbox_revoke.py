"""Revoking a leaked mailbox pass (p2pd/dht/mailbox_revoke.py): the owner's signed pin
makes the replicas refuse the leaked pass from then on, while its contacts' puts with
the new pass are taken; the pin's own bounds."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter

import pytest
import trio
from mailbox_helpers import readable

from p2pd.config import DHTConfig
from p2pd.dht.mailbox import CONTACTS, mailbox_key
from p2pd.dht.mailbox_pass import MAX_PASS_LIFETIME, PASS_PERIOD, issue_pass
from p2pd.dht.mailbox_pass_share import MailboxPasses, encode_pass
from p2pd.dht.mailbox_revoke import MAX_PINS, REVOKE_WINDOW, PassPin, PassPins, make_pin
from p2pd.identity import Identity
from p2pd.testing.swarm import open_swarm

CONFIG = DHTConfig(ksize=5, postage_bits=4)
WALL = 1_800_000_000.0


def test_a_pin_refuses_the_other_passes_of_its_week_and_no_later_ones() -> None:
    bob = Identity.generate("bob")
    leaked = issue_pass(bob.public_key, bob.sign, WALL)
    kept = issue_pass(bob.public_key, bob.sign, WALL, epoch=1)
    assert kept.public_key != leaked.public_key and kept.expires == leaked.expires
    # epoch 0 derives as before revocation existed: the same pass on every start
    assert issue_pass(bob.public_key, bob.sign, WALL) == leaked
    pins = PassPins(mailbox_key)
    key = mailbox_key(bob.public_key)
    assert not pins.revoked(key, leaked.expires, leaked.public_key, WALL)
    assert pins.pin(make_pin(bob.public_key, bob.sign, WALL, kept), WALL) is None
    assert pins.revoked(key, leaked.expires, leaked.public_key, WALL)
    assert not pins.revoked(key, kept.expires, kept.public_key, WALL)
    # last week's pass too; next week's is good again (it expires later)
    older = issue_pass(bob.public_key, bob.sign, WALL - PASS_PERIOD)
    assert pins.revoked(key, older.expires, older.public_key, WALL)
    later = issue_pass(bob.public_key, bob.sign, WALL + PASS_PERIOD)
    assert not pins.revoked(key, later.expires, later.public_key, WALL + PASS_PERIOD)
    # the pin ends with the pass it keeps
    assert not pins.revoked(key, leaked.expires, leaked.public_key, kept.expires + 1.0)
    assert len(pins) == 0


def test_a_pin_is_signed_fresh_bounded_and_never_replaced_by_an_older_one() -> None:
    bob, mallory = Identity.generate("bob"), Identity.generate("mallory")
    kept = issue_pass(bob.public_key, bob.sign, WALL, epoch=1)
    leaked = issue_pass(bob.public_key, bob.sign, WALL)
    pins = PassPins(mailbox_key)
    good = make_pin(bob.public_key, bob.sign, WALL, kept)
    forged = PassPin(bob.public_key, good.timestamp + 1, kept.expires, leaked.public_key,
                     mallory.sign(b"anything"))  # fmt: skip
    assert pins.pin(forged, WALL) == "revoke-signature"
    assert pins.pin(good, WALL + REVOKE_WINDOW + 1) == "revoke-stale"  # a replay, later
    too_long = PassPin(bob.public_key, int(WALL), int(WALL + MAX_PASS_LIFETIME + 10),
                       kept.public_key, b"\x00" * 64)  # fmt: skip
    assert pins.pin(too_long, WALL) == "revoke-expires"
    assert pins.pin(good, WALL) is None and pins.pin(good, WALL) is None  # again: fine
    # an older pin (the leaked pass kept, say, replayed from before) does not replace it
    old = make_pin(bob.public_key, bob.sign, WALL - 100, leaked)
    assert pins.pin(old, WALL) == "revoke-old"
    assert pins.revoked(mailbox_key(bob.public_key), leaked.expires, leaked.public_key, WALL)
    # full: new pins are refused, held ones stay
    small = PassPins(mailbox_key)
    small._pins = {
        bytes([i % 256, i // 256]) * 10: (0, int(WALL) + 99, b"") for i in range(MAX_PINS)
    }
    assert small.pin(good, WALL) == "revoke-full"


@pytest.mark.slow
async def test_after_revocation_the_leaked_pass_is_refused_and_the_new_one_taken() -> None:
    """The attack: mallory holds bob's leaked pass and fills bob's contacts' share with
    it. Before the revocation, the replicas take her puts (contacts' share); after bob's
    pin, every replica refuses them (``pass-revoked``: mallory only gets in by paying
    postage, into the strangers' share), and alice's puts with bob's new pass are
    taken into the contacts' share."""
    with trio.fail_after(120):
        async with open_swarm(10, config=CONFIG) as swarm:
            owner, mallory, alice = swarm.nodes[6], swarm.nodes[3], swarm.nodes[8]
            bob = owner.identity
            leaked = issue_pass(bob.public_key, bob.sign, time.time())
            mallory.dht.mailbox_passes = lambda k: leaked if k == bob.public_key else None

            def contacts_held() -> int:
                return sum(
                    n.dht.core.mailboxes.count(CONTACTS)  # type: ignore[union-attr]
                    for n in swarm.nodes
                )

            assert await mallory.dht.mailbox_put(bob.public_key, b"junk 1") >= 2
            before = contacts_held()
            assert before >= 2  # the leaked pass works: the attack is real
            assert mallory.dht.core.stats["mailbox_pass_unconfirmed"] == 0

            new = issue_pass(bob.public_key, bob.sign, time.time(), epoch=1)
            pin = make_pin(bob.public_key, bob.sign, time.time(), new)
            assert await owner.dht.mailbox_revoke(pin) >= 2

            assert await mallory.dht.mailbox_put(bob.public_key, b"junk 2") >= 2  # postage
            assert mallory.dht.core.stats["mailbox_pass_unconfirmed"] == 1
            assert contacts_held() == before  # nothing more in the contacts' share
            refused = sum(
                n.dht.core.mailboxes.refused.get("pass-revoked", 0)  # type: ignore[union-attr]
                for n in swarm.nodes
            )
            assert refused >= 2

            alice.dht.mailbox_passes = lambda k: new if k == bob.public_key else None
            assert await alice.dht.mailbox_put(bob.public_key, b"from alice") >= 2
            assert alice.dht.core.stats["mailbox_pass_unconfirmed"] == 0
            assert contacts_held() >= before + 2
            got = await owner.dht.mailbox_fetch(bob)
            assert sorted(readable(bob, got)) == [b"from alice", b"junk 1", b"junk 2"]


def test_a_contact_takes_the_owners_new_pass_of_the_same_week() -> None:
    """After a revocation the announcer gives each contact the new pass, which expires
    when the revoked one does: the contact replaces the one it holds (and the owner's
    pass epoch is kept across restarts)."""
    bob = Identity.generate("bob")
    conn = sqlite3.connect(":memory:")
    held = MailboxPasses(conn, Counter())
    old = issue_pass(bob.public_key, bob.sign, WALL)
    assert held.received(bob.public_key, True, encode_pass(old), WALL)
    assert held.get(bob.public_key, WALL) == old
    new = issue_pass(bob.public_key, bob.sign, WALL, epoch=1)
    assert held.received(bob.public_key, True, encode_pass(new), WALL)
    assert held.get(bob.public_key, WALL) == new
    # an older week's pass does not replace it
    last_week = issue_pass(bob.public_key, bob.sign, WALL - PASS_PERIOD)
    assert held.received(bob.public_key, True, encode_pass(last_week), WALL)
    assert held.get(bob.public_key, WALL) == new
    # the owner's side: the epoch is stored, the announcer's version follows it
    own = MailboxPasses(conn, Counter())
    assert own.epoch(bob.public_key) == 0
    assert own.current_pin(bob.public_key, bob.sign, WALL) is None  # never revoked
    assert own.next_epoch(bob.public_key, WALL) == 1
    assert MailboxPasses(conn, Counter()).epoch(bob.public_key) == 1
    # the pin is signed afresh (for replicas that lost it) while it is in effect
    later = WALL + 3600
    pin = own.current_pin(bob.public_key, bob.sign, later)
    assert pin is not None and pin.timestamp == int(later)
    assert (pin.pass_key, pin.expires) == (new.public_key, new.expires)
    assert own.current_pin(bob.public_key, bob.sign, new.expires + 1.0) is None
