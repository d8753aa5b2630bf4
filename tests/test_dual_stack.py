"""Dual-stack listening (issue 13, item 6): the daemon listens on ``::`` by default, one
socket for IPv4 and IPv6. The UDP endpoint spells an IPv4 peer ``a.b.c.d`` in and out
(never ``::ffff:a.b.c.d``), so the DHT's per-/24 limits, relays and QUIC's path keys see
one spelling per address; and the record lists global IPv6 addresses beside IPv4."""

from __future__ import annotations

import socket

import trio

from p2pd.config import NodeConfig
from p2pd.daemon import bind_listen
from p2pd.netif import global_ipv6
from p2pd.transport.udp import UdpEndpoint
from p2pd.wire import Address


def test_the_default_listen_address_is_dual_stack(tmp_path: object) -> None:
    assert NodeConfig(home=tmp_path).listen == Address("::", 4747)  # type: ignore[arg-type]


async def test_ipv4_peers_of_a_dual_stack_socket_are_spelt_plainly_both_ways() -> None:
    endpoint = bind_listen(Address("::", 0))
    port = endpoint.local_address.port
    seen: list[tuple[str, int]] = []
    got = trio.Event()

    def on_dht(data: bytes, addr: tuple[str, int]) -> None:
        seen.append(addr)
        if len(seen) == 3:
            got.set()

    def on_quic(data: bytes, addr: tuple[str, int]) -> None:
        on_dht(data, ("quic", *addr))  # type: ignore[arg-type]

    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        v4.bind(("127.0.0.1", 0))
        v6.bind(("::1", 0))
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(endpoint.serve, on_dht, on_quic)
                v4.sendto(b"\x02hello", ("127.0.0.1", port))
                v6.sendto(b"\x02hello", ("::1", port))
                v4.sendto(b"\x40quic", ("127.0.0.1", port))  # QUIC's path (or queue)
                await got.wait()
                nursery.cancel_scope.cancel()
        expected = [v4.getsockname(), v6.getsockname()[:2], ("quic", *v4.getsockname())]
        assert sorted(map(tuple, seen)) == sorted(expected)
        # and an answer to the plain IPv4 spelling reaches the IPv4 socket
        endpoint.sendto(b"\x03back", ("127.0.0.1", v4.getsockname()[1]))
        v4.settimeout(5)
        assert v4.recvfrom(64) == (b"\x03back", ("127.0.0.1", port))
        assert endpoint.stats["send_errors"] == 0
    finally:
        v4.close()
        v6.close()
        endpoint.close()


async def test_an_ipv4_socket_is_left_as_it_was() -> None:
    endpoint = UdpEndpoint.bind(Address("127.0.0.1", 0))
    try:
        assert endpoint.local_address.version == 4
        endpoint.sendto(b"\x02x", ("127.0.0.1", 9))  # no mapping added: no error
        assert endpoint.stats["send_errors"] == 0
    finally:
        endpoint.close()


def test_global_ipv6_addresses_are_those_a_peer_elsewhere_could_use() -> None:
    hosts = [
        "127.0.0.1", "10.1.0.11", "::1", "fe80::1", "ff02::1", "::", "::ffff:10.0.0.1",
        "2001:db8:1::11", "fd00::5", "2a01:4f8::1", "2001:db8:1::11", "not an address",
    ]  # fmt: skip
    assert global_ipv6(hosts) == ["2001:db8:1::11", "fd00::5", "2a01:4f8::1"]
