"""IPv6 on the network-namespace testbed (issue 13, item 6): global addresses from the
documentation prefix 2001:db8::/32 (RFC 3849) or unique-local ones (fd00::/8), and the
IPv6 cell: a home router that routes a /64 to its inside LAN with no NAT at all and an
outbound-only firewall, as RFC 6092 ("simple security") recommends and as most home
routers ship::

    with Testbed() as tb:
        inet = tb.lan("inet", "198.18.0.0/16")
        s = tb.host("s", inet, address="198.18.1.11")
        r = tb.nat_router("r1", inet, inside_subnet="10.1.0.0/24", address="198.18.10.1")
        c = tb.host("c", r.inside)
        v6 = Ipv6Overlay(tb)
        v6.lan(inet, "2001:db8::/64")        # s: 2001:db8::1:11, r1: 2001:db8::10:1
        v6.firewall(r1, "2001:db8:1::/64")   # c: 2001:db8:1::11, via r1
        v6.address(c)                        # IPv6Address('2001:db8:1::11')

It is an overlay: build the IPv4 testbed first (every host and router), then give LANs
their /64s; a host added later gets its address with :meth:`Ipv6Overlay.attach`. A
host's interface id is the last two octets of its IPv4 address written as hex groups
(198.18.1.11 -> ``::1:11``), so the two addresses of a host read alike.

The firewall (an ``ip6`` nftables table on the router): forwarded packets are dropped
unless conntrack has seen the flow leave the inside first (``ct state
established,related``), and unsolicited TCP/UDP to the router itself is dropped too (as
the IPv4 NAT routers do, p2pd/testing/netns.py). Conntrack matches UDP replies on the
exact remote address and port, so the filtering is address- and port-dependent: two
peers behind such firewalls reach each other only by sending at the same time
(simultaneous open: each outbound packet opens the way for the other's), which is what
hole punching does.

Addresses are added with ``nodad`` (no duplicate address detection: the testbed hands
out unique addresses, and DAD would hold each address "tentative" for a second or two).
The kernel's own link-local addresses (fe80::, made when a link comes up) do go through
DAD, and neighbour discovery waits for them: a first packet sent within about a second
of building sat in a queue (measured: IPv6 hole punching took 1.0 s instead of a few
ms). :meth:`Ipv6Overlay.settle` waits until no address of the testbed is tentative.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, IPv6Network

from .netns import Host, Lan, NatRouter, Testbed, TestbedError, _command, _ip, _sysctl

__all__ = ["IPV6_RANGES", "Ipv6Overlay"]

#: RFC 3849's documentation prefix (the testbed's "global" addresses) and RFC 4193's
#: unique-local addresses: the only IPv6 prefixes a testbed hands out.
IPV6_RANGES = (IPv6Network("2001:db8::/32"), IPv6Network("fd00::/8"))


@dataclass
class _Lan6:
    prefix: IPv6Network
    #: the router whose inside this is (its inside address is prefix::1), if any
    gateway: IPv6Address | None = None
    #: routes every host of the LAN gets: (prefix, via)
    routes: list[tuple[IPv6Network, IPv6Address]] = field(default_factory=list)


def _firewall_ruleset(prefix: IPv6Network) -> str:
    return f"""
