"""Calls through real sound devices: a PulseAudio server of the test's own, whose null
sinks stand in for speakers and whose sinks' monitors stand in for microphones.

The stack under test is the one a Linux desktop has: p2pd's daemon opens the default
devices through sounddevice -> PortAudio -> ALSA's pulse plugin -> PulseAudio. The test
starts ``pulseaudio`` itself (as whoever runs the tests, root in CI) with a runtime
directory, state and socket in a temporary directory, talks to it by ``PULSE_SERVER``,
and stops it afterwards; it touches no sound server of the machine. Each daemon gets
``PULSE_SOURCE`` / ``PULSE_SINK`` naming its own virtual devices, as a desktop's
settings would.

Needs: pulseaudio, pulseaudio-utils (pactl, paplay, parec), libasound2-plugins (the
pulse plugin), libportaudio2 and sounddevice (scripts/_system_deps.sh audio). Required
under CI=true (tests/required_groups.py).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from required_groups import skip_or_fail

from p2pd.testing.daemons import DaemonProcess, popen_cli, run_cli, short_tempdir
from p2pd.testing.pulse import RATE, TOOLS, PulseServer, stop_process


def _needs() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        skip_or_fail(f"PulseAudio tools missing: {', '.join(missing)} (_system_deps.sh audio)")
    failed = _sounddevice_fails()
    if failed is not None:
        skip_or_fail(f"sounddevice does not load (pip install '.[audio]', libportaudio2): {failed}")


@functools.cache
def _sounddevice_fails() -> str | None:
    """Why ``import sounddevice`` fails (its last line of stderr), or None: in a process
    of its own (PortAudio starts at import, and not in the test worker), once a worker
    (0.07-0.13 s of CPU each)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import sounddevice"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        return (probe.stderr.strip().splitlines() or ["?"])[-1]
    return None


Pulse = PulseServer
_stop = stop_process


def write_tone(path: Path, hz: float, seconds: float, amplitude: float = 0.3) -> None:
    t = np.arange(int(RATE * seconds)) / RATE
    pcm = (np.sin(2 * np.pi * hz * t) * amplitude * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getframerate() == RATE and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)


