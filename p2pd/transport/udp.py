"""The node's one UDP socket, owned by trio and shared by the DHT and QUIC.

Demultiplexing on the first byte (docs/PROTOCOL.md, "One port"):

- ``0x00`` / ``0x01``: a DHT frame (rpcudp request / response) -> the DHT;
- first byte with the 0x40 bit set: a QUIC packet (RFC 9000 section 17: the fixed bit)
  -> the QUIC handler, once there is one;
- anything else is dropped and counted.

Sharing the port means the DHT sees the same public address that QUIC uses, which NAT
traversal needs. The DHT runs in the asyncio thread and sends through :meth:`sendto`,
which is safe from any thread: a non-blocking ``sendto`` on the same file descriptor.
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

log = logging.getLogger(__name__)

DatagramHandler = Callable[[bytes, tuple[str, int]], None]
MAX_DATAGRAM = 65535
RECV_BUFFER = 1 << 20


class UdpEndpoint:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._stdlib = sock
        self._trio = trio.socket.from_stdlib_socket(sock)
        self.stats: Counter[str] = Counter()
        host, port = sock.getsockname()[:2]
        self.local_address = Address(host, port)

    @classmethod
    def bind(cls, address: Address) -> UdpEndpoint:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            sock.bind(address.as_tuple())
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise LocalError(f"cannot listen on {address}: the port is in use") from exc
            raise LocalError(f"cannot listen on {address}: {exc.strerror}") from exc
        return cls(sock)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send one datagram now, from any thread; a full buffer drops it (UDP semantics)."""
        try:
            self._stdlib.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.stats["send_dropped"] += 1
        except OSError as exc:
            self.stats["send_errors"] += 1
            log.debug("sendto %s failed: %s", addr, exc)

    def close(self) -> None:
        self._trio.close()

    async def serve(
        self,
        on_dht: DatagramHandler,
        on_quic: DatagramHandler | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Receive forever, handing each datagram to its protocol by its first byte."""
        task_status.started()
        while True:
            try:
                data, addr = await self._trio.recvfrom(MAX_DATAGRAM)
            except ConnectionResetError:  # ICMP port unreachable surfaced on some systems
                continue
            self.stats["datagrams_in"] += 1
            first = data[0] if data else 0xFF
            address = (addr[0], addr[1])
            if first in (0x00, 0x01):
                on_dht(data, address)
            elif first & 0x40 and on_quic is not None:
                on_quic(data, address)
            else:
                self.stats["dropped_unknown"] += 1
