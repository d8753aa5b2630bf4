"""The node's one UDP socket, owned by trio and shared by the DHT and QUIC.

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
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import Counter
from collections.abc import Callable

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
RECV_BURST = 64


class UdpEndpoint:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._stdlib = sock
        #: an IPv6 socket: IPv4 peers are unmapped in and mapped out (module docstring)
        self._v6 = sock.family == socket.AF_INET6
        self._trio = trio.socket.from_stdlib_socket(sock)
        self.stats: Counter[str] = Counter()
        self._flush_hooks: list[FlushHook] = []
        host, port = sock.getsockname()[:2]
        self.local_address = Address(host, port)

    @classmethod
    def bind(cls, address: Address) -> UdpEndpoint:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address.as_tuple())
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise LocalError(f"cannot listen on {address}: the port is in use") from exc
            raise LocalError(f"cannot listen on {address}: {exc.strerror}") from exc
        return cls(sock)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send one datagram now, from any thread; a full buffer drops it (UDP semantics)."""
        if self._v6 and ":" not in addr[0]:
            addr = ("::ffff:" + addr[0], addr[1])
        try:
            self._stdlib.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.stats["send_dropped"] += 1
        except OSError as exc:
            self.stats["send_errors"] += 1
            log.debug("sendto %s failed: %s", addr, exc)

    def close(self) -> None:
        self._trio.close()

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
        """Receive forever, handing each datagram to its protocol by its first byte."""
        sock = self._stdlib
        recvfrom = sock.recvfrom
        stats = self.stats
        hooks = self._flush_hooks
        v6 = self._v6
        task_status.started()
        while True:
            # Read what is queued without a checkpoint per datagram: trio's socket wrapper
            # yields to the scheduler after every successful recvfrom, a full scheduling
            # round (epoll poll included) per datagram. On EAGAIN, wait for readability;
            # at the burst bound, only let the other tasks run once.
            drained = False
            count = dropped = 0
            for _ in range(RECV_BURST):
                try:
                    data, addr = recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    drained = True
                    break
                except ConnectionResetError:  # ICMP port unreachable, on some systems
                    continue
                count += 1
                if v6 and addr[0].startswith("::ffff:"):
                    addr = (addr[0][7:], addr[1])
                first = data[0] if data else 0x80  # an empty datagram: neither
                if first & 0x40:
                    if on_quic is not None:
                        on_quic(data, (addr[0], addr[1]))
                    else:
                        dropped += 1
                elif first <= 0x03:
                    on_dht(data, (addr[0], addr[1]))
                elif first == PUNCH_BYTE and on_punch is not None:
                    on_punch(data, (addr[0], addr[1]))
                elif first < PUNCH_BYTE and on_relay is not None:
                    on_relay(data, (addr[0], addr[1]))
                else:
                    dropped += 1
            if count:
                stats["datagrams_in"] += count
                if dropped:
                    stats["dropped_unknown"] += dropped
                for hook in hooks:
                    hook()
            if drained:
                await trio.lowlevel.wait_readable(sock)
            else:
                await trio.lowlevel.checkpoint()
