"""End to end: files between real `p2pd daemon` processes on loopback, over real QUIC,
driven through the CLI as a user would (issue 14)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pd.control_client import ControlClient
from p2pd.testing.daemons import (
    DaemonProcess,
    cli_json,
    control_call,
    p2pd_command,
    popen_cli,
    run_cli,
    short_tempdir,
    wait_until,
)

pytestmark = pytest.mark.slow

#: The default group: what a receiver killed mid-way may receive twice (at most).
GROUP = 1024 * 1024


class Net:
    """Two or more daemons by handle, each with its own `[files] dir`; all stopped at the
    end, whatever happens."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: dict[str, DaemonProcess] = {}
        self.ports: dict[str, str] = {}

    def init(self, *handles: str, auto_accept_max: int = 100_000_000, max_rate: int = 0) -> None:
        for handle in handles:
            proc = run_cli(self.home(handle), "init", handle, "--no-passphrase")
            assert proc.returncode == 0, proc.stderr
            self.downloads(handle).mkdir()
            (self.home(handle) / "config.toml").write_text(
                f'[files]\ndir = "{self.downloads(handle)}"\n'
                f"auto_accept_max = {auto_accept_max}\nmax_rate = {max_rate}\n"
            )

    def start(self, handle: str, wrapper: tuple[str, ...] = ()) -> DaemonProcess:
        bootstrap = [d.listen for h, d in self.daemons.items() if h != handle and d.alive]
        daemon = DaemonProcess(
            self.home(handle), listen=self.ports.get(handle), bootstrap=bootstrap, wrapper=wrapper
        )
        daemon.wait_ready()
        self.daemons[handle] = daemon
        self.ports[handle] = daemon.listen
        return daemon

    def home(self, handle: str) -> Path:
        return self.root / handle

    def downloads(self, handle: str) -> Path:
        return self.root / f"{handle}-downloads"

    def stop_all(self) -> None:
        for handle, d in self.daemons.items():
            d.stop()
            print(f"----- {handle} (exit {d.proc.returncode})\n{d.log[-6000:]}")  # on failure


@pytest.fixture()
def net() -> Iterator[Net]:
    root = short_tempdir("p2pd-files-")
    n = Net(root)
    try:
        yield n
    finally:
        n.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def random_file(path: Path, size: int) -> str:
    path.write_bytes(os.urandom(size))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(home: Path) -> list[dict[str, Any]]:
    """What `p2pd files --json` prints, from the control API: no CLI process per poll
    (test_a_file_from_a_contact_arrives_verified_and_identical checks they agree)."""
    result: list[dict[str, Any]] = control_call(home, "files")
    return result


def eventually(predicate: Callable[[], object], timeout: float) -> bool:
    """``wait_until`` at a steady 0.1 s: each poll here is a control call (0.2-0.3 ms of
    the daemon's CPU, measured: `files` 0.23, `status` 0.30), and wait_until's growing
    intervals (to 0.5 s, for costlier polls) added a quarter of a second on average to
    every wait of these tests."""
    return wait_until(predicate, timeout, interval=0.1)


def one_file(home: Path, direction: str) -> dict[str, Any]:
    rows = [f for f in files(home) if f["direction"] == direction]
    assert len(rows) == 1, rows
    return rows[0]


def pin_each_other(net: Net, a: str, b: str) -> None:
    """A message each way: each side pins the other's key (checked against the DHT)."""
    for sender, recipient in ((a, b), (b, a)):
        proc = run_cli(net.home(sender), "send", recipient, "hi", "--wait", "--timeout", "30")
        assert proc.returncode == 0, proc.stderr
    for handle, other in ((a, b), (b, a)):
        assert eventually(
            lambda h=handle, o=other: (
                o in {c["handle"] for c in control_call(net.home(h), "contacts")}
            ),
            timeout=20,
        )


