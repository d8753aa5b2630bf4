"""UDP segmentation offload (issue 14, "Raise the ceiling under it"): a batch of
datagrams for one destination leaves in one ``sendmsg`` with ``UDP_SEGMENT`` and
arrives as the same datagrams, byte for byte; where the kernel refuses, everything
still arrives, one by one; and the receive side splits coalesced (GRO) reads back into
the datagrams that were sent. Real sockets on 127.0.0.1 only."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import AsyncIterator

import pytest
import trio

from p2pd.daemon import bind_listen
from p2pd.transport.udp import (
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    SOL_UDP,
    UDP_GRO,
    UdpEndpoint,
    gso_supported,
    split_coalesced,
)
from p2pd.wire import Address

SO_NO_CHECK = 11  # asm-generic/socket.h: no UDP checksums, which GSO needs


def sender(sock: socket.socket | None = None) -> UdpEndpoint:
    if sock is None:
        return UdpEndpoint.bind(Address("127.0.0.1", 0), split=False)
    sock.bind(("127.0.0.1", 0))
    return UdpEndpoint(sock)


def receiver() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    return sock


def receive(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` datagrams, each read on its own (a plain socket: no GRO)."""
    got = [sock.recv(1 << 17) for _ in range(count)]
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):  # and nothing more
        sock.recv(1 << 17)
    return got


def datagrams(*sizes: int) -> list[bytes]:
    return [os.urandom(size) for size in sizes]


