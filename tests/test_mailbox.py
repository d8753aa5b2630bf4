"""Offline mailboxes: only the owner reads or deletes; bounded; expiring; on k nodes."""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from mailbox_helpers import unseal

from p2pd.dht.mailbox import (
    MailboxLimits,
    MailboxStorage,
    delete_message,
    entry_id,
    fetch_message,
    mailbox_key,
)
from p2pd.dht.mailbox_entry import (
    BUCKETS,
    ENTRY_VERSION,
    HEADER_LEN,
    MAX_PLAINTEXT,
    MailboxEntryError,
    check,
    open_entry,
    pad,
    seal,
    stamp,
    unpad,
)
from p2pd.dht.routing import Node
from p2pd.identity import Identity
from p2pd.store import open_database
from p2pd.testing.adversary import FABRICATE_IP, Behaviour, open_coalition
from p2pd.testing.swarm import open_swarm

NOW = int(time.time())
BITS = 12  # postage in these tests (the default's cost: scripts/bench_postage.py)


def stamped(owner: Identity, plaintext: bytes, wall: float = NOW, bits: int = BITS) -> bytes:
    return stamp(mailbox_key(owner.public_key), seal(owner.public_key, plaintext), wall, bits)


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
    # An entry starts with its version byte: random bytes there would be a contact's put
    # (0x02) one time in 256, and refused as a bad pass.
    entries = [bytes([ENTRY_VERSION]) + os.urandom(99 + i) for i in range(7)]
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
            texts = [os.urandom(1500) for _ in range(5)]
            for text in texts:
                copies = await sender.dht.mailbox_put(owner.identity.public_key, text)
                assert copies >= 10  # k=20 > 12 nodes: every node holds one
            got = await owner.dht.mailbox_fetch(owner.identity)
            assert sorted(open_entry(unseal(owner.identity), e) for _, e in got) == sorted(texts)
            assert all(entry_id(e) == i and len(e) == 2048 for i, e in got)
            assert await stranger.dht.mailbox_fetch(stranger.identity) == []
            deleted = await owner.dht.mailbox_delete(owner.identity, [i for i, _ in got[:2]])
            assert deleted >= 2 * 10
            left = await owner.dht.mailbox_fetch(owner.identity)
            assert sorted(e for _, e in left) == sorted(e for _, e in got[2:])


# ---------------------------------------------------------------------- entry format


def test_entries_come_in_a_few_sizes_and_open_to_what_was_put() -> None:
    bob = Identity.generate("bob")
    sizes = {}
    for n in (0, 1, 50, 284, 449, 450, 961, 962, MAX_PLAINTEXT):
        text = os.urandom(n)
        entry = stamped(bob, text)
        sizes[n] = len(entry)
        assert open_entry(unseal(bob), entry) == text
    # a storing node learns the bucket, not the length
    assert set(sizes.values()) == set(BUCKETS)
    # an ack (50 bytes) and a short message (284) look the same
    assert sizes[0] == sizes[50] == sizes[284] == sizes[449] == 512
    assert sizes[450] == 1024 and sizes[962] == sizes[MAX_PLAINTEXT] == 2048
    with pytest.raises(MailboxEntryError):
        seal(bob.public_key, bytes(MAX_PLAINTEXT + 1))
    # someone else's entry does not open
    with pytest.raises(MailboxEntryError):
        open_entry(unseal(Identity.generate("eve")), stamped(bob, b"hi"))


def test_padding_lengths_are_bounded() -> None:
    padded = pad(b"hello")
    assert unpad(padded) == b"hello"
    with pytest.raises(MailboxEntryError):  # a length past the end
        unpad(b"\xff\xff" + padded[2:])
    with pytest.raises(MailboxEntryError):  # junk in the padding
        unpad(padded[:-1] + b"\x01")
    with pytest.raises(MailboxEntryError):
        unpad(b"\x00")


# ---------------------------------------------------------------------- postage


def postage_store() -> MailboxStorage:
    store = MailboxStorage(open_database(None), clock=Clock())
    store.postage_bits = BITS
    return store


def test_a_put_without_or_with_wrong_postage_is_refused_and_counted() -> None:
    store = postage_store()
    bob, carol = Identity.generate("bob"), Identity.generate("carol")
    key = mailbox_key(bob.public_key)
    honest = stamped(bob, b"hello bob")
    # no postage: the right size and version, a nonce that was never searched for
    # no postage: the right size and version, a nonce nobody searched for (the first
    # that does not happen to meet the target by luck)
    unpaid = next(
        e
        for e in (honest[:5] + os.urandom(8) + honest[13:] for _ in range(100))
        if check(key, e, NOW, BITS) == "postage"
    )
    assert not store.put(key, unpaid)
    assert not store.put(mailbox_key(carol.public_key), honest)  # postage for another box
    assert not store.put(key, honest[:-1] + bytes([honest[-1] ^ 1]))  # for other bytes
    assert not store.put(key, stamped(bob, b"old", wall=NOW - 3600))  # an old window
    assert not store.put(key, os.urandom(300))  # no bucket size
    assert store.refused == {"postage": 3, "stale-postage": 1, "size": 1}
    assert store.count() == 0
    assert store.put(key, honest)  # the honest put is held
    assert [
        e
        for _, e in store.fetch(
            bob.public_key, NOW, b"", bob.sign(fetch_message(bob.public_key, NOW, b""))
        )[0]
    ] == [honest]  # type: ignore[index]


