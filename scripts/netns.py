"""scripts/netns: simulated hosts in network namespaces, for trying p2pd on a LAN or
behind NATs by hand. Run it as scripts/netns (root); see --help.

The testbed itself is p2pd.testing.netns; this is only its command line.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import get_args

from p2pd.testing.netns import (
    DEFAULT_PREFIX,
    Host,
    NatKind,
    NatRouter,
    Testbed,
    TestbedError,
    cleanup_stale,
    netns_available,
    testbed_namespaces,
)

OUTSIDE = "198.51.100.0/24"
MAX_HOSTS = 100

DESCRIPTION = f"""\
Build simulated hosts in Linux network namespaces, joined by a bridge that lives in a
namespace of its own, and remove everything again when done, after a failure or Ctrl-C
too. Nothing is added to this machine's own network, and the hosts have no route to any
real address. Needs root, ip (iproute2), and nft (nftables) for --nat.

Topology: hosts h1..hN on one LAN, {OUTSIDE} (a documentation range,
RFC 5737), addresses .11, .12, ... With --nat KIND, each host hI sits instead
behind its own NAT router rI (on {OUTSIDE}) in 10.I.0.0/24. --public K adds
hosts p1..pK on {OUTSIDE} (a rendezvous or bootstrap node, say); commands
of `run` go to h1..hN only.

NAT kinds: eim = endpoint-independent mapping, port preserving (nft "masquerade");
symmetric = a new random port per destination (nft "masquerade random"; fully-random
(nft "masquerade fully-random") measures the same). Both filter
by address and port. Details: the docstring of p2pd/testing/netns.py.
"""

EPILOG = """\
examples:
  scripts/netns up 3                      three hosts; prints how to enter them
  scripts/netns up 2 --nat eim --public 1
  scripts/netns run 3 -- python3 -c 'import socket; print(socket.gethostname())'
  scripts/netns run 2 --nat symmetric -- sh -c 'ip -brief addr; ip route'
  scripts/netns run 3 -- p2pd daemon --listen {address}:4747
  scripts/netns list                      testbeds on this machine, live or stale
  scripts/netns cleanup                   remove leftovers of crashed runs

