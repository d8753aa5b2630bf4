"""Real daemons in the testbed's NAT cells: three public daemons (bootstrap nodes and
relays) and two peers, alice and bob, each in a cell of its own (issue 13). Used by
tests/test_upgrade_netns.py, tests/test_nat_move_netns.py and scripts/bench_nat.py;
``peer_host`` also by the hole-punching test and benchmark (p2pd/testing/punch_peer.py),
``start_daemons`` (the public daemons first) by the other NAT-cell tests.

Cells: ``public`` (on the simulated internet), ``eim`` (endpoint-independent NAT),
``symmetric`` and ``fully-random`` (a new random port per destination), ``double`` (a
home NAT behind a carrier-grade NAT), ``ipv6`` (a home router with an endpoint-dependent
IPv4 NAT that routes a global IPv6 /64 through an outbound-only firewall,
p2pd/testing/netns6.py; with it in a network, every host gets IPv6 and every daemon
listens dual stack on ``[::]``), ``mapped`` (``symmetric`` whose router runs miniupnpd:
NAT-PMP and PCP port mapping, p2pd/testing/miniupnpd.py). Every wait is bounded.
"""

from __future__ import annotations

import functools
import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import P2PDError
from .daemons import DaemonProcess, control_call, run_cli, wait_until
from .miniupnpd import start_miniupnpd
from .netns import Host, NatRouter, Testbed
from .netns6 import Ipv6Overlay

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
    "ipv6": "endpoint-dependent",  # its IPv4 NAT's
    "mapped": "endpoint-dependent",  # what observers see; the mapping is another port
}
CONFIG = '[calls]\naudio_in = "tone:440"\naudio_out = "none"\nfrom = "everyone"\n'


def peer_host(testbed: Testbed, kind: str, n: int) -> Host:
    """A host in a cell of ``kind`` on the testbed's internet ("inet"); for ``mapped``,
    with miniupnpd running in its router."""
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
        kind="symmetric" if kind in ("ipv6", "mapped") else kind,  # type: ignore[arg-type]
        address=f"198.18.{10 + n}.1",
        port_mapping=kind == "mapped",
    )
    if kind == "mapped":
        start_miniupnpd(router)
    return testbed.host(f"c{n}", router.inside)


def start_network(
    testbed: Testbed,
    root: Path,
    kind_a: str,
    kind_b: str,
    *,
    settle: float = SETTLE,
    peer_config: str = "",
    republish_min: float | None = None,
) -> dict[str, DaemonProcess]:
    """Three public daemons, alice in ``kind_a``, bob in ``kind_b``; returns once each
    peer knows its mapping kind and, when NATed, its record lists two relays.
    ``peer_config`` is added to alice's and bob's config.toml (whole sections, but no
    ``[node]``: ``republish_min`` sets theirs). A NATed peer's first record lists no
    relay (it publishes at start, before it registers), and the one that does waits for
    ``republish_min`` (10 s by default) since: a test that claims nothing about how soon
    a changed record is republished (a recovery that a republish could speed up) sets
    it to 1 s and settles some 9 s sooner."""
    inet = testbed.lan("inet", "198.18.0.0/16")
    hosts: dict[str, Host] = {
        f"pub{i}": testbed.host(f"pub{i}", inet, address=ip) for i, ip in enumerate(PUBLIC, 1)
    }
    hosts["alice"] = peer_host(testbed, kind_a, 1)
    hosts["bob"] = peer_host(testbed, kind_b, 2)
    listen = f"0.0.0.0:{PORT}"
    if "ipv6" in (kind_a, kind_b):
        v6 = Ipv6Overlay(testbed)
        v6.lan(inet, "2001:db8::/64")  # every host and router on the internet
        for n, kind in ((1, kind_a), (2, kind_b)):
            if kind == "ipv6":  # the others' inside LANs stay IPv4 only
                v6.firewall(routers_of(testbed, n)[0], f"2001:db8:{n}::/64")
        v6.settle()
        listen = f"[::]:{PORT}"
    peers = peer_config
    if republish_min is not None:
        peers += f"[node]\nrepublish_min = {republish_min}\n"
    configs = {n: CONFIG + (peers if n in ("alice", "bob") else "") for n in hosts}
    daemons = start_daemons(root, hosts, configs=configs, listen=listen)

    def settled(name: str, kind: str) -> bool:
        own = status(root, name)
        if own["nat_mapping"] != MAPPING[kind]:
            return False
        mapped = own["port_mapping"].get("mapped_address")
        mapping_on = kind == "mapped" and "port_mapping = false" not in peer_config
        if mapping_on and (mapped is None or own["addresses"][:1] != [mapped]):
            return False  # published with the mapped address first
        if kind == "public":
            return True
        # Behind any of these NATs strangers get in only through relays (Linux filters
        # by address and port even where it maps independently of the endpoint).
        try:
            seen = control_call(root / "pub1", "whois", {"handle": name})
        except P2PDError:  # not found yet: a lookup may miss a record just published
            return False
        return seen.get("status") != "contested" and len(seen.get("relays", [])) >= 2

    for name, kind in (("alice", kind_a), ("bob", kind_b)):
        # every 0.25 s (control-socket calls, no CLI process), not 1 s: a settled
        # network was seen half a second late on average, twice per test
        if not wait_until(functools.partial(settled, name, kind), settle, interval=0.25):
            raise TimeoutError(f"{name} ({kind}) did not settle: {status(root, name)}")
    return daemons


