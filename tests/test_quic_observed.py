"""Address discovery on QUIC connections (issue 13, item 1): the report's codec, its
per-connection state on a clock we pass, two endpoints on loopback telling each other
where they see each other, and a real daemon that a lying peer cannot talk into a
wrong consensus."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio

from p2pd.errors import WireError
from p2pd.identity import Identity
from p2pd.keystore import load_identity
from p2pd.testing.daemons import DaemonProcess, cli_json, control_call, run_cli, wait_until
from p2pd.testing.waiting import wait_for
from p2pd.transport.quic import QuicEndpoint, QuicPeer, open_quic_endpoint
from p2pd.transport.quic.observed import (
    MIN_REPORT_GAP,
    REPORT_LEN,
    RESEND_INTERVAL,
    AddressReports,
    decode_report,
    encode_report,
    is_transport_datagram,
)
from p2pd.transport.udp import UdpEndpoint
from p2pd.wire import Address

TIMEOUT = 20

# --------------------------------------------------------------------------- codec


def test_a_report_is_23_bytes_and_decodes_to_what_was_sent() -> None:
    for address in (("198.51.100.7", 4747), ("2001:db8::1", 1)):
        data = encode_report(7, address)
        assert len(data) == REPORT_LEN == 23
        assert is_transport_datagram(data)
        assert decode_report(data) == (7, Address(*address))


def test_media_datagrams_are_not_the_transports() -> None:
    assert not is_transport_datagram(bytes([0x11]) + bytes(20))  # audio, format version 1
    assert not is_transport_datagram(bytes([0x15]) + bytes(20))
    assert is_transport_datagram(b"")


@pytest.mark.parametrize(
    "data",
    [
        encode_report(1, ("198.51.100.7", 4747))[:-1],  # short
        encode_report(1, ("198.51.100.7", 4747)) + b"\x00",  # long
        b"\x02" + encode_report(1, ("198.51.100.7", 4747))[1:],  # another kind
        b"\x01\x00\x00\x00\x00" + encode_report(1, ("198.51.100.7", 4747))[5:],  # seq 0
        encode_report(1, ("198.51.100.7", 4747))[:-2] + b"\x00\x00",  # port 0
        encode_report(1, ("0.0.0.0", 4747)),  # unspecified
        encode_report(1, ("224.0.0.1", 4747)),  # multicast
    ],
)
def test_malformed_reports_are_refused(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_report(data)


def test_random_bytes_never_raise_anything_but_wire_error() -> None:
    rng = random.Random(13)
    for _ in range(2000):
        data = bytes([1]) + rng.randbytes(rng.choice([0, 5, 22, 23, 24]))
        with suppress(WireError):
            decode_report(data)


# --------------------------------------------------------------------------- state


def test_a_report_goes_out_at_once_then_every_resend_interval_or_on_a_change() -> None:
    reports = AddressReports()
    first = reports.due(0.0, ("198.51.100.7", 4747))
    assert first is not None and decode_report(first)[0] == 1
    assert reports.due(1.0, ("198.51.100.7", 4747)) is None
    assert reports.deadline() == RESEND_INTERVAL
    again = reports.due(RESEND_INTERVAL, ("198.51.100.7", 4747))
    assert again is not None and decode_report(again)[0] == 2
    # The peer's NAT rebound: the new address at once.
    moved = reports.due(RESEND_INTERVAL + 0.5, ("198.51.100.7", 5000))
    assert moved is not None and decode_report(moved) == (3, Address("198.51.100.7", 5000))


def test_stale_and_too_frequent_reports_are_ignored() -> None:
    reports = AddressReports()
    assert reports.received(encode_report(5, ("198.51.100.7", 1)), 0.0) == Address(
        "198.51.100.7", 1
    )
    assert reports.received(encode_report(4, ("198.51.100.7", 2)), 10.0) is None  # older
    assert reports.received(encode_report(6, ("198.51.100.7", 3)), 0.5) is None  # too soon
    took = reports.received(encode_report(7, ("198.51.100.7", 4)), MIN_REPORT_GAP)
    assert took == Address("198.51.100.7", 4)


# --------------------------------------------------------------------------- endpoints


@asynccontextmanager
async def open_reporting_node(
    host: str, seen: list[tuple[QuicPeer, Address]]
) -> AsyncIterator[tuple[UdpEndpoint, QuicEndpoint, Identity]]:
    identity = Identity.generate("node")
    udp = UdpEndpoint.bind(Address(host, 0))
    try:
        async with (
            open_quic_endpoint(
                udp, identity, on_observed=lambda peer, addr: seen.append((peer, addr))
            ) as quic,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(udp.serve, lambda data, addr: None, quic.datagram_received)
            yield udp, quic, identity
            nursery.cancel_scope.cancel()
    finally:
        udp.close()


async def test_each_side_learns_where_the_other_sees_it() -> None:
    a_seen: list[tuple[QuicPeer, Address]] = []
    b_seen: list[tuple[QuicPeer, Address]] = []
    with trio.fail_after(TIMEOUT):
        async with (
            open_reporting_node("127.0.0.1", a_seen) as (a_udp, a_quic, _),
            open_reporting_node("127.0.0.1", b_seen) as (b_udp, b_quic, b_id),
        ):
            peer = await a_quic.connect(b_udp.local_address, b_id.public_key)
            await wait_for(lambda: bool(a_seen) and bool(b_seen), "both reports taken")
            assert a_seen == [(peer, a_udp.local_address)]
            assert b_seen[0][1] == b_udp.local_address
            assert a_quic.stats["quic_observed_sent"] == 1
            assert b_quic.stats["quic_observed_received"] == 1
            # Not use: the connection counts as idle all the same.
            assert peer.policy.last_activity <= peer.policy.last_send


async def test_a_lying_peer_cannot_flood_reports() -> None:
    """One connection that sends a report per packet gets one taken per second; junk of
    the transport's kinds is counted and dropped, the connection lives on."""
    seen: list[tuple[QuicPeer, Address]] = []
    quiet: list[tuple[QuicPeer, Address]] = []
    with trio.fail_after(TIMEOUT):
        async with (
            open_reporting_node("127.0.0.1", seen) as (_, victim, victim_id),
            open_reporting_node("127.0.0.1", quiet) as (v_udp, liar, _),
        ):
            del v_udp
            vaddr = victim.udp.local_address
            peer = await liar.connect(vaddr, victim_id.public_key)
            await wait_for(lambda: bool(seen), "the liar's own honest report")
            for seq in range(1000, 1200):
                peer.quic.send_datagram_frame(encode_report(seq, ("203.0.113.9", seq)))
                peer.quic.send_datagram_frame(b"\x01junk")
                peer.wake()
                await trio.sleep(0)  # a checkpoint: let the datagrams go out
            await wait_for(
                lambda: victim.stats["quic_transport_datagrams_malformed"] >= 150, "junk counted"
            )
            # 200 lies in well under a second: at most two taken after the honest one.
            assert 1 <= len(seen) <= 3
            assert victim.stats["quic_observed_ignored"] >= 190
            assert not peer.is_closing


