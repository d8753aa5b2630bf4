"""A network-namespace testbed: simulated hosts, LANs and NAT routers on one machine.

For the tests of LAN discovery and NAT traversal, and for people who want to watch
several daemons find each other on a network they can break at will::

    with Testbed() as tb:
        lan = tb.lan("inet", "198.51.100.0/24")
        a = tb.host("a", lan)                                  # 198.51.100.11
        b = tb.host("b", lan)                                  # 198.51.100.12
        r = tb.nat_router("r", lan, inside_subnet="10.1.0.0/24", kind="eim")
        c = tb.host("c", r.inside)                             # 10.1.0.11, via 10.1.0.1
        a.run(["python3", "-c", "print('hello from a')"])      # CompletedProcess
        daemon = c.popen(["p2pd", "daemon", ...])              # Popen, killed on exit
    # every namespace is gone here, after an exception too

What it builds, and why that way:

- Every host (and every router) is a network namespace with loopback up (mDNS and the
  daemon's control plane want ``lo``) and one veth interface ``eth0``; a router has a
  second one, ``eth1``, on its inside LAN. Commands run in a host with
  ``ip netns exec NAME ...``: same file system, same user, another network stack.
- The LANs are Linux bridges, and they live in one more namespace of the testbed, the
  *switch*, never in the root namespace: every interface is created directly inside a
  testbed namespace (``ip -n NS link add ... peer name ... netns SWITCH``), so the
  machine's own network never sees a link, an address, a route or a firewall rule of the
  testbed. Namespaces hold no link to the outside at all: a packet to a real address has
  nowhere to go (hosts outside NATs have no default route; ENETUNREACH).
- Multicast: every host routes 224.0.0.0/4 out of its LAN interface and the bridges run
  without IGMP snooping, so a datagram to 224.0.0.251:5353 (mDNS) reaches every other
  host of the LAN, whatever joined when.
- Addresses come from the documentation ranges (RFC 5737: 192.0.2.0/24, 198.51.100.0/24,
  203.0.113.0/24) and RFC 2544's 198.18.0.0/15 (one LAN of many /24s) for the simulated
  internet, and from 10.0.0.0/8 or 100.64.0.0/10 (a carrier-grade NAT's inside, RFC 6598)
  only for LANs behind a simulated NAT; any other subnet is refused. Hosts get .11,
  .12, ... in order; a router's inside address is .1.
- Names: every namespace is called ``<prefix>-<pid>-<8 hex>-<name>`` (the testbed's
  :attr:`Testbed.name` plus the host's name), so parallel runs never collide, and
  :func:`cleanup_stale` can tell leftovers of a crashed run (their pid is dead) from the
  namespaces of a run still going.
- Cleanup (:meth:`Testbed.close`, run by ``__exit__``): processes started with
  :meth:`Host.popen` get SIGTERM, then every process still inside a testbed namespace
  (``ip netns pids``) gets SIGTERM and, after a short grace, SIGKILL; then every namespace
  is deleted, which deletes its interfaces too. Each step is bounded in time.

NAT routers (:meth:`Testbed.nat_router`) masquerade their inside LAN behind their outside
address with nftables. What Linux (netfilter conntrack; read from
net/netfilter/nf_nat_core.c, ``get_unique_tuple``, and measured in tests/test_netns.py)
does, in RFC 4787 terms:

``kind="eim"`` — ``masquerade``, no flags: **endpoint-independent mapping**, with port
    preservation. For a new flow the kernel first reuses the outside port of an existing
    mapping of the same inside address and port (``find_appropriate_src``), else keeps the
    inside port itself, as long as the full 5-tuple (remote end included) stays unique;
    only on a clash does it pick a random port. So one inside socket appears as the same
    ``router:port`` to every destination. Caveats, both measured: (1) uniqueness is per
    remote end, so two inside hosts that use the same port can share one outside port
    while they talk to different remotes; when the second then reaches a remote the first
    already uses, that flow clashes and gets a random port, and the second host's mapping
    is no longer endpoint-independent. Give the hosts behind one router distinct ports
    where it matters. (2) ``persistent`` would only change which *address* is picked from
    a range of several; a masquerade has one, so the flag is left out; ``random`` and
    ``fully-random`` are exactly what turn mapping reuse and port preservation off.
``kind="symmetric"`` — ``masquerade random``: **endpoint-dependent ("symmetric")
    mapping**. With ``random`` (``NF_NAT_RANGE_PROTO_RANDOM``) the kernel skips mapping
    reuse and port preservation and takes a random port for every new conntrack entry,
    that is for every new remote ``address:port``. (Older kernels derived the port from a
    keyed hash of the addresses and the destination port; kernels since 6.x draw it at
    random, which is what ``fully-random`` does too; either way each destination sees
    another port, except with probability about 1/64512 per pair.)
``kind="fully-random"`` — ``masquerade fully-random`` (``NF_NAT_RANGE_PROTO_RANDOM_FULLY``):
    the same behaviour as ``symmetric`` on the kernels we run (6.x; measured in
    tests/test_nat_cells.py: a new random port per destination, no port preservation).

``port_mapping=True`` gives a router an ``inet`` table (not ``ip``) with miniupnpd's
three chains, which its base chains jump to; p2pd/testing/miniupnpd.py runs Debian's
miniupnpd there (PCP and NAT-PMP on the inside address), and a mapping is a DNAT and an
accept rule in the router's own table (tests/test_portmap_netns.py).

A **double NAT** is a home router whose outside LAN is a carrier-grade NAT's inside
(``inside_subnet`` in 100.64.0.0/10); the home router then routes through the CGNAT.

Both kinds filter **address- and port-dependently** (conntrack lets in only replies from
the exact remote ``address:port`` a flow was sent to; the forward chain drops everything
else), which makes ``eim`` what is often called a "port-restricted cone" and not a full
cone. The router also silently drops unsolicited TCP/UDP to its own outside address:
otherwise such a packet would create a local conntrack entry that holds ``router:port``
towards that remote, and the next outbound flow from inside to that remote would lose
port preservation (a classic way Linux NATs break hole punching). Mappings time out after
``nf_conntrack_udp_timeout`` (30 s) while idle, ``..._udp_timeout_stream`` (120 s) once
traffic went both ways for more than 2 s (measured with scripts/nat_timeouts.py: a flow
answered once, or whose exchanges all fall within 2 s, keeps 30 s);
``mapping_timeout`` sets both per router. No
hairpinning: an inside host cannot reach another inside host through the router's
outside address.

Everything needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), ``ip`` (iproute2) and, for NAT,
``nft`` (nftables). :func:`netns_available` says why namespaces cannot be made here, or
``None``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from types import TracebackType
from typing import IO, Any, Literal

from p2pd.errors import LocalError

__all__ = [
    "BENCHMARK_RANGE",
    "CGNAT_RANGE",
    "DEFAULT_PREFIX",
    "DOCUMENTATION_RANGES",
    "INSIDE_RANGES",
    "PRIVATE_RANGE",
    "CommandFailed",
    "Host",
    "Lan",
    "NatKind",
    "NatRouter",
    "Testbed",
    "TestbedError",
    "cleanup_stale",
    "list_namespaces",
    "netns_available",
    "owner_pid",
    "read_line",
    "testbed_namespaces",
]

NatKind = Literal["eim", "symmetric", "fully-random"]

#: What every namespace name of a testbed starts with, unless told otherwise.
DEFAULT_PREFIX = "p2pd"
#: RFC 5737 TEST-NET-1..3: the only "public" addresses a testbed hands out.
DOCUMENTATION_RANGES: tuple[IPv4Network, ...] = (
    IPv4Network("192.0.2.0/24"),
    IPv4Network("198.51.100.0/24"),
    IPv4Network("203.0.113.0/24"),
)
#: RFC 2544's benchmarking range, also "public": one LAN there spans many /24s (observers
#: in distinct /24s on one simulated internet, as address discovery wants them).
BENCHMARK_RANGE = IPv4Network("198.18.0.0/15")
#: The range for LANs behind simulated NATs.
PRIVATE_RANGE = IPv4Network("10.0.0.0/8")
#: RFC 6598's shared address space, between a carrier-grade NAT and the home routers
#: behind it (the outside of a double NAT).
CGNAT_RANGE = IPv4Network("100.64.0.0/10")
#: Where a NAT router's inside LAN may lie.
INSIDE_RANGES = (PRIVATE_RANGE, CGNAT_RANGE)

#: First host number handed out on a LAN (.11, .12, ...); a router's inside address is .1.
FIRST_HOST = 11
#: How long one ``ip``/``nft`` command of the testbed itself may take.
SETUP_TIMEOUT = 15.0
#: How long processes get between SIGTERM and SIGKILL at cleanup.
KILL_GRACE = 1.0

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]{0,30}$")
_SWITCH = "switch"
_Redirect = int | IO[Any] | None


class TestbedError(LocalError):
    """The network-namespace testbed could not do that."""

    __test__ = False  # not a pytest test class, despite the name


class CommandFailed(subprocess.CalledProcessError):
    """A command run in a testbed host exited non-zero; its output is in the message."""

    def __init__(
        self, host: str, returncode: int, cmd: Sequence[str], output: str, stderr: str
    ) -> None:
        super().__init__(returncode, list(cmd), output, stderr)
        self.host = host

    def __str__(self) -> str:
        text = f"in {self.host}: {super().__str__()}"
        for label, stream in (("stdout", self.stdout), ("stderr", self.stderr)):
            if stream:
                text += f"\n--- {label} (last 2000 chars):\n{str(stream)[-2000:]}"
        return text


# --- the commands that build and tear down -------------------------------------------


def _ip(*args: str, input: str | None = None, check: bool = True) -> str:
    """Run ``ip ARGS`` (bounded); TestbedError with ip's complaint when it fails."""
    return _command(["ip", *args], input=input, check=check)


