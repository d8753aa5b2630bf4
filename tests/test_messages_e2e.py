"""End to end: encrypted direct messages between real `p2pd daemon` processes on
127.0.0.1, driven through the CLI and the control socket as a user would."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pd.control import ControlClient
from p2pd.testing.daemons import DaemonProcess, cli_json, run_cli, short_tempdir, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture()
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-msg-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Net:
    """Daemons by handle; every one is stopped at the end, whatever happens."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: dict[str, DaemonProcess] = {}
        self.ports: dict[str, str] = {}

    def init(self, *handles: str) -> None:
        for handle in handles:
            proc = run_cli(self.root / handle, "init", handle, "--no-passphrase")
            assert proc.returncode == 0, proc.stderr

    def start(self, handle: str, *, bootstrap: list[str] | None = None) -> DaemonProcess:
        if bootstrap is None:
            bootstrap = [d.listen for h, d in self.daemons.items() if h != handle and d.alive]
        listen = self.ports.get(handle, "127.0.0.1:0")  # a restart keeps its port
        daemon = DaemonProcess(self.root / handle, listen=listen, bootstrap=bootstrap)
        daemon.wait_ready()
        self.daemons[handle] = daemon
        self.ports[handle] = daemon.listen
        return daemon

    def home(self, handle: str) -> Path:
        return self.root / handle

    def stop_all(self) -> None:
        for handle, d in self.daemons.items():
            d.stop()
            print(f"----- {handle} (exit {d.proc.returncode})\n{d.log[-4000:]}")  # on failure


@pytest.fixture()
def net(root: Path) -> Iterator[Net]:
    n = Net(root)
    try:
        yield n
    finally:
        n.stop_all()


