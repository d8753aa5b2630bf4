"""The IPv6 cell of the testbed (issue 13, item 6; p2pd/testing/netns6.py): a home
router that routes a global /64 (2001:db8::/32, documentation) to its LAN with no NAT
and an outbound-only firewall. What goes out is answered; nothing unsolicited comes in;
and two peers behind two such firewalls reach each other directly by simultaneous open
(hole punching over IPv6, p2pd/transport/punch_driver.py, the daemon's code)."""

from __future__ import annotations

import json
import shutil
import sys
import time

import pytest
from test_netns import LIFETIME, serving

from p2pd.testing.daemons import cli_json, short_tempdir, wait_until
from p2pd.testing.natnet import PORT, send, start_network, status
from p2pd.testing.netns import Host, Testbed, read_line
from p2pd.testing.netns6 import Ipv6Overlay
from p2pd.testing.punch_peer import punch_pair

pytestmark = pytest.mark.netns

#: An IPv6 UDP echo server: answers every datagram with the address it came from.
ECHO6 = r"""
import json, select, socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
while (left := deadline - time.monotonic()) > 0:
    if select.select([s], [], [], left)[0]:
        data, src = s.recvfrom(2048)
        s.sendto(json.dumps({"seen": src[0], "port": src[1]}).encode(), src)
"""

#: Sends one datagram from port argv[1] to [argv[2]]:argv[3] (up to 10 tries) and prints
#: the answer, or null after the tries.
ASK6 = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[1])))
s.settimeout(0.2)
for _ in range(10):
    s.sendto(b"hello", (sys.argv[2], int(sys.argv[3])))
    try:
        print(s.recv(2048).decode(), flush=True)
        break
    except socket.timeout:
        pass
else:
    print("null", flush=True)
"""


def ask(host: Host, port: int, to: object, to_port: int) -> object:
    out = host.run([sys.executable, "-c", ASK6, str(port), str(to), str(to_port)], timeout=10)
    return json.loads(out.stdout)


def ask_together(*asks: tuple[Host, int, object, int]) -> list[object]:
    """:func:`ask`, each at once: a question nobody answers takes its whole 10 tries
    (2 s), so two of them side by side take 2 s, not 4."""
    procs = [
        h.popen([sys.executable, "-c", ASK6, str(p), str(to), str(tp)]) for h, p, to, tp in asks
    ]
    return [json.loads(read_line(proc, 10)) for proc in procs]


def cells(testbed: Testbed) -> tuple[Ipv6Overlay, Host, Host, Host]:
    """A public host on the IPv6 internet and two hosts, each behind its own home
    router (IPv4 masquerade, IPv6 routed with an outbound-only firewall)."""
    inet = testbed.lan("inet", "198.18.0.0/16")
    public = testbed.host("pub", inet, address="198.18.1.11")
    inside = []
    for n in (1, 2):
        router = testbed.nat_router(
            f"r{n}", inet, inside_subnet=f"10.{n}.0.0/24", address=f"198.18.1{n}.1"
        )
        inside.append(testbed.host(f"c{n}", router.inside))
    v6 = Ipv6Overlay(testbed)
    v6.lan(inet, "2001:db8::/64")
    for n in (1, 2):
        router = inside[n - 1].router
        assert router is not None
        v6.firewall(router, f"2001:db8:{n}::/64")
    v6.settle()
    return v6, public, inside[0], inside[1]


def test_an_ipv6_cell_lets_answers_in_and_nothing_else(testbed: Testbed) -> None:
    v6, public, c1, _ = cells(testbed)
    assert str(v6.address(public)) == "2001:db8::1:11"
    assert str(v6.address(c1)) == "2001:db8:1::11"
    with serving(public, ECHO6, 3478, LIFETIME):
        # out and back: the world sees c1's own global address and port (no NAT)
        assert ask(c1, 40000, v6.address(public), 3478) == {
            "seen": "2001:db8:1::11",
            "port": 40000,
        }
    with serving(c1, ECHO6, 5000, LIFETIME):
        # in, unsolicited: the firewall drops it (the echo server never hears it), even
        # from the address and port c1 talked to before, to another port of c1
        unsolicited = (public, 40001, v6.address(c1), 5000)
        after_talking = (public, 3478, v6.address(c1), 5000)
        assert ask_together(unsolicited, after_talking) == [None, None]
    with serving(public, ECHO6, 3478, LIFETIME):
        # and the same inside port is answered again once it sends out
        assert ask(c1, 5000, v6.address(public), 3478) is not None


def test_two_peers_behind_ipv6_firewalls_connect_by_simultaneous_open(
    testbed: Testbed,
) -> None:
    v6, _, c1, c2 = cells(testbed)
    a, b = punch_pair(c1, c2, "ipv6", "ipv6", ipv6=(str(v6.address(c1)), str(v6.address(c2))))
    print(f"IPv6 simultaneous open: {a['ms']} ms / {b['ms']} ms after the agreed start")
    assert a["ok"] and b["ok"], (a, b)
    assert a["address"] == f"[{v6.address(c2)}]:40000", a
    assert b["address"] == f"[{v6.address(c1)}]:40000", b
    assert a["data"] and b["data"], (a, b)  # data both ways over the path found


@pytest.mark.slow
def test_two_daemons_behind_ipv6_firewalls_go_direct_over_ipv6(testbed: Testbed) -> None:
    """Real daemons, dual stack (listening on ``[::]:4747``): alice and bob each behind a
    home router that NATs IPv4 endpoint-dependently (``masquerade random``: no IPv4 hole
    punching between them) and routes IPv6 through an outbound-only firewall
    (p2pd/testing/natnet.py's ``ipv6`` cell). Their records list their global IPv6
    addresses, which nobody can open a connection to, so the first message goes through
    a relay; hole punching then finds the IPv6 path by simultaneous open, and the next
    messages go direct, over IPv6, both ways."""
    root = short_tempdir("p2pd-v6-")
    try:
        daemons = start_network(testbed, root, "ipv6", "ipv6", republish_min=1.0)
        record = cli_json(root / "pub1", "whois", "bob")
        assert f"[2001:db8:2::11]:{PORT}" in record["addresses"], record  # published
        tag = f"v6-{time.time_ns():x}"
        assert send(root, "alice", "bob", f"{tag} 0")["via"] == "relay"  # the firewall

        def upgraded() -> bool:
            return status(root, "bob")["hole_punching"].get("upgrades_direct", 0) >= 1

        assert wait_until(upgraded, 30, interval=0.5), {
            n: status(root, n)["hole_punching"] for n in ("alice", "bob")
        }
        for i, (sender, to) in enumerate((("alice", "bob"), ("bob", "alice"))):
            message = send(root, sender, to, f"{tag} {i + 1}")
            assert message["via"] == "direct", message
        log = daemons["bob"].log
        assert "direct connection at [2001:db8:1::11]:" in log, log[-3000:]  # over IPv6
    finally:
        shutil.rmtree(root, ignore_errors=True)
