"""The network-namespace testbed (p2pd.testing.netns): hosts on a LAN reach each other by
unicast and by mDNS multicast, NAT routers behave as their kind says (measured, not
assumed), and the testbed leaves nothing behind, in the root namespace or after a crash.

The programs that run inside the hosts are small Python scripts (no ping or socat
needed); every one of them ends by itself within its own deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from p2pd.testing.netns import (
    CommandFailed,
    Host,
    NatKind,
    Testbed,
    TestbedError,
    cleanup_stale,
    list_namespaces,
    read_line,
)

pytestmark = pytest.mark.netns

#: Upper bound for a helper script's life; each also has its own, shorter deadlines.
LIFETIME = 15.0
READY = 5.0

# A UDP echo server: on each port, answers every datagram with where it came from, as
# the server saw it (the NAT's mapping, behind a NAT).
ECHO = r"""
import json, select, socket, sys, time
ports, lifetime = [int(p) for p in sys.argv[1].split(",")], float(sys.argv[2])
socks = []
for port in ports:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    socks.append(s)
print("ready", flush=True)
deadline = time.monotonic() + lifetime
while (left := deadline - time.monotonic()) > 0:
    for s in select.select(socks, [], [], left)[0]:
        data, src = s.recvfrom(2048)
        s.sendto(json.dumps({"seen": f"{src[0]}:{src[1]}"}).encode(), src)
"""

# From one local port, probes each destination (retrying) and prints, per destination,
# the source address that destination saw, or null.
PROBE = r"""
import json, socket, sys, time
sport, dests = int(sys.argv[1]), sys.argv[2:]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport))
s.settimeout(0.2)
seen = {}
for dest in dests:
    host, port = dest.rsplit(":", 1)
    seen[dest] = None
    for attempt in range(15):
        s.sendto(b"probe", (host, int(port)))
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            continue
        if f"{src[0]}:{src[1]}" == dest:
            seen[dest] = json.loads(data)["seen"]
            break
print(json.dumps(seen), flush=True)
"""

MDNS_GROUP, MDNS_PORT = "224.0.0.251", 5353

# Joins the mDNS group on the given interface address, like an mDNS responder, and
# prints the first datagram that carries the test's token, with its sender.
MCAST_RECEIVE = r"""
import json, socket, sys, time
iface, token, timeout = sys.argv[1], sys.argv[2].encode(), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5353))
mreq = socket.inet_aton("224.0.0.251") + socket.inet_aton(iface)
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
print("ready", flush=True)
deadline = time.monotonic() + timeout
while (left := deadline - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data, src = s.recvfrom(2048)
    except socket.timeout:
        break
    if data == token:
        print(json.dumps({"from": src[0]}), flush=True)
        break
else:
    print(json.dumps({"from": None}), flush=True)
"""

# No IP_MULTICAST_IF: the host's multicast route must pick the LAN interface by itself.
MCAST_SEND = r"""
import socket, sys, time
token = sys.argv[1].encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
for _ in range(5):
    s.sendto(token, ("224.0.0.251", 5353))
    time.sleep(0.05)
"""

# Sends a datagram every 50 ms from sport to dest, for `duration` seconds.
SPRAY = r"""
import socket, sys, time
sport, dest, duration = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
host, port = dest.rsplit(":", 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport))
print("ready", flush=True)
end = time.monotonic() + duration
while time.monotonic() < end:
    s.sendto(b"unsolicited", (host, int(port)))
    time.sleep(0.05)
"""

# Behind a NAT: opens a mapping towards `first`, listens a while (what arrives from
# `second` now got through the NAT unsolicited), sends one datagram to `second` (a hole
# punched for it), listens again. Prints the senders heard in each phase.
PUNCH = r"""
import json, socket, sys, time
sport, first, second, listen = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport))
def heard(seconds):
    senders, end = set(), time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            senders.add("%s:%d" % s.recvfrom(2048)[1])
        except socket.timeout:
            pass
    return sorted(senders)
