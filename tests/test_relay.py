"""The relay's and the relay client's sans-I/O cores (p2pd/relay/), moved by hand with
``now`` advanced, as tests/test_dht_core.py does: registration, circuits that both ends
asked for, refusals, spoofed requests, caps, the amplification bound, malformed frames."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pd.config import RelayConfig
from p2pd.delivery.paths import RELAY_HEAD_START, RELAY_STAGGER, Paths
from p2pd.identity import Identity
from p2pd.records import HandleRecord
from p2pd.relay import RelayClient, RelayFrameError, RelayServer, is_virtual, virtual_address
from p2pd.relay.client import RELAY_BACKOFF
from p2pd.relay.frames import (
    DATA_HEADER,
    Alive,
    FrameType,
    Hello,
    Keepalive,
    Register,
    decode,
)
from p2pd.relay.server import REGISTRATION_LIFETIME, VERIFY_RATE
from p2pd.transport.quic.admission import source_key
from p2pd.wire import Address

Addr = tuple[str, int]
RELAY: Addr = ("198.18.1.11", 4747)
RELAY2: Addr = ("198.18.2.11", 4747)
ALICE: Addr = ("198.18.10.1", 40001)
BOB: Addr = ("198.18.11.1", 50002)
MALLORY: Addr = ("198.18.66.6", 6666)

ALICE_ID = Identity.from_seed("alice", bytes(range(32)))
BOB_ID = Identity.from_seed("bob", bytes(range(1, 33)))
MALLORY_ID = Identity.from_seed("mallory", bytes(range(2, 34)))


class Net:
    """Relays and clients at fixed addresses; ``pump`` moves datagrams until quiet,
    ``lost`` drops what goes to an address; ``sent`` logs every datagram."""

    def __init__(self, **config: int) -> None:
        self.now = 1000.0
        self.relays = {RELAY: RelayServer(RelayConfig(**config)), RELAY2: RelayServer()}
        self.clients = {
            ALICE: RelayClient(ALICE_ID.sign, ALICE_ID.public_key),
            BOB: RelayClient(BOB_ID.sign, BOB_ID.public_key),
        }
        self.received: dict[Addr, list[tuple[bytes, Addr]]] = {ALICE: [], BOB: []}
        self.lost: set[Addr] = set()
        self.sent: list[tuple[Addr, Addr, bytes]] = []  # (from, to, data)

    def deliver(self, data: bytes, src: Addr, dst: Addr) -> None:
        self.sent.append((src, dst, data))
        if dst in self.lost or src in self.lost:
            return
        if dst in self.relays:
            for out, to in self.relays[dst].datagram_received(data, src, self.now):
                self.deliver(out, dst, to)
        elif dst in self.clients:
            packet = self.clients[dst].datagram_received(data, src, self.now)
            if packet is not None:
                self.received[dst].append(packet)

    def pump(self) -> None:
        for _ in range(100):
            moved = False
            for addr, client in self.clients.items():
                for data, to in client.datagrams_to_send():
                    moved = True
                    self.deliver(data, addr, to)
            if not moved:
                return
        raise AssertionError("the datagrams never stopped")

    def advance(self, seconds: float, step: float = 0.5) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for relay in self.relays.values():
                relay.handle_timer(self.now)
            for client in self.clients.values():
                client.handle_timer(self.now)
            self.pump()


def register_bob(net: Net, relays: Iterable[Addr] = (RELAY,)) -> None:
    net.clients[BOB].keep_registrations(list(relays), net.now)
    net.pump()


def circuit(net: Net) -> tuple[Addr, Addr]:
    """Bob registered, Alice's circuit to him: (her virtual address, his)."""
    register_bob(net)
    request = net.clients[ALICE].open_circuit(RELAY, BOB_ID.public_key, net.now)
    net.pump()
    assert request.done and request.error is None and request.virtual is not None
    (bob_side,) = net.clients[BOB]._by_virtual
    return request.virtual, bob_side


def test_register_then_a_circuit_both_asked_for_carries_packets_both_ways() -> None:
    net = Net()
    register_bob(net)
    assert net.clients[BOB].registered() == [RELAY]
    alice_v, bob_v = circuit(net)
    assert is_virtual(alice_v[0]) and is_virtual(bob_v[0])
    packet = b"\xc0" + bytes(range(256)) * 4  # what QUIC would send
    assert net.clients[ALICE].wrap(packet, alice_v, net.now)
    net.pump()
    assert net.received[BOB] == [(packet, bob_v)]
    assert net.clients[BOB].wrap(b"\x40answer", bob_v, net.now)
    net.pump()
    assert net.received[ALICE] == [(b"\x40answer", alice_v)]
    stats = net.relays[RELAY].statistics()
    assert stats["circuits"] == 1 and stats["registrations"] == 1
    assert stats["relayed_bytes"] == len(packet) + 7 + 2 * DATA_HEADER
    # the circuit knows who is at the other end
    assert net.clients[ALICE].circuit_of(alice_v) == (RELAY, BOB_ID.public_key)
    assert net.clients[BOB].circuit_of(bob_v) == (RELAY, ALICE_ID.public_key)


