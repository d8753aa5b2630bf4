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
    scripts/bench_quic.py --gso both       # ours with and without UDP_SEGMENT, alternating

qh3 (a maintained aioquic fork with a Rust core and its own GSO/GRO transport) is a
third contender when it is installed (``pip install qh3``), on the same settings (its
path MTU probing off); "qh3 not installed" otherwise. Not graded: a reference.

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
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration
from cryptography.hazmat.primitives import serialization

from p2pd.config import QuicConfig
from p2pd.identity import Identity
from p2pd.transport.quic import ALPN, QuicPeer, QuicStream, open_quic_endpoint
from p2pd.transport.tls import make_certificate
from p2pd.transport.udp import RECV_BUFFER, UdpEndpoint
from p2pd.wire import Address

CHUNK = 1 << 20
DEADLINE = 300.0
OURS_GSO = "ours, GSO (trio driver)"
OURS_PLAIN = "ours, no GSO (trio driver)"
AIOQUIC = "aioquic asyncio"
QH3 = "qh3 asyncio"


def mbit_per_s(size: int, seconds: float) -> float:
    return size * 8 / seconds / 1e6


# --------------------------------------------------------------------------- ours


def _bind(rcvbuf: int, gso: bool) -> UdpEndpoint:
    if rcvbuf == RECV_BUFFER:
        return UdpEndpoint.bind(Address("127.0.0.1", 0), gso=gso)  # as the daemon does
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    return UdpEndpoint(sock, gso=gso)


async def run_ours(size: int, config: QuicConfig, rcvbuf: int, gso: bool) -> float:
    payload = bytes(CHUNK)

    async def sink(peer: QuicPeer, stream: QuicStream) -> None:
        received = 0
        while data := await stream.receive_some():
            received += len(data)
        await stream.send_all(b"1" if received == size else b"0")

    with trio.fail_after(DEADLINE):
        server_udp = _bind(rcvbuf, gso)
        client_udp = _bind(rcvbuf, gso)
        if gso and not client_udp.gso:
            raise SystemExit("ours: this kernel has no UDP_SEGMENT; run with --gso off")
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
                if gso and not client_udp.stats["gso_sends"]:
                    raise SystemExit("ours: no segmented send happened")
                await stream.aclose()
                nursery.cancel_scope.cancel()
        finally:
            server_udp.close()
            client_udp.close()
    return elapsed


def _no_dht(data: bytes, addr: tuple[str, int]) -> None:
    pass


# --------------------------------------------------------------------------- asyncio layers


def _library(name: str) -> SimpleNamespace | None:
    """aioquic's or qh3's asyncio API (the same shape: qh3 is a fork); None if qh3 is
    not installed."""
    if name == "aioquic":
        return SimpleNamespace(
            name=name,
            serve=serve,
            connect=connect,
            protocol=QuicConnectionProtocol,
            configuration=QuicConfiguration,
        )
    try:
        from qh3.asyncio.client import connect as qh3_connect
        from qh3.asyncio.protocol import QuicConnectionProtocol as Qh3Protocol
        from qh3.asyncio.server import serve as qh3_serve
        from qh3.quic.configuration import QuicConfiguration as Qh3Configuration
    except ImportError:
        return None
    return SimpleNamespace(
        name=name,
        serve=qh3_serve,
        connect=qh3_connect,
        protocol=Qh3Protocol,
        configuration=Qh3Configuration,
    )


def _asyncio_configuration(lib: SimpleNamespace, is_client: bool, config: QuicConfig) -> Any:
    options: dict[str, Any] = {}
    if lib.name == "qh3":
        from qh3.tls import SignatureAlgorithm

        options["probe_datagram_size"] = False  # the same 1200-byte packets as the others
        # Its client does not offer Ed25519 unless asked: the same certificate type.
        options["signature_algorithms"] = [SignatureAlgorithm.ED25519]
    configuration = lib.configuration(
        alpn_protocols=[ALPN],
        is_client=is_client,
        idle_timeout=config.idle_timeout,
        max_data=config.connection_window,
        max_stream_data=config.stream_window,
        max_datagram_size=config.max_datagram_size,
        verify_mode=ssl.CERT_NONE,
        **options,
    )
    if not is_client:
        certificate, key = make_certificate(Identity.generate("server"))
        if lib.name == "qh3":  # its own certificate types: give it PEM
            configuration.load_cert_chain(
                certificate.public_bytes(serialization.Encoding.PEM)
                + key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        else:
            configuration.certificate, configuration.private_key = certificate, key
    return configuration


def _set_rcvbuf(transport: asyncio.BaseTransport | None, rcvbuf: int) -> None:
    if rcvbuf and transport is not None:
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)


