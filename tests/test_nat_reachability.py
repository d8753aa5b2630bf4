"""Real daemons in the NAT cells of the testbed (public, EIM, EDM, and a double NAT
behind a CGNAT; issue 13, items 1-2): each learns from its DHT peers where the world sees
it, what kind of NAT it is behind, and whether a stranger can reach it; ``p2pd status``
says so; a NATed daemon stays out of the public daemons' routing tables (DHT client
mode) and still publishes and resolves."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pd.store import db_path
from p2pd.testing.daemons import (
    DaemonProcess,
    cli_json,
    control_call,
    run_cli,
    short_tempdir,
    wait_until,
)
from p2pd.testing.natnet import start_daemons
from p2pd.testing.netns import Host, Testbed

pytestmark = [pytest.mark.netns, pytest.mark.slow]
PORT = 4747
#: Probes start a second after the daemon is up and take 5 s; a round waits for helpers.
SETTLE = 60.0


@pytest.fixture()
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-nat-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def status(home: Path) -> dict[str, Any]:
    result: dict[str, Any] = control_call(home, "status")  # polled: no CLI process
    return result


def test_daemons_learn_their_nat_and_reachability(testbed: Testbed, root: Path) -> None:
    inet = testbed.lan("inet", "198.18.0.0/16")
    hosts: dict[str, Host] = {
        f"pub{i}": testbed.host(f"pub{i}", inet, address=f"198.18.{i}.11") for i in (1, 2, 3, 4)
    }
    eim = testbed.nat_router("r-eim", inet, inside_subnet="10.1.0.0/24", address="198.18.10.1")
    edm = testbed.nat_router(
        "r-edm", inet, inside_subnet="10.2.0.0/24", kind="symmetric", address="198.18.11.1"
    )
    cgnat = testbed.nat_router("cgnat", inet, inside_subnet="100.64.0.0/24", address="198.18.12.1")
    home = testbed.nat_router("home", cgnat.inside, inside_subnet="10.3.0.0/24")
    hosts["alice"] = testbed.host("alice", eim.inside)
    hosts["bob"] = testbed.host("bob", edm.inside)
    hosts["carol"] = testbed.host("carol", home.inside)  # a double NAT
    daemons: dict[str, DaemonProcess] = {}
    try:
        # The test claims the verdicts, not how soon they come: a dial-back round waits
        # 2 s for nonces, not 5 s (every helper here answers within milliseconds; the
        # NATed daemons' "unreachable" came 6.2 s after all were up, 3 s with this), and
        # republish_min is 1 s, not 10 s (alice's record is republished with her mapped
        # address once she learnt it, checked below)
        config = "[node]\nrepublish_min = 1.0\n[dht]\ndialback_wait = 2.0\n"
        daemons = start_daemons(root, hosts, configs={n: config for n in hosts})

        def settled() -> bool:
            return all(status(root / n)["reachability"] != "unknown" for n in daemons)

        assert wait_until(settled, SETTLE, interval=0.25), {
            n: status(root / n)["reachability"] for n in daemons
        }
        for i in (1, 2, 3, 4):
            s = status(root / f"pub{i}")
            assert (s["nat_mapping"], s["reachability"], s["dht_mode"]) == (
                "none",
                "reachable",
                "server",
            )
            assert s["reflexive_addresses"][0]["address"] == f"198.18.{i}.11:{PORT}"
        a = status(root / "alice")
        assert (a["nat_mapping"], a["reachability"], a["dht_mode"]) == (
            "endpoint-independent",
            "unreachable",
            "client",
        )
        # the router keeps the port (measured in tests/test_nat_cells.py)
        assert a["public_address"] == f"{eim.address}:{PORT}"
        assert a["reflexive_addresses"][0]["observers"] >= 2
        c = status(root / "carol")  # both NATs keep the port: one mapping, the CGNAT's
        assert (c["nat_mapping"], c["reachability"], c["dht_mode"]) == (
            "endpoint-independent",
            "unreachable",
            "client",
        )
        assert c["public_address"] == f"{cgnat.address}:{PORT}"
        b = status(root / "bob")
        assert (b["nat_mapping"], b["reachability"], b["dht_mode"]) == (
            "endpoint-dependent",
            "unreachable",
            "client",
        )
        assert b["public_address"] is None
        assert {r["address"].split(":")[0] for r in b["reflexive_addresses"]} == {str(edm.address)}

        # client mode: no public daemon holds alice or bob as a DHT contact (each holds
        # the three other public daemons)...
        for i in (1, 2, 3, 4):
            assert status(root / f"pub{i}")["routing_table_size"] == 3
        # ...and they still publish and resolve
        assert cli_json(root / "alice", "whois", "pub4")["handle"] == "pub4"
        # alice's record leads with her mapped address (republished once it was learnt)
        mapped = f"{eim.address}:{PORT}"

        def alice_published() -> bool:  # (pub2's whois, through its control socket)
            found = control_call(root / "pub2", "whois", {"handle": "alice"})
            return bool(found["addresses"][:1] == [mapped])

        assert wait_until(alice_published, 30.0, interval=0.5), cli_json(
            root / "pub2", "whois", "alice"
        )
        assert str(hosts["alice"].address) in str(cli_json(root / "pub2", "whois", "alice"))
        # bob's NAT gives each peer another port: nothing to publish but his own address
        assert cli_json(root / "pub2", "whois", "bob")["addresses"] == [
            f"{hosts['bob'].address}:{PORT}"
        ]
        assert cli_json(root / "bob", "whois", "alice")["handle"] == "alice"
        rendered = run_cli(root / "alice", "status").stdout
        assert "unreachable (behind an endpoint-independent NAT); DHT client mode" in rendered
        # (what they saved on the way out says the same)
        assert daemons["pub1"].stop() == 0
        with sqlite3.connect(db_path(root / "pub1")) as conn:
            saved = {h for (h,) in conn.execute("SELECT host FROM dht_contacts")}
        assert saved == {f"198.18.{i}.11" for i in (2, 3, 4)}
    finally:
        for name, d in daemons.items():
            d.stop()
            print(f"----- {name} (exit {d.proc.returncode})\n{d.log[-3000:]}")
