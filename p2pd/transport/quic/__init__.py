"""QUIC between peers: a trio driver for aioquic's sans-I/O ``QuicConnection``.

The node has one UDP socket (:class:`~p2pd.transport.udp.UdpEndpoint`); datagrams whose
first byte has the 0x40 bit set (RFC 9000 section 17: the fixed bit) come to
:meth:`QuicEndpoint.datagram_received`. There we parse the header, find the connection by
its Destination Connection ID (or make a server connection for a new Initial), feed the
datagram to aioquic and note the connection. The UDP task reads every queued datagram
(a burst) before it yields, and then calls our flush hook, which runs one *step* of each
connection that received something, still in the UDP task and synchronously: the UDP
task never waits on QUIC, and no task switch happens per datagram.

A step fires aioquic's timer if due, consumes every pending event (stream data wakes the
reader, DATAGRAM frames go to ``on_datagram``), applies the connection policy
(keep-alive, idle close, handshake timeout), drains ``datagrams_to_send()`` straight into
the socket, and re-arms the connection's deadline. Each connection also has one task
(:meth:`QuicPeer.run`) that runs the same step when its deadline comes (aioquic's
``get_timer()``, the policy's deadline) or when the application wakes it (a write, a
read that frees window, a close).

Batching is the point: one ``datagrams_to_send`` serves everything that arrived or was
written since the last step.
Time is ``trio.current_time()``, read by the driver and passed down: aioquic only adds
durations to and compares the ``now`` values its caller passes (it reads no clock of its
own except for certificate validity and session tickets, neither used here), so any
monotonic clock passed consistently works.

Identity: both sides present a self-signed certificate for their Ed25519 identity key
(:mod:`p2pd.transport.tls`), the server *requests* the client's (RFC 8446 section
4.3.2), and after the handshake the client compares the server's key with the one it
expected while the server learns the client's key. See docs/PROTOCOL.md, "QUIC".

The package, from the bottom up:

- ``_aioquic``: everything taken from aioquic, and the only module that imports it; the
  internals we reach (the mutual-TLS switch, the peer certificate, receive credit as the
  application reads, stream and datagram state) are all in its ``Connection``. It refuses
  any aioquic but the pinned one.
- ``codes``: ALPN, version, connection ID length, application error codes.
- ``policy``: :class:`ConnectionPolicy`, the key check, keep-alive, idle close and
  handshake timeout as a pure class fed ``now``.
- ``admission``: :class:`SlotBudget`, who gets a connection slot (Retry above a number
  of handshakes, per-address limits, a reserve for outgoing and pinned), pure.
- ``stream``: :class:`QuicStream`, a trio ``HalfCloseableStream``.
- ``peer``: :class:`QuicPeer`, one connection and its task.
- ``endpoint``: :class:`QuicEndpoint`, every connection on the node's socket.
"""

from .admission import SlotBudget, Verdict
from .codes import ALPN, CID_LENGTH, SUPPORTED_VERSIONS, AppError
from .endpoint import (
    DatagramHandler,
    PeerHandler,
    PinCheck,
    QuicEndpoint,
    StreamHandler,
    open_quic_endpoint,
)
from .peer import NetworkAddress, QuicPeer, largest_datagram_payload
from .policy import ConnectionPolicy
from .stream import QuicStream, StreamBroken

__all__ = [
    "ALPN",
    "CID_LENGTH",
    "SUPPORTED_VERSIONS",
    "AppError",
    "ConnectionPolicy",
    "DatagramHandler",
    "NetworkAddress",
    "PeerHandler",
    "PinCheck",
    "QuicEndpoint",
    "QuicPeer",
    "QuicStream",
    "SlotBudget",
    "StreamBroken",
    "StreamHandler",
    "Verdict",
    "largest_datagram_payload",
    "open_quic_endpoint",
]