def start_daemons(
    root: Path,
    hosts: dict[str, Host],
    *,
    configs: Mapping[str, str] | None = None,
    listen: str = f"0.0.0.0:{PORT}",
    extra: Sequence[str] = ("-v",),
) -> dict[str, DaemonProcess]:
    """``p2pd init`` and a daemon in each of ``hosts`` (name -> host), ``configs[name]``
    its config.toml, each bootstrapped from the public daemons (:data:`PUBLIC`, its own
    address left out); returns them ready, in the order of ``hosts``.

    The public daemons start together, then the others together. A daemon is ready once
    its join ended, which waits out every seed that does not answer (no daemon listens
    there yet, and nothing tells the sender so): one after another, pub1 and pub2 waited
    2.7-3.4 s each for the seeds started after them; together those waits overlap. The
    others start once every seed is up: a join that found no seed would try again only
    15 s later (p2pd/maintenance.py REJOIN_INTERVAL)."""
    seeds = [f"{ip}:{PORT}" for ip in PUBLIC]
    public = [n for n, h in hosts.items() if str(h.address) in PUBLIC]
    started: dict[str, DaemonProcess] = {}
    try:
        for group in (public, [n for n in hosts if n not in public]):
            for name in group:
                if run_cli(root / name, "init", name, "--no-passphrase").returncode != 0:
                    raise RuntimeError(f"p2pd init {name} failed")
                if configs is not None:
                    (root / name / "config.toml").write_text(configs[name])
                started[name] = DaemonProcess(
                    root / name,
                    listen=listen,
                    bootstrap=[s for s in seeds if not s.startswith(f"{hosts[name].address}:")],
                    lan="off",
                    wrapper=hosts[name].command([]),
                    extra=extra,
                )
            for name in group:
                started[name].wait_ready()
    except BaseException:
        for daemon in started.values():
            daemon.stop()
        raise
    return {name: started[name] for name in hosts}


def status(root: Path, name: str) -> dict[str, Any]:
    """What ``p2pd status --json`` prints for ``name`` (polled: no CLI process)."""
    return dict(control_call(root / name, "status"))


def send(root: Path, sender: str, to: str, text: str, timeout: float = 30.0) -> dict[str, Any]:
    """``p2pd send --wait --json``: the message's summary; raises if not delivered,
    saying after how long: a handle "never seen" at once is a lookup that asked no one
    or heard no record, after 10 s one that timed out (p2pd/delivery/service.py
    RESOLVE_TIMEOUT gives both the same words)."""
    started = time.monotonic()
    out = run_cli(root / sender, "send", to, text, "--wait", "--timeout", str(timeout), "--json")
    if out.returncode != 0:
        took = time.monotonic() - started
        raise RuntimeError(f"send {sender} -> {to} failed after {took:.1f} s: {out.stderr.strip()}")
    message: dict[str, Any] = json.loads(out.stdout)
    return message


