"""miniupnpd (Debian's ``miniupnpd-nftables``) in a testbed NAT router: NAT-PMP and PCP
for the daemon's port-mapping client (p2pd/transport/portmap.py; issue 13, item 9).

:func:`start_miniupnpd` writes a config for a router made with
``Testbed.nat_router(..., port_mapping=True)`` (whose ``inet p2pd_nat`` table jumps to
the three chains miniupnpd fills: p2pd/testing/netns.py) and runs ``miniupnpd -d`` in
the router's namespace. NAT-PMP and PCP answer on the inside address, port 5351; UPnP
(SSDP/HTTP) is off. A mapping is one DNAT rule in ``prerouting_miniupnpd`` and one
accept rule in ``miniupnpd``; :func:`mapping_rules` reads them back.

**The public-address check, and why STUN.** miniupnpd refuses to map ports when its
outside address is "reserved" (``addr_is_reserved`` in miniupnpd/getifaddr.c: RFC 1918,
100.64/10, 198.18/15 and the three RFC 5737 documentation ranges are all in its list),
and every outside address of the testbed is in one of those ranges. The option that
lifts the check, ``ext_allow_private_ipv4``, exists only from miniupnpd 2.3.10; Debian
bookworm ships 2.3.1, where ``ext_ip=`` with such an address is a start-up error too.
What 2.3.1 does accept is ``ext_perform_stun=yes``: it asks a STUN server for its
public address from four sockets and, when all four answers come back unchanged
(``perform_stun`` in upnpstun.c), takes the answer without the reserved-range check.
So this module also runs a minimal STUN responder (RFC 5389 Binding, answered with
XOR-MAPPED-ADDRESS = the request's source) inside the router, on its outside address:
it tells miniupnpd the truth about the testbed (the router's outside address *is* the
public address there), and nothing leaves the namespace.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .netns import NatRouter, TestbedError, read_line

#: Where the STUN responder listens, on the router's outside address.
STUN_PORT = 3478
#: How long miniupnpd may take to come up (its STUN check included).
START_TIMEOUT = 15.0
_MAGIC = 0x2112A442


def config_text(router: NatRouter, *, min_lifetime: int = 120, max_lifetime: int = 3600) -> str:
    """miniupnpd.conf for ``router``: NAT-PMP/PCP on, UPnP off, mappings only for the
    inside LAN and only to the requester itself (``secure_mode``), in the router's own
    nftables table."""
    inside = router.inside.subnet
    return f"""\
ext_ifname={router.interface}
listening_ip={router.inside_interface}
enable_natpmp=yes
enable_upnp=no
secure_mode=yes
ext_perform_stun=yes
ext_stun_host={router.address}
ext_stun_port={STUN_PORT}
upnp_table_name=p2pd_nat
upnp_nat_table_name=p2pd_nat
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
min_lifetime={min_lifetime}
max_lifetime={max_lifetime}
allow 1024-65535 {inside} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""


def start_miniupnpd(
    router: NatRouter, **limits: int
) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    """Start the STUN responder and miniupnpd in ``router``; returns both processes
    (the testbed kills them at cleanup) once miniupnpd listens for NAT-PMP/PCP.
    Raises TestbedError with miniupnpd's own words when it does not come up. Its
    config file (read once, at start) is gone by then."""
    with tempfile.TemporaryDirectory(prefix="p2pd-upnp-") as workdir:
        return _start(router, Path(workdir), config_text(router, **limits))


def _start(
    router: NatRouter, workdir: Path, config: str
) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    conf = workdir / "miniupnpd.conf"
    conf.write_text(config)
    stun = router.popen(
        [sys.executable, "-m", "p2pd.testing.miniupnpd", "stun", str(router.address)],
        stderr=subprocess.DEVNULL,
    )
    if read_line(stun, START_TIMEOUT) != "ready":
        raise TestbedError("the STUN responder did not start")
    pidfile = workdir / "miniupnpd.pid"
    daemon = router.popen(
        ["/usr/sbin/miniupnpd", "-d", "-f", str(conf), "-P", str(pidfile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seen: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            line = _read_err_line(daemon, deadline - time.monotonic())
        except (TimeoutError, EOFError):
            break
        seen.append(line)
        if "Listening for NAT-PMP/PCP" in line:
            return stun, daemon
    raise TestbedError("miniupnpd did not start: " + " | ".join(seen[-12:]))


def _read_err_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """:func:`read_line` on stderr (miniupnpd -d logs there)."""
    proc.stdout, proc.stderr = proc.stderr, proc.stdout
    try:
        return read_line(proc, timeout)
    finally:
        proc.stdout, proc.stderr = proc.stderr, proc.stdout


def mapping_rules(router: NatRouter) -> list[str]:
    """The rules miniupnpd holds now: its DNAT chain's and its filter chain's lines."""
    rules: list[str] = []
    for chain in ("prerouting_miniupnpd", "miniupnpd"):
        out = router.run(["nft", "list", "chain", "inet", "p2pd_nat", chain]).stdout
        body = out.split("{", 2)[-1]
        rules += [ln.strip() for ln in body.splitlines() if "dport" in ln]
    return rules


def stun_reply(request: bytes, source: tuple[str, int]) -> bytes | None:
    """A Binding success response to an RFC 5389 Binding request from ``source``
    (IPv4), or None for anything else."""
    if len(request) < 20 or request[:2] != b"\x00\x01":
        return None
    if struct.unpack_from("!I", request, 4)[0] != _MAGIC:
        return None
    host = struct.unpack("!I", socket.inet_aton(source[0]))[0]
    attr = struct.pack("!HHBBHI", 0x0020, 8, 0, 1, source[1] ^ (_MAGIC >> 16), host ^ _MAGIC)
    return struct.pack("!HHI", 0x0101, len(attr), _MAGIC) + request[8:20] + attr


def _serve_stun(address: str) -> None:  # pragma: no cover - runs in a namespace
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, STUN_PORT))
        print("ready", flush=True)
        for _ in range(1_000_000):  # bounded; the testbed kills it long before
            data, source = sock.recvfrom(2048)
            reply = stun_reply(data, source)
            if reply is not None:
                sock.sendto(reply, source)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 3 or sys.argv[1] != "stun":
        sys.exit("usage: python -m p2pd.testing.miniupnpd stun ADDRESS")
    _serve_stun(sys.argv[2])
