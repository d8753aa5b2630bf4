"""trio runs hole-punch attempts (p2pd/transport/punch.py) on real sockets.

The node's main UDP socket is shared: its receive loop hands datagrams whose first byte
is ``PUNCH_BYTE`` to :meth:`PunchRunner.datagram_received`, and the runner sends through
the ``sendto`` it was given. The birthday case's side sockets are the runner's own, bound
to the main socket's host on ports the kernel picks; all but a winner are closed when the
attempt ends, and a winning one is handed to the caller (the direct path lives on it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .punch import PUNCH_BYTE, HolePunch, PunchConfig, PunchPlan, PunchResult

log = logging.getLogger(__name__)

#: After a result, how long the responder still answers the peer (its NOMINATED may
#: have been lost, and the initiator NOMINATEs again), in intervals. The initiator,
#: once the peer confirmed, has nothing left to answer and returns at once: it waited
#: this too, which put 0.3 s between the path and the direct connection on every
#: upgrade (issue 9).
LINGER_INTERVALS = 3
#: QUIC packets (first byte with 0x40 set) that reach the winning side socket from the
#: path's address while the attempt lingers are kept, at most this many, and handed to
#: the caller with the socket (:attr:`PunchOutcome.early`), and the first ends the
#: linger (the peer connecting has our NOMINATED): the initiator connects as soon as the
#: path is confirmed, while the responder still lingers, and the attempt's own reader
#: dropped its first handshake packets (QUIC sends them again after its probe timeout,
#: 0.2 s and then 0.4 s more with aioquic's initial RTT of 0.1 s).
EARLY_PACKETS = 8
#: File descriptors left alone when side sockets are opened.
FD_RESERVE = 128
#: Every punch datagram this node sends, across attempts: a token bucket of this many,
#: refilled at this rate per second. A birthday attempt sends about 2,500 (1,024 port
#: probes, or 256 side sockets x candidates x 2); a peer that names a victim's address
#: as its candidate cannot make us send more than this there (docs/SECURITY.md).
PACKET_BUDGET = 4096
PACKET_REFILL = 4096 / 60


@dataclass
class PunchOutcome:
    """How an attempt ended: ``result`` (None: no path in time) and, when the path is on
    a side socket, that socket (the caller owns it now)."""

    result: PunchResult | None
    side_socket: socket.socket | None = None
    stats: dict[str, int] = field(default_factory=dict)
    #: Side sockets asked for that could not be opened (file descriptor limit).
    side_sockets_short: int = 0
    #: QUIC packets that came to ``side_socket`` from the path's address while the
    #: attempt lingered, oldest first, for the caller's QUIC endpoint.
    early: list[bytes] = field(default_factory=list)


def send_quietly(sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
    """One datagram; one the kernel refuses (a full buffer, an unreachable network) is
    dropped, as UDP may."""
    with contextlib.suppress(OSError):
        sock.sendto(data, addr)


def side_socket_budget(wanted: int) -> int:
    """As many of ``wanted`` side sockets as the file descriptor limit allows."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        used = 64
    return max(0, min(wanted, soft - used - FD_RESERVE))


class _Attempt:
    """An attempt under way: its core, and the event that wakes its loop when a
    datagram was fed to the core (a new one after each wake)."""

    __slots__ = ("core", "early", "woken")

    def __init__(self, core: HolePunch) -> None:
        self.core = core
        self.woken = trio.Event()
        #: QUIC packets that came over the path found, on a side socket; bounded.
        self.early: list[bytes] = []

    def keep_early(self, data: bytes, addr: tuple[str, int], sock: int) -> None:
        """A QUIC packet on side socket ``sock``: kept if it came over the path (the
        peer's first handshake packet, sent as soon as it knew the path), else dropped
        as before: nothing else can fill the few places."""
        r = self.core.result
        on_path = r is not None and r.socket == sock and r.address.as_tuple() == addr
        if on_path and len(self.early) < EARLY_PACKETS:
            self.early.append(data)
            self.woken.set()  # the peer connects: it has the path, no need to linger

    def feed(self, data: bytes, addr: tuple[str, int], sock: int) -> None:
        self.core.datagram_received(data, addr, sock, trio.current_time())
        self.woken.set()


