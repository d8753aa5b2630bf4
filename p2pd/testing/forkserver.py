"""Test daemons forked from a template that has already imported them (issue 9).

A ``p2pd daemon`` spends ~0.4-0.7 s of CPU importing p2pd.daemon and its stack (trio,
cryptography, aioquic, x3dh/pydantic, ~100 p2pd modules) before it does anything; the
suite starts ~200 of them. Here one *template* process per test worker imports all that
once, then forks a child for each daemon. The child is a real process running the real
CLI entry point (``p2pd_cli.main.main`` with ``sys.argv`` set to the same argv), with its
own pid, environment, working directory, umask, stdio, signal dispositions and exit
status; only the interpreter start and the imports are shared.

:class:`p2pd.testing.daemons.DaemonProcess` uses it (:func:`spawn`; in a netns host
too: the child enters the namespace as ``ip netns exec`` would), and so do
:func:`p2pd.testing.daemons.run_cli` (:func:`run`: a CLI call, ~8 ms of CPU forked
against ~50 ms exec'd; its stdin /dev/null or a pipe carrying ``input``),
:func:`p2pd.testing.daemons.popen_cli` (:func:`popen`: a call left running, a
``p2pd answer`` or ``files --follow``, read with ``communicate`` or line by line) and
:func:`p2pd.testing.flood.run` (:func:`start`: a DHT flooder, ~0.2 s of imports saved
each), only when the test harness turned it on (tests/conftest.py; ``P2PD_TEST_FORK=0``
runs every daemon, CLI call and flooder by exec as before). scripts/demo, the
benchmarks and any process the tests start on their own exec their daemons.
``P2PD_TEST_PROFILE=DIR`` in the environment runs each forked child under cProfile
(p2pd/testing/forktemplate.py, the template's side of all this: its loop, a child's
set-up and exit).

Protocol, on ``AF_UNIX`` ``SOCK_SEQPACKET`` sockets (one message per send, no framing):

- worker -> template, on the control socket (a socketpair made when the template is
  started): one JSON request ``{"argv", "env", "cwd", "umask", "entry", "netns",
  "quick_exit", "sigint_ignored", "fsize"}`` with four file descriptors (SCM_RIGHTS, as
  multiprocessing's forkserver passes them): the child's stdin, stdout, stderr and the
  template's end of a fresh per-daemon socketpair.
- template -> worker, on that per-daemon socket: ``{"pid": N}`` once forked (or
  ``{"error": ...}``), later ``{"status": S, "cpu": C, "template_cpu": T, "template": P}`` when the
  template has reaped the child: S is the raw wait status, C the child's user+system
  CPU from wait4 (its own and that of the children it waited for: what RUSAGE_CHILDREN
  would have counted for an exec'd daemon), T the template's own CPU so far, P its pid.

What a fork cannot give the child (all fixed when the template started, with the
worker's environment): its own str hash seed (PYTHONHASHSEED randomisation: one per
template, so its daemons iterate sets of strings in one order), the interpreter's
options and locale, and what /proc shows of its start: /proc/PID/environ and cmdline
are the template's (hence daemons given P2PD_PASSPHRASE are exec'd; see
p2pd/testing/daemons.py). Its name (comm: ps, process accounting) is set to the
program's, ``p2pd``, as an exec'd console script has.

Exit status: the template is the child's parent, so it reaps it (SIGCHLD wakes its
loop) and sends the status back. The alternative, PR_SET_CHILD_SUBREAPER on the worker
with a double fork, would make the daemon the worker's own child (waitpid and
RUSAGE_CHILDREN as with Popen) but also every other orphan in the worker's process tree:
their zombies would stay until the worker exits, and a test that checks a process is
gone with ``kill(pid, 0)`` would see them alive. Not worth it.

CPU accounting: the forked daemons are the template's children, not the worker's, so
conftest's RUSAGE_CHILDREN would not see them. :func:`cpu_seconds` is what this worker
has been told of: every reaped daemon's CPU as the worker waited for it (the moment
RUSAGE_CHILDREN would have counted an exec'd one), plus the template's own CPU (its
imports, its forks) as it grows. tests/conftest.py adds it to each test's ``cpu_s``.
Reaping the template adds its RUSAGE_CHILDREN (the same daemons again) and its own CPU
to the worker's RUSAGE_CHILDREN: :func:`shutdown`, the one place that reaps it, takes
back what the messages had counted (so each CPU second counts once), and runs after the
last test; a template that died is seen without being reaped (``waitid`` with
``WNOWAIT``).
"""

