"""Three real p2pd daemons on 127.0.0.1: handles claimed, resolved across nodes, an
encrypted message delivered and answered, a short call placed, a small file sent, then
everything stopped.

Run it with scripts/demo. Every step prints the CLI command it runs and what came back.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

from p2pd.testing.daemons import DaemonProcess, cli_json, p2pd_command, run_cli, short_tempdir

HANDLES = ("alice", "bob", "carol")


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _dominant(path: Path) -> tuple[float, float]:
    """(dominant frequency in Hz, seconds) of a recorded WAV file; (0, 0) if missing."""
    if not path.exists():
        return 0.0, 0.0
    with wave.open(str(path)) as w:
        rate, channels = w.getframerate(), w.getnchannels()
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)[::channels]
    if samples.size == 0:
        return 0.0, 0.0
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    freqs = np.fft.rfftfreq(samples.size, 1 / rate)
    return float(freqs[int(spectrum.argmax())]), samples.size / rate


def main() -> int:
    root = short_tempdir("p2pd-demo-")
    daemons: list[DaemonProcess] = []
    try:
        step(f"three identities in temporary homes under {root}")
        for handle in HANDLES:
            proc = run_cli(root / handle, "init", handle, "--no-passphrase")
            print(f"$ p2pd --home {root / handle} init {handle} --no-passphrase")
            print(proc.stdout.strip() or proc.stderr.strip())
            if proc.returncode:
                return 1
            # received files go under the demo's root, not the user's download directory
            (root / handle / "config.toml").write_text(
                f'[files]\ndir = "{root / f"{handle}-files"}"\n'
            )

        step("alice starts a new network; bob and carol join through her")
        first = DaemonProcess(root / "alice").wait_ready()
        daemons.append(first)
        print(f"alice's daemon listens on {first.listen}")
        for handle in HANDLES[1:]:
            d = DaemonProcess(root / handle, bootstrap=[first.listen]).wait_ready()
            daemons.append(d)
            print(f"{handle}'s daemon listens on {d.listen}, bootstrapped from {first.listen}")

        step("every node resolves every handle through the DHT")
        failures = 0
        for asker in HANDLES:
            for target in HANDLES:
                if asker == target:
                    continue
                record = cli_json(root / asker, "whois", target)
                owner = next(d for d in daemons if d.handle.startswith(target + "#"))
                ok = record["fingerprint"] == owner.fingerprint
                failures += not ok
                print(
                    f"{asker:>5} -> whois {target:<5} {record['self_certifying']:<20} "
                    f"at {', '.join(record['addresses'])}  "
                    f"{'key matches' if ok else 'KEY MISMATCH'}"
                )

        step("a self-certifying lookup with a wrong fingerprint prefix is refused")
        proc = run_cli(root / "bob", "whois", "alice#aaaaaaaaaaaa")
        print(f"$ p2pd whois alice#aaaaaaaaaaaa  -> exit {proc.returncode}: {proc.stderr.strip()}")
        failures += proc.returncode != 1

        step("alice sends bob an end-to-end encrypted message (X3DH, then the Double Ratchet)")
        text = "hi bob, only you can read this"
        proc = run_cli(root / "alice", "send", "bob", text, "--wait", "--timeout", "30")
        print(f'$ p2pd send bob "{text}" --wait\n{(proc.stdout or proc.stderr).strip()}')
        failures += proc.returncode != 0
        proc = run_cli(root / "bob", "inbox")
        print(f"$ p2pd inbox   (on bob's daemon)\n{proc.stdout.strip()}")
        failures += text not in proc.stdout

        step("bob answers; the ack travels back and alice sees it arrive")
        reply = "hello alice, received"
        proc = run_cli(root / "bob", "send", "alice", reply, "--wait", "--timeout", "30")
        print(f'$ p2pd send alice "{reply}" --wait\n{(proc.stdout or proc.stderr).strip()}')
        failures += proc.returncode != 0
        proc = run_cli(root / "alice", "inbox", "--from", "bob")
        print(f"$ p2pd inbox --from bob   (on alice's daemon)\n{proc.stdout.strip()}")
        failures += reply not in proc.stdout
        proc = run_cli(root / "alice", "contacts")
        print(f"$ p2pd contacts   (bob's key is pinned on first contact)\n{proc.stdout.strip()}")

        step("alice calls bob for 3 s: tone:440 one way, tone:660 the other (Opus over QUIC)")
        bob_wav, alice_wav = root / "bob-heard.wav", root / "alice-heard.wav"
        answer = subprocess.Popen(
            [*p2pd_command(), "--home", str(root / "bob"), "answer", "--wait", "30",
             "--audio-in", "tone:660", "--record", str(bob_wav)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        proc = run_cli(
            root / "alice", "call", "bob", "--audio-in", "tone:440", "--record",
            str(alice_wav), "--duration", "3", timeout=90,
        )  # fmt: skip
        print(f"$ p2pd call bob --audio-in tone:440 --duration 3\n{proc.stdout.strip()}")
        try:
            answer.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            answer.kill()
        failures += proc.returncode != 0
        for who, path, expected in (("alice", alice_wav, 660), ("bob", bob_wav, 440)):
            heard, seconds = _dominant(path)
            ok = abs(heard - expected) < 5
            failures += not ok
            print(f"{who} heard {seconds:.2f} s of audio, dominant {heard:.0f} Hz "
                  f"({'the other side' if ok else 'WRONG'})")  # fmt: skip

        step("alice sends bob a small file: offered in the encrypted session, streamed in "
             "chunks verified as they arrive")  # fmt: skip
        notes = root / "notes.txt"
        notes.write_text("".join(f"line {i}: only bob can read this\n" for i in range(2000)))
        proc = run_cli(root / "alice", "send-file", "bob", str(notes), "--wait",
                       "--timeout", "60", timeout=90)  # fmt: skip
        print(f"$ p2pd send-file bob notes.txt --wait\n{(proc.stdout or proc.stderr).strip()}")
        failures += proc.returncode != 0
        proc = run_cli(root / "bob", "files")
        print(f"$ p2pd files   (on bob's daemon)\n{proc.stdout.strip()}")
        received = root / "bob-files" / "notes.txt"
        same = received.exists() and received.read_bytes() == notes.read_bytes()
        failures += not same
        print(f"bob's copy {received}: {'identical' if same else 'MISSING OR DIFFERENT'}")

        step("bob's status")
        print(run_cli(root / "bob", "status").stdout.strip())
    finally:
        step("stopping the daemons")
        for d in daemons:
            code = d.stop()
            print(f"{d.handle}: exit {code}")
        shutil.rmtree(root, ignore_errors=True)
    print("\ndemo " + ("succeeded" if failures == 0 else f"FAILED ({failures} checks)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