In a command of `run`, {host}, {address} and {index} are replaced per host, and the
environment has P2PD_NETNS_HOST, P2PD_NETNS_ADDRESS, P2PD_NETNS_INDEX and
P2PD_NETNS_ADDRESSES (every host's address, comma separated).
"""


def build(tb: Testbed, n: int, nat: NatKind | None, public: int) -> tuple[list[Host], list[Host]]:
    """(the hosts h1..hN, the public hosts p1..pK) in ``tb``."""
    outside = tb.lan("inet", OUTSIDE)
    public_hosts = [tb.host(f"p{i}", outside) for i in range(1, public + 1)]
    hosts = []
    for i in range(1, n + 1):
        if nat is None:
            hosts.append(tb.host(f"h{i}", outside))
        else:
            router = tb.nat_router(f"r{i}", outside, inside_subnet=f"10.{i}.0.0/24", kind=nat)
            hosts.append(tb.host(f"h{i}", router.inside))
    return hosts, public_hosts


def describe(tb: Testbed) -> str:
    lines = [f"testbed {tb.name}", f"{'host':6} {'address':15} {'namespace':40} notes"]
    for host in tb.hosts.values():
        notes = ""
        if host.router is not None:
            notes = f"behind {host.router.name} ({host.router.address})"
        if isinstance(host, NatRouter):
            notes = f"NAT {host.kind} for {host.inside.subnet}"
        lines.append(f"{host.name:6} {host.address!s:15} {host.netns:40} {notes}")
    return "\n".join(lines)


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C does: through cleanup."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then
    # never installs its KeyboardInterrupt handler.
    old = {
        sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def close(tb: Testbed) -> None:
    """Tear down with Ctrl-C ignored, so a second Ctrl-C cannot leave half a testbed."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        tb.close()
    finally:
        signal.signal(signal.SIGINT, old)
    print(f"removed testbed {tb.name}", file=sys.stderr)


def cmd_up(args: argparse.Namespace) -> int:
    tb = Testbed(args.prefix)
    try:
        with signals_as_interrupt():
            build(tb, args.hosts, args.nat, args.public)
            print(describe(tb))
            first = next(iter(tb.hosts.values()))
            print(f"\nenter a host:  ip netns exec {first.netns} bash")
            print("Ctrl-C removes everything.", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    finally:
        close(tb)
    return 0


def _pump(prefix: str, proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(f"[{prefix}] {line}")
        sys.stdout.flush()


def cmd_run(args: argparse.Namespace) -> int:
    command: list[str] = args.command
    tb = Testbed(args.prefix)
    status = 0
    try:
        with signals_as_interrupt():
            hosts, _ = build(tb, args.hosts, args.nat, args.public)
            print(describe(tb), file=sys.stderr, flush=True)
            everyone = ",".join(str(h.address) for h in hosts)
            procs: list[tuple[Host, subprocess.Popen[str], threading.Thread]] = []
            for index, host in enumerate(hosts, 1):
                fields = {"{host}": host.name, "{address}": str(host.address)}
                fields["{index}"] = str(index)
                argv = [_substitute(word, fields) for word in command]
                env = {
                    **os.environ,
                    "P2PD_NETNS_HOST": host.name,
                    "P2PD_NETNS_ADDRESS": str(host.address),
                    "P2PD_NETNS_INDEX": str(index),
                    "P2PD_NETNS_ADDRESSES": everyone,
                }
                proc = host.popen(argv, stderr=subprocess.STDOUT, env=env)
                pump = threading.Thread(target=_pump, args=(host.name, proc), daemon=True)
                pump.start()
                procs.append((host, proc, pump))
            deadline = time.monotonic() + args.timeout
            for host, proc, pump in procs:
                try:
                    code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(f"[{host.name}] still running after {args.timeout} s", file=sys.stderr)
                    status = 1
                    continue
                pump.join(timeout=1.0)
                if code != 0:
                    print(f"[{host.name}] exited with {code}", file=sys.stderr)
                    status = 1
    except KeyboardInterrupt:
        status = 130
    finally:
        close(tb)
    return status


def _substitute(word: str, fields: dict[str, str]) -> str:
    for key, value in fields.items():
        word = word.replace(key, value)
    return word


def cmd_cleanup(args: argparse.Namespace) -> int:
    removed = cleanup_stale(args.prefix, include_live=args.all)
    for name in removed:
        print(f"removed {name}")
    if not removed:
        print("nothing to remove", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for name, pid, alive in sorted(testbed_namespaces(args.prefix)):
        print(f"{name:50} owner pid {pid} ({'running' if alive else 'stale'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/netns",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help="namespace name prefix (default: %(default)s)"
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="COMMAND")

    def topology(p: argparse.ArgumentParser) -> None:
        p.add_argument("hosts", type=int, metavar="N", help=f"number of hosts (1-{MAX_HOSTS})")
        p.add_argument(
            "--nat", choices=get_args(NatKind), help="put each host behind its own NAT router"
        )
        p.add_argument(
            "--public", type=int, default=0, metavar="K", help="add K hosts on the outside LAN"
        )

    up = sub.add_parser("up", help="build N hosts, print them, keep them until Ctrl-C")
    topology(up)
    up.set_defaults(func=cmd_up)
    run = sub.add_parser("run", help="build N hosts, run a command in each at once, remove")
    topology(run)
    run.add_argument(
        "--timeout", type=float, default=60.0, help="seconds before giving up (default: 60)"
    )
    run.set_defaults(func=cmd_run)
    clean = sub.add_parser("cleanup", help="remove namespaces left by crashed runs")
    clean.add_argument(
        "--all", action="store_true", help="remove live testbeds' namespaces too (careful)"
    )
    clean.set_defaults(func=cmd_cleanup)
    lst = sub.add_parser("list", help="list testbed namespaces on this machine")
    lst.set_defaults(func=cmd_list)

    argv = sys.argv[1:] if argv is None else argv
    # Everything after the first "--" is the command for `run`, options and all.
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    args.command = command
    if args.action == "run" and not command:
        parser.error("run needs a command: scripts/netns run N [options] -- CMD [ARG...]")
    if args.action != "run" and command:
        parser.error(f"{args.action} takes no command after --")
    if args.action in ("up", "run") and not (
        1 <= args.hosts <= MAX_HOSTS and 0 <= args.public <= MAX_HOSTS
    ):
        parser.error(f"N and K must lie in 1..{MAX_HOSTS} and 0..{MAX_HOSTS}")
    if args.action != "list":
        reason = netns_available()
        if reason is not None:
            print(f"ERROR: {reason}", file=sys.stderr)
            return 1
    if args.action in ("up", "run"):
        cleanup_stale(args.prefix)
    try:
        return int(args.func(args))
    except TestbedError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
