"""Revoking a leaked mailbox pass (p2pd/dht/mailbox_revoke.py): the owner's signed pin
makes the replicas refuse the leaked pass from then on, while its contacts' puts with
the new pass are taken; the pin's own bounds."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest
import trio
from mailbox_helpers import readable

from p2pd.config import DHTConfig
from p2pd.dht.mailbox import CONTACTS, mailbox_key
from p2pd.dht.mailbox_pass import MAX_PASS_LIFETIME, PASS_PERIOD, issue_pass
from p2pd.dht.mailbox_pass_share import MailboxPasses, encode_pass
from p2pd.dht.mailbox_revoke import MAX_PINS, REVOKE_WINDOW, PassPin, PassPins, make_pin
from p2pd.identity import Identity
from p2pd.testing.swarm import SwarmNode, open_swarm

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
    other = PassPin(b"o" * 32, 0, int(WALL) + 99, b"p" * 32, b"s" * 64)
    small._pins = {bytes([i % 256, i // 256]) * 10: other for i in range(MAX_PINS)}
    assert small.pin(good, WALL) == "revoke-full"


def _pins_of(who: Identity, epoch: int = 1, wall: float = WALL) -> PassPin:
    return make_pin(
        who.public_key, who.sign, wall, issue_pass(who.public_key, who.sign, wall, epoch=epoch)
    )


def test_pins_are_kept_across_a_restart_and_stored_rows_are_checked_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's pins survive it (table ``mailbox_pins``); at load each row is checked as a
    pin just received would be (not its freshness): a forged, mislabelled or mangled row
    is refused with a log line and deleted, an expired one dropped, and beyond the bound
    the oldest go."""
    bob, carol = Identity.generate("bob"), Identity.generate("carol")
    conn = sqlite3.connect(":memory:")
    pins = PassPins(mailbox_key, conn, wall=WALL)
    good = _pins_of(bob)
    assert pins.pin(good, WALL) is None and pins.pin(_pins_of(carol), WALL) is None
    assert pins.persist()
    leaked = issue_pass(bob.public_key, bob.sign, WALL)
    key = mailbox_key(bob.public_key)
    # later, a restart: no freshness window at load (the pin is hours old by then)
    later = WALL + 5 * REVOKE_WINDOW
    again = PassPins(mailbox_key, conn, wall=later)
    assert len(again) == 2 and again.revoked(key, leaked.expires, leaked.public_key, later)
    # a pin replaced, then dropped at its expiry: the table follows
    newer = _pins_of(bob, epoch=2, wall=WALL + 60)
    assert again.pin(newer, WALL + 60) is None and again.persist()
    assert PassPins(mailbox_key, conn, wall=later)._pins[key] == newer
    assert not again.revoked(key, leaked.expires, leaked.public_key, newer.expires + 1.0)
    assert again.persist() and len(PassPins(mailbox_key, conn, wall=later)) == 1

    # rows that are not what a pin is: refused, logged, deleted; never trusted
    mallory, dave = Identity.generate("mallory"), Identity.generate("dave")
    carols, daves = _pins_of(carol, epoch=3), _pins_of(dave)
    rows = [
        (mailbox_key(carol.public_key), *carols.args()[:4], mallory.sign(b"x")),  # forged
        (mailbox_key(mallory.public_key), *good.args()),  # under another mailbox
        (key, bob.public_key, "soon", good.expires, good.pass_key, good.signature),
        (mailbox_key(dave.public_key), *daves.args()[:2], daves.expires + 30 * 86400,
         *daves.args()[3:]),
    ]  # fmt: skip
    conn.execute("DELETE FROM mailbox_pins")
    conn.executemany("INSERT INTO mailbox_pins VALUES (?,?,?,?,?,?)", rows)
    conn.commit()
    caplog.set_level("WARNING", logger="p2pd.dht.mailbox_revoke")
    loaded = PassPins(mailbox_key, conn, wall=later)
    assert len(loaded) == 0
    assert not loaded.revoked(key, leaked.expires, leaked.public_key, later)
    assert conn.execute("SELECT COUNT(*) FROM mailbox_pins").fetchone() == (0,)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all("refusing stored mailbox pin" in line for line in lines)
    for why in ("signature that does not verify", "not its owner's mailbox key",
                "wrong type", "expiry further from its timestamp"):  # fmt: skip
        assert sum(why in line for line in lines) == 1, (why, lines)

    # the bound, as in memory: the newest MAX_PINS stay, the oldest are dropped
    monkeypatch.setattr("p2pd.dht.mailbox_revoke.MAX_PINS", 2)
    people = [Identity.generate(f"person{i}") for i in range(3)]
    full = PassPins(mailbox_key, conn, wall=WALL)
    for i, who in enumerate(people):
        full._pins[mailbox_key(who.public_key)] = _pins_of(who, wall=WALL + i)
        full._dirty.add(mailbox_key(who.public_key))
    assert full.persist()
    kept = PassPins(mailbox_key, conn, wall=WALL + 10)
    assert set(kept._pins) == {mailbox_key(p.public_key) for p in people[1:]}
    assert conn.execute("SELECT COUNT(*) FROM mailbox_pins").fetchone() == (2,)


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
            # Counted once the pin is held: a copy of "junk 1" late to a replica that holds
            # it is refused too; one that the pin did not reach (a lost datagram, a loaded
            # machine) may still take the leaked pass, and is left out.
            key, wall = mailbox_key(bob.public_key), time.time()
            pinned = [
                n.dht.core.mailboxes
                for n in swarm.nodes
                if n.dht.core.mailboxes is not None
                and n.dht.core.mailboxes.pins.revoked(key, leaked.expires, leaked.public_key, wall)
            ]
            assert len(pinned) >= 2
            held = [boxes.count(CONTACTS) for boxes in pinned]

            assert await mallory.dht.mailbox_put(bob.public_key, b"junk 2") >= 2  # postage
            assert mallory.dht.core.stats["mailbox_pass_unconfirmed"] == 1
            # nothing more in the contacts' share of any replica holding the pin
            assert [boxes.count(CONTACTS) for boxes in pinned] == held
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


