"""The fake UDP network (p2pd.testing.fakenet) under trio's autojump clock: latency, loss,
duplication, reordering, determinism, demultiplexing, churn, NAT behaviour, and scale.
Each test checks what a user of the network would: what arrives, from whom, when."""

from __future__ import annotations

import ipaddress
import math
import random
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from p2pd.errors import InvalidAddress, LocalError, UsageError
from p2pd.testing.fakenet import (
    RECEIVE_QUEUE,
    FakeNetwork,
    FakeUdpEndpoint,
    open_fake_network,
)

#: Virtual seconds; the autojump clock makes them cost (almost) no wall time.
TIMEOUT = 3600

Source = tuple[str, int]


@dataclass
class Arrival:
    time: float
    data: bytes
    source: Source


@dataclass
class Inbox:
    """Handlers that record what an endpoint receives, and when."""

    dht: list[Arrival] = field(default_factory=list)
    quic: list[Arrival] = field(default_factory=list)

    def on_dht(self, data: bytes, source: Source) -> None:
        self.dht.append(Arrival(trio.current_time(), data, source))

    def on_quic(self, data: bytes, source: Source) -> None:
        self.quic.append(Arrival(trio.current_time(), data, source))

    @property
    def payloads(self) -> list[bytes]:
        return [a.data for a in self.dht]


@asynccontextmanager
async def running(**options: Any) -> AsyncIterator[tuple[FakeNetwork, trio.Nursery]]:
    async with open_fake_network(**options) as net, trio.open_nursery() as nursery:
        yield net, nursery
        nursery.cancel_scope.cancel()


async def serve(nursery: trio.Nursery, endpoint: FakeUdpEndpoint) -> Inbox:
    inbox = Inbox()
    await nursery.start(endpoint.serve, inbox.on_dht, inbox.on_quic)
    return inbox


def addr(endpoint: FakeUdpEndpoint) -> Source:
    return endpoint.local_address.as_tuple()


def assert_binomial(successes: int, trials: int, p: float) -> None:
    sd = math.sqrt(trials * p * (1 - p))
    assert abs(successes - trials * p) <= 5 * sd + 1, (successes, trials, p)


def fates(net: FakeNetwork) -> int:
    """Copies whose fate is known: once nothing is in flight, sent + duplicated."""
    keys = (
        "delivered",
        "lost",
        "no_listener",
        "nat_dropped",
        "partitioned",
        "blackout_dropped",
        "queue_dropped",
    )
    return sum(net.stats[k] for k in keys)


# --------------------------------------------------------------------------- latency


async def test_delay_is_half_the_pair_rtt_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        wall = time.perf_counter()
        async with running(median_rtt=30.0, rtt_sigma=0.0, jitter=0.0) as (net, nursery):
            a, b = net.add_host().bind(1000), net.add_host(nat="eim").bind(2000)
            inbox_a, inbox_b = await serve(nursery, a), await serve(nursery, b)
            start = trio.current_time()
            b.sendto(b"\x00hello", addr(a))
            await trio.sleep(20)
            assert inbox_a.dht[0].time - start == pytest.approx(15.0)
            replied = trio.current_time()
            a.sendto(b"\x00back", inbox_a.dht[0].source)
            await trio.sleep(20)
            assert inbox_b.dht[0].time - replied == pytest.approx(15.0)
            # two endpoints of one host: the loopback delay, not the path's
            c = b.host.bind(3000)
            inbox_c = await serve(nursery, c)
            sent = trio.current_time()
            b.sendto(b"\x00local", addr(c))
            await trio.sleep(1)
            assert inbox_c.dht[0].time - sent == pytest.approx(50e-6)
            assert inbox_c.dht[0].source == addr(b)
        assert trio.current_time() - start >= 41
        assert time.perf_counter() - wall < 10  # 41 virtual seconds, no real sleep


