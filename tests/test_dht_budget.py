"""The DHT's budgets (p2pd/dht/budget.py), on the sans-I/O core driven by hand as in
tests/test_dht_core.py: request rates per source address and /24, storage quotas per
source, and no reply to an unvalidated source larger than its request."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_dht_core import WALL, CoreNet, node_key, small_network

from p2pd import wire
from p2pd.config import DHTConfig, load_config
from p2pd.dht.budget import (
    REQUEST_PAD,
    UNVALIDATED_SIGN_BURST,
    UNVALIDATED_SIGN_RATE,
    RequestBudget,
    SourceQuota,
    TokenBuckets,
    fit_reply,
)
from p2pd.dht.core import DHTCore
from p2pd.dht.mailbox import MailboxStorage, delete_message, fetch_message, mailbox_key
from p2pd.dht.nodekey import NodeKey
from p2pd.dht.routing import Node
from p2pd.dht.storage import RecordStorage
from p2pd.errors import UsageError
from p2pd.identity import Identity
from p2pd.records import HandleRecord
from p2pd.testing.flood import junk_entry

CONFIG = DHTConfig()
NOW = 100.0


def lone_core(config: DHTConfig = CONFIG, *, clock: Any = lambda: WALL) -> DHTCore:
    """A core with no contacts (so among the k closest to every key), with mailboxes."""
    return DHTCore(
        node_key(1),
        config,
        RecordStorage(None, clock=clock),
        MailboxStorage(None, clock=clock),
        NOW,
        randbytes=random.Random(1).randbytes,
    )


def request(
    method: str,
    args: list[Any],
    *,
    sender: NodeKey | None = None,
    prove: bool = False,
    pad: int = 0,
) -> bytes:
    key = (sender or node_key(50)).public_key
    return wire.encode_request(os.urandom(20), method, [key, *args], prove, pad)


def replies(core: DHTCore) -> list[tuple[bytes, tuple[str, int]]]:
    return [(d, a) for d, a in core.datagrams_to_send() if d[0] == wire.FRAME_RESPONSE]


def big_record(name: str = "alice") -> HandleRecord:
    """A record as large as a daemon's can be: 8 addresses, a prekey bundle's worth of
    extension."""
    addresses = [wire.Address(f"2001:db8::{i}", 4000 + i) for i in range(8)]
    return HandleRecord.create(
        Identity.generate(name),
        addresses,
        seq=1,
        now=int(WALL),
        lifetime=3600,
        extension=os.urandom(1382),
    )


# ---------------------------------------------------------------------- request rates


def test_a_flooding_source_is_cut_off_while_another_is_served() -> None:
    core = lone_core()
    flood = request("find_node", [os.urandom(20)], pad=1200)
    for _ in range(5000):
        core.datagram_received(flood, ("203.0.113.7", 4000), NOW)
    served = len(replies(core))
    burst = int(CONFIG.request_burst)
    assert served == burst
    assert core.statistics()["counters"]["rate_limited_find_node"] == 5000 - burst
    # another source (another /24) is served at once; the flooder's other kinds too (each
    # kind has its own bucket), and its find_node again once its bucket refilled
    core.datagram_received(flood, ("198.51.100.9", 4000), NOW)
    core.datagram_received(request("ping", [], pad=160), ("203.0.113.7", 4000), NOW)
    assert len(replies(core)) == 2
    for _ in range(60):  # a second later: 50 more tokens
        core.datagram_received(flood, ("203.0.113.7", 4000), NOW + 1.0)
    assert len(replies(core)) == int(CONFIG.request_rate)


def test_neighbours_in_a_slash_24_share_its_budget() -> None:
    core = lone_core()
    ping = request("ping", [], pad=160)
    per_address = 100  # under the per-address burst (200)
    for host in range(1, 21):  # 20 addresses of one /24: 2,000 pings
        for _ in range(per_address):
            core.datagram_received(ping, (f"203.0.113.{host}", 4000), NOW)
    subnet_burst = int(CONFIG.request_burst * CONFIG.subnet_rate_factor)
    assert len(replies(core)) == subnet_burst
    assert core.stats["requests_in"] == subnet_burst
    core.datagram_received(ping, ("203.0.114.1", 4000), NOW)  # the next /24
    assert len(replies(core)) == 1
    # IPv6: a /48 is one subnet, the next /48 another
    for i in range(subnet_burst + 10):
        core.datagram_received(ping, (f"2001:db8:1:{i:x}::1", 4000), NOW)
    assert len(replies(core)) == subnet_burst
    core.datagram_received(ping, ("2001:db8:2::1", 4000), NOW)
    assert len(replies(core)) == 1


def test_the_budget_tables_stay_bounded_under_100k_spoofed_sources() -> None:
    core = lone_core()
    ping = request("ping", [], pad=160)
    rng = random.Random(7)
    for _ in range(100_000):
        host = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        core.datagram_received(ping, (host, rng.randrange(1024, 65536)), NOW)
    budget = core.budget
    assert len(budget.by_address) == CONFIG.rate_table_max
    assert len(budget.by_subnet) == CONFIG.rate_table_max
    assert len(core.table) == 0 and len(core.proofs) == 0  # spoofed pings add no one
    # a fresh bucket per source, but all of them share the unvalidated budget
    assert len(replies(core)) == CONFIG.unvalidated_burst
    assert budget.dropped["unvalidated_limited_ping"] == 100_000 - CONFIG.unvalidated_burst


def test_a_many_source_flood_draws_few_signatures_and_validated_contacts_get_theirs() -> None:
    """The many-sources phase of scripts/bench_flood.py: pings asking for a signed reply
    from 5,000 sources. Each answer costs an Ed25519 signature; all such sources together
    get UNVALIDATED_SIGN_BURST of them (then UNVALIDATED_SIGN_RATE a second), not the
    whole unvalidated budget; a validated contact's signed request is still answered."""
    net, cores = small_network(3)
    victim, friend = cores[0], cores[1]
    signed_before = victim.stats["proofs_signed"]
    ping = request("ping", [], prove=True, pad=160)
    for i in range(5000):
        victim.datagram_received(ping, (f"10.{i // 256}.{i % 256}.1", 4000), net.now)
    answered = len(replies(victim))
    assert answered == UNVALIDATED_SIGN_BURST < CONFIG.unvalidated_burst
    assert victim.stats["proofs_signed"] - signed_before == UNVALIDATED_SIGN_BURST
    dropped = victim.budget.dropped
    assert dropped["unvalidated_limited_signature"] == CONFIG.unvalidated_burst - answered
    assert dropped["unvalidated_limited_ping"] == 5000 - CONFIG.unvalidated_burst
    # a second later, the rate: (the unvalidated budget refills faster)
    for i in range(5000):
        victim.datagram_received(ping, (f"10.99.{i % 256}.{1 + i // 256}", 4000), net.now + 1.0)
    assert len(replies(victim)) == UNVALIDATED_SIGN_RATE
    found: list[Any] = []
    friend.start_lookup(os.urandom(20), net.now, found.append)  # signed replies asked
    net.run_until(lambda: bool(found))
    assert victim.node_id in {n.id for n in found[0].closest}


