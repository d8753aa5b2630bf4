"""Run real ``p2pd daemon`` processes and drive them through the real CLI.

Used by scripts/demo, the end-to-end tests and benchmarks. Every wait is bounded.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..control_client import ControlClient
from . import forkserver
from .waiting import wait_until as wait_until  # (re-exported: process tests poll with it)

_READY = re.compile(r"ready: handle=(\S+) fingerprint=(\S+) listen=(\S+)")
#: Loopback /24s handed to daemons started without ``listen``, one each, in turn.
_LOOPBACK_NETS = itertools.count()


#: Whether :class:`DaemonProcess` forks its daemons, and :func:`run_cli` its CLI calls,
#: from a template that has imported them (p2pd/testing/forkserver.py) rather than exec
#: them: off unless the process turned it on (tests/conftest.py does, unless
#: ``P2PD_TEST_FORK=0``); scripts/demo and the benchmarks exec.
_fork = False


def use_forkserver(on: bool = True) -> None:
    """Fork this process's later daemons and CLI calls from a template (see
    :data:`_fork`)."""
    global _fork
    _fork = on


def loopback_listen() -> str:
    """``127.0.N.1:0`` with a fresh N (1..250, then again): daemons on one machine each on
    a /24 of their own, as they would be on the Internet. The DHT keeps at most 2 ids per
    IP address and 3 per /24 in a bucket or a lookup, so many daemons on 127.0.0.1 alone
    would look like one host to it. Linux answers on all of 127/8."""
    return f"127.0.{next(_LOOPBACK_NETS) % 250 + 1}.1:0"


def p2pd_command() -> list[str]:
    """How to invoke the CLI: the installed console script, else ``python -m``."""
    exe = shutil.which(
        "p2pd", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    )
    return [exe] if exe else [sys.executable, "-m", "p2pd_cli.main"]


def run_cli(
    home: Path,
    *args: str,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``p2pd --home HOME ARGS...``; returns the finished process (never raises on exit
    code; raises :class:`subprocess.TimeoutExpired` after killing it on ``timeout``).
    stdin is /dev/null, or a pipe carrying ``input`` (``send bob -``).
    Under the test harness (:func:`use_forkserver`) it is forked from the daemons'
    template (the CLI's ~60 ms of interpreter start and imports saved), with the same
    argv, environment, stdio and result; exec'd under coverage. Tests that measure the
    CLI's own start or look at its /proc build their own ``subprocess.run``."""
    argv = [*p2pd_command(), "--home", str(home), *args]
    full_env = {**os.environ, **(env or {})}
    if _fork and not _coverage():
        return forkserver.run(argv, full_env, timeout=timeout, input=input)
    if input is not None:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=full_env, input=input
        )
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )


def popen_cli(
    home: Path, *args: str, wrapper: Sequence[str] = (), env: dict[str, str] | None = None
) -> subprocess.Popen[str] | forkserver.ForkedProcess:
    """``p2pd --home HOME ARGS...`` left running (a ``p2pd answer`` waiting for a call):
    ``Popen(stdin=DEVNULL, stdout=PIPE, stderr=PIPE, text=True)``, its output read with
    ``communicate(timeout)``, or line by line from ``stdout`` (``inbox --follow``).
    ``wrapper`` prefixes the command: ``ip netns exec NAME`` (a netns host's
    ``command([])``) runs it in that host. Under the test harness
    (:func:`use_forkserver`) it is forked from the daemons' template, also in a netns
    host (the child enters the namespace as ip would), saving the CLI's ~0.15 s of
    interpreter start and imports; exec'd under coverage or any other ``wrapper``."""
    argv = [*wrapper, *p2pd_command(), "--home", str(home), *args]
    full_env = {**os.environ, **(env or {})}
    netns = _netns_of(wrapper)
    if _fork and (not wrapper or netns is not None) and not _coverage():
        return forkserver.popen(argv[len(wrapper) :], full_env, netns=netns)
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )


def cli_json(home: Path, *args: str, timeout: float = 60.0) -> Any:
    proc = run_cli(home, *args, "--json", timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"p2pd {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return json.loads(proc.stdout)


def control_call(
    home: Path, method: str, params: dict[str, Any] | None = None, timeout: float = 60.0
) -> Any:
    """One control API call to the daemon of ``home``, from this process: the data that
    ``p2pd <command> --json`` prints (``status``: ``p2pd status --json``), without a CLI
    process, which costs some 55 ms of CPU (its interpreter and imports; the daemon's
    answer about 2 ms). For state a test polls; the CLI's own output is test_cli_e2e's."""
    with ControlClient(home, timeout=timeout) as client:
        return client.call(method, params)


def _coverage() -> bool:
    """Whether coverage measures this process (then its daemons are exec'd, and each
    is measured from its start as pyproject.toml's [tool.coverage.run] arranges)."""
    coverage = sys.modules.get("coverage")
    return coverage is not None and coverage.Coverage.current() is not None


def short_tempdir(prefix: str = "p2pd-") -> Path:
    """A temporary directory with a short path: Unix socket paths are limited to 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _fsize_of(wrapper: Sequence[str]) -> int | None:
    """N if ``wrapper`` is exactly ``prlimit --fsize=N`` (a disk that fills, to the
    daemon: test_files_e2e), which a forked child sets itself (RLIMIT_FSIZE); else None."""
    if len(wrapper) == 2 and wrapper[0] == "prlimit" and wrapper[1].startswith("--fsize="):
        value = wrapper[1].removeprefix("--fsize=")
        return int(value) if value.isdigit() else None
    return None


def _netns_of(wrapper: Sequence[str]) -> str | None:
    """NAME if ``wrapper`` is exactly ``ip netns exec NAME`` (netns.Host.command([])),
    which a forked child does itself (forktemplate._enter_netns); else None."""
    if len(wrapper) == 4 and list(wrapper[:3]) == ["ip", "netns", "exec"]:
        return wrapper[3]
    return None


class DaemonProcess:
    """A ``p2pd daemon`` child process; its stderr is collected in ``log``.

    Under the test harness (:func:`use_forkserver`) a daemon without ``wrapper`` is
    forked from a template process that has imported the daemon already
    (p2pd/testing/forkserver.py), ``proc`` then a :class:`forkserver.ForkedProcess`
    with the part of Popen's surface the tests use. A ``wrapper`` of exactly
    ``ip netns exec NAME`` (a netns host's ``command([])``) is forked too: the child
    enters the namespace as ip would; so is one of exactly ``prlimit --fsize=N`` (the
    child sets RLIMIT_FSIZE as prlimit would). Exec'd all the same: a daemon with any
    other ``wrapper`` (other prlimit limits, unshare), one
    given ``P2PD_PASSPHRASE`` in ``env`` (the daemon wipes it from the environment block
    the kernel shows in /proc/PID/environ, which in a forked child is the template's,
    so only an exec'd daemon proves it), and every daemon of a process under coverage
    (coverage measures each process from its start)."""

    def __init__(
        self,
        home: Path,
        *,
        listen: str | None = None,
        bootstrap: Sequence[str] = (),
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
        lan: str = "off",
        wrapper: Sequence[str] = (),
    ) -> None:
        """``wrapper`` prefixes the command, e.g. ``host.command([])`` of a netns host.
        Without ``listen``, the daemon gets a loopback /24 of its own
        (:func:`loopback_listen`)."""
        self.home = home
        listen = listen or loopback_listen()
        # LAN discovery is off unless asked for: mDNS multicast is for tests that run in
        # network namespaces they made, never on the machine's own interfaces.
        args = [*wrapper, *p2pd_command(), "--home", str(home), "daemon", "--listen", listen]
        args += ["--lan", lan]
        for b in bootstrap:
            args += ["--bootstrap", b]
        args += list(extra)
        self._lines: list[str] = []
        self._ready = threading.Event()
        self.handle = self.fingerprint = self.listen = ""
        full_env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | forkserver.ForkedProcess
        netns, fsize = _netns_of(wrapper), _fsize_of(wrapper)
        forkable = not wrapper or netns is not None or fsize is not None
        if _fork and forkable and "P2PD_PASSPHRASE" not in (env or {}) and not _coverage():
            self.proc = forkserver.spawn(args[len(wrapper) :], full_env, netns=netns, fsize=fsize)
        else:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=full_env,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.append(line)
            match = _READY.search(line)
            if match and not self._ready.is_set():
                self.handle, self.fingerprint, self.listen = match.groups()
                self._ready.set()
        self._ready.set()  # EOF: the process ended

    @property
    def forked(self) -> bool:
        """Whether this daemon was forked from the template rather than exec'd."""
        return isinstance(self.proc, forkserver.ForkedProcess)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def log(self) -> str:
        return "".join(self._lines)

    def wait_ready(self, timeout: float = 30.0) -> DaemonProcess:
        if not self._ready.wait(timeout) or not self.listen:
            self.kill()
            raise RuntimeError(f"daemon in {self.home} did not become ready:\n{self.log}")
        return self

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._reader.join(timeout)
        code = self.proc.returncode
        assert code is not None  # waited for above
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(15)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
