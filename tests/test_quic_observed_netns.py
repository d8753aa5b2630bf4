"""Address discovery on QUIC connections between real daemons behind a real NAT (issue 13,
item 1): alice sits behind an endpoint-independent NAT (``masquerade``) with the DHT
replies' ``observed`` addresses switched off (``[dht] observe_replies = false``), so the
only evidence of where the world sees her is what her QUIC peers report. She messages
two public daemons in two /24s; each tells her, on that connection, the address it sees
her at, and ``p2pd status`` shows the NAT's address as her reflexive address, seen by
two observers, and the mapping kind endpoint-independent. (With the reports gone, as in
p2pd before them, her mapping stays ``unknown`` and no reflexive address shows.)"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pd.testing.daemons import DaemonProcess, run_cli, short_tempdir, wait_until
from p2pd.testing.natnet import CONFIG, PORT, PUBLIC, peer_host, send, status
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
    seeds = [f"{ip}:{PORT}" for ip in PUBLIC]
    daemons: list[DaemonProcess] = []
    try:
        for name, host in hosts.items():
            assert run_cli(root / name, "init", name, "--no-passphrase").returncode == 0
            extra = "[dht]\nobserve_replies = false\n"
            (root / name / "config.toml").write_text(CONFIG + extra)
            daemons.append(
                DaemonProcess(
                    root / name,
                    listen=f"0.0.0.0:{PORT}",
                    bootstrap=[s for s in seeds if not s.startswith(f"{host.address}:")],
                    wrapper=host.command([]),
                ).wait_ready()
            )
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
