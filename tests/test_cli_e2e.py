"""End to end: real `p2pd daemon` processes on 127.0.0.1, driven only through the CLI
and the control socket, as a user would."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from p2pd import wire
from p2pd.control_client import MAX_LINE, ControlClient
from p2pd.identity import Identity, format_fingerprint, self_certifying
from p2pd.records import HandleRecord
from p2pd.store import db_path
from p2pd.testing.daemons import DaemonProcess, cli_json, run_cli, short_tempdir

pytestmark = pytest.mark.slow
PASSPHRASE = "correct horse battery staple"


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-e2e-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def network(root: Path) -> Iterator[dict[str, DaemonProcess]]:
    """alice (encrypted key) starts a network; bob and carol join through her."""
    (root / "pass").write_text(PASSPHRASE + "\n")
    assert (
        run_cli(root / "alice", "init", "alice", "--passphrase-file", str(root / "pass")).returncode
        == 0
    )
    for handle in ("bob", "carol"):
        assert run_cli(root / handle, "init", handle, "--no-passphrase").returncode == 0
    daemons: dict[str, DaemonProcess] = {}
    try:
        daemons["alice"] = DaemonProcess(
            root / "alice", env={"P2PD_PASSPHRASE": PASSPHRASE}
        ).wait_ready()
        for handle in ("bob", "carol"):
            daemons[handle] = DaemonProcess(
                root / handle, bootstrap=[daemons["alice"].listen]
            ).wait_ready()
        yield daemons
    finally:
        for d in daemons.values():
            d.stop()


def test_every_daemon_resolves_every_other(root: Path, network: dict[str, DaemonProcess]) -> None:
    for asker in network:
        for target, daemon in network.items():
            record = cli_json(root / asker, "whois", target)
            assert record["handle"] == target
            assert record["fingerprint"] == daemon.fingerprint
            assert record["addresses"] == [daemon.listen]
            assert record["self_certifying"] == daemon.handle


def test_whois_human_output_and_exit_codes(root: Path, network: dict[str, DaemonProcess]) -> None:
    proc = run_cli(root / "bob", "whois", "carol")
    assert proc.returncode == 0
    assert network["carol"].handle in proc.stdout
    assert network["carol"].listen in proc.stdout

    good = network["alice"].handle  # alice#<16 chars of fingerprint>
    assert len(good) == len("alice#") + 16
    assert run_cli(root / "bob", "whois", good).returncode == 0
    shortest = good[: len("alice#") + 12]
    assert run_cli(root / "bob", "whois", shortest).returncode == 0
    proc = run_cli(root / "bob", "whois", shortest[:-1])  # 11 characters: 55 bits
    assert proc.returncode == 2 and "12-32 base32 characters" in proc.stderr

    fp = network["alice"].fingerprint
    wrong = "alice#" + ("b" if fp[0] == "a" else "a") + fp[1:12]
    proc = run_cli(root / "bob", "whois", wrong)
    assert proc.returncode == 1
    assert "does not match" in proc.stderr or "matches the fingerprint" in proc.stderr
    assert proc.stderr.startswith("ERROR: ") and "Traceback" not in proc.stderr

    proc = run_cli(root / "bob", "whois", "nobody")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert "no valid record for handle 'nobody'" in proc.stderr

    for bad in ("Alice", "al", "alice#xyz", "alice#0000000"):
        proc = run_cli(root / "bob", "whois", bad)
        assert proc.returncode == 2, bad
        assert "ERROR:" in proc.stderr


def test_status(root: Path, network: dict[str, DaemonProcess]) -> None:
    status = cli_json(root / "carol", "status")
    assert status["handle"] == "carol"
    assert status["fingerprint"] == network["carol"].fingerprint
    assert status["listen"] == network["carol"].listen
    assert status["routing_table_size"] == 2
    assert status["records_stored"] == 3
    assert status["replicas"] >= 1
    text = run_cli(root / "carol", "status").stdout
    assert "routing table   2 contacts" in text


def test_send_wait_follows_the_event_stream(
    root: Path, network: dict[str, DaemonProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`send --wait` subscribes before it sends and returns once the message is delivered,
    asking the daemon about it only every DELIVERY_RECHECK seconds (it used to every 50 ms).
    The CLI runs in this process, so its control calls can be counted."""
    from p2pd_cli.commands import messages
    from p2pd_cli.main import cli

    asked: list[str] = []

    class CountingClient(ControlClient):
        def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
            asked.append(method)
            return super().call(method, params)

    monkeypatch.setattr(messages, "ControlClient", CountingClient)

    def send(*args: str, stdin: str | None = None) -> Result:
        result = CliRunner().invoke(
            cli, ["--home", str(root / "bob"), "send", "carol", *args], stdin
        )
        assert result.exit_code == 0, result.output
        return result

    send("first contact", "--wait", "--timeout", "30")  # X3DH, lookups: not measured
    asked.clear()
    started = time.monotonic()
    message = json.loads(send("hello again", "--wait", "--json").stdout)
    elapsed = time.monotonic() - started
    assert message["state"] == "delivered" and message["handle"] == "carol"
    assert asked[:2] == ["subscribe", "send"]
    assert asked.count("message") <= 2 + elapsed / messages.DELIVERY_RECHECK

    result = send("-", "--lines", "--wait", stdin="one\n\ntwo\nthree\n")
    assert result.stdout.strip() == "delivered: 3 of 3 messages to carol"
    proc = run_cli(root / "carol", "inbox", "--from", "bob", "--json")
    texts = [json.loads(line)["text"] for line in proc.stdout.splitlines()]
    assert texts == ["first contact", "hello again", "one", "two", "three"]


