"""Test daemons forked from a template that has imported them (p2pd/testing/forkserver.py).

A forked child must start as an exec'd process would: its own pid, the environment,
working directory, umask, stdio, signal dispositions and exit status it was given, and
none of the template's descriptors or threads. These tests fork from the template
whatever ``P2PD_TEST_FORK`` says (the rest of the suite uses it only when it is 1), and
compare with the same thing exec'd."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from p2pd.testing import daemons, forkserver
from p2pd.testing.daemons import (
    DaemonProcess,
    cli_json,
    control_call,
    p2pd_command,
    run_cli,
    short_tempdir,
    wait_until,
)
from p2pd.testing.netns import Testbed

pytestmark = [
    pytest.mark.slow,
    # Under `scripts/test --coverage` every daemon and CLI call is exec'd, so that each
    # is measured from its start (p2pd/testing/daemons.py `_coverage`): there is no
    # fork to test, and all 17 tests of forking failed there. Never under CI, which
    # runs without coverage (.ci/run).
    pytest.mark.skipif(
        daemons._coverage() and not os.environ.get("CI"),
        reason="coverage execs every daemon and CLI call: nothing is forked to test",
    ),
]

PROBE = "p2pd.testing.forktemplate:probe"
PROBE_CODE = f"from {PROBE.replace(':', ' import ')}; probe()"


@pytest.fixture()
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-fork-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def started() -> Iterator[list[DaemonProcess]]:
    """Daemons a test started, stopped at its end whatever happened (killed by pid when
    their template is gone: a failed test leaves no daemon running)."""
    daemons_started: list[DaemonProcess] = []
    yield daemons_started
    for d in daemons_started:
        try:
            d.stop()
        except forkserver.TemplateError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(d.proc.pid, signal.SIGKILL)


@pytest.fixture()
def forking() -> Iterator[None]:
    """DaemonProcess forks its daemons here, whatever P2PD_TEST_FORK says."""
    before = daemons._fork
    daemons.use_forkserver(True)
    yield
    daemons.use_forkserver(before)


def probe_env() -> dict[str, str]:
    """The worker's environment with one variable more and one fewer: what the child
    sees must be this, not the template's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env["P2PD_FORK_PROBE"] = "é ✓"  # non-ASCII too
    return env


def forked_probe(code: str, env: dict[str, str], program: str = sys.executable) -> tuple[int, str]:
    proc = forkserver.spawn([program, code], env, entry=PROBE)
    returncode = proc.wait(30)
    return returncode, proc.stderr.read()


def execd_probe(code: str, env: dict[str, str], wrapper: Sequence[str] = ()) -> tuple[int, str]:
    proc = subprocess.run(
        [*wrapper, sys.executable, "-c", PROBE_CODE, code],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=30,
    )
    return proc.returncode, proc.stderr


def state(stderr: str) -> dict[str, Any]:
    return json.loads(stderr.splitlines()[0])  # type: ignore[no-any-return]


def test_a_caller_ignoring_sigint_gets_a_child_that_ignores_it_as_exec_gives() -> None:
    """An ignored SIGINT survives exec: a child of a worker ignoring it ignores it too,
    forked or exec'd (a full suite run with P2PD_TEST_FORK=0 found them differ, a worker
    ignoring SIGINT by then); a caller that handles it gets KeyboardInterrupt's handler."""
    env = probe_env()
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forked, execd = forked_probe("0", env), execd_probe("0", env)
    finally:
        signal.signal(signal.SIGINT, before)
    assert state(execd[1])["signals"]["SIGINT"] == repr(signal.SIG_IGN)
    assert state(forked[1])["signals"] == state(execd[1])["signals"]
    handled = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        forked, execd = forked_probe("0", env), execd_probe("0", env)
    finally:
        signal.signal(signal.SIGINT, handled)
    assert state(forked[1])["signals"] == state(execd[1])["signals"]
    assert state(forked[1])["signals"]["SIGINT"] == repr(signal.default_int_handler)


