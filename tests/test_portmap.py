"""The port-mapping client's state machine (p2pd/transport/portmap.py), moved by hand
with ``now``: PCP (RFC 6887) and NAT-PMP (RFC 6886) requests byte for byte as the RFCs
lay them out, replies from a hostile gateway (another source, another nonce, bad
lengths, junk addresses, error codes), the fallback, retries and renewal timing."""

from __future__ import annotations

import struct

import pytest
from fuzz_helpers import FUZZ, mutate, refused
from hypothesis import given
from hypothesis import strategies as st

from p2pd.transport import portmap
from p2pd.transport.portmap import BadReply, PortMapper, decode_reply, public_ipv4
from p2pd.wire import Address

GW = ("10.1.0.1", 5351)
ME = "10.1.0.11"
NONCE = bytes(range(1, 13))


def mapper(now: float = 100.0) -> PortMapper:
    return PortMapper(GW[0], ME, 4747, now, randbytes=lambda n: NONCE[:n])


def v4mapped(host: str) -> bytes:
    return bytes(10) + b"\xff\xff" + bytes(int(x) for x in host.split("."))


def pcp_reply(
    *,
    result: int = 0,
    lifetime: int = 3600,
    nonce: bytes = NONCE,
    protocol: int = 17,
    internal: int = 4747,
    external: int = 40000,
    host: str = "198.18.11.1",
    extra: bytes = b"",
) -> bytes:
    # RFC 6887 7.2 (response header) + 11.1 (MAP payload)
    header = bytes([2, 0x81, 0, result]) + struct.pack("!II", lifetime, 1234) + bytes(12)
    payload = nonce + bytes([protocol, 0, 0, 0]) + struct.pack("!HH", internal, external)
    return header + payload + v4mapped(host) + extra


def natpmp_address(host: str = "198.18.11.1", result: int = 0) -> bytes:
    return bytes([0, 128]) + struct.pack("!HI", result, 99) + bytes(int(x) for x in host.split("."))


def natpmp_map(
    *, result: int = 0, internal: int = 4747, external: int = 4747, life: int = 7200
) -> bytes:
    return bytes([0, 129]) + struct.pack("!HIHHI", result, 99, internal, external, life)


def test_the_pcp_request_is_the_rfc_layout() -> None:
    m = mapper()
    [req] = m.poll(100.0)
    assert len(req) == 60
    assert req[:4] == bytes([2, 1, 0, 0])  # version 2, R=0 opcode MAP, reserved
    assert struct.unpack("!I", req[4:8])[0] == portmap.LIFETIME
    assert req[8:24] == v4mapped(ME)  # the client's address, IPv4-mapped
    assert req[24:36] == NONCE
    assert req[36] == 17 and req[37:40] == bytes(3)  # UDP, reserved
    assert struct.unpack("!HH", req[40:44]) == (4747, 4747)
    assert req[44:60] == v4mapped("0.0.0.0")  # no preferred external address


def test_pcp_success_gives_one_mapping_renewed_at_half_its_lifetime() -> None:
    m = mapper()
    m.poll(100.0)
    m.receive(pcp_reply(lifetime=3600), GW, 100.1)
    assert m.mapping == portmap.Mapping(Address("198.18.11.1", 40000), "pcp", 3700.1, 3600)
    assert m.next_deadline() == pytest.approx(1900.1)
    assert m.poll(1900.0) == []  # not yet
    [renew] = m.poll(1900.1)
    assert renew[24:36] == NONCE  # the same nonce renews (RFC 6887 11.2.1)
    assert struct.unpack("!H", renew[42:44])[0] == 40000  # keep the port we have
    m.receive(pcp_reply(lifetime=3600, external=40000), GW, 1900.2)
    assert m.mapping is not None and m.mapping.expires == pytest.approx(5500.2)
    # the delete names the mapping by the nonce, lifetime 0
    [delete] = m.delete()
    assert delete[24:36] == NONCE and struct.unpack("!I", delete[4:8])[0] == 0


