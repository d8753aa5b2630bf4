"""The fork template's side of p2pd/testing/forkserver.py (whose docstring says what it
is for, the protocol between the two and what a fork cannot give a child): the process a
test worker starts once, which imports what every daemon imports (:data:`_PRELOAD`) and
then forks a child per request (:func:`serve`); the child's set-up, as an exec'd console
script would start (:func:`_child`: stdio, signals, its network namespace, its name),
and its exit (:func:`_run_and_exit_quickly`); :func:`probe`, what a child sees of its
start, for tests/test_forkserver.py. Only the standard library at import: the worker
imports this module too (:data:`MAX_MESSAGE`, :func:`current_umask`)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any

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
    # x3dh, doubleratchet and pydantic (~90 ms): a daemon loads them on first need
    # (docs/ARCHITECTURE.md, "Sessions"), and a test daemon's first start makes its
    # prekeys, which needs them.
    "p2pd.session.prekeys",
    "p2pd.session.crypto",
)
#: Large enough for a request with the worker's whole environment.
MAX_MESSAGE = 1 << 20


def current_umask() -> int:
    """The umask, read without setting it (os.umask would change it for a moment under
    the other threads' feet): /proc/self/status has it since Linux 4.7."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise RuntimeError("no Umask in /proc/self/status")


def _prepare() -> None:
    """The imports every daemon needs (:data:`_PRELOAD`), done once."""
    import importlib
    import logging

    for name in _PRELOAD:
        importlib.import_module(name)
    if logging.root.handlers:  # the daemon's basicConfig would then do nothing
        raise RuntimeError(f"an import made logging handlers: {logging.root.handlers}")


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
                    message, fds, _flags, _addr = socket.recv_fds(template.control, MAX_MESSAGE, 4)
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
    if request.get("fsize") is not None:  # what `prlimit --fsize=N` sets before its exec
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
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
    import resource
    from pathlib import Path

    signals = ("SIGINT", "SIGTERM", "SIGCHLD", "SIGPIPE", "SIGXFSZ", "SIGHUP", "SIGUSR1")
    state = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "random": random.random(),
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "umask": current_umask(),
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
        "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
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
