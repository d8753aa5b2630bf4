"""Shared pytest fixtures and how the suite runs in parallel.

The network-namespace fixtures live in netns_fixtures.py.

``scripts/test`` runs the suite on several pytest-xdist workers (``-n``), the longest
tests first (:func:`pytest_collection_modifyitems`). Three kinds of test need more
than "any worker, any time":

- :data:`ONE_WORKER`: the tests of these files run on one worker, in file order (a
  module-scoped fixture they share, an order they rely on). pytest-xdist's own
  ``xdist_group`` mark does nothing under pytest 9.2 (xdist 3.8 renames
  ``item._nodeid``, which pytest no longer reads), so :func:`pytest_xdist_make_scheduler`
  groups by file instead.
- ``@pytest.mark.serial``: tests whose assertions count what the machine does in real
  time (video frames in 3 s of call, say) run with no ordinary test beside them, and
  with at most two other serial tests (:data:`SERIAL_LANES`). Each takes about half a
  core (a 3 s call: 0.75-2 s of CPU), so three together load the 2 cores less than the
  two CPU hogs these tests are shown to hold under. Reader-writer locks (readers first)
  on files that all workers share do it (:class:`_RunAlone`): every other test holds
  all the lanes shared, a serial one takes a lane exclusively, waiting for the tests
  under way to end. (One serial test at a time left a core idle for the ~80 s the
  serial tests take, a quarter of the suite's wall time; the 20 serial tests alone took
  41 s on two lanes, 27-31 s on three, 6 of 6 runs passing, 2026-12-05.)
  Mark a test so only when a loaded machine changes what it measures, not to hide a
  race: a race must be fixed in the wait, not the check.
- :data:`SERIAL_ELSEWHERE`: the same, named here by node id (no mark in their files).
- :data:`SERIAL_WHOLE`: serial tests that take every lane: nothing runs beside them.

Run alone (``pytest tests/x.py``, no ``-n``) none of this does anything.

Daemons and CLI calls forked, not exec'd: each worker forks the ``p2pd daemon``
processes of :class:`p2pd.testing.daemons.DaemonProcess` (also those in a netns host)
and the CLI calls of ``run_cli``/``cli_json`` from a template that has imported the
daemon once (p2pd/testing/forkserver.py; ~0.4-0.7 s of CPU saved per daemon, ~0.04 s
per CLI call). ``P2PD_TEST_FORK=0`` execs them all as before. The template starts at
a worker's first daemon and ends at the worker's session end.

Where the time goes: every test's CPU seconds (its own process and the children it
waited for: daemons, CLI calls; a module fixture's set-up counts for the first test
that asks for it, its daemons for the test whose teardown stops them; forked daemons
as their template reports them, see
:func:`_cpu_seconds`) go into the JUnit XML as the property ``cpu_s``, and
``--cpu-durations=N`` lists the N costliest at the end. On this 2-core machine the
suite's CPU, not its waiting, is what bounds its wall time under xdist.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_fixtures import netns_ready, testbed  # noqa: F401

from p2pd.testing import daemons, forkserver

# pytester: tests/test_required_groups.py runs pytest on a small suite to check the exit code.
pytest_plugins = ["pytester"]

#: Files whose tests run on one worker, one after another, in file order; why.
ONE_WORKER = {
    "tests/test_cli_e2e.py": "one module-scoped network of daemons; its last test must run last",
    # 5.4-6 s of CPU each time a worker builds it: twice a run when its two tests ran on
    # two workers (cpu_s 6.2 and 6.1, a clean-clone run)
    "tests/test_dht_low_estimate.py": "one module-scoped network, built once",
}

#: Tests that measure real time or rate, in files this conftest does not own; each runs
#: alone under xdist (see the module docstring). Node ids without parameters match
#: every parametrisation.
SERIAL_ELSEWHERE = (
    # 3 s video calls in real time (their counts are against what the call sent and its
    # measured duration, which hold with two CPU hogs running; the loss tests' NACKs
    # and keyframe requests still need the CPU to answer within a frame's deadline)
    "tests/test_media_call.py::test_video_call_records_the_expected_frames",
    "tests/test_media_call.py::test_video_losses_bring_keyframe_requests_and_recover",
    "tests/test_media_call.py::test_video_losses_are_repaired_by_nack_retransmission",
    "tests/test_calls_e2e.py::test_a_video_call_records_the_expected_frames",
    "tests/test_calls_e2e.py::test_a_3_second_call_carries_each_sides_tone",
    "tests/test_audio_devices.py::test_a_call_from_microphone_to_speaker",
    # a 3 s call in real time: frames played and concealed, against the clock
    "tests/test_media_call.py::test_tone_call_records_the_other_sides_tone",
    "tests/test_media_call.py::test_ten_percent_loss_is_concealed_without_gaps",
    "tests/test_media_fec.py::test_a_lossy_speech_call_rebuilds_lost_frames_from_fec",
    "tests/test_media_fec.py::test_a_call_that_starts_without_fec_turns_it_on_when_the_peer_reports_loss",
    # a call through a relay, then direct: at most 7 frames concealed while switching
    # (33 on one side with 3 workers and other work on the 2 cores)
    "tests/test_upgrade_netns.py::test_a_call_over_a_relay_moves_to_the_direct_path_without_a_long_gap",
    # lookups on real sockets against hostile nodes, every one of 20 must name the owner:
    # a lookup whose replies come late under load says "contested" or "not found"
    # (seen with 4 workers and other work on the 2 cores)
    "tests/test_adversary.py::test_twenty_fabricated_ids_on_one_ip_next_to_alice_and_lying_take_nothing",
    "tests/test_adversary.py::test_a_targeted_attacker_on_many_networks_takes_nothing_and_blocks_nothing",
    "tests/test_adversary.py::test_control_without_the_density_rule_the_targeted_attacker_takes_the_handle",
    "tests/test_adversary.py::test_eclipse_and_fabricated_ids_cannot_deny_the_self_certifying_form",
    "tests/test_adversary.py::test_a_stale_record_of_the_owner_cannot_roll_her_back",
    "tests/test_adversary.py::test_black_hole_replicas_do_not_hide_a_record",
)
#: Serial tests that take every lane: nothing runs beside them. The targeted attacker's
#: 40 resolves on real sockets: beside two or three other serial tests (a 3 s call, the
#: video calls) 1 of the 40 said "contested" in 3 of 6 clean-clone runs (2026-12-05);
#: beside two CPU hogs, alone, 1 of 12 runs (the code before that session too). A slow
#: resolve under attack ends "contested", never with the rival's key; the test asks for
#: alice's key at all 40, and the machine's load is not what it measures.
SERIAL_WHOLE = (
    "tests/test_adversary.py::test_a_targeted_attacker_on_many_networks_takes_nothing_and_blocks_nothing",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-durations",
        type=int,
        default=0,
        metavar="N",
        help="list the N tests that used the most CPU (with the daemons and CLIs they ran)",
    )
    parser.addoption(
        "--timeline",
        metavar="FILE",
        help="append one JSON line per test to FILE: worker, when it asked for its lane, "
        "started and ended (time.time()), serial or not; scripts/suite_timeline.py draws it",
    )


def pytest_configure(config: pytest.Config) -> None:
    fork = os.environ.get("P2PD_TEST_FORK", "1")
    if fork not in ("0", "1"):
        raise pytest.UsageError(
            f"P2PD_TEST_FORK is 1 (fork test daemons) or 0 (exec), not {fork!r}"
        )
    daemons.use_forkserver(fork == "1")
    config.addinivalue_line(
        "markers",
        "serial: real-time rates; runs beside no ordinary test, three at most (tests/conftest.py)",
    )
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        _warm_hypothesis_charmap()


def _warm_hypothesis_charmap() -> None:
    """Hypothesis draws text from the characters UTF-8 can encode, which it finds by
    encoding all 1.1 million code points (1.3 s of CPU) and caches in .hypothesis/. In
    a fresh clone every xdist worker started at once found no cache and paid it: 4 x
    1.3 s. Done here, in the controller before the workers start, it is paid once (and
    costs nothing when cached). An internal function of hypothesis (6.170): if it moves,
    the workers pay as before."""
    try:
        from hypothesis.internal.charmap import intervals_from_codec

        intervals_from_codec("utf-8")
    except Exception:  # only a warm-up: whatever it raises, the workers meet it again
        pass


#: pytest's cache key for each test's last wall time (setup to teardown), in seconds.
_DURATIONS = "p2pd/durations"
#: Wall times of the tests over 3 s in a full run under xdist, for a run with no cache
#: (refresh: pytest's .pytest_cache/v/p2pd/durations holds the last run's, all tests).
_MEASURED = Path(__file__).with_name("durations.json")
#: What a test marked slow or netns is taken to last when the cache has no time for it.
_SLOW_GUESS = 10.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark :data:`SERIAL_ELSEWHERE`; then the longest tests first, so that the workers
    finish together rather than one running a 40 s test alone at the end (longest
    processing time first), and the serial ones at the very end. How long: the last
    run's time from pytest's cache, else from tests/durations.json, else a guess from the
    ``slow`` and ``netns`` marks.
    The sort is stable and a file of :data:`ONE_WORKER` keeps its order, so every worker
    collects the same order."""
    for item in items:
        if item.nodeid.split("[")[0] in SERIAL_ELSEWHERE:
            item.add_marker(pytest.mark.serial)
    cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
    if cache is None or not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    # a fresh clone (CI) has no cache: the times of a full run, kept in the tree
    last: dict[str, float] = json.loads(_MEASURED.read_text()) if _MEASURED.exists() else {}
    last.update(cache.get(_DURATIONS, {}))

    def expected(item: pytest.Item) -> float:
        path = item.nodeid.split("::")[0]
        if path in ONE_WORKER:  # the whole file is one unit: its total
            return sum(last.get(i.nodeid, 0.0) for i in items if i.nodeid.startswith(path))
        if item.nodeid in last:
            return last[item.nodeid]
        slow = item.get_closest_marker("slow") or item.get_closest_marker("netns")
        return _SLOW_GUESS if slow else 0.0

    # serial tests last: one waits for the tests under way on the other workers to end,
    # which costs least when those are the short tests at the end of the order
    # and of those, the ones that take every lane last: asked earlier, one held the
    # turnstile while it waited for the lanes of longer serial tests, and none started
    # meanwhile (10 s of the block with a core idle, a clean-clone run)
    items.sort(
        key=lambda item: (
            item.get_closest_marker("serial") is not None,
            item.nodeid in SERIAL_WHOLE,
            -expected(item),
        )
    )


