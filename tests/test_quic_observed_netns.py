"""Address discovery without DHT replies, between real daemons behind real NATs (issue 13,
items 1 and 2).

Item 1: alice sits behind an endpoint-independent NAT (``masquerade``) with the DHT
replies' ``observed`` addresses switched off (``[dht] observe_replies = false``), so the
only evidence of where the world sees her is what her QUIC peers report. She messages
two public daemons in two /24s; each tells her, on that connection, the address it sees
her at, and ``p2pd status`` shows the NAT's address as her reflexive address, seen by
two observers, and the mapping kind endpoint-independent. (With the reports gone, as in
p2pd before them, her mapping stays ``unknown`` and no reflexive address shows.)

Item 2: alice and bob, each behind such a NAT, both with DHT observations off, so that
neither knows its reflexive address and each offers only its 10.x address for hole
punching. Their dial-backs find them unreachable, so they register with relays; alice's
message goes through bob's relay, and the relay tells each end where it sees the other
(SEEN). The upgrade to a direct connection can only find the NATs' addresses there."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pd.errors import P2PDError
from p2pd.testing.daemons import DaemonProcess, control_call, short_tempdir, wait_until
from p2pd.testing.natnet import CONFIG, PUBLIC, peer_host, send, start_daemons, status
from p2pd.testing.netns import Testbed

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture()
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-qaddr-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_natted_daemon_learns_its_address_from_quic_peers_alone(
    testbed: Testbed, root: Path
) -> None:
    inet = testbed.lan("inet", "198.18.0.0/16")
    hosts = {f"pub{i}": testbed.host(f"pub{i}", inet, address=ip) for i, ip in enumerate(PUBLIC, 1)}
    hosts["alice"] = peer_host(testbed, "eim", 1)  # behind 198.18.11.1
    daemons: list[DaemonProcess] = []
    try:
        config = CONFIG + "[dht]\nobserve_replies = false\n"
        started = start_daemons(root, hosts, configs={n: config for n in hosts}, extra=())
        daemons = list(started.values())
        before = status(root, "alice")
        assert before["nat_mapping"] == "unknown", before
        assert before["reflexive_addresses"] == []

        for to in ("pub1", "pub2"):  # two observers, in 198.18.1.0/24 and 198.18.2.0/24
            assert send(root, "alice", to, f"hello {to}")["via"] == "direct"

        def learnt() -> bool:
            return status(root, "alice")["nat_mapping"] == "endpoint-independent"

        assert wait_until(learnt, 15.0, interval=0.5), status(root, "alice")
        seen = status(root, "alice")
        top = seen["reflexive_addresses"][0]
        assert top["address"].startswith("198.18.11.1:"), seen["reflexive_addresses"]
        assert top["observers"] == 2
        assert seen["public_address"] == top["address"]
        assert seen["dht_counters"].get("observed", 0) == 0  # no DHT reply counted
        assert seen["dht_counters"]["observed_quic"] >= 2
        assert seen["quic_counters"]["quic_observed_received"] >= 2
    finally:
        for daemon in daemons:
            daemon.stop()


def _start(testbed: Testbed, root: Path, peers: dict[str, str]) -> list[DaemonProcess]:
    """Three public daemons and ``peers`` (name -> cell kind), all with DHT observations
    off; the caller stops them."""
    inet = testbed.lan("inet", "198.18.0.0/16")
    hosts = {f"pub{i}": testbed.host(f"pub{i}", inet, address=ip) for i, ip in enumerate(PUBLIC, 1)}
    for n, (name, kind) in enumerate(peers.items(), 1):
        hosts[name] = peer_host(testbed, kind, n)
    # republish_min: a record that lists relays a second after the registration, not 10 s;
    # dialback_wait: a NATed daemon (whose mapping QUIC alone does not show) registers
    # with relays once its dial-back round ends unanswered, 2 s after it began, not 5 s
    # (the tests claim neither time)
    config = CONFIG + (
        "[node]\nrepublish_min = 1.0\n[dht]\nobserve_replies = false\ndialback_wait = 2.0\n"
    )
    return list(start_daemons(root, hosts, configs={n: config for n in hosts}, extra=()).values())


def test_hole_punching_finds_the_address_only_the_relay_saw(testbed: Testbed, root: Path) -> None:
    daemons = _start(testbed, root, {"alice": "eim", "bob": "eim"})
    try:

        def relayed(name: str) -> bool:
            # (what `p2pd whois` prints, through pub1's control socket: a CLI process per
            # look cost about 0.5 s of CPU, and they were 1 s apart)
            try:
                seen = control_call(root / "pub1", "whois", {"handle": name})
            except P2PDError:  # not published yet
                return False
            return len(seen.get("relays", [])) >= 2

        for name in ("alice", "bob"):
            assert wait_until(lambda n=name: relayed(n), 90.0, interval=0.25), status(root, name)
            own = status(root, name)
            assert own["reachability"] == "unreachable", own
            assert own["reflexive_addresses"] == [], own  # its offer: 10.x only

        first = send(root, "alice", "bob", "through the relay first")
        assert first["via"] == "relay", first

        def upgraded() -> bool:
            return status(root, "bob")["hole_punching"].get("upgrades_direct", 0) >= 1

        assert wait_until(upgraded, 90.0, interval=0.5), {
            n: status(root, n)["hole_punching"] for n in ("alice", "bob")
        }
        assert send(root, "alice", "bob", "now direct")["via"] == "direct"
        for name in ("alice", "bob"):
            punching = status(root, name)["hole_punching"]
            assert punching["relay_seen_candidates"] >= 1, (name, punching)
        # Once direct, each peer's QUIC report tells the other its NAT's address (item 1).
        assert status(root, "alice")["reflexive_addresses"][0]["address"] == "198.18.11.1:4747"
    finally:
        for daemon in daemons:
            daemon.stop()