from __future__ import annotations

import contextlib
import json
import locale
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from .forktemplate import MAX_MESSAGE, current_umask

# ---------------------------------------------------------------- the worker's side


class TemplateError(RuntimeError):
    """The template could not start, died, or refused to fork: never silently replaced
    by an exec'd daemon (that would hide the bug)."""


class ForkedProcess:
    """A daemon forked by the template, with the part of :class:`subprocess.Popen`'s
    surface the tests use: ``pid``, ``returncode``, ``poll()``, ``wait(timeout)``
    (raising :class:`subprocess.TimeoutExpired`), ``send_signal()``, ``terminate()``,
    ``kill()``, ``stderr`` (text; :func:`spawn`'s and :func:`popen`'s), ``stdout``
    (text; :func:`popen`'s, read as it comes: a ``--follow`` command's lines),
    ``communicate(timeout)`` (:func:`popen`'s) and ``args``. ``returncode`` is what
    Popen gives: the exit code, or minus the signal number that killed it."""

    def __init__(
        self, args: Sequence[str], pid: int, channel: socket.socket, stderr: IO[str] | None
    ) -> None:
        self.args = list(args)
        self.pid = pid
        self.returncode: int | None = None
        self.stdout: IO[str] | None = None
        self.stderr = stderr
        self._channel = channel
        self._lock = threading.Lock()
        #: popen's stdout and stderr read ends, those not at their end yet, what came
        self._pipes: tuple[int, int] | None = None
        self._open: set[int] = set()
        self._output: dict[int, list[bytes]] = {}

    def _receive(self, timeout: float | None) -> bool:
        """Read the exit message if one comes within ``timeout`` (None: block). Under the
        lock; True once ``returncode`` is set."""
        if self.returncode is not None:
            return True
        self._channel.settimeout(timeout)
        try:
            data = self._channel.recv(MAX_MESSAGE)
        except (TimeoutError, BlockingIOError):
            return False
        if not data:  # EOF without a status: the template died
            raise TemplateError(
                f"the fork template ended before daemon {self.pid} did: its exit status is lost"
            )
        message = json.loads(data)
        _account(int(message["template"]), float(message["cpu"]), float(message["template_cpu"]))
        self.returncode = os.waitstatus_to_exitcode(int(message["status"]))
        self._channel.close()
        with _lock:
            _running.discard(self)
        return True

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """For a child of :func:`popen`: read its stdout and stderr to their end and wait
        for it, as ``Popen.communicate(timeout=timeout)`` with text pipes does (the
        locale's encoding, newlines translated). On expiry raises
        :class:`subprocess.TimeoutExpired` without killing it; what was read is kept, and
        a later call goes on from there. Not to be mixed with reading ``stdout`` or
        ``stderr`` otherwise (as Popen's)."""
        assert self._pipes is not None, "communicate() is for a child of popen()"
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            for fd in self._open:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():  # bounded by the deadline, or the child's end
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
                for key, _ in selector.select(remaining):
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        self._output[key.fd].append(data)
                    else:
                        selector.unregister(key.fd)
                        self._open.discard(key.fd)
                        self._close(key.fd)
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        out, err = (_text(b"".join(self._output[fd])) for fd in self._pipes)
        return out, err

    def _close(self, fd: int) -> None:
        """Close a pipe of popen's through the file object that owns its descriptor
        (closing the number alone would leave that object to close it again, maybe
        by then someone else's)."""
        for stream in (self.stdout, self.stderr):
            if stream is not None and not stream.closed and stream.fileno() == fd:
                stream.close()
                return
        os.close(fd)

    def poll(self) -> int | None:
        with self._lock:
            self._receive(0.0)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self._lock:
            if not self._receive(timeout):
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            assert self.returncode is not None
            return self.returncode

    def send_signal(self, sig: int) -> None:
        # As Popen: no signal once the status is known (the pid may be someone else's).
        # The template may have reaped it a moment ago without our knowing yet; pids are
        # not reused within milliseconds on Linux (they go round 4 million).
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