def test_virtual_addresses_are_distinct_sources_and_never_real_ones() -> None:
    a, b = virtual_address(1), virtual_address(2)
    assert a != b and source_key(a[0]) != source_key(b[0])
    assert is_virtual(a[0]) and not is_virtual("198.18.1.11") and not is_virtual("2001:db8::1")
    assert not is_virtual("::ffff:10.0.0.1")


def test_no_circuit_to_a_key_that_did_not_register() -> None:
    net = Net()
    request = net.clients[ALICE].open_circuit(RELAY, BOB_ID.public_key, net.now)
    net.pump()
    assert request.done and request.virtual is None
    assert "unknown_target" in str(request.error)
    # nothing ever went to bob's address
    assert not [s for s in net.sent if s[1] == BOB]


def test_a_circuit_the_target_did_not_accept_forwards_nothing() -> None:
    net = Net()
    register_bob(net)
    net.lost.add(BOB)  # bob's ACCEPT never comes
    relay = net.relays[RELAY]
    request = net.clients[ALICE].open_circuit(RELAY, BOB_ID.public_key, net.now)
    net.pump()
    assert not request.done
    (circuit_id,) = relay._circuits
    before = len(net.sent)
    # alice (or anyone) sends data on the pending circuit: dropped, nothing out
    data = bytes([FrameType.DATA_TO_RELAY]) + circuit_id + b"\x40hello"
    assert relay.datagram_received(data, ALICE, net.now) == []
    assert relay.stats["dropped_data_no_circuit"] == 1
    net.advance(6.0)
    assert request.done and request.error == "the relay did not answer"
    net.advance(6.0)
    assert relay.statistics()["circuits_pending"] == 0  # forgotten
    assert all(s[0] != RELAY or s[1] != BOB or s[2][0] != FrameType.DATA_FROM_RELAY
               for s in net.sent[before:])  # fmt: skip


def test_an_incoming_circuit_from_a_relay_we_did_not_register_with_is_ignored() -> None:
    net = Net()
    client = net.clients[BOB]
    incoming = bytes([FrameType.INCOMING]) + bytes(8) + ALICE_ID.public_key
    assert client.datagram_received(incoming, RELAY2, net.now) is None
    assert client.datagrams_to_send() == []  # no ACCEPT to a stranger
    assert client.stats["dropped_incoming_unregistered"] == 1


def test_spoofed_registrations_are_refused() -> None:
    net = Net()
    relay = net.relays[RELAY]
    now = net.now
    # Mallory, at her own address, gets a cookie for it...
    ((challenge, to),) = relay.datagram_received(Hello(b"n" * 8).encode(), MALLORY, now)
    assert to == MALLORY
    cookie = decode(challenge).cookie  # type: ignore[union-attr]
    # ...and cannot register bob's key with it: she cannot sign for it
    forged = Register(BOB_ID.public_key, cookie, MALLORY_ID.sign(Register.signed_part(cookie)))
    ((refusal, _),) = relay.datagram_received(forged.encode(), MALLORY, now)
    assert decode(refusal).reason == 2  # type: ignore[union-attr]  # BAD_SIGNATURE
    # nor register her own key at bob's address (a spoofed source): the cookie is for hers
    own = Register(MALLORY_ID.public_key, cookie, MALLORY_ID.sign(Register.signed_part(cookie)))
    ((refusal, to),) = relay.datagram_received(own.encode(), BOB, now)
    assert decode(refusal).reason == 1  # type: ignore[union-attr]  # BAD_COOKIE
    assert len(refusal) < len(own.encode())  # what bob gets is smaller than what was spoofed
    # bob's genuine registration, replayed by mallory from her address: the cookie is bob's
    register_bob(net)
    (replay,) = [s[2] for s in net.sent if s[2][0] == FrameType.REGISTER]
    relay.datagram_received(replay, MALLORY, now)
    assert relay._registrations[BOB_ID.public_key].address == BOB
    assert relay.statistics()["registrations"] == 1
    assert relay.stats["refused_bad_cookie"] == 2 and relay.stats["refused_bad_signature"] == 1
    # an old cookie (two minutes later) no longer works
    ((refusal, _),) = relay.datagram_received(replay, BOB, now + 130)
    assert decode(refusal).reason == 1  # type: ignore[union-attr]