def kernel_offloads() -> bool:
    """Whether this kernel knows UDP_SEGMENT and UDP_GRO (whatever p2pd's default is):
    where it does, p2pd must use both unless told not to."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        if not gso_supported(sock):
            return False
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            return False
    return True


@pytest.fixture
async def endpoint() -> AsyncIterator[UdpEndpoint]:
    if not kernel_offloads():
        pytest.skip("this kernel has no UDP_SEGMENT")
    udp = sender()
    assert udp.gso and udp.gro  # on by default wherever the kernel can
    yield udp
    udp.close()


async def test_equal_datagrams_leave_in_one_call_and_arrive_as_sent(endpoint: UdpEndpoint) -> None:
    sent = datagrams(*[1200] * 10)
    sink = receiver()
    try:
        endpoint.send_many(sent, sink.getsockname())
        assert receive(sink, 10) == sent
        assert endpoint.stats["gso_sends"] == 1
        assert endpoint.stats["gso_datagrams"] == 10
    finally:
        sink.close()


async def test_a_shorter_last_datagram_ends_the_run(endpoint: UdpEndpoint) -> None:
    sent = datagrams(1000, 1000, 1000, 333)
    sink = receiver()
    try:
        endpoint.send_many(sent, sink.getsockname())
        assert receive(sink, 4) == sent
        assert endpoint.stats["gso_sends"] == 1
    finally:
        sink.close()


async def test_mixed_sizes_go_in_runs_and_keep_their_order(endpoint: UdpEndpoint) -> None:
    # Runs: [1200 1200 500] [1200 1200 1200 100] [900 900] [1300]: a longer datagram
    # can never be a run's last, and a run of one goes out plainly.
    sent = datagrams(1200, 1200, 500, 1200, 1200, 1200, 100, 900, 900, 1300)
    sink = receiver()
    try:
        endpoint.send_many(sent, sink.getsockname())
        assert receive(sink, len(sent)) == sent
        assert endpoint.stats["gso_sends"] == 3
        assert endpoint.stats["gso_datagrams"] == 9
    finally:
        sink.close()


async def test_a_batch_beyond_the_kernels_bounds_is_cut_into_several_calls(
    endpoint: UdpEndpoint,
) -> None:
    per_call = GSO_MAX_BYTES // 1200  # 54: bytes bind before segments
    sent = datagrams(*[1200] * (2 * per_call + 5))
    small = datagrams(*[100] * (GSO_MAX_SEGMENTS + 3))  # segments bind
    sink = receiver()
    try:
        endpoint.send_many(sent, sink.getsockname())
        assert receive(sink, len(sent)) == sent
        assert endpoint.stats["gso_sends"] == 3
        endpoint.send_many(small, sink.getsockname())
        assert receive(sink, len(small)) == small
        assert endpoint.stats["gso_sends"] == 5
        assert endpoint.stats["send_errors"] == endpoint.stats["gso_failed"] == 0
    finally:
        sink.close()


async def test_a_socket_that_refuses_segmentation_still_delivers_everything(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # SO_NO_CHECK (no UDP checksum) is a real socket the kernel will not segment for:
    # a segmented send fails with EINVAL, a plain one works.
    if not kernel_offloads():
        pytest.skip("this kernel has no UDP_SEGMENT")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    udp = sender(sock)
    sink = receiver()
    try:
        assert udp.gso  # the kernel knows the option; only a send will be refused
        first, second = datagrams(*[1200] * 6), datagrams(*[1200] * 6)
        with caplog.at_level(logging.INFO, logger="p2pd.transport.udp"):
            udp.send_many(first, sink.getsockname())
            udp.send_many(second, sink.getsockname())
        assert receive(sink, 12) == first + second
        assert not udp.gso  # off for this socket after the first refusal
        assert udp.stats["gso_refused"] == 1 and udp.stats["gso_sends"] == 0
        assert [r.getMessage() for r in caplog.records if "segmentation" in r.getMessage()] == [
            "UDP segmentation offload refused (Invalid argument): sending datagram by datagram"
        ]
    finally:
        sink.close()
        udp.close()


async def test_gso_off_sends_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PD_NO_GSO", "1")
    udp = sender()
    sink = receiver()
    try:
        assert not udp.gso and not udp.gro
        sent = datagrams(*[1200] * 5)
        udp.send_many(sent, sink.getsockname())
        assert receive(sink, 5) == sent
        assert udp.stats["gso_sends"] == 0
    finally:
        sink.close()
        udp.close()


async def test_coalesced_reads_are_split_into_the_datagrams_sent(endpoint: UdpEndpoint) -> None:
    """The receiving endpoint has GRO on: the kernel hands it a segmented send in one
    read, and :meth:`UdpEndpoint.serve` hands each datagram to its protocol."""
    if not kernel_offloads():
        pytest.skip("this kernel has no UDP_GRO")
    server = UdpEndpoint.bind(Address("127.0.0.1", 0))
    assert server.gro  # on by default
    # QUIC-looking first bytes (0x40 set), and a DHT frame in between to each its own
    quic = [b"\x40" + os.urandom(1199) for _ in range(20)] + [b"\x41" + os.urandom(99)]
    dht = [b"\x02" + os.urandom(50)]
    got: list[tuple[str, bytes, tuple[str, int]]] = []
    done = trio.Event()

    def collect(kind: str) -> object:
        def handler(data: bytes, addr: tuple[str, int]) -> None:
            got.append((kind, data, addr))
            if len(got) == len(quic) + len(dht):
                done.set()

        return handler

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, collect("dht"), collect("quic"))
                to = server.local_address.as_tuple()
                endpoint.send_many(quic, to)
                endpoint.send_many(dht, to)
                await done.wait()
                nursery.cancel_scope.cancel()
        me = endpoint.local_address.as_tuple()
        assert [d for kind, d, _ in got if kind == "quic"] == quic
        assert [d for kind, d, _ in got if kind == "dht"] == dht
        assert {addr for _, _, addr in got} == {me}
        assert server.stats["gro_reads"] >= 1  # the kernel did coalesce
        assert server.stats["datagrams_in"] == len(quic) + len(dht)
    finally:
        server.close()


def test_split_coalesced_takes_only_a_sane_segment_size() -> None:
    data = bytes(range(250))
    cmsg = [(SOL_UDP, UDP_GRO, struct.pack("=i", 100))]
    assert split_coalesced(data, cmsg) == [data[:100], data[100:200], data[200:]]
    for size in (0, -1, 250, 10**6):  # none cuts anything
        assert split_coalesced(data, [(SOL_UDP, UDP_GRO, struct.pack("=i", size))]) == [data]
    assert split_coalesced(data, [(SOL_UDP, UDP_GRO, b"\x01")]) == [data]  # truncated
    assert split_coalesced(data, [(socket.SOL_SOCKET, UDP_GRO, cmsg[0][2])]) == [data]


async def test_a_dual_stack_socket_segments_to_both_families_and_splits_what_it_reads(
    endpoint: UdpEndpoint,
) -> None:
    """The daemon's default socket (``::``, IPv4 mapped): segmented sends reach IPv4 and
    IPv6 peers, and a segmented IPv4 send read coalesced comes out split, from the
    peer's plain IPv4 spelling."""
    node = bind_listen(Address("::", 0))
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    v4 = receiver()
    try:
        v6.bind(("::1", 0))
        v6.settimeout(5)
        for sink in (v4, v6):
            sent = datagrams(*[1200] * 7, 10)
            node.send_many(sent, sink.getsockname()[:2])
            assert receive(sink, 8) == sent
        assert node.stats["gso_sends"] == 2 and node.stats["send_errors"] == 0
        quic = [b"\x40" + os.urandom(1199) for _ in range(12)]
        got: list[tuple[bytes, tuple[str, int]]] = []
        done = trio.Event()

        def on_quic(data: bytes, addr: tuple[str, int]) -> None:
            got.append((data, addr))
            if len(got) == len(quic):
                done.set()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(node.serve, lambda data, addr: None, on_quic)
                endpoint.send_many(quic, ("127.0.0.1", node.local_address.port))
                await done.wait()
                nursery.cancel_scope.cancel()
        assert [data for data, _ in got] == quic
        assert {addr for _, addr in got} == {endpoint.local_address.as_tuple()}
        if node.gro:
            assert node.stats["gro_reads"] >= 1
    finally:
        v4.close()
        v6.close()
        node.close()