_lock = threading.Lock()
_template: subprocess.Popen[bytes] | None = None
_control: socket.socket | None = None
_cpu = 0.0
#: By template pid: its own CPU last reported, and all that its messages added to _cpu.
_template_cpu_seen: dict[int, float] = {}
_counted: dict[int, float] = {}
#: Forked daemons whose exit message has not been read yet. cpu_seconds() reads those
#: that came: a daemon nobody waits for (a netns testbed kills the processes of its
#: namespaces at its end) is counted when it ends, as an exec'd one is when Popen's
#: next start reaps it (subprocess._cleanup), not lost.
_running: set[ForkedProcess] = set()


def _account(template: int, child_cpu: float, template_cpu: float) -> None:
    global _cpu
    with _lock:
        added = child_cpu
        seen = _template_cpu_seen.get(template, 0.0)
        if template_cpu > seen:  # cumulative; messages may be read out of order
            added += template_cpu - seen
            _template_cpu_seen[template] = template_cpu
        _cpu += added
        _counted[template] = _counted.get(template, 0.0) + added


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds() -> float:
    """CPU of the forked daemons this worker has waited for or that have ended (see
    :data:`_running`), plus the template's own."""
    with _lock:
        running = list(_running)
    for proc in running:
        # Not blocking: a thread in proc.wait() holds its lock (and will count it).
        if proc._lock.acquire(blocking=False):
            try:
                proc._receive(0.0)
            except TemplateError:  # its own wait() says so; nothing more to count here
                with _lock:
                    _running.discard(proc)
            finally:
                proc._lock.release()
    with _lock:
        return _cpu


def _exited(pid: int) -> bool:
    """Whether our child ``pid`` has ended, without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # someone's waitpid(-1) took it
        return True


def _start_template() -> socket.socket:
    """Under ``_lock``: start the template (once per worker process) and return the
    control socket."""
    global _template, _control
    if _template is not None:
        # (not poll(): reaping it here would count its daemons twice; see shutdown)
        if _exited(_template.pid):
            raise TemplateError(f"the fork template (pid {_template.pid}) has exited")
        assert _control is not None
        return _control
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    code = f"from p2pd.testing.forktemplate import serve; serve({theirs.fileno()})"
    _template = subprocess.Popen(
        [sys.executable, "-c", code],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        # its own failures show in the worker's stderr; each daemon gets its own stderr
        stderr=None,
    )
    theirs.close()
    _control = ours
    return ours


def spawn(
    args: Sequence[str],
    env: dict[str, str],
    *,
    entry: str = "p2pd_cli.main:main",
    netns: str | None = None,
    fsize: int | None = None,
) -> ForkedProcess:
    """Fork a daemon from the template: ``args`` as it would be exec'd (``args[0]`` the
    program, the rest its argv), ``env`` its whole environment, ``entry`` the function
    the child calls (``module:function``: the console script's; tests/test_forkserver.py
    forks ``forktemplate.probe`` to compare a forked child with an exec'd one). stdin and stdout are
    /dev/null, stderr a pipe read through the result's ``stderr``, as
    ``Popen(args, stdin=DEVNULL, stdout=DEVNULL, stderr=PIPE, text=True, env=env)``.
    With ``netns``, the child first does what ``ip netns exec NETNS`` does before it
    execs (``forktemplate._enter_netns``): ``args`` then are what follows
    ``ip netns exec NETNS``. With ``fsize``, the child's RLIMIT_FSIZE (soft and hard)
    is that many bytes, as ``prlimit --fsize=FSIZE`` sets it before its exec."""
    stderr_r, stderr_w = os.pipe()
    devnull_out = os.open(os.devnull, os.O_WRONLY)
    try:
        pid, channel = _fork(
            args, env, entry, netns, devnull_out, stderr_w, quick_exit=True, fsize=fsize
        )
    except BaseException:
        os.close(stderr_r)
        raise
    finally:
        os.close(devnull_out)
        os.close(stderr_w)
    stderr = open(stderr_r, encoding=None)  # noqa: SIM115 (as Popen's text=True: locale's)
    return _started(ForkedProcess(args, pid, channel, stderr=stderr))


def start(
    args: Sequence[str],
    env: dict[str, str],
    *,
    entry: str,
    stdout: int,
    stderr: int,
    netns: str | None = None,
) -> ForkedProcess:
    """Fork ``entry`` as :func:`spawn` does, but with the caller's file descriptors
    ``stdout`` and ``stderr`` as the child's 1 and 2 (the caller keeps and closes its
    own, as with ``Popen(args, stdin=DEVNULL, stdout=fd, stderr=fd)``); the result's
    ``stderr`` is None. For a child whose output the caller reads its own way:
    p2pd/testing/flood.py's flooder, whose stdout a trio test reads as it comes."""
    pid, channel = _fork(args, env, entry, netns, stdout, stderr, quick_exit=True)
    return _started(ForkedProcess(args, pid, channel, stderr=None))


