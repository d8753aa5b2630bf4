"""LAN discovery between real daemons, each in its own network namespace on one bridge,
with no bootstrap address and no internet: mDNS finds the peers, the DHT forms through
them, handles resolve and messages flow."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pd.testing.daemons import (
    DaemonProcess,
    cli_json,
    control_call,
    run_cli,
    short_tempdir,
    wait_until,
)
from p2pd.testing.netns import Host, Testbed

pytestmark = [pytest.mark.netns, pytest.mark.slow]
PORT = 4747


@pytest.fixture()
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-lan-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Lan:
    def __init__(self, testbed: Testbed, root: Path, handles: list[str]) -> None:
        self.root = root
        lan = testbed.lan("lan0", "198.51.100.0/24")
        self.hosts: dict[str, Host] = {h: testbed.host(h, lan) for h in handles}
        self.daemons: dict[str, DaemonProcess] = {}
        for handle in handles:
            assert run_cli(root / handle, "init", handle, "--no-passphrase").returncode == 0

    def start(self, handle: str, mode: str = "everyone") -> DaemonProcess:
        host = self.hosts[handle]
        daemon = DaemonProcess(
            self.root / handle,
            listen=f"0.0.0.0:{PORT}",
            lan=mode,
            wrapper=host.command([]),
            extra=["-v"],
        )
        self.daemons[handle] = daemon
        return daemon.wait_ready()

    def peers(self, handle: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = cli_json(self.root / handle, "peers")
        return result

    def lan_handles(self, handle: str) -> set[str]:
        return {p["handle"] for p in self.peers(handle) if p["via"] == "lan"}

    def stop_all(self) -> None:
        for handle, d in self.daemons.items():
            d.stop()
            print(f"----- {handle} (exit {d.proc.returncode})\n{d.log[-3000:]}")


@pytest.fixture()
def lan3(testbed: Testbed, root: Path) -> Iterator[Lan]:
    lan = Lan(testbed, root, ["alice", "bob", "carol"])
    try:
        yield lan
    finally:
        lan.stop_all()


def test_three_hosts_find_each_other_resolve_and_message(lan3: Lan) -> None:
    for handle in ("alice", "bob", "carol"):
        lan3.start(handle)
    everyone = {"alice", "bob", "carol"}
    for handle in everyone:
        assert wait_until(lambda h=handle: lan3.lan_handles(h) == everyone - {h}, timeout=5)
    listed = {p["handle"]: p for p in lan3.peers("alice")}
    assert listed["bob"]["addresses"] == [f"{lan3.hosts['bob'].address}:{PORT}"]
    assert listed["bob"]["fingerprint"] == lan3.daemons["bob"].fingerprint
    # the DHT formed through the LAN: every handle resolves from every node
    for asker in everyone:
        for target in everyone - {asker}:
            ok = wait_until(
                lambda a=asker, t=target: run_cli(lan3.root / a, "whois", t).returncode == 0,
                timeout=30,
                interval=0.5,
            )
            assert ok, f"{asker} cannot resolve {target}"
            record = cli_json(lan3.root / asker, "whois", target)
            assert record["addresses"] == [f"{lan3.hosts[target].address}:{PORT}"]
    for sender, recipient in (("alice", "bob"), ("bob", "carol"), ("carol", "alice")):
        proc = run_cli(lan3.root / sender, "send", recipient, f"hi from {sender}", "--wait")
        assert proc.returncode == 0, proc.stderr
        got = json.loads(run_cli(lan3.root / recipient, "inbox", "--json").stdout.splitlines()[0])
        assert got["text"] == f"hi from {sender}" and got["via"] == "direct"


def stop_timed(daemon: DaemonProcess) -> float:
    """SIGTERM ``daemon``; seconds until it exited (cleanly: exit status 0)."""
    t0 = time.monotonic()
    assert daemon.stop() == 0, daemon.log
    return time.monotonic() - t0


#: SIGTERM to exit, at most. Issue 9 asks for 1 s; here it takes ~0.3 s with LAN on (the
#: goodbye is three packets 125 ms apart) and ~0.05 s while the daemon still probes. 1.5
#: s leaves room for a busy 2-core machine, and is still under the 1.8-2.2 s it took
#: when the daemon waited for zeroconf's probes (test_cli_e2e.py has the LAN-off bound).
STOP_BOUND = 1.5


def test_a_host_that_stops_disappears(lan3: Lan) -> None:
    for handle in ("alice", "bob", "carol"):
        lan3.start(handle)
    assert wait_until(lambda: lan3.lan_handles("alice") == {"bob", "carol"}, timeout=5)
    carol = lan3.daemons["carol"]
    assert stop_timed(carol) < STOP_BOUND  # a clean stop says goodbye, and at once
    assert not (carol.home / "control.sock").exists()
    assert wait_until(lambda: lan3.lan_handles("alice") == {"bob"}, timeout=10)
    assert lan3.lan_handles("bob") == {"alice"}


def test_a_daemon_stopped_while_it_probes_exits_at_once(lan3: Lan) -> None:
    """Its mDNS registration (probes, then announcements: ~1.7 s) is cancelled rather
    than waited for; nothing was announced, so there is nothing to say goodbye to."""
    alice = lan3.start("alice")  # ready: joined and published; mDNS still probes
    assert stop_timed(alice) < STOP_BOUND
    assert "mDNS: announcing" not in alice.log, "the daemon got past its probes: retry"
    assert "stopped" in alice.log and not (alice.home / "control.sock").exists()


def test_contacts_mode_hides_the_handle_from_strangers(lan3: Lan) -> None:
    """bob announces in contacts mode. alice has bob pinned and recognises him; carol,
    a stranger, receives his announcement (her ``not_a_contact`` counter says so: the
    check below is not merely that nothing showed up in time) and sees no handle and no
    key of his."""
    lan3.start("alice")
    lan3.start("bob")
    # alice and bob become contacts (pins) while bob still announces to everyone
    assert wait_until(lambda: lan3.lan_handles("alice") == {"bob"}, timeout=5)
    assert wait_until(
        lambda: run_cli(lan3.root / "alice", "whois", "bob").returncode == 0, timeout=30
    )
    assert run_cli(lan3.root / "alice", "send", "bob", "hi", "--wait").returncode == 0
    lan3.daemons["bob"].stop()
    lan3.start("bob", mode="contacts")
    lan3.start("carol")
    assert wait_until(lambda: "bob" in lan3.lan_handles("alice"), timeout=10)
    assert wait_until(lambda: "alice" in lan3.lan_handles("carol"), timeout=10)
    # carol's only contacts-mode neighbour is bob: each of his announcements she
    # receives is refused as nobody she knows
    assert wait_until(lambda: lan_counters(lan3, "carol").get("not_a_contact", 0) >= 1, timeout=10)
    bob = lan3.daemons["bob"].fingerprint
    assert all(p["fingerprint"] != bob for p in lan3.peers("carol") if p["via"] == "lan")
    assert "bob" not in lan3.lan_handles("carol")
    assert lan_counters(lan3, "alice").get("not_a_contact", 0) == 0  # alice knows him


def flood_handled(lan: Lan) -> int:
    """How many contacts-mode announcements alice refused or left unjudged."""
    counters = lan_counters(lan, "alice")
    return sum(
        counters.get(name, 0)
        for name in ("not_a_contact", "tag_scans_skipped", "tag_scans_skipped_source")
    )


def lan_counters(lan: Lan, handle: str) -> dict[str, int]:
    counters: dict[str, int] = control_call(lan.root / handle, "status")["lan_counters"]
    return counters


HOSTILE = r"""
import asyncio, sys, time
from zeroconf import ServiceInfo, Zeroconf
from p2pd.discovery import SERVICE_TYPE, build_txt, encode_txt
from p2pd.identity import Identity