def test_only_the_two_ends_of_a_circuit_use_it() -> None:
    net = Net()
    circuit(net)
    relay = net.relays[RELAY]
    (circuit_id,) = relay._circuits
    # Mallory knows the circuit id (say, on path) and sends from her address: dropped
    data = bytes([FrameType.DATA_TO_RELAY]) + circuit_id + b"\x40x" * 100
    assert relay.datagram_received(data, MALLORY, net.now) == []
    assert relay.stats["dropped_data_wrong_source"] == 1
    # and a forged ACCEPT from her changes nothing
    accept = bytes([FrameType.ACCEPT]) + circuit_id
    assert relay.datagram_received(accept, MALLORY, net.now) == []
    # a packet for an unknown circuit at a client: dropped
    unknown = bytes([FrameType.DATA_FROM_RELAY]) + b"\xff" * 8 + b"\x40x"
    assert net.clients[ALICE].datagram_received(unknown, RELAY, net.now) is None
    assert net.clients[ALICE].stats["dropped_data_unknown"] == 1


def test_relayed_frames_are_exactly_as_large_as_what_came_in() -> None:
    net = Net()
    circuit(net)
    relay = net.relays[RELAY]
    (circuit_id,) = relay._circuits
    for size in (1, 100, 1200, 1452):
        data = bytes([FrameType.DATA_TO_RELAY]) + circuit_id + b"\x40" * size
        ((out, to),) = relay.datagram_received(data, ALICE, net.now)
        assert to == BOB and len(out) == len(data) and out[DATA_HEADER:] == data[DATA_HEADER:]
    too_big = bytes([FrameType.DATA_TO_RELAY]) + circuit_id + b"\x40" * 1453
    assert relay.datagram_received(too_big, ALICE, net.now) == []
    assert relay.stats["dropped_malformed"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1600), st.sampled_from([ALICE, BOB, MALLORY]))
def test_no_input_draws_more_bytes_than_it_carries(data: bytes, source: Addr) -> None:
    """Whatever one datagram holds, the relay answers with no more bytes than it came
    with, to any address (a registered client or circuit in place)."""
    net = Net()
    circuit(net)
    relay = net.relays[RELAY]
    out = relay.datagram_received(data, source, net.now)
    assert sum(len(d) for d, _ in out) <= len(data)
    for client in net.clients.values():
        client.datagram_received(data, RELAY, net.now)  # never raises


@given(st.binary(max_size=1600))
def test_garbage_raises_only_relay_frame_error(data: bytes) -> None:
    try:
        frame = decode(data)
    except RelayFrameError:
        return
    assert frame.encode() == data or data[0] == FrameType.HELLO


def test_malformed_frames_are_counted_and_dropped() -> None:
    net = Net()
    relay, client = net.relays[RELAY], net.clients[ALICE]
    for data in (b"\x04", b"\x06" + bytes(10), b"\x3e" + bytes(40), b"\x0d" + bytes(8)):
        assert relay.datagram_received(data, MALLORY, net.now) == []
    assert relay.stats["dropped_malformed"] == 4
    # frames for the other side are not taken either
    challenge = bytes([FrameType.CHALLENGE]) + bytes(24)
    assert relay.datagram_received(challenge, MALLORY, net.now) == []
    assert relay.stats["dropped_wrong_direction"] == 1
    assert client.datagram_received(b"\x05" + bytes(3), RELAY, net.now) is None
    assert client.datagram_received(Hello(bytes(8)).encode(), RELAY, net.now) is None
    assert client.stats["dropped_malformed"] == 1 and client.stats["dropped_wrong_direction"] == 1
    assert client.datagrams_to_send() == []


def test_registrations_are_capped_per_address_and_in_all() -> None:
    net = Net(max_registrations_per_address=1)
    relay = net.relays[RELAY]
    register_bob(net)
    other = RelayClient(MALLORY_ID.sign, MALLORY_ID.public_key)
    other.keep_registrations([RELAY], net.now)
    for _ in range(3):  # hello, register, refusal
        for data, _ in other.datagrams_to_send():
            for out, _to in relay.datagram_received(data, ("198.18.11.1", 50003), net.now):
                other.datagram_received(out, RELAY, net.now)
    assert other.registered() == [] and relay.stats["refused_busy"] == 1
    assert other.stats["registration_refused_busy"] == 1
    net2 = Net(max_registrations=1)
    register_bob(net2)
    net2.clients[ALICE].keep_registrations([RELAY], net2.now)
    net2.pump()
    assert net2.clients[ALICE].registered() == []


def test_circuits_are_capped_per_peer() -> None:
    net = Net(max_circuits_per_peer=2)
    register_bob(net)
    results = []
    for i in range(3):  # three initiators, each its own key and address, to bob
        identity = Identity.from_seed(f"carol{i}", bytes([i + 7]) * 32)
        addr = (f"198.18.20.{i + 1}", 4000)
        net.clients[addr] = RelayClient(identity.sign, identity.public_key)
        net.received[addr] = []
        request = net.clients[addr].open_circuit(RELAY, BOB_ID.public_key, net.now)
        net.pump()
        results.append(request.error)
    assert results[:2] == [None, None] and "busy" in str(results[2])
    assert net.relays[RELAY].stats["refused_busy"] == 1