def _started(proc: ForkedProcess) -> ForkedProcess:
    with _lock:
        _running.add(proc)
    return proc


def popen(
    args: Sequence[str],
    env: dict[str, str],
    *,
    entry: str = "p2pd_cli.main:main",
    netns: str | None = None,
) -> ForkedProcess:
    """Fork a CLI call that runs on while the test does other things: what
    ``Popen(args, env=env, stdin=DEVNULL, stdout=PIPE, stderr=PIPE, text=True)``
    gives, its output read with :meth:`ForkedProcess.communicate`, or as it comes from
    the result's ``stdout`` and ``stderr`` (text files as Popen's: the locale's
    encoding, newlines translated). With ``netns``, as :func:`spawn`: the child enters
    the namespace as ``ip netns exec NETNS`` would (a netns test's ``p2pd answer`` in
    the callee's host)."""
    pid, channel, out_r, err_r = _fork_with_pipes(args, env, entry, netns)
    # (as Popen's text=True: the locale's encoding, universal newlines)
    stdout, stderr = open(out_r, encoding=None), open(err_r, encoding=None)  # noqa: SIM115
    proc = ForkedProcess(args, pid, channel, stderr=stderr)
    proc.stdout = stdout
    proc._pipes = (out_r, err_r)
    proc._open = {out_r, err_r}
    proc._output = {out_r: [], err_r: []}
    return _started(proc)


def _fork_with_pipes(
    args: Sequence[str],
    env: dict[str, str],
    entry: str,
    netns: str | None,
    stdin: int | None = None,
) -> tuple[int, socket.socket, int, int]:
    """Fork a quick-exit child whose stdout and stderr are new pipes: (pid, channel,
    the pipes' read ends). ``stdin``: as :func:`_fork`'s."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid, channel = _fork(args, env, entry, netns, out_w, err_w, quick_exit=True, stdin=stdin)
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    return pid, channel, out_r, err_r


def run(
    args: Sequence[str],
    env: dict[str, str],
    *,
    timeout: float,
    entry: str = "p2pd_cli.main:main",
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Fork a CLI call from the template and wait for it: what
    ``subprocess.run(args, env=env, stdin=DEVNULL, capture_output=True, text=True,
    timeout=timeout)`` returns (stdout and stderr decoded with the locale's encoding,
    newlines translated, the exit code as Popen gives it), or raises: on expiry the
    child is killed and waited for, and :class:`subprocess.TimeoutExpired` carries the
    output so far as bytes, as subprocess.run's does. With ``input``, stdin is a pipe
    that carries it (encoded in the locale's encoding) and then ends, as
    ``subprocess.run(..., input=input)`` instead of ``stdin=DEVNULL`` (``send bob -``)."""
    stdin_r = stdin_w = -1
    if input is not None:
        stdin_r, stdin_w = os.pipe()
        os.set_blocking(stdin_w, False)
    try:
        pid, channel, out_r, err_r = _fork_with_pipes(
            args, env, entry, None, stdin=stdin_r if input is not None else None
        )
    except BaseException:
        if input is not None:
            os.close(stdin_w)
        raise
    finally:
        if input is not None:
            os.close(stdin_r)
    proc = _started(ForkedProcess(args, pid, channel, stderr=None))
    deadline = time.monotonic() + timeout
    output: dict[int, list[bytes]] = {out_r: [], err_r: []}
    pending = memoryview((input or "").encode(locale.getpreferredencoding(False)))
    try:
        with selectors.DefaultSelector() as selector:
            for fd in output:
                selector.register(fd, selectors.EVENT_READ)
            if stdin_w >= 0:
                selector.register(stdin_w, selectors.EVENT_WRITE)
            while selector.get_map():  # bounded by the deadline
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise subprocess.TimeoutExpired(args, timeout)
                for key, _ in selector.select(remaining):
                    if key.fd == stdin_w:
                        try:  # as Popen.communicate: a child that stops reading is no error
                            pending = pending[os.write(stdin_w, pending[: 1 << 16]) :]
                        except BrokenPipeError:
                            pending = pending[:0]
                        if not pending:
                            selector.unregister(stdin_w)
                            os.close(stdin_w)
                            stdin_w = -1
                        continue
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        output[key.fd].append(data)
                    else:
                        selector.unregister(key.fd)
        proc.wait(max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30.0)
        raise subprocess.TimeoutExpired(
            args, timeout, output=b"".join(output[out_r]), stderr=b"".join(output[err_r])
        ) from None
    except BaseException:
        with contextlib.suppress(TemplateError):
            proc.kill()
        raise
    finally:
        os.close(out_r)
        os.close(err_r)
        if stdin_w >= 0:
            os.close(stdin_w)
    assert proc.returncode is not None
    stdout, stderr = (_text(b"".join(output[fd])) for fd in (out_r, err_r))
    return subprocess.CompletedProcess(list(args), proc.returncode, stdout, stderr)