class Pinger:
    """Every endpoint of the network answers pings; :meth:`measure` times round trips
    between pairs of host indexes, one at a time so that each is measured alone."""

    def __init__(self, net: FakeNetwork) -> None:
        self.net = net
        self.endpoints = [host.endpoints[0] for host in net.hosts]
        self._sent: dict[tuple[Source, Source], float] = {}
        self._rtts: dict[tuple[Source, Source], float] = {}

    async def start(self, nursery: trio.Nursery) -> Pinger:
        for ep in self.endpoints:

            def on_dht(data: bytes, source: Source, ep: FakeUdpEndpoint = ep) -> None:
                if data[0] == 0:
                    ep.sendto(b"\x01", source)
                else:
                    key = (addr(ep), source)
                    self._rtts[key] = trio.current_time() - self._sent[key]

            await nursery.start(ep.serve, on_dht)
        return self

    async def measure(self, pairs: list[tuple[int, int]]) -> list[float]:
        out = []
        for i, j in pairs:
            key = (addr(self.endpoints[i]), addr(self.endpoints[j]))
            self._sent[key] = trio.current_time()
            self.endpoints[i].sendto(b"\x00", key[1])
            await trio.sleep(10)
            out.append(self._rtts.pop(key))
        return out


async def test_pair_rtts_are_lognormal_around_the_median_and_fixed_per_pair(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT * 10):
        rng = random.Random(5)
        pairs: list[tuple[int, int]] = []
        for _ in range(300):
            i, j = rng.sample(range(200), 2)
            pairs.append((i, j))
        async with running(seed=11, median_rtt=0.050, rtt_sigma=0.5, jitter=0.0) as (
            net,
            nursery,
        ):
            for _ in range(200):
                net.add_host().bind(7)
            pinger = await Pinger(net).start(nursery)
            rtts = await pinger.measure(pairs)
            again = await pinger.measure([(j, i) for i, j in pairs[:20]])
            ips = [h.ip for h in net.hosts]
        assert statistics.median(rtts) == pytest.approx(0.050, rel=0.15)
        logs = [math.log(r) for r in rtts]
        assert 0.4 < statistics.stdev(logs) < 0.6  # the heavy tail: sigma as asked
        assert max(rtts) > 2.5 * min(rtts)
        assert again == pytest.approx(rtts[:20])  # fixed per pair, the same both ways

        # The same seed and addresses give the same RTTs, whatever the order hosts join.
        async with running(seed=11, median_rtt=0.050, rtt_sigma=0.5, jitter=0.0) as (
            net,
            nursery,
        ):
            for ip in reversed(ips):
                net.add_host(ip).bind(7)
            index = {h.ip: n for n, h in enumerate(net.hosts)}
            some = pairs[:20]
            remapped = [(index[ips[i]], index[ips[j]]) for i, j in some]
            assert await (await Pinger(net).start(nursery)).measure(remapped) == pytest.approx(
                rtts[:20]
            )
        async with running(seed=12, median_rtt=0.050, rtt_sigma=0.5, jitter=0.0) as (
            net,
            nursery,
        ):
            for ip in ips:
                net.add_host(ip).bind(7)
            assert await (await Pinger(net).start(nursery)).measure(some) != pytest.approx(
                rtts[:20]
            )


async def send_spaced(sender: FakeUdpEndpoint, dest: Source, count: int, gap: float) -> None:
    for n in range(count):
        sender.sendto(b"\x00" + n.to_bytes(4, "big"), dest)
        await trio.sleep(gap)


async def test_jitter_reorders_and_only_adds_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running(median_rtt=0.100, rtt_sigma=0.0, jitter=0.5) as (net, nursery):
            a, b = net.add_host().bind(1), net.add_host().bind(2)
            inbox = await serve(nursery, b)
            start = trio.current_time()
            await send_spaced(a, addr(b), 400, 0.001)
            await trio.sleep(5)
        numbers = [int.from_bytes(p[1:], "big") for p in inbox.payloads]
        assert sorted(numbers) == list(range(400))
        assert numbers != sorted(numbers)
        extra = [
            x.time - (start + n * 0.001) - 0.050 for n, x in zip(numbers, inbox.dht, strict=True)
        ]
        assert min(extra) >= -1e-9
        assert statistics.mean(extra) == pytest.approx(0.5 * 0.050, rel=0.2)

        async with running(median_rtt=0.100, rtt_sigma=0.0, jitter=0.0) as (net, nursery):
            a, b = net.add_host().bind(1), net.add_host().bind(2)
            inbox = await serve(nursery, b)
            await send_spaced(a, addr(b), 400, 0.001)
            await trio.sleep(5)
        numbers = [int.from_bytes(p[1:], "big") for p in inbox.payloads]
        assert numbers == list(range(400))


