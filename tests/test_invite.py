"""Invites (p2pd/invite.py, issue 13 item 7's first step): the one-line codec, hostile
input, the config and CLI entries that take one, and a daemon that joins a network
through nothing but another's invite."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.address_hints import AddressHints, decode_hint, encode_hint, hints_first, is_hint
from p2pd.config import load_config
from p2pd.errors import KeyChanged, NotFound, UsageError
from p2pd.identity import HandleRef, Identity
from p2pd.invite import MAX_INVITE, InvalidInvite, Invite, add_contact, bootstrap_addresses
from p2pd.messaging import Contacts
from p2pd.records import HandleRecord
from p2pd.store import open_database
from p2pd.testing.daemons import DaemonProcess, cli_json, run_cli, short_tempdir
from p2pd.wire import Address

BOB = Identity.generate("bob")
ADDRS = (Address("198.18.10.1", 4747), Address("2001:db8::7", 4747), Address("10.1.0.11", 4747))


def test_round_trip() -> None:
    invite = Invite("bob", BOB.fingerprint, ADDRS)
    text = str(invite)
    assert text == (
        f"p2pd-invite:bob#{BOB.fingerprint}@198.18.10.1:4747,[2001:db8::7]:4747,10.1.0.11:4747"
    )
    assert Invite.parse(text) == invite
    assert Invite.parse(f"  {text.replace(BOB.fingerprint, BOB.fingerprint.upper())}\n") == invite
    assert invite.ref.matches(BOB.public_key)
    assert not invite.ref.matches(Identity.generate("bob").public_key)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "bob@1.2.3.4:5",
        "p2pd-invite:bob@198.18.0.1:4747",  # no fingerprint
        f"p2pd-invite:bob#{BOB.fingerprint[:16]}@198.18.0.1:4747",  # only a prefix
        f"p2pd-invite:Bob#{BOB.fingerprint}@198.18.0.1:4747",  # not a handle
        f"p2pd-invite:bob#{BOB.fingerprint}",  # no address
        f"p2pd-invite:bob#{BOB.fingerprint}@",
        f"p2pd-invite:bob#{BOB.fingerprint}@example.org:4747",  # hostnames never
        f"p2pd-invite:bob#{BOB.fingerprint}@198.18.0.1",  # no port
        f"p2pd-invite:bob#{BOB.fingerprint}@198.18.0.1:0",
        f"p2pd-invite:bob#{BOB.fingerprint}@0.0.0.0:4747",
        f"p2pd-invite:bob#{BOB.fingerprint}@" + ",".join(["198.18.0.1:1"] * 9),
        f"p2pd-invite:bob#{BOB.fingerprint}@198.18.0.1:4747" + "," * MAX_INVITE,
    ],
    # ids without the random fingerprint: pytest-xdist's workers must collect the same ids
    ids=lambda text: text.replace(BOB.fingerprint, "FP").replace(BOB.fingerprint[:16], "FP16"),
)
def test_bad_invites_are_refused_with_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        Invite.parse(text)


@given(st.text(max_size=600))
def test_garbage_raises_only_usage_error(text: str) -> None:
    try:
        invite = Invite.parse("p2pd-invite:" + text)
    except UsageError:
        return
    assert Invite.parse(str(invite)) == invite  # what parses, prints back the same


def test_bootstrap_entries_take_invites(tmp_path: Path) -> None:
    invite = str(Invite("bob", BOB.fingerprint, ADDRS[:2]))
    assert bootstrap_addresses(invite) == list(ADDRS[:2])
    assert bootstrap_addresses("198.18.0.9:4747") == [Address("198.18.0.9", 4747)]
    (tmp_path / "config.toml").write_text(f'[node]\nbootstrap = ["198.18.0.9:4747", "{invite}"]\n')
    assert load_config(tmp_path).bootstrap == (Address("198.18.0.9", 4747), *ADDRS[:2])
    (tmp_path / "config.toml").write_text('[node]\nbootstrap = ["p2pd-invite:nonsense"]\n')
    with pytest.raises(InvalidInvite):
        load_config(tmp_path)


# --------------------------------------------------------------- contacts add, in-process


def _record(identity: Identity) -> HandleRecord:
    now = int(time.time())
    return HandleRecord.create(identity, [ADDRS[0]], seq=1, now=now, lifetime=3600)


class FakeDHT:
    """A lookup that finds ``records`` only once ``bootstrap`` was called (a daemon that
    knows nobody but the invite), recording what it was asked."""

    def __init__(self, *records: HandleRecord, joined: bool = False) -> None:
        self.records = records
        self.joined = joined
        self.bootstrapped: list[list[Address]] = []
        self.lookups: list[HandleRef] = []

    async def resolve(self, ref: HandleRef) -> HandleRecord:
        self.lookups.append(ref)
        for record in self.records if self.joined else ():
            if record.handle == ref.handle and ref.matches(record.public_key):
                return record
        raise NotFound("no record")

    async def bootstrap(self, addresses: list[Address]) -> int:
        self.bootstrapped.append(addresses)
        self.joined = True
        return 1


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = open_database(tmp_path / "p2pd.db")
    yield conn
    conn.close()


async def test_contacts_add_pins_the_invites_key_through_its_addresses(
    db: sqlite3.Connection,
) -> None:
    contacts, hints = Contacts(db), AddressHints(db)
    dht = FakeDHT(_record(BOB))
    invite = Invite("bob", BOB.fingerprint, ADDRS[:2])
    kw = {"contacts": contacts, "hints": hints, "resolve": dht.resolve, "bootstrap": dht.bootstrap}
    contact, added = await add_contact(invite, **kw)  # type: ignore[arg-type]
    assert added and contact.public_key == BOB.public_key
    assert dht.bootstrapped == [list(ADDRS[:2])]  # not found alone: joined via the invite
    assert dht.lookups[-1] == invite.ref  # looked up under the whole fingerprint
    assert hints.get(BOB.public_key) == list(ADDRS[:2])
    # Idempotent: the same invite again changes nothing but the hints' freshness.
    again, added = await add_contact(invite, **kw)  # type: ignore[arg-type]
    assert not added and again.public_key == BOB.public_key
    moved = Invite("bob", BOB.fingerprint, ADDRS[2:])
    await add_contact(moved, **kw)  # type: ignore[arg-type]
    assert hints.get(BOB.public_key) == list(ADDRS[2:])
    assert [c.handle for c in contacts.all()] == ["bob"]


async def test_contacts_add_never_repins_and_refuses_a_key_the_invite_does_not_name(
    db: sqlite3.Connection,
) -> None:
    contacts, hints = Contacts(db), AddressHints(db)
    mallory = Identity.generate("bob")  # another key claiming "bob"
    # The DHT answers with mallory's record whatever is asked: the fingerprint check holds.
    dht = FakeDHT(_record(mallory), joined=True)
    dht.resolve = lambda ref: _mallory(mallory)  # type: ignore[method-assign,assignment,return-value]
    invite = Invite("bob", BOB.fingerprint, ADDRS[:1])
    kw = {"contacts": contacts, "hints": hints, "resolve": dht.resolve, "bootstrap": dht.bootstrap}
    with pytest.raises(NotFound):
        await add_contact(invite, **kw)  # type: ignore[arg-type]
    assert contacts.get("bob") is None and hints.get(mallory.public_key) == []
    # bob pinned to mallory's key (first use): bob's real invite is refused, pin unchanged.
    contacts.pin("bob", mallory.public_key, time.time())
    with pytest.raises(KeyChanged, match="accept-new"):
        await add_contact(invite, **kw)  # type: ignore[arg-type]
    pinned = contacts.get("bob")
    assert pinned is not None and pinned.public_key == mallory.public_key
    assert hints.get(BOB.public_key) == []


async def _mallory(mallory: Identity) -> HandleRecord:
    return _record(mallory)


def test_address_hint_codec() -> None:
    text = encode_hint(list(ADDRS))
    assert is_hint(text) and decode_hint(text) == list(ADDRS)
    assert not is_hint('{"type": "offer", "call": "00"}') and not is_hint("[[[")
    for bad in (
        '{"type": "addresses", "addresses": []}',
        '{"type": "addresses", "addresses": ["1.2.3.4:5"], "x": 1}',
        '{"type": "addresses", "addresses": ["example.org:5"]}',
        '{"type": "addresses", "addresses": ["0.0.0.0:5"]}',
        '{"type": "addresses", "addresses": [5]}',
        encode_hint([Address("198.18.0.1", p) for p in range(1, 10)]),
        '{"type": "addresses", "addresses": ["' + "1" * 2000 + '"]}',
    ):
        with pytest.raises(ValueError):
            decode_hint(bad)


@given(st.text(max_size=1200))
def test_hint_garbage_raises_only_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        decode_hint(text)


def test_a_newer_record_with_addresses_supersedes_hints() -> None:
    """An invite's addresses go stale when bob moves; his record, republished since,
    is tried first then (each stale hint would cost a connect timeout). A record with
    no address (presence privacy) never supersedes them."""
    now = time.time()
    moved = HandleRecord.create(BOB, [ADDRS[1]], seq=2, now=int(now) + 5, lifetime=3600)
    older = HandleRecord.create(BOB, [ADDRS[1]], seq=1, now=int(now) - 60, lifetime=3600)
    hidden = HandleRecord.create(BOB, [], seq=3, now=int(now) + 5, lifetime=3600)
    hinted = [ADDRS[0]]
    assert hints_first(hinted, now, None) == hinted
    assert hints_first(hinted, now, older) == hinted
    assert hints_first(hinted, now, moved) == []
    assert hints_first(hinted, now, hidden) == hinted


def test_hints_only_from_pinned_keys(tmp_path: Path) -> None:
    conn = open_database(tmp_path / "p2pd.db")
    try:
        hints = AddressHints(conn)
        text = encode_hint([Address("198.18.0.7", 4747)])
        assert not hints.received(BOB.public_key, False, text, time.time())
        assert not hints.received(BOB.public_key, True, "{}", time.time())
        assert hints.get(BOB.public_key) == []
        assert hints.stats["hints_refused"] == 2
        assert hints.received(BOB.public_key, True, text, time.time())
        assert hints.get(BOB.public_key) == [Address("198.18.0.7", 4747)]
    finally:
        conn.close()


@pytest.fixture()
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-inv-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_a_daemon_joins_through_an_invite_alone(root: Path) -> None:
    """No bootstrap node, no LAN: carol starts from bob's invite and finds bob (under
    exactly his key) and alice, who joined through bob the same way."""
    daemons = []
    try:
        for name in ("bob", "alice", "carol"):
            assert run_cli(root / name, "init", name, "--no-passphrase").returncode == 0
        bob = DaemonProcess(root / "bob", lan="off").wait_ready()
        daemons.append(bob)
        line = run_cli(root / "bob", "invite").stdout.strip()
        invite = Invite.parse(line)
        assert invite.fingerprint == bob.fingerprint and invite.handle == "bob"
        assert [str(a) for a in invite.addresses] == [bob.listen]
        assert cli_json(root / "bob", "invite")["invite"] == line
        for name in ("alice", "carol"):
            daemons.append(DaemonProcess(root / name, bootstrap=[line], lan="off").wait_ready())
        found = cli_json(root / "carol", "whois", str(invite.ref))
        assert found["fingerprint"] == bob.fingerprint
        assert cli_json(root / "carol", "whois", "alice")["handle"] == "alice"
        bad = run_cli(root / "carol", "daemon", "--bootstrap", "p2pd-invite:bob@1.2.3.4:5")
        assert bad.returncode == 2 and "invite" in bad.stderr
    finally:
        for d in daemons:
            d.stop()


@pytest.mark.slow
def test_contacts_add_from_an_invite_alone(root: Path) -> None:
    """carol's daemon knows nobody; `contacts add` with bob's invite joins through it,
    pins bob's key, keeps his address; again: no change; a bad invite or a handle
    pinned to another key: clear errors, nothing re-pinned. `invite --qr` draws it."""
    daemons = []
    try:
        for name in ("bob", "carol"):
            assert run_cli(root / name, "init", name, "--no-passphrase").returncode == 0
        bob = DaemonProcess(root / "bob", lan="off").wait_ready()
        daemons.append(bob)
        carol = DaemonProcess(root / "carol", lan="off").wait_ready()
        daemons.append(carol)
        line = cli_json(root / "bob", "invite")["invite"]
        drawn = run_cli(root / "bob", "invite", "--qr")
        assert drawn.returncode == 0 and drawn.stdout.strip().endswith(line)
        assert "\u2588" in drawn.stdout or "\u2580" in drawn.stdout  # block characters
        added = cli_json(root / "carol", "contacts", "add", line)
        assert added["added"] is True and added["fingerprint"] == bob.fingerprint
        assert added["address_hints"] == [bob.listen]
        again = run_cli(root / "carol", "contacts", "add", line)
        assert again.returncode == 0 and "already a contact" in again.stdout
        rows = cli_json(root / "carol", "contacts")
        assert [(r["handle"], r["fingerprint"]) for r in rows] == [("bob", bob.fingerprint)]
        assert rows[0]["address_hints"] == [bob.listen]
        other = Invite("bob", Identity.generate("bob").fingerprint, (Address.parse(bob.listen),))
        clash = run_cli(root / "carol", "contacts", "add", str(other))
        assert clash.returncode == 1 and "pinned to another key" in clash.stderr
        assert cli_json(root / "carol", "contacts")[0]["fingerprint"] == bob.fingerprint
        bad = run_cli(root / "carol", "contacts", "add", "p2pd-invite:bob@1.2.3.4:5")
        assert bad.returncode == 2 and "invite" in bad.stderr
        sent = cli_json(root / "carol", "send", "bob", "hello bob", "--wait")
        assert sent["state"] == "delivered"
    finally:
        for d in daemons:
            d.stop()


@pytest.mark.slow
def test_a_daemon_rejoins_through_its_saved_contacts(root: Path) -> None:
    """carol joined through bob once; restarted with no bootstrap at all (no LAN) while
    bob, her only bootstrap, is gone, she is back in the DHT through another routing
    contact she saved (alice), and finds her. (tests/test_cli_e2e.py has the plain
    restart, with the bootstrap node still up.)"""
    daemons: list[DaemonProcess] = []
    try:
        for name in ("bob", "alice", "carol"):
            assert run_cli(root / name, "init", name, "--no-passphrase").returncode == 0
        bob = DaemonProcess(root / "bob", lan="off").wait_ready()
        daemons.append(bob)
        line = cli_json(root / "bob", "invite")["invite"]
        alice = DaemonProcess(root / "alice", bootstrap=[line], lan="off").wait_ready()
        daemons.append(alice)
        carol = DaemonProcess(root / "carol", bootstrap=[line], lan="off").wait_ready()
        listen = carol.listen
        assert carol.stop() == 0  # saves its routing contacts on the way out
        assert daemons.pop(0).stop() == 0  # bob: the invite's address answers no more
        carol = DaemonProcess(root / "carol", listen=listen, lan="off").wait_ready()
        daemons.append(carol)
        status = cli_json(root / "carol", "status")
        assert status["routing_table_size"] >= 1
        assert cli_json(root / "carol", "whois", "alice")["fingerprint"] == alice.fingerprint
    finally:
        for d in daemons:
            d.stop()