def _text(data: bytes) -> str:
    """As Popen's text mode decodes what communicate() read: the locale's encoding,
    strict, universal newlines."""
    text = data.decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _fork(
    args: Sequence[str],
    env: dict[str, str],
    entry: str,
    netns: str | None,
    stdout: int,
    stderr: int,
    *,
    quick_exit: bool = False,
    stdin: int | None = None,
    fsize: int | None = None,
) -> tuple[int, socket.socket]:
    """Have the template fork a child with stdin ``stdin`` (/dev/null if None) and
    ``stdout``, ``stderr`` (the caller's descriptors: it closes them): its pid and the
    channel its exit message will come on."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = {
        "argv": list(args),
        "env": env,
        "cwd": os.getcwd(),
        "umask": current_umask(),
        "entry": entry,
        "netns": netns,
        "quick_exit": quick_exit,
        "fsize": fsize,
        # An ignored SIGINT survives exec (and CPython then leaves it ignored): an exec'd
        # child of a process ignoring it would ignore it too (pytest-xdist's workers may).
        "sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
    }
    child_stdin = os.open(os.devnull, os.O_RDONLY) if stdin is None else os.dup(stdin)
    try:
        with _lock:
            control = _start_template()
            try:
                socket.send_fds(
                    control,
                    [json.dumps(request).encode()],
                    [child_stdin, stdout, stderr, theirs.fileno()],
                )
            except OSError as exc:
                raise TemplateError(f"the fork template is gone: {exc}") from exc
    except BaseException:
        ours.close()
        raise
    finally:
        os.close(child_stdin)
        theirs.close()
    # The template's reply; its first start imports the daemon's stack (~1 s, more on a
    # loaded machine): bounded all the same.
    ours.settimeout(120.0)
    try:
        data = ours.recv(MAX_MESSAGE)
        if not data:
            raise TemplateError("the fork template closed the daemon's channel without forking")
        reply = json.loads(data)
        if "error" in reply:
            raise TemplateError(f"the fork template refused: {reply['error']}")
    except BaseException as exc:
        ours.close()
        if isinstance(exc, TimeoutError):
            raise TemplateError("the fork template did not answer in 120 s") from exc
        raise
    return int(reply["pid"]), ours


def shutdown(timeout: float = 10.0) -> None:
    """End the template (after the last test: see the module docstring). The daemons it
    forked that still run are left running, as exec'd ones would be."""
    global _template, _control, _cpu
    with _lock:
        if _control is not None:
            _control.close()
            _control = None
        if _template is not None:
            before = _children_cpu()
            try:
                _template.wait(timeout)
            except subprocess.TimeoutExpired:
                _template.kill()
                _template.wait(timeout)
            # What reaping it added to RUSAGE_CHILDREN: its own CPU and its children's,
            # part of which its messages counted already. Each second once: the rest
            # (daemons nobody waited for, its CPU since its last message) stays.
            added = _children_cpu() - before
            _cpu -= min(added, _counted.pop(_template.pid, 0.0))
            _template = None
