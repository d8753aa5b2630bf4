"""The NAT cells of the testbed (issue 13): public, endpoint-independent NAT,
endpoint-dependent NAT (``masquerade random`` and ``fully-random``), and a double NAT (a
home NAT behind a carrier-grade NAT in 100.64.0.0/10), each shown to behave as named by
two observers in distinct /24s; and the routers' UDP mapping timeouts, read and measured.
"""

from __future__ import annotations

import ipaddress
import json
import time

import pytest
from test_netns import ECHO, LIFETIME, PROBE, python, serving

from p2pd.testing.netns import CGNAT_RANGE, Host, NatRouter, Testbed

pytestmark = pytest.mark.netns

CELLS = ["public", "eim", "symmetric", "fully-random", "double"]


def cell(testbed: Testbed, kind: str) -> tuple[Host, Host, Host, str]:
    """Two observers in distinct /24s of one simulated internet, and a client in ``kind``;
    also the address the world should see the client from."""
    inet = testbed.lan("inet", "198.18.0.0/16")
    s1 = testbed.host("s1", inet, address="198.18.1.11")
    s2 = testbed.host("s2", inet, address="198.18.2.11")
    if kind == "public":
        client = testbed.host("c1", inet, address="198.18.3.11")
        return s1, s2, client, str(client.address)
    if kind == "double":
        cgnat = testbed.nat_router("cgnat", inet, inside_subnet="100.64.0.0/24", kind="eim")
        home = testbed.nat_router("home", cgnat.inside, inside_subnet="10.1.0.0/24")
        assert ipaddress.ip_address(home.address) in CGNAT_RANGE
        client = testbed.host("c1", home.inside)
        return s1, s2, client, str(cgnat.address)
    router = testbed.nat_router("r1", inet, inside_subnet="10.1.0.0/24", kind=kind)  # type: ignore[arg-type]
    client = testbed.host("c1", router.inside)
    return s1, s2, client, str(router.address)


@pytest.mark.parametrize("kind", CELLS)
def test_each_cell_maps_as_named(testbed: Testbed, kind: str) -> None:
    s1, s2, client, outside = cell(testbed, kind)
    dests = [f"{s1.address}:3478", f"{s2.address}:3478", f"{s2.address}:3479"]
    with serving(s1, ECHO, "3478", LIFETIME), serving(s2, ECHO, "3478,3479", LIFETIME):
        seen = json.loads(python(client, PROBE, 40000, *dests))
    assert all(seen[d] is not None for d in dests), seen
    hosts = {seen[d].rsplit(":", 1)[0] for d in dests}
    ports = [int(seen[d].rsplit(":", 1)[1]) for d in dests]
    assert hosts == {outside}, seen  # never an inside (10/8 or 100.64/10) address
    if kind in ("public", "eim", "double"):
        # public: no mapping at all; eim and double: one mapping for every destination,
        # and the port kept through both NATs of the double NAT
        assert ports == [40000, 40000, 40000], seen
    else:
        # endpoint-dependent: a new random port per destination (the three equal by
        # chance: about 1 in 64512**2; two equal: about 3 in 64512)
        assert len(set(ports)) == 3, seen


def test_udp_mapping_timeouts(testbed: Testbed) -> None:
    """What the kernel's routers keep an idle UDP mapping for, and that a mapping really
    goes away after ``mapping_timeout`` (measured on the conntrack table)."""
    s1, _, _, _ = cell(testbed, "public")
    inet = s1.lan
    default = testbed.nat_router("r1", inet, inside_subnet="10.1.0.0/24")
    short = testbed.nat_router("r2", inet, inside_subnet="10.2.0.0/24", mapping_timeout=2)
    assert default.udp_timeouts() == {"udp": 30, "stream": 120}
    assert short.udp_timeouts() == {"udp": 2, "stream": 2}
    client = testbed.host("c2", short.inside)
    with serving(s1, ECHO, "3478", LIFETIME):
        seen = json.loads(python(client, PROBE, 40000, f"{s1.address}:3478"))
        assert seen == {f"{s1.address}:3478": f"{short.address}:40000"}
        opened = time.monotonic()
        assert _entries(short, 40000), short.conntrack()
        while _entries(short, 40000) and time.monotonic() - opened < 10:
            time.sleep(0.1)  # polling a kernel table: no event to wait on
        lived = time.monotonic() - opened
    assert not _entries(short, 40000)
    assert 1.0 <= lived <= 5.0, lived


def _entries(router: NatRouter, port: int) -> list[str]:
    return [line for line in router.conntrack().splitlines() if f"sport={port} " in line]


def test_a_conntrack_flush_forgets_every_mapping(testbed: Testbed) -> None:
    """What the recovery tests do to a router (issue 13, item 5): flushing its conntrack
    table (p2pd/testing/conntrack.py, ctnetlink) forgets the mapping, so the same inside
    socket shows the world a new random port behind ``masquerade random``; without the
    flush the mapping holds."""
    s1, _, client, _ = cell(testbed, "symmetric")
    router = client.router
    assert router is not None
    dest = f"{s1.address}:3478"
    with serving(s1, ECHO, "3478", LIFETIME):
        first = json.loads(python(client, PROBE, 40000, dest))[dest]
        again = json.loads(python(client, PROBE, 40000, dest))[dest]
        assert first is not None and again == first  # the mapping holds (30 s idle)
        assert _entries(router, 40000)
        counts = router.flush_conntrack()
        assert counts["before"] >= 1 and counts["after"] == 0, counts
        assert not _entries(router, 40000)
        after = json.loads(python(client, PROBE, 40000, dest))[dest]
    assert after is not None and after != first, (first, after)  # a new mapping
