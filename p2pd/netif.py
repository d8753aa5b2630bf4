"""The machine's interface addresses, and which of them a node announces.

Kept apart from LAN discovery because the daemon needs them too: a node listening on a
wildcard address with no bootstrap publishes in its DHT record the addresses it announces
on the LAN (docs/ARCHITECTURE.md, "LAN discovery").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

import ifaddr

from .lan_announcement import MAX_LAN_ADDRESSES
from .wire import Address

__all__ = ["announced_hosts", "global_ipv6", "is_wildcard", "local_ips"]


def is_wildcard(host: str) -> bool:
    """``0.0.0.0`` or ``::``: listening on every interface of that family."""
    return ipaddress.ip_address(host).is_unspecified


def announced_hosts(
    listen: Sequence[Address], configured: Sequence[str], local: Iterable[str]
) -> list[str]:
    """The addresses we announce (A/AAAA records, signed in the TXT record).

    The listen addresses when they are specific; else the configured interface
    addresses; else the machine's addresses (``local``) of the listen family. Link-local
    IPv6 addresses need a zone and are left out; loopback only if nothing else is left
    (a machine, or a test namespace, with only ``lo``). At most MAX_LAN_ADDRESSES.
    """
    hosts = [a.host for a in listen]
    wildcards = [h for h in hosts if is_wildcard(h)]
    if not wildcards:
        candidates = hosts
    elif configured:
        candidates = list(configured)
    else:
        v6 = any(":" in h for h in wildcards)
        candidates = [h for h in local if v6 or ":" not in h]
    out: list[str] = []
    for host in candidates:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if ip.is_unspecified or (ip.version == 6 and ip.is_link_local) or ip.is_multicast:
            continue
        if str(ip) not in out:
            out.append(str(ip))
    preferred = [h for h in out if not ipaddress.ip_address(h).is_loopback]
    return (preferred or out)[:MAX_LAN_ADDRESSES]


def local_ips() -> list[str]:
    """Every address of every interface, as IP literals (IPv6 without its zone)."""
    ips: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            ips.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return ips


def global_ipv6(hosts: Iterable[str]) -> list[str]:
    """The IPv6 addresses among ``hosts`` that peers elsewhere could use: not loopback,
    link-local, multicast, unspecified or IPv4-mapped. Unique-local (fc00::/7) and
    documentation (2001:db8::/32) addresses stay in, as private IPv4 ones do in a record:
    a peer on the same site, or a testbed's simulated internet, reaches them."""
    out: list[str] = []
    for host in hosts:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if ip.version != 6 or ip.is_loopback or ip.is_link_local or ip.is_multicast:
            continue
        if ip.is_unspecified or ip.ipv4_mapped is not None or str(ip) in out:
            continue
        out.append(str(ip))
    return out
