"""Offline mailboxes: only the owner reads or deletes; bounded; expiring; on k nodes."""

from __future__ import annotations

import os
import time

import pytest
import trio

from p2pd.dht.mailbox import (
    MailboxLimits,
    MailboxStorage,
    delete_message,
    entry_id,
    fetch_message,
    mailbox_key,
)
from p2pd.identity import Identity
from p2pd.store import open_database
from p2pd.testing.swarm import open_swarm

NOW = int(time.time())


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


def fetch_all(store: MailboxStorage, who: Identity, ts: int = NOW) -> list[bytes] | None:
    out: list[bytes] = []
    after = b""
    for _ in range(100):
        page = store.fetch(
            who.public_key, ts, after, who.sign(fetch_message(who.public_key, ts, after))
        )
        if page is None:
            return None
        out += [e for _, e in page[0]]
        if not page[1]:
            return out
        after = page[0][-1][0]
    raise AssertionError("too many pages")


def test_only_the_owner_reads_and_deletes() -> None:
    store = MailboxStorage(open_database(None), clock=Clock())
    bob, eve = Identity.generate("bob"), Identity.generate("eve")
    entries = [os.urandom(100 + i) for i in range(7)]
    for e in entries:
        assert store.put(mailbox_key(bob.public_key), e)
    assert sorted(fetch_all(store, bob) or []) == sorted(entries)  # 7 entries: 3 pages
    # eve signs with her own key for bob's mailbox: the signature does not verify
    ts = NOW
    forged = eve.sign(fetch_message(bob.public_key, ts, b""))
    assert store.fetch(bob.public_key, ts, b"", forged) is None
    assert store.refused["bad-signature"] == 1
    # eve's own mailbox is empty
    assert fetch_all(store, eve) == []
    # a signature from long ago is refused (no replay of an old fetch or delete)
    assert fetch_all(store, bob, ts=NOW - 3600) is None
    ids = tuple(entry_id(e) for e in entries[:2])
    assert (
        store.delete(bob.public_key, ts, ids, eve.sign(delete_message(bob.public_key, ts, ids)))
        is None
    )
    assert (
        store.delete(bob.public_key, ts, ids, bob.sign(delete_message(bob.public_key, ts, ids)))
        == 2
    )
    assert len(fetch_all(store, bob) or []) == 5


def test_caps_and_expiry() -> None:
    clock = Clock()
    limits = MailboxLimits(ttl=60, per_mailbox_count=3, per_mailbox_bytes=2500, total_bytes=4000)
    store = MailboxStorage(open_database(None), limits, clock=clock)
    a, b = mailbox_key(b"a" * 32), mailbox_key(b"b" * 32)
    assert store.put(a, b"x" * 1000) and store.put(a, b"y" * 1000)
    assert not store.put(a, b"z" * 1000)  # bytes cap of the mailbox
    assert store.put(a, b"z" * 10)
    assert not store.put(a, b"w" * 10)  # count cap
    assert not store.put(b, b"v" * 2000)  # node total
    assert not store.put(b, b"")  # empty
    assert not store.put(b, b"q" * 2049)  # over the entry size
    assert store.refused == {"mailbox-full": 2, "node-full": 1, "size": 2}
    clock.now += 61
    assert store.put(b, b"v" * 2000)  # the expired entries made room
    assert store.count() == 1


@pytest.mark.slow
async def test_mailbox_across_the_dht() -> None:
    with trio.fail_after(60):
        async with open_swarm(12) as swarm:
            sender, owner, stranger = swarm.nodes[1], swarm.nodes[7], swarm.nodes[9]
            entries = [os.urandom(1500) for _ in range(5)]
            for entry in entries:
                copies = await sender.dht.mailbox_put(owner.identity.public_key, entry)
                assert copies >= 10  # k=20 > 12 nodes: every node holds one
            got = await owner.dht.mailbox_fetch(owner.identity)
            assert sorted(e for _, e in got) == sorted(entries)
            assert all(entry_id(e) == i for i, e in got)
            assert await stranger.dht.mailbox_fetch(stranger.identity) == []
            deleted = await owner.dht.mailbox_delete(owner.identity, [i for i, _ in got[:2]])
            assert deleted >= 2 * 10
            left = await owner.dht.mailbox_fetch(owner.identity)
            assert sorted(e for _, e in left) == sorted(e for _, e in got[2:])