async def test_dht_datagrams_segmented_behind_a_quic_one_do_not_skip_the_other_queue() -> None:
    """An attacker's segmented send: one QUIC-looking datagram, then DHT frames of the
    same size. With GRO the kernel coalesces them and steers the whole run by its first
    byte into QUIC's queue, which has no read budget (issue 12): the DHT frames read
    there are dropped and counted, never handed to the DHT. The same frames sent
    plainly still reach the DHT through the other queue (the control)."""
    if not kernel_offloads():
        pytest.skip("this kernel has no UDP_GRO")
    server = UdpEndpoint.bind(Address("127.0.0.1", 0))  # two queues, GRO on QUIC's
    assert server.gro  # on by default
    if server.stats["queues"] != 2:
        server.close()
        pytest.skip("this kernel gives no second receive queue")
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.1", 0))
    size = 200
    smuggled = [b"\x40" + os.urandom(size - 1)] + [b"\x02" + os.urandom(size - 1) for _ in range(9)]
    plain = [b"\x03" + os.urandom(size - 1) for _ in range(3)]
    got: dict[str, list[bytes]] = {"dht": [], "quic": []}
    done = trio.Event()

    def collect(kind: str) -> object:
        def handler(data: bytes, addr: tuple[str, int]) -> None:
            got[kind].append(data)
            if len(got["dht"]) == len(plain):
                done.set()

        return handler

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, collect("dht"), collect("quic"))
                to = server.local_address.as_tuple()
                segment = [(SOL_UDP, 103, struct.pack("=H", size))]  # UDP_SEGMENT
                attacker.sendmsg(smuggled, segment, 0, to)
                for data in plain:
                    attacker.sendto(data, to)
                await done.wait()
                await trio.sleep(0.1)  # anything else queued is read by now
                nursery.cancel_scope.cancel()
        assert got["quic"] == smuggled[:1]
        assert got["dht"] == plain  # not one of the nine smuggled frames
        assert server.stats["quic_queue_not_quic"] == len(smuggled) - 1
    finally:
        attacker.close()
        server.close()
