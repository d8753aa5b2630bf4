"""The upgrade stream's rules (p2pd/relay/upgrade.py) against a hostile peer, in memory:
a stream that is not on a relayed connection, a bad version, a frame over its bound, a
flood of bytes, a stranger when addresses are for contacts only. Each is refused and
counted, and no offer of ours (our addresses) is written. The whole upgrade between real
daemons through real NATs is tests/test_upgrade_netns.py."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from p2pd.relay.upgrade import MAX_TRIES, T_CONNECT, T_SYNC, UPGRADE_MAGIC, DirectUpgrade
from p2pd.transport.punch import PunchOffer
from p2pd.transport.punch_driver import PunchOutcome
from p2pd.wire import Address

VIRTUAL = ("100:0:0:1::1", 1)  # a relay circuit's address (p2pd/relay/client.py)
OURS = Address("198.18.77.1", 4747)


@dataclass
class FakeStream:
    incoming: list[bytes]
    sent: bytearray = field(default_factory=bytearray)
    was_reset: bool = False

    async def receive_some(self, n: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.incoming.pop(0) if self.incoming else b""

    async def send_all(self, data: bytes, eof: bool = False) -> None:
        self.sent += data

    def reset(self) -> None:
        self.was_reset = True

    async def __aenter__(self) -> FakeStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None


@dataclass
class FakePeer:
    address: tuple[str, int]
    public_key: bytes = b"k" * 32


class FakeRunner:
    def __init__(self) -> None:
        self.plans: list[Any] = []
        self.stats: dict[str, int] = {}

    async def attempt(self, plan: Any) -> PunchOutcome:
        self.plans.append(plan)
        return PunchOutcome(None)


def frame(kind: int, body: bytes) -> bytes:
    return struct.pack(">BH", kind, len(body)) + body


def upgrade(contacts_only: bool = False) -> tuple[DirectUpgrade, FakeRunner]:
    runner = FakeRunner()
    up = DirectUpgrade(
        quic=None,  # type: ignore[arg-type]
        runner=runner,  # type: ignore[arg-type]
        mapping=lambda: "endpoint-independent",
        candidates=lambda: [OURS],
        may_share_addresses=lambda key: not contacts_only,
    )
    return up, runner


def offer_bytes() -> bytes:
    return PunchOffer.new("endpoint-dependent", [Address("198.18.9.9", 4000)]).encode()


def run(up: DirectUpgrade, peer: FakePeer, chunks: list[bytes]) -> FakeStream:
    stream = FakeStream(chunks[1:])

    async def main() -> None:
        await up.handle_stream(peer, stream, chunks[0])  # type: ignore[arg-type]

    trio.run(main)
    return stream


HEADER = bytes([UPGRADE_MAGIC, 1])
GOOD = [HEADER + frame(T_CONNECT, offer_bytes()), frame(T_SYNC, b"")]
BAD_VERSION = bytes([UPGRADE_MAGIC, 9]) + frame(T_CONNECT, offer_bytes())


def test_a_good_exchange_answers_with_our_offer_and_punches() -> None:
    up, runner = upgrade()
    stream = run(up, FakePeer(VIRTUAL), GOOD)
    assert not stream.was_reset
    assert stream.sent[0] == T_CONNECT and OURS.encode() in stream.sent
    assert len(runner.plans) == 1 and runner.plans[0].role == 1


@pytest.mark.parametrize(
    ("why", "peer", "chunks"),
    [
        ("not relayed", FakePeer(("198.18.9.9", 4000)), [HEADER + frame(T_CONNECT, offer_bytes())]),
        (
            "bad version",
            FakePeer(VIRTUAL),
            [BAD_VERSION],
        ),
        ("frame too long", FakePeer(VIRTUAL), [HEADER + struct.pack(">BH", T_CONNECT, 5000)]),
        ("not an offer", FakePeer(VIRTUAL), [HEADER + frame(T_CONNECT, b"\x01" * 50)]),
        ("SYNC first", FakePeer(VIRTUAL), [HEADER + frame(T_SYNC, b"")]),
        ("a flood", FakePeer(VIRTUAL), [HEADER + b"\x01\x00\xff"] + [b"x" * 1000] * 10),
        ("ends early", FakePeer(VIRTUAL), [HEADER + b"\x01"]),
    ],
)
def test_hostile_upgrade_streams_are_refused(why: str, peer: FakePeer, chunks: list[bytes]) -> None:
    up, runner = upgrade()
    stream = run(up, peer, chunks)
    assert stream.was_reset, why
    assert OURS.encode() not in stream.sent, why  # our addresses never written
    assert runner.plans == [], why
    assert up.stats["upgrades_refused"] == 1, why


def test_a_stranger_gets_no_addresses_when_they_are_for_contacts() -> None:
    up, runner = upgrade(contacts_only=True)
    stream = run(up, FakePeer(VIRTUAL), GOOD)
    assert stream.was_reset and OURS.encode() not in stream.sent and runner.plans == []


class PingedPeer(FakePeer):
    """A direct connection whose far side answers every PING at once, unless ``deaf``."""

    pings = 0
    is_closing = False
    deaf = False
    last_received = 0.0

    def ping(self) -> None:
        self.pings += 1
        if not self.deaf:
            self.last_received = trio.current_time()

    def close(self, reason: str = "") -> None:
        self.is_closing = True


class FakeQuic:
    def __init__(self, peers: list[PingedPeer]) -> None:
        self._peers = peers

    def peers(self) -> list[PingedPeer]:
        return self._peers


def _pinging(peers: list[Any], natted: Callable[[], bool]) -> DirectUpgrade:
    """An upgrade over ``peers`` (FakeQuic) that PINGs direct paths every 4 s while
    ``natted`` says so."""
    return DirectUpgrade(
        quic=FakeQuic(peers),  # type: ignore[arg-type]
        runner=FakeRunner(),  # type: ignore[arg-type]
        mapping=lambda: "endpoint-independent",
        candidates=lambda: [OURS],
        may_share_addresses=lambda key: True,
        natted=natted,
        ping_interval=4.0,
    )


async def test_a_natted_node_pings_its_direct_connections_to_hold_their_mappings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 13, item 5: behind a NAT, every direct connection gets a PING every
    ``ping_interval`` (what brings a path back after the NAT forgot its mapping);
    relayed ones do not (the relay keepalive holds those); a reachable node pings none."""
    direct, relayed = PingedPeer(("198.18.9.9", 4000)), PingedPeer(VIRTUAL)
    direct.last_received = trio.current_time()
    natted = [True]
    up = _pinging([direct, relayed], lambda: natted[0])
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        start = trio.current_time()
        await trio.sleep(20.5)
        natted[0] = False
        await trio.sleep(20.0)
        nursery.cancel_scope.cancel()
    assert (direct.pings, relayed.pings) == (5, 0)
    assert up.stats["direct_pings"] == 5
    assert trio.current_time() - start >= 40.0