#: In the last this many units of work (the serial tests and the shortest ordinary
#: ones), a worker holds at most the test it runs and the next (see below).
_TAIL = 40


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Every test is its own unit of work, except the files of :data:`ONE_WORKER`.

    xdist hands a worker more work while it holds 2 tests or fewer: up to 3 queued on
    it. At the tail of the order, where the serial tests come longest first, that put
    the three longest (6.7-7.3 s each) on one worker, one after another, and the serial
    block took 30 s for 67 s of runs on 3 lanes (a clean-clone run, 2026-12-05). In the
    last :data:`_TAIL` units a worker holds at most the test it runs and the next, so
    the longest left go to whichever workers free up first. Not fewer: an xdist worker
    runs a test only once it knows the next (or that there is none), for the
    fixtures' teardown; given its next test only once it had none, the suite hung."""
    from xdist.scheduler import LoadScopeScheduling

    class _Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return path if path in ONE_WORKER else nodeid

        # xdist's private scheduler internals (workqueue, _pending_of,
        # _assign_work_unit, as of xdist 3.8): an xdist upgrade can break this.
        def _reschedule(self, node: object) -> None:
            tail = 0 < len(self.workqueue) <= _TAIL
            if tail and not node.shutting_down:  # type: ignore[attr-defined]
                if self._pending_of(self.assigned_work[node]) <= 1:
                    self._assign_work_unit(node)
                return
            super()._reschedule(node)

    return _Scheduling(config, log)


