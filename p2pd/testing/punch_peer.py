"""One side of a hole-punch attempt on real sockets, for tests and benchmarks in network
namespaces (tests/test_punch_netns.py, scripts/bench_punch.py).

``python -m p2pd.testing.punch_peer ROLE MAPPING OBSERVER LOCAL_IP PORT [DURATION]``: binds one UDP
socket on PORT (an IPv6 one when LOCAL_IP is IPv6), asks OBSERVER (an echo server that
answers with the address it saw, tests/test_netns.py's ECHO) for its reflexive address
(OBSERVER ``-``: no NAT to ask about, LOCAL_IP is the only candidate, as behind an IPv6
firewall), prints its offer as a JSON line, reads the peer's offer (a line of hex) and
then a line "go" from stdin, punches (p2pd/transport/punch_driver.py, the daemon's
code), sends a few data datagrams over the path it found and prints one JSON line:
whether a path was found, on which socket, to which address, how long it took, and
whether the peer's data came back over it. DURATION (seconds) shortens the attempt from
the daemon's 5 s (PunchConfig.duration), for a test that proves a failure.

The two offers travel through the test here, in place of the encrypted session that
carries them between daemons. :func:`punch_pair` runs both sides of two hosts in the testbed's cells
(p2pd/testing/natnet.py's ``peer_host``); :data:`OBSERVER_SCRIPT` is the echo server they ask.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

import trio

from ..transport.punch import PUNCH_BYTE, PunchConfig, PunchOffer, make_plan
from ..transport.punch_driver import PunchRunner, send_quietly
from ..wire import Address
from .netns import Host, Testbed, read_line

DATA = b"D"  # first byte of the test's data datagrams (a byte no punch datagram has)
DATA_WAIT = 3.0


#: The mapping kind a peer in each testbed cell reports (what reachability would find).
MAPPING = {
    "public": "none",
    "eim": "endpoint-independent",
    "symmetric": "endpoint-dependent",
    "fully-random": "endpoint-dependent",
    "double": "endpoint-independent",
    "ipv6": "none",  # no NAT: a firewall that lets in only what went out
}
OBSERVER = ("198.18.1.11", 3478)
#: Answers every datagram with the address it came from, as JSON (a STUN server's job).
OBSERVER_SCRIPT = r"""
import json, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 3478))
print("ready", flush=True)
for _ in range(1 << 30):
    data, src = s.recvfrom(2048)
    s.sendto(json.dumps({"seen": f"{src[0]}:{src[1]}"}).encode(), src)
