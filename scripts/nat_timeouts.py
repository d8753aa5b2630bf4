"""How long the testbed's NAT routers keep an idle UDP mapping (issue 13: what a NATed
daemon's keepalives must beat). Needs root; builds a throwaway testbed and removes it.

    sudo .venv/bin/python scripts/nat_timeouts.py        # about 2.5 minutes

Prints the router's conntrack sysctls and, measured on its conntrack table, how long a
mapping lives after its last packet: (a) a flow answered once, (b) a flow that went both
ways for longer than 2 s (Linux calls that a UDP "stream" and gives it the longer
timeout; a flow whose exchanges all fall within 2 s keeps the short one).
"""

from __future__ import annotations

import sys
import time

from p2pd.testing.netns import Host, Testbed, read_line

ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 3478))
print("ready", flush=True)
while True:
    data, src = s.recvfrom(2048)
    s.sendto(data, src)
"""

# sport, dest, count, gap: `count` request/reply exchanges `gap` seconds apart.
EXCHANGE = r"""
import socket, sys, time
sport, host, count, gap = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport))
s.settimeout(1.0)
for i in range(count):
    s.sendto(b"x", (host, 3478))
    s.recvfrom(2048)
    if i + 1 < count:
        time.sleep(gap)
"""

LIMIT = 300.0


def exchange(host: Host, sport: int, dest: str, count: int, gap: float) -> None:
    host.run([sys.executable, "-c", EXCHANGE, str(sport), dest, str(count), str(gap)])


def main() -> None:
    with Testbed() as tb:
        inet = tb.lan("inet", "198.18.0.0/16")
        server = tb.host("s1", inet, address="198.18.1.11")
        router = tb.nat_router("r1", inet, inside_subnet="10.1.0.0/24")
        client = tb.host("c1", router.inside)
        print("sysctl (s):", router.udp_timeouts())
        echo = server.popen([sys.executable, "-c", ECHO])
        assert read_line(echo, 5.0) == "ready"
        dest = str(server.address)
        last = {}
        exchange(client, 40000, dest, 1, 0.0)  # (a)
        last[40000] = time.monotonic()
        exchange(client, 40001, dest, 3, 1.5)  # (b): 3 s both ways
        last[40001] = time.monotonic()
        gone: dict[int, float] = {}
        while len(gone) < 2 and time.monotonic() - last[40000] < LIMIT:
            table = router.conntrack()
            for port in (40000, 40001):
                if port not in gone and f"sport={port} " not in table:
                    gone[port] = round(time.monotonic() - last[port], 1)
            time.sleep(0.5)  # a kernel table: nothing to wait on but time
        print("mapping lives after its last packet (s):")
        print(f"  answered once:               {gone.get(40000, f'> {LIMIT}')}")
        print(f"  both ways for 3 s (a stream): {gone.get(40001, f'> {LIMIT}')}")


if __name__ == "__main__":
    main()
