"""The relay side: :class:`RelayServer`, a sans-I/O state machine (docs/PROTOCOL.md,
"Relays"; docs/SECURITY.md, "Relays").

``datagram_received(data, addr, now)`` returns the datagrams to send; ``get_timer()`` and
``handle_timer(now)`` expire registrations and circuits. It reads no clock and owns no
socket: p2pd/relay/service.py drives it from the UDP task.

What it guarantees, each with a test in tests/test_relay.py:

- **No open proxy.** It sends only to an address that asked: a registered client (which
  proved, from that address, that it receives there and holds its key), or an initiator
  that did the same for its CONNECT. Data flows only on a circuit both ends asked for
  (the initiator's CONNECT, the target's ACCEPT), and only between those two addresses.
- **No amplification.** Every answer to an unproven address is smaller than what came in
  (a 32-byte HELLO draws a 25-byte CHALLENGE; a refusal is 18 bytes); a relayed DATA
  frame leaves exactly as long as it came in (the same 9-byte header, another type byte).
- **Return routability before any state or signature check.** A cookie is a keyed
  BLAKE2b of the source address and the minute, so a spoofer never sees one for an
  address it does not receive at; no state is kept for a HELLO.
- **A registration that moves takes its circuits along.** A client whose NAT forgot its
  mapping (a reboot, a flush) registers again from its new address; the circuits of its
  key then go to that address, so its open connections live on. Only a signed REGISTER
  from a proven address moves anything: a KEEPALIVE only asks, and changes nothing.
- **Counted and capped.** Registrations (in all, per IP), circuits (in all, per key),
  bytes per circuit, bytes per second in all and per sending key (token buckets).
  Malformed frames are dropped and counted (``stats``).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import RelayConfig
from ..identity import verify_signature
from ..wire import Address
from .frames import (
    COOKIE,
    TO_RELAY,
    Accept,
    Alive,
    Challenge,
    Connect,
    Connected,
    Data,
    FrameType,
    Hello,
    Incoming,
    Keepalive,
    RefusalReason,
    Refused,
    Register,
    Registered,
    RelayFrameError,
    Seen,
    decode,
)

NetworkAddress = tuple[str, int]
Outgoing = list[tuple[bytes, NetworkAddress]]
Verify = Callable[[bytes, bytes, bytes], bool]

#: A registration holds this long unless refreshed (clients refresh every 25 s).
REGISTRATION_LIFETIME = 90
#: A circuit the target has not accepted after this long is forgotten.
PENDING_TIMEOUT = 10.0
#: An open circuit with no data for this long is closed (QUIC's keep-alive sends every
#: 10 s while a connection is in use; its idle close is 60 s).
CIRCUIT_IDLE = 75.0
#: Cookies are good for the minute they were made in and the next one.
COOKIE_PERIOD = 60.0
#: Signature checks (REGISTER, CONNECT) one IP address may cause per second, and the
#: most addresses whose budget is remembered (least recently used forgotten first). An
#: honest client needs one every 25 s, and one per circuit it opens.
VERIFY_RATE = 10.0
VERIFY_SOURCES = 4096


def _ip(addr: NetworkAddress) -> str:
    host = addr[0]
    return host[7:] if host.startswith("::ffff:") else host


@dataclass(slots=True)
class Registration:
    key: bytes
    address: NetworkAddress
    expires: float


@dataclass(slots=True)
class Circuit:
    circuit_id: bytes
    initiator: bytes
    initiator_address: NetworkAddress
    target: bytes
    target_address: NetworkAddress
    cookie: bytes
    created: float
    last: float
    open: bool = False
    bytes: int = 0


@dataclass(slots=True)
class TokenBucket:
    """``rate`` bytes a second, holding at most one second's worth."""

    rate: float
    level: float
    at: float = 0.0

    def take(self, amount: int, now: float) -> bool:
        self.level = min(self.rate, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level < amount:
            return False
        self.level -= amount
        return True


@dataclass(slots=True)
class _PeerUse:
    circuits: int = 0
    bucket: TokenBucket | None = None
    totals: Counter[str] = field(default_factory=Counter)


class RelayServer:
    """The relay state machine. ``serving`` False (turned off, or behind a NAT) answers
    every request with ``Refused(NOT_A_RELAY)`` and forwards nothing new."""

    def __init__(
        self,
        config: RelayConfig | None = None,
        *,
        secret: bytes | None = None,
        verify: Verify = verify_signature,
    ) -> None:
        self.config = config or RelayConfig()
        self.serving = self.config.enabled
        self._secret = secret or os.urandom(32)
        self._verify = verify
        self.stats: Counter[str] = Counter()
        self._registrations: dict[bytes, Registration] = {}
        self._per_ip: Counter[str] = Counter()
        self._circuits: dict[bytes, Circuit] = {}
        self._peers: dict[bytes, _PeerUse] = {}
        self._bucket = TokenBucket(self.config.bandwidth, self.config.bandwidth)
        self._verify_budget: OrderedDict[str, TokenBucket] = OrderedDict()
        self._random = os.urandom

    # ------------------------------------------------------------------ cookies

    def cookie(self, addr: NetworkAddress, now: float, *, previous: bool = False) -> bytes:
        period = int(now // COOKIE_PERIOD) - (1 if previous else 0)
        data = struct.pack(">q", period) + _ip(addr).encode() + struct.pack(">H", addr[1])
        return hashlib.blake2b(data, key=self._secret, digest_size=COOKIE).digest()

    def _cookie_ok(self, cookie: bytes, addr: NetworkAddress, now: float) -> bool:
        return cookie in (self.cookie(addr, now), self.cookie(addr, now, previous=True))

    # ------------------------------------------------------------------ input

    def datagram_received(self, data: bytes, addr: NetworkAddress, now: float) -> Outgoing:
        """Take one datagram from ``addr``; return what to send (and where)."""
        try:
            frame = decode(data)
        except RelayFrameError:
            self._drop("malformed")
            return []
        if data[0] not in TO_RELAY:
            self._drop("wrong_direction")
            return []
        if isinstance(frame, Data):
            return self._data(frame, addr, now, len(data))
        if isinstance(frame, Hello):
            self.stats["hello"] += 1
            # Stateless, and smaller than the Hello (32 -> 25 bytes).
            return [(Challenge(frame.nonce, self.cookie(addr, now)).encode(), addr)]
        if isinstance(frame, Register):
            return self._register(frame, addr, now)
        if isinstance(frame, Connect):
            return self._connect(frame, addr, now)
        if isinstance(frame, Accept):
            return self._accept(frame, addr, now)
        if isinstance(frame, Keepalive):
            return self._keepalive(frame, addr, now)
        self._drop("wrong_direction")  # unreachable: TO_RELAY covers the rest
        return []

    def _may_verify(self, addr: NetworkAddress, now: float) -> bool:
        """A signature check (86 µs) within the source IP's budget (:data:`VERIFY_RATE`):
        a source that proved its address can still not make us verify at line rate."""
        ip = _ip(addr)
        bucket = self._verify_budget.pop(ip, None)
        if bucket is None:
            bucket = TokenBucket(VERIFY_RATE, VERIFY_RATE, now)
            if len(self._verify_budget) >= VERIFY_SOURCES:
                self._verify_budget.popitem(last=False)
        self._verify_budget[ip] = bucket
        if bucket.take(1, now):
            return True
        self._drop("verify_rate")
        return False

    def _drop(self, reason: str) -> None:
        self.stats["dropped"] += 1
        self.stats[f"dropped_{reason}"] += 1

    def _refuse(
        self, frame: Register | Connect, reason: RefusalReason, addr: NetworkAddress
    ) -> Outgoing:
        self.stats[f"refused_{reason.name.lower()}"] += 1
        kind = FrameType.REGISTER if isinstance(frame, Register) else FrameType.CONNECT
        return [(Refused(frame.cookie, kind, reason).encode(), addr)]

    def _checked(
        self, frame: Register | Connect, signed: bytes, addr: NetworkAddress, now: float
    ) -> Outgoing | None:
        """None if a REGISTER or CONNECT may go on (its cookie, our serving, the
        signature budget, its signature, in that order), else the answer to send."""
        if not self._cookie_ok(frame.cookie, addr, now):
            # No signature check before return routability: a spoofer costs a hash.
            return self._refuse(frame, RefusalReason.BAD_COOKIE, addr)
        if not self.serving:
            return self._refuse(frame, RefusalReason.NOT_A_RELAY, addr)
        if not self._may_verify(addr, now):
            return []
        if not self._verify(frame.key, signed, frame.signature):
            return self._refuse(frame, RefusalReason.BAD_SIGNATURE, addr)
        return None

    def _register(self, frame: Register, addr: NetworkAddress, now: float) -> Outgoing:
        answer = self._checked(frame, Register.signed_part(frame.cookie), addr, now)
        if answer is not None:
            return answer
        current = self._registrations.get(frame.key)
        moved = current is None or _ip(current.address) != _ip(addr)
        if moved and (
            len(self._registrations) >= self.config.max_registrations
            or self._per_ip[_ip(addr)] >= self.config.max_registrations_per_address
        ):
            return self._refuse(frame, RefusalReason.BUSY, addr)
        if current is not None:
            self._per_ip[_ip(current.address)] -= 1
            if current.address != addr:
                self._move(frame.key, current.address, addr)
        self._registrations[frame.key] = Registration(frame.key, addr, now + REGISTRATION_LIFETIME)
        self._per_ip[_ip(addr)] += 1
        self.stats["registered"] += 1
        return [(Registered(frame.cookie, REGISTRATION_LIFETIME).encode(), addr)]

    def _move(self, key: bytes, old: NetworkAddress, new: NetworkAddress) -> None:
        """``key`` registered again from ``new`` (its NAT mapped it anew): its circuits
        follow, on the side of each that was ``key`` at ``old``."""
        self.stats["registrations_moved"] += 1
        for circuit in self._circuits.values():
            if circuit.target == key and circuit.target_address == old:
                circuit.target_address = new
                self.stats["circuits_moved"] += 1
            if circuit.initiator == key and circuit.initiator_address == old:
                circuit.initiator_address = new
                self.stats["circuits_moved"] += 1

    def _keepalive(self, frame: Keepalive, addr: NetworkAddress, now: float) -> Outgoing:
        # Stateless and cheap (one lookup), and smaller than what came in (41 -> 10
        # bytes). Only whoever receives at ``addr`` learns the answer, which says no
        # more than whether it is itself the registered address of that key.
        self.stats["keepalives"] += 1
        held = self._registrations.get(frame.key)
        here = self.serving and held is not None and held.address == addr and held.expires > now
        return [(Alive(frame.nonce, here).encode(), addr)]

    def _connect(self, frame: Connect, addr: NetworkAddress, now: float) -> Outgoing:
        answer = self._checked(frame, Connect.signed_part(frame.cookie, frame.target), addr, now)
        if answer is not None:
            return answer
        target = self._registrations.get(frame.target)
        if target is None or target.expires <= now or frame.target == frame.key:
            return self._refuse(frame, RefusalReason.UNKNOWN_TARGET, addr)
        for existing in self._circuits.values():
            # The initiator's retransmission: the same ask again, the same INCOMING.
            if (existing.cookie, existing.initiator, existing.target) == (
                frame.cookie,
                frame.key,
                frame.target,
            ) and existing.initiator_address == addr:
                self.stats["connect_repeated"] += 1
                if existing.open:
                    connected = Connected(frame.cookie, existing.circuit_id).encode()
                    return [(connected, addr), _seen_by(existing, initiator=True)]
                incoming = Incoming(existing.circuit_id, frame.key).encode()
                return [(incoming, target.address), _seen_by(existing, initiator=False)]
        for existing in self._circuits.values():
            # The initiator's NAT mapped it anew (issue 13: a flush, another network): a
            # signed CONNECT from its proven new address moves its open circuit to that
            # target there, as a REGISTER moves a registration; its connection lives on.
            if (
                existing.open
                and (existing.initiator, existing.target) == (frame.key, frame.target)
                and existing.initiator_address != addr
            ):
                existing.initiator_address = addr
                existing.cookie = frame.cookie
                self.stats["circuits_moved"] += 1
                connected = Connected(frame.cookie, existing.circuit_id).encode()
                return [(connected, addr), _seen_by(existing, initiator=True)]
        cap = self.config.max_circuits_per_peer
        if (
            len(self._circuits) >= self.config.max_circuits
            or self._circuits_of(frame.key) >= cap
            or self._circuits_of(frame.target) >= cap
        ):
            return self._refuse(frame, RefusalReason.BUSY, addr)
        circuit_id = self._random(8)
        while circuit_id in self._circuits:
            circuit_id = self._random(8)
        self._circuits[circuit_id] = Circuit(
            circuit_id, frame.key, addr, frame.target, target.address, frame.cookie, now, now
        )
        self._use(frame.key).circuits += 1
        self._use(frame.target).circuits += 1
        self.stats["circuits_asked"] += 1
        # 41 + 27 bytes to the target, which registered (asked for these); the CONNECT
        # was 145.
        incoming = Incoming(circuit_id, frame.key).encode()
        return [(incoming, target.address), _seen_by(self._circuits[circuit_id], initiator=False)]

    def _accept(self, frame: Accept, addr: NetworkAddress, now: float) -> Outgoing:
        circuit = self._circuits.get(frame.circuit)
        if circuit is None or circuit.target_address != addr:
            self._drop("accept_unknown")
            return []
        registration = self._registrations.get(circuit.target)
        if registration is None or registration.address != addr:
            self._drop("accept_unregistered")
            return []
        if not circuit.open:
            circuit.open = True
            circuit.last = now
            self.stats["circuits_opened"] += 1
        connected = Connected(circuit.cookie, circuit.circuit_id).encode()
        return [(connected, circuit.initiator_address), _seen_by(circuit, initiator=True)]

    def _data(self, frame: Data, addr: NetworkAddress, now: float, size: int) -> Outgoing:
        circuit = self._circuits.get(frame.circuit)
        if circuit is None or not circuit.open:
            self._drop("data_no_circuit")
            return []
        if addr == circuit.initiator_address:
            sender, to = circuit.initiator, circuit.target_address
        elif addr == circuit.target_address:
            sender, to = circuit.target, circuit.initiator_address
        else:
            # Knowing a circuit id is not enough: only its two ends may use it.
            self._drop("data_wrong_source")
            return []
        if circuit.bytes + size > self.config.circuit_bytes:
            self.stats["circuits_closed_bytes"] += 1
            self._close(circuit)
            self._drop("circuit_bytes")
            return []
        use = self._use(sender)
        if use.bucket is None:
            use.bucket = TokenBucket(self.config.peer_bandwidth, self.config.peer_bandwidth, now)
        if not use.bucket.take(size, now):
            self._drop("peer_bandwidth")
            return []
        if not self._bucket.take(size, now):
            self._drop("bandwidth")
            return []
        circuit.bytes += size
        circuit.last = now
        self.stats["relayed_datagrams"] += 1
        self.stats["relayed_bytes"] += size
        # The same header length, the same payload: out is exactly as long as in.
        return [(Data(False, frame.circuit, frame.payload).encode(), to)]

    # ------------------------------------------------------------------ bookkeeping

    def _use(self, key: bytes) -> _PeerUse:
        use = self._peers.get(key)
        if use is None:
            use = self._peers[key] = _PeerUse()
        return use

    def _circuits_of(self, key: bytes) -> int:
        use = self._peers.get(key)  # no entry made for a refused request
        return 0 if use is None else use.circuits

    def _close(self, circuit: Circuit) -> None:
        if self._circuits.pop(circuit.circuit_id, None) is None:
            return
        for key in (circuit.initiator, circuit.target):
            use = self._peers.get(key)
            if use is not None:
                use.circuits -= 1
                if use.circuits <= 0 and key not in self._registrations:
                    del self._peers[key]

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` has something to expire (None: nothing held)."""
        times = [r.expires for r in self._registrations.values()]
        for c in self._circuits.values():
            times.append(c.last + (CIRCUIT_IDLE if c.open else PENDING_TIMEOUT))
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for key, reg in list(self._registrations.items()):
            if reg.expires <= now:
                del self._registrations[key]
                self._per_ip[_ip(reg.address)] -= 1
                if self._per_ip[_ip(reg.address)] <= 0:
                    del self._per_ip[_ip(reg.address)]
                use = self._peers.get(key)
                if use is not None and use.circuits <= 0:
                    del self._peers[key]  # nothing of it held any more
                self.stats["registrations_expired"] += 1
        for circuit in list(self._circuits.values()):
            limit = CIRCUIT_IDLE if circuit.open else PENDING_TIMEOUT
            if circuit.last + limit <= now:
                self.stats["circuits_expired"] += 1
                self._close(circuit)

    def held(self) -> dict[str, int]:
        """How many entries each table holds (each is bounded; tests check they empty)."""
        return {
            "registrations": len(self._registrations),
            "addresses": len(self._per_ip),
            "circuits": len(self._circuits),
            "peers": len(self._peers),
            "verify_budgets": len(self._verify_budget),
        }

    def statistics(self) -> dict[str, Any]:
        return {
            "serving": self.serving,
            "registrations": len(self._registrations),
            "circuits": sum(1 for c in self._circuits.values() if c.open),
            "circuits_pending": sum(1 for c in self._circuits.values() if not c.open),
            "relayed_bytes": self.stats["relayed_bytes"],
            "counters": dict(self.stats),
        }


def _seen_by(circuit: Circuit, *, initiator: bool) -> tuple[bytes, NetworkAddress]:
    """SEEN for one end of a circuit: where we see the other end (issue 13, a punching
    candidate). The target's goes with INCOMING (41 + 27 bytes, for a 145-byte CONNECT
    from a proven address); the initiator's with CONNECTED (25 + 27), to the address
    that proved itself for the CONNECT."""
    if initiator:
        seen = Seen(circuit.circuit_id, _address(circuit.target_address))
        return seen.encode(), circuit.initiator_address
    seen = Seen(circuit.circuit_id, _address(circuit.initiator_address))
    return seen.encode(), circuit.target_address


def _address(addr: NetworkAddress) -> Address:
    host = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    return Address(host, addr[1])
