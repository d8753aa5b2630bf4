"""Hole punching through the testbed's real NATs (issue 13, item 4): two peers, each in a
cell (public, endpoint-independent NAT, endpoint-dependent NAT, double NAT), exchange
offers (through the test here, through an encrypted session between daemons) and punch
with the daemon's code on real sockets; the path found then carries data both ways.
Two endpoint-dependent NATs cannot be punched: the attempt ends at its deadline, and a
relay carries that pair."""

from __future__ import annotations

from typing import Any

import pytest

from p2pd.testing.natnet import peer_host
from p2pd.testing.netns import Testbed
from p2pd.testing.punch_peer import observer, punch_pair
from p2pd.transport.punch import PunchConfig

pytestmark = pytest.mark.netns

PUNCHABLE = [
    ("eim", "eim"),
    ("public", "symmetric"),
    ("eim", "symmetric"),  # the birthday case
    ("double", "eim"),
    ("double", "fully-random"),
]


@pytest.mark.parametrize(("kind_a", "kind_b"), PUNCHABLE)
def test_a_direct_path_is_punched_and_carries_data_both_ways(
    testbed: Testbed, kind_a: str, kind_b: str
) -> None:
    observer(testbed)
    a, b = peer_host(testbed, kind_a, 1), peer_host(testbed, kind_b, 2)
    birthday = kind_a != "public" and kind_b in ("symmetric", "fully-random")
    ra, rb = punch_pair(a, b, kind_a, kind_b)
    port_probes = ra["stats"].get("port_probes_out", 0)
    if birthday and not ra["ok"] and missed_by_chance(ra, rb):
        # 257 mappings (256 side sockets and the main one) among 64,512 ports and 1,024
        # distinct probes: an attempt misses all of them by chance once in 61 (1.6 %).
        # Measured on this testbed, under load too (scripts/bench_punch.py --hits,
        # docs/BENCHMARKS.md): about 4 hits an attempt, and all but 2 of some 600
        # probes that met a mapping got through, so a miss is that chance; with two
        # birthday cases it failed about one clean-clone CI run in 30. The daemon tries
        # a missed attempt again 1 s later (p2pd/relay/upgrade.py, RETRY_DELAYS), and so
        # does the test, once: two misses in a row are one chance in 3,700. With the
        # spray aimed wrong (side sockets sending to the port next to a's) both
        # attempts missed in 6 runs of 6.
        first = (ra, rb)
        ra, rb = punch_pair(a, b, kind_a, kind_b)
        port_probes += ra["stats"].get("port_probes_out", 0)
        print(f"birthday: the first attempt missed, the second {ra['ok']}: {first}")
    assert ra["ok"] and rb["ok"], (ra, rb)
    assert ra["data"] and rb["data"], (ra, rb)  # the path carries data both ways
    assert max(ra["ms"], rb["ms"]) < 5000, (ra, rb)
    # each reached the other's public side, never a private address
    for r in (ra, rb):
        assert r["address"].startswith("198.18."), r
    if birthday:
        # the birthday case: b sprayed from its 256 side sockets and a probed random
        # ports; any of b's 257 mappings may be the one hit (a clean-clone CI run hit
        # b's main socket: 1 chance in 257), so the spray is what is checked
        assert rb["stats"].get("side_probes_out", 0) >= 256, rb
        # (counted over both attempts: a second one can meet a mapping the first left
        # open and confirm before a's own spray starts, and a's initiator then stops at
        # once, not 0.3 s later: a clean-clone run, 2026-12-05, port_probes_out 0 then)
        assert port_probes > 0, ra


def missed_by_chance(ra: dict[str, Any], rb: dict[str, Any]) -> bool:
    """A birthday attempt that ran its course and missed: every random port probed and
    every side socket sprayed, nothing of the other side's came in (a miss for any other
    reason, e.g. a side that never started, is not retried)."""
    return (
        ra["stats"].get("port_probes_out", 0) == PunchConfig().port_probes
        and rb["stats"].get("side_probes_out", 0) >= PunchConfig().side_sockets
        and not any(k.endswith("_in") for r in (ra, rb) for k in r["stats"])
    )


def test_two_endpoint_dependent_nats_cannot_be_punched(testbed: Testbed) -> None:
    observer(testbed)
    a, b = peer_host(testbed, "symmetric", 1), peer_host(testbed, "symmetric", 2)
    # 1.5 s, not the daemon's 5 s: behind two endpoint-dependent NATs each side's probes
    # leave from a mapping made for that destination alone, which the other side's
    # probes never match, so every round of probes (one each 0.1 s) meets what the first
    # met. 15 rounds each way, from a start both sides share, is the evidence; the other
    # 35 rounds were the same again
    ra, rb = punch_pair(a, b, "symmetric", "symmetric", duration=1.5)
    assert not ra["ok"] and not rb["ok"], (ra, rb)
    assert ra["stats"].get("port_probes_out", 0) == 0  # no birthday spray: it cannot work
