"""The client side of relays: :class:`RelayClient`, a sans-I/O state machine
(docs/PROTOCOL.md, "Relays").

A NATed node keeps registrations with a few relays (HELLO -> CHALLENGE -> REGISTER ->
REGISTERED, again every ``refresh`` seconds). Between refreshes it sends each relay a
KEEPALIVE every ``keepalive`` seconds, which holds its NAT mapping towards the relay and
is answered ALIVE, saying whether the relay holds our key at the address it saw (issue
13, item 5: a NAT that rebooted or flushed its table maps us anew, maybe to a new port).
An answer "not here" registers again at once (the relay then moves our circuits to the
new address); :data:`KEEPALIVE_TRIES` unanswered keepalives do too, and a relay that
answers no HELLO either is given up and replaced.

Any node opens a circuit to a peer through one of that peer's relays (HELLO ->
CHALLENGE -> CONNECT -> the relay's INCOMING to the peer, its ACCEPT -> CONNECTED). A
registered node accepts an INCOMING only from a relay it is registered with. When the
circuit opens, the relay tells each end where it sees the other (SEEN): hole punching
adds it to the peer's candidates (p2pd/relay/upgrade.py).

Each circuit gets a *virtual address* that the QUIC endpoint uses as the peer's address:
``100:0:x:y::1`` port 1, x:y a counter, so each circuit is its own /64 (what
p2pd/transport/quic/admission.py counts as one source). It is in ``0000::/8``, reserved
by the IETF (RFC 4291 section 2.4) and never a real peer's address: the send path knows
a virtual address by its first characters (:func:`is_virtual`). Why not the relay's own
address: aioquic keys its network paths by the address tuple
(``QuicConnection._find_network_path``): every connection through one relay would share
one path, and a packet from an address it has not seen starts path validation
(RFC 9000 section 9). One stable address per circuit is one path for the whole
connection.

Input: ``datagram_received(data, addr, now)`` returns an unwrapped QUIC packet and its
virtual address, or None (a control frame, taken; or dropped and counted). Output:
``datagrams_to_send()``; ``wrap(payload, virtual)`` for the QUIC send path. Timers:
``get_timer()`` / ``handle_timer(now)``. It reads no clock and owns no socket.
"""

from __future__ import annotations