@pytest.mark.parametrize(
    ("reply", "source"),
    [
        (pcp_reply(), ("10.1.0.2", 5351)),  # another host of the LAN
        (pcp_reply(), ("10.1.0.1", 5350)),  # another port of the gateway
        (pcp_reply(nonce=bytes(12)), GW),  # not our request's nonce
        (pcp_reply(protocol=6), GW),  # TCP
        (pcp_reply(internal=4748), GW),  # another internal port
        (pcp_reply(external=0), GW),
        (pcp_reply(lifetime=0), GW),
        (pcp_reply()[:59], GW),  # truncated
        (pcp_reply(extra=b"\x00" * 2), GW),  # not a multiple of 4
        (pcp_reply(extra=b"\x00" * 1044), GW),  # longer than 1100 bytes
        (pcp_reply(host="0.0.0.0"), GW),
        (pcp_reply(host="127.0.0.1"), GW),
        (pcp_reply(host="224.0.0.1"), GW),
        (pcp_reply(host="169.254.1.1"), GW),
        (pcp_reply(host="240.0.0.1"), GW),
        (pcp_reply(host="255.255.255.255"), GW),
        (pcp_reply(host="192.168.1.1"), GW),  # another NAT in front
        (pcp_reply(host="100.64.0.1"), GW),
        (pcp_reply()[:24] + bytes(12) + bytes([17, 0, 0, 0]) + bytes(4) + bytes(16), GW),
        (bytes([2, 0x01]) + pcp_reply()[2:], GW),  # a request, not a response
        (natpmp_map(), GW),  # NAT-PMP success to a PCP request
        (b"", GW),
        (b"\x07" * 60, GW),
    ],
)
def test_a_reply_that_is_not_the_answer_changes_nothing(
    reply: bytes, source: tuple[str, int]
) -> None:
    m = mapper()
    m.poll(100.0)
    due = m.next_deadline()
    m.receive(reply, source, 100.1)
    assert m.mapping is None
    assert m.failure == ""
    assert m.protocol == "pcp" and m.next_deadline() == due
    assert sum(m.stats[k] for k in ("dropped_source", "dropped_bad")) == 1
    # the real answer still works afterwards
    m.receive(pcp_reply(), GW, 100.2)
    assert m.mapping is not None


def test_an_unsolicited_reply_is_dropped() -> None:
    m = mapper()
    m.receive(pcp_reply(), GW, 100.0)  # nothing asked yet
    assert m.mapping is None and m.stats["dropped_bad"] == 1


def test_the_lifetime_is_clamped() -> None:
    m = mapper(0.0)
    m.poll(0.0)
    m.receive(pcp_reply(lifetime=1), GW, 0.0)  # would make us renew every half second
    assert m.mapping is not None and m.mapping.lifetime == portmap.LIFETIME_MIN
    assert m.next_deadline() == portmap.LIFETIME_MIN / 2
    m = mapper(0.0)
    m.poll(0.0)
    m.receive(pcp_reply(lifetime=0xFFFFFFFF), GW, 0.0)
    assert m.mapping is not None and m.mapping.lifetime == portmap.LIFETIME


def test_retries_then_nat_pmp_then_a_pause() -> None:
    m = mapper(0.0)
    sent = []
    now = 0.0
    for _ in range(20):  # bounded: both protocols' schedules fit in far fewer steps
        out = m.poll(now)
        sent += [(now, d) for d in out]
        if m.next_deadline() >= portmap.RETRY_FAILED:
            break
        now = m.next_deadline()
    pcp = [t for t, d in sent if d[0] == 2]
    natpmp_maps = [t for t, d in sent if d[:2] == b"\x00\x01"]
    assert pcp == [0.0, 0.25, 0.75, 1.75]
    assert natpmp_maps == [3.75, 4.0, 4.5, 5.5]
    assert len([d for _, d in sent if d == b"\x00\x00"]) == 4  # address requests
    assert m.failure == "pcp: no answer; nat-pmp: no answer"
    assert m.next_deadline() == pytest.approx(7.5 + portmap.RETRY_FAILED)
    assert m.protocol == "pcp"


def test_a_nat_pmp_gateway_answers_pcp_with_unsupported_version() -> None:
    m = mapper(0.0)
    m.poll(0.0)
    # RFC 6886 3.5: version 0, opcode 128 + the request's, result 1, epoch
    m.receive(bytes([0, 129, 0, 1]) + struct.pack("!I", 5), GW, 0.01)
    assert m.protocol == "nat-pmp"
    address, request = m.poll(0.01)
    assert address == b"\x00\x00"
    assert request == bytes([0, 1, 0, 0]) + struct.pack("!HHI", 4747, 4747, portmap.LIFETIME)
    m.receive(natpmp_map(external=5000, life=3600), GW, 0.02)
    assert m.mapping is None  # the address is still missing
    m.receive(natpmp_address("203.0.113.7"), GW, 0.03)
    assert m.mapping == portmap.Mapping(Address("203.0.113.7", 5000), "nat-pmp", 3600.03, 3600)
    assert m.failure == ""
    assert m.delete() == [bytes([0, 1, 0, 0]) + struct.pack("!HHI", 4747, 0, 0)]


def test_result_codes_end_the_attempt_with_their_name() -> None:
    m = mapper(0.0)
    m.poll(0.0)
    m.receive(pcp_reply(result=2), GW, 0.1)  # NOT_AUTHORIZED, with our nonce
    assert m.mapping is None and m.protocol == "nat-pmp"
    m.poll(0.1)
    m.receive(natpmp_map(result=2), GW, 0.2)
    assert m.failure == "pcp: NOT_AUTHORIZED; nat-pmp: NOT_AUTHORIZED"
    assert m.next_deadline() == pytest.approx(0.2 + portmap.RETRY_FAILED)