def test_control_api_survives_malformed_requests(
    root: Path, network: dict[str, DaemonProcess]
) -> None:
    path = root / "bob" / "control.sock"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "bob").stat().st_mode) == 0o700
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        reader = sock.makefile("rb")

        def ask(line: bytes) -> dict:
            sock.sendall(line + b"\n")
            return json.loads(reader.readline())

        assert ask(b"{not json")["error"]["code"] == -32700
        assert ask(b"[1, 2]")["error"]["code"] == -32600
        assert ask(b'{"jsonrpc": "2.0", "id": 1}')["error"]["code"] == -32600
        assert ask(b'{"jsonrpc": "2.0", "id": 2, "method": "nope"}')["error"]["code"] == -32601
        bad = ask(b'{"jsonrpc": "2.0", "id": 3, "method": "whois", "params": {"handle": 5}}')
        assert bad["error"]["code"] == -32602 and bad["id"] == 3
        bad = ask(b'{"jsonrpc": "2.0", "id": 4, "method": "whois", "params": {"handle": "X"}}')
        assert bad["error"]["code"] == -32602
        missing = ask(b'{"jsonrpc": "2.0", "id": 5, "method": "whois", "params": ["zed"]}')
        assert missing["error"]["code"] == -32001
        ok = ask(b'{"jsonrpc": "2.0", "id": 6, "method": "status"}')
        assert ok["id"] == 6 and ok["result"]["handle"] == "bob"
    # a line over the limit closes only that connection
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"x" * (MAX_LINE + 4096))
        assert json.loads(sock.makefile("rb").readline())["error"]["code"] == -32600
    assert cli_json(root / "bob", "status")["handle"] == "bob"


def test_restarted_daemon_rejoins_through_saved_contacts(
    root: Path, network: dict[str, DaemonProcess]
) -> None:
    carol = network["carol"]
    assert carol.stop() == 0
    assert "stopped" in carol.log
    assert not (root / "carol" / "control.sock").exists()
    # no --bootstrap this time: the contacts saved at shutdown are enough
    again = DaemonProcess(root / "carol", listen=carol.listen).wait_ready()
    network["carol"] = again
    record = cli_json(root / "carol", "whois", "alice")
    assert record["fingerprint"] == network["alice"].fingerprint
    assert cli_json(root / "carol", "status")["routing_table_size"] == 2


def test_cli_errors_without_a_daemon_or_identity(root: Path) -> None:
    home = root / "nobody"
    proc = run_cli(home, "status")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"ERROR: no p2pd daemon is running for {home} (start one with `p2pd daemon`)"
    )
    proc = run_cli(home, "daemon", "--listen", "127.0.0.1:0")
    assert proc.returncode == 1 and "p2pd init" in proc.stderr
    proc = run_cli(home, "daemon", "--listen", "127.0.0.1:99999")
    assert proc.returncode == 2 and "port" in proc.stderr


def test_init_rules(root: Path) -> None:
    home = root / "dave"
    proc = run_cli(home, "init", "Dave", "--no-passphrase")
    assert proc.returncode == 2 and "invalid handle 'Dave'" in proc.stderr
    proc = run_cli(home, "init", "dave")  # no passphrase source, no terminal
    assert proc.returncode == 2 and "--no-passphrase" in proc.stderr
    proc = run_cli(home, "init", "dave", "--no-passphrase", "--json")
    assert proc.returncode == 0
    created = json.loads(proc.stdout)
    assert created["self_certifying"].startswith("dave#") and created["encrypted"] is False
    assert stat.S_IMODE((home / "identity.json").stat().st_mode) == 0o600
    proc = run_cli(home, "init", "dave", "--no-passphrase")
    assert proc.returncode == 1 and "refusing to overwrite" in proc.stderr
    assert json.loads((home / "identity.json").read_text())["public_key"]