def test_a_file_from_a_contact_arrives_verified_and_identical(net: Net) -> None:
    net.init("alice", "bob")
    net.start("alice")
    net.start("bob")
    pin_each_other(net, "alice", "bob")
    src = net.root / "holiday photo.jpg"
    digest = random_file(src, 5 * GROUP + 12345)  # not a multiple of a chunk or a group
    proc = run_cli(net.home("alice"), "send-file", "bob", str(src), "--wait", timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    got = one_file(net.home("bob"), "in")
    assert got["state"] == "done" and got["name"] == "holiday photo.jpg"
    final = Path(got["path"])
    assert final == net.downloads("bob") / "holiday photo.jpg"
    assert hashlib.sha256(final.read_bytes()).hexdigest() == digest
    assert list(net.downloads("bob").iterdir()) == [final]  # no partial left behind
    sent = one_file(net.home("alice"), "out")
    assert sent["state"] == "done" and sent["bytes_done"] == src.stat().st_size
    # inbox shows a line for it
    proc = run_cli(net.home("bob"), "inbox")
    assert f"alice sent holiday photo.jpg, 5.3 MB: saved to {final}" in proc.stdout
    assert cli_json(net.home("bob"), "files") == files(net.home("bob"))  # as polled


def test_progress_lines_show_rate_and_eta_and_errors_are_clear(net: Net) -> None:
    """`send-file --wait`: progress lines with rate and eta without a terminal, a bar
    redrawn in place on one; clear errors that queue nothing."""
    net.init("alice", "bob", max_rate=2_000_000)
    net.start("alice")
    net.start("bob")
    pin_each_other(net, "alice", "bob")
    src = net.root / "notes.pdf"
    digest = random_file(src, 6 * GROUP)  # 3 s at 2 MB/s: a few progress lines
    proc = run_cli(net.home("alice"), "send-file", "bob", str(src), "--wait", timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("notes.pdf:")]
    assert len(lines) >= 2, proc.stderr
    assert "MB/s" in lines[-1] and "eta" in lines[-1]
    final = Path(one_file(net.home("bob"), "in")["path"])
    assert hashlib.sha256(final.read_bytes()).hexdigest() == digest
    # on a terminal (script(1), util-linux, gives it one): a bar redrawn in place
    again = net.root / "slides.pdf"
    random_file(again, 3 * GROUP)
    command = shlex.join([*p2pd_command(), "--home", str(net.home("alice")), "send-file",
                          "bob", str(again), "--wait"])  # fmt: skip
    tty = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                         timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    shown = tty.stdout.decode()  # bytes: text mode would turn each \r into a newline
    assert tty.returncode == 0, shown
    bars = [b for b in shown.split("\r") if b.startswith("slides.pdf ") and "[" in b]
    assert len(bars) >= 2 and "#" in bars[-1] and "/s  eta" in bars[-1], shown
    assert "slides.pdf:" not in shown  # no plain progress lines on a terminal
    # clear errors, nothing queued
    huge = net.root / "huge.img"
    with open(huge, "wb") as f:  # sparse: 1 TiB + 1 byte, no disk used
        f.truncate((1 << 40) + 1)
    for args, code, words in [
        (("bob", str(huge)), 2, "too big"),
        (("nobody_here", str(src)), 1, "nobody_here"),
        (("bob", str(net.root / "missing.txt")), 2, "no such file"),
        (("bob", str(net.root)), 2, "not a regular file"),
        (("alice", str(src)), 2, "your own handle"),
    ]:
        proc = run_cli(net.home("alice"), "send-file", *args)
        assert proc.returncode == code, (args, proc.stderr)
        assert proc.stderr.startswith("ERROR: ") and words in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert len(files(net.home("alice"))) == 2
    proc = run_cli(net.home("bob"), "accept", "ffffffff")
    assert proc.returncode == 1 and "no transfer" in proc.stderr


def test_auto_accept_limits_and_accept_reject(net: Net) -> None:
    net.init("alice", "bob", "carol", auto_accept_max=1_000_000)
    for handle in ("alice", "bob", "carol"):
        net.start(handle)
    pin_each_other(net, "alice", "bob")
    small, big = net.root / "small.txt", net.root / "big.bin"
    random_file(small, 100_000)
    big_digest = random_file(big, 2 * GROUP)
    for path in (small, big):
        proc = run_cli(net.home("alice"), "send-file", "bob", str(path))
        assert proc.returncode == 0, proc.stderr
    # carol is no contact of bob's: even a small file waits
    proc = run_cli(net.home("carol"), "send-file", "bob", str(small))
    assert proc.returncode == 0, proc.stderr

    def by_name() -> dict[tuple[str, str], dict[str, Any]]:
        return {(f["handle"], f["name"]): f for f in files(net.home("bob"))}

    assert eventually(lambda: len(by_name()) == 3, timeout=30)
    assert eventually(lambda: by_name()[("alice", "small.txt")]["state"] == "done", timeout=30)
    assert by_name()[("alice", "big.bin")]["state"] == "pending"
    assert by_name()[("carol", "small.txt")]["state"] == "pending"
    assert sorted(p.name for p in net.downloads("bob").iterdir()) == ["small.txt"]
    proc = run_cli(net.home("bob"), "inbox")
    assert "alice sent big.bin, 2.1 MB: waiting (p2pd accept" in proc.stdout
    # accept into another directory; reject carol's
    elsewhere = net.root / "elsewhere"
    big_id = by_name()[("alice", "big.bin")]["id"]
    proc = run_cli(net.home("bob"), "accept", big_id[:8], "--to", str(elsewhere))
    assert proc.returncode == 0, proc.stderr
    assert eventually(lambda: by_name()[("alice", "big.bin")]["state"] == "done", timeout=30)
    assert hashlib.sha256((elsewhere / "big.bin").read_bytes()).hexdigest() == big_digest
    proc = run_cli(net.home("bob"), "reject", by_name()[("carol", "small.txt")]["id"][:8])
    assert proc.returncode == 0, proc.stderr
    assert eventually(lambda: one_file(net.home("carol"), "out")["state"] == "rejected", timeout=30)
    assert not (net.downloads("bob") / "small (1).txt").exists()
    sent = {f["name"]: f["state"] for f in files(net.home("alice"))}
    assert sent == {"small.txt": "done", "big.bin": "done"}


def test_empty_file_and_name_collisions(net: Net) -> None:
    net.init("alice", "bob")
    net.start("alice")
    net.start("bob")
    pin_each_other(net, "alice", "bob")
    empty = net.root / ".profile"  # a leading dot: not hidden on arrival
    empty.write_bytes(b"")
    one = net.root / "one.txt"
    one.write_bytes(b"x")
    for path in (empty, one, one):
        proc = run_cli(net.home("alice"), "send-file", "bob", str(path), "--wait", timeout=60)
        assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in net.downloads("bob").iterdir())
    assert names == ["one (1).txt", "one.txt", "profile"]
    assert (net.downloads("bob") / "profile").read_bytes() == b""
    assert (net.downloads("bob") / "one (1).txt").read_bytes() == b"x"