async def test_resolution_batches_deliveries_late_but_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running(median_rtt=0.100, rtt_sigma=0.0, jitter=0.0, resolution=0.010) as (
            net,
            nursery,
        ):
            a, b, c = net.add_host().bind(1), net.add_host().bind(2), net.add_host().bind(3)
            inbox = await serve(nursery, c)
            flushes: list[int] = []
            c.add_flush_hook(lambda: flushes.append(len(inbox.dht)))
            await trio.sleep_until(math.ceil(trio.current_time()) + 1)
            start = trio.current_time()
            # due at start + 0.052 .. 0.056, alternating senders: one pass at start + 0.060
            for n in range(5):
                await trio.sleep_until(start + 0.002 + n * 0.001)
                (a, b)[n % 2].sendto(bytes([0, n]), addr(c))
            await trio.sleep(1)
        assert inbox.payloads == [bytes([0, n]) for n in range(5)]
        assert [x.time for x in inbox.dht] == pytest.approx([start + 0.060] * 5)
        assert flushes == [5]


# --------------------------------------------------------------------------- impairments


async def test_loss_and_duplication_rates(autojump_clock: trio.testing.MockClock) -> None:
    n = 5000
    with trio.fail_after(TIMEOUT):
        async with running(seed=3, loss=0.2, duplicate=0.1) as (net, nursery):
            a, b = net.add_host().bind(1), net.add_host().bind(2)
            inbox = await serve(nursery, b)
            await send_spaced(a, addr(b), n, 0.001)
            await trio.sleep(10)
            assert net.in_flight == 0
        unique = set(inbox.payloads)
        assert_binomial(len(unique), n, 0.8)
        assert_binomial(len(inbox.payloads) - len(unique), len(unique), 0.1)
        assert net.stats["sent"] == n
        assert net.stats["lost"] == n - len(unique)
        assert net.stats["delivered"] == len(inbox.payloads)
        assert net.stats["sent"] + net.stats["duplicated"] == fates(net)


async def deliveries(seed: int) -> list[tuple[bytes, Source]]:
    """Five senders (two behind NATs) to one sink, on a lossy, jittery network."""
    async with running(seed=seed, loss=0.1, duplicate=0.1, jitter=0.5) as (net, nursery):
        sink = net.add_host().bind(9)
        inbox = await serve(nursery, sink)
        senders = [net.add_host(nat=nat).bind() for nat in (None, None, None, "eim", "edm")]
        for n in range(100):
            for s in senders:
                s.sendto(b"\x00" + n.to_bytes(2, "big"), addr(sink))
            await trio.sleep(0.002)
        await trio.sleep(5)
    return [(a.data, a.source) for a in inbox.dht]


async def test_the_same_seed_gives_the_same_deliveries_in_the_same_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        first = await deliveries(7)
        assert await deliveries(7) == first
        assert await deliveries(8) != first


# --------------------------------------------------------------------------- endpoints


async def test_demultiplexes_on_the_first_byte_and_flushes_once_per_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running(jitter=0.0) as (net, nursery):
            a, b = net.add_host().bind(1), net.add_host().bind(2)
            inbox = await serve(nursery, b)
            seen_at_flush: list[int] = []

            def hook() -> None:
                seen_at_flush.append(len(inbox.dht) + len(inbox.quic))

            b.add_flush_hook(hook)
            datagrams = [b"\x00d", b"\x03d", b"\x40q", b"\xc3q", b"\x04x", b"\x3fx", b"\x80x", b""]
            for data in datagrams:  # at one instant, one path: they arrive together
                a.sendto(data, addr(b))
            await trio.sleep(1)
            assert inbox.payloads == [b"\x00d", b"\x03d"]  # 0x00..0x03: the DHT's
            assert [x.data for x in inbox.quic] == [b"\x40q", b"\xc3q"]
            assert inbox.dht[0].source == addr(a)
            assert b.stats["datagrams_in"] == 8
            assert b.stats["dropped_unknown"] == 4
            assert seen_at_flush == [4]  # once, after the whole burst

            b.remove_flush_hook(hook)
            a.sendto(b"\x00e", addr(b))
            await trio.sleep(1)
            assert seen_at_flush == [4]

            # no QUIC handler: QUIC datagrams are dropped and counted
            c = net.add_host().bind(3)
            dht_only = Inbox()
            await nursery.start(c.serve, dht_only.on_dht)
            a.sendto(b"\x40q", addr(c))
            a.sendto(b"\x00d", addr(c))
            await trio.sleep(1)
            assert dht_only.payloads == [b"\x00d"]
            assert c.stats["dropped_unknown"] == 1


