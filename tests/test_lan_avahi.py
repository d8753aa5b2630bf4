"""Interop with another mDNS implementation: Avahi (Debian's avahi-daemon and
avahi-utils) on one host of a namespace LAN, a real p2pd daemon on another.

Avahi sees our announcement (browse and resolve, TXT intact down to the signature), and
we see what Avahi publishes: a record with no valid signature is refused with a log
line and never listed; a correctly signed one, made with :func:`p2pd.discovery.build_txt`
and published by ``avahi-publish``, is listed, and leaves when Avahi says goodbye.

How Avahi runs in a namespace (what we found, Debian 12, Avahi 0.8):

- It wants the system D-Bus for its clients (avahi-browse and avahi-publish talk to the
  daemon only over D-Bus). Each test starts its own ``dbus-daemon`` with a minimal
  config (:data:`BUS_CONFIG`: type system, one Unix socket in the test's temporary
  directory, allow everything) and points the daemon and the clients at it with
  ``DBUS_SYSTEM_BUS_ADDRESS``; libdbus honours that variable for the system bus.
- Its pid file and its "simple protocol" socket are compiled in
  (``/run/avahi-daemon/pid``, ``/run/avahi-daemon/socket``); no option moves them. So
  every Avahi process runs in a private mount namespace (``unshare --mount
  --propagation private``, inside ``ip netns exec``) with a tmpfs over ``/run``: the
  machine's ``/run`` is never written, a real avahi-daemon's pid file never collides,
  and the machine's system bus socket (``/run/dbus/system_bus_socket``) cannot even be
  reached by mistake. A tmpfs over ``/etc/avahi/services`` hides the machine's static
  service files, so Avahi publishes only what a test asks for.
- ``avahi-daemon -f CONF --no-drop-root --no-chroot --no-rlimits``, where CONF
  (:data:`AVAHI_CONFIG`) sets a host name of its own, IPv4 only, ``eth0`` only, no
  wide-area, no workstation or HINFO records. Startup takes about a second (it probes
  its host name); ``Server startup complete`` in its log says it is ready.
- Nothing is started or stopped on the machine itself: every process lives in the
  testbed's namespaces, is ended by pid when the test ends (the testbed sweeps its
  namespaces as well), and the temporary directory (configs, bus socket, logs) is
  removed. Where the tools are missing or Avahi cannot start, the tests skip and say
  which step failed and how; under CI=true they fail instead (tests/required_groups.py):
  they are CI's only proof that another mDNS stack hears us and we hear it.

Quirk seen (checked against python-zeroconf's raw ``ServiceInfo.text``):
``avahi-publish`` sends TXT strings in the order of its arguments, but ``avahi-browse``
prints them last to first (Avahi keeps them in a list it prepends to), so
:func:`parse_browse` reverses them back to the order on the wire.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from required_groups import skip_or_fail

from p2pd.discovery import build_txt, decode_txt, encode_txt, parse_txt
from p2pd.identity import Identity
from p2pd.testing.daemons import DaemonProcess, cli_json, run_cli, short_tempdir, wait_until
from p2pd.testing.netns import Host, Testbed, read_line
from p2pd.wire import Address

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 4747
SERVICE = "_p2pd._udp"
AVAHI_HOST_NAME = "avahi-interop"
#: What the tests run, and the Debian package each comes from.
TOOLS = {
    "avahi-daemon": "avahi-daemon",
    "avahi-browse": "avahi-utils",
    "avahi-publish": "avahi-utils",
    "dbus-daemon": "dbus",
    "unshare": "util-linux",
    "mount": "mount",
}
#: How long one step may take: a client call, a daemon start, a wait for the network.
STEP_TIMEOUT = 10.0

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

AVAHI_CONFIG = f"""[server]
host-name={AVAHI_HOST_NAME}
domain-name=local
use-ipv4=yes
use-ipv6=no
allow-interfaces=eth0
enable-dbus=yes
ratelimit-interval-usec=1000000
ratelimit-burst=1000

[wide-area]
enable-wide-area=no

[publish]
publish-hinfo=no
publish-workstation=no
publish-aaaa-on-ipv4=no

