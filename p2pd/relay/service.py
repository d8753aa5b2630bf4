"""Trio glue for relays: :class:`Relays` drives a :class:`~.server.RelayServer` and a
:class:`~.client.RelayClient` from the node's UDP task.

- ``datagram_received(data, addr)`` is UdpEndpoint.serve's ``on_relay``: frames a relay
  takes go to the server core, the others to the client core; an unwrapped QUIC packet
  goes to ``on_packet(packet, virtual address)`` (the QUIC endpoint's receive path).
- ``send(payload, virtual)`` is the QUIC endpoint's send path for virtual addresses.
- One timer task sleeps until the earlier of the two cores' deadlines (one long-lived
  cancel scope, its deadline moved after each input), and every ``CHECK_INTERVAL`` (and
  at once when ``reachability_changed()`` is called) it asks ``needs_relays()`` (the
  DHT's reachability) whether to keep registrations (also kept with
  ``hides_addresses``: ``[privacy] addresses = "contacts"``) and which relays to try
  (``candidates()``: the DHT's routing table, which holds only nodes that others could
  reach: client mode, issue 13 item 2).
- ``connect(relay, key)`` opens a circuit and returns its virtual address, for
  ``QuicEndpoint.connect``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import trio

from ..config import RelayConfig
from ..dht.reachability import group_of
from ..errors import ConnectionLost
from ..identity import Identity
from ..wire import Address
from .client import CircuitRequest, NetworkAddress, RelayClient, is_virtual
from .frames import FIRST_BYTE_MAX, FIRST_BYTE_MIN, TO_RELAY
from .server import RelayServer

log = logging.getLogger(__name__)

#: How often the service looks at reachability and the candidates.
CHECK_INTERVAL = 5.0
#: How soon it looks again when it should register but has no candidate yet: a daemon
#: learns it is NATed (the DHT's reachability) before its join has filled the routing
#: table the candidates come from, and looked again only CHECK_INTERVAL later (in 18 of
#: 50 runs of tests/test_upgrade_netns.py the network took 5-6 s longer to settle).
NO_CANDIDATES_RECHECK = 0.5
#: How long ``connect`` waits for a circuit.
CIRCUIT_TIMEOUT = 4.0

Send = Callable[[bytes, NetworkAddress], None]


def candidate_order(candidates: list[Address], key: bytes) -> list[Address]:
    """The order in which to ask ``candidates`` to relay for ``key``: one per /24 (or
    /48) first, so that one operator's subnet is not all of a node's relays; within
    that, by a hash of the key and the address (rendezvous hashing: each node spreads its
    registrations differently, and the same node keeps the same relays across checks)."""

    def rank(address: Address) -> bytes:
        return hashlib.blake2b(key + address.encode(), digest_size=8).digest()

    first: list[Address] = []
    rest: list[Address] = []
    groups: set[str] = set()
    for address in sorted(dict.fromkeys(candidates), key=rank):
        group = group_of(address.host)
        (rest if group in groups else first).append(address)
        groups.add(group)
    return first + rest


class Relays:
    """Relaying for others (while reachable) and through others (while NATed)."""

    def __init__(
        self,
        config: RelayConfig,
        identity: Identity,
        sendto: Send,
        *,
        on_packet: Callable[[bytes, NetworkAddress], None],
        needs_relays: Callable[[], bool],
        candidates: Callable[[], list[Address]],
        hides_addresses: bool = False,
        on_registrations_changed: Callable[[], None] = lambda: None,
        on_mapping_moved: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self._sendto = sendto
        self._on_packet = on_packet
        self._needs_relays = needs_relays
        self._candidates = candidates
        #: ``[privacy] addresses = "contacts"``: our record lists relays only, so we keep
        #: registrations even where we are reachable (docs/SECURITY.md).
        self._hides_addresses = hides_addresses
        self.server = RelayServer(config)
        self.client = RelayClient(
            identity.sign,
            identity.public_key,
            wanted=config.registrations,
            refresh=config.refresh_interval,
            keepalive=config.keepalive_interval,
            on_registrations_changed=on_registrations_changed,
            on_mapping_moved=on_mapping_moved,
        )
        self._scope: trio.CancelScope | None = None
        self._natted = False
        self._next_check = 0.0

    # ------------------------------------------------------------------ I/O entry points

    @staticmethod
    def is_relay_frame(first: int) -> bool:
        return FIRST_BYTE_MIN <= first <= FIRST_BYTE_MAX

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        """UdpEndpoint.serve's ``on_relay`` (first byte 0x04..0x3e)."""
        now = trio.current_time()
        if data[0] in TO_RELAY:
            for out, to in self.server.datagram_received(data, addr, now):
                self._sendto(out, to)
        else:
            packet = self.client.datagram_received(data, addr, now)
            if packet is not None:
                self._on_packet(*packet)
            self._flush_client()
        self._rearm()

    def send(self, payload: bytes, virtual: NetworkAddress) -> None:
        """The QUIC endpoint's send path for a virtual address (a circuit)."""
        if self.client.wrap(payload, virtual, trio.current_time()):
            self._flush_client()

    def _flush_client(self) -> None:
        for out, to in self.client.datagrams_to_send():
            self._sendto(out, to)

    # ------------------------------------------------------------------ circuits

    async def connect(self, relay: Address, key: bytes) -> NetworkAddress:
        """A circuit to ``key`` through ``relay``: its virtual address. Raises
        :class:`~p2pd.errors.ConnectionLost` if the relay refuses or does not answer."""
        done = trio.Event()
        request: CircuitRequest = self.client.open_circuit(
            self._normalize(relay),
            key,
            trio.current_time(),
            timeout=CIRCUIT_TIMEOUT,
            on_done=lambda _: done.set(),
        )
        self._flush_client()
        self._rearm()
        await done.wait()
        if request.virtual is None:
            raise ConnectionLost(f"no circuit through relay {relay}: {request.error}")
        return request.virtual

    def reachability_changed(self) -> None:
        """Our mapping or reachability verdict changed (the DHT's ``on_change``): look at
        once whether to register with relays, not at the next ``CHECK_INTERVAL``. A node
        that learns it is NATed is reachable through relays that much sooner: its
        record lists them at its next publish (up to 5 s sooner, measured in the
        testbed's NAT cells)."""
        self._next_check = trio.current_time()
        self._rearm()

    @staticmethod
    def _normalize(address: Address) -> NetworkAddress:
        # An IPv4 peer is a.b.c.d here even on a dual-stack socket: p2pd/transport/udp.py
        # unmaps ::ffff:a.b.c.d on the way in and maps it on the way out.
        return (address.host, address.port)

    def registered(self) -> list[Address]:
        """The relays holding a registration for us (for our presence record)."""
        out = []
        for host, port in self.client.registered():
            out.append(Address(host, port))
        return out

    def peer_seen(self, virtual: NetworkAddress) -> Address | None:
        """Where the relay of the circuit at ``virtual`` sees the peer, if it said."""
        return self.client.peer_seen(virtual)

    @staticmethod
    def is_relayed(address: tuple[Any, ...]) -> bool:
        return is_virtual(str(address[0]))

    # ------------------------------------------------------------------ the timer task

    def _rearm(self) -> None:
        if self._scope is None:
            return
        deadlines = [t for t in (self.server.get_timer(), self.client.get_timer()) if t]
        self._scope.deadline = min([*deadlines, self._next_check])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Timers and the registration upkeep, until cancelled."""
        task_status.started()
        self._next_check = trio.current_time()
        while True:
            now = trio.current_time()
            if now >= self._next_check:
                self._next_check = now + self._check(now)
            self.server.handle_timer(now)
            self.client.handle_timer(now)
            self._flush_client()
            with trio.CancelScope() as scope:
                self._scope = scope
                self._rearm()
                await trio.sleep_forever()
            self._scope = None

    def _check(self, now: float) -> float:
        """Register with relays, or stop, as reachability says; returns how long until
        the next look."""
        natted = self._needs_relays()
        if natted != self._natted:
            log.info("relays: %s", "NATed, registering" if natted else "reachable, relaying")
            self._natted = natted
        # A NATed node relays for no one: nobody could reach it to ask.
        self.server.serving = self.config.enabled and not natted
        if (natted or self._hides_addresses) and self.config.registrations > 0:
            ordered = candidate_order(self._candidates(), self.client.public_key)
            self.client.keep_registrations([self._normalize(a) for a in ordered], now)
            if not ordered:
                return NO_CANDIDATES_RECHECK
        elif self.client.registered():
            self.client.stop_registrations()
        return CHECK_INTERVAL

    def statistics(self) -> dict[str, Any]:
        return {
            "relaying": self.server.statistics(),
            "relays_in_use": [str(a) for a in self.registered()],
            "client": self.client.statistics(),
        }
