"""The node's UDP port, owned by trio and shared by the DHT and QUIC.

Demultiplexing on the first byte (docs/PROTOCOL.md, "One port"):

- ``0x00``..``0x03``: a DHT frame -> the DHT (0x02 / 0x03: request / response of frame
  version 2; 0x00 / 0x01, version 1, go there too, to be refused with a log line);
- first byte with the 0x40 bit set: a QUIC packet (RFC 9000 section 17: the fixed bit)
  -> the QUIC handler, once there is one;
- ``0x3f``: a hole-punch probe (p2pd/transport/punch.py) -> the punch handler;
- ``0x04``..``0x3e``: a relay frame (p2pd/relay/frames.py) -> the relay handler;
- anything else is dropped and counted.

Sharing the port means the DHT sees the same public address that QUIC uses, which NAT
traversal needs. Both protocols run in this task's thread and send through
:meth:`sendto`: a non-blocking ``sendto`` on the same file descriptor.

Two receive queues on Linux (issue 12: a flood must not drop the honest traffic at the
socket). The port is bound twice, with ``SO_REUSEPORT``, and a classic BPF program on
the group (``SO_ATTACH_REUSEPORT_CBPF``) steers every datagram whose first byte has the
0x40 bit (QUIC) to the second socket, everything else to the first. A flood of DHT or
relay datagrams then fills only the first socket's queue; QUIC packets (messages,
calls, files) keep a queue of their own, and :meth:`UdpEndpoint.serve` reads that one
first. Where the kernel refuses (not Linux, an old kernel), one socket as before
(``stats`` ``queues``: 1 or 2). Before binding the group, a plain bind of the port
checks that nobody holds it: a second daemon on the same port is refused as before
instead of joining the group.

Dual stack (issue 13, item 6): an IPv6 socket on ``::`` also carries IPv4 (IPV6_V6ONLY
off, set explicitly: the sysctl default varies). The kernel reports an IPv4 peer of such
a socket as ``::ffff:a.b.c.d``; this class spells it ``a.b.c.d`` on the way in and adds
the prefix on the way out, so every layer above (DHT address limits per /24, relays,
QUIC's path keys, records) sees one spelling per address whatever the socket.

The receive loop reads in bursts: every datagram already queued (up to
:data:`RECV_BURST`) goes to its handler before the task yields, and then each flush hook
(:meth:`UdpEndpoint.add_flush_hook`) runs once. A handler may therefore only queue work
(QUIC feeds aioquic) and do the expensive part (QUIC's ``datagrams_to_send``) once per
burst, in the same task: no scheduling round and no task switch per datagram.

Segmentation offload on send (Linux 4.18, issue 14): :meth:`UdpEndpoint.send_many`
takes the datagrams one QUIC step has for one destination and hands each run of equal
size (the last may be shorter) to the kernel as one ``sendmsg`` with a ``UDP_SEGMENT``
control message; the kernel (or the NIC) cuts it into the same datagrams. The receiver
sees exactly what one ``sendto`` each would have sent. Where the kernel refuses (no
support, a device without checksum offload, a socket with ``SO_NO_CHECK``), the batch
goes out one datagram at a time and the socket stops trying, with one log line.
Where it segments, the socket QUIC arrives on also coalesces (``UDP_GRO``): a peer's
segmented send arrives in one read, and :meth:`UdpEndpoint.serve` cuts it at the
segment size the kernel gives before demultiplexing (:func:`split_coalesced`). On
loopback, both together gave 1.1-1.2x the QUIC throughput (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import struct
from collections import Counter
from collections.abc import Callable, Sequence

import trio

from ..errors import LocalError
from ..wire import Address
from .punch import PUNCH_BYTE

log = logging.getLogger(__name__)

DatagramHandler = Callable[[bytes, tuple[str, int]], None]
FlushHook = Callable[[], None]
MAX_DATAGRAM = 65535
RECV_BUFFER = 1 << 20
#: Datagrams read without yielding to other tasks. A bound, so that a flood cannot starve
#: the rest of the node; on loopback bulk QUIC a burst is rarely more than ~20 datagrams.
#: Counted in datagrams: a coalesced (GRO) read of up to 64 may overrun it once.
RECV_BURST = 64
#: Beside QUIC's own queue, the other one (DHT, relay, punch) is read at most this many
#: datagrams a second, in bursts of at most OTHER_READ_BURST: a flood beyond it is
#: dropped by the kernel at that queue and costs the daemon no CPU (issue 12). An
#: honest node's DHT traffic is a few hundred a second.
OTHER_READ_RATE = 5000.0
OTHER_READ_BURST = 1000.0
#: Linux's option numbers (asm-generic/socket.h); not all are in the socket module.
SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
SO_ATTACH_REUSEPORT_CBPF = 51
SO_MEMINFO = 55
#: UDP generic segmentation offload (linux/udp.h): the segment size as a cmsg.
SOL_UDP = 17
UDP_SEGMENT = 103
#: UDP generic receive offload: the kernel hands over a run of one flow's equal-size
#: datagrams in one read, with their size in a cmsg (Linux 5.0).
UDP_GRO = 104
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
#: The kernel's bounds on one segmented send (UDP_MAX_SEGMENTS; one IPv4 datagram's
#: largest payload, which also fits IPv6).
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65507
#: errnos that mean "this socket cannot segment": send one by one from then on.
_GSO_UNSUPPORTED = frozenset(
    {errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.ENOTSUP}
)
#: The steering program: A = first payload byte; A & 0x40 ? socket 1 : socket 0. (A
#: datagram too short to load from ends the program with 0: socket 0.)
_STEER_QUIC = (
    (0x30, 0, 0, 0),  # ldb [0]
    (0x54, 0, 0, 0x40),  # and #0x40
    (0x15, 0, 1, 0),  # jeq #0 ? next : skip one
    (0x06, 0, 0, 0),  # ret #0
    (0x06, 0, 0, 1),  # ret #1
)


def _steer_quic_to_second(sock: socket.socket) -> None:
    """Attach :data:`_STEER_QUIC` to ``sock``'s reuseport group; OSError if refused."""
    code = b"".join(struct.pack("HBBI", *insn) for insn in _STEER_QUIC)
    buf = ctypes.create_string_buffer(code)
    fprog = struct.pack("HL", len(_STEER_QUIC), ctypes.addressof(buf))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def _bind_pair(family: int, address: tuple[str, int]) -> tuple[socket.socket, socket.socket]:
    """The port bound twice in one reuseport group, QUIC steered to the second; OSError
    (the caller falls back to one socket) where the kernel refuses any step."""
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socks[0].bind(address)
        socks[1].bind(socks[0].getsockname()[:2])
        _steer_quic_to_second(socks[0])
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks[0], socks[1]