[reflector]
enable-reflector=no
"""

#: Run in a private mount namespace with a tmpfs over /run (Avahi's pid file and socket
#: have fixed paths there) and over /etc/avahi/services (no static services), then exec
#: the command: the pid we hold is the command's own.
PRIVATE_RUN = (
    "mount -t tmpfs -o size=1m,mode=0755 p2pd-avahi /run && mkdir /run/avahi-daemon"
    " && { [ ! -d /etc/avahi/services ]"
    " || mount -t tmpfs -o size=64k,mode=0755 p2pd-avahi /etc/avahi/services; }"
    ' && exec "$@"'
)


def _private(args: Sequence[str]) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_RUN, "sh", *args]


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError as exc:
        return f"(no log: {exc})"


@dataclass(frozen=True)
class Browsed:
    """One resolved line of ``avahi-browse --parsable --resolve``."""

    interface: str
    protocol: str
    name: str
    service_type: str
    domain: str
    host_name: str
    address: str
    port: int
    #: the TXT strings in the order they came on the wire
    txt: tuple[bytes, ...]

    @property
    def properties(self) -> dict[bytes, bytes]:
        return decode_txt(encode_txt(dict(s.partition(b"=")[::2] for s in self.txt)))


_TXT_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _unescape(text: str) -> bytes:
    # avahi_string_list_to_string: '"' and '\' get a backslash, other bytes that are not
    # printable become \DDD (decimal).
    out = bytearray()
    i = 0
    raw = text.encode("utf-8", "surrogateescape")
    while i < len(raw):
        if raw[i : i + 1] == b"\\" and re.fullmatch(rb"[0-9]{3}", raw[i + 1 : i + 4]):
            out.append(int(raw[i + 1 : i + 4]))
            i += 4
        elif raw[i : i + 1] == b"\\" and i + 1 < len(raw):
            out += raw[i + 1 : i + 2]
            i += 2
        else:
            out += raw[i : i + 1]
            i += 1
    return bytes(out)


def parse_browse(output: str) -> list[Browsed]:
    """The resolved (``=``) lines of ``avahi-browse -p -r`` output."""
    found = []
    for line in output.splitlines():
        fields = line.split(";", 9)
        if fields[0] != "=" or len(fields) != 10:
            continue
        # avahi-browse prints the TXT strings last to first
        iface, protocol, name, service_type, domain, host_name, address, port, text = fields[1:]
        txt = tuple(_unescape(m) for m in reversed(_TXT_STRING.findall(text)))
        found.append(
            Browsed(iface, protocol, name, service_type, domain, host_name, address, int(port), txt)
        )
    return found


class AvahiHost:
    """avahi-daemon on one testbed host, on a private D-Bus, with a private /run.

    :meth:`start` returns why Avahi cannot run here (the tests skip or fail with it), or
    None.
    :meth:`close` ends every process it started, by pid, and removes its directory.
    """

    def __init__(self, host: Host, workdir: Path) -> None:
        self.host = host
        self.workdir = workdir
        self.bus_socket = workdir / "bus"
        self.env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={self.bus_socket}"}
        self._logs: list[IO[str]] = []
        self._bus: subprocess.Popen[str] | None = None
        self._daemon: subprocess.Popen[str] | None = None
        self._publishers: list[subprocess.Popen[str]] = []

    def _log(self, name: str) -> IO[str]:
        log = open(self.workdir / name, "w")  # noqa: SIM115 (closed in close())
        self._logs.append(log)
        return log

    def start(self) -> str | None:
        missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
        if missing:
            packages = " ".join(missing)
            return f"not installed: {packages} (Debian: apt-get install {packages})"
        (self.workdir / "bus.conf").write_text(BUS_CONFIG.format(socket=self.bus_socket))
        (self.workdir / "avahi-daemon.conf").write_text(AVAHI_CONFIG)
        self._bus = self.host.popen(
            [
                "dbus-daemon",
                f"--config-file={self.workdir / 'bus.conf'}",
                "--nofork",
                "--nopidfile",
                "--print-address=1",
            ],
            stderr=self._log("dbus-daemon.log"),
        )
        try:
            read_line(self._bus, timeout=STEP_TIMEOUT)
        except (TimeoutError, EOFError) as exc:
            return (
                f"a private dbus-daemon did not start in {self.host.netns} ({exc}; exit "
                f"{self._bus.poll()}): {_tail(self.workdir / 'dbus-daemon.log')}"
            )
        daemon_log = self._log("avahi-daemon.log")
        self._daemon = self.host.popen(
            _private(
                [
                    "avahi-daemon",
                    "-f",
                    str(self.workdir / "avahi-daemon.conf"),
                    "--no-drop-root",
                    "--no-chroot",
                    "--no-rlimits",
                    "--no-proc-title",
                ]
            ),
            stdout=daemon_log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        ready = wait_until(
            lambda: (
                self._daemon is not None
                and (
                    self._daemon.poll() is not None
                    or "Server startup complete" in _tail(self.workdir / "avahi-daemon.log", 10**6)
                )
            ),
            timeout=STEP_TIMEOUT,
            interval=0.1,
        )
        if not ready or self._daemon.poll() is not None:
            how = "timed out" if not ready else f"exited {self._daemon.returncode}"
            return (
                f"avahi-daemon in {self.host.netns} (private mount namespace, private "
                f"D-Bus) did not start ({how}): {_tail(self.workdir / 'avahi-daemon.log')}"
            )
        return None

    def browse(self, service_type: str = SERVICE) -> list[Browsed]:
        """Browse and resolve ``service_type`` once (``avahi-browse -rtp``)."""
        proc = self.host.run(
            _private(["avahi-browse", "--resolve", "--terminate", "--parsable", service_type]),
            env=self.env,
            timeout=STEP_TIMEOUT,
            check=True,
        )
        return parse_browse(proc.stdout)

    def publish(
        self, name: str, port: int, properties: Mapping[bytes, bytes], service_type: str = SERVICE
    ) -> subprocess.Popen[str]:
        """``avahi-publish -s``; returns once Avahi has established the service."""
        txt = [(k + b"=" + v).decode("ascii") for k, v in properties.items()]  # in order
        proc = self.host.popen(
            _private(["avahi-publish", "-s", name, service_type, str(port), *txt]),
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        self._publishers.append(proc)
        line = read_line(proc, timeout=STEP_TIMEOUT)
        assert line == f"Established under name '{name}'", line
        return proc

    def close(self) -> None:
        """End everything started here (publishers, daemon, bus), then remove the files."""
        try:
            for proc in [*self._publishers, self._daemon, self._bus]:
                if proc is None or proc.poll() is not None:
                    continue
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            for proc in [*self._publishers, self._daemon, self._bus]:
                if proc is not None and proc.stdout is not None:
                    proc.stdout.close()
            for log in self._logs:
                log.close()
            print(f"----- avahi-daemon\n{_tail(self.workdir / 'avahi-daemon.log', 3000)}")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class Interop:
    p2pd_host: Host
    avahi_host: Host
    avahi: AvahiHost
    home: Path
    daemon: DaemonProcess | None = None

    def start_daemon(self) -> DaemonProcess:
        self.daemon = DaemonProcess(
            self.home,
            listen=f"0.0.0.0:{PORT}",
            lan="everyone",
            wrapper=self.p2pd_host.command([]),
            extra=["-v"],
        ).wait_ready()
        return self.daemon

    def lan_peers(self) -> list[dict[str, Any]]:
        return [p for p in cli_json(self.home, "peers", timeout=STEP_TIMEOUT) if p["via"] == "lan"]


@pytest.fixture()
def interop(testbed: Testbed) -> Iterator[Interop]:
    root = short_tempdir("p2pd-avahi-")
    try:
        lan = testbed.lan("lan0", "198.51.100.0/24")
        a, b = testbed.host("p2pd", lan), testbed.host("avahi", lan)
        (root / "avahi").mkdir()
        avahi = AvahiHost(b, root / "avahi")
        env = Interop(a, b, avahi, root / "alice")
        try:
            reason = avahi.start()
            if reason is not None:
                skip_or_fail(f"Avahi cannot run in a network namespace here: {reason}")
            init = run_cli(env.home, "init", "alice", "--no-passphrase", timeout=STEP_TIMEOUT)
            assert init.returncode == 0, init.stderr
            yield env
        finally:
            if env.daemon is not None:
                env.daemon.stop(timeout=5)
                print(f"----- p2pd (exit {env.daemon.proc.returncode})\n{env.daemon.log[-3000:]}")
            avahi.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_avahi_browses_and_resolves_our_announcement(interop: Interop) -> None:
    daemon = interop.start_daemon()
    found: list[Browsed] = []

    def seen() -> bool:
        found[:] = [s for s in interop.avahi.browse() if s.properties.get(b"h") == b"alice"]
        return bool(found)

    assert wait_until(seen, timeout=STEP_TIMEOUT, interval=0.5), "Avahi never saw alice"
    [service] = found  # one instance, seen on one interface, over IPv4
    assert (service.interface, service.protocol, service.service_type, service.domain) == (
        "eth0",
        "IPv4",
        SERVICE,
        "local",
    )
    # PROTOCOL.md "Records": random instance name, host name p2pd-<same hex>.local
    assert re.fullmatch(r"p2pd-[0-9a-f]{16}", service.name), service.name
    assert service.host_name == f"{service.name}.local"
    assert (service.address, service.port) == (str(interop.p2pd_host.address), PORT)
    props = service.properties
    # the keys of PROTOCOL.md "TXT record", in the order we send them: v first
    assert list(props) == [b"v", b"m", b"p", b"t", b"h", b"k", b"a", b"s"]
    assert (props[b"v"], props[b"m"], props[b"h"], props[b"p"]) == (b"1", b"e", b"alice", b"4747")
    assert abs(int(props[b"t"]) - time.time()) < 600
    # Avahi carried the TXT record intact: it still verifies, under the daemon's key
    peer = parse_txt(
        encode_txt(props),
        source_addresses=[Address(service.address, service.port)],
        now=time.time(),
        contacts={},
        pins=lambda handle: None,
    )
    assert peer.fingerprint == daemon.fingerprint
    assert peer.addresses == (Address(str(interop.p2pd_host.address), PORT),)


def test_we_see_what_avahi_publishes(interop: Interop) -> None:
    daemon = interop.start_daemon()
    avahi_address = str(interop.avahi_host.address)
    now = int(time.time())
    # signed by mallory's key, but over other bytes: the shape is right, the signature not
    mallory = Identity.generate("mallory")
    forged = build_txt(mallory, port=4748, addresses=[avahi_address], mode="everyone", now=now)
    forged[b"s"] = build_txt(
        mallory, port=4748, addresses=[avahi_address], mode="everyone", now=now - 1
    )[b"s"]
    interop.avahi.publish("avahi-forged", 4748, forged)
    # what anyone would publish by hand: no key, no signature
    interop.avahi.publish("avahi-plain", 4749, {b"v": b"1", b"m": b"e", b"h": b"mallory"})
    log_lines = (
        "mDNS: ignored instance 'avahi-forged._p2pd._udp.local.': "
        "announcement signature does not verify",
        "mDNS: ignored instance 'avahi-plain._p2pd._udp.local.': ",
    )
    assert wait_until(
        lambda: all(line in daemon.log for line in log_lines),
        timeout=STEP_TIMEOUT,
    ), "p2pd did not refuse Avahi's announcements with a log line"
    assert interop.lan_peers() == []

    # a valid announcement, published by Avahi for a key that is not Avahi's
    carol = Identity.generate("carol")
    valid = build_txt(carol, port=4750, addresses=[avahi_address], mode="everyone", now=now)
    publisher = interop.avahi.publish("avahi-valid", 4750, valid)
    assert wait_until(lambda: interop.lan_peers() != [], timeout=STEP_TIMEOUT)
    [listed] = interop.lan_peers()
    assert listed["handle"] == "carol" and listed["fingerprint"] == carol.fingerprint
    assert listed["addresses"] == [f"{avahi_address}:4750"]
    assert (listed["pinned"], listed["mode"]) == (False, "everyone")
    assert "ignored instance 'avahi-valid." not in daemon.log

    # avahi-publish ending withdraws the service (goodbye, TTL 0): carol leaves
    publisher.terminate()
    publisher.wait(5)
    assert wait_until(lambda: interop.lan_peers() == [], timeout=5), "carol did not leave"