s.sendto(b"open", addr(first))
before = heard(listen)
s.sendto(b"punch", addr(second))
after = heard(listen)
print(json.dumps({"before": before, "after": after}), flush=True)
"""


def python(host: Host, script: str, *args: object, timeout: float = LIFETIME) -> str:
    """Run a helper script in ``host`` to its end; its stdout."""
    return host.run([sys.executable, "-c", script, *map(str, args)], timeout=timeout).stdout


@contextmanager
def serving(host: Host, script: str, *args: object) -> Iterator[subprocess.Popen[str]]:
    """Start a helper script in ``host`` and wait for its "ready" line."""
    proc = host.popen([sys.executable, "-c", script, *map(str, args)])
    try:
        assert read_line(proc, READY) == "ready"
        yield proc
    finally:
        proc.kill()
        proc.communicate(timeout=READY)


def result(proc: subprocess.Popen[str]) -> object:
    return json.loads(read_line(proc, LIFETIME))


# --- one LAN -------------------------------------------------------------------------


def test_three_hosts_on_a_lan_reach_each_other(testbed: Testbed) -> None:
    lan = testbed.lan("lan0", "198.51.100.0/24")
    hosts = [testbed.host(f"h{i}", lan) for i in (1, 2, 3)]
    assert [str(h.address) for h in hosts] == ["198.51.100.11", "198.51.100.12", "198.51.100.13"]
    with (
        serving(hosts[0], ECHO, 7000, LIFETIME),
        serving(hosts[1], ECHO, 7000, LIFETIME),
        serving(hosts[2], ECHO, 7000, LIFETIME),
    ):
        for host in hosts:
            others = [f"{o.address}:7000" for o in hosts if o is not host]
            seen = json.loads(python(host, PROBE, 41000, *others))
            # no NAT on a LAN: everyone sees the sender's own address and port
            assert seen == {dest: f"{host.address}:41000" for dest in others}


def test_mdns_multicast_reaches_every_other_host(testbed: Testbed) -> None:
    lan = testbed.lan("lan0", "192.0.2.0/24")
    sender, *receivers = (testbed.host(f"h{i}", lan) for i in (1, 2, 3))
    token = f"p2pd-mdns-{os.getpid()}"
    with (
        serving(receivers[0], MCAST_RECEIVE, receivers[0].address, token, 10) as r1,
        serving(receivers[1], MCAST_RECEIVE, receivers[1].address, token, 10) as r2,
    ):
        python(sender, MCAST_SEND, token)
        assert result(r1) == {"from": str(sender.address)}
        assert result(r2) == {"from": str(sender.address)}


def test_lo_is_up_in_every_namespace(testbed: Testbed) -> None:
    lan = testbed.lan("inet", "203.0.113.0/24")
    host = testbed.host("h1", lan)
    router = testbed.nat_router("r1", lan, inside_subnet="10.9.0.0/24")
    for ns in testbed.namespaces:
        out = subprocess.run(
            ["ip", "-n", ns, "-o", "link", "show", "lo"], capture_output=True, text=True
        ).stdout
        assert ",UP" in out, (ns, out)
    # and a local server is reachable on 127.0.0.1 inside a host
    with serving(host, ECHO, 7001, LIFETIME):
        seen = json.loads(python(host, PROBE, 41001, "127.0.0.1:7001"))
        assert seen == {"127.0.0.1:7001": "127.0.0.1:41001"}
    assert router.inside_address.exploded == "10.9.0.1"


def test_run_reports_failures_and_timeouts(testbed: Testbed) -> None:
    host = testbed.host("h1", testbed.lan("lan0", "198.51.100.0/24"))
    with pytest.raises(CommandFailed, match=r"in h1:(.|\n)*went wrong") as failed:
        host.run(["sh", "-c", "echo went wrong >&2; exit 3"])
    assert failed.value.returncode == 3
    assert host.run(["sh", "-c", "exit 3"], check=False).returncode == 3
    with pytest.raises(subprocess.TimeoutExpired):
        host.run(["sleep", "10"], timeout=0.3)
    assert host.pids() == []  # the timed-out command was killed


# A datagram to an address no testbed LAN has, from the given local address.
SEND_OUT = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b"x", (sys.argv[1], 9))
except OSError as exc:
    print(errno.errorcode[exc.errno])
else:
    print("sent")
"""