def test_bytes_per_circuit_and_per_peer_bandwidth_are_capped() -> None:
    net = Net(circuit_bytes=10_000, peer_bandwidth=5_000)
    alice_v, _ = circuit(net)
    relay = net.relays[RELAY]
    for _ in range(20):  # 20 x 1,009 bytes at one instant: the bucket holds 5,000
        net.clients[ALICE].wrap(b"\x40" * 1000, alice_v, net.now)
        net.pump()
    assert len(net.received[BOB]) == 4
    assert relay.stats["dropped_peer_bandwidth"] == 16
    for _ in range(10):  # a second later the bucket refills; the circuit's 10,000 end it
        net.now += 1.0
        net.clients[ALICE].wrap(b"\x40" * 1000, alice_v, net.now)
        net.pump()
    assert len(net.received[BOB]) == 9
    assert relay.stats["circuits_closed_bytes"] == 1
    assert relay.statistics()["circuits"] == 0


def test_total_bandwidth_is_capped() -> None:
    net = Net(bandwidth=3_000)
    alice_v, bob_v = circuit(net)
    for _ in range(3):
        net.clients[ALICE].wrap(b"\x40" * 1000, alice_v, net.now)
        net.clients[BOB].wrap(b"\x40" * 1000, bob_v, net.now)
        net.pump()
    assert len(net.received[BOB]) + len(net.received[ALICE]) == 2
    assert net.relays[RELAY].stats["dropped_bandwidth"] == 4


def test_registrations_are_refreshed_below_the_mapping_timeout_and_lapse_without() -> None:
    net = Net()
    register_bob(net)
    hellos = []
    for _ in range(8):  # 200 s
        net.advance(25.0)
        hellos.append(sum(1 for s in net.sent if s[0] == BOB and s[2][0] == FrameType.HELLO))
        assert net.clients[BOB].registered() == [RELAY]
    # one refresh every 25 s at most: below the 30 s the testbed's NATs keep a mapping
    assert hellos == list(range(2, 10))
    # the relay forgets a client that stopped refreshing
    net.clients[BOB].stop_registrations()
    net.advance(REGISTRATION_LIFETIME + 1.0)
    assert net.relays[RELAY].statistics()["registrations"] == 0


def test_a_relay_that_dies_is_replaced_by_another_candidate() -> None:
    net = Net()
    changes = []
    net.clients[BOB] = RelayClient(
        BOB_ID.sign, BOB_ID.public_key, wanted=1,
        on_registrations_changed=lambda: changes.append(net.clients[BOB].registered()),
    )  # fmt: skip
    register_bob(net, [RELAY, RELAY2])
    assert net.clients[BOB].registered() == [RELAY]
    net.lost.add(RELAY)  # the relay dies
    net.advance(30.0)  # the next refresh goes unanswered three times
    assert net.clients[BOB].registered() == [RELAY2]
    assert changes == [[RELAY], [], [RELAY2]]
    assert net.clients[BOB].stats["registration_unanswered"] == 1
    # the dead one is not asked again before its backoff
    assert RELAY_BACKOFF >= 60


BOB_REMAPPED: Addr = ("198.18.11.1", 61234)


def remap_bob(net: Net) -> None:
    """Bob's NAT forgets its mappings (a reboot, a conntrack flush): what was sent to
    his old address is lost, and he is seen from a new port from now on."""
    net.clients[BOB_REMAPPED] = net.clients.pop(BOB)
    net.received[BOB_REMAPPED] = net.received.pop(BOB)
    net.lost.add(BOB)


def test_a_nat_that_maps_us_anew_is_noticed_and_the_circuits_follow() -> None:
    """Issue 13, item 5: a keepalive's answer says the relay holds bob elsewhere; he
    registers again from his new address, and the relay moves his circuit there, so
    alice's open connection reaches him again without a new circuit."""
    net = Net()
    alice_v, bob_v = circuit(net)
    relay, bob = net.relays[RELAY], net.clients[BOB]
    told: list[float] = []
    bob._on_moved = lambda: told.append(net.now)  # the daemon's DirectUpgrade hook
    remap_bob(net)
    flushed = net.now
    assert net.clients[ALICE].wrap(b"\x40lost", alice_v, net.now)
    net.pump()
    assert net.received[BOB_REMAPPED] == []  # went to the old mapping
    while relay._registrations[BOB_ID.public_key].address != BOB_REMAPPED:
        assert net.now - flushed < 10.0, bob.stats
        net.advance(0.1, step=0.1)
    took = net.now - flushed
    assert took <= bob.keepalive + 0.2, took  # one keepalive and one round of the handshake
    assert bob.stats["keepalive_moved"] == 1 and bob.registered() == [RELAY]
    assert len(told) == 1 and told[0] - flushed <= bob.keepalive + 0.2  # direct paths checked
    assert relay.stats["registrations_moved"] == 1 and relay.stats["circuits_moved"] == 1
    assert net.clients[ALICE].wrap(b"\x40again", alice_v, net.now)
    net.pump()
    assert net.received[BOB_REMAPPED] == [(b"\x40again", bob_v)]  # the same circuit
    assert bob.wrap(b"\x40back", bob_v, net.now)
    net.pump()
    assert net.received[ALICE] == [(b"\x40back", alice_v)]
    # and quiet again: no more re-registrations than the refresh's
    net.advance(20.0)
    assert bob.stats["keepalive_moved"] == 1 and relay.stats["registrations_moved"] == 1