class RelayedPeer(PingedPeer):
    """A relayed connection whose far side answers every upgrade stream with an offer."""

    is_closing = False
    streams = 0

    async def open_stream(self) -> FakeStream:
        self.streams += 1
        return FakeStream([frame(T_CONNECT, offer_bytes())])


async def test_an_attempt_that_found_no_path_is_tried_again_while_the_relay_lasts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A birthday attempt misses about one time in 50: the pair would stay relayed for
    as long as the relayed connection lasts (a clean-clone CI run saw it). A miss is
    tried again RETRY_DELAYS (1, 8, 30 s) after it ended, backing off, at most MAX_TRIES
    (4) times in all, all before an idle relayed connection closes (60 s after its last
    traffic, the attempt's upgrade stream), and not once it has closed."""
    for close_after in (None, 1):
        peer = RelayedPeer(VIRTUAL)
        runner = FakeRunner()  # every attempt finds no path
        up = DirectUpgrade(
            quic=FakeQuic([peer]),  # type: ignore[arg-type]
            runner=runner,  # type: ignore[arg-type]
            mapping=lambda: "endpoint-independent",
            candidates=lambda: [OURS],
            may_share_addresses=lambda key: True,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(up.run)
            up.on_relayed_connection(peer)  # type: ignore[arg-type]
            start = trio.current_time()
            for _ in range(1200):  # 10 virtual minutes, bounded
                await trio.sleep(0.5)
                if close_after is not None and len(runner.plans) >= close_after:
                    peer.is_closing = True
            nursery.cancel_scope.cancel()
        if close_after is None:
            assert len(runner.plans) == MAX_TRIES == 4, runner.plans  # then it stops
            starts = [p.start - start for p in runner.plans]
            assert [round(s) for s in starts] == [0, 1, 9, 39], starts
            gaps = [b - a for a, b in itertools.pairwise(starts)]
            assert gaps == sorted(gaps) and max(gaps) < 60, gaps
        else:
            assert len(runner.plans) == 1  # closed before the retry: no second attempt
        assert up.stats["upgrades_failed"] == len(runner.plans)


async def test_a_direct_path_that_hears_nothing_is_closed_behind_a_nat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 13, item 5: a direct connection whose PINGs draw nothing for three ping
    intervals has lost its path (the peer's NAT or ours moved) and is closed, so that
    delivery and calls take a relay; one that answers is kept."""
    alive, dead = PingedPeer(("198.18.9.9", 4000)), PingedPeer(("198.18.9.10", 4000))
    alive.last_received = dead.last_received = trio.current_time()
    dead.deaf = True
    up = _pinging([alive, dead], lambda: True)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await trio.sleep(12.5)
        assert not dead.is_closing  # 12 s silent: not yet
        await trio.sleep(4.0)
        assert dead.is_closing and not alive.is_closing
        nursery.cancel_scope.cancel()
    assert up.stats["direct_closed_silent"] == 1


async def test_after_our_mapping_moved_a_path_that_does_not_answer_is_closed_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A relay said our NAT mapped us anew: every direct connection is PINGed at once;
    one that answers (a public peer follows us) stays, one that hears nothing 2 s later
    (a peer behind a NAT that lets in only our old address) is closed."""
    follows, lost = PingedPeer(("198.18.9.9", 4000)), PingedPeer(("198.18.9.10", 4000))
    lost.deaf = True
    up = _pinging([follows, lost], lambda: True)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await trio.sleep(0.5)
        moved_at = trio.current_time()
        up.our_mapping_moved()
        assert (follows.pings, lost.pings) == (1, 1)
        await trio.sleep(1.9)
        assert not lost.is_closing
        await trio.sleep(0.2)
        assert lost.is_closing and not follows.is_closing
        assert trio.current_time() - moved_at < 2.5
        nursery.cancel_scope.cancel()
    assert up.stats["direct_closed_moved"] == 1
