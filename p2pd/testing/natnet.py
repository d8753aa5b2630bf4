"""Real daemons in the testbed's NAT cells: three public daemons (bootstrap nodes and
relays) and two peers, alice and bob, each in a cell of its own (issue 13). Used by
tests/test_upgrade_netns.py and scripts/bench_nat.py; ``peer_host`` also by the
hole-punching test and benchmark (p2pd/testing/punch_peer.py).

Cells: ``public`` (on the simulated internet), ``eim`` (endpoint-independent NAT),
``symmetric`` and ``fully-random`` (a new random port per destination), ``double`` (a
home NAT behind a carrier-grade NAT). Every wait is bounded.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from .daemons import DaemonProcess, cli_json, run_cli, wait_until
from .netns import Host, Testbed

PORT = 4747
#: Reachability needs a dial-back round, then a registration and a republish.
SETTLE = 90.0
PUBLIC = [f"198.18.{i}.11" for i in (1, 2, 3)]
#: The mapping kind `p2pd status` should come to in each cell.
MAPPING = {
    "public": "none",
    "eim": "endpoint-independent",
    "double": "endpoint-independent",
    "symmetric": "endpoint-dependent",
    "fully-random": "endpoint-dependent",
}
CONFIG = '[calls]\naudio_in = "tone:440"\naudio_out = "none"\nfrom = "everyone"\n'


def peer_host(testbed: Testbed, kind: str, n: int) -> Host:
    """A host in a cell of ``kind`` on the testbed's internet ("inet")."""
    inet = testbed.lans["inet"]
    if kind == "public":
        return testbed.host(f"p{n}", inet, address=f"198.18.{20 + n}.11")
    if kind == "double":
        cgnat = testbed.nat_router(f"cg{n}", inet, inside_subnet=f"100.64.{n}.0/24")
        home = testbed.nat_router(f"h{n}", cgnat.inside, inside_subnet=f"10.{n}.0.0/24")
        return testbed.host(f"c{n}", home.inside)
    router = testbed.nat_router(
        f"r{n}",
        inet,
        inside_subnet=f"10.{n}.0.0/24",
        kind=kind,  # type: ignore[arg-type]
        address=f"198.18.{10 + n}.1",
    )
    return testbed.host(f"c{n}", router.inside)


def start_network(
    testbed: Testbed, root: Path, kind_a: str, kind_b: str, *, settle: float = SETTLE
) -> dict[str, DaemonProcess]:
    """Three public daemons, alice in ``kind_a``, bob in ``kind_b``; returns once each
    peer knows its mapping kind and, when NATed, its record lists two relays."""
    inet = testbed.lan("inet", "198.18.0.0/16")
    hosts: dict[str, Host] = {
        f"pub{i}": testbed.host(f"pub{i}", inet, address=ip) for i, ip in enumerate(PUBLIC, 1)
    }
    hosts["alice"] = peer_host(testbed, kind_a, 1)
    hosts["bob"] = peer_host(testbed, kind_b, 2)
    seeds = [f"{ip}:{PORT}" for ip in PUBLIC]
    daemons = {}
    for name, host in hosts.items():
        if run_cli(root / name, "init", name, "--no-passphrase").returncode != 0:
            raise RuntimeError(f"p2pd init {name} failed")
        (root / name / "config.toml").write_text(CONFIG)
        daemons[name] = DaemonProcess(
            root / name,
            listen=f"0.0.0.0:{PORT}",
            bootstrap=[s for s in seeds if not s.startswith(f"{host.address}:")],
            lan="off",
            wrapper=host.command([]),
            extra=["-v"],
        ).wait_ready()

    def settled(name: str, kind: str) -> bool:
        own = status(root, name)
        if own["nat_mapping"] != MAPPING[kind]:
            return False
        if kind == "public":
            return True
        # Behind any of these NATs strangers get in only through relays (Linux filters
        # by address and port even where it maps independently of the endpoint).
        seen = cli_json(root / "pub1", "whois", name)
        return len(seen.get("relays", [])) >= 2

    for name, kind in (("alice", kind_a), ("bob", kind_b)):
        if not wait_until(functools.partial(settled, name, kind), settle, interval=1.0):
            raise TimeoutError(f"{name} ({kind}) did not settle: {status(root, name)}")
    return daemons


def status(root: Path, name: str) -> dict[str, Any]:
    return dict(cli_json(root / name, "status"))


def send(root: Path, sender: str, to: str, text: str, timeout: float = 30.0) -> dict[str, Any]:
    """``p2pd send --wait --json``: the message's summary; raises if not delivered."""
    out = run_cli(root / sender, "send", to, text, "--wait", "--timeout", str(timeout), "--json")
    if out.returncode != 0:
        raise RuntimeError(f"send {sender} -> {to} failed: {out.stderr.strip()}")
    message: dict[str, Any] = json.loads(out.stdout)
    return message