def _bytes_done(net: Net, handle: str, direction: str) -> int:
    rows = [f for f in files(net.home(handle)) if f["direction"] == direction]
    return int(rows[0]["bytes_done"]) if rows else 0


@pytest.mark.parametrize("victim", ["bob", "alice"])
def test_kill_9_mid_transfer_resumes_from_the_last_verified_group(net: Net, victim: str) -> None:
    """kill -9 of the receiver (bob) or the sender (alice) mid-way; restarted, the
    transfer resumes where the receiver's last verified group ended: bob receives at
    most one group twice."""
    net.init("alice", "bob", max_rate=4_000_000)
    net.start("alice")
    net.start("bob")
    pin_each_other(net, "alice", "bob")
    src = net.root / "video.mkv"
    # Killed once 8 groups are in, 8 are left: as many as the sender's window, so it can
    # still be full when bob dies (the bound on alice's resent below). 24 groups (16
    # left) cost 0.4-0.6 s more of the daemons' CPU and 2 s more per run, for nothing
    # more checked.
    size = 16 * GROUP + 777
    digest = random_file(src, size)
    proc = run_cli(net.home("alice"), "send-file", "bob", str(src))
    assert proc.returncode == 0, proc.stderr
    assert eventually(lambda: _bytes_done(net, "bob", "in") >= 8 * GROUP, timeout=60)
    net.daemons[victim].kill()  # SIGKILL: no clean shutdown
    partials = list(net.downloads("bob").glob(".p2pd-*.partial"))
    assert len(partials) == 1 and not (net.downloads("bob") / "video.mkv").exists()
    net.start(victim)
    # Promptly: what is left takes 2 s at 4 MB/s. A restarted bob's NUDGE comes over a
    # new connection while alice's old one looks open until its 30 s idle timeout: her
    # sender took either (half the time the old one, and the test took 40 s, not 13).
    assert eventually(lambda: one_file(net.home("bob"), "in")["state"] == "done", timeout=25)
    got = one_file(net.home("bob"), "in")
    final = Path(got["path"])
    assert hashlib.sha256(final.read_bytes()).hexdigest() == digest
    assert got["resent"] <= GROUP, got  # what bob received twice
    assert list(net.downloads("bob").iterdir()) == [final]
    print(f"kill -9 {victim}: bob received {got['resent']} bytes twice (group {GROUP})")
    sent = one_file(net.home("alice"), "out")
    assert sent["state"] == "done"
    if victim == "bob":  # alice's own count (in memory: a killed alice starts at 0)
        print(f"alice sent {sent['resent']} bytes twice")
        # in flight when bob died: at most the window (8 groups) + the unfinished one
        assert sent["resent"] <= 9 * GROUP, sent


def test_a_corrupted_chunk_group_is_refused_and_fetched_again(net: Net) -> None:
    """The source changes under the sender mid-way (what a forged group looks like to
    the receiver: valid chunk seals, a group hash that does not match): the group is
    refused and counted, nothing reaches the final path, and once the source is right
    again the group is fetched again and the file completes."""
    net.init("alice", "bob", max_rate=4_000_000)
    net.start("alice")
    net.start("bob")
    pin_each_other(net, "alice", "bob")
    src = net.root / "data.bin"
    size = 16 * GROUP
    digest = random_file(src, size)
    original = src.read_bytes()
    proc = run_cli(net.home("alice"), "send-file", "bob", str(src))
    assert proc.returncode == 0, proc.stderr
    assert eventually(lambda: _bytes_done(net, "bob", "in") >= 2 * GROUP, timeout=60)
    flip_at = 12 * GROUP + 5  # a group not sent yet
    with open(src, "r+b") as f:
        f.seek(flip_at)
        f.write(bytes([original[flip_at] ^ 0xFF]))
    assert eventually(lambda: one_file(net.home("bob"), "in")["refused"] >= 1, timeout=60)
    assert not (net.downloads("bob") / "data.bin").exists()
    src.write_bytes(original)
    assert eventually(lambda: one_file(net.home("bob"), "in")["state"] == "done", timeout=90)
    got = one_file(net.home("bob"), "in")
    assert hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest() == digest
    assert got["refused"] >= 1
    assert cli_json(net.home("bob"), "status")["files"]["chunks_refused"] >= 1