def test_postage_below_the_nodes_price_is_refused() -> None:
    store = postage_store()
    bob = Identity.generate("bob")
    key = mailbox_key(bob.public_key)
    cheap = [stamped(bob, f"junk {i}".encode(), bits=2) for i in range(64)]
    held = sum(store.put(key, e) for e in cheap)
    # 2 bits of work meet 12 bits only by luck (one time in 1,024)
    assert held <= 2 and store.refused["postage"] == 64 - held


# ---------------------------------------------------------------------- confirmed puts


@pytest.mark.slow
async def test_black_hole_replicas_lose_no_mailbox_entry() -> None:
    """Hostile nodes next to bob's mailbox key say "stored" and keep nothing. While the
    honest replicas refuse (bob's mailbox full), the black holes' word alone does not
    count as a put: the sender hears 0 (and retries later); once the honest replicas
    take it, bob reads it."""
    with trio.fail_after(90):
        async with open_swarm(12) as swarm:
            sender, owner = swarm.nodes[1], swarm.nodes[7]
            bob = owner.identity
            async with open_coalition(
                swarm,
                4,
                Behaviour.BLACKHOLE,
                ip=FABRICATE_IP,  # many ids of one network
                near=mailbox_key(bob.public_key),
                bits=6,
                seed=4,
            ) as coalition:
                honest = [n for n in swarm.nodes if n is not sender]
                full = MailboxLimits(per_mailbox_count=0)
                for node in [*honest, sender]:
                    assert node.dht.core.mailboxes is not None
                    node.dht.core.mailboxes.limits = full
                assert await sender.dht.mailbox_put(bob.public_key, b"first try") == 0
                assert coalition.lies_told("mailbox_put") >= 1  # they were among the closest
                assert sender.dht.statistics()["counters"]["mailbox_put_unconfirmed"] == 1
                assert await owner.dht.mailbox_fetch(bob) == []  # nothing held: 0 was true
                for node in [*honest, sender]:
                    assert node.dht.core.mailboxes is not None
                    node.dht.core.mailboxes.limits = MailboxLimits()
                lies = coalition.lies_told("mailbox_put")
                copies = await sender.dht.mailbox_put(bob.public_key, b"second try")
                assert copies >= 10 and coalition.lies_told("mailbox_put") > lies
                got = await owner.dht.mailbox_fetch(bob)
                assert [open_entry(unseal(bob), e) for _, e in got] == [b"second try"]
                assert all(m.dht.core.mailboxes.count() == 0 for m in coalition.members)  # type: ignore[union-attr]


@pytest.mark.slow
async def test_a_node_refuses_and_counts_a_put_without_postage() -> None:
    """Over the wire: junk of the right size without postage, and an entry stamped for
    another mailbox, are answered ``false`` and counted; the honest put is taken."""
    with trio.fail_after(60):
        async with open_swarm(3) as swarm:
            sender, owner, node = swarm.nodes
            bob = owner.identity
            key = mailbox_key(bob.public_key)
            target = Node(node.dht.node_id, node.address.host, node.address.port)
            honest = stamped(bob, b"hello", bits=node.dht.core.config.postage_bits)
            unpaid = next(  # the first nonce that does not meet the target by luck
                e
                for e in (honest[:5] + os.urandom(8) + honest[13:] for _ in range(100))
                if check(key, e, time.time(), node.dht.core.config.postage_bits) == "postage"
            )
            elsewhere = mailbox_key(sender.identity.public_key)
            replies = await sender.dht.gather(
                [
                    (target, "mailbox_put", [key, unpaid]),
                    (target, "mailbox_put", [elsewhere, honest]),
                    (target, "mailbox_put", [key, honest]),
                ]
            )
            assert replies == [False, False, True]
            counters = node.dht.statistics()["counters"]
            assert counters["mailbox_refused_postage"] == 2
            assert [e for k, _, e, _ in node.dht.core.mailboxes.rows()] == [honest]  # type: ignore[union-attr]


_BOB = Identity.generate("bob")


#: Garbage, and garbage of an entry's size with its version byte.
GARBAGE = st.one_of(
    st.binary(max_size=2100),
    st.sampled_from(BUCKETS)
    .flatmap(lambda n: st.binary(min_size=n - 1, max_size=n - 1))
    .map(lambda b: b"\x01" + b),
)


@given(GARBAGE)
def test_garbage_raises_only_the_declared_error(data: bytes) -> None:
    key = mailbox_key(_BOB.public_key)
    assert check(key, data, NOW, BITS) in (None, "size", "version", "stale-postage", "postage")
    for decoder in (unpad, lambda d: open_entry(unseal(_BOB), d)):
        with contextlib.suppress(MailboxEntryError):
            decoder(data)


@given(st.binary(max_size=MAX_PLAINTEXT))
def test_padding_round_trips(text: bytes) -> None:
    padded = pad(text)
    assert len(padded) + HEADER_LEN + 48 in BUCKETS and unpad(padded) == text
