"""A private PulseAudio server with virtual devices, for tests/test_audio_devices.py and
scripts/bench_call.py's device path.

:class:`PulseServer` starts ``pulseaudio`` as whoever runs it, with its runtime
directory, state, cookie and socket under a directory of the caller's, and null sinks
(mono, 48 kHz) that stand in for speakers; each sink's ``.monitor`` source stands in
for a microphone. Clients reach it through :attr:`PulseServer.env` (``PULSE_SERVER``
and the paths); it touches no sound server of the machine. ``paplay`` into a sink is
what a microphone monitoring it hears, and ``parec`` from a sink's monitor is what a
speaker on it plays.

Needs pulseaudio and pulseaudio-utils (pactl, paplay, parec):
``scripts/_system_deps.sh audio``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .waiting import wait_until

__all__ = ["RATE", "TOOLS", "PulseServer", "stop_process"]

RATE = 48000
TOOLS = ("pulseaudio", "pactl", "paplay", "parec")


class PulseServer:
    """A private PulseAudio server: one null sink per name in ``sinks``, mono 48 kHz.
    Raises RuntimeError if it does not answer within 20 s. :meth:`stop` ends it."""

    def __init__(self, root: Path, sinks: list[str]) -> None:
        self.root = root
        self.socket = root / "native"
        script = [f"load-module module-native-protocol-unix auth-anonymous=1 socket={self.socket}"]
        for name in sinks:
            script.append(
                f"load-module module-null-sink sink_name={name} rate={RATE} channels=1 format=s16le"
            )
        (root / "default.pa").write_text("\n".join(script) + "\n")
        # HOME and the runtime paths: pulseaudio and its clients keep cookies and state
        # there; ours, not the machine's.
        self.env = {
            "HOME": str(root),
            "XDG_RUNTIME_DIR": str(root),
            "XDG_CONFIG_HOME": str(root / "config"),
            "PULSE_RUNTIME_PATH": str(root / "runtime"),
            "PULSE_STATE_PATH": str(root / "state"),
            "PULSE_SERVER": f"unix:{self.socket}",
        }
        self.log = open(root / "pulse.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            ["pulseaudio", "-n", "-F", str(root / "default.pa"), "--daemonize=no",
             "--exit-idle-time=-1", "--disallow-exit", "--use-pid-file=no",
             "--log-target=stderr"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            env={**os.environ, **self.env},
        )  # fmt: skip
        if not wait_until(lambda: self._pactl("info").returncode == 0, 20):
            self.stop()
            raise RuntimeError(f"pulseaudio did not start:\n{(root / 'pulse.log').read_text()}")

    def _pactl(self, *args: str) -> subprocess.CompletedProcess[str]:
        if self.proc.poll() is not None:
            raise RuntimeError(f"pulseaudio exited:\n{(self.root / 'pulse.log').read_text()}")
        return subprocess.run(
            ["pactl", *args], capture_output=True, text=True, timeout=10,
            env={**os.environ, **self.env},
        )  # fmt: skip

    def play(self, sink: str, wav: Path) -> subprocess.Popen[bytes]:
        """``paplay`` of ``wav`` into ``sink`` (what a microphone on its monitor hears)."""
        return subprocess.Popen(
            # Low latency: a null sink renders in blocks as long as its clients allow (up
            # to 2 s), and a monitor delivers nothing before the block ends.
            ["paplay", "-d", sink, "--latency-msec=20", str(wav)], env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def record(self, source: str, out: Path) -> subprocess.Popen[bytes]:
        """``parec`` of ``source`` into the WAV file ``out`` until stopped."""
        return subprocess.Popen(
            ["parec", "-d", source, "--raw", "--format=s16le", f"--rate={RATE}",
             "--channels=1", "--latency-msec=20", "--file-format=wav", str(out)],
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` (kill it after 10 s) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