def _command(args: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    try:
        proc = subprocess.run(
            list(args),
            input=input,
            capture_output=True,
            text=True,
            timeout=SETUP_TIMEOUT,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise TestbedError(f"{args[0]} is not installed ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"{' '.join(args)} took longer than {SETUP_TIMEOUT} s") from exc
    if check and proc.returncode != 0:
        raise TestbedError(
            f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}"
        )
    return proc.stdout


def list_namespaces() -> list[str]:
    """Names of every named network namespace on the machine (``ip netns list``)."""
    out = _ip("netns", "list", check=False)
    # lines look like "name" or "name (id: 3)"
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _namespace_pids(netns: str) -> list[int]:
    out = _ip("netns", "pids", netns, check=False)
    return [int(word) for word in out.split() if word.isdigit()]


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a zombie has left its namespaces)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return False
    # "pid (comm) S ...": the state follows the last ')' (comm may contain ')')
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _kill_all(pids: Sequence[int], grace: float = KILL_GRACE) -> None:
    """SIGTERM, wait up to ``grace`` seconds, SIGKILL the rest, wait again (bounded)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        pids = [pid for pid in pids if _alive(pid)]
        if not pids:
            return


def _remove_namespaces(names: Sequence[str]) -> list[str]:
    """Kill what runs in ``names``, delete them; returns the error messages, if any."""
    errors: list[str] = []
    pids: list[int] = []
    for name in names:
        pids.extend(_namespace_pids(name))
    _kill_all(sorted(set(pids) - {os.getpid()}))
    for name in names:
        try:
            _ip("netns", "delete", name)
        except TestbedError as exc:
            errors.append(str(exc))
    return errors


def _sysctl(netns: str, key: str, value: str) -> None:
    # /proc/sys/net shows the namespace of whoever opens it, so a shell in the namespace
    # writes that namespace's value. (No dependence on procps' sysctl being installed.)
    path = "/proc/sys/" + key.replace(".", "/")
    _command(["ip", "netns", "exec", netns, "sh", "-c", 'echo "$1" > "$2"', "sh", value, path])


# --- the model ----------------------------------------------------------------------


@dataclass(eq=False)
class Lan:
    """A broadcast domain: one bridge in the testbed's switch namespace."""

    name: str
    subnet: IPv4Network
    #: The bridge's interface name inside the switch namespace.
    bridge: str
    #: The default gateway of its hosts: a NAT router's inside address, or None.
    gateway: IPv4Address | None = None
    #: The NAT router this LAN sits behind, if any.
    router: NatRouter | None = None
    hosts: list[Host] = field(default_factory=list)
    _used: set[IPv4Address] = field(default_factory=set, repr=False)

    def _take(self, address: str | IPv4Address | None) -> IPv4Address:
        if address is not None:
            addr = IPv4Address(address)
            if addr not in self.subnet or addr in (
                self.subnet.network_address,
                self.subnet.broadcast_address,
            ):
                raise TestbedError(f"{addr} is not a host address of {self.name} {self.subnet}")
            if addr in self._used:
                raise TestbedError(f"{addr} is already used on {self.name}")
        else:
            candidates = (
                self.subnet.network_address + n
                for n in range(FIRST_HOST, self.subnet.num_addresses - 1)
            )
            free = next((a for a in candidates if a not in self._used), None)
            if free is None:
                raise TestbedError(f"no free address left on {self.name} {self.subnet}")
            addr = free
        self._used.add(addr)
        return addr


class Host:
    """A simulated machine: a network namespace with ``lo`` and ``eth0`` on one LAN."""

    #: The interface on its LAN.
    interface = "eth0"

    def __init__(self, testbed: Testbed, name: str, netns: str, lan: Lan, address: IPv4Address):
        self.testbed = testbed
        #: Its short name, as given to :meth:`Testbed.host`.
        self.name = name
        #: The network namespace's full name, for ``ip netns exec``.
        self.netns = netns
        self.lan = lan
        self.address = address

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.address} netns={self.netns}>"

    @property
    def router(self) -> NatRouter | None:
        """The NAT router this host sits behind, or None for a host on the open network."""
        return self.lan.router

    def command(self, args: Sequence[str]) -> list[str]:
        """The argv that runs ``args`` in this host."""
        if isinstance(args, str):
            raise TypeError("args must be a sequence of strings, not one string")
        return ["ip", "netns", "exec", self.netns, *args]

    def run(
        self,
        args: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` in this host to its end, capturing stdout and stderr as text.

        ``timeout`` kills it and raises :class:`subprocess.TimeoutExpired`; ``check``
        raises :class:`CommandFailed` (a CalledProcessError that shows the output) on a
        non-zero exit.
        """
        self.testbed._check_open()
        proc = subprocess.run(
            self.command(args),
            input=input,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=None if env is None else dict(env),
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise CommandFailed(self.name, proc.returncode, args, proc.stdout, proc.stderr)
        return proc

    def popen(
        self,
        args: Sequence[str],
        *,
        stdin: _Redirect = subprocess.DEVNULL,
        stdout: _Redirect = subprocess.PIPE,
        stderr: _Redirect = subprocess.PIPE,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        """Start ``args`` in this host (text mode); the testbed kills it at cleanup.

        ``ip netns exec`` execs the command in place, so ``pid`` is the command's own.
        Read lines with a deadline with :func:`read_line`.
        """
        self.testbed._check_open()
        proc = subprocess.Popen(
            self.command(args),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            text=True,
            errors="replace",
            env=None if env is None else dict(env),
        )
        self.testbed._processes.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process running in this host's namespace now."""
        return _namespace_pids(self.netns)


class NatRouter(Host):
    """A host on an outside LAN that masquerades an inside LAN behind its address.

    ``eth0`` (``address``) faces the outside LAN, ``eth1`` (``inside_address``, .1 of the
    inside subnet) the inside one; hosts on :attr:`inside` route through it. See the
    module docstring for what each ``kind`` does.
    """

    inside_interface = "eth1"

    def __init__(
        self,
        testbed: Testbed,
        name: str,
        netns: str,
        lan: Lan,
        address: IPv4Address,
        *,
        inside: Lan,
        inside_address: IPv4Address,
        kind: NatKind,
    ):
        super().__init__(testbed, name, netns, lan, address)
        self.inside = inside
        self.inside_address = inside_address
        self.kind: NatKind = kind

    def ruleset(self) -> str:
        """The router's nftables ruleset as the kernel has it (``nft list ruleset``)."""
        return self.run(["nft", "list", "ruleset"], timeout=SETUP_TIMEOUT).stdout

    def conntrack(self) -> str:
        """The router's conntrack table (``/proc/net/nf_conntrack``), one entry a line."""
        return self.run(["cat", "/proc/net/nf_conntrack"], check=False).stdout

    def flush_conntrack(self) -> dict[str, int]:
        """Forget every mapping at once, as a router that reboots does: the router's
        conntrack table flushed through ctnetlink (p2pd/testing/conntrack.py, run in its
        namespace). Returns how many entries it held ``"before"`` and ``"after"``."""
        out = self.run([sys.executable, "-m", "p2pd.testing.conntrack", "flush"])
        counts: dict[str, int] = json.loads(out.stdout)
        return counts

    def move(self, address: str | IPv4Address | None = None) -> IPv4Address:
        """The router (and every host behind it) moves to another outside address, as a
        laptop does that joins another network: the old address is gone, the new one
        (the next free one on the outside LAN unless given) takes its place, and every
        mapping is forgotten (the kernel drops a masquerade's entries with its address;
        the conntrack table is flushed too, to be sure). Returns the new address. Hosts
        behind the router keep their inside addresses."""
        old, lan = self.address, self.lan
        new = lan._take(address)
        prefix = lan.subnet.prefixlen
        batch = f"addr del {old}/{prefix} dev {Host.interface}\n"
        batch += f"addr add {new}/{prefix} dev {Host.interface}\n"
        if lan.gateway is not None:  # deleting the address took the default route along
            batch += f"route replace default via {lan.gateway}\n"
        _ip("-n", self.netns, "-batch", "-", input=batch)
        lan._used.discard(old)
        self.address = new
        self.flush_conntrack()
        return new

    def udp_timeouts(self) -> dict[str, int]:
        """The router's idle UDP mapping lifetimes in seconds, read inside its namespace:
        ``"udp"`` (``nf_conntrack_udp_timeout``, a flow seen one way or answered once;
        30 by default) and ``"stream"`` (``..._udp_timeout_stream``, a flow that went
        both ways more than once; 120 by default)."""
        keys = {"udp": "nf_conntrack_udp_timeout", "stream": "nf_conntrack_udp_timeout_stream"}
        path = "/proc/sys/net/netfilter/"
        return {k: int(self.run(["cat", path + v]).stdout) for k, v in keys.items()}


def _nat_ruleset(kind: NatKind, inside: IPv4Network, *, port_mapping: bool = False) -> str:
    """The router's nftables table. With ``port_mapping`` it is an ``inet`` table (the
    family miniupnpd's nftables backend writes to) holding miniupnpd's three chains, which
    the router's base chains jump to: a mapping's DNAT rule (``prerouting_miniupnpd``) and
    its accept rule (``miniupnpd``) then act in the same table as the masquerade
    (p2pd/testing/miniupnpd.py); a jump cannot leave its table."""
    flags = {"eim": "", "symmetric": " random", "fully-random": " fully-random"}[kind]
    family, jump_nat, jump_forward, chains = "ip", "", "", ""
    if port_mapping:
        family = "inet"
        jump_nat = "\n        jump postrouting_miniupnpd"
        jump_forward = "\n        jump miniupnpd"
        chains = """
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        jump prerouting_miniupnpd
    }
    chain prerouting_miniupnpd {
    }
    chain postrouting_miniupnpd {
    }
    chain miniupnpd {
    }"""
    return f"""
table {family} p2pd_nat {{{chains}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;{jump_nat}
        oifname "eth0" ip saddr {inside} masquerade{flags}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "eth1" oifname "eth0" ip saddr {inside} accept{jump_forward}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "eth0" ct state new meta l4proto {{ tcp, udp }} drop
    }}
}}
"""


class Testbed:
    """Hosts, LANs and NAT routers in network namespaces; a context manager.

    ``prefix`` starts every namespace name; the testbed appends its pid and a random
    token (:attr:`name`). Use it in a ``with`` block, or call :meth:`close`.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not _PREFIX.match(prefix):
            raise TestbedError(f"bad prefix {prefix!r}: letters, digits, '_' and '.' only")
        #: The unique name every namespace of this testbed starts with.
        self.name = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        self.lans: dict[str, Lan] = {}
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []  # in creation order; the switch first
        self._processes: list[subprocess.Popen[str]] = []
        self._counter = 0
        self._closed = False
        self._switch: str | None = None

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        # Never hide the exception that is already on its way out.
        try:
            self.close()
        except TestbedError as cleanup_error:
            warnings.warn(f"testbed cleanup incomplete: {cleanup_error}", stacklevel=2)

    @property
    def namespaces(self) -> list[str]:
        """The names of every namespace this testbed made so far (the switch first)."""
        return list(self._namespaces)

    @property
    def switch(self) -> str:
        """The name of the namespace that holds the LAN bridges (made on first use)."""
        if self._switch is None:
            self._switch = self._new_namespace(_SWITCH)
        return self._switch

    def _check_open(self) -> None:
        if self._closed:
            raise TestbedError(f"testbed {self.name} is closed")

    def _next_ifname(self, kind: str) -> str:
        self._counter += 1
        return f"{kind}{self._counter}"

    def _new_namespace(self, name: str) -> str:
        self._check_open()
        netns = f"{self.name}-{name}"
        # Recorded before it exists, so that cleanup removes it whatever fails next.
        self._namespaces.append(netns)
        _ip("netns", "add", netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        return netns

    def _check_name(self, name: str) -> None:
        if not _NAME.match(name):
            raise TestbedError(f"bad name {name!r}: lower-case letters, digits and '-'")
        if name in self.hosts or name == _SWITCH:
            raise TestbedError(f"the name {name!r} is taken")

    # --- building ---

    def lan(self, name: str, subnet: str | IPv4Network) -> Lan:
        """A new LAN (an empty bridge) for ``subnet``.

        ``subnet`` must lie in a documentation range (192.0.2.0/24, 198.51.100.0/24,
        203.0.113.0/24), in 198.18.0.0/15, 10.0.0.0/8 or 100.64.0.0/10, and not overlap
        another LAN of the testbed.
        """
        if not _NAME.match(name) or name in self.lans:
            raise TestbedError(f"bad or duplicate LAN name {name!r}")
        try:
            net = ipaddress.ip_network(subnet)
        except ValueError as exc:
            raise TestbedError(f"bad subnet {subnet!r}: {exc}") from exc
        if not isinstance(net, IPv4Network):
            raise TestbedError(f"{net}: only IPv4 subnets")
        allowed = (*DOCUMENTATION_RANGES, BENCHMARK_RANGE, *INSIDE_RANGES)
        if not any(net.subnet_of(r) for r in allowed):
            raise TestbedError(
                f"{net} is outside the ranges a testbed may use: "
                + ", ".join(str(r) for r in allowed)
            )
        if net.prefixlen > 28:
            raise TestbedError(f"{net} is too small (at most /28)")
        for other in self.lans.values():
            if net.overlaps(other.subnet):
                raise TestbedError(f"{net} overlaps {other.name} {other.subnet}")
        bridge = self._next_ifname("br")
        # Snooping off: with it on, a bridge that has learnt group members (IGMP reports)
        # forwards a group's traffic only to them; mDNS peers may not have reported yet.
        _ip(
            "-n",
            self.switch,
            "-batch",
            "-",
            input=f"link add {bridge} type bridge mcast_snooping 0 stp_state 0\n"
            f"link set {bridge} up\n",
        )
        lan = Lan(name=name, subnet=net, bridge=bridge)
        self.lans[name] = lan
        return lan

    def _attach(self, netns: str, ifname: str, lan: Lan, address: IPv4Address) -> None:
        """A veth from ``netns`` (``ifname``) to ``lan``'s bridge, addressed and up."""
        peer = self._next_ifname("v")
        _ip(
            "-n",
            netns,
            "link",
            "add",
            ifname,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            self.switch,
        )
        _ip(
            "-n",
            self.switch,
            "-batch",
            "-",
            input=f"link set {peer} master {lan.bridge}\nlink set {peer} up\n",
        )
        _ip(
            "-n",
            netns,
            "-batch",
            "-",
            input=f"addr add {address}/{lan.subnet.prefixlen} dev {ifname}\n"
            f"link set {ifname} multicast on\n"
            f"link set {ifname} up\n",
        )

    def host(self, name: str, lan: Lan, *, address: str | IPv4Address | None = None) -> Host:
        """A new host on ``lan``: the next free address (.11, .12, ...) unless given.

        Behind a NAT router (``lan`` is a router's :attr:`NatRouter.inside`), its default
        route goes through the router; on the open network it has no default route.
        """
        self._check_name(name)
        if lan is not self.lans.get(lan.name):
            raise TestbedError(f"{lan.name} is not a LAN of this testbed")
        addr = lan._take(address)
        netns = self._new_namespace(name)
        self._attach(netns, Host.interface, lan, addr)
        routes = f"route add 224.0.0.0/4 dev {Host.interface}\n"
        if lan.gateway is not None:
            routes += f"route add default via {lan.gateway}\n"
        _ip("-n", netns, "-batch", "-", input=routes)
        host = Host(self, name, netns, lan, addr)
        lan.hosts.append(host)
        self.hosts[name] = host
        return host

    def nat_router(
        self,
        name: str,
        outside: Lan,
        *,
        inside_subnet: str | IPv4Network,
        kind: NatKind = "eim",
        address: str | IPv4Address | None = None,
        mapping_timeout: int | None = None,
        port_mapping: bool = False,
    ) -> NatRouter:
        """A NAT router on ``outside`` with a new LAN behind it (``router.inside``).

        ``kind``: ``"eim"`` (endpoint-independent mapping, port preserving) or
        ``"symmetric"`` (a new random port per destination); both filter address- and
        port-dependently. ``inside_subnet`` must lie in 10.0.0.0/8 or 100.64.0.0/10 (a
        carrier-grade NAT's, with home routers on it: a double NAT); the router takes
        its .1. ``mapping_timeout`` (seconds) sets how long an idle UDP mapping lives (both
        of conntrack's UDP timeouts); the kernel's defaults are 30 s and 120 s.
        ``port_mapping``: the ruleset has miniupnpd's chains (an ``inet`` table; start
        the daemon with :meth:`NatRouter.start_miniupnpd`).
        """
        if kind not in ("eim", "symmetric", "fully-random"):
            raise TestbedError(f"unknown NAT kind {kind!r}: 'eim', 'symmetric', 'fully-random'")
        if shutil.which("nft") is None:
            raise TestbedError("nft is not installed (Debian: apt-get install nftables)")
        self._check_name(name)
        if outside is not self.lans.get(outside.name):
            raise TestbedError(f"{outside.name} is not a LAN of this testbed")
        try:
            net = ipaddress.ip_network(inside_subnet)
        except ValueError as exc:
            raise TestbedError(f"bad inside_subnet {inside_subnet!r}: {exc}") from exc
        if not isinstance(net, IPv4Network) or not any(net.subnet_of(r) for r in INSIDE_RANGES):
            raise TestbedError(
                f"inside_subnet {inside_subnet} must lie in 10.0.0.0/8 or 100.64.0.0/10"
            )
        inside = self.lan(f"{name}-inside", net)
        inside_address = inside._take(net.network_address + 1)
        inside.gateway = inside_address
        addr = outside._take(address)
        netns = self._new_namespace(name)
        self._attach(netns, Host.interface, outside, addr)
        self._attach(netns, NatRouter.inside_interface, inside, inside_address)
        _ip("-n", netns, "route", "add", "224.0.0.0/4", "dev", NatRouter.inside_interface)
        if outside.gateway is not None:  # a home router behind a carrier-grade NAT
            _ip("-n", netns, "route", "add", "default", "via", str(outside.gateway))
        _sysctl(netns, "net.ipv4.ip_forward", "1")
        _command(
            ["ip", "netns", "exec", netns, "nft", "-f", "-"],
            input=_nat_ruleset(kind, net, port_mapping=port_mapping),
        )
        if mapping_timeout is not None:
            for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
                _sysctl(netns, f"net.netfilter.{key}", str(int(mapping_timeout)))
        router = NatRouter(
            self,
            name,
            netns,
            outside,
            addr,
            inside=inside,
            inside_address=inside_address,
            kind=kind,
        )
        inside.router = router
        outside.hosts.append(router)
        self.hosts[name] = router
        return router

    # --- tearing down ---

    def close(self) -> None:
        """Kill every process in the testbed and delete its namespaces. Idempotent.

        Raises TestbedError if a namespace could not be removed (after trying them all).
        """
        if self._closed:
            return
        self._closed = True
        for proc in self._processes:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + KILL_GRACE
        for proc in self._processes:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                # unkillable (D state)? the namespace sweep below reports it
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=KILL_GRACE)
        # Hosts first, the switch (the first one made) last: deleting a host's namespace
        # deletes its veth and the peer on the bridge with it.
        existing = set(list_namespaces())
        errors = _remove_namespaces([n for n in self._namespaces[::-1] if n in existing])
        left = [n for n in list_namespaces() if n.startswith(self.name + "-")]
        if left:
            errors.append(f"namespaces still there: {', '.join(left)}")
        if errors:
            raise TestbedError("; ".join(errors))


# --- module functions ---------------------------------------------------------------


def owner_pid(netns: str, prefix: str = DEFAULT_PREFIX) -> int | None:
    """The pid of the process whose testbed made ``netns``; None if it is not a testbed's."""
    m = re.match(rf"^{re.escape(prefix)}-(\d+)-[0-9a-f]{{8}}-", netns)
    return int(m.group(1)) if m else None


def testbed_namespaces(prefix: str = DEFAULT_PREFIX) -> list[tuple[str, int, bool]]:
    """Every testbed namespace on the machine: (name, owner pid, whether the owner runs).

    A namespace belongs to a testbed when its name has the form
    ``<prefix>-<pid>-<8 hex>-<name>``; the owner "runs" when that pid exists and is no
    zombie.
    """
    found = []
    for netns in list_namespaces():
        pid = owner_pid(netns, prefix)
        if pid is not None:
            found.append((netns, pid, _pid_exists(pid)))
    return found


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, include_live: bool = False) -> list[str]:
    """Remove the namespaces that crashed testbeds left; returns the names removed.

    Stale means the owning pid (see :func:`testbed_namespaces`) no longer runs.
    ``include_live`` removes the namespaces of running testbeds too (for a person
    cleaning up by hand, never for a test). A pid reused by an unrelated process keeps
    its namespaces until that process ends.
    """
    stale = [name for name, _, alive in testbed_namespaces(prefix) if include_live or not alive]
    if stale:
        errors = _remove_namespaces(stale)
        if errors:
            raise TestbedError("; ".join(errors))
    return stale


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _alive(pid)


def netns_available() -> str | None:
    """None when this process can build a testbed; else the reason it cannot.

    Checks the platform, root, ``ip``, and then really makes (and removes) a namespace
    with a veth pair in it, so an unprivileged container's EPERM shows up here.
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"{DEFAULT_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}-probe"
    try:
        _ip("netns", "add", probe)
    except TestbedError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _ip("-n", probe, "link", "set", "lo", "up")
        _ip("-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
    except TestbedError as exc:
        return f"cannot configure a network namespace: {exc}"
    finally:
        _ip("netns", "delete", probe, check=False)
    return None


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line of ``proc``'s stdout (without the newline), waiting at most ``timeout``.

    Raises TimeoutError, or EOFError when the process closed its stdout first. It reads
    the pipe byte by byte below Python's buffers so it never takes more than one line;
    don't mix it with reads through ``proc.stdout`` before it.
    """
    if proc.stdout is None:
        raise TestbedError("the process has no stdout pipe (popen(stdout=PIPE))")
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete line within {timeout} s (got {bytes(line)!r})")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        byte = os.read(fd, 1)
        if not byte:
            raise EOFError(f"stdout closed (got {bytes(line)!r})")
        if byte == b"\n":
            return line.decode(errors="replace")
        line += byte