def test_hosts_have_no_way_out(testbed: Testbed) -> None:
    inet = testbed.lan("inet", "203.0.113.0/24")
    public = testbed.host("h1", inet)
    router = testbed.nat_router("r1", inet, inside_subnet="10.4.0.0/24")
    # 192.0.2.99 is a documentation address that no LAN of this testbed holds: a host on
    # the open network has no route to it; a router has none either, so nothing from
    # behind it goes anywhere but the testbed's LANs.
    assert python(public, SEND_OUT, "192.0.2.99").strip() == "ENETUNREACH"
    assert python(router, SEND_OUT, "192.0.2.99").strip() == "ENETUNREACH"
    for host in (public, router):
        assert "default" not in host.run(["ip", "route"]).stdout


# --- NAT -----------------------------------------------------------------------------


def nat_setup(testbed: Testbed, kind: NatKind) -> tuple[Host, Host, Host, Host]:
    """Two servers and a NAT router on the 'internet'; one client behind the router."""
    inet = testbed.lan("inet", "203.0.113.0/24")
    s1 = testbed.host("s1", inet)
    s2 = testbed.host("s2", inet)
    router = testbed.nat_router("r1", inet, inside_subnet="10.1.0.0/24", kind=kind)
    client = testbed.host("c1", router.inside)
    assert str(client.address) == "10.1.0.11" and client.router is router
    return s1, s2, router, client


@pytest.mark.parametrize("kind", ["eim", "symmetric"])
def test_nat_mapping_behaviour(testbed: Testbed, kind: NatKind) -> None:
    s1, s2, router, client = nat_setup(testbed, kind)
    # three destinations: two hosts, and two ports on one of them
    dests = [f"{s1.address}:3478", f"{s2.address}:3478", f"{s2.address}:3479"]
    with serving(s1, ECHO, "3478", LIFETIME), serving(s2, ECHO, "3478,3479", LIFETIME):
        seen = json.loads(python(client, PROBE, 40000, *dests))
    assert all(seen[d] is not None for d in dests), seen
    addresses = {seen[d].rsplit(":", 1)[0] for d in dests}
    ports = [int(seen[d].rsplit(":", 1)[1]) for d in dests]
    # the outside sees the router, never the inside address
    assert addresses == {str(router.address)}
    if kind == "eim":
        # endpoint-independent mapping with port preservation
        assert ports == [40000, 40000, 40000], seen
    else:
        # a new random port per destination: all three equal by chance ~ 1 in 4e9
        assert len(set(ports)) > 1, seen


def test_eim_nat_filters_unsolicited_until_a_hole_is_punched(testbed: Testbed) -> None:
    s1, s2, router, client = nat_setup(testbed, "eim")
    mapped = f"{router.address}:40000"  # port preservation, measured above
    with (
        serving(s1, ECHO, 3478, LIFETIME),
        serving(s2, SPRAY, 5000, mapped, 4.0),
    ):
        outcome = json.loads(
            python(client, PUNCH, 40000, f"{s1.address}:3478", f"{s2.address}:5000", 1.0)
        )
    # address- and port-dependent filtering: s2 is not let in while the mapping exists
    # only towards s1, and is let in through the same mapping once c1 sent to it
    assert f"{s2.address}:5000" not in outcome["before"], outcome
    assert f"{s2.address}:5000" in outcome["after"], outcome


# --- leaving nothing behind ----------------------------------------------------------


def ours(name: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(name + "-")]


