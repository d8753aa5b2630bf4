"""A lossy UDP proxy on 127.0.0.1, for tests and benchmarks of real sockets and daemons.

Put it between a client and a UDP server on the loopback interface and it forwards
datagrams both ways while dropping, duplicating and reordering them with a seeded RNG,
and can black the path out entirely for a while::

    async with open_lossy_proxy(server_address, drop=0.2, reorder=0.1, seed=7) as proxy:
        client.sendto(data, proxy.address)      # reaches the server, maybe
        proxy.blackout(2.0)                     # nothing passes for two seconds
        proxy.drop = 0.0                        # impairments can change at any time
        print(proxy.stats)                      # Counter: forwarded, dropped, ...

How datagrams find their way back: the proxy listens on one socket (``proxy.address``).
For every distinct client source address it opens a dedicated *upstream* socket (bound to
127.0.0.1 on a free port and connected to the target) and forwards that client's
datagrams from it; whatever the target sends to an upstream socket goes back to its
client. So the target sees each client as a different address, the upstream socket's,
not the client's own. Connection-id based protocols (QUIC, RFC 9000 section 5.1) do not
care; a protocol that identifies peers by their address (a p2pd node's DHT) sees the proxy
and not the peer. At most ``max_clients`` mappings exist; a new client beyond that
evicts the one heard from least recently.

Impairments, decided per datagram in both directions, in this order:

1. during a blackout, the datagram is dropped (``blackout_dropped``);
2. with probability ``drop`` it is dropped (``dropped``);
3. otherwise it is forwarded (``forwarded``), and with probability ``duplicate`` a second
   copy is sent as well (``duplicated``);
4. each copy is, with probability ``reorder``, held back for ``reorder_delay`` seconds so
   that later datagrams overtake it (``reordered``). A held copy whose release falls in a
   blackout is dropped then (``blackout_dropped``). At most ``max_delayed`` copies (and
   ``MAX_DELAYED_BYTES``) are held; beyond that a copy goes out at once
   (``reorder_overflow``).

Other counters: ``received`` (datagrams that reached the proxy, both ways), ``to_target``
and ``to_client`` (datagrams the proxy handed to the kernel, copies included),
``clients`` (mappings opened), ``clients_evicted``, ``send_dropped`` (the kernel's send
buffer was full), ``send_errors``, ``receive_errors`` and ``socket_errors`` (no upstream
socket could be opened: the datagram is lost).

Only loopback: the proxy binds 127.0.0.1 and forwards only to a loopback IPv4 target, so
a test can never aim an amplifier (``duplicate=1``) at another machine.

It is a real-time tool (real sockets need a real clock): don't run it under trio's
``MockClock``.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
import random
import socket
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from ..errors import UsageError

__all__ = ["LossyProxy", "open_lossy_proxy"]

#: The largest UDP payload we receive in one datagram (anything longer is truncated by
#: the kernel; IPv4 carries at most 65,507 bytes anyway).
MAX_DATAGRAM = 65535
#: Client mappings (each holds one socket and one task) at most, by default.
MAX_CLIENTS = 256
#: Copies held back for reordering at most, by default.
MAX_DELAYED = 1024
#: Bytes held back for reordering at most.
MAX_DELAYED_BYTES = 8 << 20
#: Receive buffer we ask for on every socket: bursts of QUIC packets must not overflow it.
RECV_BUFFER = 1 << 20
#: Longest blackout or reorder delay accepted, in seconds (a test helper never needs more).
MAX_DELAY = 3600.0

Endpoint = tuple[str, int]


def _probability(name: str, value: float) -> float:
    if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise UsageError(f"{name} must be a probability in 0..1, not {value!r}")
    return float(value)


def _duration(name: str, value: float) -> float:
    if not isinstance(value, int | float) or not 0.0 <= value <= MAX_DELAY:
        raise UsageError(f"{name} must be 0..{MAX_DELAY:g} seconds, not {value!r}")
    return float(value)


def _loopback_target(target: tuple[str, int]) -> Endpoint:
    host, port = target
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"the proxy target must be an IP literal, not {host!r}") from None
    if ip.version != 4 or not ip.is_loopback:
        raise UsageError(f"the proxy forwards only to 127.0.0.0/8, not {host}")
    if not isinstance(port, int) or not 0 < port <= 65535:
        raise UsageError(f"the proxy target's port must be 1..65535, not {port!r}")
    return (str(ip), port)


def _udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _close_socket(sock: trio.socket.SocketType) -> None:
    """Close through trio when trio runs (it forgets the fd before the fd is reused),
    else directly: a proxy that was made but never served is closed outside trio."""
    if sock.fileno() == -1:
        return
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        socket.socket(fileno=sock.detach()).close()
    else:
        sock.close()


@dataclass(eq=False)
class _Mapping:
    """One client: its address, and the upstream socket that speaks for it."""

    client: Endpoint
    sock: socket.socket
    trio_sock: trio.socket.SocketType
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass(order=True)
class _Held:
    """A copy held back for reordering, in the release heap."""

    due: float
    order: int
    sock: socket.socket = field(compare=False)
    data: bytes = field(compare=False)
    dest: Endpoint | None = field(compare=False)  # None: the socket is connected
    counter: str = field(compare=False)


class LossyProxy:
    """A UDP proxy that impairs traffic; use :func:`open_lossy_proxy` to run one.

    ``drop``, ``duplicate`` and ``reorder`` are probabilities (0..1) and ``reorder_delay``
    a duration in seconds; all four may be changed at any time, and take effect from the
    next datagram. ``stats`` counts what happened (module docstring).
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        drop: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        reorder_delay: float = 0.02,
        seed: int | None = None,
        max_clients: int = MAX_CLIENTS,
        max_delayed: int = MAX_DELAYED,
    ) -> None:
        if not 1 <= max_clients <= 65536:
            raise UsageError("max_clients must be 1..65536")
        if not 0 <= max_delayed <= 1 << 20:
            raise UsageError("max_delayed must be 0..1048576")
        self.target = _loopback_target(target)
        self.drop = drop
        self.duplicate = duplicate
        self.reorder = reorder
        self.reorder_delay = reorder_delay
        self.max_clients = max_clients
        self.max_delayed = max_delayed
        self.stats: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._listen = _udp_socket()
        self._trio_listen = trio.socket.from_stdlib_socket(self._listen)
        host, port = self._listen.getsockname()[:2]
        #: Where clients send: 127.0.0.1 and the port the kernel chose.
        self.address: Endpoint = (host, port)
        self._mappings: OrderedDict[Endpoint, _Mapping] = OrderedDict()
        self._held: list[_Held] = []
        self._held_bytes = 0
        self._held_order = 0
        self._held_changed = trio.Event()
        self._blackout_until = -math.inf
        self._nursery: trio.Nursery | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<LossyProxy {self.address[0]}:{self.address[1]} -> "
            f"{self.target[0]}:{self.target[1]} drop={self.drop} duplicate={self.duplicate} "
            f"reorder={self.reorder}>"
        )

    # ------------------------------------------------------------------ settings

    @property
    def drop(self) -> float:
        """Probability that a datagram is dropped."""
        return self._drop

    @drop.setter
    def drop(self, value: float) -> None:
        self._drop = _probability("drop", value)

    @property
    def duplicate(self) -> float:
        """Probability that a forwarded datagram is sent twice."""
        return self._duplicate

    @duplicate.setter
    def duplicate(self, value: float) -> None:
        self._duplicate = _probability("duplicate", value)

    @property
    def reorder(self) -> float:
        """Probability that a copy is held back for ``reorder_delay``."""
        return self._reorder

    @reorder.setter
    def reorder(self, value: float) -> None:
        self._reorder = _probability("reorder", value)

    @property
    def reorder_delay(self) -> float:
        """How long a reordered copy is held back, in seconds."""
        return self._reorder_delay

    @reorder_delay.setter
    def reorder_delay(self, value: float) -> None:
        self._reorder_delay = _duration("reorder_delay", value)

    # ------------------------------------------------------------------ control

    def blackout(self, seconds: float) -> None:
        """Drop everything, both ways, from now for ``seconds`` (synchronous: it returns
        at once; the blackout ends by itself). Overlapping blackouts extend to the
        latest end; :meth:`end_blackout` ends it early. Call it from trio code."""
        until = trio.current_time() + _duration("blackout", seconds)
        self._blackout_until = max(self._blackout_until, until)

    def end_blackout(self) -> None:
        """End a blackout now."""
        self._blackout_until = -math.inf

    @property
    def blacked_out(self) -> bool:
        """True while a blackout lasts."""
        return trio.current_time() < self._blackout_until

    def upstream_address(self, client: tuple[str, int]) -> Endpoint | None:
        """The address the target sees for ``client``, if that client has a mapping."""
        mapping = self._mappings.get(client)
        if mapping is None:
            return None
        host, port = mapping.sock.getsockname()[:2]
        return (host, port)

    @property
    def clients(self) -> list[Endpoint]:
        """The clients that currently have a mapping, least recently heard first."""
        return list(self._mappings)

    # ------------------------------------------------------------------ running

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward until cancelled; closes every socket on the way out. Ready (and
        ``task_status.started()``) as soon as it runs: the socket is already bound."""
        if self._closed or self._nursery is not None:
            raise UsageError("a LossyProxy serves once")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._release_held)
                nursery.start_soon(self._pump_from_clients)
                task_status.started()
        finally:
            self.close()

    def close(self) -> None:
        """Close every socket (from trio code or not). :meth:`serve` does it when it
        ends; a proxy made but never served must be closed by its maker."""
        self._closed = True
        for mapping in self._mappings.values():
            mapping.scope.cancel()
            _close_socket(mapping.trio_sock)
        self._mappings.clear()
        self._held.clear()
        self._held_bytes = 0
        _close_socket(self._trio_listen)

    async def _pump_from_clients(self) -> None:
        while True:
            try:
                data, source = await self._trio_listen.recvfrom(MAX_DATAGRAM)
            except (ConnectionResetError, ConnectionRefusedError):
                # An ICMP error for something we sent earlier, on some systems.
                self.stats["receive_errors"] += 1
                continue
            self.stats["received"] += 1
            client: Endpoint = (source[0], source[1])
            mapping = self._mapping_for(client)
            if mapping is not None:
                self._impair(data, mapping.sock, None, "to_target")

    def _mapping_for(self, client: Endpoint) -> _Mapping | None:
        mapping = self._mappings.get(client)
        if mapping is not None:
            self._mappings.move_to_end(client)
            return mapping
        if len(self._mappings) >= self.max_clients:
            _, evicted = self._mappings.popitem(last=False)
            evicted.scope.cancel()  # its task closes the socket
            self.stats["clients_evicted"] += 1
        try:
            sock = _udp_socket()
        except OSError:  # out of file descriptors or ports
            self.stats["socket_errors"] += 1
            return None
        try:
            # Connected: the kernel then hands this socket only the target's datagrams.
            sock.connect(self.target)
        except OSError:
            sock.close()
            self.stats["socket_errors"] += 1
            return None
        mapping = _Mapping(client, sock, trio.socket.from_stdlib_socket(sock))
        self._mappings[client] = mapping
        self.stats["clients"] += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._pump_from_target, mapping)
        return mapping

    async def _pump_from_target(self, mapping: _Mapping) -> None:
        try:
            with mapping.scope:
                while True:
                    try:
                        data = await mapping.trio_sock.recv(MAX_DATAGRAM)
                    except (ConnectionResetError, ConnectionRefusedError):
                        # ICMP port unreachable: the target is not listening (yet).
                        self.stats["receive_errors"] += 1
                        continue
                    self.stats["received"] += 1
                    self._impair(data, self._listen, mapping.client, "to_client")
        finally:
            mapping.trio_sock.close()

    # ------------------------------------------------------------------ impairments

    def _impair(
        self, data: bytes, sock: socket.socket, dest: Endpoint | None, counter: str
    ) -> None:
        if self.blacked_out:
            self.stats["blackout_dropped"] += 1
            return
        rand = self._random.random
        if rand() < self._drop:
            self.stats["dropped"] += 1
            return
        self.stats["forwarded"] += 1
        copies = 1
        if rand() < self._duplicate:
            self.stats["duplicated"] += 1
            copies = 2
        for _ in range(copies):
            if rand() < self._reorder and self._hold(data, sock, dest, counter):
                continue
            self._send(data, sock, dest, counter)

    def _hold(self, data: bytes, sock: socket.socket, dest: Endpoint | None, counter: str) -> bool:
        if len(self._held) >= self.max_delayed or self._held_bytes + len(data) > MAX_DELAYED_BYTES:
            self.stats["reorder_overflow"] += 1
            return False
        self._held_order += 1
        due = trio.current_time() + self._reorder_delay
        heapq.heappush(self._held, _Held(due, self._held_order, sock, data, dest, counter))
        self._held_bytes += len(data)
        self.stats["reordered"] += 1
        self._held_changed.set()
        return True

    async def _release_held(self) -> None:
        """The one timer task: sleeps until the earliest held copy is due."""
        while True:
            now = trio.current_time()
            while self._held and self._held[0].due <= now:
                held = heapq.heappop(self._held)
                self._held_bytes -= len(held.data)
                if self.blacked_out:
                    self.stats["blackout_dropped"] += 1
                else:
                    self._send(held.data, held.sock, held.dest, held.counter)
            deadline = self._held[0].due if self._held else math.inf
            self._held_changed = trio.Event()
            with trio.move_on_at(deadline):
                await self._held_changed.wait()

    def _send(self, data: bytes, sock: socket.socket, dest: Endpoint | None, counter: str) -> None:
        # A plain non-blocking send: UDP may drop when the buffer is full, and so do we.
        try:
            if dest is None:
                sock.send(data)
            else:
                sock.sendto(data, dest)
        except (BlockingIOError, InterruptedError):
            self.stats["send_dropped"] += 1
            return
        except OSError:  # e.g. ICMP feedback, or a mapping evicted while a copy was held
            self.stats["send_errors"] += 1
            return
        self.stats[counter] += 1


@asynccontextmanager
async def open_lossy_proxy(
    target: tuple[str, int],
    *,
    drop: float = 0.0,
    duplicate: float = 0.0,
    reorder: float = 0.0,
    reorder_delay: float = 0.02,
    seed: int | None = None,
    max_clients: int = MAX_CLIENTS,
    max_delayed: int = MAX_DELAYED,
) -> AsyncIterator[LossyProxy]:
    """Run a :class:`LossyProxy` to ``target`` (a loopback ``(host, port)``) for the
    duration of the block. It listens on ``proxy.address`` (127.0.0.1, a free port) as
    soon as the block starts; its tasks end and its sockets close when the block exits.

    ``drop``, ``duplicate``, ``reorder``: probabilities (0..1) applied to every datagram
    in both directions; ``reorder_delay``: how long a reordered datagram is held back;
    ``seed``: for the RNG that decides (None: unseeded). Raises UsageError for values out
    of range or a target that is not on 127.0.0.0/8.
    """
    proxy = LossyProxy(
        target,
        drop=drop,
        duplicate=duplicate,
        reorder=reorder,
        reorder_delay=reorder_delay,
        seed=seed,
        max_clients=max_clients,
        max_delayed=max_delayed,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            yield proxy
            nursery.cancel_scope.cancel()
    finally:
        proxy.close()