def test_an_unanswered_renewal_retries_then_the_mapping_expires() -> None:
    m = mapper(0.0)
    m.poll(0.0)
    m.receive(pcp_reply(lifetime=120), GW, 0.0)
    now, renewals = 60.0, 0
    for _ in range(100):  # bounded
        out = m.poll(now)
        renewals += len(out)
        if m.mapping is None:
            break
        assert m.next_deadline() > now
        now = m.next_deadline()
    assert now == pytest.approx(120.0)  # kept until its expiry, not longer
    assert m.stats["expired"] == 1 and renewals > 4
    assert m.protocol == "pcp"  # and it starts over


def test_a_refused_renewal_drops_the_mapping() -> None:
    m = mapper(0.0)
    m.poll(0.0)
    m.receive(pcp_reply(lifetime=120), GW, 0.0)
    m.poll(60.0)
    m.receive(pcp_reply(result=8), GW, 60.1)  # NO_RESOURCES
    assert m.mapping is None


def test_decode_bounds() -> None:
    with pytest.raises(BadReply):
        decode_reply(natpmp_map() + b"\x00")
    with pytest.raises(BadReply):
        decode_reply(natpmp_address()[:11])
    with pytest.raises(BadReply):
        decode_reply(bytes([0, 1]) + bytes(10))  # a NAT-PMP request
    assert decode_reply(natpmp_address()).external_host == "198.18.11.1"
    assert public_ipv4("198.18.11.1") and public_ipv4("8.8.8.8")


ANNOUNCE = bytes([2, 0x80, 0, 0]) + bytes(20)  # PCP ANNOUNCE response (RFC 6887 14.1.3)


def test_an_announcement_renews_at_once_at_most_every_ten_seconds() -> None:
    m = mapper(0.0)
    m.poll(0.0)
    m.receive(pcp_reply(lifetime=3600), GW, 0.0)
    assert m.announcement(ANNOUNCE, ("10.1.0.2", 5351), 5.0) is False  # not the gateway
    assert m.announcement(ANNOUNCE[:23], GW, 5.0) is False  # malformed
    assert m.announcement(bytes([2, 0x81]) + ANNOUNCE[2:], GW, 5.0) is False  # a MAP
    assert m.next_deadline() == 1800.0  # nothing changed
    assert m.announcement(ANNOUNCE, GW, 5.0) is True
    assert m.next_deadline() == 5.0
    [renew] = m.poll(5.0)
    assert renew[24:36] == NONCE
    m.receive(pcp_reply(lifetime=3600), GW, 5.1)
    assert m.announcement(ANNOUNCE, GW, 14.0) is False  # within 10 s of the last
    natpmp_change = natpmp_address()  # NAT-PMP's address-change announcement (3.2.1)
    assert m.announcement(natpmp_change, GW, 15.1) is True
    assert m.stats["announce_dropped"] == 4 and m.stats["announce_taken"] == 2


def test_an_announcement_ends_the_pause_after_a_failure() -> None:
    m = mapper(0.0)
    now = 0.0
    for _ in range(20):  # both protocols unanswered: the long pause
        m.poll(now)
        if m.next_deadline() >= portmap.RETRY_FAILED:
            break
        now = m.next_deadline()
    assert m.announcement(ANNOUNCE, GW, 100.0) is True
    assert m.next_deadline() == 100.0 and m.protocol == "pcp"
    assert len(m.poll(100.0)) == 1


# --- fuzzing: whatever the gateway (or a spoofer) sends, only BadReply, and a client
# that holds no mapping takes none from junk


def _client_takes(data: bytes) -> None:
    m = mapper(0.0)
    m.poll(0.0)
    m.receive(data, GW, 0.1)  # never raises
    m.announcement(data, GW, 0.1)
    if m.mapping is not None:  # only a reply that passed every check
        assert public_ipv4(m.mapping.external.host) and m.mapping.external.port
        assert portmap.LIFETIME_MIN <= m.mapping.lifetime <= portmap.LIFETIME


@FUZZ
@given(st.binary(max_size=1200))
def test_decode_reply_arbitrary_bytes(data: bytes) -> None:
    refused(BadReply, lambda: decode_reply(data))  # anything else propagates
    _client_takes(data)
    _client_takes(bytes([2, 0x81]) + data)
    _client_takes(bytes([0, 129]) + data[:14])


@FUZZ
@given(st.sampled_from([pcp_reply(), natpmp_map(), natpmp_address(), ANNOUNCE]), st.data())
def test_decode_reply_mutations(valid: bytes, data: st.DataObject) -> None:
    mutated = mutate(data, valid)
    refused(BadReply, lambda: decode_reply(mutated))
    _client_takes(mutated)