async def run_asyncio(lib: SimpleNamespace, size: int, config: QuicConfig, rcvbuf: int) -> float:
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

    server = await lib.serve(
        "127.0.0.1",
        0,
        configuration=_asyncio_configuration(lib, False, config),
        stream_handler=handle,
    )
    try:
        port = server._transport.get_extra_info("sockname")[1]
        _set_rcvbuf(server._transport, rcvbuf)
        async with lib.connect(
            "127.0.0.1", port, configuration=_asyncio_configuration(lib, True, config)
        ) as client:
            assert isinstance(client, lib.protocol)
            _set_rcvbuf(client._transport, rcvbuf)
            reader, writer = await client.create_stream()
            start = time.perf_counter()
            sent = 0
            while sent < size:
                chunk = payload[: min(CHUNK, size - sent)]
                writer.write(chunk)
                if lib.name == "aioquic":  # qh3's writer has no protocol to drain
                    await writer.drain()  # aioquic's adapter never pauses: buffers it all
                sent += len(chunk)
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(1), DEADLINE)
            elapsed = time.perf_counter() - start
            if reply != b"1":
                raise SystemExit(f"{lib.name}: the server did not receive every byte")
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
    parser.add_argument(
        "--gso",
        choices=["on", "off", "both"],
        default="both",
        help="ours with UDP_SEGMENT batching, without, or both in alternation (default)",
    )
    parser.add_argument(
        "--only", choices=["ours", "aioquic", "qh3"], help="run one contender (ours: per --gso)"
    )
    args = parser.parse_args()
    size = args.size * 1_000_000
    config = QuicConfig(max_datagram_size=args.max_datagram_size)

    def ours(gso: bool) -> Callable[[], float]:
        return lambda: mbit_per_s(size, trio.run(run_ours, size, config, args.rcvbuf, gso))

    def layer(lib: SimpleNamespace) -> Callable[[], float]:
        return lambda: mbit_per_s(size, asyncio.run(run_asyncio(lib, size, config, args.rcvbuf)))

    contenders: list[tuple[str, Callable[[], float]]] = []
    if args.only in (None, "ours"):
        if args.gso in ("on", "both"):
            contenders.append((OURS_GSO, ours(True)))
        if args.gso in ("off", "both"):
            contenders.append((OURS_PLAIN, ours(False)))
    if args.only in (None, "aioquic"):
        contenders.append((AIOQUIC, layer(_library("aioquic"))))  # type: ignore[arg-type]
    if args.only in (None, "qh3"):
        qh3 = _library("qh3")
        if qh3 is None:
            print("qh3 not installed (pip install qh3): no qh3 row")
        else:
            contenders.append((QH3, layer(qh3)))
    results: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for _ in range(args.warmup):
        for name, run in contenders:
            print(f"{name + ' (warm-up):':36}{run():8.1f} Mbit/s", flush=True)
    for round_ in range(args.rounds):
        # Alternate who goes first, so that neither always runs on a cooler machine.
        for name, run in contenders if round_ % 2 == 0 else contenders[::-1]:
            gc.collect()
            profiler = cProfile.Profile() if args.profile and name.startswith("ours") else None
            if profiler:
                profiler.enable()
            results[name].append(run())
            if profiler:
                profiler.disable()
                profiler.dump_stats(args.profile)
            print(f"{name + ':':36}{results[name][-1]:8.1f} Mbit/s", flush=True)

    rcvbuf = f"SO_RCVBUF {args.rcvbuf}" if args.rcvbuf else "default SO_RCVBUF"
    print(f"\n{args.size} MB over one stream, {rcvbuf}, {args.rounds} round(s), median:")
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, value in medians.items():
        print(f"  {name + ':':34}{value:8.1f} Mbit/s")
    if AIOQUIC in medians:
        for name, value in medians.items():
            if name != AIOQUIC:
                pairs = zip(results[name], results[AIOQUIC], strict=True)
                rounds = [f"{a / b:.2f}" for a, b in pairs]
                print(
                    f"  {'ratio ' + name.split(' (')[0] + ' / aioquic:':34}"
                    f"{value / medians[AIOQUIC]:8.2f}  (per round {', '.join(rounds)})"
                )
    if OURS_GSO in medians and OURS_PLAIN in medians:
        pairs = zip(results[OURS_GSO], results[OURS_PLAIN], strict=True)
        rounds = [f"{a / b:.2f}" for a, b in pairs]
        print(
            f"  {'ratio GSO on / off:':34}{medians[OURS_GSO] / medians[OURS_PLAIN]:8.2f}"
            f"  (per round {', '.join(rounds)})"
        )


if __name__ == "__main__":
    main()