# --------------------------------------------------------------------------- a daemon


def test_a_daemon_does_not_take_one_liars_reports_as_its_address(tmp_path: Path) -> None:
    """A real daemon on 127.0.0.1 hears where it is from two honest QUIC peers (in two
    /24s: 127.0.1.x, 127.0.2.x) and from a liar in a third that opens five connections
    from five of its IPs, each saying another address. ``p2pd status`` keeps the honest
    consensus: mapping ``none`` (both honest peers saw our own address), no public
    address, the lie held by one observer only, whatever the liar sends."""
    home = tmp_path / "alice"
    assert run_cli(home, "init", "alice", "--no-passphrase").returncode == 0
    (home / "config.toml").write_text("[dht]\nobserve_replies = false\n")
    key = load_identity(home, None).public_key
    with DaemonProcess(home, listen="127.0.0.1:0") as daemon:
        daemon.wait_ready()
        target = Address.parse(daemon.listen)
        lie = "203.0.113.66"
        trio.run(_talk_to, target, key, lie)

        def consensus_in() -> bool:
            counters = control_call(home, "status")["dht_counters"]
            return int(counters.get("observed_quic", 0)) >= 7  # 2 honest + 5 lies

        assert wait_until(consensus_in, 10.0, interval=0.2)
        status = cli_json(home, "status")
        reflexive = {r["address"]: r["observers"] for r in status["reflexive_addresses"]}
        assert reflexive.get(str(target)) == 2, status["reflexive_addresses"]
        assert sum(n for a, n in reflexive.items() if a.startswith(lie)) == 1
        assert status["nat_mapping"] == "none"
        assert status["public_address"] is None
        assert status["dht_counters"].get("observed", 0) == 0  # no DHT reply involved


async def _talk_to(target: Address, key: bytes, lie: str) -> None:
    with trio.fail_after(60):
        async with (
            open_reporting_node("127.0.1.1", []) as (_, honest1, _i1),
            open_reporting_node("127.0.2.1", []) as (_, honest2, _i2),
            AsyncExitStack() as stack,
        ):
            await honest1.connect(target, key)
            await honest2.connect(target, key)
            # The liar: five endpoints in its /24 (one observer group), a connection each.
            peers = []
            for n in range(5):
                node = open_reporting_node(f"127.0.3.{n + 1}", [])
                _, liar, _i = await stack.enter_async_context(node)
                peers.append(await liar.connect(target, key))
            # Each liar endpoint sent its honest report at once; the lies go out past the
            # gap (one report per connection per MIN_REPORT_GAP), so that they are taken.
            # (Five connections at once, one wait: this was one connection lying five
            # times, a gap apart, 5.5 s.)
            await trio.sleep(MIN_REPORT_GAP + 0.1)
            for n, peer in enumerate(peers):
                peer.quic.send_datagram_frame(encode_report(1000 + n, (lie, 40000 + n)))
                peer.wake()
            await trio.sleep(0.5)
