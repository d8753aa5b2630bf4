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
against ~50 ms exec'd) and :func:`p2pd.testing.flood.run` (:func:`start`: a DHT
flooder, ~0.2 s of imports saved each), only when the test harness turned it on
(tests/conftest.py; ``P2PD_TEST_FORK=0`` runs every daemon, CLI call and flooder by
exec as before). scripts/demo,
the benchmarks and any process the tests start on their own exec their daemons.
``P2PD_TEST_PROFILE=DIR`` in the environment runs each forked child under cProfile
(:func:`_profiled`).

Protocol, on ``AF_UNIX`` ``SOCK_SEQPACKET`` sockets (one message per send, no framing):

- worker -> template, on the control socket (a socketpair made when the template is
  started): one JSON request ``{"argv", "env", "cwd", "umask", "entry", "netns",
  "quick_exit", "sigint_ignored"}`` with four file descriptors (SCM_RIGHTS, as multiprocessing's
  forkserver passes them): the child's stdin, stdout, stderr and the template's end of
  a fresh per-daemon socketpair.
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
import gc
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

#: What the template imports: the CLI, the ``daemon`` command's module and what its body
#: imports before ``trio.run``. What a daemon imports later (numpy and PyAV for a call,
#: zeroconf for LAN discovery) each child imports itself: numpy's OpenBLAS starts
#: threads at import, and the template must hold none when it forks.
_PRELOAD = (
    "p2pd_cli.main",
    "p2pd_cli.commands.node",
    "p2pd.daemon",
    "p2pd.config",
    "p2pd.keystore",
    "p2pd.wire",
    "trio",
)
#: Large enough for a request with the worker's whole environment.
_MAX_MESSAGE = 1 << 20


# ---------------------------------------------------------------- the worker's side


class TemplateError(RuntimeError):
    """The template could not start, died, or refused to fork: never silently replaced
    by an exec'd daemon (that would hide the bug)."""


class ForkedProcess:
    """A daemon forked by the template, with the part of :class:`subprocess.Popen`'s
    surface the tests use: ``pid``, ``returncode``, ``poll()``, ``wait(timeout)``
    (raising :class:`subprocess.TimeoutExpired`), ``send_signal()``, ``terminate()``,
    ``kill()``, ``stderr`` (text; :func:`spawn`'s), ``communicate(timeout)``
    (:func:`popen`'s) and ``args``. ``returncode`` is what Popen gives: the
    exit code, or minus the signal number that killed it."""

    def __init__(
        self, args: Sequence[str], pid: int, channel: socket.socket, stderr: IO[str] | None
    ) -> None:
        self.args = list(args)
        self.pid = pid
        self.returncode: int | None = None
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
            data = self._channel.recv(_MAX_MESSAGE)
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
        a later call goes on from there. Not to be mixed with reading the pipes
        otherwise (as Popen's)."""
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
                        os.close(key.fd)
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        out, err = (_text(b"".join(self._output[fd])) for fd in self._pipes)
        return out, err

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
    code = f"from p2pd.testing.forkserver import serve; serve({theirs.fileno()})"
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
) -> ForkedProcess:
    """Fork a daemon from the template: ``args`` as it would be exec'd (``args[0]`` the
    program, the rest its argv), ``env`` its whole environment, ``entry`` the function
    the child calls (``module:function``: the console script's; tests/test_forkserver.py
    forks :func:`probe` to compare a forked child with an exec'd one). stdin and stdout are
    /dev/null, stderr a pipe read through the result's ``stderr``, as
    ``Popen(args, stdin=DEVNULL, stdout=DEVNULL, stderr=PIPE, text=True, env=env)``.
    With ``netns``, the child first does what ``ip netns exec NETNS`` does before it
    execs (:func:`_enter_netns`): ``args`` then are what follows ``ip netns exec NETNS``."""
    stderr_r, stderr_w = os.pipe()
    devnull_out = os.open(os.devnull, os.O_WRONLY)
    try:
        pid, channel = _fork(args, env, entry, netns, devnull_out, stderr_w, quick_exit=True)
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
    gives, its output read with :meth:`ForkedProcess.communicate`. With ``netns``, as
    :func:`spawn`: the child enters the namespace as ``ip netns exec NETNS`` would
    (a netns test's ``p2pd answer`` in the callee's host)."""
    pid, channel, out_r, err_r = _fork_with_pipes(args, env, entry, netns)
    proc = ForkedProcess(args, pid, channel, stderr=None)
    proc._pipes = (out_r, err_r)
    proc._open = {out_r, err_r}
    proc._output = {out_r: [], err_r: []}
    return _started(proc)


def _fork_with_pipes(
    args: Sequence[str], env: dict[str, str], entry: str, netns: str | None
) -> tuple[int, socket.socket, int, int]:
    """Fork a quick-exit child whose stdout and stderr are new pipes: (pid, channel,
    the pipes' read ends)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid, channel = _fork(args, env, entry, netns, out_w, err_w, quick_exit=True)
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
) -> subprocess.CompletedProcess[str]:
    """Fork a CLI call from the template and wait for it: what
    ``subprocess.run(args, env=env, stdin=DEVNULL, capture_output=True, text=True,
    timeout=timeout)`` returns (stdout and stderr decoded with the locale's encoding,
    newlines translated, the exit code as Popen gives it), or raises: on expiry the
    child is killed and waited for, and :class:`subprocess.TimeoutExpired` carries the
    output so far as bytes, as subprocess.run's does."""
    pid, channel, out_r, err_r = _fork_with_pipes(args, env, entry, None)
    proc = _started(ForkedProcess(args, pid, channel, stderr=None))
    deadline = time.monotonic() + timeout
    output: dict[int, list[bytes]] = {out_r: [], err_r: []}
    try:
        with selectors.DefaultSelector() as selector:
            for fd in output:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():  # bounded by the deadline
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise subprocess.TimeoutExpired(args, timeout)
                for key, _ in selector.select(remaining):
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
    assert proc.returncode is not None
    stdout, stderr = (_text(b"".join(output[fd])) for fd in (out_r, err_r))
    return subprocess.CompletedProcess(list(args), proc.returncode, stdout, stderr)