ALICE_REMAPPED: Addr = ("198.18.10.1", 52345)


def test_a_circuit_we_opened_through_another_relay_follows_our_new_mapping() -> None:
    """Issue 13: alice, NATed, registered with her own relay (RELAY2), opened a circuit to
    bob through his (RELAY). Her NAT maps her anew: her own relay's ALIVE says "not
    here", and she asks bob's relay again, from her new address, for the circuit she
    has; the relay moves it (a signed CONNECT from a proven address), so her QUIC
    connection to bob lives on under the same virtual address, both ways."""
    net = Net()
    alice = net.clients[ALICE]
    alice.keep_registrations([RELAY2], net.now)
    net.pump()
    assert alice.registered() == [RELAY2]
    alice_v, bob_v = circuit(net)
    relay = net.relays[RELAY]
    net.clients[ALICE_REMAPPED] = net.clients.pop(ALICE)
    net.received[ALICE_REMAPPED] = net.received.pop(ALICE)
    net.lost.add(ALICE)
    flushed = net.now
    (circ,) = relay._circuits.values()
    while circ.initiator_address != ALICE_REMAPPED:
        assert net.now - flushed < 10.0, alice.stats
        net.advance(0.1, step=0.1)
    assert net.now - flushed <= alice.keepalive + 0.5
    assert alice.stats["circuits_followed"] == 1
    assert relay.stats["circuits_moved"] == 1 and len(relay._circuits) == 1
    assert list(alice._by_virtual) == [alice_v]  # the same circuit, the same address
    assert alice.wrap(b"\x40again", alice_v, net.now)
    net.pump()
    assert net.received[BOB] == [(b"\x40again", bob_v)]
    assert net.clients[BOB].wrap(b"\x40back", bob_v, net.now)
    net.pump()
    assert net.received[ALICE_REMAPPED] == [(b"\x40back", alice_v)]


def test_only_the_initiators_key_moves_its_circuit() -> None:
    """Mallory, from her own proven address and with her own key, asks for a circuit to
    bob: she gets a new one; alice's stays where it was."""
    net = Net()
    circuit(net)
    relay = net.relays[RELAY]
    (circ,) = relay._circuits.values()
    mallory = RelayClient(MALLORY_ID.sign, MALLORY_ID.public_key)
    net.clients[MALLORY] = mallory
    net.received[MALLORY] = []
    mallory.open_circuit(RELAY, BOB_ID.public_key, net.now)
    net.pump()
    assert circ.initiator_address == ALICE and relay.stats["circuits_moved"] == 0
    assert len(relay._circuits) == 2


def test_a_keepalive_only_asks_and_tells_only_the_address_it_came_from() -> None:
    net = Net()
    register_bob(net)
    relay = net.relays[RELAY]
    keepalive = Keepalive(b"k" * 8, BOB_ID.public_key).encode()
    # from bob's registered address: here; from anywhere else: not, and nothing changes
    ((answer, to),) = relay.datagram_received(keepalive, BOB, net.now)
    assert (to, decode(answer)) == (BOB, Alive(b"k" * 8, True))
    ((answer, to),) = relay.datagram_received(keepalive, MALLORY, net.now)
    assert (to, decode(answer)) == (MALLORY, Alive(b"k" * 8, False))
    assert len(answer) < len(keepalive)  # no amplification towards a spoofed source
    assert relay._registrations[BOB_ID.public_key].address == BOB
    assert relay.held()["registrations"] == 1 and relay.stats["registrations_moved"] == 0
    # an answer nobody asked for (a stranger's "you moved") changes nothing at the client
    bob = net.clients[BOB]
    assert bob.datagram_received(Alive(b"x" * 8, False).encode(), RELAY, net.now) is None
    assert bob.datagrams_to_send() == [] and bob.stats["dropped_alive_unasked"] == 1
    # nor does the right nonce from another address
    net.advance(bob.keepalive, step=bob.keepalive)  # bob's keepalive is answered
    net.lost.add(RELAY)
    net.advance(bob.keepalive, step=bob.keepalive)  # the next one is out, unanswered
    nonce = bob._registrations[RELAY].alive_nonce
    assert nonce and bob.datagram_received(Alive(nonce, False).encode(), MALLORY, net.now) is None
    assert bob.stats["keepalive_moved"] == 0 and bob.datagrams_to_send() == []


