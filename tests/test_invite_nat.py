"""An invite from behind a NAT (issue 13): bob sits behind an endpoint-dependent NAT
(``masquerade random``: no stranger gets in), so his own addresses in an invite serve only
his LAN. `p2pd invite` adds the relays bob is registered with: carol, a new daemon on the
internet that knows no bootstrap node and nothing but bob's invite, joins the DHT through
them, adds bob from the invite and messages him; bob answers (p2pd/testing/natnet.py)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pd.invite import Invite
from p2pd.testing.daemons import DaemonProcess, cli_json, run_cli, short_tempdir, wait_until
from p2pd.testing.natnet import CONFIG, PORT, send, start_network, status
from p2pd.testing.netns import Testbed

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture()
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-invnat-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_an_invite_from_behind_a_nat_lets_a_stranger_join_and_reach_its_owner(
    testbed: Testbed, root: Path
) -> None:
    start_network(testbed, root, "public", "symmetric", republish_min=1.0)
    relays = status(root, "bob")["relays_in_use"]
    assert relays, "bob registered with no relay"
    invite = cli_json(root / "bob", "invite")
    parsed = Invite.parse(invite["invite"])
    listed = {str(a) for a in parsed.addresses}
    assert set(relays) <= listed, (relays, listed)  # the relays, beside bob's own address

    # carol: on the internet, no bootstrap node but the invite
    host = testbed.host("carol", testbed.lans["inet"], address="198.18.30.11")
    assert run_cli(root / "carol", "init", "carol", "--no-passphrase").returncode == 0
    (root / "carol" / "config.toml").write_text(CONFIG)
    DaemonProcess(
        root / "carol",
        listen=f"0.0.0.0:{PORT}",
        bootstrap=[invite["invite"]],
        lan="off",
        wrapper=host.command([]),
    ).wait_ready()
    # joined through the relays alone: bob's own address (10.2.0.x) is not routable here
    assert wait_until(lambda: status(root, "carol")["routing_table_size"] >= 2, 60), status(
        root, "carol"
    )["routing_table_size"]
    added = run_cli(root / "carol", "contacts", "add", invite["invite"], "--json")
    assert added.returncode == 0, added.stderr
    tag = f"invite-nat-{time.time_ns():x}"
    first = send(root, "carol", "bob", f"{tag} hello", timeout=60)
    assert first["via"] in ("relay", "direct"), first  # not the mailbox: bob was reached
    reply = send(root, "bob", "carol", f"{tag} hi carol", timeout=60)
    assert reply["state"] == "delivered", reply
    lines = run_cli(root / "bob", "inbox", "--from", "carol", "--json").stdout.splitlines()
    assert [m["text"] for m in map(json.loads, lines)] == [f"{tag} hello"]
