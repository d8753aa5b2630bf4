"""Port mapping by the default gateway (issue 13, item 9): PCP (RFC 6887) MAP, else
NAT-PMP (RFC 6886), for the daemon's UDP port; sans I/O.

:class:`PortMapper` is the state machine: it takes ``now`` and the gateway's datagrams
and says what to send to the gateway (always to ``gateway:5351``) and when to be woken
(:meth:`PortMapper.next_deadline`). The trio driver is p2pd/transport/portmap_driver.py.

- It tries PCP first: a MAP request for UDP, our internal port, suggested external port
  the same, a lifetime of :data:`LIFETIME`, a fresh 12-byte nonce. A gateway that speaks
  only NAT-PMP answers a PCP request with a NAT-PMP "unsupported version" (RFC 6887,
  section 9); then, or when PCP gets no answer at all, NAT-PMP: an external-address
  request and a UDP map request.
- Each protocol is tried at 0, 0.25, 0.75, 1.75 s (:data:`RETRY_DELAYS`, RFC 6886's
  250 ms doubling, cut short: the gateway is one hop away) and given up
  :data:`GIVE_UP` s after the last try. No gateway answers: :data:`RETRY_FAILED` later
  it starts again from PCP.
- A mapping is renewed at half its lifetime (PCP: the same nonce, RFC 6887 section
  11.2.1); a renewal that gets no answer is retried at half the time still left (at
  least :data:`RENEW_MIN`), and at the expiry the mapping is gone and it starts again.
- :meth:`PortMapper.delete` gives the request that removes the mapping (lifetime 0).
- :meth:`PortMapper.announcement`: the gateway's restart (PCP ANNOUNCE) or address
  change (NAT-PMP), at most one per :data:`ANNOUNCE_MIN` s, renews at once.

Every reply is hostile until checked (docs/SECURITY.md, "A hostile gateway"): only from
``gateway:5351`` (the one we asked), of exactly the length its version and opcode have
(PCP: 60 to :data:`PCP_MAX` bytes, a multiple of 4; options are skipped), the opcode and
(PCP) the nonce, protocol and internal port of our request; a result code other than
success ends the attempt with that code's name; the lifetime is clamped to
[:data:`LIFETIME_MIN`, :data:`LIFETIME`] (a gateway cannot make us renew more often
than every 30 s); the external address must be a unicast IPv4 address that is not
unspecified, loopback, link-local, multicast, reserved or private (RFC 1918, RFC 6598:
another NAT in front of the gateway makes the mapping useless), and the port non-zero.
Anything else is counted and dropped, and changes nothing. The result is at most one
address: :attr:`PortMapper.mapping`.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..wire import Address

Protocol = Literal["pcp", "nat-pmp"]

#: The port both protocols' servers listen on (RFC 6886 section 3.1, RFC 6887 section 19.1).
SERVER_PORT = 5351
#: The lifetime we ask for, and the longest we believe.
LIFETIME = 7200
#: The shortest lifetime we believe (a shorter one is taken as this: renewal at 30 s).
LIFETIME_MIN = 60
#: Seconds between a protocol's tries; it is given up GIVE_UP s after the last.
RETRY_DELAYS = (0.25, 0.5, 1.0)
GIVE_UP = 2.0
#: After both protocols went unanswered or refused, try again this much later.
RETRY_FAILED = 600.0
#: The shortest wait before a renewal that got no answer is tried again.
RENEW_MIN = 5.0
#: The port gateways send announcements to (224.0.0.1; RFC 6887 14.1.3, RFC 6886 3.2.1).
ANNOUNCE_PORT = 5350
#: At most one announcement a this long acts (a LAN neighbour can spoof them).
ANNOUNCE_MIN = 10.0
#: PCP messages are at most 1100 bytes (RFC 6887 section 7).
PCP_MAX = 1100
PCP_VERSION = 2
PCP_MAP = 1
PCP_ANNOUNCE = 0
PCP_HEADER = 24
PCP_MAP_PAYLOAD = 36
NONCE_LEN = 12
UDP = 17
NATPMP_VERSION = 0
NATPMP_ADDRESS = 0
NATPMP_MAP_UDP = 1

PCP_RESULTS = {
    0: "SUCCESS",
    1: "UNSUPP_VERSION",
    2: "NOT_AUTHORIZED",
    3: "MALFORMED_REQUEST",
    4: "UNSUPP_OPCODE",
    5: "UNSUPP_OPTION",
    6: "MALFORMED_OPTION",
    7: "NETWORK_FAILURE",
    8: "NO_RESOURCES",
    9: "UNSUPP_PROTOCOL",
    10: "USER_EX_QUOTA",
    11: "CANNOT_PROVIDE_EXTERNAL",
    12: "ADDRESS_MISMATCH",
    13: "EXCESSIVE_REMOTE_PEERS",
}
NATPMP_RESULTS = {
    0: "SUCCESS",
    1: "UNSUPPORTED_VERSION",
    2: "NOT_AUTHORIZED",
    3: "NETWORK_FAILURE",
    4: "OUT_OF_RESOURCES",
    5: "UNSUPPORTED_OPCODE",
}
_UNSUPPORTED_VERSION = 1
_NOT_PUBLIC = (
    ipaddress.IPv4Network("10.0.0.0/8"),
    ipaddress.IPv4Network("172.16.0.0/12"),
    ipaddress.IPv4Network("192.168.0.0/16"),
    ipaddress.IPv4Network("100.64.0.0/10"),
)


class BadReply(ValueError):
    """A datagram that is not a reply we can take; it changed nothing."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """What the gateway gave us: where strangers reach our port, by which protocol,
    until when (the driver's clock)."""

    external: Address
    protocol: Protocol
    expires: float
    lifetime: int


# --- codecs ---------------------------------------------------------------------------


def _mapped_v6(host: str) -> bytes:
    return b"\x00" * 10 + b"\xff\xff" + ipaddress.IPv4Address(host).packed


def encode_pcp_map(
    client_ip: str, internal_port: int, nonce: bytes, lifetime: int, suggested_port: int
) -> bytes:
    """A PCP MAP request for UDP (RFC 6887 sections 7.1 and 11.1): 24 + 36 bytes; the
    suggested external address is ``::ffff:0.0.0.0`` (no preference)."""
    if len(nonce) != NONCE_LEN:
        raise ValueError("a PCP nonce is 12 bytes")
    header = struct.pack("!BBHI", PCP_VERSION, PCP_MAP, 0, lifetime) + _mapped_v6(client_ip)
    payload = nonce + struct.pack("!B3xHH", UDP, internal_port, suggested_port)
    return header + payload + _mapped_v6("0.0.0.0")


def encode_natpmp_map(internal_port: int, lifetime: int, suggested_port: int) -> bytes:
    """A NAT-PMP UDP mapping request (RFC 6886 section 3.3): 12 bytes."""
    return struct.pack(
        "!BBHHHI", NATPMP_VERSION, NATPMP_MAP_UDP, 0, internal_port, suggested_port, lifetime
    )


def encode_natpmp_address() -> bytes:
    """A NAT-PMP external address request (RFC 6886 section 3.2): 2 bytes."""
    return bytes([NATPMP_VERSION, NATPMP_ADDRESS])


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply of either protocol (fields a reply does not carry are None)."""

    protocol: Protocol
    opcode: int
    result: int
    lifetime: int | None = None
    nonce: bytes | None = None
    internal_port: int | None = None
    external_port: int | None = None
    external_host: str | None = None

    @property
    def result_name(self) -> str:
        names = PCP_RESULTS if self.protocol == "pcp" else NATPMP_RESULTS
        return names.get(self.result, f"result {self.result}")


def decode_reply(data: bytes) -> Reply:
    """A gateway's datagram: a PCP MAP response or a NAT-PMP response (address or UDP
    map, or the short error reply to an opcode it does not know). Raises BadReply for
    anything else, with the reason."""
    if len(data) < 4:
        raise BadReply(f"{len(data)} bytes: too short")
    version = data[0]
    if version == PCP_VERSION:
        return _decode_pcp(data)
    if version != NATPMP_VERSION:
        raise BadReply(f"version {version}")
    opcode, result = data[1], struct.unpack_from("!H", data, 2)[0]
    if opcode < 128:
        raise BadReply("a NAT-PMP request, not a response")
    if result != 0 and len(data) in (4, 8, 12, 16):
        # error replies: RFC 6886 section 3.5 (an unsupported version is 8 bytes long)
        return Reply("nat-pmp", opcode - 128, result)
    if opcode == 128 + NATPMP_ADDRESS:
        if len(data) != 12:
            raise BadReply(f"a NAT-PMP address reply of {len(data)} bytes")
        host = str(ipaddress.IPv4Address(data[8:12]))
        return Reply("nat-pmp", NATPMP_ADDRESS, result, external_host=host)
    if opcode == 128 + NATPMP_MAP_UDP:
        if len(data) != 16:
            raise BadReply(f"a NAT-PMP map reply of {len(data)} bytes")
        internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
        return Reply(
            "nat-pmp",
            NATPMP_MAP_UDP,
            result,
            lifetime=lifetime,
            internal_port=internal,
            external_port=external,
        )
    raise BadReply(f"NAT-PMP opcode {opcode}")


def _decode_pcp(data: bytes) -> Reply:
    if not PCP_HEADER <= len(data) <= PCP_MAX or len(data) % 4:
        raise BadReply(f"a PCP message of {len(data)} bytes")
    r_opcode, result = data[1], data[3]
    if not r_opcode & 0x80:
        raise BadReply("a PCP request, not a response")
    opcode = r_opcode & 0x7F
    lifetime = struct.unpack_from("!I", data, 4)[0]
    if opcode != PCP_MAP:
        raise BadReply(f"PCP opcode {opcode}")
    if len(data) < PCP_HEADER + PCP_MAP_PAYLOAD:
        if result == 0:
            raise BadReply(f"a PCP MAP response of {len(data)} bytes")
        return Reply("pcp", opcode, result, lifetime=lifetime)  # an error, no payload
    payload = data[PCP_HEADER : PCP_HEADER + PCP_MAP_PAYLOAD]
    nonce, protocol = payload[:NONCE_LEN], payload[NONCE_LEN]
    internal, external = struct.unpack_from("!HH", payload, 16)
    address = payload[20:36]
    if protocol != UDP:
        raise BadReply(f"PCP protocol {protocol}")
    if address[:12] != b"\x00" * 10 + b"\xff\xff":
        raise BadReply("a PCP external address that is not IPv4")
    host = str(ipaddress.IPv4Address(address[12:]))
    return Reply("pcp", opcode, result, lifetime, nonce, internal, external, host)


def public_ipv4(host: str) -> bool:
    """Whether a gateway's external address can be published: unicast, not
    unspecified, loopback, link-local, multicast, reserved or private (RFC 1918 or
    RFC 6598: another NAT in front)."""
    ip = ipaddress.IPv4Address(host)
    special = ip.is_unspecified or ip.is_loopback or ip.is_link_local or ip.is_multicast
    special = special or ip.is_reserved or ip == ipaddress.IPv4Address("255.255.255.255")
    return not special and not any(ip in net for net in _NOT_PUBLIC)


# --- the state machine ----------------------------------------------------------------


class PortMapper:
    """One mapping of ``internal_port`` (UDP) at ``gateway``; see the module docstring.

    ``client_ip`` is our address on the link to the gateway (PCP puts it in every
    request; the gateway checks it against the source). Drive it with
    :meth:`poll` at :meth:`next_deadline` and :meth:`receive` for each datagram.
    """

    def __init__(
        self,
        gateway: str,
        client_ip: str,
        internal_port: int,
        now: float,
        *,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.gateway = (str(ipaddress.IPv4Address(gateway)), SERVER_PORT)
        self.client_ip = str(ipaddress.IPv4Address(client_ip))
        if not 0 < internal_port < 65536:
            raise ValueError(f"bad port {internal_port}")
        self.internal_port = internal_port
        self._randbytes = randbytes
        self.mapping: Mapping | None = None
        #: Why the last attempt failed ("" while none did): a result code's name, or
        #: "no answer". Both protocols' failures, "; "-joined.
        self.failure = ""
        self.stats: Counter[str] = Counter()
        self._protocol: Protocol = "pcp"
        self._nonce = randbytes(NONCE_LEN)
        self._tries = 0
        self._due = now  # the next send (or give-up) time
        self._renewing = False
        self._natpmp_host: str | None = None
        self._natpmp_port: tuple[int, int] | None = None  # (external port, lifetime)
        self._why: list[str] = []
        self._announced = float("-inf")

    # --- what the driver asks

    @property
    def protocol(self) -> Protocol:
        return self._protocol

    def next_deadline(self) -> float:
        """When :meth:`poll` wants to be called next."""
        return self._due

    def poll(self, now: float) -> list[bytes]:
        """The requests to send to :attr:`gateway` now (a try, a retry, a renewal), and
        the consequences of a deadline passed (given up: the next protocol, or a pause;
        a mapping expired: gone)."""
        if now < self._due:
            return []
        mapping = self.mapping
        if mapping is not None and not self._renewing:
            self._renewing, self._tries = True, 0  # half the lifetime went by
        if mapping is not None and now >= mapping.expires:
            self.mapping, self._renewing = None, False
            self.stats["expired"] += 1
            self._start("pcp", now)
        if self._tries > len(RETRY_DELAYS):
            return self._gave_up(now)
        self._tries += 1
        delays = (*RETRY_DELAYS, GIVE_UP)
        self._due = now + delays[self._tries - 1]
        if self.mapping is not None:  # a renewal's retries end at the expiry
            self._due = min(self._due, self.mapping.expires)
        self.stats[f"sent_{self._protocol}"] += 1
        return self._requests(LIFETIME)

    def receive(self, data: bytes, source: tuple[str, int], now: float) -> None:
        """A datagram from the gateway's port. Anything that is not the answer to our
        request is counted (``stats``) and changes nothing."""
        if (source[0], source[1]) != self.gateway:
            self.stats["dropped_source"] += 1
            return
        try:
            reply = decode_reply(data)
            self._take(reply, now)
        except BadReply:
            self.stats["dropped_bad"] += 1

    def delete(self) -> list[bytes]:
        """The request that removes our mapping (lifetime 0), if we hold one."""
        if self.mapping is None:
            return []
        self.stats["deleted"] += 1
        if self._protocol == "pcp":  # the same nonce names the mapping (RFC 6887 15)
            return [encode_pcp_map(self.client_ip, self.internal_port, self._nonce, 0, 0)]
        return [encode_natpmp_map(self.internal_port, 0, 0)]  # RFC 6886 3.4

    def announcement(self, data: bytes, source: tuple[str, int], now: float) -> bool:
        """A datagram to port 5350: the gateway's PCP ANNOUNCE (it restarted and lost
        its mappings: RFC 6887 section 14.1.3) or NAT-PMP's address change (RFC 6886
        section 3.2.1). From the gateway's port 5351, well formed, and at most one per
        :data:`ANNOUNCE_MIN` s: a mapping we hold is renewed now, a paused attempt starts
        again now. Returns whether it acted; anything else is counted and ignored."""
        if (source[0], source[1]) != self.gateway:
            self.stats["announce_dropped"] += 1
            return False
        pcp = (
            PCP_HEADER <= len(data) <= PCP_MAX
            and not len(data) % 4
            and data[:2] == bytes([PCP_VERSION, 0x80 | PCP_ANNOUNCE])
        )
        natpmp = len(data) == 12 and data[:2] == bytes([NATPMP_VERSION, 128 + NATPMP_ADDRESS])
        if not (pcp or natpmp) or now < self._announced + ANNOUNCE_MIN:
            self.stats["announce_dropped"] += 1
            return False
        self._announced = now
        self.stats["announce_taken"] += 1
        if self.mapping is not None:
            self._renewing, self._tries, self._due = True, 0, now
        elif self._tries == 0 and self._due > now:  # paused after a failure
            self._start("pcp", now)
        return True

    # --- inside

    def _start(self, protocol: Protocol, now: float) -> None:
        self._protocol, self._tries, self._due = protocol, 0, now
        self._natpmp_host = self._natpmp_port = None
        if protocol == "pcp":
            self._nonce = self._randbytes(NONCE_LEN)

    def _gave_up(self, now: float) -> list[bytes]:
        mapping = self.mapping
        if self._renewing and mapping is not None:
            # no answer to a renewal: again at half the time left
            self._tries = 0
            self._due = min(mapping.expires, now + max(RENEW_MIN, (mapping.expires - now) / 2))
            return []
        self._fail("no answer", now)
        return self.poll(now) if self._due <= now else []

    def _fail(self, why: str, now: float) -> None:
        """This protocol will not do: NAT-PMP next, or (after NAT-PMP) a long pause;
        :attr:`failure` then says why both failed."""
        self._why.append(f"{self._protocol}: {why}")
        if self._protocol == "pcp":
            self._start("nat-pmp", now)
            return
        self.failure, self._why = "; ".join(self._why), []
        self.stats["failed"] += 1
        self._start("pcp", now)
        self._due = now + RETRY_FAILED

    def _requests(self, lifetime: int) -> list[bytes]:
        # suggest our own port, or the one we have (a renewal)
        port = self.internal_port if self.mapping is None else self.mapping.external.port
        if self._protocol == "pcp":
            return [encode_pcp_map(self.client_ip, self.internal_port, self._nonce, lifetime, port)]
        return [encode_natpmp_address(), encode_natpmp_map(self.internal_port, lifetime, port)]

    def _take(self, reply: Reply, now: float) -> None:
        waiting = self._tries > 0 and (self.mapping is None or self._renewing)
        if not waiting:
            raise BadReply("nothing asked")
        if reply.protocol == "nat-pmp" and self._protocol == "pcp":
            if reply.result != _UNSUPPORTED_VERSION:
                raise BadReply("a NAT-PMP reply to a PCP request")
            self.stats["pcp_unsupported"] += 1
            self._fail("UNSUPP_VERSION", now)  # RFC 6887 section 9: fall back
            return
        if reply.protocol != self._protocol:
            raise BadReply(f"a {reply.protocol} reply to a {self._protocol} request")
        unsupported = reply.result == _UNSUPPORTED_VERSION  # may come without a payload
        if reply.protocol == "pcp" and reply.nonce != self._nonce and not unsupported:
            raise BadReply("another nonce")
        if reply.internal_port is not None and reply.internal_port != self.internal_port:
            raise BadReply("another internal port")
        if reply.result != 0:
            self.stats[f"result_{reply.result_name}"] += 1
            if self._renewing:
                self.mapping, self._renewing = None, False  # refused to renew: start over
            self._fail(reply.result_name, now)
            return
        if reply.protocol == "nat-pmp":
            if reply.opcode == NATPMP_ADDRESS:
                self._check_host(reply.external_host)
                self._natpmp_host = reply.external_host
            else:
                self._natpmp_port = self._check_map(reply)
            if self._natpmp_host is None or self._natpmp_port is None:
                return
            self._mapped(self._natpmp_host, *self._natpmp_port, now)
            return
        self._check_host(reply.external_host)
        assert reply.external_host is not None
        self._mapped(reply.external_host, *self._check_map(reply), now)

    @staticmethod
    def _check_host(host: str | None) -> None:
        if host is None or not public_ipv4(host):
            raise BadReply(f"external address {host} cannot be published")

    @staticmethod
    def _check_map(reply: Reply) -> tuple[int, int]:
        if not reply.external_port:
            raise BadReply("external port 0")
        if not reply.lifetime:
            raise BadReply("lifetime 0 for a mapping we asked to keep")
        return reply.external_port, reply.lifetime

    def _mapped(self, host: str, port: int, lifetime: int, now: float) -> None:
        lifetime = max(LIFETIME_MIN, min(LIFETIME, lifetime))
        self.mapping = Mapping(Address(host, port), self._protocol, now + lifetime, lifetime)
        self.failure = ""
        self.stats["mapped"] += 1
        self._renewing, self._tries = False, 0
        self._natpmp_host = self._natpmp_port = None
        self._due = now + lifetime / 2