def test_a_source_cut_short_mid_way_fails_on_both_sides_and_says_why(net: Net) -> None:
    """The file is cut to half its size while it is sent (deleted and recreated, or
    truncated): the sender tries again a few times (it may be an editor saving), then
    the transfer fails on both sides with the reason; bob does not wait for a sender
    that stopped, and keeps nothing. (Once, such a cut left the receiver waiting in
    silence: this test failed then.)"""
    net.init("alice", "bob", max_rate=4_000_000)
    net.start("alice")
    net.start("bob")
    pin_each_other(net, "alice", "bob")
    src = net.root / "cut.bin"
    random_file(src, 16 * GROUP)
    proc = run_cli(net.home("alice"), "send-file", "bob", str(src))
    assert proc.returncode == 0, proc.stderr
    assert eventually(lambda: _bytes_done(net, "bob", "in") >= 2 * GROUP, timeout=60)
    os.truncate(src, 8 * GROUP)
    assert eventually(lambda: one_file(net.home("alice"), "out")["state"] == "failed", timeout=60)
    assert "cannot read the file" in one_file(net.home("alice"), "out")["error"]
    assert eventually(lambda: one_file(net.home("bob"), "in")["state"] == "failed", timeout=30)
    assert one_file(net.home("bob"), "in")["error"] == "the sender cannot read the file"
    assert list(net.downloads("bob").iterdir()) == []


def test_an_offer_to_an_offline_contact_flows_once_it_is_back(net: Net) -> None:
    """The offer waits (outbox, mailbox) while bob is down; once bob is back it arrives,
    is accepted, and the bytes flow without anyone doing anything."""
    net.init("alice", "bob")
    net.start("alice")
    net.start("bob")
    pin_each_other(net, "alice", "bob")
    net.daemons["bob"].stop()
    src = net.root / "later.bin"
    digest = random_file(src, 3 * GROUP + 5)
    proc = run_cli(net.home("alice"), "send-file", "bob", str(src))
    assert proc.returncode == 0, proc.stderr
    assert one_file(net.home("alice"), "out")["state"] == "offered"
    net.start("bob")
    assert eventually(lambda: one_file(net.home("alice"), "out")["state"] == "done", timeout=90)
    got = one_file(net.home("bob"), "in")
    assert hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest() == digest


def test_an_offer_left_in_the_mailbox_arrives_while_the_sender_is_away(net: Net) -> None:
    """bob is down when alice offers him a file: the offer goes to his DHT mailbox (held
    by carol's node), and alice goes away too. bob starts: the offer is there, accepted,
    though no one could have handed it to him but his mailbox; alice starts again: her
    sender resumes on its own and the file arrives whole."""
    net.init("carol", "alice", "bob")
    net.start("carol")
    net.start("alice")
    net.start("bob")
    pin_each_other(net, "alice", "bob")
    net.daemons["bob"].stop()
    src = net.root / "for later.bin"
    digest = random_file(src, GROUP + 5)
    proc = run_cli(net.home("alice"), "send-file", "bob", str(src))
    assert proc.returncode == 0, proc.stderr
    # the offer is the one message alice left in a mailbox
    assert eventually(
        lambda: control_call(net.home("alice"), "status")["messages"]["sent_mailbox"] == 1,
        timeout=30,
    )
    net.daemons["alice"].stop()
    net.start("bob")  # its one peer is carol
    assert eventually(lambda: [f["state"] for f in files(net.home("bob"))] == ["accepted"], 30)
    got = one_file(net.home("bob"), "in")
    assert got["handle"] == "alice" and got["verified"] and got["bytes_done"] == 0
    assert "(mailbox)" in net.daemons["bob"].log  # its log line says where it came from
    net.start("alice")
    assert eventually(lambda: one_file(net.home("bob"), "in")["state"] == "done", timeout=60)
    got = one_file(net.home("bob"), "in")
    assert hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest() == digest
    assert eventually(lambda: one_file(net.home("alice"), "out")["state"] == "done", timeout=30)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")