#: How many serial tests run at once (tests/conftest.py's docstring says why three).
SERIAL_LANES = 3


class _RunAlone:
    """Reader-writer locks between xdist workers, readers first, on files in the run's
    shared temporary directory: a turnstile, :data:`SERIAL_LANES` lanes and a mark of
    waiting readers. Readers (ordinary tests) hold every lane shared; a writer (a serial
    test) holds one lane exclusively, so serial tests run three at a time, never beside
    an ordinary test.

    A reader marks itself waiting (a shared lock on the third file) before it passes the
    turnstile, tries every lane without blocking and, if a writer holds one, lets go of
    all and tries again a moment later: it never waits holding a lane or the turnstile.
    (It used to wait on a lane holding the turnstile, and so kept the second writer out:
    the serial tests ran one at a time, 21 of a clean-clone run's 258 s with one core
    idle.) A writer passes the turnstile and holds it while it waits for a lane to come
    free (the first to come free: blocking on one would wait for a serial test there
    while another stood free), unless a reader is marked waiting: then it takes no lane
    and lets the turnstile go, so the readers that found serial tests under way run as
    soon as those end, before the next ones. The serial tests come last in the order,
    so the readers that still come then are the few short ones xdist queued among them
    (up to 3 a worker). With writers first, the writers of the two or three workers
    whose queues held only serial tests came one after another and held those readers
    off for the whole serial block, and with them the serial tests queued behind them
    on the other workers: ordinary tests of a few milliseconds waited 19-31 s, and the
    20 serial tests ran on 1-2 lanes for 45 s (a clean-clone run, 2026-12-05; 32 s on 3
    lanes with readers first). flock(2) locks belong to the open file and die with the
    process, so a crashed worker leaves nothing held."""

    #: A lock not had within this long is a bug in the locking (a run is ~5 min).
    _PATIENCE = 1800.0
    _POLL = 0.02

    def __init__(self, directory: Path) -> None:
        self._turnstile = os.open(directory / "run-alone.turnstile", os.O_CREAT | os.O_RDWR)
        #: Held shared by each ordinary test that found a serial one in its way, until
        #: it runs; a serial test takes no lane while anyone holds it.
        self._waiting = os.open(directory / "run-alone.waiting", os.O_CREAT | os.O_RDWR)
        self._registered = False
        self._lanes = [
            os.open(directory / f"run-alone.lane{n}", os.O_CREAT | os.O_RDWR)
            for n in range(SERIAL_LANES)
        ]
        self._held: list[int] = []

    def acquire(self, alone: bool, whole: bool = False) -> None:
        """Take the lanes: shared, all of them (an ordinary test); one, exclusively (a
        serial test); all of them, exclusively (``whole``: one of SERIAL_WHOLE)."""
        deadline = time.monotonic() + self._PATIENCE
        while time.monotonic() < deadline:
            if not alone and not self._registered:
                # Marked before the turnstile, which a writer waiting for a lane holds
                # for seconds at a time: a reader that had to pass it first was marked
                # only after that writer, and the next, had their lanes.
                fcntl.flock(self._waiting, fcntl.LOCK_SH)
                self._registered = True
            fcntl.flock(self._turnstile, fcntl.LOCK_EX)
            try:
                if alone and whole and not self._readers_waiting():
                    if self._all_lanes(deadline):
                        return
                elif alone and not self._readers_waiting():  # (if any: they go first)
                    lane = self._free_lane(deadline)
                    if lane is not None:
                        self._held = [lane]
                        return
                if not alone and self._try_lanes_shared():
                    fcntl.flock(self._waiting, fcntl.LOCK_UN)
                    self._registered = False
                    return
            finally:
                fcntl.flock(self._turnstile, fcntl.LOCK_UN)
            time.sleep(self._POLL)
        raise RuntimeError(f"no test lane within {self._PATIENCE:.0f} s (tests/conftest.py)")

    def _readers_waiting(self) -> bool:
        """Whether an ordinary test waits for the serial ones under way to end."""
        try:
            fcntl.flock(self._waiting, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._waiting, fcntl.LOCK_UN)
        return False

    def _try_lanes_shared(self) -> bool:
        """Every lane shared, at once or not at all."""
        held: list[int] = []
        for lane in self._lanes:
            try:
                fcntl.flock(lane, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                for taken in held:
                    fcntl.flock(taken, fcntl.LOCK_UN)
                return False
            held.append(lane)
        self._held = held
        return True

    def _free_lane(self, deadline: float) -> int | None:
        """The first lane to come free, taken exclusively (the caller holds the
        turnstile); None once a reader waits (it goes first)."""
        while time.monotonic() < deadline:
            if self._readers_waiting():
                return None
            for lane in self._lanes:
                try:
                    fcntl.flock(lane, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                return lane
            time.sleep(self._POLL)
        raise RuntimeError(f"no free lane within {self._PATIENCE:.0f} s (tests/conftest.py)")

    def _all_lanes(self, deadline: float) -> bool:
        """Every lane, exclusively, taken one by one as the serial tests on them end
        (the caller holds the turnstile, so no other serial test starts meanwhile);
        False, with none kept, once a reader waits (it goes first)."""
        held: list[int] = []
        while time.monotonic() < deadline:
            if self._readers_waiting():
                for lane in held:
                    fcntl.flock(lane, fcntl.LOCK_UN)
                return False
            for lane in self._lanes:
                if lane in held:
                    continue
                try:
                    fcntl.flock(lane, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                held.append(lane)
            if len(held) == len(self._lanes):
                self._held = held
                return True
            time.sleep(self._POLL)
        raise RuntimeError(f"no free lanes within {self._PATIENCE:.0f} s (tests/conftest.py)")

    def release(self) -> None:
        for lane in reversed(self._held):
            fcntl.flock(lane, fcntl.LOCK_UN)
        self._held = []


_run_alone: _RunAlone | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _run_alone
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # every worker's basetemp is <run's basetemp>/popen-gwN: the parent is shared
        shared = session.config._tmp_path_factory.getbasetemp().parent  # type: ignore[attr-defined]
        _run_alone = _RunAlone(shared)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """Hold the lock over the test's setup, call and teardown (so a module fixture that
    starts daemons for its first test counts as part of that test)."""
    timeline = item.config.getoption("timeline")
    serial = item.get_closest_marker("serial") is not None
    asked = time.time()
    if _run_alone is not None:
        _run_alone.acquire(alone=serial, whole=item.nodeid in SERIAL_WHOLE)
    started = time.time()
    try:
        yield
    finally:
        if _run_alone is not None:
            _run_alone.release()
        if timeline:
            _append_timeline(timeline, item.nodeid, serial, asked, started, time.time())


def _append_timeline(path: str, nodeid: str, serial: bool, *times: float) -> None:
    """One line per test, appended in one write (O_APPEND: workers do not interleave)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    line = json.dumps([worker, nodeid, serial, *(round(t, 3) for t in times)]) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _cpu_seconds() -> float:
    """This process's CPU, its waited-for children's (exec'd daemons, CLI calls), and
    that of the daemons forked from this worker's template (they are the template's
    children, so RUSAGE_CHILDREN does not see them: the template reports each one's
    CPU from wait4 when it is reaped, counted here once the test has waited for it, as
    RUSAGE_CHILDREN counts an exec'd one; plus the template's own CPU, its imports and
    forks, as it grows)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    forked = forkserver.cpu_seconds()
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + forked


_CPU_START = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Where a test's CPU starts: before its fixtures are set up (a module fixture's
    network counts for the first test that asks for it). It started at the setup's
    report, after them: test_dht_low_estimate's 5.4 s module network counted for no
    test (helper swarmcpu found it)."""
    item.stash[_CPU_START] = _cpu_seconds()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """The test's CPU seconds, setup to teardown, on its teardown report (JUnit XML takes
    the properties of that one)."""
    outcome = yield
    if call.when == "teardown" and _CPU_START in item.stash:
        cpu = _cpu_seconds() - item.stash[_CPU_START]
        outcome.get_result().user_properties.append(("cpu_s", f"{cpu:.2f}"))  # type: ignore[attr-defined]


_cpu_by_test: dict[str, float] = {}


_wall_by_test: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _wall_by_test[report.nodeid] = _wall_by_test.get(report.nodeid, 0.0) + report.duration
    if report.when == "teardown":
        for name, value in report.user_properties:
            if name == "cpu_s":
                _cpu_by_test[report.nodeid] = float(str(value))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """End the fork template (after the last test's CPU was measured: reaping it adds
    the daemons it reaped to RUSAGE_CHILDREN a second time). Keep this run's times for
    the next run's order (the controller's, or a run without xdist; a worker's reports
    reach the controller too)."""
    forkserver.shutdown()
    cache = getattr(session.config, "cache", None)  # None with -p no:cacheprovider
    if cache is None or os.environ.get("PYTEST_XDIST_WORKER") or not _wall_by_test:
        return
    durations: dict[str, float] = cache.get(_DURATIONS, {})
    durations.update({k: round(v, 2) for k, v in _wall_by_test.items()})
    cache.set(_DURATIONS, durations)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    count = terminalreporter.config.getoption("cpu_durations")
    if not count or not _cpu_by_test:
        return
    terminalreporter.write_sep("=", f"{count} tests that used the most CPU")
    total = sum(_cpu_by_test.values())
    for nodeid, cpu in sorted(_cpu_by_test.items(), key=lambda kv: -kv[1])[:count]:
        terminalreporter.write_line(f"{cpu:8.2f}s cpu  {nodeid}")
    terminalreporter.write_line(f"{total:8.2f}s cpu  all {len(_cpu_by_test)} tests")