def inbox(home: Path, *args: str) -> list[dict[str, Any]]:
    proc = run_cli(home, "inbox", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def texts_from(home: Path, sender: str) -> list[str]:
    return [m["text"] for m in inbox(home, "--from", sender)]


def test_three_daemons_exchange_messages_both_ways(net: Net) -> None:
    net.init("alice", "bob", "carol")
    for handle in ("alice", "bob", "carol"):
        net.start(handle)
    pairs = [("alice", "bob"), ("bob", "alice"), ("carol", "alice"), ("bob", "carol")]
    for sender, recipient in pairs:  # every first message is a first contact (X3DH)
        text = f"hello {recipient}, this is {sender} ✓"
        proc = run_cli(net.home(sender), "send", recipient, text, "--wait", "--timeout", "30")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("delivered: message")
        got = inbox(net.home(recipient), "--from", sender)
        assert [m["text"] for m in got] == [text]
        assert got[0]["via"] == "direct"
        assert got[0]["fingerprint"] == net.daemons[sender].fingerprint
    # a reply in an established session, and order within a conversation
    for i in range(5):
        proc = run_cli(net.home("alice"), "send", "bob", f"n{i}", "--wait", "--timeout", "30")
        assert proc.returncode == 0, proc.stderr
    assert texts_from(net.home("bob"), "alice") == [
        "hello bob, this is alice ✓",
        *(f"n{i}" for i in range(5)),
    ]
    # the receiver checked the claimed handle against the DHT before trusting it
    assert wait_until(
        lambda: all(m["sender_verified"] for m in inbox(net.home("alice"))), timeout=20
    )
    contacts = cli_json(net.home("alice"), "contacts")
    assert {c["handle"] for c in contacts} == {"bob", "carol"}
    assert all(not c["verified"] and not c["key_changed"] for c in contacts)
    # the human inbox names the sender
    proc = run_cli(net.home("bob"), "inbox", "--from", "alice")
    assert "alice: n4" in proc.stdout


def test_send_errors_are_clear(net: Net) -> None:
    net.init("alice", "bob")
    net.start("alice")
    proc = run_cli(net.home("alice"), "send", "nobody_here", "hi")
    assert proc.returncode == 1 and proc.stderr.startswith("ERROR: ")
    assert "nobody_here" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(net.home("alice"), "send", "alice", "hi")
    assert proc.returncode == 2 and "your own handle" in proc.stderr
    proc = run_cli(net.home("alice"), "send", "Not A Handle", "hi")
    assert proc.returncode == 2
    proc = run_cli(net.home("alice"), "send", "bob", "")
    assert proc.returncode == 2 and "empty" in proc.stderr


def test_verify_shows_the_same_safety_number_on_both_sides(net: Net) -> None:
    net.init("alice", "bob")
    net.start("alice")
    net.start("bob")
    a = cli_json(net.home("alice"), "verify", "bob")
    b = cli_json(net.home("bob"), "verify", "alice")
    assert a["safety_number"] == b["safety_number"]
    assert len(a["safety_number"].replace(" ", "")) == 60
    assert not a["verified"]
    human = run_cli(net.home("alice"), "verify", "bob")
    assert human.returncode == 0
    assert a["safety_number"].split()[0] in human.stdout and "▄" in human.stdout  # QR code
    accepted = cli_json(net.home("alice"), "verify", "bob", "--accept")
    assert accepted["verified"]
    assert cli_json(net.home("alice"), "contacts")[0]["verified"] is True


def test_message_to_an_offline_handle_arrives_when_it_starts(net: Net) -> None:
    """carol is offline; alice leaves a message and goes offline herself; carol starts,
    finds it in her DHT mailbox, and her ack reaches alice when alice returns."""
    net.init("alice", "bob", "carol")
    net.start("bob")
    net.start("alice")
    net.start("carol")  # publishes carol's record (with her prekeys), then leaves
    net.daemons["carol"].stop()
    proc = run_cli(net.home("alice"), "send", "carol", "while you were out", "--json")
    assert proc.returncode == 0, proc.stderr
    msg_id = json.loads(proc.stdout)["id"]

    def state() -> dict[str, Any]:
        with ControlClient(net.home("alice")) as client:
            result: dict[str, Any] = client.call("message", {"id": msg_id})
            return result

    assert wait_until(lambda: state()["state"] == "sent", timeout=30)
    assert state()["via"] == "mailbox"
    net.daemons["alice"].stop()

    net.start("carol", bootstrap=[net.daemons["bob"].listen])
    assert wait_until(lambda: texts_from(net.home("carol"), "alice") != [], timeout=30)
    assert texts_from(net.home("carol"), "alice") == ["while you were out"]
    assert inbox(net.home("carol"))[0]["via"] == "mailbox"

    net.start("alice", bootstrap=[net.daemons["bob"].listen])
    assert wait_until(lambda: state()["state"] == "delivered", timeout=60)
    assert texts_from(net.home("carol"), "alice") == ["while you were out"]  # once


def _burst(home: Path, recipient: str, count: int) -> list[str]:
    ids = []
    with ControlClient(home, timeout=60) as client:
        for i in range(count):
            ids.append(client.call("send", {"handle": recipient, "text": f"m{i:03d}"})["id"])
    return ids


def _all_delivered(home: Path, ids: list[str]) -> bool:
    with ControlClient(home) as client:
        outbox = client.call("outbox", {"limit": 10_000})
    states = {m["id"]: m["state"] for m in outbox}
    return all(states.get(i) == "delivered" for i in ids)


@pytest.mark.parametrize("victim", ["receiver", "sender"])
def test_kill_9_during_a_burst_loses_nothing(net: Net, victim: str) -> None:
    count = 500
    net.init("alice", "bob")
    net.start("alice")
    net.start("bob")
    # a first message sets up the session, so the burst tests delivery, not X3DH
    assert run_cli(net.home("alice"), "send", "bob", "start", "--wait").returncode == 0
    killed = net.daemons["bob" if victim == "receiver" else "alice"]
    ids: list[str] = []
    with ControlClient(net.home("alice"), timeout=60) as client:
        for i in range(count):
            ids.append(client.call("send", {"handle": "bob", "text": f"m{i:03d}"})["id"])
            if i == count // 3:
                if victim == "sender":
                    break  # the rest is queued after the restart below
                killed.kill()  # SIGKILL: no shutdown, no flush
    if victim == "sender":
        killed.kill()
        net.start("alice")
        with ControlClient(net.home("alice"), timeout=60) as client:
            for i in range(len(ids), count):
                ids.append(client.call("send", {"handle": "bob", "text": f"m{i:03d}"})["id"])
    else:
        net.start("bob")
    assert wait_until(lambda: _all_delivered(net.home("alice"), ids), timeout=120, interval=1)
    got = texts_from(net.home("bob"), "alice")
    assert got == ["start", *(f"m{i:03d}" for i in range(count))]  # each once, in order
