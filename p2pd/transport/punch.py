"""Hole punching (issue 13, item 4): two peers behind NATs open a direct UDP path.

A sans-I/O state machine, driven like the DHT and QUIC cores: it takes ``now`` and
datagrams, and says what to send (:meth:`HolePunch.datagrams_to_send`) and when to wake
(:meth:`HolePunch.get_timer`). ``p2pd/transport/punch_driver.py`` runs it on real sockets.

How it goes (docs/PROTOCOL.md, "Hole punching"):

1. Over a channel the two peers already share (an end-to-end encrypted session, relayed
   or not) each sends a :class:`PunchOffer`: a fresh session id, a 32-byte key, its NAT
   mapping kind (``p2pd/dht/reachability.py``) and up to 8 candidate addresses. The two
   offers make one :class:`PunchPlan` on each side (:func:`make_plan`), with the same
   session id and key, and a start time both sides reach at the same moment (the
   initiator waits half the channel's round trip, as libp2p's DCUtR does).
2. From the start both send PROBEs from their main socket to every candidate of the
   other, every :attr:`PunchConfig.interval`. A probe through a NAT opens that NAT's
   mapping towards the other side; the other side's probe then gets in.
3. When one side's NAT maps each destination to a new port (endpoint-dependent, where
   the other side cannot guess the port) the birthday approach: that side sends from
   :attr:`PunchConfig.side_sockets` extra sockets (each gets its own random mapping),
   and the other side probes random ports of its public IP, each port once, at a
   bounded rate. 256 side sockets and the main one make 257 mappings among 64,512
   ports; 1,024 distinct probes hit 1,024 x 257 / 64,512 = 4.08 of them on average and
   miss all (1 - 1,024/64,512)^257 = 1.6 % of the time: 98.4 % of attempts find a path.
   On the testbed's Linux NATs (scripts/bench_punch.py --hits, docs/BENCHMARKS.md) all
   but 2 of some 600 probes that met a mapping got through, under load too: the misses
   are this chance, and a missed attempt is tried again (p2pd/relay/upgrade.py,
   RETRY_DELAYS).
4. A PROBE is answered with an ACK from the socket it came in on. The initiator
   (controlling, as in ICE) takes the first authenticated PROBE or ACK as the path (which
   of its sockets, which address of the peer) and NOMINATEs it, every interval, until
   the peer answers NOMINATED; the responder takes the path its first NOMINATE came
   over. So both use the same path, also when many of the birthday case's mappings
   work at once. Both stop once they agree, or at the deadline (5 s; a birthday
   attempt that has seen no path gives up 1 s after its last port probe is due, 3 s
   after the start: :attr:`PunchConfig.spray_grace`).

A probe is authenticated with the session key (BLAKE2b-128), so a third party who sees
neither offer cannot steer the result to an address of its choice; whoever holds the
key is one of the two peers, and the QUIC handshake over the path checks the peer's
identity key anyway. Probes never go anywhere but the candidates the peer named and, in
the birthday case, ports of the peer's own public IPs; a bounded number of them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import random
import struct
from dataclasses import dataclass, field

from ..errors import WireError
from ..wire import Address, Reader

#: The first byte of a punch datagram on the node's UDP port (the DHT uses 0x00..0x03,
#: QUIC sets 0x40; see p2pd/transport/udp.py).
PUNCH_BYTE = 0x3F
PUNCH_VERSION = 1
T_PROBE, T_ACK, T_NOMINATE, T_NOMINATED = 1, 2, 3, 4
_KINDS = {T_PROBE: "probes", T_ACK: "acks", T_NOMINATE: "nominates", T_NOMINATED: "nominated"}
SESSION_LEN = 8
KEY_LEN = 32
TAG_LEN = 16
#: byte | version | type | role | session (8) | sequence (u32) | tag (16)
DATAGRAM_LEN = 4 + SESSION_LEN + 4 + TAG_LEN
MAX_CANDIDATES = 8

#: Mapping kinds in an offer (as p2pd/dht/reachability.py names them).
MAPPINGS = ("unknown", "none", "endpoint-independent", "endpoint-dependent")
#: Ports a random-port NAT picks from (Linux: 1024..65535 for a source port >= 1024).
RANDOM_PORTS = (1024, 65535)


@dataclass(frozen=True, slots=True)
class PunchConfig:
    """The budgets of one punch attempt (docs/SECURITY.md, "Hole punching")."""

    #: Plain probes: to each candidate, this often.
    interval: float = 0.1
    #: How long an attempt lasts from its start.
    duration: float = 5.0
    #: Birthday case, endpoint-dependent side: extra sockets, each with its own mapping.
    side_sockets: int = 256
    #: Birthday case, the other side: random ports probed in all, and at most this many
    #: per second (1,024 in 2 s: 32-byte probes, about 30 KB/s for 2 s, once per attempt).
    port_probes: int = 1024
    port_rate: float = 512.0
    #: The side sockets send to each candidate at the start and again this much later
    #: (a second chance for a lost first probe; each packet opens the mapping).
    side_repeat: float = 1.0
    #: A birthday attempt in which no path was seen gives up this long after the port
    #: probes' last is due (``port_probes / port_rate``, 2 s after the start; the side
    #: that opens the mappings reckons the same from its own config), not at
    #: ``duration``: the mappings were all opened by 1 s and every port probe is out by
    #: 2 s, so a hit can only be one still on its way (a round trip and a loaded
    #: machine's lag). A miss (1.6 %, more under load) then costs 3 s, not 5, before
    #: the next attempt (p2pd/relay/upgrade.py, RETRY_DELAYS).
    spray_grace: float = 1.0


@dataclass(frozen=True, slots=True)
class PunchOffer:
    """What each peer tells the other before punching (inside an encrypted session)."""

    session: bytes
    key: bytes
    mapping: str
    candidates: tuple[Address, ...]

    @classmethod
    def new(cls, mapping: str, candidates: list[Address]) -> PunchOffer:
        return cls(os.urandom(SESSION_LEN), os.urandom(KEY_LEN), mapping, tuple(candidates))

    def __post_init__(self) -> None:
        if len(self.session) != SESSION_LEN or len(self.key) != KEY_LEN:
            raise WireError("punch offer: bad session or key length")
        if self.mapping not in MAPPINGS:
            raise WireError("punch offer: unknown mapping kind")
        if not 1 <= len(self.candidates) <= MAX_CANDIDATES:
            raise WireError(f"punch offer: 1 to {MAX_CANDIDATES} candidates")

    def encode(self) -> bytes:
        """version | session (8) | key (32) | mapping (u8) | n (u8) | n addresses."""
        parts = [bytes([PUNCH_VERSION]), self.session, self.key]
        parts.append(bytes([MAPPINGS.index(self.mapping), len(self.candidates)]))
        parts += [a.encode() for a in self.candidates]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> PunchOffer:
        """Raises WireError on anything but one well-formed offer (at most 188 bytes)."""
        if len(data) > 1 + SESSION_LEN + KEY_LEN + 2 + MAX_CANDIDATES * 19:
            raise WireError("punch offer too long")
        reader = Reader(data)
        if reader.u8() != PUNCH_VERSION:
            raise WireError("punch offer: unknown version")
        session = reader.take(SESSION_LEN)
        key = reader.take(KEY_LEN)
        mapping = reader.u8()
        if mapping >= len(MAPPINGS):
            raise WireError("punch offer: unknown mapping kind")
        count = reader.u8()
        if not 1 <= count <= MAX_CANDIDATES:
            raise WireError(f"punch offer: 1 to {MAX_CANDIDATES} candidates")
        candidates = tuple(Address.decode_from(reader) for _ in range(count))
        reader.end()
        return cls(session, key, MAPPINGS[mapping], candidates)


@dataclass(frozen=True, slots=True)
class PunchPlan:
    """One side's part of an agreed attempt."""

    session: bytes
    key: bytes
    #: 0 for the initiator, 1 for the responder (probes carry it: a probe of ours
    #: reflected back to us is not taken for the peer's).
    role: int
    remote: tuple[Address, ...]
    #: Extra sockets we send from (we are the endpoint-dependent side of a birthday case).
    side_sockets: int = 0
    #: Random ports of the remote's public IPs we probe (the other side of it).
    port_probes: int = 0
    start: float = 0.0


