"""The interface address helpers, p2pd.netif: which addresses a node announces."""

from __future__ import annotations

import ipaddress

from p2pd.netif import announced_hosts, is_wildcard, local_ips
from p2pd.wire import Address


def test_announced_hosts() -> None:
    local = ["127.0.0.1", "192.0.2.5", "fe80::1", "2001:db8::5", "10.0.0.5"]
    assert announced_hosts([Address("192.0.2.1", 1)], (), local) == ["192.0.2.1"]
    assert announced_hosts([Address("0.0.0.0", 1)], (), local) == ["192.0.2.5", "10.0.0.5"]
    assert announced_hosts([Address("::", 1)], (), local) == [
        "192.0.2.5",
        "2001:db8::5",
        "10.0.0.5",
    ]
    assert announced_hosts([Address("0.0.0.0", 1)], ("10.0.0.5",), local) == ["10.0.0.5"]
    # loopback only when nothing else is there (a namespace with only lo)
    assert announced_hosts([Address("0.0.0.0", 1)], (), ["127.0.0.1", "fe80::1"]) == ["127.0.0.1"]
    many = [f"10.0.1.{i}" for i in range(1, 20)]
    assert len(announced_hosts([Address("0.0.0.0", 1)], (), many)) == 8


def test_is_wildcard() -> None:
    assert is_wildcard("0.0.0.0") and is_wildcard("::")
    assert not is_wildcard("127.0.0.1") and not is_wildcard("2001:db8::1")


def test_local_ips_are_ip_literals() -> None:
    ips = local_ips()
    assert ips, "every namespace has at least lo"
    for ip in ips:
        assert "%" not in ip  # no IPv6 zone: announced_hosts and Address want plain literals
        ipaddress.ip_address(ip)