def test_a_dead_relay_is_noticed_by_its_keepalives_within_seconds() -> None:
    net = Net()
    net.clients[BOB] = RelayClient(BOB_ID.sign, BOB_ID.public_key, wanted=1)
    register_bob(net, [RELAY, RELAY2])
    net.advance(3.0)  # between keepalives, well before the next refresh
    net.lost.add(RELAY)
    died = net.now
    while net.clients[BOB].registered() != [RELAY2]:
        assert net.now - died < 15.0
        net.advance(0.1, step=0.1)
    # a keepalive (<= 4 s), its retry (1 s), three HELLOs (3 s), then the other relay
    assert net.now - died <= 9.0, net.now - died
    assert net.clients[BOB].stats["keepalive_unanswered"] == 1


def test_keepalives_cost_a_few_bytes_a_second_per_relay() -> None:
    """The price of noticing a NAT flush within seconds: what bob and one relay send each
    other in 10 minutes, keepalives and refreshes, with 28 bytes of IPv4 and UDP headers
    per datagram (docs/SECURITY.md, "Relays")."""
    net = Net()
    register_bob(net)
    start, sent_from = net.now, len(net.sent)
    net.advance(600.0, step=1.0)
    up = sum(len(d) + 28 for f, t, d in net.sent[sent_from:] if (f, t) == (BOB, RELAY))
    down = sum(len(d) + 28 for f, t, d in net.sent[sent_from:] if (f, t) == (RELAY, BOB))
    kinds = {d[0] for f, t, d in net.sent[sent_from:] if f == BOB}
    assert kinds == {FrameType.KEEPALIVE, FrameType.HELLO, FrameType.REGISTER}
    per_second = (up / (net.now - start), down / (net.now - start))
    print(f"one relay registration: {per_second[0]:.1f} B/s up, {per_second[1]:.1f} B/s down")
    assert per_second[0] <= 30.0 and per_second[1] <= 15.0, per_second


def test_a_relay_that_is_not_serving_refuses() -> None:
    net = Net()
    net.relays[RELAY].serving = False
    register_bob(net, [RELAY])
    assert net.clients[BOB].registered() == []
    assert net.clients[BOB].stats["registration_refused_not_a_relay"] == 1


def test_a_lost_connect_is_sent_again_and_answered_once() -> None:
    net = Net()
    register_bob(net)
    client = net.clients[ALICE]
    request = client.open_circuit(RELAY, BOB_ID.public_key, net.now)
    net.lost.add(ALICE)  # her hello is lost
    net.pump()
    net.lost.clear()
    net.advance(1.5)
    assert request.done and request.error is None
    assert net.relays[RELAY].statistics()["circuits"] == 1
    # asked again within the minute (its connection died, say): the same circuit
    again = client.open_circuit(RELAY, BOB_ID.public_key, net.now)
    net.pump()
    assert again.done and again.virtual == request.virtual
    assert net.relays[RELAY].statistics()["circuits"] == 1
    assert net.relays[RELAY].stats["connect_repeated"] >= 1


@pytest.mark.parametrize("kind", [FrameType.REGISTER, FrameType.CONNECT])
def test_requests_are_signed_by_the_key_they_name(kind: FrameType) -> None:
    net = Net()
    register_bob(net)
    request = net.clients[ALICE].open_circuit(RELAY, BOB_ID.public_key, net.now)
    net.pump()
    assert request.virtual is not None
    (frame,) = [s[2] for s in net.sent if s[0] in (ALICE, BOB) and s[2][0] == kind][:1]
    tampered = bytearray(frame)
    tampered[-1] ^= 1
    replies = net.relays[RELAY].datagram_received(bytes(tampered), ALICE if kind ==
                                                  FrameType.CONNECT else BOB, net.now)  # fmt: skip
    assert [decode(d).reason for d, _ in replies] == [2]  # type: ignore[union-attr]


def test_relay_config_section(tmp_path: Path) -> None:
    from p2pd.config import load_config
    from p2pd.errors import UsageError

    assert load_config(tmp_path).relay == RelayConfig()  # the documented defaults
    assert RelayConfig().enabled and RelayConfig().registrations == 3
    (tmp_path / "config.toml").write_text(
        "[relay]\nenabled = false\nmax_circuits = 4\nbandwidth = 1000\nrefresh_interval = 20\n"
    )
    relay = load_config(tmp_path).relay
    assert (relay.enabled, relay.max_circuits, relay.bandwidth, relay.refresh_interval) == (
        False,
        4,
        1000,
        20.0,
    )
    for bad in ("enabled = 1", "max_circuits = 0", "registrations = 9", "nonsense = 1"):
        (tmp_path / "config.toml").write_text(f"[relay]\n{bad}\n")
        with pytest.raises(UsageError, match="relay"):
            load_config(tmp_path)


