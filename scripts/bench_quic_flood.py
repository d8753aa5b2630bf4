#!/usr/bin/env python3
"""Honest QUIC connects while an attacker floods the receiver with Initial packets.

bob (the receiver) and alice (an honest stranger, 127.0.0.2) run in this process on
loopback; alice makes COUNT fresh connections to bob one after another (connect, one
8-byte echo on a stream, close) and we time each from connect to echo. Three phases in
the same run:

1. quiet: no flood;
2. flood: an attacker process sends fresh, valid Initial packets (a real ClientHello
   resealed under a new connection ID each time: p2pd/testing/quic_flood.py) at full
   speed from SOURCES addresses 127.77.x.y, as spoofed sources would; bob has the
   default QuicConfig (Retry above 32 handshakes, per-address limits, reserve, 3 s
   half-open timeout);
3. flood, defences off: the same against a bob configured as before issue 12 (no
   Retry, no per-address limit, no reserve, a half-open connection lives 10 s).

Printed per phase: alice's connect+echo latency p50/p99 and successes, bob's largest
slot use and half-open count (sampled every 20 ms), the attacker's rate, bob's counters.
alice and bob share this process and its CPU: a flood slows alice's side too.

    scripts/bench_quic_flood.py                     # 200 connects a phase, 64 sources
    scripts/bench_quic_flood.py --count 50 --sources 16

Only 127.0.0.0/8 is used; the attacker stops after --attack-seconds at the latest.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio
from _bench import percentile, progress_printer

from p2pd.config import QuicConfig
from p2pd.identity import Identity
from p2pd.testing.quic_flood import InitialForge
from p2pd.transport.quic import QuicEndpoint, QuicPeer, QuicStream, open_quic_endpoint
from p2pd.transport.udp import UdpEndpoint
from p2pd.wire import Address

progress = progress_printer("bench_quic_flood")
UNDEFENDED = QuicConfig(
    retry_after_half_open=10**9,
    max_connections_per_address=10**9,
    max_half_open_per_address=10**9,
    reserved_share=0.0,
    half_open_timeout=10.0,
)


# --------------------------------------------------------------------------- attacker


def attack(target: tuple[str, int], sources: int, seconds: float) -> None:
    """Send fresh Initials to ``target`` as fast as one core makes them; print a JSON
    summary. Runs in its own process (``--attack``) until SIGTERM or ``seconds``."""
    stopped = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    forge = InitialForge(target)
    socks = []
    for i in range(sources):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind((f"127.77.{i // 200}.{i % 200 + 1}", 0))
        socks.append(sock)
    sent = dropped = 0
    start = time.monotonic()
    deadline = start + seconds
    i = 0
    while time.monotonic() < deadline and not stopped:
        for _ in range(64):
            try:
                socks[i % sources].sendto(forge.initial(), target)
                sent += 1
            except BlockingIOError:
                dropped += 1
            i += 1
        for sock in socks[:4]:  # drain a little of what bob answers: not needed, cheap
            try:
                while sock.recv(65536):
                    pass
            except BlockingIOError:
                pass
    elapsed = time.monotonic() - start
    print(json.dumps({"sent": sent, "dropped": dropped, "seconds": elapsed}), flush=True)


# --------------------------------------------------------------------------- honest side


async def echo(peer: QuicPeer, stream: QuicStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.send_eof()


async def one_connect(alice: QuicEndpoint, bob: QuicEndpoint, bob_at: tuple[str, int]) -> float:
    start = trio.current_time()
    peer = await alice.connect(bob_at, bob.public_key)
    stream = await peer.open_stream()
    await stream.send_all(b"8 bytes!", eof=True)
    got = b""
    for _ in range(10):
        data = await stream.receive_some()
        if not data:
            break
        got += data
    elapsed = trio.current_time() - start
    assert got == b"8 bytes!"
    peer.close()  # not waiting for the closing period (3 PTOs, ~100 ms)
    return elapsed


async def phase(name: str, config: QuicConfig, count: int, flood: dict[str, float] | None) -> dict:
    """One phase: a fresh bob and alice; the attacker process if ``flood``."""
    bob_udp = UdpEndpoint.bind(Address("127.0.0.1", 0))
    alice_udp = UdpEndpoint.bind(Address("127.0.0.2", 0))
    result: dict = {"phase": name}
    try:
        async with (
            open_quic_endpoint(bob_udp, Identity.generate("bob"), config, on_stream=echo) as bob,
            open_quic_endpoint(alice_udp, Identity.generate("alice")) as alice,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(bob_udp.serve, lambda d, a: None, bob.datagram_received)
            await nursery.start(alice_udp.serve, lambda d, a: None, alice.datagram_received)
            bob_at = bob_udp.local_address.as_tuple()
            most = {"slots": 0, "half_open": 0}

            async def sample() -> None:
                while True:
                    most["slots"] = max(most["slots"], bob.budget.total)
                    most["half_open"] = max(most["half_open"], bob.budget.half_open)
                    await trio.sleep(0.02)

            nursery.start_soon(sample)
            attacker = None
            if flood is not None:
                command = [sys.executable, __file__, "--attack", f"{bob_at[0]}:{bob_at[1]}"]
                command += ["--sources", str(int(flood["sources"]))]
                command += ["--attack-seconds", str(flood["seconds"])]
                attacker = subprocess.Popen(
                    command,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                # Start measuring once the flood has reached bob.
                with trio.fail_after(30):
                    while bob.stats["quic_connections_accepted"] < 16:
                        await trio.sleep(0.02)
            latencies, failures = [], 0
            cpu0 = time.process_time()
            started = trio.current_time()
            for _ in range(count):
                try:
                    with trio.fail_after(5):
                        latencies.append(await one_connect(alice, bob, bob_at))
                except Exception as exc:  # a failed connect is a figure
                    failures += 1
                    progress(f"{name}: connect failed: {type(exc).__name__}: {exc}")
            wall = trio.current_time() - started
            cpu = time.process_time() - cpu0
            if attacker is not None:
                attacker.terminate()  # the process this phase started, by its pid
                out, _ = await trio.to_thread.run_sync(attacker.communicate)
                result["attacker"] = json.loads(out.strip().splitlines()[-1])
            latencies.sort()
            result.update(
                {
                    "ok": len(latencies),
                    "failed": failures,
                    "p50_ms": round(1000 * (percentile(latencies, 50) or 0), 2),
                    "p99_ms": round(1000 * (percentile(latencies, 99) or 0), 2),
                    "max_slots": most["slots"],
                    "max_half_open": most["half_open"],
                    "wall_s": round(wall, 1),
                    "process_cpu_share": round(cpu / wall, 2),
                    "counters": {
                        k: v
                        for k, v in sorted(bob.stats.items())
                        if not k.startswith("quic_dropped_")
                    },
                }
            )
            nursery.cancel_scope.cancel()
    finally:
        bob_udp.close()
        alice_udp.close()
    return result


async def main(args: argparse.Namespace) -> None:
    flood = {"sources": args.sources, "seconds": args.attack_seconds}
    results = []
    for name, config, attack_with in (
        ("quiet", QuicConfig(), None),
        ("flood", QuicConfig(), flood),
        ("flood, defences off", UNDEFENDED, flood),
    ):
        progress(f"phase {name}")
        results.append(await phase(name, config, args.count, attack_with))
    print(f"{'phase':<22}{'ok':>5}{'failed':>7}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'slots':>7}{'half-open':>10}{'flood pps':>11}{'wall s':>8}")  # fmt: skip
    for r in results:
        a = r.get("attacker")
        pps = f"{a['sent'] / a['seconds']:,.0f}" if a else "-"
        print(
            f"{r['phase']:<22}{r['ok']:>5}{r['failed']:>7}{r['p50_ms']:>9}{r['p99_ms']:>9}"
            f"{r['max_slots']:>7}{r['max_half_open']:>10}{pps:>11}{r['wall_s']:>8}"
        )
    for r in results:
        print(f"{r['phase']}: {json.dumps(r['counters'])}")
        if "attacker" in r:
            print(f"  attacker: {json.dumps(r['attacker'])}")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="honest connects a phase")
    parser.add_argument("--sources", type=int, default=64, help="attacker addresses")
    parser.add_argument(
        "--attack-seconds", type=float, default=30.0, help="the attacker stops after this"
    )
    parser.add_argument("--attack", help=argparse.SUPPRESS)  # HOST:PORT: be the attacker
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.attack:
        host, port = arguments.attack.rsplit(":", 1)
        attack((host, int(port)), arguments.sources, arguments.attack_seconds)
    else:
        trio.run(main, arguments)
