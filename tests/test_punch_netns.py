"""Hole punching through the testbed's real NATs (issue 13, item 4): two peers, each in a
cell (public, endpoint-independent NAT, endpoint-dependent NAT, double NAT), exchange
offers (through the test here, through an encrypted session between daemons) and punch
with the daemon's code on real sockets; the path found then carries data both ways.
Two endpoint-dependent NATs cannot be punched: the attempt ends at its deadline, and a
relay carries that pair."""

from __future__ import annotations

import json
import sys

import pytest
from test_netns import ECHO, serving

from p2pd.testing.netns import Host, Testbed, read_line

pytestmark = pytest.mark.netns

MAPPING = {
    "public": "none",
    "eim": "endpoint-independent",
    "symmetric": "endpoint-dependent",
    "double": "endpoint-independent",
}
OBSERVER = "198.18.1.11:3478"


def peer_in(testbed: Testbed, kind: str, n: int) -> Host:
    inet = testbed.lans.get("inet") or testbed.lan("inet", "198.18.0.0/16")
    if kind == "public":
        return testbed.host(f"p{n}", inet, address=f"198.18.{10 + n}.11")
    if kind == "double":
        cgnat = testbed.nat_router(f"cg{n}", inet, inside_subnet=f"100.64.{n}.0/24", kind="eim")
        home = testbed.nat_router(f"h{n}", cgnat.inside, inside_subnet=f"10.{n}.0.0/24")
        return testbed.host(f"c{n}", home.inside)
    router = testbed.nat_router(f"r{n}", inet, inside_subnet=f"10.{n}.0.0/24", kind=kind)  # type: ignore[arg-type]
    return testbed.host(f"c{n}", router.inside)


def punch(a: Host, b: Host, kind_a: str, kind_b: str) -> tuple[dict, dict]:
    procs = []
    for role, (host, kind) in enumerate(((a, kind_a), (b, kind_b))):
        args = [sys.executable, "-m", "p2pd.testing.punch_peer", str(role), MAPPING[kind]]
        args += [OBSERVER, str(host.address), "40000"]
        procs.append(host.popen(args, stdin=-1))
    offers = [json.loads(read_line(p, 15))["offer"] for p in procs]
    for p, offer in zip(procs, reversed(offers), strict=True):
        assert p.stdin is not None
        p.stdin.write(offer + "\n")
        p.stdin.flush()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(read_line(p, 20)) for p in procs]
    return results[0], results[1]


PUNCHABLE = [
    ("eim", "eim"),
    ("public", "symmetric"),
    ("eim", "symmetric"),  # the birthday case
    ("double", "eim"),
    ("double", "symmetric"),
]


@pytest.mark.parametrize(("kind_a", "kind_b"), PUNCHABLE)
def test_a_direct_path_is_punched_and_carries_data_both_ways(
    testbed: Testbed, kind_a: str, kind_b: str
) -> None:
    inet = testbed.lan("inet", "198.18.0.0/16")
    observer = testbed.host("obs", inet, address=OBSERVER.split(":")[0])
    a, b = peer_in(testbed, kind_a, 1), peer_in(testbed, kind_b, 2)
    with serving(observer, ECHO, "3478", 60):
        ra, rb = punch(a, b, kind_a, kind_b)
    assert ra["ok"] and rb["ok"], (ra, rb)
    assert ra["data"] and rb["data"], (ra, rb)  # the path carries data both ways
    assert max(ra["ms"], rb["ms"]) < 5000, (ra, rb)
    # each reached the other's public side, never a private address
    for r in (ra, rb):
        assert r["address"].startswith("198.18."), r
    if kind_b == "symmetric" and kind_a != "public":
        assert rb["socket"] >= 1, rb  # the birthday case: one of b's side sockets won


def test_two_endpoint_dependent_nats_cannot_be_punched(testbed: Testbed) -> None:
    inet = testbed.lan("inet", "198.18.0.0/16")
    observer = testbed.host("obs", inet, address=OBSERVER.split(":")[0])
    a, b = peer_in(testbed, "symmetric", 1), peer_in(testbed, "symmetric", 2)
    with serving(observer, ECHO, "3478", 60):
        ra, rb = punch(a, b, "symmetric", "symmetric")
    assert not ra["ok"] and not rb["ok"], (ra, rb)
    assert ra["stats"].get("port_probes_out", 0) == 0  # no birthday spray: it cannot work