def test_a_many_source_flood_leaves_validated_contacts_served() -> None:
    net, cores = small_network(3)
    victim, friend = cores[0], cores[1]
    assert victim.proofs.is_verified(friend.node_id, net.address_of(friend), net.now)
    flood = request("find_node", [os.urandom(20)], pad=1200)
    for i in range(5000):
        victim.datagram_received(flood, (f"10.{i // 256}.{i % 256}.1", 4000), net.now)
    assert victim.budget.dropped["unvalidated_limited_find_node"] == 5000 - 2000
    victim.datagrams_to_send()
    found: list[Any] = []
    friend.start_lookup(os.urandom(20), net.now, found.append)
    net.run_until(lambda: bool(found))
    assert victim.node_id in {n.id for n in found[0].closest}


def test_the_method_is_read_before_decoding_and_junk_shares_one_bucket() -> None:
    budget = RequestBudget(CONFIG)
    junk = b"\x93\xa3zzz"  # no such method: bucketed as "other"
    allowed = sum(budget.allow(junk, ("192.0.2.1", 1), NOW) for _ in range(500))
    assert allowed == CONFIG.request_burst
    assert budget.dropped["rate_limited_other"] == 500 - allowed
    buckets = TokenBuckets(rate=10.0, burst=5.0, max_entries=2)
    assert [buckets.take("a", 1, 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert buckets.take("a", 1, 0.1)  # refilled one token
    assert not buckets.take("a", 1, 0.05)  # a clock that steps back gives nothing
    buckets.take("b", 1, 0.0)
    buckets.take("c", 1, 0.0)
    assert len(buckets) == 2  # "a", the least recently used, was forgotten


# ---------------------------------------------------------------------- storage quotas


def store_from(core: DHTCore, record: HandleRecord, host: str, now: float = NOW) -> bool:
    core.datagram_received(
        request("store", [record.key, record.encode()], pad=160), (host, 4000), now
    )
    ((data, _),) = replies(core)
    raw, _, _ = wire.split_response(wire.split_frame(data)[2])
    return wire.decode_response("store", raw) is True


def small_record(name: str) -> HandleRecord:
    return HandleRecord.create(
        Identity.generate(name),
        [wire.Address("192.0.2.9", 4747)],
        seq=1,
        now=int(WALL),
        lifetime=60,
    )


def test_records_are_refused_past_a_source_quota_and_its_subnet_quota() -> None:
    config = replace(CONFIG, records_per_address=3, records_per_subnet=5)
    core = lone_core(config)
    records = [small_record(f"fill{i}") for i in range(10)]
    assert [store_from(core, r, "203.0.113.5") for r in records[:4]] == [True] * 3 + [False]
    # a copy of a record already held is no new record: not charged
    assert store_from(core, records[0], "203.0.113.5")
    # a neighbour in the /24 has the rest of the subnet's quota
    assert [store_from(core, r, "203.0.113.6") for r in records[4:7]] == [True] * 2 + [False]
    counters = core.statistics()["counters"]
    assert counters["record_refused_quota"] == 2
    # an honest record from elsewhere is still accepted
    honest = small_record("honest")
    assert store_from(core, honest, "198.51.100.1")
    assert core.storage.get(honest.key) is not None
    assert len(core.storage) == 6


def test_a_record_that_expires_gives_its_source_room_again() -> None:
    config = replace(CONFIG, records_per_address=2)
    wall = [WALL]
    core = lone_core(config, clock=lambda: wall[0])
    first = [small_record(f"old{i}") for i in range(2)]
    assert all(store_from(core, r, "203.0.113.5") for r in first)
    assert not store_from(core, small_record("third"), "203.0.113.5")
    assert core.budget.records.held("203.0.113.5") == 2
    wall[0] += 400 * 24 * 3600  # past every claim's end
    core.storage.cull()
    assert core.budget.records.held("203.0.113.5") == 0
    fresh = HandleRecord.create(
        Identity.generate("fresh"),
        [wire.Address("192.0.2.9", 4747)],
        seq=1,
        now=int(wall[0]),
        lifetime=60,
    )
    assert store_from(core, fresh, "203.0.113.5")


def put_from(core: DHTCore, key: bytes, host: str) -> bool:
    entry = junk_entry(random.Random(), key, core.config.postage_bits)  # with postage
    core.datagram_received(
        request("mailbox_put", [key, entry], sender=NodeKey.generate(), pad=160), (host, 4000), NOW
    )
    ((data, _),) = replies(core)
    raw, _, _ = wire.split_response(wire.split_frame(data)[2])
    return wire.decode_response("mailbox_put", raw) is True


def test_mailbox_puts_are_refused_past_a_source_quota_and_freed_by_a_delete() -> None:
    config = replace(CONFIG, mailbox_per_address=4, mailbox_per_subnet=6)
    core = lone_core(config)
    victim = Identity.generate("victim")
    key = mailbox_key(victim.public_key)
    junk = [put_from(core, os.urandom(20), "203.0.113.5") for _ in range(6)]
    assert junk == [True] * 4 + [False] * 2
    assert [put_from(core, key, "203.0.113.77") for _ in range(3)] == [True, True, False]
    assert core.statistics()["counters"]["mailbox_refused_quota"] == 3
    # an honest sender elsewhere still reaches the victim's mailbox
    assert put_from(core, key, "198.51.100.1")
    assert core.statistics()["mailbox_entries_held"] == 7
    # the owner deletes what it read: its senders may put again
    assert core.mailboxes is not None
    ts = int(WALL)
    page = core.mailboxes.fetch(
        victim.public_key, ts, b"", victim.sign(fetch_message(victim.public_key, ts, b""))
    )
    assert page is not None
    ids = tuple(i for i, _ in page[0])
    signature = victim.sign(delete_message(victim.public_key, ts, ids))
    assert core.mailboxes.delete(victim.public_key, ts, ids, signature) == len(ids)
    assert put_from(core, key, "203.0.113.77")


def test_a_mailbox_put_for_a_key_this_node_is_far_from_is_refused() -> None:
    core = lone_core()
    far = bytes([core.node_id[0] ^ 0x80]) + core.node_id[1:]  # the other half of the space
    added = 0
    for i in range(100, 400):
        other = node_key(i)
        if (other.node_id[0] ^ core.node_id[0]) & 0x80 and added < CONFIG.ksize:
            node = Node(other.node_id, f"198.18.{i % 256}.1", 4000, other.public_key)
            core.table.add(node, NOW)
            added += 1
    assert added == CONFIG.ksize and not core.is_close_to(far)
    assert not put_from(core, far, "203.0.113.5")
    assert core.stats["store_refused_far"] == 1
    assert core.statistics()["mailbox_entries_held"] == 0


def test_source_quota_counts_run_and_release() -> None:
    quota = SourceQuota(per_address=2, per_subnet=3)
    quota.charge(b"a", "192.0.2.1")
    quota.charge(b"a", "192.0.2.1")  # the same item: charged once
    quota.charge(b"b", "192.0.2.1")
    assert not quota.admits("192.0.2.1") and quota.admits("192.0.2.2")
    quota.charge(b"c", "192.0.2.2")
    assert not quota.admits("192.0.2.3")  # the /24 is full
    quota.release(b"a")
    quota.release(b"never charged")
    assert quota.admits("192.0.2.1") and len(quota) == 2


# ---------------------------------------------------------------------- amplification


def full_core() -> tuple[CoreNet, DHTCore, Identity]:
    """A core with a full view (many contacts), a large record and a full mailbox page."""
    net, cores = small_network(30)
    core = cores[0]
    record = big_record()
    assert core.storage.offer(record.key, record.encode()) == "accept"
    owner = Identity.generate("owner")
    core.mailboxes = MailboxStorage(None, clock=net.wall)
    core.mailboxes.quota = core.budget.mailbox
    for _ in range(3):
        # The version byte first: a random first byte was a contact's put (0x02, with a
        # pass) 1 time in 256, refused (1.2 % of runs with three)
        entry = b"\x01" + os.urandom(wire.MAX_MAILBOX_ENTRY - 1)
        assert core.mailboxes.put(mailbox_key(owner.public_key), entry)
    core.datagrams_to_send()
    return net, core, owner


def every_request(core: DHTCore, owner: Identity, wall: float) -> dict[str, list[Any]]:
    record_key = next(iter(core.storage))[0]
    ts = int(wall)
    fetch = owner.sign(fetch_message(owner.public_key, ts, b""))
    contacts = [
        wire.Contact(n.key, wire.Address(n.ip, n.port)) for n in core.table if n.key is not None
    ]
    put = junk_entry(random.Random(1), bytes(20))
    return {
        "ping": [],
        "find_node": [core.node_id],
        "find_value": [record_key],
        "store": [record_key, core.storage.get(record_key)],
        "mailbox_put": [mailbox_key(owner.public_key), os.urandom(100)],
        "mailbox_fetch": [owner.public_key, ts, b"", fetch],
        "mailbox_delete": [owner.public_key, ts, [bytes(16)], os.urandom(64)],
        "proof": [bytes(16), os.urandom(64)],
        "dialback": [os.urandom(wire.NONCE_LEN), bytes(wire.DIALBACK_PAD)],
        "dialed": [os.urandom(wire.NONCE_LEN)],
        # a put relayed to another node (p2pd/dht/mailbox_relay.py): what goes on to it
        # is no larger than the request either
        "mailbox_relay": [*wire.encode_contacts([next(iter(contacts))])[0], bytes(20), put],
        # a lookup run for the asker (p2pd/dht/mailbox_find.py): refused unless the request
        # is as large as each datagram of the lookup and its answer
        "mailbox_find": [bytes(20)],
        "mailbox_revoke": [owner.public_key, ts, ts + 600, bytes(32), os.urandom(64)],
    }


def test_no_reply_to_an_unvalidated_source_is_larger_than_its_request() -> None:
    net, core, owner = full_core()
    attacker = NodeKey.generate()
    answered: dict[str, int] = {}
    for method, args in every_request(core, owner, net.wall()).items():
        for prove in (False, True):
            for pad in (0, 100, 160, 600, 1200, 2900):
                frame = request(method, args, sender=attacker, prove=prove, pad=pad)
                core.datagram_received(frame, ("203.0.113.66", 4000), net.now)
                for data, _ in core.datagrams_to_send():
                    assert len(data) <= len(frame), (method, prove, pad, len(data), len(frame))
                    answered[method] = answered.get(method, 0) + 1
            net.now += 10.0  # (refill the buckets)
    # every kind but proof and dialed (never answered) was answered when its reply fitted
    assert set(answered) == set(wire.DHT_METHODS) - {"proof", "dialed"}
    assert core.budget.dropped["reply_too_large_ping"] > 0


def test_a_padded_request_gets_the_whole_reply_and_a_proof_lifts_the_limit() -> None:
    net, core, _ = full_core()
    asker = NodeKey.generate()
    address = ("203.0.113.66", 4000)
    full = core._neighbors(core.node_id, exclude=asker.node_id)
    assert len(full) >= CONFIG.ksize  # up to wire.MAX_CONTACTS

    def find_node(pad: int) -> tuple[tuple[wire.Contact, ...], bytes | None, int, int]:
        frame = request("find_node", [core.node_id], sender=asker, pad=pad)
        core.datagram_received(frame, address, net.now)
        ((data, _),) = replies(core)
        raw, _, cookie = wire.split_response(wire.split_frame(data)[2])
        contacts = wire.decode_response("find_node", raw)
        assert isinstance(contacts, tuple)
        return contacts, cookie, len(data), len(frame)

    contacts, cookie, out, size = find_node(0)  # unpadded: cut to its size, with a cookie
    assert cookie is not None and len(contacts) < 3 and out <= size
    contacts, cookie, out, size = find_node(REQUEST_PAD["find_node"])
    assert cookie is not None and len(contacts) >= CONFIG.ksize and out <= size
    signature = asker.sign(wire.proof_message(core.node_key.public_key, cookie))
    proof = wire.encode_request(os.urandom(20), "proof", [asker.public_key, cookie, signature])
    core.datagram_received(proof, address, net.now)
    contacts, cookie, out, size = find_node(0)  # validated: the whole reply, no cookie
    assert cookie is None and len(contacts) == len(full) and out > size


def test_fit_reply_keeps_a_value_before_contacts_and_pages_on() -> None:
    contacts = [[os.urandom(32), "192.0.2.1", 4000 + i] for i in range(20)]
    value = {"value": os.urandom(1500), "seen": 1, "nodes": contacts}
    cut, fits = fit_reply("find_value", value, 1900, signed=True, cookie=True)
    assert fits and cut["value"] == value["value"] and len(cut["nodes"]) < 20
    cut, fits = fit_reply("find_value", value, 1000, signed=True, cookie=True)
    assert fits and "value" not in cut and 10 <= len(cut["nodes"]) < 20
    page = {"entries": [[bytes(16), os.urandom(2048)] for _ in range(3)], "more": False}
    cut, fits = fit_reply("mailbox_fetch", page, 2300, signed=True, cookie=True)
    assert fits and len(cut["entries"]) == 1 and cut["more"] is True
    assert fit_reply("ping", os.urandom(32), 100, signed=True, cookie=True)[1] is False


def test_a_new_node_joins_and_resolves_through_padded_requests() -> None:
    """An honest newcomer pads, is answered in full, proves its address from the cookie,
    and its later requests go unpadded: every reply any core sent was at most as large
    as its request unless the asker was validated."""
    net, cores = small_network(12)
    record = big_record("bob")
    box: list[int] = []
    cores[3].start_store(record.key, record.encode(), net.now, box.append)
    net.run_until(lambda: bool(box))
    assert box[0] >= 5
    newcomer = net.add(99)
    joined: list[int] = []
    newcomer.start_bootstrap([net.address_of(cores[0])], net.now, joined.append)
    net.run_until(lambda: bool(joined))
    assert joined[0] >= 8
    found: list[Any] = []
    newcomer.start_lookup(record.key, net.now, found.append, find_value=True)
    net.run_until(lambda: bool(found))
    assert record.encode() in [v for _, v in found[0].values]
    for core in cores:
        assert not any(k.startswith("reply_too_large") for k in core.budget.dropped)
        assert not any(k.startswith("rate_limited") for k in core.budget.dropped)


def test_a_request_over_budget_is_dropped_before_it_is_decoded() -> None:
    core = lone_core()
    garbage = wire.encode_request(os.urandom(20), "ping", [b"short"])  # a bad sender key
    for _ in range(1000):
        core.datagram_received(garbage, ("203.0.113.7", 4000), NOW)
    counters = core.statistics()["counters"]
    # decoded (and found malformed) only while within budget
    assert counters["malformed"] == CONFIG.request_burst
    assert counters["rate_limited_ping"] == 1000 - CONFIG.request_burst
    assert core.datagrams_to_send() == []


def test_the_budgets_are_dht_settings_of_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        "[dht]\nrequest_rate = 10\nrequest_burst = 40\nrecords_per_address = 5\n"
        "mailbox_per_subnet = 64\nunvalidated_rate = 300\nrate_table_max = 100\n"
    )
    config = load_config(tmp_path).dht
    assert (config.request_rate, config.request_burst) == (10.0, 40.0)
    assert (config.records_per_address, config.mailbox_per_subnet) == (5, 64)
    budget = RequestBudget(config)
    assert budget.by_address.max_entries == 100 and budget.unvalidated.rate == 300.0
    (tmp_path / "config.toml").write_text("[dht]\nrequest_burst = 0\n")
    with pytest.raises(UsageError, match="request_burst"):
        load_config(tmp_path)