def punchable(ours: str, theirs: str) -> bool:
    """Whether an attempt can succeed between two mapping kinds: not when both map each
    destination to a new port (neither can guess the other's; a relay carries that)."""
    return not (ours == "endpoint-dependent" and theirs == "endpoint-dependent")


def punchable_offers(ours: PunchOffer, theirs: PunchOffer) -> bool:
    """Whether an attempt can succeed between two offers: :func:`punchable` on the
    (IPv4) mapping kinds, or both sides offer an IPv6 address (issue 13, item 6): IPv6
    has no NAT, at most a firewall that lets in what went out, which both sides sending
    at once gets through, whatever their IPv4 NATs do."""
    return punchable(ours.mapping, theirs.mapping) or (_has_ipv6(ours) and _has_ipv6(theirs))


def _has_ipv6(offer: PunchOffer) -> bool:
    return any(":" in a.host and not _local(a.host) for a in offer.candidates)


def make_plan(
    ours: PunchOffer,
    theirs: PunchOffer,
    *,
    initiator: bool,
    start: float,
    config: PunchConfig | None = None,
) -> PunchPlan:
    """Our plan from both offers. The session id and key are the initiator's (both sides
    take the same ones); the birthday roles follow the two mapping kinds."""
    config = config or PunchConfig()
    lead = ours if initiator else theirs
    side = port = 0
    if ours.mapping == "endpoint-dependent" and theirs.mapping != "endpoint-dependent":
        side = config.side_sockets
    if theirs.mapping == "endpoint-dependent" and ours.mapping != "endpoint-dependent":
        port = config.port_probes
    return PunchPlan(
        session=lead.session,
        key=lead.key,
        role=0 if initiator else 1,
        remote=theirs.candidates,
        side_sockets=side,
        port_probes=port,
        start=start,
    )