def test_cleanup_after_an_exception(netns_ready: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), Testbed() as tb:
        lan = tb.lan("lan0", "198.51.100.0/24")
        host = tb.host("h1", lan)
        router = tb.nat_router("r1", lan, inside_subnet="10.2.0.0/24", kind="symmetric")
        tb.host("h2", router.inside)
        sleeper = host.popen([sys.executable, "-c", "import time; time.sleep(60)"])
        # a process the testbed did not start itself, detached from the command
        stray = host.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]).stdout
        stray_pid = int(stray)
        assert len(ours(tb.name)) == 4  # switch, h1, r1, h2
        raise RuntimeError("boom")
    assert ours(tb.name) == []
    assert sleeper.poll() is not None
    sleeper.communicate(timeout=READY)
    assert not os.path.exists(f"/proc/{stray_pid}") or _zombie(stray_pid)
    with pytest.raises(TestbedError, match="closed"):
        host.run(["true"])


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_a_failed_build_cleans_up_too(netns_ready: None) -> None:
    with pytest.raises(TestbedError, match="already used"), Testbed() as tb:
        lan = tb.lan("lan0", "198.51.100.0/24")
        tb.host("h1", lan)
        tb.host("h2", lan, address="198.51.100.11")
    assert ours(tb.name) == []


def test_refuses_addresses_outside_the_allowed_ranges(testbed: Testbed) -> None:
    for subnet in ("8.8.8.0/24", "192.168.1.0/24", "172.16.0.0/24", "198.51.0.0/16"):
        with pytest.raises(TestbedError, match="outside the ranges"):
            testbed.lan("bad", subnet)
    inet = testbed.lan("inet", "198.51.100.0/24")
    with pytest.raises(TestbedError, match=r"must lie in 10\.0\.0\.0/8"):
        testbed.nat_router("r1", inet, inside_subnet="192.0.2.0/24")
    with pytest.raises(TestbedError, match="overlaps"):
        testbed.lan("again", "198.51.100.128/25")


def test_cleanup_stale_removes_only_dead_owners(netns_ready: None) -> None:
    # An owner no process can be: one past the kernel's largest pid. (The pid of a
    # `true` that had just ended was taken again by another worker's fork before the
    # cleanup ran, once in a clean-clone run: pid_max is 32768 here, and the suite forks
    # thousands of processes.)
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
        dead_pid = int(f.read()) + 1
    stale = f"p2pd-{dead_pid}-deadbeef-h1"
    live = f"p2pd-{os.getpid()}-cafef00d-h1"
    try:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
        removed = cleanup_stale()
        assert stale in removed and live not in removed
        assert stale not in list_namespaces() and live in list_namespaces()
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)


def root_namespace_state() -> dict[str, str]:
    """What the root namespace has: links, addresses, routes, firewall rules."""

    def out(*args: str) -> str:
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=10)
        except FileNotFoundError:
            return f"{args[0]} not installed"
        return proc.stdout

    links = out("ip", "-o", "link", "show")
    return {
        # names only: counters and flags of real interfaces may change meanwhile
        "links": "\n".join(sorted(line.split(":")[1].strip() for line in links.splitlines())),
        "addresses": out("ip", "-o", "addr", "show"),
        "routes": out("ip", "route", "show", "table", "all"),
        "nft": out("nft", "list", "ruleset"),
    }


def test_nothing_is_created_in_the_root_namespace(testbed: Testbed) -> None:
    before = root_namespace_state()
    inet = testbed.lan("inet", "203.0.113.0/24")
    public = testbed.host("h1", inet)
    router = testbed.nat_router("r1", inet, inside_subnet="10.3.0.0/24")
    inside = testbed.host("h2", router.inside)
    with serving(public, ECHO, 3478, LIFETIME):
        seen = json.loads(python(inside, PROBE, 40000, f"{public.address}:3478"))
    assert seen == {f"{public.address}:3478": f"{router.address}:40000"}
    assert root_namespace_state() == before
    testbed.close()
    assert root_namespace_state() == before
    assert ours(testbed.name) == []
