"""A NAT that forgets its mappings, between real daemons (issue 13, item 5): alice and
bob each behind an endpoint-dependent NAT (``masquerade random``), so they talk through
a relay; bob's router then flushes its conntrack table, as a reboot would
(p2pd/testing/conntrack.py). Every mapping bob had is gone and his next packets get new
random ports: the relays' registrations and circuits point at nothing until bob notices
(a KEEPALIVE's answer: not here) and registers again. A message alice sends right after
the flush must still reach him, through the relay, within seconds (goal 10 s; the
benchmark, scripts/bench_nat.py --flush, prints it per trial)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pd.testing.daemons import run_cli, short_tempdir, wait_until
from p2pd.testing.natnet import flush_then_send, relay_counter, send, start_network, status
from p2pd.testing.netns import Testbed

pytestmark = [pytest.mark.netns, pytest.mark.slow]

#: The issue's goal is 10 s; this machine is shared and loaded, so the test allows a
#: margin a user would still accept, and prints the figure.
RECOVERY_BOUND = 15.0


@pytest.fixture()
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-flush-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_message_reaches_a_daemon_whose_nat_flushed_its_mappings(
    testbed: Testbed, root: Path
) -> None:
    start_network(testbed, root, "symmetric", "symmetric", republish_min=1.0)
    tag = f"flush-{time.time_ns():x}"
    assert send(root, "alice", "bob", f"{tag} before")["via"] == "relay"
    registered = len(status(root, "bob")["relays_in_use"])

    # Flush at once: bob registered with his relays a few seconds ago (the network
    # settles a second after, once his record lists them: republish_min), so his next
    # refreshes (every 25 s) are some 20 s ahead. Without keepalives he would stay
    # unreachable that long, so the bound below tells them apart; and it is each
    # relay's keepalive, not a refresh, that notices (keepalive_moved, below). (It
    # waited for a refresh before, 0-25 s: the same distance, with the wait.)
    result = flush_then_send(testbed, root)
    print(f"after bob's NAT flushed its conntrack table: {result}")
    (counts,) = result["conntrack"]
    assert counts["before"] >= registered and counts["after"] == 0, counts  # it did flush
    assert result["delivered"], result
    assert result["via"] == "relay", result
    assert result["recovered_s"] <= RECOVERY_BOUND, result

    # The relays saw bob come back from new ports (masquerade random: a new random port
    # per flow), and registered him there: each of his relays moved him once.
    def all_moved() -> bool:
        return relay_counter(root, "registrations_moved") >= registered

    assert wait_until(all_moved, 15.0, interval=0.5), relay_counter(root, "registrations_moved")
    relay = status(root, "bob")["relay"]["client"]["counters"]
    assert relay.get("keepalive_moved", 0) >= registered, relay  # noticed by keepalives
    # and both ways still, on the same relayed connection
    assert send(root, "bob", "alice", f"{tag} back")["via"] == "relay"
    lines = run_cli(root / "bob", "inbox", "--json").stdout.splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    assert sum(1 for t in texts if t.startswith("after a flush")) == 1, texts  # once


def test_a_direct_path_comes_back_after_the_nat_flushed_its_mappings(
    testbed: Testbed, root: Path
) -> None:
    """Both behind endpoint-independent NATs: hole punching made their connection direct.
    Bob's router then forgets every mapping; alice's packets on the direct path are
    dropped until bob sends on it again, which his PINGs to direct peers (every 4 s
    behind a NAT) do. The next message arrives within seconds, without a new path."""
    start_network(testbed, root, "eim", "eim")
    vias = [send(root, "alice", "bob", "first")["via"]]
    for i in range(20):  # until hole punching made it direct (20 s at most)
        if vias[-1] == "direct":
            break
        time.sleep(1.0)
        vias.append(send(root, "alice", "bob", f"then {i}")["via"])
    assert vias[-1] == "direct", vias
    result = flush_then_send(testbed, root)
    print(f"after bob's NAT flushed its conntrack table (direct path): {result}")
    (counts,) = result["conntrack"]
    assert counts["before"] >= 1 and counts["after"] == 0, counts
    assert result["delivered"], result
    assert result["recovered_s"] <= RECOVERY_BOUND, result
    assert status(root, "bob")["hole_punching"]["direct_pings"] >= 1
    assert send(root, "bob", "alice", "back")["via"] in ("direct", "relay")


def test_a_circuit_opened_through_the_peers_relay_follows_our_flushed_nat(
    testbed: Testbed, root: Path
) -> None:
    """Alice opened the relayed connection, through one of bob's relays (two
    endpoint-dependent NATs: it stays relayed). Then alice's own router flushes its
    mappings: her packets leave from new ports, and bob's relay would send bob's
    answers to her old ones. Her own relays' keepalives tell her within 4 s; she asks
    bob's relay again for the circuit from her new mapping, and bob's message comes
    through within the bound. (With three public daemons, alice is usually registered
    with bob's relay too, whose REGISTER moves the circuit as well; the case of a relay
    that holds no registration of hers is tests/test_relay.py's
    ``test_a_circuit_we_opened_through_another_relay_follows_our_new_mapping``.)"""
    start_network(testbed, root, "symmetric", "symmetric", republish_min=1.0)
    tag = f"follow-{time.time_ns():x}"
    assert send(root, "alice", "bob", f"{tag} opens the circuit")["via"] == "relay"
    result = flush_then_send(testbed, root, sender="bob", to="alice")
    print(f"after alice's NAT flushed its conntrack table: {result}")
    assert result["delivered"], result
    assert result["recovered_s"] <= RECOVERY_BOUND, result
    client = status(root, "alice")["relay"]["client"]["counters"]
    assert client.get("circuits_followed", 0) >= 1, client

    def circuit_moved() -> bool:
        return relay_counter(root, "circuits_moved") >= 1

    assert wait_until(circuit_moved, 10.0, interval=0.5)