def test_the_daemon_keeps_no_passphrase_in_its_environment(
    network: dict[str, DaemonProcess],
) -> None:
    """alice's daemon was started with P2PD_PASSPHRASE: once read, it is gone from what
    /proc shows of its environment (and from what a child would inherit)."""
    pid = network["alice"].proc.pid
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"PATH=" in environ  # the environment is there: the check can fail
    assert b"P2PD_PASSPHRASE" not in environ
    assert PASSPHRASE.encode() not in environ


def test_wrong_or_missing_passphrase_is_a_clear_error(
    root: Path, network: dict[str, DaemonProcess]
) -> None:
    (root / "wrong").write_text("not it\n")
    proc = run_cli(
        root / "alice",
        "daemon",
        "--listen",
        "127.0.0.1:0",
        "--passphrase-file",
        str(root / "wrong"),
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith(
        "ERROR: the passphrase does not open the identity in " + str(root / "alice")
    )
    assert "Traceback" not in proc.stderr and PASSPHRASE not in proc.stderr
    proc = run_cli(root / "alice", "daemon", "--listen", "127.0.0.1:0", env={"P2PD_PASSPHRASE": ""})
    assert proc.returncode == 1 and "encrypted" in proc.stderr


def test_one_daemon_per_home_and_no_secrets_in_output(
    root: Path, network: dict[str, DaemonProcess]
) -> None:
    proc = run_cli(root / "bob", "daemon", "--listen", "127.0.0.1:0")
    assert proc.returncode == 1
    assert "already running" in proc.stderr
    secret = json.loads((root / "bob" / "identity.json").read_text())["secret"]
    outputs = [network["bob"].log, run_cli(root / "bob", "status", "--json").stdout]
    assert all(secret not in out and secret.upper() not in out for out in outputs)


def _package_dirs(*names: str) -> list[str]:
    """Where these packages are installed, and their wheels' bundled libraries
    (``<name>.libs``), found without importing them."""
    dirs = []
    for name in names:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, name
        for location in spec.submodule_search_locations:
            dirs += [location + "/", location + ".libs/"]
    return dirs


#: SIGTERM to exit, at most. Issue 9 asks for 1 s; without LAN it takes about 0.05 s
#: here (cancel, save contacts, close), with LAN ~0.3 s more for the goodbye
#: (tests/test_lan.py). 1.5 s is far from both on a busy 2-core machine, and would still
#: fail the 1.8-2.2 s the daemon took when it waited for zeroconf and the interpreter's
#: exit-time garbage collections.
STOP_BOUND = 1.5


def test_an_idle_daemon_has_no_media_stack_and_stops_at_once(
    root: Path, network: dict[str, DaemonProcess]
) -> None:
    home = root / "erin"
    assert run_cli(home, "init", "erin", "--no-passphrase").returncode == 0
    erin = DaemonProcess(home, bootstrap=[network["alice"].listen]).wait_ready()
    try:
        assert cli_json(home, "status")["routing_table_size"] > 0
        # PyAV and numpy come with the first call (p2pd/calls.py), zeroconf with LAN
        # discovery (here --lan off): none of their shared libraries is mapped.
        mapped = Path(f"/proc/{erin.proc.pid}/maps").read_text()
        for directory in _package_dirs("av", "numpy", "zeroconf"):
            assert directory not in mapped
        t0 = time.monotonic()
        erin.proc.send_signal(signal.SIGTERM)
        assert erin.proc.wait(15) == 0
        assert time.monotonic() - t0 < STOP_BOUND, erin.log
    finally:
        erin.stop()
    assert "stopped" in erin.log
    assert not (home / "control.sock").exists()
    with contextlib.closing(sqlite3.connect(db_path(home))) as db:
        assert db.execute("SELECT count(*) FROM dht_contacts").fetchone()[0] > 0


def test_rotate_key_rules(root: Path, network: dict[str, DaemonProcess]) -> None:
    """rotate-key: refused while the daemon runs and without --yes off a terminal; then
    a new key under the same passphrase, mode 0600, the handle kept."""
    proc = run_cli(root / "bob", "rotate-key", "--yes")
    assert proc.returncode == 1 and "stop it first" in proc.stderr
    home = root / "rotor"
    (root / "rotor-pass").write_text("rotor passphrase\n")
    passphrase = ("--passphrase-file", str(root / "rotor-pass"))
    created = cli_json(home, "init", "rotor", *passphrase)
    proc = run_cli(home, "rotate-key", *passphrase)
    assert proc.returncode == 2 and "--yes" in proc.stderr
    rotated = cli_json(home, "rotate-key", "--yes", *passphrase)
    assert rotated["old_fingerprint"] == created["fingerprint"] != rotated["fingerprint"]
    assert rotated["self_certifying"] == f"rotor#{rotated['fingerprint'][:16]}"
    assert stat.S_IMODE((home / "identity.json").stat().st_mode) == 0o600
    doc = json.loads((home / "identity.json").read_text())
    assert doc["protection"] == "argon2id-secretbox" and doc["handle"] == "rotor"
    proc = run_cli(home, "rotate-key", "--yes", env={"P2PD_PASSPHRASE": "wrong"})
    assert proc.returncode == 1 and "passphrase does not open" in proc.stderr


def test_mailbox_revoke_pass(root: Path, network: dict[str, DaemonProcess]) -> None:
    """`p2pd mailbox revoke-pass`: a new pass epoch each time, the pin held by the
    replicas of the mailbox, until the new pass expires; the help says what contacts
    must do (nothing); without a daemon, a clear error."""
    before = time.time()
    first = cli_json(root / "bob", "mailbox", "revoke-pass")
    assert first["epoch"] == 1 and first["replicas"] >= 2  # alice, carol (and bob)
    assert before + 7 * 86400 <= first["until"] <= before + 21 * 86400
    proc = run_cli(root / "bob", "mailbox", "revoke-pass")
    assert proc.returncode == 0, proc.stderr
    assert "now at pass epoch 2" in proc.stdout
    assert f"held by {first['replicas']} replica(s)" in proc.stdout
    assert "contacts     nothing to do" in proc.stdout
    counters = cli_json(root / "bob", "status")["dht_counters"]
    assert counters["mailbox_passes_revoked"] == 2
    held = run_cli(root / "bob", "mailbox", "revoke-pass", "--help").stdout
    assert "Contacts need do nothing" in held and "next direct" in held
    proc = run_cli(root / "nobody", "mailbox", "revoke-pass")
    assert proc.returncode == 1 and proc.stderr.startswith("ERROR: no p2pd daemon")


def _store_at(daemon: DaemonProcess, record: HandleRecord) -> bool:
    """One STORE straight to a daemon's DHT port, as any node on the network may send."""
    host, _, port = daemon.listen.rpartition(":")
    msg_id = os.urandom(20)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        frame = wire.encode_request(msg_id, "store", [os.urandom(32), record.key, record.encode()])
        sock.sendto(frame, (host, int(port)))
        while True:  # only our answer counts
            kind, reply_id, payload = wire.split_frame(sock.recv(wire.MAX_FRAME))
            if (kind, reply_id) == (wire.FRAME_RESPONSE, msg_id):
                result = wire.split_response(payload)[0]
                return wire.decode_response("store", result) is True


def test_a_contested_handle_is_shown_as_such_and_refused_to_send(
    root: Path, network: dict[str, DaemonProcess]
) -> None:
    """(Last: the STOREs it sends add a contact that goes away to the daemons' tables.)
    Two keys claim "dave", each first at one replica: whois shows both fingerprints
    and where each was seen, exits 1, --json says "contested"; send refuses, naming the
    self-certifying forms."""
    now = int(time.time())
    claims = [
        HandleRecord.create(Identity.generate("dave"), [], seq=1, now=now, lifetime=3600)
        for _ in range(2)
    ]
    assert _store_at(network["alice"], claims[0])
    assert _store_at(network["carol"], claims[1])
    # A value lookup does not wait for a replica past its soft deadline (p2pd/dht/
    # lookup.py): on a loaded machine one of the two replicas' answers came late about
    # one run in ten and whois showed the other claim alone, or neither ("no valid
    # record", also exit 1: a loaded CI=true run stopped asking there), as it would to a
    # user who then asks again. Four asks at most, until it says contested.
    for _ in range(4):
        proc = run_cli(root / "bob", "whois", "dave")
        if "CONTESTED" in proc.stdout:
            break
    assert proc.returncode == 1
    assert "CONTESTED" in proc.stdout
    for claim in claims:
        assert self_certifying("dave", claim.public_key) in proc.stdout
        assert format_fingerprint(claim.fingerprint) in proc.stdout
    proc = run_cli(root / "bob", "whois", "dave", "--json")
    assert proc.returncode == 1
    shown = json.loads(proc.stdout)
    assert shown["status"] == "contested"
    assert {c["fingerprint"] for c in shown["claims"]} == {c.fingerprint for c in claims}
    assert all(c["seen"] is not None and c["replicas"] for c in shown["claims"])
    proc = run_cli(root / "bob", "send", "dave", "hello?")
    assert proc.returncode == 1
    assert "contested" in proc.stderr
    assert self_certifying("dave", claims[0].public_key) in proc.stderr
    # a self-certifying form picks one
    one = cli_json(root / "bob", "whois", f"dave#{claims[1].fingerprint[:16]}")
    assert (one["status"], one["fingerprint"]) == ("ok", claims[1].fingerprint)