_LOCAL = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fe80::/10")
)


def _local(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    return ip.is_loopback or ip.is_link_local or any(ip in n for n in _LOCAL)


def _tag(key: bytes, header: bytes) -> bytes:
    return hashlib.blake2b(header, key=key, digest_size=TAG_LEN).digest()


def encode_datagram(key: bytes, kind: int, role: int, session: bytes, seq: int) -> bytes:
    header = bytes([PUNCH_BYTE, PUNCH_VERSION, kind, role]) + session + struct.pack(">I", seq)
    return header + _tag(key, header)


@dataclass(frozen=True, slots=True)
class PunchResult:
    """The path found: our socket (0 the main one, 1.. the side sockets) and the peer's
    address as it reaches us; ``at`` is when, in the core's clock."""

    socket: int
    address: Address
    at: float


Send = tuple[int, bytes, tuple[str, int]]


@dataclass
class HolePunch:
    """One attempt, one side. Feed it what arrives for its session, send what it says."""

    plan: PunchPlan
    config: PunchConfig = field(default_factory=PunchConfig)
    rng: random.Random = field(default_factory=random.Random)
    result: PunchResult | None = None
    failed: bool = False
    #: Counters: probes/acks sent and received, datagrams refused and why.
    stats: dict[str, int] = field(default_factory=dict)
    _queue: list[Send] = field(default_factory=list)
    _next_round: float = 0.0
    _next_side: float = 0.0
    _side_rounds: int = 0
    _ports_sent: int = 0
    _port_hosts: tuple[str, ...] = ()
    _ports_probed: set[tuple[str, int]] = field(default_factory=set)
    _seq: int = 0
    _confirmed: bool = False

    def __post_init__(self) -> None:
        self._next_round = self._next_side = self.plan.start
        # Random ports are probed on the peer's public IPv4 addresses only: never on a
        # private (RFC 1918), link-local or loopback candidate, which is a LAN of ours,
        # nor on IPv6 ones (no NAT there: the one port offered is the port).
        hosts = [a.host for a in self.plan.remote if not _local(a.host) and ":" not in a.host]
        hosts = list(dict.fromkeys(hosts))
        self._port_hosts = tuple(hosts)

    @property
    def deadline(self) -> float:
        return self.plan.start + self.config.duration

    @property
    def give_up_at(self) -> float:
        """When the attempt fails if no path was seen by then: :attr:`deadline`, or
        earlier in the birthday case (:attr:`PunchConfig.spray_grace`). A path seen
        (the initiator nominating it) keeps the attempt going to the deadline."""
        if self.result is not None or not (self.plan.port_probes or self.plan.side_sockets):
            return self.deadline
        config = self.config
        spray = config.port_probes / config.port_rate if config.port_rate > 0 else 0.0
        return min(self.deadline, self.plan.start + spray + config.spray_grace)

    @property
    def done(self) -> bool:
        """Failed, or both sides agree on the path (as far as this side can know)."""
        if self.plan.role == 0:
            return self._confirmed or self.failed
        return self.result is not None or self.failed

    def _count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def _datagram(self, kind: int) -> bytes:
        self._seq += 1
        return encode_datagram(self.plan.key, kind, self.plan.role, self.plan.session, self._seq)

    # ---- input

    def datagram_received(self, data: bytes, addr: tuple[str, int], sock: int, now: float) -> None:
        """A datagram whose first byte is PUNCH_BYTE, on our socket ``sock``."""
        if len(data) != DATAGRAM_LEN or data[1] != PUNCH_VERSION:
            self._count("refused_malformed")
            return
        kind, role = data[2], data[3]
        if data[4 : 4 + SESSION_LEN] != self.plan.session:
            self._count("refused_session")
            return
        header, tag = data[:-TAG_LEN], data[-TAG_LEN:]
        if not hmac.compare_digest(tag, _tag(self.plan.key, header)):
            self._count("refused_tag")
            return
        if role == self.plan.role or kind not in _KINDS:
            self._count("refused_role")  # our own probe, reflected
            return
        self._count(_KINDS[kind] + "_in")
        if self.failed:
            return
        controlling = self.plan.role == 0
        if kind == T_PROBE:
            self._queue.append((sock, self._datagram(T_ACK), addr))
            self._count("acks_out")
        if controlling and kind in (T_PROBE, T_ACK) and self.result is None:
            self.result = PunchResult(sock, Address(addr[0], addr[1]), now)
            self._next_round = now  # nominate at once
        elif controlling and kind == T_NOMINATED and self._on_path(sock, addr):
            self._confirmed = True
        elif not controlling and kind == T_NOMINATE:
            if self.result is None:
                self.result = PunchResult(sock, Address(addr[0], addr[1]), now)
            if self._on_path(sock, addr):
                self._queue.append((sock, self._datagram(T_NOMINATED), addr))
                self._count("nominated_out")

    def _on_path(self, sock: int, addr: tuple[str, int]) -> bool:
        r = self.result
        return r is not None and r.socket == sock and r.address.as_tuple() == tuple(addr)

    # ---- timers

    def get_timer(self) -> float | None:
        if self.done:
            return None
        timers = [self._next_round, self.give_up_at]
        if self._side_rounds < 2 and self.plan.side_sockets:
            timers.append(self._next_side)
        return min(timers)

    def handle_timer(self, now: float) -> None:
        if self.done or now < self.plan.start:
            return
        if now >= self.give_up_at:
            self.failed = True
            self.result = None  # never confirmed: not a path to use
            return
        if self.result is not None:  # controlling: nominate the path until confirmed
            if now >= self._next_round:
                r = self.result
                self._queue.append((r.socket, self._datagram(T_NOMINATE), r.address.as_tuple()))
                self._count("nominates_out")
                self._next_round = now + self.config.interval
            return
        if now >= self._next_round:
            elapsed = now - self.plan.start
            for address in self.plan.remote:
                self._queue.append((0, self._datagram(T_PROBE), address.as_tuple()))
                self._count("probes_out")
            if self.plan.port_probes and self._port_hosts:
                # The total allowed by now at port_rate, never more than port_probes.
                allowed = min(self.plan.port_probes, int(elapsed * self.config.port_rate) + 8)
                for _ in range(max(0, allowed - self._ports_sent)):
                    host = self._port_hosts[self._ports_sent % len(self._port_hosts)]
                    port = self._new_port(host)
                    self._queue.append((0, self._datagram(T_PROBE), (host, port)))
                    self._ports_sent += 1
                    self._count("port_probes_out")
            step = self.config.interval
            if self.plan.port_probes and self._ports_sent < self.plan.port_probes:
                step = min(step, 16 / self.config.port_rate)  # ~16 port probes a round
            self._next_round = now + step
        if self.plan.side_sockets and self._side_rounds < 2 and now >= self._next_side:
            for index in range(1, self.plan.side_sockets + 1):
                for address in self.plan.remote:
                    if ":" in address.host:
                        continue  # side sockets are IPv4 (the birthday is an IPv4 NAT's)
                    self._queue.append((index, self._datagram(T_PROBE), address.as_tuple()))
                    self._count("side_probes_out")
            self._side_rounds += 1
            self._next_side = now + self.config.side_repeat

    def _new_port(self, host: str) -> int:
        """A random port of ``host`` not probed yet in this attempt. Drawn with
        replacement, 1,024 probes repeat about 8 ports (1,024^2 / 2 / 64,512): 0.8 % of
        the probes wasted, 1.7 % misses instead of 1.6 %. A few draws at most: never more
        than 1,024 of the 64,512 ports are taken."""
        low, high = RANDOM_PORTS
        port = self.rng.randint(low, high)
        for _ in range(64):
            if (host, port) not in self._ports_probed:
                break
            port = self.rng.randint(low, high)
        self._ports_probed.add((host, port))
        return port

    # ---- output

    def datagrams_to_send(self) -> list[Send]:
        """(socket index, datagram, address) to send now, in order."""
        out, self._queue = self._queue, []
        return out