async def test_no_real_socket_is_touched(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fake network opened a real socket")

    monkeypatch.setattr(socket, "socket", forbidden)
    monkeypatch.setattr(trio.socket, "socket", forbidden)
    with trio.fail_after(TIMEOUT):
        async with running() as (net, nursery):
            a, b = net.add_host().bind(), net.add_host().bind()
            inbox = await serve(nursery, b)
            a.sendto(b"\x00x", addr(b))
            a.sendto(b"\x00x", ("127.0.0.1", b.local_address.port))
            a.sendto(b"\x00x", ("192.0.2.1", 53))
            await trio.sleep(1)
        assert inbox.payloads == [b"\x00x"]
        assert net.stats["no_listener"] == 2


async def test_bind_picks_free_ports_and_refuses_a_taken_one() -> None:
    net = FakeNetwork()
    host = net.add_host()
    ports = {host.bind().local_address.port for _ in range(50)}
    assert len(ports) == 50
    assert all(32768 <= p <= 60999 for p in ports)
    host.bind(4000)
    with pytest.raises(LocalError):
        host.bind(4000)
    natted = net.add_host(nat="edm")
    endpoint = natted.bind(4000)  # another host: the port is free there
    assert endpoint.local_address.host == natted.private_ip


async def test_a_closed_endpoint_receives_and_sends_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as (net, nursery):
            a, b = net.add_host().bind(1), net.add_host().bind(2)
            inbox = await serve(nursery, b)
            a.sendto(b"\x00in flight", addr(b))
            b.close()
            a.sendto(b"\x00after", addr(b))
            b.sendto(b"\x00from closed", addr(a))
            await trio.sleep(5)
            assert inbox.payloads == []
            assert net.stats["no_listener"] == 2
            assert net.stats["sent"] == 2
            assert b.stats["send_errors"] == 1

            again = b.host.bind(2)  # the port is free again
            inbox = await serve(nursery, again)
            a.sendto(b"\x00new", addr(again))
            await trio.sleep(5)
            assert inbox.payloads == [b"\x00new"]


async def test_shutdown_closes_every_endpoint_and_the_host_may_come_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as (net, nursery):
            a = net.add_host().bind(1)
            host = net.add_host(nat="eim")
            b1, b2 = host.bind(1), host.bind(2)
            inbox_a = await serve(nursery, a)
            inbox1, inbox2 = await serve(nursery, b1), await serve(nursery, b2)
            b1.sendto(b"\x00one", addr(a))  # opens b1's and b2's mappings to a
            b2.sendto(b"\x00two", addr(a))
            await trio.sleep(1)
            mapped = {x.data: x.source for x in inbox_a.dht}
            assert len(set(mapped.values())) == 2

            host.shutdown()
            assert host.endpoints == []
            assert b1.closed and b2.closed
            for source in mapped.values():
                a.sendto(b"\x00gone", source)
            b1.sendto(b"\x00from the dead", addr(a))
            await trio.sleep(1)
            assert inbox1.payloads == inbox2.payloads == []
            assert net.stats["no_listener"] == 2
            assert b1.stats["send_errors"] == 1

            # a restart: the NAT still holds the mapping for a while
            back = host.bind(1)
            inbox = await serve(nursery, back)
            a.sendto(b"\x00welcome back", mapped[b"\x00one"])
            await trio.sleep(1)
            assert inbox.payloads == [b"\x00welcome back"]


async def test_datagrams_wait_for_serve_in_a_bounded_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running(jitter=0.0) as (net, nursery):
            a, b = net.add_host().bind(1), net.add_host().bind(2)
            for n in range(RECEIVE_QUEUE + 10):
                a.sendto(b"\x00" + n.to_bytes(2, "big"), addr(b))
            await trio.sleep(1)
            inbox = await serve(nursery, b)
            assert len(inbox.payloads) == RECEIVE_QUEUE
            assert inbox.payloads[0] == b"\x00\x00\x00"
            assert b.stats["queue_dropped"] == 10
            assert net.stats["sent"] + net.stats["duplicated"] == fates(net)


async def test_a_raising_handler_or_hook_does_not_stop_delivery(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as (net, nursery):
            a, b = net.add_host().bind(1), net.add_host().bind(2)
            got: list[bytes] = []

            def on_dht(data: bytes, source: Source) -> None:
                got.append(data)
                if data[1] % 2:
                    raise ValueError("a bug in the protocol")

            def hook() -> None:
                raise RuntimeError("a bug in the flush")

            b.add_flush_hook(hook)
            await nursery.start(b.serve, on_dht)
            for n in range(10):
                a.sendto(bytes([0, n]), addr(b))
                await trio.sleep(1)
            await trio.sleep(1)
        assert sorted(got) == [bytes([0, n]) for n in range(10)]
        assert net.stats["handler_errors"] == b.stats["handler_errors"] == 5
        assert net.stats["flush_errors"] == 10


# --------------------------------------------------------------------------- addresses


def test_hosts_get_addresses_spread_over_24s() -> None:
    net = FakeNetwork()
    hosts = [net.add_host() for _ in range(600)]
    bench = ipaddress.ip_network("198.18.0.0/15")
    assert all(ipaddress.ip_address(h.ip) in bench for h in hosts)
    subnets = {ipaddress.ip_network(f"{h.ip}/24", strict=False) for h in hosts}
    assert len({ipaddress.ip_network(f"{h.ip}/24", strict=False) for h in hosts[:512]}) == 512
    assert len(subnets) == 512
    assert len({h.ip for h in hosts}) == 600

    natted = net.add_host(nat="eim")
    assert ipaddress.ip_address(natted.ip) in bench
    assert natted.private_ip is not None
    assert ipaddress.ip_address(natted.private_ip) in ipaddress.ip_network("10.0.0.0/8")
    assert net.add_host("203.0.113.5").ip == "203.0.113.5"
    with pytest.raises(LocalError):
        net.add_host("203.0.113.5")
    with pytest.raises(InvalidAddress):
        net.add_host("example.com")
    with pytest.raises(UsageError):
        net.add_host(nat="full-cone")
    with pytest.raises(UsageError):
        FakeNetwork(loss=1.5)


# --------------------------------------------------------------------------- NAT


async def test_eim_nat_keeps_one_port_and_admits_only_contacted_peers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as (net, nursery):
            host = net.add_host(nat="eim")
            inside = host.bind(5000)
            p, q, third = (net.add_host().bind(7) for _ in range(3))
            p_other_port = p.host.bind(8)
            inbox = await serve(nursery, inside)
            in_p, in_q = await serve(nursery, p), await serve(nursery, q)
            inside.sendto(b"\x00to p", addr(p))
            inside.sendto(b"\x00to q", addr(q))
            await trio.sleep(1)
            (seen_by_p,), (seen_by_q,) = [x.source for x in in_p.dht], [x.source for x in in_q.dht]
            assert seen_by_p[0] == seen_by_q[0] == host.ip != inside.local_address.host
            assert seen_by_p == seen_by_q  # the same public port for both destinations
            assert seen_by_p[1] != inside.local_address.port  # random, not preserved

            p.sendto(b"\x00reply", seen_by_p)
            third.sendto(b"\x00unsolicited", seen_by_p)
            p_other_port.sendto(b"\x00other port", seen_by_p)
            await trio.sleep(1)
            assert inbox.payloads == [b"\x00reply"]
            assert inbox.dht[0].source == addr(p)
            assert net.stats["nat_dropped"] == 2

            inside.sendto(b"\x00hairpin", seen_by_p)  # to its own public address
            await trio.sleep(1)
            assert inbox.dht[-1].data == b"\x00hairpin"
            assert inbox.dht[-1].source == seen_by_p


async def test_edm_nat_uses_a_port_per_destination(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as (net, nursery):
            host = net.add_host(nat="edm")
            inside = host.bind(5000)
            p, q = net.add_host().bind(7), net.add_host().bind(7)
            inbox = await serve(nursery, inside)
            in_p, in_q = await serve(nursery, p), await serve(nursery, q)
            inside.sendto(b"\x00to p", addr(p))
            inside.sendto(b"\x00to q", addr(q))
            await trio.sleep(1)
            seen_by_p, seen_by_q = in_p.dht[0].source, in_q.dht[0].source
            assert seen_by_p[0] == seen_by_q[0] == host.ip
            assert seen_by_p[1] != seen_by_q[1]

            p.sendto(b"\x00reply", seen_by_p)
            q.sendto(b"\x00to p's port", seen_by_p)  # q learned p's mapping somehow
            await trio.sleep(1)
            assert inbox.payloads == [b"\x00reply"]
            assert net.stats["nat_dropped"] == 1


@pytest.mark.parametrize("nat", ["eim", "edm"])
async def test_mappings_expire_without_outbound_traffic(
    autojump_clock: trio.testing.MockClock, nat: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running(nat_timeout=60, jitter=0.0) as (net, nursery):
            inside = net.add_host(nat=nat).bind(5000)
            peer = net.add_host().bind(7)
            inbox = await serve(nursery, inside)
            in_peer = await serve(nursery, peer)

            async def exchange(wait: float) -> bool:
                """The peer answers the last source it saw after ``wait``; did it get in?"""
                await trio.sleep(wait)
                before = len(inbox.dht)
                peer.sendto(b"\x00reply", in_peer.dht[-1].source)
                await trio.sleep(1)
                return len(inbox.dht) > before

            inside.sendto(b"\x00hello", addr(peer))
            await trio.sleep(1)
            assert await exchange(50)  # 51 s after the last datagram out: still open
            inside.sendto(b"\x00keepalive", addr(peer))  # refreshes the mapping
            await trio.sleep(1)
            assert await exchange(50)
            # inbound traffic does not refresh it: 61 s after the keep-alive it is gone
            assert not await exchange(8)
            assert net.stats["nat_dropped"] == 1

            first_mapping = in_peer.dht[-1].source
            inside.sendto(b"\x00hello again", addr(peer))  # a new mapping, a new port
            await trio.sleep(1)
            assert in_peer.dht[-1].source != first_mapping
            assert await exchange(0)


# --------------------------------------------------------------------------- failures


async def test_partition_and_blackout(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as (net, nursery):
            a, b, c = (net.add_host().bind(1) for _ in range(3))
            inboxes = [await serve(nursery, ep) for ep in (a, b, c)]

            def counts() -> list[int]:
                return [len(i.dht) for i in inboxes]

            net.set_partition([a.host], [b.host])  # c is in the rest
            for x, y in [(a, b), (b, a), (a, c), (c, b)]:
                x.sendto(b"\x00", addr(y))
            await trio.sleep(1)
            assert counts() == [0, 0, 0]
            assert net.stats["partitioned"] == 4
            net.set_partition()
            a.sendto(b"\x00", addr(b))
            await trio.sleep(1)
            assert counts() == [0, 1, 0]

            c.host.blackout(10)
            c.sendto(b"\x00", addr(a))
            a.sendto(b"\x00", addr(c))
            await trio.sleep(5)
            assert counts() == [0, 1, 0]
            await trio.sleep(6)
            c.sendto(b"\x00", addr(a))
            a.sendto(b"\x00", addr(c))
            await trio.sleep(1)
            assert counts() == [1, 1, 1]
            assert net.stats["blackout_dropped"] == 2


# --------------------------------------------------------------------------- scale


async def test_scale_two_thousand_endpoints_a_hundred_thousand_datagrams(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each endpoint (half of them behind NATs) sends 25 requests to random public
    endpoints, which answer at once: 100,000 datagrams, each one delivered."""
    rounds = 25
    with trio.fail_after(TIMEOUT):
        async with running(seed=1) as (net, nursery):
            endpoints = [
                net.add_host(nat=(None, "eim", None, "edm")[n % 4]).bind(4000) for n in range(2000)
            ]
            answered = 0

            def handler(ep: FakeUdpEndpoint) -> Callable[[bytes, Source], None]:
                def on_dht(data: bytes, source: Source) -> None:
                    nonlocal answered
                    if data[0] == 0:
                        ep.sendto(b"\x01" + data[1:], source)
                    else:
                        answered += 1

                return on_dht

            for ep in endpoints:
                await nursery.start(ep.serve, handler(ep))
            public = [addr(ep) for ep in endpoints if ep.host.nat is None]
            rng = random.Random(2)
            for _ in range(rounds):
                for ep in endpoints:
                    ep.sendto(b"\x00" + bytes(40), rng.choice(public))
                await trio.sleep(0.2)
            await trio.sleep(10)
        assert answered == rounds * len(endpoints)
        assert net.stats["sent"] == net.stats["delivered"] == 2 * answered
        assert net.in_flight == 0