def _text(data: bytes) -> str:
    """As Popen's text mode decodes what communicate() read: the locale's encoding,
    strict, universal newlines."""
    import locale

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
) -> tuple[int, socket.socket]:
    """Have the template fork a child with stdin /dev/null and ``stdout``, ``stderr``
    (the caller's descriptors: it closes them): its pid and the channel its exit
    message will come on."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = {
        "argv": list(args),
        "env": env,
        "cwd": os.getcwd(),
        "umask": _current_umask(),
        "entry": entry,
        "netns": netns,
        "quick_exit": quick_exit,
        # An ignored SIGINT survives exec (and CPython then leaves it ignored): an exec'd
        # child of a process ignoring it would ignore it too (pytest-xdist's workers may).
        "sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
    }
    devnull_in = os.open(os.devnull, os.O_RDONLY)
    try:
        with _lock:
            control = _start_template()
            try:
                socket.send_fds(
                    control,
                    [json.dumps(request).encode()],
                    [devnull_in, stdout, stderr, theirs.fileno()],
                )
            except OSError as exc:
                raise TemplateError(f"the fork template is gone: {exc}") from exc
    except BaseException:
        ours.close()
        raise
    finally:
        os.close(devnull_in)
        theirs.close()
    # The template's reply; its first start imports the daemon's stack (~1 s, more on a
    # loaded machine): bounded all the same.
    ours.settimeout(120.0)
    try:
        data = ours.recv(_MAX_MESSAGE)
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


def _current_umask() -> int:
    """The umask, read without setting it (os.umask would change it for a moment under
    the other threads' feet): /proc/self/status has it since Linux 4.7."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise RuntimeError("no Umask in /proc/self/status")


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


# ---------------------------------------------------------------- the template's side


def _prepare() -> None:
    """The imports every daemon needs (:data:`_PRELOAD`), done once."""
    import importlib
    import logging

    for name in _PRELOAD:
        importlib.import_module(name)
    if logging.root.handlers:  # the daemon's basicConfig would then do nothing
        raise TemplateError(f"an import made logging handlers: {logging.root.handlers}")


def serve(control_fd: int) -> None:
    """The template's loop: fork a child per request, reap the children, report. In a
    child it does not return: the child's exit (``SystemExit`` from the CLI, or an
    exception) unwinds it to the interpreter's, so the child exits as an exec'd
    ``p2pd daemon`` does: non-daemon threads joined, atexit handlers run, the
    interpreter finalised, the same exit code."""
    # Started with -c, the template has the working directory first on sys.path; a
    # console script has its own directory there instead (set in each child).
    if sys.path and sys.path[0] == "":
        del sys.path[0]
    template = _Template(socket.socket(fileno=control_fd))
    # Ctrl-C reaches the whole process group: the worker and the daemons handle it; the
    # template ends when the worker closes the control socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _prepare()
    # Everything imported so far lives as long as the template: out of the collector's
    # sight, in the template and in every child (the children's collections then skip
    # it and do not write to its pages; the daemon freezes its heap at exit anyway).
    gc.freeze()
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(template.wake_w, warn_on_full_buffer=False)
    while True:
        for key, _ in template.selector.select():
            if key.fileobj is template.control:
                try:
                    message, fds, _flags, _addr = socket.recv_fds(template.control, _MAX_MESSAGE, 4)
                except ConnectionResetError:
                    message = b""
                if not message:  # the worker closed it: done
                    return
                template.fork_one(json.loads(message), fds)
            else:
                with contextlib.suppress(BlockingIOError):
                    os.read(template.wake_r, 4096)
                template.reap()


class _Template:
    """The template's file descriptors and children."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(control, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.channels: dict[int, socket.socket] = {}  # pid -> its per-daemon socket

    def fork_one(self, request: dict[str, Any], fds: list[int]) -> None:
        stdin, stdout, stderr, channel_fd = fds
        channel = socket.socket(fileno=channel_fd)
        threads = os.listdir("/proc/self/task")
        if len(threads) != 1:  # a fork now would copy a lock some other thread holds
            for fd in (stdin, stdout, stderr):
                os.close(fd)
            _send(channel, {"error": f"the template has {len(threads)} threads, not 1"})
            channel.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.close_in_child(channel)
            _child(request, stdin, stdout, stderr)  # does not return: see serve
        for fd in (stdin, stdout, stderr):
            os.close(fd)
        self.channels[pid] = channel
        _send(channel, {"pid": pid})

    def close_in_child(self, channel: socket.socket) -> None:
        """Close the template's descriptors in a child: an exec'd daemon has only 0-2.
        Sockets are detached first, so no object is left owning a number the daemon
        may reuse (and close at its exit)."""
        self.selector.close()
        for sock in [self.control, channel, *self.channels.values()]:
            os.close(sock.detach())
        os.close(self.wake_r)
        os.close(self.wake_w)

    def reap(self) -> None:
        import resource

        for _ in range(10_000):  # bounded: each round reaps one child
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            channel = self.channels.pop(pid, None)
            if channel is None:
                continue
            mine = resource.getrusage(resource.RUSAGE_SELF)
            _send(
                channel,
                {
                    "status": status,
                    "cpu": usage.ru_utime + usage.ru_stime,
                    "template_cpu": mine.ru_utime + mine.ru_stime,
                    "template": os.getpid(),
                },
            )
            channel.close()


def _send(channel: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the worker dropped this daemon's object: nobody to tell
        channel.send(json.dumps(message).encode())


def _child(request: dict[str, Any], stdin: int, stdout: int, stderr: int) -> None:
    """In the forked child: undo what fork copied from the template, then run the CLI as
    ``p2pd ARGV...`` would. Ends by raising (SystemExit or the CLI's exception)."""
    # What a fresh interpreter has: SIGINT raises KeyboardInterrupt (unless the caller
    # ignored it: then an exec'd child would inherit that), SIGCHLD default; SIGPIPE and
    # SIGXFSZ stay ignored as CPython sets them at start. (A full suite run with
    # P2PD_TEST_FORK=0 found the difference: a worker ignoring SIGINT by then.)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    ignored = request.get("sigint_ignored")
    signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else signal.default_int_handler)
    for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
        os.dup2(fd, target)
        os.close(fd)
    _fresh_stdio()
    if request.get("netns"):
        _enter_netns(request["netns"])
    os.chdir(request["cwd"])
    os.umask(int(request["umask"]))
    os.environ.clear()  # unsetenv each: the C environment follows
    os.environ.update(request["env"])
    import random

    random.seed()  # (CPython's random reseeds at fork too; no harm in saying so)
    sys.argv = list(request["argv"])
    _set_name(os.path.basename(sys.argv[0]))
    if os.path.isfile(sys.argv[0]):  # as the interpreter does for a script: its directory
        sys.path.insert(0, os.path.dirname(os.path.realpath(sys.argv[0])))
    import importlib

    module, _, function = request["entry"].partition(":")
    main = getattr(importlib.import_module(module), function)  # p2pd's: the console script's
    if os.environ.get("P2PD_TEST_PROFILE"):
        main = _profiled(main, os.environ["P2PD_TEST_PROFILE"])
    if request.get("quick_exit"):
        _run_and_exit_quickly(main)
    main()
    raise SystemExit(0)  # (click's main exits itself; never back into the template's loop)


def _profiled(main: Any, directory: str) -> Any:
    """``main`` under cProfile on this process's CPU time, its statistics written at
    the end (exit or exception) to DIRECTORY/ARGV1-PID.prof: ``P2PD_TEST_PROFILE=DIR``
    in a test's environment, for finding where a forked daemon or CLI call spends its
    CPU (``python -m pstats``). Diagnosis only: the profiler itself costs CPU."""
    import cProfile

    def run() -> Any:
        profile = cProfile.Profile(time.process_time)
        profile.enable()
        try:
            return main()
        finally:
            profile.disable()
            words = [a for a in sys.argv[1:] if not a.startswith("-") and "/" not in a]
            name = words[0] if words else "p2pd"
            profile.dump_stats(os.path.join(directory, f"{name}-{os.getpid()}.prof"))

    return run


def _run_and_exit_quickly(main: Any) -> None:
    """Run ``main`` and end the process as the interpreter would (Python/pythonrun.c
    handle_system_exit, then Py_FinalizeEx's first steps: non-daemon threads joined,
    atexit callbacks, stdout and stderr flushed) but without the rest of the
    finalisation: tearing down the template's ~100 modules touches every page of the
    heap fork shared, ~26 ms of CPU per child here (a ``--version`` call costs 33 ms
    forked with it, 52 ms exec'd; a daemon 49-74 ms in all with it, 33 ms without).
    Cyclic garbage is collected before the end, so its ``__del__`` methods run as the
    interpreter's last collection would run them; what is skipped shows only through
    ``__del__`` of objects still reachable at exit (weakref.finalize and
    logging.shutdown are atexit callbacks and do run). CLI calls (:func:`run`) and
    daemons (:func:`spawn`) alike: a daemon has closed its database, sockets and files
    by the time its ``main`` returns (test_at_rest and the resume tests read what it
    left), and an exec'd daemon (``P2PD_TEST_FORK=0``, the passphrase ones) still
    ends with the full finalisation."""
    import atexit
    import gc
    import threading

    try:
        main()
        code = 0
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:  # as the interpreter: the message on stderr, status 1
            with contextlib.suppress(Exception):
                print(exc.code, file=sys.stderr)
            code = 1
    except BaseException as exc:  # an uncaught exception: the traceback, status 1
        with contextlib.suppress(Exception):
            sys.excepthook(type(exc), exc, exc.__traceback__)
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # (what Py_FinalizeEx calls)
    atexit._run_exitfuncs()
    gc.collect()  # (only what was made since the fork: the template's heap is frozen)
    # (the interpreter flushes sys.stdout and sys.stderr; the originals too, in case the
    # CLI replaced them: module teardown would have flushed those when freeing them)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()  # type: ignore[union-attr]
    os._exit(code & 0xFF)


def _enter_netns(name: str) -> None:
    """What ``ip netns exec NAME`` does before it execs its command (iproute2 6.1,
    lib/namespace.c netns_switch): join the network namespace /run/netns/NAME; unshare
    the mount namespace and make every mount a slave (nothing propagates back); mount a
    sysfs of the namespace on /sys (after a lazy unmount of the old one; read-only if
    that one cannot be unmounted and is read-only); bind-mount each file of
    /etc/netns/NAME onto /etc. Not done: ip's ``vrf_reset`` (VRF cgroups; no test uses
    VRFs). On failure, ip's message on stderr and ip's exit code, 255 (``exit(-1)``).
    Python 3.11 has no os.setns/os.unshare, hence libc through ctypes; the child is
    single-threaded (fork_one checks), as unshare(CLONE_NEWNS) requires."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    # (mountflags is an unsigned long: without argtypes ctypes would pass a C int)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
    ]
    clone_newnet, clone_newns = 0x40000000, 0x00020000
    ms_rdonly, ms_bind, ms_rec, ms_slave, mnt_detach = 1, 4096, 16384, 1 << 19, 2

    def fail(what: str) -> None:
        print(f"{what}: {os.strerror(ctypes.get_errno())}", file=sys.stderr, flush=True)
        raise SystemExit(255)

    path = f"/run/netns/{name}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        print(f'Cannot open network namespace "{name}": {exc.strerror}', file=sys.stderr)
        raise SystemExit(255) from None
    try:
        if libc.setns(fd, clone_newnet) != 0:
            fail(f'setting the network namespace "{name}" failed')
    finally:
        os.close(fd)
    if libc.unshare(clone_newns) != 0:
        fail("unshare failed")
    if libc.mount(b"", b"/", b"none", ms_slave | ms_rec, None) != 0:
        fail('"mount --make-rslave /" failed')
    flags = 0
    if libc.umount2(b"/sys", mnt_detach) != 0:
        with contextlib.suppress(OSError):
            if os.statvfs("/sys").f_flag & os.ST_RDONLY:
                flags = ms_rdonly
    if libc.mount(name.encode(), b"/sys", b"sysfs", flags, None) != 0:
        fail("mount of /sys failed")
    etc = f"/etc/netns/{name}"
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(etc)):
            source, target = f"{etc}/{entry}".encode(), f"/etc/{entry}".encode()
            if libc.mount(source, target, b"none", ms_bind, None) != 0:
                print(
                    f"Bind {source.decode()} -> {target.decode()} failed: "
                    f"{os.strerror(ctypes.get_errno())}",
                    file=sys.stderr,
                )


def _set_name(name: str) -> None:
    """The process's comm, as exec'ing ``name`` would have set it (first 15 bytes)."""
    import ctypes

    pr_set_name = 15
    ctypes.CDLL(None).prctl(pr_set_name, name.encode()[:15], 0, 0, 0)


def _fresh_stdio() -> None:
    """New sys.stdin/stdout/stderr on fds 0-2, made as the interpreter makes them at
    start (CPython 3.11's pylifecycle.c, create_stdio): binary buffered, or raw when
    unbuffered (-u, PYTHONUNBUFFERED) for stdout and stderr, with the template's own
    encoding and errors (the same environment's), newline "\\n", line-buffered when
    buffered and a tty or stderr."""
    import io

    unbuffered = not isinstance(getattr(sys.__stdout__, "buffer", None), io.BufferedWriter)
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        template = getattr(sys, f"__{name}__")
        write = fd != 0
        raw_only = unbuffered and write
        buffer: Any = io.open(fd, "wb" if write else "rb", 0 if raw_only else -1, closefd=False)  # noqa: SIM115, UP020
        raw = buffer if raw_only else buffer.raw
        raw.name = f"<{name}>"
        stream: Any = io.TextIOWrapper(
            buffer,
            encoding=template.encoding,
            errors=template.errors,
            newline="\n",
            line_buffering=not unbuffered and (raw.isatty() or fd == 2),
            write_through=unbuffered,
        )
        stream.mode = "w" if write else "r"
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _addresses() -> list[str]:
    import ifaddr

    return sorted(
        f"{adapter.name} {ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip}/{ip.network_prefix}"
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
    )


def probe() -> None:
    """What a child process sees of its start, as one JSON line on stderr; then it exits
    with ``sys.exit(argv[1])`` (a number as a number). tests/test_forkserver.py runs it
    forked from the template and exec'd (``python -c``) and compares."""
    import io
    import logging
    import random
    from pathlib import Path

    signals = ("SIGINT", "SIGTERM", "SIGCHLD", "SIGPIPE", "SIGXFSZ", "SIGHUP", "SIGUSR1")
    state = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "random": random.random(),
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "umask": _current_umask(),
        "argv": sys.argv[1:],
        "signals": {name: repr(signal.getsignal(getattr(signal, name))) for name in signals},
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "stdin": [os.readlink("/proc/self/fd/0"), sys.stdin.read()],
        "stdout": os.readlink("/proc/self/fd/1"),
        "streams": [
            [
                type(s.buffer).__name__,
                s.encoding,
                s.errors,
                s.line_buffering,
                s.write_through,
                s.name,
                s.mode,
            ]
            for s in (sys.stdin, sys.stdout, sys.stderr)
            if isinstance(s, io.TextIOWrapper)
        ],
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
        "log_handlers": len(logging.root.handlers),
        "path": sys.path[1:],  # [0]: -c's "" exec'd, the program's directory forked
        "comm": Path("/proc/self/comm").read_text().strip(),
        # the network namespace as the daemon sees it: getifaddrs (ifaddr, as zeroconf),
        # if_nameindex, /sys/class/net, /etc/hosts (bind-mounted from /etc/netns/NAME)
        "netns": os.readlink("/proc/self/ns/net"),
        "mntns": os.readlink("/proc/self/ns/mnt"),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "addresses": _addresses(),
        "sys_class_net": sorted(os.listdir("/sys/class/net")),
        "etc_hosts": Path("/etc/hosts").read_text(),
    }
    print(json.dumps(state), file=sys.stderr)
    print(json.dumps(sys.argv[1:]), "stdout ✓", end="\r\n")  # (run() translates, as Popen)
    code = sys.argv[1] if len(sys.argv) > 1 else "0"
    sys.exit(int(code) if code.lstrip("-").isdigit() else code)
