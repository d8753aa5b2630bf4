#!/usr/bin/env python3
"""Bulk throughput on loopback: our trio QUIC driver against aioquic's own asyncio layer.

Each run sends SIZE megabytes over one stream from a client to a server on 127.0.0.1,
both ends in this one process (so one CPU does the work of both, for both contenders),
and stops the clock when the server's one-byte reply to the FIN arrives. Both sides use
the same QUIC parameters (1200-byte packets, Reno, the same flow control windows) and the
same Ed25519 certificate type, so the comparison is of the drivers, not of settings.

    scripts/bench_quic.py                  # 50 MB, 3 rounds each, prints Mbit/s and ratio
    scripts/bench_quic.py --size 20 --rounds 1 --profile ours.prof   # cProfile ours

Only 127.0.0.1 is used; every run has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ssl
import statistics
import sys
import time
from collections.abc import Callable
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
from p2pd.transport.udp import UdpEndpoint
from p2pd.wire import Address

CHUNK = 1 << 20
DEADLINE = 300.0


def mbit_per_s(size: int, seconds: float) -> float:
    return size * 8 / seconds / 1e6


# --------------------------------------------------------------------------- ours


async def run_ours(size: int, config: QuicConfig, udp_class: type[UdpEndpoint]) -> float:
    payload = bytes(CHUNK)

    async def sink(peer: QuicPeer, stream: QuicStream) -> None:
        received = 0
        while data := await stream.receive_some():
            received += len(data)
        await stream.send_all(b"1" if received == size else b"0")

    with trio.fail_after(DEADLINE):
        server_udp = udp_class.bind(Address("127.0.0.1", 0))
        client_udp = udp_class.bind(Address("127.0.0.1", 0))
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


class DrainingUdpEndpoint(UdpEndpoint):
    """An experiment, not used by the daemon: ``UdpEndpoint.serve`` as it could be, reading
    every queued datagram (up to 64) before it yields to the scheduler, so a QUIC step
    answers a whole burst. Run with ``--draining-udp`` to see what that would change."""

    async def serve(
        self,
        on_dht: Callable[[bytes, tuple[str, int]], None],
        on_quic: Callable[[bytes, tuple[str, int]], None] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        sock = self._stdlib
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(64):
                try:
                    data, addr = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionResetError:
                    continue
                if data and data[0] & 0x40 and on_quic is not None:
                    on_quic(data, (addr[0], addr[1]))
                else:
                    on_dht(data, (addr[0], addr[1]))
            await trio.lowlevel.checkpoint()


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


async def run_aioquic(size: int, config: QuicConfig) -> float:
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
        async with connect(
            "127.0.0.1", port, configuration=_aioquic_configuration(True, config)
        ) as client:
            assert isinstance(client, QuicConnectionProtocol)
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
    parser.add_argument("--profile", metavar="FILE", help="cProfile our runs into FILE")
    parser.add_argument("--only", choices=["ours", "aioquic"], help="run one contender")
    parser.add_argument(
        "--draining-udp",
        action="store_true",
        help="also run ours on DrainingUdpEndpoint (a proposed UdpEndpoint.serve)",
    )
    args = parser.parse_args()
    size = args.size * 1_000_000
    config = QuicConfig(max_datagram_size=args.max_datagram_size)

    ours: list[float] = []
    theirs: list[float] = []
    drained: list[float] = []
    for _ in range(args.rounds):
        if args.only != "aioquic":
            profiler = cProfile.Profile() if args.profile else None
            if profiler:
                profiler.enable()
            ours.append(mbit_per_s(size, trio.run(run_ours, size, config, UdpEndpoint)))
            if profiler:
                profiler.disable()
                profiler.dump_stats(args.profile)
            print(f"ours (trio driver):     {ours[-1]:8.1f} Mbit/s", flush=True)
            if args.draining_udp:
                drained.append(
                    mbit_per_s(size, trio.run(run_ours, size, config, DrainingUdpEndpoint))
                )
                print(f"ours, draining UDP:     {drained[-1]:8.1f} Mbit/s", flush=True)
        if args.only != "ours":
            theirs.append(mbit_per_s(size, asyncio.run(run_aioquic(size, config))))
            print(f"aioquic asyncio:        {theirs[-1]:8.1f} Mbit/s", flush=True)

    print(f"\n{args.size} MB over one stream, {args.rounds} round(s), median:")
    if ours:
        print(f"  ours (trio driver):   {statistics.median(ours):8.1f} Mbit/s")
    if drained:
        print(f"  ours, draining UDP:   {statistics.median(drained):8.1f} Mbit/s (experiment)")
    if theirs:
        print(f"  aioquic asyncio:      {statistics.median(theirs):8.1f} Mbit/s")
    if ours and theirs:
        print(f"  ratio ours/theirs:    {statistics.median(ours) / statistics.median(theirs):8.2f}")


if __name__ == "__main__":
    main()