def gso_supported(sock: socket.socket) -> bool:
    """Whether the kernel knows UDP_SEGMENT on ``sock`` (it may still refuse a send)."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def _enable_gro(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def split_coalesced(data: bytes, ancillary: list[tuple[int, int, bytes]]) -> list[bytes]:
    """The datagrams of one GRO read: ``data`` cut every ``size`` bytes, where the
    ``UDP_GRO`` cmsg gives ``size`` (the last may be shorter); ``[data]`` without one."""
    for level, kind, value in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            size = struct.unpack("=i", value[:4])[0]
            if 0 < size < len(data):
                return [data[i : i + size] for i in range(0, len(data), size)]
    return [data]


class UdpEndpoint:
    def __init__(
        self, sock: socket.socket, quic_sock: socket.socket | None = None, *, gso: bool = True
    ) -> None:
        """``sock`` receives everything, or all but QUIC when ``quic_sock`` (bound to the
        same address, QUIC steered to it) is given; everything is sent from ``sock``.
        ``gso``: batch with UDP_SEGMENT where the kernel supports it (:meth:`send_many`);
        the environment variable ``P2PD_NO_GSO`` turns it off (benchmarks' baseline)."""
        self._socks = [sock] if quic_sock is None else [quic_sock, sock]  # read in order
        for s in self._socks:
            s.setblocking(False)
        self._stdlib = sock
        #: an IPv6 socket: IPv4 peers are unmapped in and mapped out (module docstring)
        self._v6 = sock.family == socket.AF_INET6
        self._trio = trio.socket.from_stdlib_socket(sock)
        self.stats: Counter[str] = Counter()
        self.stats["queues"] = len(self._socks)
        self._flush_hooks: list[FlushHook] = []
        host, port = sock.getsockname()[:2]
        self.local_address = Address(host, port)
        #: Segmented sends are tried (module docstring); off for good after a refusal.
        self.gso = gso and not os.environ.get("P2PD_NO_GSO") and gso_supported(sock)
        #: Coalesced reads on the socket QUIC arrives on (:meth:`serve` splits them).
        self.gro = self.gso and not os.environ.get("P2PD_NO_GRO") and _enable_gro(self._socks[0])

    @classmethod
    def bind(cls, address: Address, *, split: bool = True, gso: bool = True) -> UdpEndpoint:
        """Bind ``address``; with ``split``, QUIC in a queue of its own where the kernel
        allows (a port that is never read, as the dial-back sender's, needs none)."""
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            # A plain bind first: the port must be free (a reuseport group would let a
            # second daemon of the same user join it silently).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address.as_tuple())
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise LocalError(f"cannot listen on {address}: the port is in use") from exc
            raise LocalError(f"cannot listen on {address}: {exc.strerror}") from exc
        bound = sock.getsockname()[:2]
        sock.close()
        if split and os.environ.get("P2PD_ONE_RECEIVE_QUEUE"):  # benchmarks' baseline only
            log.info("one receive queue for DHT and QUIC (P2PD_ONE_RECEIVE_QUEUE is set)")
        elif split:
            try:
                main, quic = _bind_pair(family, bound)
            except OSError as exc:
                log.info("one receive queue for DHT and QUIC (%s)", exc.strerror or exc)
            else:
                return cls(main, quic, gso=gso)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(bound)
        except OSError as exc:
            sock.close()
            raise LocalError(f"cannot listen on {address}: {exc.strerror}") from exc
        return cls(sock, gso=gso)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send one datagram now, from any thread; a full buffer drops it (UDP semantics)."""
        if self._v6 and ":" not in addr[0]:
            addr = ("::ffff:" + addr[0], addr[1])
        self._send_plain((data,), addr)

    def send_many(self, datagrams: list[bytes], addr: tuple[str, int]) -> None:
        """Send ``datagrams`` to ``addr`` now, in order, as :meth:`sendto` each would:
        each run of equal sizes (the last of a run may be shorter) as one segmented
        ``sendmsg`` when :attr:`gso` is on, at most :data:`GSO_MAX_SEGMENTS` and
        :data:`GSO_MAX_BYTES` a call. A full buffer drops what that call carried."""
        if self._v6 and ":" not in addr[0]:
            addr = ("::ffff:" + addr[0], addr[1])
        if not self.gso or len(datagrams) < 2:
            self._send_plain(datagrams, addr)
            return
        count = len(datagrams)
        start = 0
        while start < count:
            size = len(datagrams[start])
            end = start + 1
            limit = min(count, start + GSO_MAX_SEGMENTS, start + GSO_MAX_BYTES // max(size, 1))
            while end < limit and len(datagrams[end]) == size:
                end += 1
            if end < limit and 0 < len(datagrams[end]) < size:
                end += 1  # a shorter one ends the run
            if end - start == 1 or size == 0:
                self._send_plain(datagrams[start:end], addr)
            else:
                self._send_segmented(datagrams[start:end], size, addr)
            start = end

    def _send_segmented(self, run: list[bytes], size: int, addr: tuple[str, int]) -> None:
        try:
            self._stdlib.sendmsg(run, [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, addr)
        except (BlockingIOError, InterruptedError):
            self.stats["send_dropped"] += len(run)
            return
        except OSError as exc:
            if exc.errno in _GSO_UNSUPPORTED and self.gso:
                # Never lose the batch: it goes out one by one, as every later one will.
                self.gso = False
                self.stats["gso_refused"] += 1
                log.info(
                    "UDP segmentation offload refused (%s): sending datagram by datagram",
                    exc.strerror or exc,
                )
            else:
                self.stats["gso_failed"] += 1
                log.debug("segmented send to %s failed: %s", addr, exc)
            self._send_plain(run, addr)
            return
        self.stats["gso_sends"] += 1
        self.stats["gso_datagrams"] += len(run)

    def _send_plain(self, run: Sequence[bytes], addr: tuple[str, int]) -> None:
        """``run`` one by one, ``addr`` already spelled for the socket."""
        sendto = self._stdlib.sendto
        for data in run:
            try:
                sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                self.stats["send_dropped"] += 1
            except OSError as exc:
                self.stats["send_errors"] += 1
                log.debug("sendto %s failed: %s", addr, exc)

    def kernel_drops(self) -> dict[str, int]:
        """Datagrams the kernel dropped because a receive queue was full, per queue
        (``quic`` and ``other``; ``all`` with one queue). SO_MEMINFO (Linux 4.6); {}
        where the kernel does not say."""
        names = ["quic", "other"] if len(self._socks) > 1 else ["all"]
        drops = {}
        for name, sock in zip(names, self._socks, strict=True):
            try:
                info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 9 * 4)
            except OSError:
                return {}
            drops[name] = struct.unpack("9I", info)[8]  # SK_MEMINFO_DROPS
        return drops

    def close(self) -> None:
        self._trio.close()
        for s in self._socks:
            if s is not self._stdlib:
                s.close()

    def add_flush_hook(self, hook: FlushHook) -> None:
        """Have :meth:`serve` call ``hook()`` after each burst of datagrams it handed out,
        before it waits for more. It runs in the receive task and must not raise."""
        self._flush_hooks.append(hook)

    def remove_flush_hook(self, hook: FlushHook) -> None:
        if hook in self._flush_hooks:
            self._flush_hooks.remove(hook)

    async def serve(
        self,
        on_dht: DatagramHandler,
        on_quic: DatagramHandler | None = None,
        on_relay: DatagramHandler | None = None,
        on_punch: DatagramHandler | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Receive forever, handing each datagram to its protocol by its first byte;
        QUIC's own queue (when there are two) first, each burst."""
        stats = self.stats
        hooks = self._flush_hooks
        v6 = self._v6
        readers = [s.recvfrom for s in self._socks]
        # The QUIC socket (or the only one) reads coalesced runs when GRO is on.
        coalesced = self._socks[0].recvmsg if self.gro else None
        poller = None
        if len(self._socks) > 1:  # one fd to wait on for both: an epoll set
            poller = select.epoll()
            for s in self._socks:
                poller.register(s.fileno(), select.EPOLLIN)
        waitable = self._stdlib if poller is None else poller.fileno()
        # The other queue's read budget (a token bucket), only when QUIC has its own.
        throttled = len(readers) - 1 if poller is not None else -1
        tokens, refilled = OTHER_READ_BURST, trio.current_time()
        quic_fd = self._socks[0]
        task_status.started()
        try:
            while True:
                # Read what is queued without a checkpoint per datagram: trio's socket
                # wrapper yields to the scheduler after every successful recvfrom, a full
                # scheduling round (epoll poll included) per datagram. On EAGAIN, wait for
                # readability; at the burst bound, only let the other tasks run once.
                drained = 0
                count = dropped = coalesced_reads = 0
                paused = False
                for index, recvfrom in enumerate(readers):
                    limit = RECV_BURST
                    if index == throttled:
                        now = trio.current_time()
                        tokens = min(OTHER_READ_BURST, tokens + (now - refilled) * OTHER_READ_RATE)
                        refilled = now
                        limit = min(RECV_BURST, int(tokens))
                        if limit == 0:
                            paused = True
                            continue
                        tokens -= limit  # what is not read is given back below
                    gro = coalesced if index == 0 else None
                    # QUIC's own queue holds only what the steering program sent there,
                    # one datagram at a time: QUIC. A coalesced (GRO) read is steered as
                    # a whole by its first datagram, so a sender that segments one QUIC-
                    # looking datagram ahead of DHT ones would get these past the other
                    # queue's read budget: anything else read here is dropped, counted.
                    quic_only = poller is not None and index == 0
                    datagrams: Sequence[bytes]
                    while limit > 0:
                        try:
                            if gro is None:
                                data, addr = recvfrom(MAX_DATAGRAM)
                                datagrams = (data,)
                            else:
                                data, cmsgs, _, addr = gro(MAX_DATAGRAM, _GRO_CMSG_SPACE)
                                if cmsgs:
                                    datagrams = split_coalesced(data, cmsgs)
                                    coalesced_reads += 1
                                else:
                                    datagrams = (data,)
                        except (BlockingIOError, InterruptedError):
                            drained += 1
                            break
                        except ConnectionResetError:  # ICMP port unreachable, on some systems
                            limit -= 1
                            continue
                        count += len(datagrams)
                        limit -= len(datagrams)
                        if v6 and addr[0].startswith("::ffff:"):
                            addr = (addr[0][7:], addr[1])
                        source = (addr[0], addr[1])
                        for data in datagrams:
                            first = data[0] if data else 0x80  # an empty datagram: neither
                            if quic_only and not first & 0x40:
                                stats["quic_queue_not_quic"] += 1
                                dropped += 1
                            elif first & 0x40:
                                if on_quic is not None:
                                    on_quic(data, source)
                                else:
                                    dropped += 1
                            elif first <= 0x03:
                                on_dht(data, source)
                            elif first == PUNCH_BYTE and on_punch is not None:
                                on_punch(data, source)
                            elif first < PUNCH_BYTE and on_relay is not None:
                                on_relay(data, source)
                            else:
                                dropped += 1
                    if index == throttled:
                        tokens += max(limit, 0)  # unread: not spent
                if count:
                    stats["datagrams_in"] += count
                    if dropped:
                        stats["dropped_unknown"] += dropped
                    if coalesced_reads:
                        stats["gro_reads"] += coalesced_reads
                    for hook in hooks:
                        hook()
                if drained == len(readers):
                    await trio.lowlevel.wait_readable(waitable)
                elif paused and drained == len(readers) - 1:
                    # Only the other queue has more, and its budget is spent: wait for QUIC
                    # or for the budget of a burst, whichever comes first.
                    stats["other_read_paused"] += 1
                    with trio.move_on_after(RECV_BURST / OTHER_READ_RATE):
                        await trio.lowlevel.wait_readable(quic_fd)
                else:
                    await trio.lowlevel.checkpoint()
        finally:
            if poller is not None:
                poller.close()