def routers_of(testbed: Testbed, n: int) -> list[NatRouter]:
    """The NAT routers in front of peer ``n`` (:func:`peer_host`'s numbering), nearest
    first: none for a public host, the home router then the CGNAT for a double NAT."""
    names = (f"r{n}", f"h{n}", f"cg{n}")
    return [r for name in names if isinstance(r := testbed.hosts.get(name), NatRouter)]


def relay_counter(root: Path, name: str) -> int:
    """A counter summed over the three public daemons' relays (``p2pd status``)."""
    total = 0
    for i in range(1, len(PUBLIC) + 1):
        counters = status(root, f"pub{i}")["relay"]["relaying"]["counters"]
        total += int(counters.get(name, 0))
    return total


def flush_then_send(
    testbed: Testbed, root: Path, *, sender: str = "alice", to: str = "bob", timeout: float = 40.0
) -> dict[str, Any]:
    """Issue 13, item 5: every NAT router in front of ``to`` forgets its mappings at once
    (its conntrack table flushed, as a reboot would), and ``sender`` at once sends ``to``
    a message. Returns the seconds from the flush to ``delivered`` (``recovered_s``), the
    path, the conntrack entries each router held before and after the flush, and
    ``moved``: how many registrations the relays saw move to a new address afterwards
    (a new mapped port; 0 where the NAT gave the same port back), read once delivered."""
    routers = routers_of(testbed, 2 if to == "bob" else 1)
    if not routers:
        raise ValueError(f"{to} is behind no NAT")
    moved_before = relay_counter(root, "registrations_moved")
    flushed_at = time.monotonic()
    counts = [router.flush_conntrack() for router in routers]
    sent = _send_timed(root, sender, to, "after a flush", timeout, flushed_at)
    return {
        **sent,
        "conntrack": counts,
        "moved": relay_counter(root, "registrations_moved") - moved_before,
    }


def _send_timed(
    root: Path, sender: str, to: str, what: str, timeout: float, started: float
) -> dict[str, Any]:
    """``sender`` sends ``to`` a message and waits for it: delivered or not, the seconds
    since ``started``, the path, and the CLI's error if it failed."""
    try:
        out = run_cli(
            root / sender, "send", to, f"{what} {time.time_ns():x}", "--wait",
            "--timeout", str(timeout), "--json", timeout=timeout + 30.0,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        out = subprocess.CompletedProcess([], 1, "", "the send command did not end")
    took = time.monotonic() - started
    message: dict[str, Any] = json.loads(out.stdout) if out.returncode == 0 else {}
    return {
        "delivered": message.get("state") == "delivered",
        "recovered_s": took,
        "via": message.get("via"),
        "error": out.stderr.strip()[-300:] if out.returncode else None,
    }


def move_then_send(
    testbed: Testbed, root: Path, *, sender: str = "alice", to: str = "bob", timeout: float = 40.0
) -> dict[str, Any]:
    """Issue 13, item 5, a laptop that changes network: the NAT router in front of ``to``
    moves to another outside address (:meth:`NatRouter.move`: a new public IP, every
    mapping forgotten), and ``sender`` at once sends ``to`` a message. Returns the
    seconds from the move to ``delivered`` (``recovered_s``), the path, the new address,
    and how many registrations the relays saw move (read once delivered)."""
    routers = routers_of(testbed, 2 if to == "bob" else 1)
    if not routers:
        raise ValueError(f"{to} is behind no NAT")
    moved_before = relay_counter(root, "registrations_moved")
    started = time.monotonic()
    new = routers[-1].move()  # the outermost router: the one the world sees
    sent = _send_timed(root, sender, to, "after a move", timeout, started)
    return {
        **sent,
        "new_address": str(new),
        "moved": relay_counter(root, "registrations_moved") - moved_before,
    }