host = sys.argv[1]
H = [host]
now = int(time.time())
impostor = Identity.generate("bob")  # claims bob's handle with another key
honest = Identity.generate("mallory")
good = encode_txt(build_txt(honest, port=4005, addresses=H, mode="everyone", now=now))
texts = {
    "garbage": (b"\x05hello\x03a=b", 4004),
    "impostor": (encode_txt(build_txt(impostor, port=4003, addresses=H, mode="everyone",
                                      now=now)), 4003),
    "stale": (encode_txt(build_txt(honest, port=4004, addresses=H, mode="everyone",
                                   now=now - 3600)), 4004),
    "forged": (good.replace(b"p=4005", b"p=4006"), 4006),
    "oversize": (good + encode_txt({f"x{i}".encode(): b"z" * 240 for i in range(4)}), 4005),
    "good": (good, 4005),
}
zc = Zeroconf(interfaces=[host])
# all at once and without probing, as FLOOD below (register_service would wait ~0.5-1.7 s
# for each in turn: about 8 s of the test)
pending = [
    asyncio.run_coroutine_threadsafe(
        zc.async_register_service(
            ServiceInfo(SERVICE_TYPE, f"{label}.{SERVICE_TYPE}", port=port, properties=text,
                        server=f"{label}.local.", parsed_addresses=H, host_ttl=60,
                        other_ttl=60),
            cooperating_responders=True,
        ),
        zc.loop,
    )
    for label, (text, port) in texts.items()
]
for registered in pending:
    registered.result(10)
