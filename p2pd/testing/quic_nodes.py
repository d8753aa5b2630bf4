"""QUIC endpoints on real UDP sockets on loopback for tests: a node (its UDP endpoint, QUIC
endpoint, and what it saw), and the stream handlers and readers the QUIC tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from ..config import QuicConfig
from ..identity import Identity
from ..transport.quic import QuicEndpoint, QuicPeer, QuicStream, StreamHandler, open_quic_endpoint
from ..transport.udp import UdpEndpoint
from ..wire import Address

__all__ = ["Node", "echo", "echo_whole", "echoed", "open_node", "read_all"]


@dataclass
class Node:
    """A QUIC endpoint on its own loopback port; DHT datagrams, incoming and closed
    connections recorded."""

    identity: Identity
    udp: UdpEndpoint
    quic: QuicEndpoint
    dht_datagrams: list[bytes] = field(default_factory=list)
    incoming: list[QuicPeer] = field(default_factory=list)
    closed: list[QuicPeer] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return self.udp.local_address.as_tuple()

    @property
    def key(self) -> bytes:
        return self.identity.public_key


@asynccontextmanager
async def open_node(
    handle: str = "alice",
    *,
    config: QuicConfig | None = None,
    on_stream: StreamHandler | None = None,
    on_datagram: Callable[[QuicPeer, bytes], None] | None = None,
    identity: Identity | None = None,
) -> AsyncIterator[Node]:
    """``identity``: a node's own (a restarted node's, say); a new one for ``handle`` if
    None."""
    identity = identity or Identity.generate(handle)
    udp = UdpEndpoint.bind(Address("127.0.0.1", 0))
    dht: list[bytes] = []
    incoming: list[QuicPeer] = []
    closed: list[QuicPeer] = []
    try:
        async with (
            open_quic_endpoint(
                udp,
                identity,
                config,
                on_stream=on_stream,
                on_datagram=on_datagram,
                on_connection=incoming.append,
                on_closed=closed.append,
            ) as quic,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(
                udp.serve, lambda data, addr: dht.append(data), quic.datagram_received
            )
            yield Node(identity, udp, quic, dht, incoming, closed)
            nursery.cancel_scope.cancel()
    finally:
        udp.close()


async def echo(peer: QuicPeer, stream: QuicStream) -> None:
    """Write back what comes, as it comes, then the FIN."""
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.send_eof()


async def echoed(stream: QuicStream, payload: bytes) -> bytes:
    """Write ``payload`` and the end on ``stream`` while reading what comes back."""
    received = b""

    async def reader() -> None:
        nonlocal received
        received = await read_all(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await stream.send_all(payload)
        await stream.send_eof()
    return received


async def read_all(stream: QuicStream) -> bytes:
    """Everything the stream brings, to its end."""
    chunks = []
    while data := await stream.receive_some():
        chunks.append(data)
    return b"".join(chunks)


async def echo_whole(peer: QuicPeer, stream: QuicStream) -> None:
    """Read the stream to its end, then write it all back with the FIN."""
    await stream.send_all(await read_all(stream), eof=True)