@pytest.mark.slow
async def test_a_restarted_replica_still_refuses_the_leaked_pass(tmp_path: Path) -> None:
    """The attack: mallory holds bob's leaked pass and waits for the replicas holding
    bob's pin to restart (before, they forgot the pin until bob's next republish, up
    to an hour). Every one of them restarts from its database; mallory's put with the
    leaked pass right after is refused by each (``pass-revoked``) and does not count as
    left: she pays postage like any stranger."""
    with trio.fail_after(120):
        async with open_swarm(10, config=CONFIG, home=tmp_path) as swarm:
            owner, mallory = swarm.nodes[6], swarm.nodes[3]
            bob = owner.identity
            key = mailbox_key(bob.public_key)
            leaked = issue_pass(bob.public_key, bob.sign, time.time())
            mallory.dht.mailbox_passes = lambda k: leaked if k == bob.public_key else None
            new = issue_pass(bob.public_key, bob.sign, time.time(), epoch=1)
            assert await owner.dht.mailbox_revoke(make_pin(bob.public_key, bob.sign,
                                                           time.time(), new)) >= 2  # fmt: skip

            def pinned(node: SwarmNode) -> bool:
                boxes = node.dht.core.mailboxes
                assert boxes is not None
                return boxes.pins.revoked(key, leaked.expires, leaked.public_key, time.time())

            holders = [n.index for n in swarm.nodes if pinned(n) and n not in (owner, mallory)]
            assert len(holders) >= 2
            for index in holders:
                node = await swarm.restart(index)
                await node.dht.bootstrap([swarm.nodes[0 if index else 1].address])
            assert await mallory.dht.mailbox_put(bob.public_key, b"junk") >= 2  # postage
            assert mallory.dht.core.stats["mailbox_pass_unconfirmed"] == 1
            assert all(pinned(swarm.nodes[i]) for i in holders)  # from their databases
            for index in holders:
                boxes = swarm.nodes[index].dht.core.mailboxes
                assert boxes is not None and boxes.count(CONTACTS) == 0
            refused = [
                swarm.nodes[i].dht.core.mailboxes.refused.get("pass-revoked", 0)  # type: ignore[union-attr]
                for i in holders
            ]
            assert sum(refused) >= 2, refused


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
    assert own.epoch(bob.public_key) == 1  # the epoch it read (and keeps) follows too
    # the pin is signed afresh (for replicas that lost it) while it is in effect
    later = WALL + 3600
    pin = own.current_pin(bob.public_key, bob.sign, later)
    assert pin is not None and pin.timestamp == int(later)
    assert (pin.pass_key, pin.expires) == (new.public_key, new.expires)
    assert own.current_pin(bob.public_key, bob.sign, new.expires + 1.0) is None
    # twice in one second: the second pin is newer than the first, so replicas take it
    # (with the same timestamp they kept the first, and refused the pass now given out)
    pins = PassPins(mailbox_key)
    for epoch in (2, 3):
        assert own.next_epoch(bob.public_key, WALL) == epoch
        pin = own.current_pin(bob.public_key, bob.sign, WALL)
        assert pin is not None and pins.pin(pin, WALL) is None
    third = issue_pass(bob.public_key, bob.sign, WALL, epoch=3)
    assert not pins.revoked(mailbox_key(bob.public_key), third.expires, third.public_key, WALL)