"""


def observer(testbed: Testbed) -> Host:
    """The internet (198.18.0.0/16) and an observer on it, serving until the testbed ends."""
    inet = testbed.lans.get("inet") or testbed.lan("inet", "198.18.0.0/16")
    host = testbed.host("obs", inet, address=OBSERVER[0])
    proc = host.popen([sys.executable, "-c", OBSERVER_SCRIPT])
    if read_line(proc, 10) != "ready":
        raise RuntimeError("the observer did not start")
    return host


def punch_pair(
    a: Host,
    b: Host,
    kind_a: str,
    kind_b: str,
    *,
    ipv6: tuple[str, str] | None = None,
    duration: float | None = None,
    blind: bool = False,
) -> tuple[dict[str, Any], ...]:
    """Run both sides (a initiates), handing each the other's offer; their result lines,
    once both processes ended (their port is free for another attempt).
    ``ipv6``: the two hosts' IPv6 addresses, to punch over IPv6 with no observer (no NAT;
    ``kind`` "ipv6": an outbound-only firewall, p2pd/testing/netns6.py). ``duration``:
    each side's attempt lasts this long (default: the daemon's, PunchConfig.duration).
    ``blind``: b gets a's offer with another key, so every probe of a's that gets
    through b's NAT is refused (b's ``refused_tag``) instead of ending the attempt: both
    sides run to the deadline, and b's ``refused_tag`` counts the hits of a whole attempt
    (scripts/bench_punch.py --hits)."""
    procs = []
    for role, (host, kind) in enumerate(((a, kind_a), (b, kind_b))):
        args = [sys.executable, "-m", "p2pd.testing.punch_peer", str(role), MAPPING[kind]]
        if ipv6 is None:
            args += [f"{OBSERVER[0]}:{OBSERVER[1]}", str(host.address), "40000"]
        else:
            args += ["-", ipv6[role], "40000"]
        if duration is not None:
            args.append(str(duration))
        procs.append(host.popen(args, stdin=-1))
    offers = [json.loads(read_line(p, 15))["offer"] for p in procs]
    given_b = offers[0]
    if blind:  # the key's 32 bytes follow the version byte and the 8-byte session
        offer = bytes.fromhex(given_b)
        given_b = (offer[:9] + bytes(32) + offer[41:]).hex()
    for p, line in zip(procs, (offers[1], given_b), strict=True):
        assert p.stdin is not None
        p.stdin.write(line + "\n")
        p.stdin.flush()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = tuple(json.loads(read_line(p, 20)) for p in procs)
    for p in procs:
        p.wait(10)
    return results


def reflexive(sock: socket.socket, observer: tuple[str, int]) -> Address:
    sock.settimeout(0.2)
    for _ in range(25):
        sock.sendto(b"probe", observer)
        try:
            data, src = sock.recvfrom(2048)
        except TimeoutError:
            continue
        if src[:2] == observer:
            host, port = json.loads(data)["seen"].rsplit(":", 1)
            return Address(host, int(port))
    raise SystemExit("no answer from the observer")


async def punch(
    sock: socket.socket,
    role: int,
    mine: PunchOffer,
    theirs: PunchOffer,
    config: PunchConfig | None = None,
) -> dict[str, Any]:
    bind_host = "::" if sock.family == socket.AF_INET6 else "0.0.0.0"
    send = lambda data, addr: send_quietly(sock, data, addr)  # noqa: E731
    runner = PunchRunner(send, bind_host, config=config)
    got_data: dict[int, bytes] = {}

    async def receive(s: socket.socket, index: int) -> None:
        for _ in range(1 << 20):
            await trio.lowlevel.wait_readable(s)
            try:
                data, addr = s.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                continue
            if data[:1] == bytes([PUNCH_BYTE]) and index == 0:
                runner.datagram_received(data, addr[:2])
            elif data[:1] == DATA:
                got_data[index] = data

    sock.setblocking(False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive, sock, 0)
        start = trio.current_time() + 0.05
        plan = make_plan(mine, theirs, initiator=role == 0, start=start, config=config)
        outcome = await runner.attempt(plan)
        out: dict[str, Any] = {"ok": outcome.result is not None, "stats": outcome.stats}
        if outcome.result is not None:
            result = outcome.result
            path_sock = outcome.side_socket or sock
            if outcome.side_socket is not None:
                outcome.side_socket.setblocking(False)
                nursery.start_soon(receive, outcome.side_socket, result.socket)
            out.update(socket=result.socket, address=str(result.address))
            out["ms"] = round((result.at - start) * 1000, 1)
            with trio.move_on_after(DATA_WAIT):
                for _ in range(int(DATA_WAIT / 0.05)):
                    send_quietly(path_sock, DATA + bytes([role]), result.address.as_tuple())
                    if result.socket in got_data:
                        break
                    await trio.sleep(0.05)
            # a few more, for a peer that is still waiting for ours
            for _ in range(5):
                send_quietly(path_sock, DATA + bytes([role]), result.address.as_tuple())
                await trio.sleep(0.02)
            out["data"] = got_data.get(result.socket) == DATA + bytes([1 - role])
        nursery.cancel_scope.cancel()
    return out


def main(argv: list[str]) -> None:
    role, mapping, observer, local_ip = int(argv[0]), argv[1], argv[2], argv[3]
    port = int(argv[4])
    config = PunchConfig(duration=float(argv[5])) if len(argv) > 5 else None
    v6 = ":" in local_ip
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("::" if v6 else "0.0.0.0", port))
    local = Address(local_ip, port)
    if observer == "-":
        seen = local
    else:
        obs_host, obs_port = observer.rsplit(":", 1)
        seen = reflexive(sock, (obs_host, int(obs_port)))
    candidates = [seen] if seen == local else [local, seen]
    mine = PunchOffer.new(mapping, candidates)
    print(json.dumps({"offer": mine.encode().hex(), "seen": str(seen)}), flush=True)
    theirs = PunchOffer.decode(bytes.fromhex(sys.stdin.readline().strip()))
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected go")
    print(json.dumps(trio.run(punch, sock, role, mine, theirs, config)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