table ip6 p2pd_fw6 {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "eth1" oifname "eth0" ip6 saddr {prefix} accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "eth0" ct state new meta l4proto {{ tcp, udp }} drop
    }}
}}
"""


class Ipv6Overlay:
    """IPv6 /64s on a testbed's LANs, and outbound-only firewalls on its routers."""

    def __init__(self, testbed: Testbed) -> None:
        self.testbed = testbed
        self._lans: dict[str, _Lan6] = {}
        self._addresses: dict[str, IPv6Address] = {}

    def lan(self, lan: Lan, prefix: str) -> IPv6Network:
        """Give ``lan`` the /64 ``prefix`` (in 2001:db8::/32 or fd00::/8); every host on
        it now gets its address."""
        net = ipaddress.ip_network(prefix)
        if not isinstance(net, IPv6Network) or net.prefixlen != 64:
            raise TestbedError(f"{prefix}: an IPv6 /64 is needed")
        if not any(net.subnet_of(r) for r in IPV6_RANGES):
            raise TestbedError(f"{net} is outside 2001:db8::/32 and fd00::/8")
        if lan.name in self._lans or any(net.overlaps(o.prefix) for o in self._lans.values()):
            raise TestbedError(f"{lan.name} has a prefix, or {net} overlaps another")
        self._lans[lan.name] = _Lan6(net)
        for host in lan.hosts:
            self.attach(host)
        return net

    def _interface_id(self, address: IPv4Address) -> int:
        third, fourth = str(address).split(".")[2:]
        return int(third, 16) << 16 | int(fourth, 16)

    def attach(self, host: Host) -> IPv6Address:
        """``host``'s address on its LAN's prefix (added once), with its routes."""
        if host.name in self._addresses:
            return self._addresses[host.name]
        lan6 = self._lans.get(host.lan.name)
        if lan6 is None:
            raise TestbedError(f"{host.lan.name} has no IPv6 prefix")
        address = lan6.prefix.network_address + self._interface_id(host.address)
        commands = f"addr add {address}/64 dev {Host.interface} nodad\n"
        if lan6.gateway is not None:
            commands += f"route add default via {lan6.gateway} dev {Host.interface}\n"
        for prefix, via in lan6.routes:
            commands += f"route add {prefix} via {via} dev {Host.interface}\n"
        _ip("-n", host.netns, "-6", "-batch", "-", input=commands)
        self._addresses[host.name] = address
        return address

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until no IPv6 address of the testbed is tentative (DAD still running on
        the kernel's link-local ones), at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        names = [h.netns for h in self.testbed.hosts.values()]
        while names:
            names = [n for n in names if _ip("-n", n, "-6", "addr", "show", "tentative").strip()]
            if not names:
                return
            if time.monotonic() > deadline:
                raise TestbedError(f"IPv6 addresses still tentative after {timeout} s: {names}")
            time.sleep(0.05)  # a kernel state with no event to wait on

    def address(self, host: Host) -> IPv6Address:
        """``host``'s IPv6 address (on its outside LAN, for a router)."""
        try:
            return self._addresses[host.name]
        except KeyError:
            raise TestbedError(f"{host.name} has no IPv6 address") from None

    def firewall(self, router: NatRouter, prefix: str) -> IPv6Network:
        """Route ``prefix`` (a /64) to ``router``'s inside LAN, with no NAT and an
        outbound-only firewall; its outside LAN must have a prefix already. Hosts inside
        get their addresses and a default route through the router; hosts outside, a
        route to ``prefix`` through it."""
        outside = self._lans.get(router.lan.name)
        if outside is None:
            raise TestbedError(f"{router.lan.name} (outside {router.name}) has no IPv6 prefix")
        via = self.attach(router)
        net = self.lan(router.inside, prefix)  # hosts already inside: addresses, no route
        lan6 = self._lans[router.inside.name]
        inside_address = net.network_address + 1
        lan6.gateway = inside_address
        _ip(
            "-n", router.netns, "-6", "addr", "add", f"{inside_address}/64",
            "dev", NatRouter.inside_interface, "nodad",
        )  # fmt: skip
        for host in router.inside.hosts:  # routes for the hosts attached above
            if host.name in self._addresses:
                _ip("-n", host.netns, "-6", "route", "add", "default", "via", str(inside_address))
        _sysctl(router.netns, "net.ipv6.conf.all.forwarding", "1")
        _command(
            ["ip", "netns", "exec", router.netns, "nft", "-f", "-"],
            input=_firewall_ruleset(net),
        )
        outside.routes.append((net, via))
        for host in router.lan.hosts:
            if host is not router and host.name in self._addresses:
                _ip("-n", host.netns, "-6", "route", "add", str(net), "via", str(via))
        return net