class FakePeer:
    def __init__(self, key: bytes, address: tuple[str, int]) -> None:
        self.public_key, self.address, self.is_closing = key, address, False


class FakeQuic:
    """``connect`` answers after ``delay[address]`` seconds, or never (not listed)."""

    def __init__(self, delays: dict[tuple[str, int], float]) -> None:
        self.delays = delays
        self.open: list[FakePeer] = []
        self.asked: list[tuple[float, tuple[str, int]]] = []

    def peers(self) -> list[FakePeer]:
        return self.open

    async def connect(self, address: object, key: bytes) -> FakePeer:
        addr = address.as_tuple() if isinstance(address, Address) else address
        assert isinstance(addr, tuple)
        self.asked.append((trio.current_time(), addr))
        if addr not in self.delays:
            await trio.sleep_forever()
        await trio.sleep(self.delays[addr])
        return FakePeer(key, addr)


def _paths(quic: FakeQuic, circuits: dict[Address, float | None]) -> Paths:
    async def relay_connect(relay: Address, key: bytes) -> tuple[str, int]:
        delay = circuits[relay]
        if delay is None:
            await trio.sleep_forever()  # a dead relay
        await trio.sleep(delay or 0.0)
        return virtual_address(list(circuits).index(relay) + 1)

    return Paths(quic, lambda key: [], relay_connect, 3.0)  # type: ignore[arg-type]


def _record(addresses: list[Address], relays: list[Address]) -> HandleRecord:
    return HandleRecord.create(BOB_ID, addresses, seq=1, now=1000, lifetime=3600, relays=relays)


@pytest.mark.parametrize("hinted", [False, True])
def test_a_natted_peer_is_reached_through_its_relay_without_waiting_for_its_address(
    hinted: bool,
) -> None:
    """Its record's address never answers; the relay starts at once and wins (250 ms
    later when the LAN or a hint names an address: that one may well answer)."""
    relays = [Address(*RELAY), Address(*RELAY2)]
    quic = FakeQuic({virtual_address(1): 0.05, virtual_address(2): 0.05})

    async def main() -> None:
        record = _record([Address("10.2.0.11", 4747)], relays)
        paths = _paths(quic, {relays[0]: 0.02, relays[1]: 0.02})
        if hinted:
            paths.lan_addresses = lambda key: [Address("10.9.0.1", 4747)]
        peer = await paths.connect(BOB_ID.public_key, record)
        assert peer is not None and is_virtual(peer.address[0])
        assert peer.address == virtual_address(1)
        head_start = RELAY_HEAD_START if hinted else 0.0
        assert trio.current_time() == pytest.approx(head_start + 0.07)
        # the addresses were tried too, all along (in turn: the first never answers)
        assert quic.asked[0][1] == (("10.9.0.1", 4747) if hinted else ("10.2.0.11", 4747))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_dead_relay_costs_one_stagger_not_a_timeout() -> None:
    relays = [Address(*RELAY), Address(*RELAY2)]
    quic = FakeQuic({virtual_address(2): 0.05})

    async def main() -> None:
        record = _record([], relays)  # relays only ([privacy] addresses = contacts)
        peer = await _paths(quic, {relays[0]: None, relays[1]: 0.02}).connect(
            BOB_ID.public_key, record
        )
        assert peer is not None and peer.address == virtual_address(2)
        assert trio.current_time() == pytest.approx(RELAY_STAGGER + 0.07)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_answering_address_wins_and_an_open_direct_connection_is_preferred() -> None:
    relays = [Address(*RELAY)]
    public = Address("198.18.5.5", 4747)
    quic = FakeQuic({public.as_tuple(): 0.05, virtual_address(1): 0.05})

    async def main() -> None:
        paths = _paths(quic, {relays[0]: 0.01})
        peer = await paths.connect(BOB_ID.public_key, _record([public], relays))
        assert peer is not None and peer.address == public.as_tuple()  # the faster one
        quic.asked.clear()
        paths.lan_addresses = lambda key: [public]  # the LAN knows where it is
        peer = await paths.connect(BOB_ID.public_key, _record([], relays))
        assert peer is not None and peer.address == public.as_tuple()
        assert [a for _, a in quic.asked] == [public.as_tuple()]  # the relay never began
        paths.lan_addresses = lambda key: []
        relayed = FakePeer(BOB_ID.public_key, virtual_address(9))
        quic.open = [relayed]
        assert await paths.connect(BOB_ID.public_key, None) is relayed
        quic.open = [relayed, FakePeer(BOB_ID.public_key, public.as_tuple())]
        assert await paths.connect(BOB_ID.public_key, None) is quic.open[1]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_signature_checks_are_rate_limited_per_source() -> None:
    """A source with a valid cookie for its own address still cannot make the relay
    verify signatures at line rate: VERIFY_RATE a second, then dropped and counted."""
    checks = []

    def verify(key: bytes, message: bytes, signature: bytes) -> bool:
        checks.append(key)
        return False

    relay = RelayServer(verify=verify)
    now = 1000.0
    cookie = relay.cookie(MALLORY, now)
    forged = Register(BOB_ID.public_key, cookie, bytes(64)).encode()
    answers = [relay.datagram_received(forged, MALLORY, now) for _ in range(100)]
    assert len(checks) == VERIFY_RATE and sum(1 for a in answers if a) == VERIFY_RATE
    assert relay.stats["dropped_verify_rate"] == 100 - VERIFY_RATE
    # another source has its own budget; a second later the first has its again
    relay.datagram_received(Register(BOB_ID.public_key, relay.cookie(ALICE, now),
                                     bytes(64)).encode(), ALICE, now)  # fmt: skip
    relay.datagram_received(forged, MALLORY, now + 1.0)
    assert len(checks) == VERIFY_RATE + 2


