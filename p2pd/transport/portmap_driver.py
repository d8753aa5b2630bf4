"""The trio driver of the port-mapping client (p2pd/transport/portmap.py; issue 13,
item 9): :class:`PortMapping`, one task of the daemon's nursery.

It asks the IPv4 default gateway (read from ``/proc/net/route``; no gateway, or not
Linux: nothing is sent) for a mapping of the daemon's UDP port, from a UDP socket of its
own (the gateway answers the request's source port, and NAT-PMP's and PCP's first bytes
would collide with DHT frames on the daemon's port), renews it, and looks at the
default gateway and our address towards it every :data:`ROUTE_CHECK` s: a new one
gets a new :class:`~p2pd.transport.portmap.PortMapper` (the old mapping, if any, is
deleted first). A second socket on port 5350 hears the gateway's announcements (a restart:
renew now). Cancelled (a clean shutdown), it sends the delete request and waits
for the gateway's answer at most :data:`DELETE_WAIT` s. The mapped address goes first
into the daemon's published addresses (``Node.advertised_addresses``); ``on_change``
wakes the daemon to republish. One log line when a mapping is made or lost, and one
per distinct failure.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import trio

from ..wire import Address
from .portmap import ANNOUNCE_PORT, Mapping, PortMapper

log = logging.getLogger("p2pd.portmap")

#: How often the default gateway and our address towards it are looked at.
ROUTE_CHECK = 30.0
#: How long a clean shutdown waits for the gateway to confirm the delete.
DELETE_WAIT = 0.5
#: The largest datagram read (a PCP message is at most 1100 bytes).
READ_MAX = 1104


def default_gateway(path: str = "/proc/net/route") -> str | None:
    """The IPv4 default gateway of the main routing table, or None (none, or no
    /proc/net/route: not Linux)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            lines = f.read(65536).splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[1] != "00000000" or fields[7:8] != ["00000000"]:
            continue
        try:
            flags, gateway = int(fields[3], 16), int(fields[2], 16)
        except ValueError:
            continue
        if flags & 0x2 and gateway:  # RTF_GATEWAY; the field is little-endian
            return socket.inet_ntoa(gateway.to_bytes(4, "little"))
    return None