def test_a_disk_that_fills_fails_the_transfer_cleanly(net: Net) -> None:
    """bob may write files of at most 3 MB (RLIMIT_FSIZE, as a full disk or a quota
    would refuse him): a 6 MB file fails on both sides, and bob keeps nothing."""
    net.init("alice", "bob")
    net.start("alice")
    net.start("bob", wrapper=("prlimit", f"--fsize={3_000_000}"))
    pin_each_other(net, "alice", "bob")
    src = net.root / "too-big.bin"
    random_file(src, 6_000_000)
    proc = run_cli(net.home("alice"), "send-file", "bob", str(src), "--wait", timeout=120)
    assert proc.returncode == 1 and "not received: too-big.bin: failed" in proc.stderr, proc.stderr
    got = one_file(net.home("bob"), "in")
    assert got["state"] == "failed" and "cannot write" in got["error"], got
    assert one_file(net.home("alice"), "out")["error"] == "the receiver cannot save it"
    assert list(net.downloads("bob").iterdir()) == []
    assert net.daemons["bob"].alive  # and it goes on working: a small file arrives
    small = net.root / "small.txt"
    small.write_bytes(b"fits")
    proc = run_cli(net.home("alice"), "send-file", "bob", str(small), "--wait", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (net.downloads("bob") / "small.txt").read_bytes() == b"fits"


def test_several_files_in_parallel_both_ways(net: Net) -> None:
    """Three files alice -> bob in one command and one bob -> alice at the same time:
    one connection, a stream each, all identical at the end."""
    net.init("alice", "bob")
    net.start("alice")
    net.start("bob")
    pin_each_other(net, "alice", "bob")
    digests = {}
    for name, size in (("a.bin", 3 * GROUP), ("b.bin", GROUP + 1), ("c.bin", 2 * GROUP - 1)):
        digests[name] = random_file(net.root / name, size)
    back = net.root / "reply.bin"
    back_digest = random_file(back, 2 * GROUP)
    paths = [str(net.root / n) for n in digests]
    proc = run_cli(net.home("bob"), "send-file", "alice", str(back))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(net.home("alice"), "send-file", "bob", *paths, "--wait", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {f["name"]: f["state"] for f in json.loads(proc.stdout)} == dict.fromkeys(
        digests, "done"
    )
    for name, digest in digests.items():
        data = (net.downloads("bob") / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest
    assert eventually(lambda: one_file(net.home("alice"), "in")["state"] == "done", timeout=60)
    data = (net.downloads("alice") / "reply.bin").read_bytes()
    assert hashlib.sha256(data).hexdigest() == back_digest


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def dm_round_trip(client: ControlClient, events: ControlClient, text: str) -> float:
    """alice -> bob: ``send``, then her ``delivered`` event for it (bob acked): seconds."""
    t0 = time.perf_counter()
    msg = client.call("send", {"handle": "bob", "text": text})
    deadline = time.monotonic() + 60
    while (left := deadline - time.monotonic()) > 0:
        event = events.next_event(left)
        if (
            event is not None
            and event.get("event") == "message_status"
            and event.get("id") == msg["id"]
            and event.get("state") == "delivered"
        ):
            return time.perf_counter() - t0
    raise AssertionError(f"{text!r} not delivered in 60 s")


def test_40_mb_with_dms_meanwhile_in_bounded_memory(net: Net) -> None:
    """40 MB alice -> bob, as fast as it goes, while alice sends bob DMs one after the
    other and bob runs `p2pd files --follow --json`. What must hold, whatever the load
    on the machine (every figure is against the transfer itself, not the clock):

    - DMs are not held behind the file: several are delivered while it is under way,
      and while each one is in flight the file moves less than half the sender's
      window (8 groups); a DM queued behind the file's data in flight would wait for
      at least that much.
    - The file is not held behind the DMs either: it moves on between the first and
      the last of them.
    - Memory: neither daemon's peak RSS grows by more than 20 MiB, under half the file
      (measured: 4-6 MB, for 100 MB as for 40; a receiver that kept the plaintext
      would hold 40 MB). 40 MB, not 100: the claim is the same at 2.5x less CPU.
    - `files --follow` shows the progress and the end.
    """
    size = 40 * 1000 * 1000 + 4321
    net.init("alice", "bob", auto_accept_max=2 * size)
    net.start("alice")
    net.start("bob")
    pin_each_other(net, "alice", "bob")
    src = net.root / "big.mkv"
    digest = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(size // (1 << 20)):
            block = os.urandom(1 << 20)
            digest.update(block)
            f.write(block)
        block = os.urandom(size % (1 << 20))
        digest.update(block)
        f.write(block)
    pids = {h: d.proc.pid for h, d in net.daemons.items()}
    peak_before = {h: peak_rss(pid) for h, pid in pids.items()}
    follow = popen_cli(net.home("bob"), "files", "--follow", "--json")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follow.stdout or ()), daemon=True)
    reader.start()

    def bytes_in() -> int:
        return int(control_call(net.home("bob"), "status")["files"]["bytes_in"])

    idle: list[float] = []
    during: list[tuple[float, int]] = []  # (seconds, file bytes bob wrote meanwhile)
    progress: list[int] = []  # bob's bytes written once each DM of `during` was delivered
    try:
        with ControlClient(net.home("alice")) as client, ControlClient(net.home("alice")) as ev:
            ev.subscribe()
            idle = [dm_round_trip(client, ev, f"idle {n}") for n in range(5)]
            sent = client.call("send_file", {"handle": "bob", "path": str(src)})
            assert eventually(lambda: bytes_in() > 0, timeout=60)
            for n in range(30):  # bounded; ends with the transfer if it ends first
                before = bytes_in()
                seconds = dm_round_trip(client, ev, f"during {n}")
                after = bytes_in()
                if after >= size:
                    break
                during.append((seconds, after - before))
                progress.append(after)
            assert eventually(
                lambda: client.call("file", {"id": sent["id"]})["state"] == "done", timeout=300
            )
        peak_after = {h: peak_rss(pid) for h, pid in pids.items()}
        assert eventually(lambda: any('"done"' in line for line in lines), timeout=10)
    finally:
        follow.kill()
        follow.wait(10)
        reader.join(10)
    got = one_file(net.home("bob"), "in")
    final = Path(got["path"])
    with open(final, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == digest.hexdigest()
    assert list(net.downloads("bob").iterdir()) == [final]
    moved = [m for _, m in during]
    print(
        f"DMs idle: median {statistics.median(idle) * 1000:.1f} ms; during the transfer "
        f"({len(during)}): median {statistics.median(x for x, _ in during) * 1000:.1f} ms, "
        f"max {max(x for x, _ in during) * 1000:.1f} ms; file bytes moved while a DM was "
        f"in flight: median {statistics.median(moved)}, max {max(moved)}; peak RSS "
        f"before {peak_before}, after {peak_after}"
    )
    assert len(during) >= 3, during  # DMs delivered while the file was under way
    assert progress[-1] > progress[0], progress  # and the file moved on meanwhile
    assert statistics.median(moved) < 4 * GROUP, moved  # half the window of 8 groups
    for handle in pids:
        assert peak_after[handle] - peak_before[handle] < 20 << 20, (peak_before, peak_after)
    events = [json.loads(line) for line in lines if line.startswith("{")]
    ours = [e for e in events if e.get("id") == sent["id"]]
    shown = [e["bytes_done"] for e in ours if e["event"] == "file_progress"]
    assert len(shown) >= 2 and shown == sorted(shown) and shown[-1] > shown[0], shown
    assert ours[-1]["event"] == "file" and ours[-1]["state"] == "done", ours[-1]


#: The calls of test_a_call_during_a_transfer_sounds_like_one_without: 3 s, 150 frames.
#: 2 s saved 0.8 s of CPU but concealed 0-7 frames of 100 during the transfer (3 s: 2-6
#: of 150): the glitches come at the call's start, so a shorter call brings the 10 %
#: bound nearer and the test nearer to flaking.
CALL_SECONDS = 3


def call_bob(net: Net, record: Path) -> dict[str, Any]:
    """A CALL_SECONDS call alice -> bob, tones both ways; bob's side of it (what he heard of
    alice, whose audio crosses the path the file takes): his media statistics."""
    answer = popen_cli(net.home("bob"), "answer", "--wait", "30", "--audio-in", "tone:660",
                       "--record", str(record), "--json")  # fmt: skip
    try:
        call = run_cli(net.home("alice"), "call", "bob", "--audio-in", "tone:440",
                       "--duration", str(CALL_SECONDS), "--json", timeout=90)  # fmt: skip
        out, err = answer.communicate(timeout=60)
    finally:
        answer.kill()
        answer.wait(10)
    assert call.returncode == 0 and answer.returncode == 0, call.stderr + err
    media: dict[str, Any] = json.loads(out)["media"]
    return media


def tone_of(path: Path) -> tuple[float, float]:
    """(dominant frequency in Hz, seconds) of a WAV file."""
    import numpy as np  # only this test needs it

    with wave.open(str(path)) as w:
        rate, channels = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    mono = data[::channels].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(mono))
    return float(np.fft.rfftfreq(len(mono), 1 / rate)[int(spectrum.argmax())]), len(mono) / rate


@pytest.fixture()
def source_dir() -> Iterator[Path]:
    """A directory for a large sparse source file: on tmpfs (/dev/shm) where there is
    one. The sender reads all of a file to hash it before the offer, and reading a
    sparse file's holes the first time cost the kernel 1.0-2.3 s of CPU per 384 MiB on
    this machine's ext4 /tmp (a page of zeros put in the page cache for each), 0.02 s
    on tmpfs (its holes read from the shared zero page). Where the source lies is no
    part of what the test checks."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="p2pd-src-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.serial  # two 3 s calls in real time: frames played and concealed
def test_a_call_during_a_transfer_sounds_like_one_without(net: Net, source_dir: Path) -> None:
    """A 3 s call, then the same call while alice sends bob a file as fast as it goes
    (384 MiB, sparse: it is cancelled after the call). Bob hears alice's tone for the
    whole call and conceals at most 10 % of the frames more than in the quiet call;
    her audio's delay (half the RTT plus his jitter buffer) stays under the time the
    file takes to move half the sender's window (4 groups) at its rate during the call:
    audio queued behind the file's data in flight would wait at least that long. And
    the file moves on during the call (not paused for it). Every bound is against the
    quiet call or the transfer in the same test, so load on the machine moves both
    sides of it. Measured (load 7-8 from other work): 2-6 of 150 frames concealed
    against 0; delay 7 -> 35-95 ms, against a bound of about 300 ms; the same with
    queue_target_ms 0: this checks the call is not starved, not the scavenger's gain
    (docs/BENCHMARKS.md, "Files", has that)."""
    net.init("alice", "bob", auto_accept_max=1 << 40)
    for handle in ("alice", "bob"):
        with open(net.home(handle) / "config.toml", "a") as f:
            f.write(f"auto_accept_daily_per_peer = {1 << 40}\nauto_accept_daily = {1 << 40}\n"
                    '[calls]\naudio_in = "tone:440"\naudio_out = "none"\n')  # fmt: skip
    net.start("alice")
    net.start("bob")
    pin_each_other(net, "alice", "bob")
    quiet = call_bob(net, net.root / "quiet.wav")
    src = source_dir / "film.mkv"
    size = 384 << 20
    with open(src, "wb") as f:
        # 384 MiB, not 1 GiB: alice hashes the whole file before she offers it, and 1 GiB
        # was 2.5 s of her CPU, a third of the test's. 47-50 MB moved by the cancel with
        # 2 s calls (load 3.5); a run that sends it all fails below, not unmeasured.
        f.truncate(size)

    def bytes_in() -> int:
        return int(control_call(net.home("bob"), "status")["files"]["bytes_in"])

    sent = control_call(net.home("alice"), "send_file", {"handle": "bob", "path": str(src)})
    assert eventually(lambda: bytes_in() >= 4 * GROUP, timeout=60)  # under way, queue built
    before = bytes_in()
    busy = call_bob(net, net.root / "busy.wav")
    after = bytes_in()
    control_call(net.home("alice"), "cancel_file", {"id": sent["id"]})
    assert eventually(lambda: one_file(net.home("bob"), "in")["state"] == "cancelled", timeout=30)

    def delay_ms(media: dict[str, Any]) -> float:
        return float(media["rtt_ms"]) / 2 + float(media["jitter_buffer_target_ms"])

    keys = ("audio_frames_played", "audio_frames_concealed", "rtt_ms", "jitter_buffer_target_ms")
    shown = {k: quiet[k] for k in keys}, {k: busy[k] for k in keys}
    print(
        f"quiet call {shown[0]}; during the transfer "
        f"{shown[1]}; the file moved {after - before} bytes during "
        f"the call; audio delay {delay_ms(quiet):.1f} -> {delay_ms(busy):.1f} ms"
    )
    assert after < size, "the transfer ended before the call: nothing was measured"
    assert after - before >= 2 * GROUP, (before, after)  # the file moved on meanwhile
    freq, seconds = tone_of(net.root / "busy.wav")
    assert abs(freq - 440) < 5 and abs(seconds - CALL_SECONDS) <= 0.3, (freq, seconds)
    frames = busy["audio_frames_played"] + busy["audio_frames_concealed"]
    extra = busy["audio_frames_concealed"] - quiet["audio_frames_concealed"]
    assert extra <= 0.10 * frames, (quiet, busy)
    rate = (after - before) / float(busy["duration_s"])  # the file's bytes/s meanwhile
    assert delay_ms(busy) <= 1000 * 4 * GROUP / rate, (delay_ms(busy), rate)
    assert list(net.downloads("bob").iterdir()) == []  # the partial file went with it


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_tmpfs_that_fills_mid_transfer_fails_it_cleanly(net: Net) -> None:
    """bob's files dir is an 80 MB tmpfs of his own (a mount namespace: `unshare -rm`).
    A 12 MB file is accepted (80 MB free: the file and the 64 MB margin fit); mid-way
    the disk fills up (another program, here the test through /proc/PID/root): the
    write fails with ENOSPC, the transfer fails on both sides with the reason (alice
    is told bob cannot save it, not that her data was corrupt), bob's
    partial file is removed; once there is room again a file arrives. (The prlimit
    test above is a quota; this is a full disk.)"""
    net.init("alice", "bob", max_rate=4_000_000)
    dl = net.downloads("bob")
    net.start("alice")
    bob = net.start(
        "bob", wrapper=("unshare", "-rm", "sh", "-c",
                        f'mount -t tmpfs -o size=80m tmpfs "{dl}" && exec "$@"', "sh"),
    )  # fmt: skip
    inside = Path(f"/proc/{bob.proc.pid}/root") / str(dl).lstrip("/")  # bob's view of it
    assert shutil.disk_usage(inside).total <= 80 << 20  # the tmpfs, not the disk
    pin_each_other(net, "alice", "bob")
    src = net.root / "film.bin"
    random_file(src, 12_000_000)
    proc = run_cli(net.home("alice"), "send-file", "bob", str(src))
    assert proc.returncode == 0, proc.stderr
    assert eventually(lambda: _bytes_done(net, "bob", "in") >= 2 * GROUP, timeout=60)
    with open(inside / "filler", "wb") as f:  # fill it up: 1 MiB at a time, bounded
        for _ in range(100):
            try:
                f.write(b"\0" * (1 << 20))
                f.flush()
            except OSError:  # ENOSPC: full
                break
    assert eventually(lambda: one_file(net.home("bob"), "in")["state"] == "failed", timeout=60)
    got = one_file(net.home("bob"), "in")
    assert "No space left on device" in got["error"], got
    assert sorted(p.name for p in inside.iterdir()) == ["filler"]  # no partial, no file
    assert eventually(lambda: one_file(net.home("alice"), "out")["state"] == "failed", timeout=60)
    # told why: her file is fine (it was "corrupt" before REFUSE reason 6)
    assert one_file(net.home("alice"), "out")["error"] == "the receiver cannot save it"
    (inside / "filler").unlink()
    small = net.root / "note.txt"
    small.write_bytes(b"room again")
    proc = run_cli(net.home("alice"), "send-file", "bob", str(small), "--wait", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (inside / "note.txt").read_bytes() == b"room again"
    assert bob.alive


def test_both_stopped_mid_transfer_resume_when_restarted_sender_last(net: Net) -> None:
    """Both daemons stop mid-way (a shutdown, as for the night); bob starts again first
    (his NUDGE finds nobody), alice later: her loop resumes on its own at start, and bob
    receives at most one group twice. Nothing in a transfer's state depends on how long
    both were down (no timer outlives a daemon), so later is as good as days later."""
    net.init("alice", "bob", max_rate=4_000_000)
    net.start("alice")
    net.start("bob")
    pin_each_other(net, "alice", "bob")
    src = net.root / "backup.tar"
    # Stopped once 4 groups are in, 8 are left: 2 s at 4 MB/s between the poll and the
    # stop (16 groups, 12 left, cost 0.2-0.4 s more CPU and 1 s more per run).
    digest = random_file(src, 12 * GROUP + 99)
    proc = run_cli(net.home("alice"), "send-file", "bob", str(src))
    assert proc.returncode == 0, proc.stderr
    assert eventually(lambda: _bytes_done(net, "bob", "in") >= 4 * GROUP, timeout=60)
    assert net.daemons["alice"].stop() == 0 and net.daemons["bob"].stop() == 0
    net.start("bob")
    assert one_file(net.home("bob"), "in")["state"] == "accepted"
    # bob's NUDGE to alice goes nowhere (about 3 s: its connection attempt times out);
    # a fixed 2 s here let alice come up while it still tried, and it could reach her
    assert eventually(lambda: "could not tell alice about file" in net.daemons["bob"].log, 30)
    net.start("alice")
    assert eventually(lambda: one_file(net.home("bob"), "in")["state"] == "done", timeout=90)
    got = one_file(net.home("bob"), "in")
    assert hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest() == digest
    assert got["resent"] <= GROUP, got
    assert eventually(lambda: one_file(net.home("alice"), "out")["state"] == "done", timeout=30)


def _row(net: Net, handle: str, tid: str) -> dict[str, Any]:
    """The transfer whose id starts with ``tid``, as ``p2pd files --json`` shows it."""
    rows = [f for f in files(net.home(handle)) if f["id"].startswith(tid)]
    assert len(rows) == 1, rows
    return rows[0]


def _row_shows(net: Net, handle: str, tid: str, check: Callable[[dict[str, Any]], bool]) -> bool:
    """Whether ``handle`` lists the transfer yet and it passes ``check``: for polling (the
    receiver lists an offer only once it arrived, a moment after `send-file` returned:
    with forked CLI calls, a first poll came before it, in a clean-clone CI run)."""
    rows = [f for f in files(net.home(handle)) if f["id"].startswith(tid)]
    assert len(rows) <= 1, rows
    return bool(rows) and check(rows[0])


def test_cancel_from_either_side_through_the_cli_and_what_files_follow_shows(net: Net) -> None:
    """`p2pd cancel` by the receiver (bob) mid-way, then by the sender (alice): the other
    side is told and stops sending, both show "cancelled", bob keeps nothing (no final
    file, no partial); cancelling again (exit 2) or an unknown id (exit 1) is a clear error.
    Bob's `p2pd files --follow` (no --json) shows each transfer's state changes and its
    progress lines, as a person reads them."""
    net.init("alice", "bob", max_rate=2_000_000)
    net.start("alice")
    net.start("bob")
    pin_each_other(net, "alice", "bob")
    follow = popen_cli(net.home("bob"), "files", "--follow")
    shown: list[str] = []  # the reader ends when the process does (terminated below)
    reader = threading.Thread(target=lambda: shown.extend(follow.stdout or ()), daemon=True)
    reader.start()
    tids = {}
    try:
        for canceller, name in (("bob", "first.bin"), ("alice", "second.bin")):
            random_file(net.root / name, 12 * GROUP)  # 6 s at 2 MB/s: time to cancel
            proc = run_cli(net.home("alice"), "send-file", "bob", str(net.root / name))
            assert proc.returncode == 0, proc.stderr
            tid = tids[name] = proc.stdout.split("id ")[-1].strip()
            assert eventually(
                lambda t=tid: _row_shows(net, "bob", t, lambda r: r["bytes_done"] >= GROUP), 60
            )
            proc = run_cli(net.home(canceller), "cancel", tid)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.startswith(f"{tid}  cancelled ") and name in proc.stdout
            for side in ("alice", "bob"):
                assert eventually(
                    lambda s=side, t=tid: _row_shows(
                        net, s, t, lambda r: r["state"] == "cancelled"
                    ),
                    timeout=20,
                ), _row(net, side, tid)
            told = "alice" if canceller == "bob" else "bob"  # and who it was, as it is shown
            assert _row(net, canceller, tid)["error"] == ""
            assert _row(net, told, tid)["error"] == f"cancelled by {canceller}"
            sent = _row(net, "alice", tid)["bytes_done"]
            time.sleep(1.0)  # the sender stopped: nothing more goes out
            assert _row(net, "alice", tid)["bytes_done"] == sent < 12 * GROUP
            assert list(net.downloads("bob").iterdir()) == []  # no final file, no partial
            for who in ("alice", "bob"):
                proc = run_cli(net.home(who), "cancel", tid)
                assert proc.returncode == 2, proc.stderr  # a usage error
                assert proc.stderr == f"ERROR: transfer {tid} is already cancelled\n"
        proc = run_cli(net.home("bob"), "cancel", "ffffffff")
        assert proc.returncode == 1 and "no transfer" in proc.stderr, proc.stderr
        assert eventually(lambda: sum("cancelled" in line for line in shown) >= 2, timeout=10)
    finally:
        follow.terminate()
        follow.wait(timeout=10)
        reader.join(timeout=10)
    print("".join(shown))
    for name, tid in tids.items():
        mine = [line for line in shown if line.startswith(tid) or line.startswith(f"{name}:")]
        states = [line.split()[1] for line in mine if line.startswith(tid)]
        assert states[0] == "accepted" and states[-1] == "cancelled", mine
        by_alice = name == "second.bin"  # bob was told: he sees who
        assert mine[-1].endswith("  [cancelled by alice]\n") == by_alice, mine
        progress = [line for line in mine if line.startswith(f"{name}:")]
        assert progress and "% " in progress[0] and "/s" in progress[0], mine
        assert any("eta -" not in line for line in progress), progress  # 2 MB/s: seconds