print("registered", flush=True)
time.sleep(60)
"""


def test_hostile_announcements_are_ignored_with_a_log_line(testbed: Testbed, root: Path) -> None:
    import sys

    from p2pd.testing.netns import read_line

    lan = Lan(testbed, root, ["alice", "bob", "mallory"])
    try:
        lan.start("alice")
        lan.start("bob")
        assert wait_until(lambda: lan.lan_handles("alice") == {"bob"}, timeout=5)
        assert wait_until(
            lambda: run_cli(lan.root / "alice", "whois", "bob").returncode == 0, timeout=30
        )
        assert run_cli(lan.root / "alice", "send", "bob", "pin", "--wait").returncode == 0
        mallory = lan.hosts["mallory"]
        script = lan.root / "hostile.py"
        script.write_text(HOSTILE)
        attacker = mallory.popen([sys.executable, str(script), str(mallory.address)])
        try:
            assert read_line(attacker, timeout=30).strip() == "registered"
            assert wait_until(lambda: "mallory" in lan.lan_handles("alice"), timeout=15)
            listed = lan.peers("alice")
            lan_peers = {(p["handle"], p["fingerprint"]) for p in listed if p["via"] == "lan"}
            assert lan_peers == {
                ("bob", lan.daemons["bob"].fingerprint),
                ("mallory", next(p["fingerprint"] for p in listed if p["handle"] == "mallory")),
            }
            mallory_entry = next(p for p in listed if p["handle"] == "mallory")
            assert mallory_entry["addresses"] == [f"{mallory.address}:4005"]
            log = lan.daemons["alice"].log
            assert "claims 'bob' with key" in log  # the impostor of a pinned handle
            for label in ("garbage", "stale", "forged", "oversize"):
                assert f"'{label}." in log, label
        finally:
            attacker.kill()
            attacker.wait(10)
    finally:
        lan.stop_all()


FLOOD = r"""
import asyncio, os, sys, time
from zeroconf import ServiceInfo, Zeroconf
from p2pd.discovery import SERVICE_TYPE, build_txt, encode_txt
from p2pd.identity import Identity

host, count = sys.argv[1], int(sys.argv[2])
now = int(time.time())
zc = Zeroconf(interfaces=[host])
for i in range(count):  # well formed, signed, each by a key nobody pinned
    text = encode_txt(build_txt(Identity.generate("junk"), port=4100 + i, addresses=[host],
                                mode="contacts", now=now, nonce=os.urandom(16)))
    info = ServiceInfo(SERVICE_TYPE, f"junk{i}.{SERVICE_TYPE}", port=4100 + i,
                       properties=text, server=f"junk{i}.local.", parsed_addresses=[host],
                       host_ttl=120, other_ttl=120)
    # no probing, and the announcements go out together (register_service would wait
    # ~0.5-1.7 s for each)
    asyncio.run_coroutine_threadsafe(
        zc.async_register_service(info, cooperating_responders=True), zc.loop
    ).result(10)
print("registered", flush=True)
time.sleep(120)
"""


def test_a_flood_of_contacts_mode_junk_does_not_hide_a_contact(
    testbed: Testbed, root: Path
) -> None:
    """mallory's host announces 70 contacts-mode services at once, each signed by a
    random key (more than the 60 tag scans a minute alice allows in all). bob, whom
    alice has pinned but never seen in contacts mode, then starts announcing in
    contacts mode: alice recognises him at once, because the flood gets only its
    address's 10 scans (counted in her status), not the whole budget."""
    import sys

    from p2pd.testing.netns import read_line

    lan = Lan(testbed, root, ["alice", "bob", "mallory"])
    try:
        lan.start("alice")
        lan.start("bob")
        assert wait_until(lambda: lan.lan_handles("alice") == {"bob"}, timeout=5)
        assert wait_until(
            lambda: run_cli(lan.root / "alice", "whois", "bob").returncode == 0, timeout=30
        )
        assert run_cli(lan.root / "alice", "send", "bob", "pin", "--wait").returncode == 0
        lan.daemons["bob"].stop()
        mallory = lan.hosts["mallory"]
        script = lan.root / "flood.py"
        script.write_text(FLOOD)
        attacker = mallory.popen([sys.executable, str(script), str(mallory.address), "70"])
        try:
            assert read_line(attacker, timeout=60).strip() == "registered"
            assert wait_until(lambda: flood_handled(lan) >= 60, timeout=30)
            lan.start("bob", mode="contacts")
            assert wait_until(lambda: "bob" in lan.lan_handles("alice"), timeout=15)
            counters = lan_counters(lan, "alice")
            assert 1 <= counters["not_a_contact"] <= 20  # the flood's address budget
            assert counters["tag_scans_skipped_source"] >= 40
        finally:
            attacker.kill()
            attacker.wait(10)
    finally:
        lan.stop_all()
