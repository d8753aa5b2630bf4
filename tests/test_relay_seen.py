"""Relays say where they see the other end of a circuit (issue 13, item 2): the SEEN
frame, who sends it, who takes it, and hole punching that probes the address it names.
Sans-I/O, with the relay tests' network (tests/test_relay.py) and the upgrade tests'
fakes (tests/test_upgrade.py)."""

from __future__ import annotations

import pytest
import trio
from test_relay import ALICE, BOB, BOB_ID, MALLORY, RELAY, Net, circuit, register_bob
from test_upgrade import GOOD, FakePeer, FakeRunner, FakeStream

from p2pd.relay import RelayFrameError
from p2pd.relay.frames import FrameType, Seen, decode
from p2pd.relay.upgrade import DirectUpgrade
from p2pd.wire import Address, encode_observed

VIRTUAL = ("100:0:0:1::1", 1)


def test_a_seen_frame_is_27_bytes_and_decodes_to_what_was_sent() -> None:
    for address in (Address("198.18.11.1", 50002), Address("2001:db8:2::11", 4747)):
        data = Seen(b"c" * 8, address).encode()
        assert len(data) == 27 and data[0] == FrameType.SEEN == 0x11
        assert decode(data) == Seen(b"c" * 8, address)


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x11]) + b"c" * 8 + encode_observed(("198.18.11.1", 1))[:-2] + b"\0\0",  # port 0
        bytes([0x11]) + b"c" * 8 + encode_observed(("198.18.11.1", 1)) + b"\0",  # long
        bytes([0x11]) + b"c" * 8 + encode_observed(("198.18.11.1", 1))[:-1],  # short
    ],
)
def test_malformed_seen_frames_are_refused(data: bytes) -> None:
    with pytest.raises(RelayFrameError):
        decode(data)


def test_each_end_of_a_circuit_hears_where_the_relay_sees_the_other() -> None:
    net = Net()
    alice_v, bob_v = circuit(net)
    assert net.clients[ALICE].peer_seen(alice_v) == Address(*BOB)
    assert net.clients[BOB].peer_seen(bob_v) == Address(*ALICE)
    assert net.clients[ALICE].stats["peer_seen"] == 1
    assert net.clients[BOB].stats["peer_seen"] == 1


def test_the_answers_to_a_connect_stay_smaller_than_it() -> None:
    """INCOMING and SEEN to the target for a 145-byte CONNECT; CONNECTED and SEEN to the
    initiator for a 9-byte ACCEPT go to the address that proved itself for the CONNECT."""
    net = Net()
    register_bob(net)
    net.clients[ALICE].open_circuit(RELAY, BOB_ID.public_key, net.now)
    net.pump()
    connects = [d for s, t, d in net.sent if t == RELAY and d[0] == FrameType.CONNECT]
    answers = [d for s, t, d in net.sent if s == RELAY and t == BOB and d[0] != FrameType.CHALLENGE]
    answers = [d for d in answers if d[0] in (FrameType.INCOMING, FrameType.SEEN)]
    assert len(connects) == 1 and len(connects[0]) == 145
    assert sum(map(len, answers)) == 41 + 27 < 145


def test_only_the_circuits_relay_may_say_where_the_peer_is() -> None:
    net = Net()
    alice_v, _ = circuit(net)
    (alice_circuit,) = net.clients[ALICE]._circuits.values()
    lie = Seen(alice_circuit.circuit_id, Address("203.0.113.5", 9)).encode()
    net.clients[ALICE].datagram_received(lie, MALLORY, net.now)  # not the relay
    unknown = Seen(b"x" * 8, Address("203.0.113.5", 9)).encode()
    net.clients[ALICE].datagram_received(unknown, RELAY, net.now)  # no such circuit
    assert net.clients[ALICE].peer_seen(alice_v) == Address(*BOB)
    assert net.clients[ALICE].stats["dropped_seen_unknown"] == 2


def _upgrade(seen: Address | None) -> tuple[DirectUpgrade, FakeRunner]:
    runner = FakeRunner()
    up = DirectUpgrade(
        quic=None,  # type: ignore[arg-type]
        runner=runner,  # type: ignore[arg-type]
        mapping=lambda: "endpoint-independent",
        candidates=lambda: [Address("198.18.77.1", 4747)],
        may_share_addresses=lambda key: True,
        relay_seen=lambda virtual: seen if virtual == VIRTUAL else None,
    )
    return up, runner


@pytest.mark.parametrize("seen", [Address("198.18.12.1", 4747), None])
def test_punching_probes_the_address_the_relay_saw(seen: Address | None) -> None:
    """The peer's offer names 198.18.9.9:4000 only (tests/test_upgrade.py's GOOD); the
    plan's remote candidates get the relay's address first when there is one."""
    up, runner = _upgrade(seen)
    stream_chunks = list(GOOD)

    async def main() -> None:
        stream = FakeStream(stream_chunks[1:])
        await up.handle_stream(FakePeer(VIRTUAL), stream, stream_chunks[0])  # type: ignore[arg-type]

    trio.run(main)
    (plan,) = runner.plans
    if seen is None:
        assert plan.remote == (Address("198.18.9.9", 4000),)
        assert up.stats["relay_seen_candidates"] == 0
    else:
        assert plan.remote == (seen, Address("198.18.9.9", 4000))
        assert up.stats["relay_seen_candidates"] == 1
