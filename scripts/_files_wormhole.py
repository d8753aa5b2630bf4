"""magic-wormhole on the same file, for scripts/bench_files.py --wormhole (issue 14: "against
the fastest file tool that installs here from a registry").

magic-wormhole (0.24 from PyPI) and its mailbox server go into a venv of their own
(.cache/wormhole-venv, made on first use), never into the project's. Everything runs in
one network namespace the benchmark creates (p2pd.testing.netns): the mailbox server,
the sender and the receiver, so the only addresses anyone can reach are inside it
(wormhole offers every local address as a direct-connection hint; outside a namespace
that would include the machine's own). No transit relay runs: the two connect directly
over TCP, as two p2pd daemons on one machine connect directly over QUIC.

Timed from starting the sender to the receiver's exit with the file written and compared.
"""

from __future__ import annotations

import filecmp
import subprocess
import sys
import time
from pathlib import Path

from p2pd.testing.netns import Testbed

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".cache" / "wormhole-venv"
PACKAGES = ("magic-wormhole==0.24.0", "magic-wormhole-mailbox-server==0.8.0")
CODE = "7-p2pd-bench"


def ensure_wormhole() -> Path:
    """The venv's bin directory, installing magic-wormhole there on first use."""
    bin_dir = VENV / "bin"
    if not (bin_dir / "wormhole").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(bin_dir / "pip"), "install", "-q", *PACKAGES], check=True, timeout=600)
    return bin_dir


def wormhole_seconds(src: Path, work: Path, timeout: float = 600.0) -> tuple[float, str]:
    """Send ``src`` with magic-wormhole inside a fresh namespace; (seconds, version)."""
    bin_dir = ensure_wormhole()
    version = subprocess.run(
        [str(bin_dir / "wormhole"), "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    out = work / "wormhole-received.bin"
    out.unlink(missing_ok=True)
    with Testbed() as testbed:
        host = testbed.host("wh", testbed.lan("whlan", "10.78.0.0/24"))
        relay = ["--relay-url", "ws://127.0.0.1:4000/v1", "--transit-helper", "tcp:127.0.0.1:1"]
        server = host.popen(
            # --channel-db: the server's state database, by default relay.sqlite in the
            # current directory (one was once committed to the repository's top level).
            [str(bin_dir / "twist"), "wormhole-mailbox", "--port", "tcp:4000:interface=127.0.0.1",
             "--channel-db", str(work / "wormhole-relay.sqlite")]
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while (
                b"4000"
                not in subprocess.run(host.command(["ss", "-ltn"]), capture_output=True).stdout
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the wormhole mailbox server did not start")
                time.sleep(0.1)
            t0 = time.perf_counter()
            sender = host.popen(
                [str(bin_dir / "wormhole"), *relay, "send", "--code", CODE, str(src)]
            )
            receiver = subprocess.run(
                host.command(
                    [str(bin_dir / "wormhole"), *relay, "receive", "--accept-file", "-o",
                     str(out), CODE]
                ),
                capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            sender.wait(timeout=60)
        finally:
            server.kill()
        if receiver.returncode or not filecmp.cmp(src, out, shallow=False):
            raise SystemExit(f"magic-wormhole failed: {receiver.stderr[-500:]}")
    out.unlink()
    return seconds, version
