"""Invites (p2pd/invite.py, issue 13 item 7's first step): the one-line codec, hostile
input, the config and CLI entries that take one, and a daemon that joins a network
through nothing but another's invite."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.config import load_config
from p2pd.errors import UsageError
from p2pd.identity import Identity
from p2pd.invite import MAX_INVITE, InvalidInvite, Invite, bootstrap_addresses
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
