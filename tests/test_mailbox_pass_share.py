"""Mailbox passes handed to contacts in the session (p2pd/dht/mailbox_pass_share.py):
kept only from a pinned key and only into its own mailbox; used by delivery's mailbox
fallback, so a contact's offline message lands in the contacts' share."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from p2pd.api import Api
from p2pd.at_rest import AtRest
from p2pd.config import DHTConfig, LanConfig, NodeConfig
from p2pd.daemon import Node, open_node
from p2pd.dht.mailbox import CONTACTS, STRANGERS
from p2pd.dht.mailbox_pass import issue_pass
from p2pd.dht.mailbox_pass_share import MailboxPasses, encode_pass, is_pass
from p2pd.identity import Identity
from p2pd.store import open_database
from p2pd.testing.daemons import short_tempdir
from p2pd.testing.waiting import wait_for
from p2pd.wire import Address

NOW = float(int(time.time()))
BOB, MALLORY = Identity.generate("bob"), Identity.generate("mallory")


def test_a_pass_is_kept_only_from_its_pinned_owner() -> None:
    conn, stats = open_database(None), Counter[str]()
    passes = MailboxPasses(conn, stats, at_rest=AtRest(b"k" * 32))
    bobs = issue_pass(BOB.public_key, BOB.sign, NOW)
    assert is_pass(encode_pass(bobs)) and not is_pass('{"type": "addresses"}')
    assert not passes.received(BOB.public_key, False, encode_pass(bobs), NOW)  # not pinned
    assert not passes.received(MALLORY.public_key, True, encode_pass(bobs), NOW)  # not hers
    assert not passes.received(BOB.public_key, True, '{"type": "mailbox_pass", "pass": "00"}', NOW)
    assert not passes.received(BOB.public_key, True, "[" * 100_000, NOW)
    assert passes.get(BOB.public_key, NOW) is None
    assert stats == {"mailbox_passes_received": 4, "mailbox_passes_refused": 4}
    assert passes.received(BOB.public_key, True, encode_pass(bobs), NOW)
    assert passes.get(BOB.public_key, NOW) == bobs
    # at rest the seed is sealed; an older pass does not replace a newer one
    (stored,) = conn.execute("SELECT pass FROM mailbox_passes").fetchone()
    assert bobs.seed not in bytes(stored)
    older = issue_pass(BOB.public_key, BOB.sign, NOW - 7 * 24 * 3600)
    assert passes.received(BOB.public_key, True, encode_pass(older), NOW)
    assert passes.get(BOB.public_key, NOW) == bobs
    assert passes.get(BOB.public_key, bobs.expires + 1) is None  # expired: not used


@pytest.fixture()
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-pass-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config(root: Path, name: str, bootstrap: tuple[Address, ...] = ()) -> NodeConfig:
    return NodeConfig(
        home=root / name, listen=Address("127.0.0.1", 0), bootstrap=bootstrap,
        lan=LanConfig(mode="off"), connect_timeout=1.0, ack_timeout=2.0,
        dht=DHTConfig(mailbox_copies=1),
    )  # fmt: skip


def inbox_texts(n: Node) -> list[str]:
    return [m["text"] for m in Api(n).inbox(limit=100)["messages"]]


@pytest.mark.slow
async def test_a_contact_is_given_a_pass_and_its_offline_message_uses_it(root: Path) -> None:
    """alice writes to bob directly; his daemon gives her his pass in the session.
    bob goes away; alice's next message goes to his mailbox with the pass (the contacts'
    share of every copy, no postage); bob, back, reads it."""
    alice_id, carol_id = Identity.generate("alice"), Identity.generate("carol")
    with trio.fail_after(90):
        async with open_node(config(root, "alice"), alice_id) as alice:
            seed = (alice.listen_address,)
            async with open_node(config(root, "carol", seed), carol_id) as carol:
                async with open_node(config(root, "bob", seed), BOB) as bob:
                    await bob.publish()
                    alice.delivery.contacts.pin("bob", BOB.public_key, 0.0)
                    bob.delivery.contacts.pin("alice", alice_id.public_key, 0.0)
                    # alice writes to bob: his daemon gives her his pass (she may write
                    # again), hers gives him hers (on the connection she opened)
                    await alice.delivery.send("bob", "hello")
                    await wait_for(lambda: inbox_texts(bob) == ["hello"])
                    await wait_for(lambda: alice.dht.mailbox_passes(BOB.public_key) is not None)
                    await wait_for(lambda: bob.dht.mailbox_passes(alice_id.public_key) is not None)
                    counters = bob.dht.core.stats  # the signal's ack may still be on its way
                    await wait_for(lambda: counters["mailbox_passes_sent"] == 1)
                for peer in alice.quic.peers():
                    peer.close("test: bob is gone")
                later = await alice.delivery.send("bob", "while you were away")
                await wait_for(
                    lambda: alice.delivery.messages.get(later.id).via == "mailbox"  # type: ignore[union-attr]
                )
                holders = [n.dht.core.mailboxes for n in (alice, carol)]
                assert sum(m.count(CONTACTS) for m in holders if m is not None) >= 1
                assert all(m.count(STRANGERS) == 0 for m in holders if m is not None)
                async with open_node(config(root, "bob", seed), BOB) as bob:
                    await wait_for(lambda: "while you were away" in inbox_texts(bob), timeout=30)


@pytest.mark.slow
async def test_revoke_mailbox_pass_pins_the_replicas_and_gives_contacts_the_new_pass(
    root: Path,
) -> None:
    """bob's pass leaked: `revoke_mailbox_pass` (control API) moves him to a new epoch;
    the replicas of his mailbox hold his pin (the old pass is refused there), and alice,
    his contact, is given the new pass on her next message to him."""
    alice_id, carol_id = Identity.generate("alice"), Identity.generate("carol")
    with trio.fail_after(90):
        async with open_node(config(root, "alice"), alice_id) as alice:
            seed = (alice.listen_address,)
            async with (
                open_node(config(root, "carol", seed), carol_id) as carol,
                open_node(config(root, "bob", seed), BOB) as bob,
            ):
                await bob.publish()
                alice.delivery.contacts.pin("bob", BOB.public_key, 0.0)
                bob.delivery.contacts.pin("alice", alice_id.public_key, 0.0)
                await alice.delivery.send("bob", "hello")
                await wait_for(lambda: alice.dht.mailbox_passes(BOB.public_key) is not None)
                leaked = alice.dht.mailbox_passes(BOB.public_key)
                assert leaked is not None
                revoked = await Api(bob).revoke_mailbox_pass()
                assert revoked["epoch"] == 1 and revoked["replicas"] >= 1
                assert revoked["until"] == leaked.expires
                assert bob.dht.core.stats["mailbox_passes_revoked"] == 1
                pins = [n.dht.core.mailboxes.pins for n in (alice, carol, bob)]  # type: ignore[union-attr]
                key = bob.dht.core.mailboxes.pins._mailbox_key(BOB.public_key)  # type: ignore[union-attr]
                assert (
                    sum(
                        p.revoked(key, leaked.expires, leaked.public_key, time.time()) for p in pins
                    )
                    == revoked["replicas"]
                )
                # carol restarts (pins are held in memory): bob's next republish sends
                # his pin again
                carol.dht.core.mailboxes.pins._pins.clear()  # type: ignore[union-attr]
                assert not pins[1].revoked(key, leaked.expires, leaked.public_key, time.time())
                assert await bob.pin_mailbox_pass() == revoked["replicas"]
                assert pins[1].revoked(key, leaked.expires, leaked.public_key, time.time())
                await alice.delivery.send("bob", "again")
                await wait_for(lambda: inbox_texts(bob) == ["hello", "again"])

                def renewed() -> bool:
                    held = alice.dht.mailbox_passes(BOB.public_key)
                    return held is not None and held.public_key != leaked.public_key

                await wait_for(renewed)
                new = alice.dht.mailbox_passes(BOB.public_key)
                assert new == issue_pass(BOB.public_key, BOB.sign, time.time(), epoch=1)
                assert not any(
                    p.revoked(key, new.expires, new.public_key, time.time())  # type: ignore[union-attr]
                    for p in pins
                )