def test_relay_candidates_come_one_per_subnet_first_and_spread_by_key() -> None:
    from p2pd.relay.service import candidate_order

    same_net = [Address(f"198.18.7.{i}", 4747) for i in range(1, 6)]
    others = [Address("198.18.8.1", 4747), Address("198.18.9.1", 4747)]
    order = candidate_order(same_net + others, ALICE_ID.public_key)
    assert set(order[:3]) & set(others) == set(others)  # one of 198.18.7.0/24, then others
    assert sum(1 for a in order[:3] if a in same_net) == 1
    assert sorted(order, key=str) == sorted(same_net + others, key=str)  # nothing lost
    # stable for one key; another key ranks them differently
    assert candidate_order(same_net + others, ALICE_ID.public_key) == order
    keys = (ALICE_ID.public_key, BOB_ID.public_key, MALLORY_ID.public_key)
    orders = {tuple(candidate_order(same_net, key)) for key in keys}
    assert len(orders) > 1


def test_status_and_whois_show_relays() -> None:
    from p2pd_cli import render

    status = {
        "self_certifying": "bob#u6cmphjezpfb", "fingerprint_display": "u6cm phje",
        "listen": "0.0.0.0:4747", "addresses": ["10.2.0.11:4747"], "routing_table_size": 3,
        "records_stored": 0, "record_seq": None, "replicas": 0, "record_expires": None,
        "uptime": 1.0, "relays_in_use": ["198.18.1.11:4747", "198.18.2.11:4747"],
        "relay": {"relaying": {"serving": False}},
    }  # fmt: skip
    lines = render.status_text(status).splitlines()
    assert "relays          198.18.1.11:4747, 198.18.2.11:4747" in lines
    assert not any(line.startswith("relaying") for line in lines)
    status["relays_in_use"] = []
    status["relay"] = {
        "relaying": {"serving": True, "registrations": 2, "circuits": 1, "relayed_bytes": 9000}
    }
    lines = render.status_text(status).splitlines()
    assert "relays          -" in lines
    assert "relaying        2 registered, 1 circuit(s), 9000 bytes relayed" in lines
    record = {
        "self_certifying": "bob#u6cm", "fingerprint_display": "u6cm", "addresses": [],
        "relays": ["198.18.1.11:4747"], "seq": 1, "issued": 0, "expires": 1,
    }  # fmt: skip
    assert "relays       198.18.1.11:4747" in render.whois_text(record).splitlines()


def test_the_relay_forgets_everything_once_idle() -> None:
    """Registrations, circuits, refused initiators and budgets leave no entry behind."""
    net = Net(max_circuits_per_peer=1)
    alice_v, _ = circuit(net)
    net.clients[ALICE].wrap(b"\x40" * 100, alice_v, net.now)
    net.pump()
    # a refused second initiator (bob's cap is 1) leaves no per-peer entry
    carol = Identity.from_seed("carol", bytes([9]) * 32)
    net.clients[MALLORY] = RelayClient(carol.sign, carol.public_key)
    request = net.clients[MALLORY].open_circuit(RELAY, BOB_ID.public_key, net.now)
    net.pump()
    assert "busy" in str(request.error)
    relay = net.relays[RELAY]
    assert relay.held()["peers"] == 2  # alice and bob
    net.clients[BOB].stop_registrations()
    net.advance(200.0, step=5.0)
    held = relay.held()
    assert (held["registrations"], held["addresses"], held["circuits"], held["peers"]) == (
        0,
        0,
        0,
        0,
    )
    client = net.clients[ALICE]
    assert client._cookies == {} and client._circuits == {} and client._by_virtual == {}


def test_send_says_when_a_message_went_through_a_relay() -> None:
    from p2pd_cli import render

    message = {"id": "ab" * 16, "handle": "bob", "state": "delivered", "via": "relay"}
    assert render.sent_text(message) == "delivered: message abababababab to bob (through a relay)"
    message["via"] = "direct"
    assert render.sent_text(message) == "delivered: message abababababab to bob"