class PunchRunner:
    """Attempts on one node: at most one per session id at a time."""

    def __init__(
        self,
        sendto: Callable[[bytes, tuple[str, int]], None],
        bind_host: str,
        *,
        config: PunchConfig | None = None,
    ) -> None:
        self._sendto = sendto
        self._bind_host = bind_host
        self.config = config or PunchConfig()
        self._active: dict[bytes, _Attempt] = {}
        #: Datagrams for no active attempt, or malformed.
        self.stats: dict[str, int] = {"unmatched": 0}
        self._tokens = float(PACKET_BUDGET)
        self._refilled = trio.current_time()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        """From the main socket's receive loop: a datagram whose first byte is PUNCH_BYTE."""
        attempt = self._active.get(bytes(data[4:12])) if len(data) >= 12 else None
        if attempt is None:
            self.stats["unmatched"] += 1
            return
        attempt.feed(data, addr, 0)

    async def attempt(self, plan: PunchPlan) -> PunchOutcome:
        """Run one attempt to its end (a path, or the deadline); plan.start is in trio's
        clock."""
        if plan.session in self._active:
            raise ValueError("an attempt with this session id is already running")
        wanted = plan.side_sockets
        allowed = side_socket_budget(wanted)
        if allowed < wanted:
            log.warning("hole punch: %d of %d side sockets (file descriptor limit)",
                        allowed, wanted)  # fmt: skip
            plan = dataclasses.replace(plan, side_sockets=allowed)
        core = HolePunch(plan, self.config)
        self._active[plan.session] = attempt = _Attempt(core)
        sides: list[socket.socket] = []
        try:
            for _ in range(plan.side_sockets):
                s = socket.socket(socket.AF_INET6 if ":" in self._bind_host else socket.AF_INET,
                                  socket.SOCK_DGRAM)  # fmt: skip
                s.setblocking(False)
                s.bind((self._bind_host, 0))
                sides.append(s)
            winner = await self._run(attempt, sides)
        finally:
            del self._active[plan.session]
            kept = None
            result = core.result
            if result is not None and result.socket > 0:
                kept = sides[result.socket - 1]
            for s in sides:
                if s is not kept:
                    s.close()
        early = attempt.early if kept is not None else []
        self.stats["attempts"] = self.stats.get("attempts", 0) + 1
        self.stats["paths_found"] = self.stats.get("paths_found", 0) + (winner is not None)
        for name, count in core.stats.items():
            if name.startswith("refused_"):  # forged, reflected, malformed: worth seeing
                self.stats[name] = self.stats.get(name, 0) + count
        return PunchOutcome(
            winner,
            kept,
            dict(core.stats),
            side_sockets_short=wanted - plan.side_sockets,
            early=early,
        )

    async def _run(self, attempt: _Attempt, sides: list[socket.socket]) -> PunchResult | None:
        core = attempt.core
        linger_until: float | None = None

        async def read_side(index: int, s: socket.socket) -> None:
            for _ in range(1 << 20):  # bounded; the attempt's deadline ends it first
                await trio.lowlevel.wait_readable(s)
                for _ in range(64):
                    try:
                        data, addr = s.recvfrom(2048)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        continue
                    if data[:1] == bytes([PUNCH_BYTE]):
                        attempt.feed(data, addr[:2], index)
                    elif data and data[0] & 0x40:
                        attempt.keep_early(data, addr[:2], index)

        async with trio.open_nursery() as nursery:
            for index, s in enumerate(sides, 1):
                nursery.start_soon(read_side, index, s)
            for _ in range(1 << 20):
                self._flush(core, sides)
                now = trio.current_time()
                if core.done:
                    if not core.failed and (core.plan.role == 0 or attempt.early):
                        # the initiator: the peer confirmed the path, connect over it
                        # now; the responder: the peer connects over it, so it got our
                        # NOMINATED, and QUIC must hear the socket at once
                        break
                    if linger_until is None:
                        linger_until = now + LINGER_INTERVALS * self.config.interval
                    if now >= linger_until or core.failed:
                        break
                    timer = linger_until
                else:
                    timer = core.get_timer() or now
                with trio.move_on_at(timer):
                    await attempt.woken.wait()
                if attempt.woken.is_set():
                    attempt.woken = trio.Event()
                core.handle_timer(trio.current_time())
            nursery.cancel_scope.cancel()
        return core.result

    def _flush(self, core: HolePunch, sides: list[socket.socket]) -> None:
        now = trio.current_time()
        self._tokens = min(PACKET_BUDGET, self._tokens + (now - self._refilled) * PACKET_REFILL)
        self._refilled = now
        for index, data, addr in core.datagrams_to_send():
            if self._tokens < 1:
                self.stats["over_budget"] = self.stats.get("over_budget", 0) + 1
                continue
            self._tokens -= 1
            if index == 0:
                self._sendto(data, addr)
                continue
            try:
                sides[index - 1].sendto(data, addr)
            except OSError:  # a full buffer or an unreachable network: UDP may drop
                core.stats["send_errors"] = core.stats.get("send_errors", 0) + 1