def test_a_forked_child_starts_as_an_execd_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe, forked twice and exec'd once in another working directory and under
    another umask: the same environment, cwd, umask, argv, signal dispositions, signal
    mask, stdio (/dev/null in, the same kinds of stream, encodings, buffering), only
    fds 0-2 open (3 is the probe's own listing of /proc/self/fd), one thread, no logging
    handler; its own pid and Python random state; the same exit code and message."""
    monkeypatch.chdir(tmp_path)
    env = probe_env()
    program = tmp_path / "p2pd-probe"  # a program of another name than python's
    program.symlink_to(sys.executable)
    mask = os.umask(0o027)
    try:
        one = forked_probe("3", env, str(program))
        two = forked_probe("3", env, str(program))
        execd = execd_probe("3", env)
    finally:
        os.umask(mask)
    assert one[0] == two[0] == execd[0] == 3
    first, second, reference = state(one[1]), state(two[1]), state(execd[1])
    assert reference["env"] == env and reference["cwd"] == str(tmp_path)  # the check can fail
    assert reference["umask"] == 0o027 and reference["stdin"] == ["/dev/null", ""]
    for forked in (first, second):
        assert forked["pid"] not in (os.getpid(), reference["pid"])
        assert forked["ppid"] != os.getpid()  # the template's child, not the worker's
        for key in set(reference) - {"pid", "ppid", "random", "comm"}:
            assert forked[key] == reference[key], key
    assert first["comm"] == second["comm"] == "p2pd-probe" != reference["comm"]
    assert first["pid"] != second["pid"] and first["ppid"] == second["ppid"]
    assert first["random"] != second["random"]
    # sys.exit("message") as the interpreter does it: the message on stderr, code 1
    assert forked_probe("bye", env)[0] == execd_probe("bye", env)[0] == 1
    assert forked_probe("bye", env)[1].splitlines()[-1] == "bye"


@pytest.mark.netns
def test_a_child_forked_into_a_namespace_sees_what_ip_netns_exec_gives(
    testbed: Testbed, root: Path, forking: None, started: list[DaemonProcess]
) -> None:
    """The probe forked with ``netns`` and exec'd under ``ip netns exec``: the same
    network namespace (not the worker's), the same interfaces and addresses (getifaddrs,
    if_nameindex, /sys/class/net: only the host's lo and eth0 with its LAN address, none
    of the machine's), each in a mount namespace of its own with /etc/netns/NAME/hosts
    bound on /etc/hosts, and the rest as in the test above. A daemon of that host is
    forked too, lives in that namespace and listens on the host's address; a missing
    namespace fails as ip does (exit 255, its message)."""
    host = testbed.host("h1", testbed.lan("lan0", "198.51.100.0/24"))
    etc = Path("/etc/netns") / host.netns
    etc.mkdir(parents=True)
    try:
        (etc / "hosts").write_text("198.51.100.11 h1.forkprobe\n")
        env = probe_env()
        proc = forkserver.spawn([sys.executable, "0"], env, entry=PROBE, netns=host.netns)
        assert proc.wait(30) == 0
        forked = state(proc.stderr.read())
        code, stderr = execd_probe("0", env, wrapper=host.command([]))
        assert code == 0, stderr
        reference = state(stderr)
    finally:
        shutil.rmtree(etc)
    mine = os.readlink("/proc/self/ns/net"), os.readlink("/proc/self/ns/mnt")
    inode = os.stat(f"/run/netns/{host.netns}").st_ino  # (a bind mount of the nsfs file)
    assert reference["netns"] == f"net:[{inode}]" != mine[0]
    assert reference["interfaces"] == ["eth0", "lo"]
    assert f"eth0 {host.address}/24" in reference["addresses"]
    assert reference["etc_hosts"] == "198.51.100.11 h1.forkprobe\n"
    # Each its own mount namespace, not the worker's. (Not "not each other's": the
    # forked probe's namespace is freed when it exits, and the kernel may give its
    # inode number to the exec'd probe's, as it did in one run.)
    assert forked["mntns"] != mine[1] and reference["mntns"] != mine[1]
    for key in set(reference) - {"pid", "ppid", "random", "comm", "mntns"}:
        assert forked[key] == reference[key], key
    # a CLI call left running in the host (popen: the netns tests' `p2pd answer`)
    popened = forkserver.popen([sys.executable, "0"], env, entry=PROBE, netns=host.netns)
    out, err = popened.communicate(30)
    assert popened.returncode == 0 and out == '["0"] stdout ✓\n'
    assert state(err)["netns"] == reference["netns"]
    assert state(err)["addresses"] == reference["addresses"]
    missing = forkserver.spawn([sys.executable], env, entry=PROBE, netns="p2pd-no-such-ns")
    assert missing.wait(30) == 255
    assert 'Cannot open network namespace "p2pd-no-such-ns"' in missing.stderr.read()

    assert run_cli(root / "a", "init", "alice", "--no-passphrase").returncode == 0
    daemon = DaemonProcess(root / "a", listen="0.0.0.0:4747", wrapper=host.command([]))
    started.append(daemon)
    assert daemon.wait_ready().forked
    assert os.readlink(f"/proc/{daemon.proc.pid}/ns/net") == reference["netns"]
    listening = host.run(["ss", "-Hlun", "sport = :4747"]).stdout
    assert "0.0.0.0:4747" in listening, listening
    assert daemon.stop() == 0, daemon.log
    other = DaemonProcess(root / "a", wrapper=("prlimit", "--nofile=512"))
    started.append(other)
    assert not other.forked  # any other wrapper is exec'd


def test_a_daemon_under_prlimit_fsize_is_forked_with_the_limit_prlimit_gives(
    root: Path, forking: None, started: list[DaemonProcess]
) -> None:
    """``prlimit --fsize=N`` (test_files_e2e's disk that fills): the probe forked with
    ``fsize`` and exec'd under prlimit see the same RLIMIT_FSIZE, N soft and hard (not
    the worker's), and the rest as an exec'd child; a DaemonProcess with that wrapper is
    forked and the kernel shows its limit in /proc/PID/limits."""
    import resource

    n = 3_000_000
    assert resource.getrlimit(resource.RLIMIT_FSIZE) != (n, n)  # the check can fail
    env = probe_env()
    proc = forkserver.spawn([sys.executable, "0"], env, entry=PROBE, fsize=n)
    assert proc.wait(30) == 0
    forked = state(proc.stderr.read())
    code, stderr = execd_probe("0", env, wrapper=("prlimit", f"--fsize={n}"))
    assert code == 0, stderr
    reference = state(stderr)
    assert reference["fsize"] == forked["fsize"] == [n, n]
    for key in set(reference) - {"pid", "ppid", "random", "comm"}:
        assert forked[key] == reference[key], key
    assert run_cli(root / "a", "init", "alice", "--no-passphrase").returncode == 0
    daemon = DaemonProcess(root / "a", wrapper=("prlimit", f"--fsize={n}"))
    started.append(daemon)
    assert daemon.wait_ready().forked
    limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text().splitlines()
    fsize = [line.split()[3:5] for line in limits if line.startswith("Max file size")]
    assert fsize == [[str(n), str(n)]], limits
    assert daemon.stop() == 0, daemon.log


def test_a_forked_cli_call_returns_what_subprocess_run_does(tmp_path: Path) -> None:
    """forkserver.run against subprocess.run with capture_output and text: the probe's
    stdout (non-ASCII, "\\r\\n" translated), its stderr (the state: the environment
    given, cwd, stdin /dev/null, stdout and stderr pipes, fds 0-2 only) and its exit
    code, as a CompletedProcess with the same args."""
    env = probe_env()
    args = [sys.executable, "-c", PROBE_CODE, "7"]
    forked = forkserver.run([sys.executable, "7"], env, entry=PROBE, timeout=30)
    execd = subprocess.run(
        args, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
    )
    assert execd.returncode == forked.returncode == 7
    assert execd.stdout == forked.stdout == '["7"] stdout ✓\n'
    mine, reference = state(forked.stderr), state(execd.stderr)
    assert reference["env"] == env and reference["stdout"].startswith("pipe:")
    assert mine["stdout"].startswith("pipe:") and mine["stdout"] != reference["stdout"]
    for key in set(reference) - {"pid", "ppid", "random", "comm", "stdout"}:
        assert mine[key] == reference[key], key
    assert forked.args == [sys.executable, "7"]
    assert isinstance(forked, subprocess.CompletedProcess)
    for code in ("bye", "-1", "0"):  # a message: status 1; -1: 255 (the exit quick_exit does)
        one = forkserver.run([sys.executable, code], env, entry=PROBE, timeout=30)
        two = subprocess.run(
            [sys.executable, "-c", PROBE_CODE, code],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert one.returncode == two.returncode == {"bye": 1, "-1": 255, "0": 0}[code]
        assert one.stderr.splitlines()[1:] == two.stderr.splitlines()[1:]
        assert one.stdout == two.stdout == f'["{code}"] stdout ✓\n'
    # input: stdin a pipe that carries it and ends (`p2pd send bob -`), as run(input=)
    typed = "line one ✓\nline two" + "x" * 200_000  # more than a pipe holds at once
    fed = forkserver.run([sys.executable, "0"], env, entry=PROBE, timeout=30, input=typed)
    ref = subprocess.run(
        [sys.executable, "-c", PROBE_CODE, "0"],
        env=env,
        input=typed,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert fed.returncode == ref.returncode == 0, fed.stderr
    (fed_path, fed_text), (ref_path, ref_text) = (
        state(fed.stderr)["stdin"],
        state(ref.stderr)["stdin"],
    )
    assert fed_text == ref_text == typed
    assert fed_path.startswith("pipe:") and ref_path.startswith("pipe:")


def test_p2pd_test_profile_writes_each_forked_calls_profile(root: Path) -> None:
    """``P2PD_TEST_PROFILE=DIR`` (what finds where a forked daemon or CLI call spends its
    CPU): each forked child writes its cProfile statistics to DIR, named after its
    command, and still prints and exits as without it."""
    import pstats

    env = {**os.environ, "P2PD_TEST_PROFILE": str(root)}
    argv = [*p2pd_command(), "--home", str(root / "home"), "init", "alice", "--no-passphrase"]
    done = forkserver.run(argv, env, timeout=60)
    assert done.returncode == 0, done.stderr
    again = forkserver.run(argv, env, timeout=60)  # exists: exit 1, its message
    assert again.returncode == 1 and "already exists" in again.stderr
    written = sorted(p.name for p in root.glob("*.prof"))
    assert len(written) == 2 and all(name.startswith("init-") for name in written), written
    stats = pstats.Stats(str(root / written[0]))
    called = {function for (_, _, function) in stats.stats}  # type: ignore[attr-defined]
    assert "init" in called, sorted(called)[:20]  # the command's own function, profiled


@pytest.mark.parametrize(
    "args",
    [
        ("init", "alice", "--no-passphrase"),  # exists: exit 1, on stderr
        ("init", "Alice", "--no-passphrase"),  # usage error: exit 2
        ("status", "--json"),  # no daemon: exit 1
        ("contacts", "--json"),  # stdout, exit 0
        ("--help",),
        ("no-such-command",),
    ],
)
def test_forked_and_execd_cli_calls_print_the_same(
    root: Path, args: tuple[str, ...], forking: None
) -> None:
    """The real CLI through run_cli, forked and exec'd, on one home: the same stdout,
    stderr and exit code, byte for byte."""
    daemons.use_forkserver(False)
    assert run_cli(root / "a", "init", "alice", "--no-passphrase").returncode == 0
    execd = run_cli(root / "a", *args)
    daemons.use_forkserver(True)
    before = forkserver.cpu_seconds()
    forked = run_cli(root / "a", *args)
    assert forkserver.cpu_seconds() > before  # the forked CLI's CPU is counted
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        execd.returncode,
        execd.stdout,
        execd.stderr,
    )
    assert forked.stdout or forked.stderr  # the comparison can fail
    assert forked.args == execd.args


def test_a_forked_cli_call_that_overruns_is_killed(root: Path, forking: None) -> None:
    """timeout as subprocess.run honours it: TimeoutExpired with the output so far (as
    bytes) once the call, here a daemon, has been killed; it serves no more."""
    assert run_cli(root / "a", "init", "alice", "--no-passphrase").returncode == 0
    listen = daemons.loopback_listen()
    with pytest.raises(subprocess.TimeoutExpired) as raised:
        run_cli(root / "a", "daemon", "--listen", listen, "--lan", "off", timeout=8)
    assert raised.value.timeout == 8
    assert b"ready: handle=alice" in raised.value.stderr, raised.value.stderr
    assert raised.value.output == b""
    status = run_cli(root / "a", "status")
    assert status.returncode != 0, status.stdout


def status_of(daemon: DaemonProcess) -> dict[str, Any]:
    return cli_json(daemon.home, "status")  # type: ignore[no-any-return]


def ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def test_two_forked_daemons_are_two_nodes_that_exchange_a_dm(root: Path, forking: None) -> None:
    """alice and bob forked from one template: their own pids (children of the template,
    not of the test), their own ports and node keys (made at their first start), stdin
    and stdout /dev/null, stderr the pipe that carries the ready line and the logs; a
    DM from alice to bob through the real CLI; SIGTERM ends each with 0, as exec'd."""
    for handle in ("alice", "bob"):
        assert run_cli(root / handle, "init", handle, "--no-passphrase").returncode == 0
    alice = DaemonProcess(root / "alice").wait_ready()
    try:
        bob = DaemonProcess(root / "bob", bootstrap=[alice.listen]).wait_ready()
        try:
            assert alice.forked and bob.forked
            assert alice.proc.poll() is None and bob.proc.poll() is None
            pids = {alice.proc.pid, bob.proc.pid, os.getpid()}
            assert len(pids) == 3
            assert ppid(alice.proc.pid) == ppid(bob.proc.pid) != os.getpid()
            for d in (alice, bob):
                assert os.readlink(f"/proc/{d.proc.pid}/fd/0") == "/dev/null"
                assert os.readlink(f"/proc/{d.proc.pid}/fd/1") == "/dev/null"
                assert os.readlink(f"/proc/{d.proc.pid}/fd/2").startswith("pipe:")
                comm = Path(f"/proc/{d.proc.pid}/comm").read_text().strip()
                assert comm == Path(p2pd_command()[0]).name[:15]  # "p2pd", as exec'd
                assert "INFO p2pd.daemon" in d.log and "ready: handle=" in d.log
            states = [status_of(alice), status_of(bob)]
            assert [s["handle"] for s in states] == ["alice", "bob"]
            assert [s["fingerprint"] for s in states] == [alice.fingerprint, bob.fingerprint]
            assert states[0]["listen"] != states[1]["listen"]
            assert states[0]["node_id"] != states[1]["node_id"]
            text = "hello bob, forked ✓"
            proc = run_cli(root / "alice", "send", "bob", text, "--wait", "--timeout", "30")
            assert proc.returncode == 0, proc.stderr + alice.log + bob.log
            # `--from alice` lists what came from alice's pinned key: bob pins it once he
            # has checked it against the DHT, a moment after he acknowledged the DM (in a
            # run at load 4 the first look came before: an empty list)
            contacts = lambda: control_call(root / "bob", "contacts")  # noqa: E731
            assert wait_until(lambda: "alice" in {c["handle"] for c in contacts()}, 20), bob.log
            inbox = run_cli(root / "bob", "inbox", "--json", "--from", "alice")
            assert [json.loads(line)["text"] for line in inbox.stdout.splitlines()] == [text]
        finally:
            assert bob.stop() == 0, bob.log
    finally:
        assert alice.stop() == 0, alice.log
    assert "stopped" in alice.log and "stopped" in bob.log


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "execd"])
def test_exit_status_is_what_popen_gives(
    root: Path, fork: bool, started: list[DaemonProcess]
) -> None:
    """poll() is None while it runs; SIGTERM: 0 and a clean stop; SIGKILL: -9; a daemon
    that cannot start (no identity): 1 and the error on stderr. The same forked as
    exec'd."""
    before = daemons._fork
    daemons.use_forkserver(fork)
    try:
        assert run_cli(root / "a", "init", "alice", "--no-passphrase").returncode == 0
        first = DaemonProcess(root / "a")
        started.append(first)
        first.wait_ready()
        assert first.forked == fork
        assert first.proc.poll() is None and first.proc.returncode is None
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(15) == 0, first.log
        assert first.proc.poll() == 0 and "stopped" in first.log
        second = DaemonProcess(root / "a")
        started.append(second)
        second.wait_ready().proc.kill()
        assert second.proc.wait(15) == -signal.SIGKILL
        second.proc.send_signal(signal.SIGTERM)  # no-op once reaped, as Popen
        third = DaemonProcess(root / "nobody")
        started.append(third)
        assert third.proc.wait(15) == 1
        third.stop()
        assert "ERROR: no identity in" in third.log and "Traceback" not in third.log
        fourth = DaemonProcess(root / "a")
        started.append(fourth)
        with pytest.raises(subprocess.TimeoutExpired):
            fourth.wait_ready().proc.wait(0.1)
    finally:
        daemons.use_forkserver(before)


def test_the_environment_given_is_the_one_used(root: Path) -> None:
    """A daemon forked without --home finds its home in P2PD_HOME of the environment it
    was given (the template's has none, or another)."""
    assert run_cli(root / "c", "init", "carol", "--no-passphrase").returncode == 0
    env = {**os.environ, "P2PD_HOME": str(root / "c")}
    args = ["p2pd", "daemon", "--listen", daemons.loopback_listen(), "--lan", "off"]
    proc = forkserver.spawn(args, env)
    try:
        assert wait_until(lambda: (root / "c" / "control.sock").exists(), timeout=30)
        assert wait_until(lambda: status_of_home(root / "c") == "carol", timeout=30)
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    log = proc.stderr.read()
    assert "ready: handle=carol" in log, log


def status_of_home(home: Path) -> str | None:
    proc = run_cli(home, "status", "--json")
    return json.loads(proc.stdout)["handle"] if proc.returncode == 0 else None  # type: ignore[no-any-return]


def test_forked_daemons_cpu_is_counted(
    root: Path, forking: None, started: list[DaemonProcess]
) -> None:
    """The daemon's CPU, from the template's wait4, reaches cpu_seconds (what conftest
    adds to each test's cpu_s) once it has been waited for: at least what /proc said it
    had used before it was stopped."""
    assert run_cli(root / "a", "init", "alice", "--no-passphrase").returncode == 0
    before = forkserver.cpu_seconds()
    daemon = DaemonProcess(root / "a")
    started.append(daemon)
    assert daemon.wait_ready().forked
    for _ in range(40):  # some work for /proc to see (a status is ~2 ms of its CPU)
        control_call(daemon.home, "status")
    fields = Path(f"/proc/{daemon.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    assert daemon.stop() == 0
    counted = forkserver.cpu_seconds() - before
    assert counted > 0 and counted >= used, (counted, used)


def test_a_forked_daemon_nobody_waits_for_is_counted_when_it_ends(
    root: Path, forking: None, started: list[DaemonProcess]
) -> None:
    """Killed by pid (as a netns testbed kills its namespaces' processes) and never
    waited for: its CPU reaches cpu_seconds once it has ended, as an exec'd one reaches
    RUSAGE_CHILDREN when subprocess reaps it; not before it ends."""
    assert run_cli(root / "a", "init", "alice", "--no-passphrase").returncode == 0
    daemon = DaemonProcess(root / "a")
    started.append(daemon)
    assert daemon.wait_ready().forked
    for _ in range(40):
        control_call(daemon.home, "status")
    before = forkserver.cpu_seconds()
    fields = Path(f"/proc/{daemon.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    assert used > 0
    os.kill(daemon.proc.pid, signal.SIGKILL)
    assert wait_until(lambda: forkserver.cpu_seconds() - before >= used, timeout=15)
    assert daemon.proc.returncode == -signal.SIGKILL  # read by cpu_seconds, not waited


def test_a_dead_template_is_a_loud_error_not_an_execd_daemon(
    root: Path, forking: None, started: list[DaemonProcess]
) -> None:
    """The template killed under a running daemon: waiting for that daemon raises (its
    status is lost), and so does the next start, rather than quietly exec'ing. Then a
    new template serves (shutdown forgets the dead one)."""
    assert run_cli(root / "a", "init", "alice", "--no-passphrase").returncode == 0
    daemon = DaemonProcess(root / "a")
    started.append(daemon)
    daemon.wait_ready()
    assert forkserver._template is not None
    os.kill(forkserver._template.pid, signal.SIGKILL)
    try:
        with pytest.raises(forkserver.TemplateError, match="ended before daemon"):
            daemon.proc.wait(15)
        with pytest.raises(forkserver.TemplateError):
            DaemonProcess(root / "a")
    finally:
        os.kill(daemon.proc.pid, signal.SIGKILL)  # an orphan now: init reaps it
        forkserver.shutdown()
    assert wait_until(lambda: gone(daemon.proc.pid), timeout=15)
    again = DaemonProcess(root / "a")
    started.append(again)
    assert again.wait_ready().forked and again.stop() == 0


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def children_and_forked_cpu() -> float:
    """What conftest counts for a test, less the test process's own CPU."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + forkserver.cpu_seconds()


def test_ending_the_template_does_not_count_its_daemons_twice(
    root: Path, forking: None, started: list[DaemonProcess]
) -> None:
    """Reaping the template puts its daemons' CPU (and its own) in the worker's
    RUSAGE_CHILDREN, where the daemons' exit messages had counted it already: what the
    test harness counts jumps by no more than the template's CPU since its last message
    (it was idle), not by the ~0.5 s of its imports and the daemon's CPU again."""
    assert run_cli(root / "a", "init", "alice", "--no-passphrase").returncode == 0
    forkserver.shutdown()  # a template of this test's own: no other test's daemons in it
    start = children_and_forked_cpu()
    daemon = DaemonProcess(root / "a")
    started.append(daemon)
    assert daemon.wait_ready().stop() == 0
    counted = children_and_forked_cpu()
    forkserver.shutdown()
    jump = children_and_forked_cpu() - counted
    assert counted - start > 0.2  # the template's imports at least: the check can fail
    assert jump < 0.1, (counted - start, jump)


def test_a_forked_popen_communicates_as_popen_does(root: Path, forking: None) -> None:
    """forkserver.popen against Popen(stdout=PIPE, stderr=PIPE, text=True): the probe's
    stdout and stderr from communicate() (newlines translated), its exit code, the same
    state but for the pipes' identities. popen_cli with a real daemon: communicate's
    timeout raises without killing it, keeps what was read, and the call after SIGTERM
    returns all of its stderr (the ready line from before the timeout included) and 0;
    popen_cli's output is the exec'd one's for a short CLI call too."""
    env = probe_env()
    forked = forkserver.popen([sys.executable, "4"], env, entry=PROBE)
    execd = subprocess.Popen(
        [sys.executable, "-c", PROBE_CODE, "4"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    (out, err), (ref_out, ref_err) = forked.communicate(30), execd.communicate(timeout=30)
    assert forked.returncode == execd.returncode == 4
    assert out == ref_out == '["4"] stdout ✓\n'
    mine, reference = state(err), state(ref_err)
    assert reference["env"] == env and reference["stdout"].startswith("pipe:")
    for key in set(reference) - {"pid", "ppid", "random", "comm", "stdout"}:
        assert mine[key] == reference[key], key
    assert run_cli(root / "a", "init", "alice", "--no-passphrase").returncode == 0
    listen = daemons.loopback_listen()
    daemon = daemons.popen_cli(root / "a", "daemon", "--listen", listen, "--lan", "off")
    assert isinstance(daemon, forkserver.ForkedProcess)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            daemon.communicate(timeout=3)
        assert daemon.poll() is None  # not killed
        assert wait_until(lambda: (root / "a" / "control.sock").exists(), timeout=30)
    finally:
        daemon.terminate()
    out, err = daemon.communicate(30)
    assert daemon.returncode == 0 and out == ""
    assert "ready: handle=alice" in err and "stopped" in err, err
    results = []
    for fork in (True, False):
        daemons.use_forkserver(fork)
        proc = daemons.popen_cli(root / "a", "answer", "--help")
        assert isinstance(proc, forkserver.ForkedProcess) == fork
        results.append((*proc.communicate(timeout=30), proc.returncode))
    assert results[0] == results[1] and results[0][2] == 0 and "--wait" in results[0][0], results


def test_a_forked_popens_output_is_read_as_it_comes(root: Path, forking: None) -> None:
    """popen_cli's ``stdout`` and ``stderr`` are text files read while the call runs, as
    Popen's (a test reads `inbox --follow`'s lines so): forked and exec'd, a daemon's
    ready line is read from ``stderr`` before it ends, the rest after SIGTERM; the
    probe's stdout reads as Popen's (newlines translated)."""
    assert run_cli(root / "a", "init", "alice", "--no-passphrase").returncode == 0
    seen = []
    for fork in (True, False):
        daemons.use_forkserver(fork)
        listen = daemons.loopback_listen()
        daemon = daemons.popen_cli(root / "a", "daemon", "--listen", listen, "--lan", "off")
        assert isinstance(daemon, forkserver.ForkedProcess) == fork
        overdue = threading.Timer(60, daemon.kill)  # readline's bound: EOF once killed
        overdue.start()
        try:
            assert daemon.stderr is not None
            first: list[str] = []
            for _ in range(20):  # bounded: up to its ready line, 20 lines at most
                first.append(daemon.stderr.readline())
                if "ready: handle=alice" in first[-1] or not first[-1]:
                    break
            assert "ready: handle=alice" in first[-1], first
            assert daemon.poll() is None  # read while it runs
        finally:
            daemon.terminate()
            overdue.cancel()
        rest = daemon.stderr.read()
        assert daemon.wait(30) == 0 and "stopped" in rest, rest
        seen.append(first[-1].split("ready: ")[1].split()[0])
    assert seen[0] == seen[1] and seen[0].startswith("handle=alice#"), seen
    forked = forkserver.popen([sys.executable, "3"], probe_env(), entry=PROBE)
    assert forked.stdout is not None and forked.stderr is not None
    assert forked.stdout.read() == '["3"] stdout ✓\n'
    assert state(forked.stderr.read())["argv"] == ["3"]
    assert forked.wait(30) == 3


def test_a_child_on_the_callers_descriptors_starts_as_popen_given_them(tmp_path: Path) -> None:
    """forkserver.start (what the flooder is forked with) against Popen given the same
    kinds of descriptor: stdout and stderr are the caller's files (the caller's own
    stay open), stdin /dev/null; the same environment, cwd, fds 0-2 only, the same
    bytes on stdout (no translation: a file, not text mode) and the same exit code."""
    env = probe_env()
    outputs = {name: tmp_path / name for name in ("out1", "err1", "out2", "err2")}
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(path.open("wb")) for name, path in outputs.items()}
        proc = forkserver.start(
            [sys.executable, "5"],
            env,
            entry=PROBE,
            stdout=files["out1"].fileno(),
            stderr=files["err1"].fileno(),
        )
        assert proc.wait(30) == 5 and proc.stderr is None
        execd = subprocess.run(
            [sys.executable, "-c", PROBE_CODE, "5"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=files["out2"],
            stderr=files["err2"],
            timeout=30,
        )
        assert execd.returncode == 5
        files["out1"].write(b"")  # still open: the caller keeps its own
    assert (
        outputs["out1"].read_bytes()
        == outputs["out2"].read_bytes()
        == '["5"] stdout ✓\r\n'.encode()
    )
    mine, reference = (state(outputs[name].read_text()) for name in ("err1", "err2"))
    assert reference["env"] == env and reference["stdout"] == str(outputs["out2"])
    assert mine["stdout"] == str(outputs["out1"])
    for key in set(reference) - {"pid", "ppid", "random", "comm", "stdout"}:
        assert mine[key] == reference[key], key


def children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def test_a_forked_flooder_reports_and_fails_as_an_execd_one(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """p2pd.testing.flood.run (test_floods' flooder), forked from the template and
    exec'd: each says when it is sending, sends to the target (a socket here that reads
    nothing and answers nothing), reports the same counters, and its CPU is counted
    (forked: in cpu_seconds, as the template reports it; exec'd: in RUSAGE_CHILDREN). A
    target off loopback fails both the same way: exit 1, the flooder's ValueError on
    the caller's stderr."""
    import socket

    from p2pd.testing import flood

    before = daemons._fork
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sink.bind(("127.0.0.1", 0))
        sink.setblocking(False)
        target = sink.getsockname()
        for fork in (True, False):
            daemons.use_forkserver(fork)
            forked_cpu, execd_cpu = forkserver.cpu_seconds(), children_cpu()
            starts: list[bool] = []
            on_start = functools.partial(starts.append, True)
            result = await flood.run(target, "ping", 0.5, on_start=on_start)
            assert starts == [True]
            assert set(result) == {"sent", "bytes", "replies", "reply_bytes"}, result
            assert result["sent"] > 100 and result["bytes"] > result["sent"] * 50, result
            assert result["replies"] == result["reply_bytes"] == 0, result
            received = 0
            with contextlib.suppress(BlockingIOError):
                for _ in range(1_000_000):  # bounded: the socket's buffer holds far fewer
                    sink.recv(65536)
                    received += 1
            assert received > 0, fork
            counted = (forkserver.cpu_seconds() - forked_cpu, children_cpu() - execd_cpu)
            assert counted[0 if fork else 1] > 0.05, (fork, counted)
            with pytest.raises(RuntimeError, match=r"the flooder failed \(exit 1\)"):
                await flood.run(("192.0.2.1", 9), "ping", 0.5)
            err = capfd.readouterr().err
            assert "ValueError: the flooder uses 127.0.0.0/8 only, not 192.0.2.1" in err, err
    finally:
        daemons.use_forkserver(before)
        sink.close()