def tone_in(samples: np.ndarray) -> tuple[float, float]:
    """(dominant frequency in Hz, RMS) of ``samples``."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    freqs = np.fft.rfftfreq(len(samples), 1 / RATE)
    return float(freqs[int(spectrum.argmax())]), float(np.sqrt(np.mean(samples**2)))


def gaps_ms(samples: np.ndarray, floor: float) -> list[float]:
    """Each run of 5 ms windows whose RMS is under ``floor``, in ms, in order."""
    win = RATE // 200
    n = len(samples) // win
    rms = np.sqrt(np.mean(samples[: n * win].reshape(n, win) ** 2, axis=1))
    runs: list[float] = []
    run = 0
    for quiet in [*(rms < floor), False]:
        if quiet:
            run += 1
        elif run:
            runs.append(run * 5.0)
            run = 0
    return runs


@pytest.fixture()
def pulse() -> Iterator[Pulse]:
    _needs()
    root = short_tempdir("p2pd-pa-")
    server = Pulse(root, ["alice_mic", "alice_speaker", "bob_mic", "bob_speaker"])
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_devices_lists_the_virtual_devices(pulse: Pulse) -> None:
    proc = run_cli(pulse.root / "nohome", "devices", "--json", env=pulse.env)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    # Through ALSA's pulse plugin PortAudio shows the server as "pulse" and "default".
    for kind in ("inputs", "outputs"):
        names = [d["name"] for d in found[kind]]
        assert "default" in names and "pulse" in names, found
        assert sum(d["default"] for d in found[kind]) == 1
    human = run_cli(pulse.root / "nohome", "devices", env=pulse.env)
    assert "microphones" in human.stdout and "speakers" in human.stdout


def test_devices_and_call_with_no_device_at_all(tmp_path: Path) -> None:
    """No sound card and no sound server: `devices` says so, and `call` without
    --audio-in refuses before ringing, saying what to use instead."""
    _needs()
    if Path("/proc/asound/cards").exists() and "no soundcards" not in (
        Path("/proc/asound/cards").read_text()
    ):
        pytest.skip("this machine has a sound card: it cannot show 'no device at all'")
    # No sound server where PULSE_SERVER points: ALSA's pulse plugin stays out, and
    # with no card either, PortAudio finds nothing. (An empty ALSA_CONFIG_PATH would be
    # "nothing" too, but alsa-lib aborts the process on it.)
    env = {"PULSE_SERVER": f"unix:{tmp_path}/none"}
    proc = run_cli(tmp_path / "home", "devices", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "no microphones found" in proc.stdout and "no speakers found" in proc.stdout
    assert "Traceback" not in proc.stderr
    found = json.loads(run_cli(tmp_path / "home", "devices", "--json", env=env).stdout)
    assert found == {"inputs": [], "outputs": []}
    # The check the daemon runs before ringing anyone, in a process with that setting.
    check = subprocess.run(
        [sys.executable, "-c",
         "from p2pd.media.devices import check_devices\n"
         "from p2pd.errors import LocalError\n"
         "for a, b in (('mic', None), (None, 'speaker')):\n"
         "    try:\n"
         "        check_devices(a, b)\n"
         "    except LocalError as e:\n"
         "        print(e.message)\n"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )  # fmt: skip
    assert check.stdout.splitlines() == [
        "no microphone found: use --audio-in FILE|tone:HZ",
        "no speaker found: use --audio-out none or --record FILE",
    ], check.stderr


def test_a_call_from_microphone_to_speaker(pulse: Pulse) -> None:
    """alice's microphone hears a 880 Hz tone (played into the sink it monitors), bob's a
    660 Hz one; each side's speaker (a null sink, recorded from its monitor) plays the
    other's tone, steadily: no gap over 20 ms once it began."""
    root = pulse.root
    for name, hz in (("alice", 880), ("bob", 660)):
        write_tone(root / f"{name}.wav", hz, 30.0)  # outlasts a slow start of the daemons
    daemons: dict[str, DaemonProcess] = {}
    players: list[subprocess.Popen[bytes]] = []
    try:
        for handle in ("alice", "bob"):
            home = root / handle
            assert run_cli(home, "init", handle, "--no-passphrase").returncode == 0
            (home / "config.toml").write_text("[node]\nring_timeout = 10.0\n")
            env = {**pulse.env, "PULSE_SOURCE": f"{handle}_mic.monitor",
                   "PULSE_SINK": f"{handle}_speaker"}  # fmt: skip
            boot = [d.listen for d in daemons.values()][:1]
            daemons[handle] = DaemonProcess(home, bootstrap=boot, env=env).wait_ready()
        players = [pulse.play(f"{h}_mic", root / f"{h}.wav") for h in ("alice", "bob")]
        captures = [pulse.record(f"{h}_speaker.monitor", root / f"{h}-heard.wav")
                    for h in ("alice", "bob")]  # fmt: skip
        players += captures
        # bob: no --audio-in/--audio-out, the default microphone and speaker; alice names
        # hers (PortAudio's "pulse" device, which follows PULSE_SOURCE/PULSE_SINK too).
        answer = popen_cli(root / "bob", "answer", "--wait", "30", "--json")
        try:
            call = run_cli(
                root / "alice", "call", "bob", "--audio-in", "mic:pulse",
                "--audio-out", "speaker:pulse", "--duration", "6", "--json", timeout=60,
            )  # fmt: skip
            out, err = answer.communicate(timeout=60)
        finally:
            answer.kill()
        assert call.returncode == 0, call.stderr
        assert answer.returncode == 0, err
        for capture in captures:
            _stop(capture)
        stats = {"alice": json.loads(call.stdout)["media"], "bob": json.loads(out)["media"]}
        for handle, heard_hz in (("alice", 660), ("bob", 880)):
            media = stats[handle]
            # A busy machine may starve the daemon for a moment: each underrun is 10 ms of
            # zeros, after which the speaker's queue grows by 10 ms. (Seen at a load
            # average of 8-9 on 2 cores, other suites running: 3 to 5 in 4 s; idle: 0. The
            # same rate over the 6 s call: 7.)
            assert media["speaker_underruns"] <= 7, json.dumps(media)
            assert media["mic_dropped_frames"] == 0, (handle, media)
            samples = read_wav(root / f"{handle}-heard.wav")
            level = np.sqrt(
                np.convolve(samples**2, np.ones(RATE // 50) / (RATE // 50), mode="valid")
            )
            loud = np.flatnonzero(level > 1000)
            assert loud.size, f"{handle}'s speaker played nothing"
            # The tone from when it started playing until the call ended. On a loaded
            # machine (the whole suite and other work on 2 cores) the first audio came
            # 1.8 s into a 4 s call once, hence a 6 s call and 3.5 s asked for.
            played = samples[loud[0] + RATE // 10 : loud[-1]]
            assert len(played) / RATE > 3.5, (handle, len(played) / RATE, json.dumps(media))
            hz, rms = tone_in(played)
            assert abs(hz - heard_hz) < 3, (handle, hz)
            # The tone went in at 0.3 full scale (RMS ~6950); Opus and the way keep it
            # within a few dB.
            assert 3000 < rms < 12000, (handle, rms)
            # No gap: the issue asks for none over 20 ms; two underruns back to back on a
            # starved machine make 20-25 ms of near-silence in 5 ms windows, so 30. A
            # longer one only where the speaker said it was starved: an underrun (our
            # queue empty: 10 ms of zeros) or a device underflow (PortAudio's: the
            # server's buffer ran dry, the device thread late), at least one for each.
            # Beside CPU hogs (load 9-11, the daemons at nice 10 and the hogs at 0) a
            # call had gaps of 40, 45 and 65 ms with 7 underruns and 7 underflows.
            starved = media["speaker_underruns"] + media["speaker_device_underflows"]
            long_gaps = [g for g in gaps_ms(played, 300.0) if g > 30]
            assert len(long_gaps) <= starved, (handle, long_gaps, json.dumps(media))
    finally:
        for proc in players:
            _stop(proc)
        for handle, d in daemons.items():
            d.stop()
            print(f"----- {handle}\n{d.log[-3000:]}")
