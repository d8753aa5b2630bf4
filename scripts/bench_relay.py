"""First messages across two endpoint-dependent NATs, through a relay (issue 13, item 3).
Needs root (network namespaces); builds a throwaway testbed and removes it.

    sudo .venv/bin/python scripts/bench_relay.py --senders 8     # about 2 minutes

Three public daemons (bootstrap nodes and relays) at 198.18.{1,2,3}.11; bob behind one
``masquerade random`` NAT, ``--senders`` daemons behind another, and carol, public. Once
every NATed daemon lists relays in its record, each sender sends a first message to bob
(a handle it never contacted: resolve, circuit, QUIC handshake, X3DH, ack) and then to
carol (the same, direct: the baseline in the same run). Times are from the ``send``
control call to the ``delivered`` event, measured on the sender's control socket. Also
printed: the relays' CPU time and bytes relayed over the run (``/proc/PID/stat``).

Then bulk: sender0 sends a ``--file-mb`` file to bob (through a relay) and to carol
(direct), ``send-file --wait``; printed: throughput each way and the relay's CPU per
relayed Mbit. For this the public daemons run with the relay's bandwidth caps raised
(``[relay] bandwidth`` and ``peer_bandwidth`` 100 MB/s; the defaults, 2 MB/s and
500 kB/s, would measure the cap).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import percentile

from p2pd.control_client import ControlClient
from p2pd.testing.daemons import (
    DaemonProcess,
    cli_json,
    run_cli,
    short_tempdir,
    wait_until,
)
from p2pd.testing.netns import Host, Testbed

PORT = 4747
SEEDS = [f"198.18.{i}.11:{PORT}" for i in (1, 2, 3)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def relayed_bytes(home: Path) -> int:
    return int(cli_json(home, "status")["relay"]["relaying"]["relayed_bytes"])


def first_message(home: Path, to: str, text: str, timeout: float = 60.0) -> tuple[float, str]:
    """Seconds from `send` to `delivered`, and the route."""
    with ControlClient(home, timeout=timeout) as client, ControlClient(home, timeout) as events:
        events.subscribe()
        start = time.monotonic()
        message = client.call("send", {"handle": to, "text": text})
        deadline = start + timeout
        while time.monotonic() < deadline:
            event = events.next_event(deadline - time.monotonic())
            if (
                event is not None
                and event.get("event") == "message_status"
                and event.get("id") == message["id"]
                and event.get("state") == "delivered"
            ):
                took = time.monotonic() - start
                via = client.call("message", {"id": message["id"]})["via"]
                return took, str(via)
    raise SystemExit(f"{home.name} -> {to}: not delivered within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--file-mb", type=int, default=8)
    args = parser.parse_args()
    root = short_tempdir("p2pd-bench-relay-")
    daemons: dict[str, DaemonProcess] = {}
    try:
        with Testbed() as tb:
            inet = tb.lan("inet", "198.18.0.0/16")
            hosts: dict[str, Host] = {
                f"pub{i}": tb.host(f"pub{i}", inet, address=f"198.18.{i}.11") for i in (1, 2, 3)
            }
            hosts["carol"] = tb.host("carol", inet, address="198.18.4.11")
            rb = tb.nat_router(
                "r-b", inet, inside_subnet="10.2.0.0/24", kind="symmetric", address="198.18.11.1"
            )
            rs = tb.nat_router(
                "r-s", inet, inside_subnet="10.3.0.0/24", kind="symmetric", address="198.18.12.1"
            )
            hosts["bob"] = tb.host("bob", rb.inside)
            senders = [f"sender{i}" for i in range(args.senders)]
            for name in senders:
                hosts[name] = tb.host(name, rs.inside)
            for name, host in hosts.items():
                assert run_cli(root / name, "init", name, "--no-passphrase").returncode == 0
                if name.startswith("pub") or name == "carol":
                    (root / name / "config.toml").write_text(
                        "[relay]\nbandwidth = 100000000\npeer_bandwidth = 100000000\n"
                    )
                daemons[name] = DaemonProcess(
                    root / name,
                    listen=f"0.0.0.0:{PORT}",
                    bootstrap=[s for s in SEEDS if not s.startswith(f"{host.address}:")],
                    lan="off",
                    wrapper=host.command([]),
                ).wait_ready(60.0)
            natted = ["bob", *senders]
            started = time.monotonic()

            def relays_listed() -> bool:
                try:
                    return all(cli_json(root / "pub1", "whois", n).get("relays") for n in natted)
                except RuntimeError:  # a record not found yet
                    return False

            if not wait_until(relays_listed, 180.0, interval=2.0):
                raise SystemExit("the NATed daemons did not list relays within 180 s")
            print(f"every NATed daemon lists relays {time.monotonic() - started:.1f} s "
                  "after the last daemon started")  # fmt: skip
            relays = {p: daemons[p].proc.pid for p in ("pub1", "pub2", "pub3", "carol")}
            cpu_before = {p: cpu_seconds(pid) for p, pid in relays.items()}
            relayed, direct = [], []
            for name in senders:
                took, via = first_message(root / name, "bob", f"hello bob from {name}")
                relayed.append(took)
                took_direct, via_direct = first_message(root / name, "carol", "hello carol")
                direct.append(took_direct)
                print(f"{name}: to bob {took * 1000:.0f} ms via {via}; "
                      f"to carol {took_direct * 1000:.0f} ms via {via_direct}")  # fmt: skip
            cpu = {p: cpu_seconds(pid) - cpu_before[p] for p, pid in relays.items()}
            stats = {p: cli_json(root / p, "status")["relay"]["relaying"] for p in relays}
            bulk = root / "bulk.bin"
            bulk.write_bytes(os.urandom(args.file_mb << 20))
            rates = {}
            for to in ("bob", "carol"):
                before = {
                    p: (cpu_seconds(pid), relayed_bytes(root / p)) for p, pid in relays.items()
                }
                start = time.monotonic()
                out = run_cli(root / "sender0", "send-file", to, str(bulk), "--wait",
                              "--timeout", "300", timeout=330)  # fmt: skip
                took = time.monotonic() - start
                if out.returncode != 0:
                    raise SystemExit(f"send-file to {to} failed: {out.stderr}")
                rates[to] = (args.file_mb << 20) * 8 / took / 1e6
                moved = {p: relayed_bytes(root / p) - before[p][1] for p in relays}
                busiest = max(moved, key=lambda p: moved[p])
                used = cpu_seconds(relays[busiest]) - before[busiest][0]
                mbit = moved[busiest] * 8 / 1e6
                per_mbit = (
                    f" ({used / mbit * 1000:.1f} ms CPU per relayed Mbit)" if mbit > 1 else ""
                )
                print(f"bulk {args.file_mb} MiB sender0 -> {to}: {took:.1f} s, "
                      f"{rates[to]:.1f} Mbit/s; busiest relay {busiest}: {mbit:.1f} Mbit "
                      f"relayed, {used:.2f} CPU s{per_mbit}")  # fmt: skip
        for label, values in (("through a relay (two EDM NATs)", relayed), ("direct", direct)):
            values.sort()
            p50, p95 = statistics.median(values), percentile(values, 95)
            print(f"first message, {label}: n={len(values)} p50 {p50 * 1000:.0f} ms "
                  f"p95 {(p95 or 0) * 1000:.0f} ms max {values[-1] * 1000:.0f} ms")  # fmt: skip
        total = sum(s["relayed_bytes"] for s in stats.values())
        print(
            f"relays: {total} bytes relayed, CPU "
            + ", ".join(f"{p} {cpu[p]:.2f} s ({stats[p]['relayed_bytes']} B)" for p in relays)
        )
        print("issue 13 goal: first message across two NATs p50 < 1 s, p95 < 3 s")
    finally:
        for d in daemons.values():
            d.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
