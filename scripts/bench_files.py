#!/usr/bin/env python3
"""File transfer between two real daemons on loopback, against plain baselines in the
same run (issue 14, scripts/bench_files.py).

    scripts/bench_files.py                 # 256 MB: throughput, CPU, RSS, DM latency
    scripts/bench_files.py --size 64 --dms 20

What it measures, in order:

1. ``cp`` of the file (the disk and page cache: a ceiling no network tool beats).
2. Raw QUIC: the same number of bytes over one stream of our QUIC driver, a sender in
   this process and a sink in a second one (two processes, as the two daemons are), no
   chunk crypto, no hashing, no disk.
3. p2pd: `send_file` to a daemon that auto-accepts (alice and bob pinned each other),
   timed from the offer being queued (the sender has hashed the file) to the sender's
   ``done`` event (the receiver has verified every group, checked the whole file
   against the root and linked it into place). CPU seconds and peak RSS of each daemon.
4. DM latency: ``send`` + ``delivered`` round trips alice -> bob, idle, then while a
   second transfer of the file runs (fair sharing of one QUIC connection).
5. Loss: two in-process nodes whose every QUIC connection crosses a lossy proxy
   (p2pd.testing.proxy), lossless and at 1 % loss both ways, alternating (one process:
   both ends share a core, so compare the two, not with the figures above).

The verification data's overhead is computed from the layout (hash list, per-chunk
frame header, index and AEAD tag). Only 127.0.0.0/8 is used; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
from _bench import percentile, progress_printer
from _files_wormhole import wormhole_seconds

from p2pd.config import FilesConfig, LanConfig, NodeConfig, QuicConfig
from p2pd.control_client import ControlClient
from p2pd.daemon import open_node
from p2pd.files.protocol import HASHES_PER_FRAME, Layout
from p2pd.identity import Identity
from p2pd.testing.daemons import DaemonProcess, p2pd_command, run_cli, short_tempdir
from p2pd.testing.netns import Host, Testbed
from p2pd.testing.proxy import open_lossy_proxy
from p2pd.transport.quic import QuicPeer, QuicStream, open_quic_endpoint
from p2pd.transport.udp import UdpEndpoint
from p2pd.wire import Address

progress = progress_printer("bench_files")
#: The receiver's auto-accept limits, off: a file over `auto_accept_max`, or over a
#: day's quota from one contact (1 GB by default: a 1,024 MB run was held for `accept`
#: and the benchmark waited out its deadline), would wait for `p2pd accept`.
NO_LIMIT = 1 << 40
DEADLINE = 600.0
CHUNK = 1 << 20


def _no_dht(data: bytes, addr: tuple[str, int]) -> None:
    pass


# --------------------------------------------------------------------------- raw QUIC


async def _raw_sink(size: int) -> None:
    """The second process: print our address and key, count what one stream brings,
    answer "1" after the FIN if it was every byte."""
    identity = Identity.generate("sink")
    udp = UdpEndpoint.bind(Address("127.0.0.1", 0))
    done = trio.Event()

    async def sink(peer: QuicPeer, stream: QuicStream) -> None:
        received = 0
        while data := await stream.receive_some():
            received += len(data)
        await stream.send_all(b"1" if received == size else b"0")
        await trio.sleep(0.5)
        done.set()

    with trio.fail_after(DEADLINE):
        async with (
            open_quic_endpoint(udp, identity, QuicConfig(), on_stream=sink) as server,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(udp.serve, _no_dht, server.datagram_received)
            print(f"{udp.local_address.port} {identity.public_key.hex()}", flush=True)
            await done.wait()
            nursery.cancel_scope.cancel()
    udp.close()


async def _raw_send(size: int, port: int, key: bytes) -> float:
    identity = Identity.generate("source")
    udp = UdpEndpoint.bind(Address("127.0.0.1", 0))
    payload = bytes(CHUNK)
    with trio.fail_after(DEADLINE):
        async with (
            open_quic_endpoint(udp, identity, QuicConfig()) as client,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(udp.serve, _no_dht, client.datagram_received)
            peer = await client.connect(Address("127.0.0.1", port), key)
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
                raise SystemExit("raw QUIC: the sink did not receive every byte")
            nursery.cancel_scope.cancel()
    udp.close()
    return elapsed


def raw_quic(size: int) -> float:
    sink = subprocess.Popen(
        [sys.executable, __file__, "--raw-sink", str(size)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert sink.stdout is not None
        port, key = sink.stdout.readline().split()
        return trio.run(_raw_send, size, int(port), bytes.fromhex(key))
    finally:
        sink.wait(30)


# --------------------------------------------------------------------------- loss


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _lossy_once(root: Path, src: Path, drop: float, seed: int) -> float:
    """Seconds for one transfer between two in-process nodes whose every QUIC
    connection crosses a proxy dropping ``drop`` of the datagrams both ways."""
    run = root / f"lossy-{drop}-{seed}"
    ids = {"alice": Identity.generate("alice"), "bob": Identity.generate("bob")}
    ports = {h: _free_port() for h in ids}

    def config(handle: str, proxy: tuple[str, int], bootstrap: tuple[Address, ...]) -> NodeConfig:
        (run / f"{handle}-dl").mkdir(parents=True, exist_ok=True)
        return NodeConfig(
            home=run / handle,
            listen=Address("127.0.0.1", ports[handle]),
            advertise=(Address(*proxy),),
            bootstrap=bootstrap,
            lan=LanConfig(mode="off"),
            files=FilesConfig(
                dir=str(run / f"{handle}-dl"),
                auto_accept_max=NO_LIMIT,
                auto_accept_daily_per_peer=NO_LIMIT,
                auto_accept_daily=NO_LIMIT,
            ),
        )

    with trio.fail_after(DEADLINE):
        async with (
            open_lossy_proxy(("127.0.0.1", ports["alice"]), drop=drop, seed=seed) as pa,
            open_lossy_proxy(("127.0.0.1", ports["bob"]), drop=drop, seed=seed + 1) as pb,
            open_node(config("alice", pa.address, ()), ids["alice"]) as alice,
            open_node(config("bob", pb.address, (alice.listen_address,)), ids["bob"]) as bob,
        ):
            bob.delivery.contacts.pin("alice", ids["alice"].public_key, time.time())
            assert alice.files is not None and bob.files is not None
            t0 = trio.current_time()
            await alice.files.send_file("bob", str(src))
            for _ in range(int(DEADLINE * 50)):
                rows = bob.files.transfers()
                if rows and rows[0]["state"] == "done":
                    break
                await trio.sleep(0.02)
            else:
                raise SystemExit("the lossy transfer did not finish")
            return trio.current_time() - t0


def lossy(root: Path, src: Path, rounds: int) -> dict[str, Any]:
    """Lossless and 1 % loss through the same proxies, alternating, in one process."""
    clean, lossy_s = [], []
    for r in range(rounds):
        progress(f"round {r + 1}: through the proxy, no loss, then 1 % loss")
        clean.append(trio.run(_lossy_once, root, src, 0.0, 10 * r))
        lossy_s.append(trio.run(_lossy_once, root, src, 0.01, 10 * r + 5))
    size = src.stat().st_size
    return {
        "proxy_lossless_MB_s": mb_s(size, statistics.median(clean)),
        "proxy_1pct_loss_MB_s": mb_s(size, statistics.median(lossy_s)),
        "loss_ratio": round(statistics.median(clean) / statistics.median(lossy_s), 3),
    }


# --------------------------------------------------------------------------- daemons


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_pair(
    root: Path, window: int, queue_target_ms: int, hosts: tuple[Host, Host] | None = None
) -> dict[str, DaemonProcess]:
    """alice and bob, pinned to each other; on loopback, or in ``hosts`` (netns)."""
    daemons: dict[str, DaemonProcess] = {}
    for n, handle in enumerate(("alice", "bob")):
        home = root / handle
        proc = run_cli(home, "init", handle, "--no-passphrase")
        if proc.returncode:
            raise SystemExit(proc.stderr)
        (root / f"{handle}-dl").mkdir()
        (home / "config.toml").write_text(
            f'[files]\ndir = "{root / f"{handle}-dl"}"\nauto_accept_max = {NO_LIMIT}\n'
            f"auto_accept_daily_per_peer = {NO_LIMIT}\nauto_accept_daily = {NO_LIMIT}\n"
            f"window_groups = {window}\nqueue_target_ms = {queue_target_ms}\n"
            '[calls]\naudio_in = "tone:440"\naudio_out = "none"\n'
        )
        where: dict[str, Any] = {}
        if hosts is not None:
            where = {"listen": f"{hosts[n].address}:4747", "wrapper": hosts[n].command([])}
        daemons[handle] = DaemonProcess(
            home, bootstrap=[d.listen for d in daemons.values()], **where
        ).wait_ready()
    for sender, recipient in (("alice", "bob"), ("bob", "alice")):
        proc = run_cli(root / sender, "send", recipient, "hi", "--wait", "--timeout", "30")
        if proc.returncode:
            raise SystemExit(proc.stderr)
    deadline = time.monotonic() + 30
    with ControlClient(root / "bob") as bob:  # bob pins alice (checked in the DHT)
        while not any(c["handle"] == "alice" for c in bob.call("contacts")):
            if time.monotonic() > deadline:
                raise SystemExit("bob never pinned alice")
            time.sleep(0.2)
    return daemons


def dm_round_trip(client: ControlClient, events: ControlClient, text: str) -> float:
    """Send one DM and wait for its ``delivered`` event: seconds."""
    t0 = time.perf_counter()
    msg = client.call("send", {"handle": "bob", "text": text})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        event = events.next_event(deadline - time.monotonic())
        if (
            event
            and event.get("event") == "message_status"
            and event.get("id") == msg["id"]
            and event.get("state") == "delivered"
        ):
            return time.perf_counter() - t0
    raise SystemExit("a DM was not delivered within 30 s")


def transfer(root: Path, src: Path, daemons: dict[str, DaemonProcess], dms: int) -> dict[str, Any]:
    """One transfer alice -> bob, with ``dms`` DMs sent one after the other meanwhile."""
    pids = {h: d.proc.pid for h, d in daemons.items()}
    cpu0 = {h: cpu_seconds(p) for h, p in pids.items()}
    latencies: list[float] = []
    with (
        ControlClient(root / "alice", timeout=DEADLINE) as client,
        ControlClient(root / "alice", timeout=DEADLINE) as events,
    ):
        events.subscribe()
        t0 = time.perf_counter()
        sent = client.call("send_file", {"handle": "bob", "path": str(src)})
        t_offered = time.perf_counter()
        done = None
        deadline = time.monotonic() + DEADLINE
        while done is None and time.monotonic() < deadline:
            if len(latencies) < dms:
                latencies.append(dm_round_trip(client, events, f"dm {len(latencies)}"))
                row = client.call("file", {"id": sent["id"]})
                if row["state"] == "done":
                    done = time.perf_counter()
                continue
            event = events.next_event(deadline - time.monotonic())
            if event and event.get("event") == "file" and event.get("id") == sent["id"]:
                if event["state"] == "done":
                    done = time.perf_counter()
                elif event["state"] in ("failed", "rejected", "cancelled"):
                    raise SystemExit(f"transfer ended {event['state']}: {event}")
        if done is None:
            raise SystemExit("the transfer did not finish in time")
    cpu1 = {h: cpu_seconds(p) for h, p in pids.items()}
    return {
        "hash_and_offer_s": t_offered - t0,
        "transfer_s": done - t_offered,
        "total_s": done - t0,
        "cpu_s": {h: round(cpu1[h] - cpu0[h], 2) for h in pids},
        "dm_ms": sorted(x * 1000 for x in latencies),
        "dms_during_transfer": len(latencies),
    }


def shaped_uplink(root: Path, src: Path, args: argparse.Namespace) -> dict[str, Any]:
    """DMs during a transfer over a slow, bloated uplink: alice and bob in network
    namespaces on one LAN, alice's side limited to ``--uplink-mbit`` with a 400 ms queue
    (a token bucket, as a home router's upload), the scavenger on and off."""
    out: dict[str, Any] = {"mbit": args.uplink_mbit, "queue_ms": 400}
    with Testbed() as testbed:
        lan = testbed.lan("up", "10.77.0.0/24")
        hosts = (testbed.host("a", lan), testbed.host("b", lan))
        hosts[0].run(
            ["tc", "qdisc", "add", "dev", hosts[0].interface, "root", "tbf", "rate",
             f"{args.uplink_mbit}mbit", "burst", "32kbit", "latency", "400ms"]
        )  # fmt: skip
        for target in (args.queue_target, 0):
            progress(f"shaped uplink, queue_target_ms {target}: DMs during a transfer")
            run = root / f"up{target}"
            run.mkdir()
            daemons = start_pair(run, args.window, target, hosts)
            try:
                with ControlClient(run / "alice") as c, ControlClient(run / "alice") as ev:
                    ev.subscribe()
                    idle = sorted(dm_round_trip(c, ev, f"i{i}") * 1000 for i in range(args.dms))
                busy = transfer(run, src, daemons, dms=args.dms)
                os.unlink(run / "bob-dl" / src.name)
                heard = call_during_transfer(run, src, 8)
            finally:
                for d in daemons.values():
                    d.stop()
            out[str(target)] = {
                "dm_idle_ms": {"p50": percentile(idle, 50), "p99": percentile(idle, 99)},
                "dm_during_ms": {
                    "p50": percentile(busy["dm_ms"], 50),
                    "p99": percentile(busy["dm_ms"], 99),
                },
                "MB_s": mb_s(src.stat().st_size, busy["transfer_s"]),
                "call": heard,
            }
    return out


def call_during_transfer(run: Path, src: Path, seconds: int) -> dict[str, Any]:
    """A call alice -> bob while alice sends bob the file: what bob heard of alice (her
    audio crosses the uplink the file fills)."""
    with ControlClient(run / "alice", timeout=DEADLINE) as client:
        sent = client.call("send_file", {"handle": "bob", "path": str(src)})
        time.sleep(2.0)  # the transfer builds its queue first
        answer = subprocess.Popen(
            [*p2pd_command(), "--home", str(run / "bob"), "answer", "--wait", "30", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        call = subprocess.run(
            [*p2pd_command(), "--home", str(run / "alice"), "call", "bob", "--duration",
             str(seconds), "--json"],
            capture_output=True, text=True, timeout=seconds + 60,
        )  # fmt: skip
        out, err = answer.communicate(timeout=60)
        if call.returncode or answer.returncode:
            raise SystemExit(f"the call failed: {call.stderr} {err}")
        deadline = time.monotonic() + DEADLINE
        while client.call("file", {"id": sent["id"]})["state"] != "done":
            if time.monotonic() > deadline:
                raise SystemExit("the transfer did not finish in time")
            time.sleep(0.2)
    media = json.loads(out)["media"]
    keys = ("audio_frames_played", "audio_frames_concealed", "jitter_buffer_target_ms",
            "rtt_ms", "loss_pct")  # fmt: skip
    return {k: media.get(k) for k in keys}


def overhead(size: int) -> dict[str, float]:
    layout = Layout.for_size(size)
    hash_list = 32 * layout.groups + 9 * -(-layout.groups // HASHES_PER_FRAME)
    per_chunk = (5 + 8 + 16) * layout.chunks  # frame header, index, Poly1305 tag
    return {
        "hash_list_bytes": hash_list,
        "chunk_overhead_bytes": per_chunk,
        "overhead_pct": round(100 * (hash_list + per_chunk) / max(size, 1), 4),
    }


def mb_s(size: int, seconds: float) -> float:
    return round(size / seconds / 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="MB of random data")
    parser.add_argument("--dms", type=int, default=30, help="DMs timed, idle and during")
    parser.add_argument("--rounds", type=int, default=3, help="raw and p2pd, alternating")
    parser.add_argument("--window", type=int, default=8, help="[files] window_groups")
    parser.add_argument("--queue-target", type=int, default=25, help="[files] queue_target_ms (ms)")
    parser.add_argument(
        "--no-compare", action="store_true",
        help="skip the same transfer with queue_target_ms = 0 (the scavenger off)",
    )  # fmt: skip
    parser.add_argument(
        "--lossy-size", type=int, default=32, help="MB for the 1 %% loss comparison (0: skip)"
    )
    parser.add_argument(
        "--uplink-mbit", type=int, default=0,
        help="also DMs during a transfer over a shaped uplink of this many Mbit/s (netns, root)",
    )  # fmt: skip
    parser.add_argument("--uplink-size", type=int, default=16, help="MB sent over the uplink")
    parser.add_argument(
        "--wormhole", action="store_true",
        help="also magic-wormhole on the same file, each round (installed into "
        ".cache/wormhole-venv on first use; a network namespace, root)",
    )  # fmt: skip
    parser.add_argument("--raw-sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.raw_sink is not None:
        trio.run(_raw_sink, args.raw_sink)
        return
    size = args.size * 1_000_000
    root = short_tempdir("p2pd-bench-files-")
    daemons: dict[str, DaemonProcess] = {}
    try:
        src = root / "payload.bin"
        progress(f"writing {args.size} MB of random data")
        with open(src, "wb") as f:
            for _ in range(size // CHUNK):
                f.write(os.urandom(CHUNK))
            f.write(os.urandom(size % CHUNK))
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        progress("baseline: cp")
        t0 = time.perf_counter()
        shutil.copyfile(src, root / "copy.bin")
        cp_s = time.perf_counter() - t0
        os.unlink(root / "copy.bin")
        progress("starting two daemons")
        daemons = start_pair(root, args.window, args.queue_target)
        # Alternating rounds, medians: the machine is shared, its load moves a lot.
        raws, plains, wormholes = [], [], []
        wormhole_version = ""
        for r in range(args.rounds):
            if args.wormhole:
                progress(f"round {r + 1}: magic-wormhole, same file")
                seconds, wormhole_version = wormhole_seconds(src, root)
                wormholes.append(seconds)
            progress(f"round {r + 1}: raw QUIC stream, two processes")
            raws.append(raw_quic(size))
            progress(f"round {r + 1}: p2pd transfer (no DMs)")
            plains.append(transfer(root, src, daemons, dms=0))
            received = root / "bob-dl" / "payload.bin"
            if hashlib.sha256(received.read_bytes()).hexdigest() != digest:
                raise SystemExit("the received file differs")
            os.unlink(received)
        raw_s = statistics.median(raws)
        plain = sorted(plains, key=lambda p: p["transfer_s"])[len(plains) // 2]
        progress("DM latency, idle")
        with ControlClient(root / "alice") as client, ControlClient(root / "alice") as events:
            events.subscribe()
            idle = sorted(
                dm_round_trip(client, events, f"idle {i}") * 1000 for i in range(args.dms)
            )
        progress("p2pd transfer with DMs")
        busy = transfer(root, src, daemons, dms=args.dms)
        rss = {h: round(peak_rss_mb(d.proc.pid), 1) for h, d in daemons.items()}
        off: dict[str, Any] = {}
        if not args.no_compare and args.queue_target:
            progress("the same with queue_target_ms = 0 (scavenger off): a second pair")
            for d in daemons.values():
                d.stop()
            daemons = {}
            (root / "off").mkdir()
            daemons = start_pair(root / "off", args.window, 0)
            plain_off = transfer(root / "off", src, daemons, dms=0)
            os.unlink(root / "off" / "bob-dl" / "payload.bin")
            busy_off = transfer(root / "off", src, daemons, dms=args.dms)
            off = {
                "p2pd_MB_s": mb_s(size, plain_off["transfer_s"]),
                "p2pd_with_dms_MB_s": mb_s(size, busy_off["transfer_s"]),
                "dm_during_transfer_ms": {
                    "count": busy_off["dms_during_transfer"],
                    "p50": percentile(busy_off["dm_ms"], 50),
                    "p99": percentile(busy_off["dm_ms"], 99),
                },
            }
        uplink: dict[str, Any] = {}
        if args.uplink_mbit:
            small = root / "uplink.bin"
            small.write_bytes(os.urandom(args.uplink_size * 1_000_000))
            uplink = shaped_uplink(root, small, args)
        loss: dict[str, Any] = {}
        if args.lossy_size:
            small = root / "lossy.bin"
            small.write_bytes(os.urandom(args.lossy_size * 1_000_000))
            loss = lossy(root, small, 2)
        result = {
            "size_bytes": size,
            "window_groups": args.window,
            "rounds": args.rounds,
            "raw_quic_MB_s_each": [mb_s(size, s) for s in raws],
            "p2pd_MB_s_each": [mb_s(size, p["transfer_s"]) for p in plains],
            "cp_MB_s": mb_s(size, cp_s),
            "raw_quic_MB_s": mb_s(size, raw_s),
            "p2pd_MB_s": mb_s(size, plain["transfer_s"]),
            "p2pd_vs_raw_quic": round(raw_s / plain["transfer_s"], 3),
            "p2pd_incl_hashing_MB_s": mb_s(size, plain["total_s"]),
            "hash_and_offer_s": round(plain["hash_and_offer_s"], 3),
            "cpu_s": plain["cpu_s"],
            "cpu_s_per_GB": {h: round(v / size * 1e9, 2) for h, v in plain["cpu_s"].items()},
            "peak_rss_MB": rss,
            "verification": overhead(size),
            "dm_idle_ms": {"p50": percentile(idle, 50), "p99": percentile(idle, 99)},
            "dm_during_transfer_ms": {
                "count": busy["dms_during_transfer"],
                "p50": percentile(busy["dm_ms"], 50),
                "p99": percentile(busy["dm_ms"], 99),
            },
            "p2pd_with_dms_MB_s": mb_s(size, busy["transfer_s"]),
            "queue_target_ms": args.queue_target,
            "wormhole": {
                "version": wormhole_version,
                "MB_s_each": [mb_s(size, w) for w in wormholes],
                "MB_s": mb_s(size, statistics.median(wormholes)) if wormholes else None,
            },
            "scavenger_off": off,
            "uplink": uplink,
            "loss": loss,
        }
    finally:
        for d in daemons.values():
            d.stop()
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"file: {args.size} MB of random data, loopback, 2 daemons, window "
        f"{args.window} groups, median of {args.rounds} alternating rounds "
        f"(raw {result['raw_quic_MB_s_each']}, p2pd {result['p2pd_MB_s_each']} MB/s)"
    )
    print(f"  cp                       {result['cp_MB_s']:>8} MB/s")
    print(f"  raw QUIC stream          {result['raw_quic_MB_s']:>8} MB/s  (2 processes, no crypto)")
    print(
        f"  p2pd send-file           {result['p2pd_MB_s']:>8} MB/s  "
        f"= {100 * result['p2pd_vs_raw_quic']:.0f}% of raw QUIC"
    )
    w = result["wormhole"]
    if w["MB_s"]:
        print(
            f"  magic-wormhole           {w['MB_s']:>8} MB/s  ({w['version']}, TCP, direct, "
            f"a namespace; each {w['MB_s_each']}; not graded)"
        )
    print(
        f"  p2pd incl. hashing       {result['p2pd_incl_hashing_MB_s']:>8} MB/s  "
        f"(hash + offer {result['hash_and_offer_s']} s)"
    )
    print(f"  CPU s per GB             {result['cpu_s_per_GB']}")
    print(f"  peak RSS MB              {result['peak_rss_MB']}")
    v = result["verification"]
    print(
        f"  verification data        {v['hash_list_bytes']} B hash list + "
        f"{v['chunk_overhead_bytes']} B per-chunk = {v['overhead_pct']}%"
    )
    print(
        f"  DM idle                  p50 {result['dm_idle_ms']['p50']:.1f} ms  "
        f"p99 {result['dm_idle_ms']['p99']:.1f} ms"
    )
    if loss:
        print(
            f"  through a proxy (in-process, {args.lossy_size} MB): lossless "
            f"{loss['proxy_lossless_MB_s']} MB/s, 1 % loss {loss['proxy_1pct_loss_MB_s']} "
            f"MB/s = {100 * loss['loss_ratio']:.0f}%"
        )
    d = result["dm_during_transfer_ms"]
    if d["count"]:
        print(
            f"  DM during transfer       p50 {d['p50']:.1f} ms  p99 {d['p99']:.1f} ms "
            f"({d['count']} DMs; transfer then {result['p2pd_with_dms_MB_s']} MB/s; "
            f"queue_target_ms {args.queue_target})"
        )
    if uplink:
        print(
            f"  shaped uplink {uplink['mbit']} Mbit/s, {uplink['queue_ms']} ms queue, "
            f"{args.uplink_size} MB (netns):"
        )
        for target in (args.queue_target, 0):
            u = uplink[str(target)]
            graded = "graded" if target else "the baseline, not graded"
            print(
                f"    queue_target_ms {target:<3} DM idle p50 {u['dm_idle_ms']['p50']:.1f} ms; "
                f"during p50 {u['dm_during_ms']['p50']:.1f} ms p99 "
                f"{u['dm_during_ms']['p99']:.1f} ms; {u['MB_s']} MB/s ({graded})"
            )
            c = u["call"]
            print(
                f"      a call meanwhile (8 s, what bob heard): {c['audio_frames_concealed']} "
                f"of {c['audio_frames_played']} frames concealed, jitter buffer "
                f"{c['jitter_buffer_target_ms']} ms, RTT {c['rtt_ms']} ms, loss {c['loss_pct']} %"
            )
    if off:
        d = off["dm_during_transfer_ms"]
        print(
            f"  ... queue_target_ms 0    p50 {d['p50']:.1f} ms  p99 {d['p99']:.1f} ms "
            f"(transfer then {off['p2pd_with_dms_MB_s']} MB/s; alone {off['p2pd_MB_s']} MB/s; "
            "the baseline, not graded)"
        )


if __name__ == "__main__":
    main()
