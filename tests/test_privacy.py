"""Presence privacy (issue 13, item 8): with ``[privacy] addresses = "contacts"`` the
public record lists no direct address (a stranger's whois shows none, and no DHT node
stores one), while pinned contacts still reach the daemon directly, through the
addresses its invite or the daemon itself (inside the session) told them."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from p2pd.address_hints import encode_hint
from p2pd.config import LanConfig, NodeConfig, load_config
from p2pd.daemon import open_node
from p2pd.errors import UsageError
from p2pd.identity import Identity
from p2pd.records import HandleRecord
from p2pd.testing.daemons import DaemonProcess, cli_json, run_cli, short_tempdir, wait_until
from p2pd.wire import Address


def test_privacy_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    assert not load_config(tmp_path).hides_addresses  # default: everyone
    config.write_text('[privacy]\naddresses = "contacts"\n')
    assert load_config(tmp_path).hides_addresses
    config.write_text('[lan]\nmode = "contacts"\n')  # --lan contacts implies it...
    assert load_config(tmp_path).hides_addresses
    config.write_text('[lan]\nmode = "contacts"\n[privacy]\naddresses = "everyone"\n')
    assert not load_config(tmp_path).hides_addresses  # ...unless said otherwise
    for bad in ('addresses = "nobody"', "addresses = 1", 'who = "contacts"', 'addresses = ""'):
        config.write_text(f"[privacy]\n{bad}\n")
        with pytest.raises(UsageError, match="privacy"):
            load_config(tmp_path)


@pytest.fixture()
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-prv-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _stored_claims(home: Path, handle: str) -> list[HandleRecord]:
    """The records for ``handle`` a stopped daemon's DHT storage holds: the bytes that
    came over the wire in STOREs."""
    conn = sqlite3.connect(home / "p2pd.db")
    try:
        rows = conn.execute("SELECT record FROM dht_claims").fetchall()
    finally:
        conn.close()
    records = [HandleRecord.decode(bytes(r[0])) for r in rows]
    return [r for r in records if r.handle == handle]


@pytest.mark.slow
def test_contacts_only_presence(root: Path) -> None:
    """alice publishes to nobody where she is. carol (a stranger) sees no address; dave
    adds her invite and delivers directly; erin pins her from the DHT alone (no address)
    and learns her addresses when alice writes to her, inside the session, then
    delivers directly too. Every DHT node's stored record of alice holds no address."""
    names = ("bob", "alice", "carol", "dave", "erin")
    daemons: dict[str, DaemonProcess] = {}
    try:
        for name in names:
            assert run_cli(root / name, "init", name, "--no-passphrase").returncode == 0
        (root / "alice" / "config.toml").write_text('[privacy]\naddresses = "contacts"\n')
        daemons["bob"] = DaemonProcess(root / "bob").wait_ready()
        seed = [daemons["bob"].listen]
        for name in names[1:]:
            daemons[name] = DaemonProcess(root / name, bootstrap=seed).wait_ready()
        alice = daemons["alice"]

        status = cli_json(root / "alice", "status")
        assert status["privacy_addresses"] == "contacts"
        assert status["addresses"] == [] and status["direct_addresses"] == [alice.listen]

        # A stranger: the handle, its key and its prekeys, but no address.
        found = cli_json(root / "carol", "whois", "alice")
        assert found["fingerprint"] == alice.fingerprint
        assert found["addresses"] == []
        peers = cli_json(root / "carol", "peers")
        assert all(p["addresses"] == [] for p in peers if p["handle"] == "alice")

        # A contact through her invite (which does hold her addresses).
        invite = cli_json(root / "alice", "invite")["invite"]
        assert alice.listen in invite
        assert cli_json(root / "dave", "contacts", "add", invite)["added"] is True
        sent = cli_json(root / "dave", "send", "alice", "hi alice", "--wait")
        assert sent["state"] == "delivered" and sent["via"] == "direct"
        (root / "note.txt").write_bytes(b"for alice only\n" * 1000)
        got = run_cli(root / "dave", "send-file", "alice", str(root / "note.txt"), "--wait",
                      "--timeout", "30")  # fmt: skip
        assert got.returncode == 0, got.stderr

        # A contact who pinned her from the DHT alone learns her addresses in-session.
        assert cli_json(root / "erin", "verify", "alice")["fingerprint"] == alice.fingerprint
        assert cli_json(root / "erin", "contacts")[0]["address_hints"] == []
        sent = cli_json(root / "alice", "send", "erin", "hi erin, I am here", "--wait")
        assert sent["state"] == "delivered"

        def erin_knows() -> bool:
            row = cli_json(root / "erin", "contacts")[0]
            return bool(row["address_hints"] == [alice.listen])

        assert wait_until(erin_knows, timeout=20)
        assert cli_json(root / "erin", "status")["hint_counters"]["hints_received"] >= 1
        sent = cli_json(root / "erin", "send", "alice", "now I can reach you", "--wait")
        assert sent["state"] == "delivered" and sent["via"] == "direct"
        # carol never got one: she is no contact of alice's.
        assert cli_json(root / "carol", "status")["hint_counters"]["hints_received"] == 0
        assert cli_json(root / "alice", "status")["hint_counters"]["hints_sent"] >= 1
    finally:
        for d in daemons.values():
            d.stop()
    # On the wire: whichever nodes store alice's record, it names no address.
    stored = [r for name in names for r in _stored_claims(root / name, "alice")]
    assert stored, "no DHT node stored alice's record"
    assert all(r.addresses == () for r in stored)
    assert all(r.fingerprint == alice.fingerprint for r in stored)


async def test_a_strangers_address_hint_is_refused(root: Path) -> None:
    """mallory, whom erin never pinned, sends erin an address hint (a real session
    signal over QUIC): erin keeps nothing and counts it; so with a malformed one from
    a contact. A contact's well-formed hint is kept."""
    erin_id, mallory_id = Identity.generate("erin"), Identity.generate("mallory")

    def config(name: str, bootstrap: tuple[Address, ...] = ()) -> NodeConfig:
        return NodeConfig(
            home=root / name, listen=Address("127.0.0.1", 0), bootstrap=bootstrap,
            lan=LanConfig(mode="off"), connect_timeout=1.0,
        )  # fmt: skip

    with trio.fail_after(60):
        async with open_node(config("erin"), erin_id) as erin:
            seed = (erin.listen_address,)
            async with open_node(config("mallory", seed), mallory_id) as mallory:
                await mallory.publish()
                victim = [Address("198.18.0.66", 4747)]
                await mallory.delivery.send_signal("erin", erin_id.public_key, encode_hint(victim))
                assert erin.hints.get(mallory_id.public_key) == []
                stats = erin.hints.stats
                assert stats == {"hints_received": 1, "hints_refused": 1, "hints_sent": 0}
                # Once erin has pinned mallory (a contact now), a malformed hint still
                # changes nothing; a good one is kept.
                erin.delivery.contacts.pin("mallory", mallory_id.public_key, 0.0)
                bad = '{"type": "addresses", "addresses": ["0.0.0.0:1"]}'
                await mallory.delivery.send_signal("erin", erin_id.public_key, bad)
                assert erin.hints.get(mallory_id.public_key) == []
                assert erin.hints.stats["hints_refused"] == 2
                await mallory.delivery.send_signal("erin", erin_id.public_key, encode_hint(victim))
                assert erin.hints.get(mallory_id.public_key) == victim
