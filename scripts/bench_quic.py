#!/usr/bin/env python3
"""Bulk throughput on loopback: our trio QUIC driver against aioquic's own asyncio layer.

Each run sends SIZE megabytes over one stream from a client to a server on 127.0.0.1,
both ends in this one process (so one CPU does the work of both, for both contenders),
and stops the clock when the server's one-byte reply to the FIN arrives. Both sides use
the same QUIC parameters (1200-byte packets, Reno, the same flow control windows), the
same Ed25519 certificate type and the same socket receive buffer (the daemon's, unless
--rcvbuf says otherwise), so the comparison is of the drivers, not of settings. Each
contender first makes one unmeasured warm-up run (imports, caches); the measured runs
alternate which contender goes first, and each starts after a garbage collection.

    scripts/bench_quic.py                  # 50 MB, 3 rounds each, prints Mbit/s and ratio
    scripts/bench_quic.py --rcvbuf 0       # both on the kernel's default receive buffer
    scripts/bench_quic.py --size 20 --rounds 1 --profile ours.prof   # cProfile ours

Only 127.0.0.1 is used; every run has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import socket
import ssl
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration

from p2pd.config import QuicConfig
from p2pd.identity import Identity
from p2pd.transport.quic import ALPN, QuicPeer, QuicStream, open_quic_endpoint
from p2pd.transport.tls import make_certificate
from p2pd.transport.udp import RECV_BUFFER, UdpEndpoint
from p2pd.wire import Address

CHUNK = 1 << 20
DEADLINE = 300.0


def mbit_per_s(size: int, seconds: float) -> float:
    return size * 8 / seconds / 1e6


# --------------------------------------------------------------------------- ours


def _bind(rcvbuf: int) -> UdpEndpoint:
    if rcvbuf == RECV_BUFFER:
        return UdpEndpoint.bind(Address("127.0.0.1", 0))  # exactly as the daemon does
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    return UdpEndpoint(sock)


async def run_ours(size: int, config: QuicConfig, rcvbuf: int) -> float:
    payload = bytes(CHUNK)

    async def sink(peer: QuicPeer, stream: QuicStream) -> None:
        received = 0
        while data := await stream.receive_some():
            received += len(data)
        await stream.send_all(b"1" if received == size else b"0")

    with trio.fail_after(DEADLINE):
        server_udp = _bind(rcvbuf)
        client_udp = _bind(rcvbuf)
        server_id, client_id = Identity.generate("server"), Identity.generate("client")
        try:
            async with (
                open_quic_endpoint(server_udp, server_id, config, on_stream=sink) as server,
                open_quic_endpoint(client_udp, client_id, config) as client,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(server_udp.serve, _no_dht, server.datagram_received)
                await nursery.start(client_udp.serve, _no_dht, client.datagram_received)
                peer = await client.connect(server_udp.local_address, server_id.public_key)
                stream = await peer.open_stream()
                start = time.perf_counter()
                sent = 0
                while sent < size:
                    chunk = payload[: min(CHUNK, size - sent)]
                    await stream.send_all(chunk)
                    sent += len(chunk)
                await stream.send_eof()
                reply = await stream.receive_some()
                elapsed = time.perf_counter() - start
                if reply != b"1":
                    raise SystemExit("ours: the server did not receive every byte")
                await stream.aclose()
                nursery.cancel_scope.cancel()
        finally:
            server_udp.close()
            client_udp.close()
    return elapsed


def _no_dht(data: bytes, addr: tuple[str, int]) -> None:
    pass


# --------------------------------------------------------------------------- aioquic asyncio


def _aioquic_configuration(is_client: bool, config: QuicConfig) -> QuicConfiguration:
    certificate, key = make_certificate(Identity.generate("server" if not is_client else "client"))
    return QuicConfiguration(
        alpn_protocols=[ALPN],
        is_client=is_client,
        idle_timeout=config.idle_timeout,
        max_data=config.connection_window,
        max_stream_data=config.stream_window,
        max_datagram_size=config.max_datagram_size,
        certificate=None if is_client else certificate,
        private_key=None if is_client else key,
        verify_mode=ssl.CERT_NONE,
    )


def _set_rcvbuf(transport: asyncio.BaseTransport | None, rcvbuf: int) -> None:
    if rcvbuf and transport is not None:
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)


async def run_aioquic(size: int, config: QuicConfig, rcvbuf: int) -> float:
    payload = bytes(CHUNK)

    tasks: set[asyncio.Task[None]] = set()

    def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def sink() -> None:
            received = 0
            while data := await reader.read(1 << 20):
                received += len(data)
            writer.write(b"1" if received == size else b"0")
            writer.write_eof()

        task = asyncio.ensure_future(sink())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await serve(
        "127.0.0.1",
        0,
        configuration=_aioquic_configuration(False, config),
        stream_handler=handle,
    )
    try:
        port = server._transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        _set_rcvbuf(server._transport, rcvbuf)
        async with connect(
            "127.0.0.1", port, configuration=_aioquic_configuration(True, config)
        ) as client:
            assert isinstance(client, QuicConnectionProtocol)
            _set_rcvbuf(client._transport, rcvbuf)
            reader, writer = await client.create_stream()
            start = time.perf_counter()
            sent = 0
            while sent < size:
                chunk = payload[: min(CHUNK, size - sent)]
                writer.write(chunk)
                await writer.drain()  # aioquic's adapter never pauses: this buffers it all
                sent += len(chunk)
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(1), DEADLINE)
            elapsed = time.perf_counter() - start
            if reply != b"1":
                raise SystemExit("aioquic: the server did not receive every byte")
    finally:
        server.close()
    return elapsed


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=50, help="megabytes per run (default 50)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--max-datagram-size", type=int, default=1200)
    parser.add_argument(
        "--rcvbuf",
        type=int,
        default=RECV_BUFFER,
        help=f"SO_RCVBUF of every socket, both contenders (default {RECV_BUFFER}, the "
        "daemon's; 0: the kernel's default)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured runs of each first (default 1)"
    )
    parser.add_argument("--profile", metavar="FILE", help="cProfile our runs into FILE")
    parser.add_argument("--only", choices=["ours", "aioquic"], help="run one contender")
    args = parser.parse_args()
    size = args.size * 1_000_000
    config = QuicConfig(max_datagram_size=args.max_datagram_size)

    def ours() -> float:
        return mbit_per_s(size, trio.run(run_ours, size, config, args.rcvbuf))

    def theirs() -> float:
        return mbit_per_s(size, asyncio.run(run_aioquic(size, config, args.rcvbuf)))

    contenders = [("ours (trio driver)", ours), ("aioquic asyncio", theirs)]
    if args.only == "ours":
        contenders = contenders[:1]
    elif args.only == "aioquic":
        contenders = contenders[1:]
    results: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for _ in range(args.warmup):
        for name, run in contenders:
            print(f"{name + ' (warm-up):':32}{run():8.1f} Mbit/s", flush=True)
    for round_ in range(args.rounds):
        # Alternate who goes first, so that neither always runs on a cooler machine.
        for name, run in contenders if round_ % 2 == 0 else contenders[::-1]:
            gc.collect()
            profiler = cProfile.Profile() if args.profile and run is ours else None
            if profiler:
                profiler.enable()
            results[name].append(run())
            if profiler:
                profiler.disable()
                profiler.dump_stats(args.profile)
            print(f"{name + ':':32}{results[name][-1]:8.1f} Mbit/s", flush=True)

    rcvbuf = f"SO_RCVBUF {args.rcvbuf}" if args.rcvbuf else "default SO_RCVBUF"
    print(f"\n{args.size} MB over one stream, {rcvbuf}, {args.rounds} round(s), median:")
    for name, values in results.items():
        print(f"  {name + ':':30}{statistics.median(values):8.1f} Mbit/s")
    if len(results) == 2:
        ours_median, theirs_median = (statistics.median(v) for v in results.values())
        print(f"  {'ratio ours/theirs:':30}{ours_median / theirs_median:8.2f}")


if __name__ == "__main__":
    main()