def source_towards(gateway: str) -> str | None:
    """Our address on the route to ``gateway`` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((gateway, 9))
            host: str = probe.getsockname()[0]
        except OSError:
            return None
    return host


class PortMapping:
    """Our mapping at the default gateway; see the module docstring."""

    def __init__(
        self,
        internal_port: int,
        on_change: Callable[[], None],
        *,
        route: Callable[[], tuple[str, str] | None] | None = None,
        announcements: tuple[str, int] | None = ("0.0.0.0", ANNOUNCE_PORT),
        listen_host: str | None = None,
    ) -> None:
        self.internal_port = internal_port
        #: The daemon's own address when it listens on one (not a wildcard): a gateway
        #: reached from another address of ours would forward to the wrong one.
        self.listen_host = listen_host
        self.on_change = on_change
        #: (gateway, our address towards it), or None; tests give their own.
        self._route = route or _default_route
        #: Where the gateway's announcements are read (None: not at all; tests: loopback).
        self._announcements_at = announcements
        self.mapper: PortMapper | None = None
        self._logged = ""
        self._wait = trio.CancelScope()  # the main loop's wait (an announcement ends it)

    @property
    def mapping(self) -> Mapping | None:
        return None if self.mapper is None else self.mapper.mapping

    def mapped_address(self) -> Address | None:
        """Where strangers reach our port through the gateway, while the mapping lives."""
        mapping = self.mapping
        if mapping is None or mapping.expires <= trio.current_time():
            return None
        return mapping.external

    def statistics(self) -> dict[str, Any]:
        """``p2pd status``'s ``port_mapping`` (docs/CONTROL_API.md)."""
        mapper, mapping = self.mapper, self.mapping
        return {
            "enabled": True,
            "gateway": None if mapper is None else mapper.gateway[0],
            "protocol": None if mapping is None else mapping.protocol,
            "mapped_address": None if mapping is None else str(mapping.external),
            "expires_in": (
                None if mapping is None else round(mapping.expires - trio.current_time(), 1)
            ),
            "failure": None if mapper is None or not mapper.failure else mapper.failure,
            "counters": {} if mapper is None else dict(mapper.stats),
        }

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Map, renew, follow the gateway; delete the mapping when cancelled."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("0.0.0.0", 0))
            async with trio.open_nursery() as nursery:
                at = self._announcements_at
                announce = None if at is None else _announce_socket(at)
                if announce is not None:
                    nursery.start_soon(self._announcements, announce)
                task_status.started()
                try:
                    await self._loop(sock)
                finally:
                    with trio.CancelScope(shield=True):
                        await self._delete(sock)

    async def _announcements(self, sock: trio.socket.SocketType) -> None:
        """The gateway's restart (PCP ANNOUNCE) or address change (NAT-PMP) on port
        5350: the mapper renews or retries at once; the main loop is woken."""
        with sock:
            for _ in range(1 << 62):  # forever, in practice
                data, source = await sock.recvfrom(READ_MAX)
                mapper, now = self.mapper, trio.current_time()
                if mapper is not None and mapper.announcement(data, source[:2], now):
                    log.info("port mapping: %s announced a restart: mapping again", source[0])
                    self._wait.cancel()

    async def _loop(self, sock: trio.socket.SocketType) -> None:
        route: tuple[str, str] | None = None
        check_at = trio.current_time()
        for _ in range(1 << 62):  # forever, in practice; cancelled with the daemon
            now = trio.current_time()
            if now >= check_at:
                check_at = now + ROUTE_CHECK
                found = self._route()
                if found is not None and self.listen_host not in (None, found[1]):
                    found = None
                if found != route:
                    await self._delete(sock)
                    route = found
                    self.mapper = (
                        None if found is None else PortMapper(*found, self.internal_port, now)
                    )
                    self._changed()
            mapper = self.mapper
            deadline = check_at
            if mapper is not None:
                for datagram in mapper.poll(now):
                    await self._send(sock, datagram, mapper)
                deadline = min(check_at, mapper.next_deadline())
                self._changed()  # given up, or a mapping expired
            with trio.move_on_at(deadline) as self._wait:
                data, source = await sock.recvfrom(READ_MAX)
                if mapper is not None:
                    mapper.receive(data, source[:2], trio.current_time())
            self._changed()

    async def _send(self, sock: trio.socket.SocketType, data: bytes, mapper: PortMapper) -> None:
        try:
            await sock.sendto(data, mapper.gateway)
        except OSError as exc:  # no route: the next check or retry tries again
            mapper.stats["send_errors"] += 1
            log.debug("port mapping: sending to %s: %s", mapper.gateway[0], exc)

    async def _delete(self, sock: trio.socket.SocketType) -> None:
        """Remove our mapping at the gateway, waiting briefly for its answer."""
        mapper = self.mapper
        if mapper is None or mapper.mapping is None:
            return
        requests = mapper.delete()
        mapper.mapping = None
        with trio.move_on_after(DELETE_WAIT):
            for datagram in requests:
                await self._send(sock, datagram, mapper)
            await sock.recvfrom(READ_MAX)  # its answer, or nothing
        log.info("port mapping deleted at %s", mapper.gateway[0])
        self._changed()

    def _changed(self) -> None:
        """Log and wake the daemon when what we would publish or say changed."""
        mapper, mapping = self.mapper, self.mapping
        if mapper is not None and mapping is not None:
            line = f"port mapping: {mapping.external} by {mapping.protocol} at {mapper.gateway[0]}"
        elif mapper is not None and mapper.failure:
            line = f"port mapping failed at {mapper.gateway[0]}: {mapper.failure}"
        else:
            line = ""
        if line == self._logged:
            return
        if line or self._logged.startswith("port mapping:"):
            log.info("%s", line or "port mapping: none")
        self._logged = line
        self.on_change()


def _announce_socket(address: tuple[str, int]) -> trio.socket.SocketType | None:
    """A socket on port 5350 for the gateway's announcements (to 224.0.0.1, which every
    host is a member of, or unicast), shared with other programs (SO_REUSEADDR); None
    where the port cannot be had: mapping works without it."""
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        plain.bind(address)
    except OSError as exc:
        plain.close()
        log.debug("port mapping: no announcements (port %d: %s)", address[1], exc)
        return None
    return trio.socket.from_stdlib_socket(plain)


def _default_route() -> tuple[str, str] | None:
    gateway = default_gateway()
    if gateway is None:
        return None
    source = source_towards(gateway)
    return None if source is None else (gateway, source)