import ipaddress
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..wire import Address
from .frames import (
    MAX_PAYLOAD,
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
Sign = Callable[[bytes], bytes]

#: A request not answered after this long is sent again, at most :data:`TRIES` times.
RESEND = 1.0
TRIES = 3
#: A cookie from a relay is reused for this long (it is good for at least 60 s).
COOKIE_REUSE = 45.0
#: Keepalives sent RESEND apart and unanswered before we register again (a dead relay
#: then fails the HELLOs too and is replaced).
KEEPALIVE_TRIES = 2
#: A relay that refused or did not answer is not asked to register us for this long.
RELAY_BACKOFF = 60.0
#: A circuit with no packet either way for this long is forgotten (the relay's is 75 s).
CIRCUIT_IDLE = 90.0
#: Most circuits kept (each a virtual address); the oldest idle go first.
MAX_CIRCUITS = 256
#: Most candidate relays remembered.
MAX_CANDIDATES = 32


def virtual_address(number: int) -> NetworkAddress:
    """The virtual address of circuit ``number``: ``100:0:x:y::1`` port 1."""
    value = (0x100 << 112) | ((number & 0xFFFFFFFF) << 64) | 1
    return (str(ipaddress.IPv6Address(value)), 1)


def is_virtual(host: str) -> bool:
    """Whether ``host`` is a circuit's virtual address (never a real peer's)."""
    return host.startswith("100:")


@dataclass(slots=True)
class _Registration:
    relay: NetworkAddress
    state: Literal["hello", "register", "registered"] = "hello"
    nonce: bytes = b""
    cookie: bytes = b""
    sent_at: float = 0.0
    tries: int = 0
    #: until when the relay holds us (0: not registered)
    holds_until: float = 0.0
    refresh_at: float = 0.0
    #: the next keepalive is due (while registered)
    alive_at: float = 0.0
    #: the nonce of the keepalive awaiting its answer (b"": none), when it was sent, tries
    alive_nonce: bytes = b""
    alive_sent: float = 0.0
    alive_tries: int = 0

    def alive_due(self) -> float:
        return self.alive_sent + RESEND if self.alive_nonce else self.alive_at


@dataclass(slots=True)
class CircuitRequest:
    """One CONNECT in progress; ``done`` once ``virtual`` is set or ``error`` is."""

    relay: NetworkAddress
    target: bytes
    deadline: float
    state: Literal["hello", "connect", "queued", "done"] = "hello"
    nonce: bytes = b""
    cookie: bytes = b""
    sent_at: float = 0.0
    virtual: NetworkAddress | None = None
    error: str | None = None
    on_done: Callable[[CircuitRequest], None] | None = None

    @property
    def done(self) -> bool:
        return self.state == "done"


@dataclass(slots=True)
class _Circuit:
    relay: NetworkAddress
    circuit_id: bytes
    virtual: NetworkAddress
    peer_key: bytes
    incoming: bool
    last: float
    counters: Counter[str] = field(default_factory=Counter)
    #: Where the relay sees the other end (its SEEN frame): a hole-punching candidate.
    peer_seen: Address | None = None


class RelayClient:
    """Registrations with relays and circuits through them, for one node.

    ``sign`` signs with the node's identity key (``public_key``): a relay registers the
    key that signed, so a peer asking for a circuit to that key finds us.
    ``on_registrations_changed`` is called when the set of relays holding us changes;
    ``on_mapping_moved`` when a relay says it holds us at another address than the one
    our keepalive came from: our NAT mapped us anew (a flush, a reboot, another network).
    """

    def __init__(
        self,
        sign: Sign,
        public_key: bytes,
        *,
        wanted: int = 3,
        refresh: float = 25.0,
        keepalive: float = 4.0,
        on_registrations_changed: Callable[[], None] = lambda: None,
        on_mapping_moved: Callable[[], None] = lambda: None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._sign = sign
        self.public_key = public_key
        self.wanted = wanted
        self.refresh = refresh
        self.keepalive = keepalive
        self._on_changed = on_registrations_changed
        self._on_moved = on_mapping_moved
        self._followed_at = -RESEND
        self._random = random
        self.stats: Counter[str] = Counter()
        self._out: list[tuple[bytes, NetworkAddress]] = []
        self._registrations: dict[NetworkAddress, _Registration] = {}
        self._candidates: list[NetworkAddress] = []
        self._backoff: dict[NetworkAddress, float] = {}
        self._keep = False
        self._cookies: dict[NetworkAddress, tuple[bytes, float]] = {}
        self._requests: list[CircuitRequest] = []
        self._circuits: dict[tuple[NetworkAddress, bytes], _Circuit] = {}
        self._by_virtual: dict[NetworkAddress, _Circuit] = {}
        self._counter = 0
        self._last_registered: tuple[NetworkAddress, ...] = ()

    # ------------------------------------------------------------------ registrations

    def keep_registrations(self, candidates: list[NetworkAddress], now: float) -> None:
        """Be registered with :attr:`wanted` relays, chosen in the order of
        ``candidates`` (public DHT contacts); the ones we hold are kept."""
        self._keep = True
        self._candidates = list(dict.fromkeys(candidates))[:MAX_CANDIDATES]
        self._fill(now)

    def stop_registrations(self) -> None:
        """We are reachable ourselves: let the registrations lapse."""
        self._keep = False
        self._registrations.clear()
        self._changed()

    def registered(self) -> list[NetworkAddress]:
        """The relays that hold a registration for us now, in the order we made them."""
        return [r.relay for r in self._registrations.values() if r.holds_until > 0]

    def _fill(self, now: float) -> None:
        if not self._keep:
            return
        for relay in self._candidates:
            if len(self._registrations) >= self.wanted:
                break
            if relay in self._registrations or self._backoff.get(relay, 0.0) > now:
                continue
            reg = self._registrations[relay] = _Registration(relay)
            self._send_hello(reg, now)

    def _send_hello(self, item: _Registration | CircuitRequest, now: float) -> None:
        item.nonce = self._random(8)
        item.sent_at = now
        self._out.append((Hello(item.nonce).encode(), item.relay))

    def _send_register(self, reg: _Registration, now: float) -> None:
        reg.sent_at = now
        signature = self._sign(Register.signed_part(reg.cookie))
        self._out.append((Register(self.public_key, reg.cookie, signature).encode(), reg.relay))

    def _send_keepalive(self, reg: _Registration, now: float) -> None:
        reg.alive_nonce = self._random(8)
        reg.alive_sent = now
        self.stats["keepalives_sent"] += 1
        self._out.append((Keepalive(reg.alive_nonce, self.public_key).encode(), reg.relay))

    def _register_again(self, reg: _Registration, now: float) -> None:
        """The whole handshake again (the relay keeps no state for a HELLO); the
        registration counts as held meanwhile, until it lapses or the HELLOs fail."""
        reg.state, reg.tries, reg.alive_nonce = "hello", 0, b""
        self._send_hello(reg, now)

    def _give_up(self, reg: _Registration, now: float, why: str) -> None:
        self.stats[f"registration_{why}"] += 1
        del self._registrations[reg.relay]
        self._backoff[reg.relay] = now + RELAY_BACKOFF
        self._changed()
        self._fill(now)

    def _changed(self) -> None:
        current = tuple(self.registered())
        if current != self._last_registered:
            self._last_registered = current
            self._on_changed()

    # ------------------------------------------------------------------ circuits

    def open_circuit(
        self,
        relay: NetworkAddress,
        target: bytes,
        now: float,
        *,
        timeout: float = 5.0,
        on_done: Callable[[CircuitRequest], None] | None = None,
    ) -> CircuitRequest:
        """Ask ``relay`` for a circuit to ``target``; ``on_done(request)`` is called once
        (``request.virtual`` set, or ``request.error``)."""
        request = CircuitRequest(relay, target, now + timeout, on_done=on_done)
        self._requests.append(request)
        # One CONNECT in flight per relay: the relay's answers name the cookie, which is
        # the same for every request of ours within a minute.
        if any(r.relay == relay and r.state == "connect" for r in self._requests[:-1]):
            request.state = "queued"
            return request
        self._start(request, now)
        return request

    def _start(self, request: CircuitRequest, now: float) -> None:
        cached = self._cookies.get(request.relay)
        if cached is not None and now - cached[1] < COOKIE_REUSE:
            request.cookie = cached[0]
            self._send_connect(request, now)
        else:
            request.state = "hello"
            self._send_hello(request, now)

    def _send_connect(self, request: CircuitRequest, now: float) -> None:
        request.state = "connect"
        request.sent_at = now
        signature = self._sign(Connect.signed_part(request.cookie, request.target))
        frame = Connect(self.public_key, request.target, request.cookie, signature)
        self._out.append((frame.encode(), request.relay))

    def _finish(self, request: CircuitRequest, now: float, *, error: str | None = None) -> None:
        request.state = "done"
        request.error = error
        self.stats["circuits_failed" if error else "circuits_opened_out"] += 1
        if request in self._requests:
            self._requests.remove(request)
        for waiting in self._requests:
            if waiting.relay == request.relay and waiting.state == "queued":
                self._start(waiting, now)
                break
        if request.on_done is not None:
            request.on_done(request)

    def _new_circuit(
        self, relay: NetworkAddress, circuit_id: bytes, key: bytes, incoming: bool, now: float
    ) -> _Circuit:
        existing = self._circuits.get((relay, circuit_id))
        if existing is not None:
            return existing
        if len(self._circuits) >= MAX_CIRCUITS:
            oldest = min(self._circuits.values(), key=lambda c: c.last)
            self._forget(oldest)
        self._counter += 1
        circuit = _Circuit(relay, circuit_id, virtual_address(self._counter), key, incoming, now)
        self._circuits[(relay, circuit_id)] = circuit
        self._by_virtual[circuit.virtual] = circuit
        return circuit

    def _forget(self, circuit: _Circuit) -> None:
        self._circuits.pop((circuit.relay, circuit.circuit_id), None)
        self._by_virtual.pop(circuit.virtual, None)

    def peer_seen(self, virtual: NetworkAddress) -> Address | None:
        """Where the relay of this circuit sees the peer (None: no SEEN came)."""
        circuit = self._by_virtual.get(virtual)
        return None if circuit is None else circuit.peer_seen

    def circuit_of(self, virtual: NetworkAddress) -> tuple[NetworkAddress, bytes] | None:
        """(relay, peer key) of a virtual address, if it is a circuit of ours."""
        circuit = self._by_virtual.get(virtual)
        return None if circuit is None else (circuit.relay, circuit.peer_key)

    # ------------------------------------------------------------------ datagrams

    def wrap(self, payload: bytes, virtual: NetworkAddress, now: float) -> bool:
        """Queue ``payload`` (a QUIC packet) for the circuit behind ``virtual``.
        False: no such circuit, or too large (dropped and counted)."""
        circuit = self._by_virtual.get(virtual)
        if circuit is None:
            self._drop("send_no_circuit")
            return False
        if len(payload) > MAX_PAYLOAD:
            self._drop("send_too_large")
            return False
        circuit.last = now
        circuit.counters["bytes_out"] += len(payload)
        self._out.append((Data(True, circuit.circuit_id, payload).encode(), circuit.relay))
        return True

    def datagram_received(
        self, data: bytes, addr: NetworkAddress, now: float
    ) -> tuple[bytes, NetworkAddress] | None:
        """Take a relay frame from ``addr``: a QUIC packet and its circuit's virtual
        address come back; control frames are taken here."""
        try:
            frame = decode(data)
        except RelayFrameError:
            self._drop("malformed")
            return None
        if isinstance(frame, Data):
            circuit = self._circuits.get((addr, frame.circuit))
            if frame.to_relay or circuit is None:
                self._drop("data_unknown")
                return None
            circuit.last = now
            circuit.counters["bytes_in"] += len(frame.payload)
            return frame.payload, circuit.virtual
        if isinstance(frame, Challenge):
            self._challenge(frame, addr, now)
        elif isinstance(frame, Registered):
            self._registered(frame, addr, now)
        elif isinstance(frame, Connected):
            self._connected(frame, addr, now)
        elif isinstance(frame, Refused):
            self._refused(frame, addr, now)
        elif isinstance(frame, Incoming):
            self._incoming(frame, addr, now)
        elif isinstance(frame, Alive):
            self._alive(frame, addr, now)
        elif isinstance(frame, Seen):
            self._seen(frame, addr)
        else:
            self._drop("wrong_direction")
        return None

    def _drop(self, reason: str) -> None:
        self.stats["dropped"] += 1
        self.stats[f"dropped_{reason}"] += 1

    def _challenge(self, frame: Challenge, addr: NetworkAddress, now: float) -> None:
        reg = self._registrations.get(addr)
        if reg is not None and reg.state == "hello" and reg.nonce == frame.nonce:
            self._cookies[addr] = (frame.cookie, now)
            reg.state, reg.cookie, reg.tries = "register", frame.cookie, 0
            self._send_register(reg, now)
            return
        for request in self._requests:
            if request.relay == addr and request.state == "hello" and request.nonce == frame.nonce:
                self._cookies[addr] = (frame.cookie, now)
                request.cookie = frame.cookie
                self._send_connect(request, now)
                return
        self._drop("challenge_unasked")

    def _registered(self, frame: Registered, addr: NetworkAddress, now: float) -> None:
        reg = self._registrations.get(addr)
        if reg is None or reg.state != "register" or reg.cookie != frame.cookie:
            self._drop("registered_unasked")
            return
        reg.state, reg.tries = "registered", 0
        reg.holds_until = now + frame.lifetime
        reg.refresh_at = now + min(self.refresh, frame.lifetime / 3)
        reg.alive_at, reg.alive_nonce, reg.alive_tries = now + self.keepalive, b"", 0
        self.stats["registrations"] += 1
        self._changed()

    def _connected(self, frame: Connected, addr: NetworkAddress, now: float) -> None:
        for request in self._requests:
            if request.relay == addr and request.state == "connect":
                if request.cookie != frame.cookie:
                    break
                circuit = self._new_circuit(addr, frame.circuit, request.target, False, now)
                request.virtual = circuit.virtual
                self._finish(request, now)
                return
        self._drop("connected_unasked")

    def _refused(self, frame: Refused, addr: NetworkAddress, now: float) -> None:
        reason = _reason(frame.reason)
        if frame.refused == FrameType.REGISTER:
            reg = self._registrations.get(addr)
            if reg is not None and reg.state == "register" and reg.cookie == frame.cookie:
                self._give_up(reg, now, f"refused_{reason}")
                return
        elif frame.refused == FrameType.CONNECT:
            for request in self._requests:
                asked = (request.relay, request.state, request.cookie)
                if asked == (addr, "connect", frame.cookie):
                    self._cookies.pop(addr, None)
                    if reason == "bad_cookie" and now < request.deadline:
                        self._start(request, now)  # the cookie aged: ask for a new one
                        return
                    self._finish(request, now, error=f"the relay refused: {reason}")
                    return
        self._drop("refused_unasked")

    def _alive(self, frame: Alive, addr: NetworkAddress, now: float) -> None:
        reg = self._registrations.get(addr)
        if reg is None or not reg.alive_nonce or reg.alive_nonce != frame.nonce:
            self._drop("alive_unasked")
            return
        if frame.here:
            reg.alive_at, reg.alive_nonce, reg.alive_tries = now + self.keepalive, b"", 0
            return
        # The relay holds us elsewhere, or not at all: our NAT mapped us anew (or the
        # relay restarted). Register from where we are now; the relay moves our circuits.
        self.stats["keepalive_moved"] += 1
        self._register_again(reg, now)
        self._follow_circuits(now)
        self._on_moved()

    def _follow_circuits(self, now: float) -> None:
        """Our mapping moved: ask again, from where we are now, for every circuit we
        opened through someone else's relay (the relays we register with move ours on the
        REGISTER). The relay moves the open circuit to our new address and answers with
        its id, so it keeps its virtual address and QUIC its connection. Cookies made for
        the old address are worth nothing now. Once per mapping change, not per relay."""
        if now - self._followed_at < RESEND:
            return
        self._followed_at = now
        self._cookies.clear()
        asked = set()
        for circuit in list(self._circuits.values()):
            if circuit.incoming or (circuit.relay, circuit.peer_key) in asked:
                continue
            asked.add((circuit.relay, circuit.peer_key))
            self.stats["circuits_followed"] += 1
            self.open_circuit(circuit.relay, circuit.peer_key, now)

    def _seen(self, frame: Seen, addr: NetworkAddress) -> None:
        """Only the relay of a circuit of ours may say where it sees the other end; the
        latest word counts (it is a candidate to probe, never a destination of data)."""
        circuit = self._circuits.get((addr, frame.circuit))
        if circuit is None:
            self._drop("seen_unknown")
            return
        circuit.peer_seen = frame.address
        self.stats["peer_seen"] += 1

    def _incoming(self, frame: Incoming, addr: NetworkAddress, now: float) -> None:
        reg = self._registrations.get(addr)
        if reg is None or reg.holds_until <= now:
            # Only a relay that holds us may hand us circuits: no one else learns that
            # this address answers (and we send nothing to a stranger).
            self._drop("incoming_unregistered")
            return
        circuit = self._new_circuit(addr, frame.circuit, frame.key, True, now)
        self.stats["circuits_accepted"] += 1
        self._out.append((Accept(circuit.circuit_id).encode(), addr))

    # ------------------------------------------------------------------ output, timers

    def datagrams_to_send(self) -> list[tuple[bytes, NetworkAddress]]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        times = []
        for reg in self._registrations.values():
            if reg.state == "registered":
                times.append(min(reg.refresh_at, reg.holds_until, reg.alive_due()))
            else:
                times.append(reg.sent_at + RESEND)
        for request in self._requests:
            times.append(request.deadline)
            if request.state != "queued":
                times.append(request.sent_at + RESEND)
        if self._circuits:
            times.append(min(c.last for c in self._circuits.values()) + CIRCUIT_IDLE)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for reg in list(self._registrations.values()):
            if reg.state == "registered":
                if reg.holds_until <= now:
                    self._give_up(reg, now, "lapsed")
                elif reg.refresh_at <= now:
                    self._register_again(reg, now)
                elif reg.alive_due() <= now:
                    if not reg.alive_nonce:
                        reg.alive_tries = 0
                        self._send_keepalive(reg, now)
                        continue
                    reg.alive_tries += 1
                    if reg.alive_tries >= KEEPALIVE_TRIES:
                        self.stats["keepalive_unanswered"] += 1
                        self._register_again(reg, now)
                    else:
                        self._send_keepalive(reg, now)
            elif reg.sent_at + RESEND <= now:
                reg.tries += 1
                if reg.tries >= TRIES:
                    self._give_up(reg, now, "unanswered")
                elif reg.state == "hello":
                    self._send_hello(reg, now)
                else:
                    self._send_register(reg, now)
        for request in list(self._requests):
            if request.deadline <= now:
                self._finish(request, now, error="the relay did not answer")
            elif request.state != "queued" and request.sent_at + RESEND <= now:
                if request.state == "hello":
                    self._send_hello(request, now)
                else:
                    self._send_connect(request, now)
        for circuit in list(self._circuits.values()):
            if circuit.last + CIRCUIT_IDLE <= now:
                self._forget(circuit)
        for relay, (_, got) in list(self._cookies.items()):
            if now - got >= COOKIE_REUSE:
                del self._cookies[relay]
        for relay, until in list(self._backoff.items()):
            if until <= now:
                del self._backoff[relay]
        self._fill(now)

    def statistics(self) -> dict[str, Any]:
        return {
            "relays": [
                {
                    "address": _text(r.relay),
                    "state": r.state if r.holds_until == 0 else "registered",
                }
                for r in self._registrations.values()
            ],
            "circuits": [
                {
                    "relay": _text(c.relay),
                    "direction": "in" if c.incoming else "out",
                    "bytes_in": c.counters["bytes_in"],
                    "bytes_out": c.counters["bytes_out"],
                }
                for c in self._circuits.values()
            ],
            "counters": dict(self.stats),
        }


def _reason(code: int) -> str:
    try:
        return RefusalReason(code).name.lower()
    except ValueError:
        return f"reason {code}"


def _text(addr: NetworkAddress) -> str:
    host = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
