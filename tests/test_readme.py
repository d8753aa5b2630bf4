"""What README.md promises a newcomer: scripts/demo works, and so does shell completion.

scripts/demo, the README's first command, runs once end to end: three real daemons on
127.0.0.1, and what a user reading its output would check. scripts/demo only makes
.venv and runs scripts/demo.py in it; this runs demo.py with the test's own interpreter
(the venv pytest runs in), so the test never builds a venv.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from p2pd.testing.daemons import p2pd_command

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"
#: The demo takes about 10 s on an idle machine; this bounds one that hangs.
TIMEOUT = 240.0
#: After TIMEOUT: how long the demo gets, after SIGINT, to stop its daemons itself.
GRACE = 20.0


def run_demo() -> tuple[int, str]:
    """(exit code, stdout and stderr) of demo.py; on TIMEOUT it fails the test after
    stopping the demo and its daemons (its own process group, which it shares with them)."""
    proc = subprocess.Popen(
        [sys.executable, str(DEMO)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # its `finally` stops the daemons, removes the homes
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=GRACE)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        out, _ = proc.communicate()
        pytest.fail(f"scripts/demo.py ran longer than {TIMEOUT:.0f} s:\n{out}")
    return proc.returncode, out


@pytest.mark.slow
def test_the_demo_resolves_handles_answers_a_dm_places_a_call_and_sends_a_file() -> None:
    code, out = run_demo()
    print(out)  # shown when the test fails
    assert code == 0, out
    assert out.rstrip().endswith("demo succeeded"), out
    # every node resolves every other handle, key checked against the daemon's own
    assert out.count("key matches") == 6 and "KEY MISMATCH" not in out, out
    assert re.search(r"whois alice#aaaaaaaaaaaa +-> exit 1: ERROR: no record for 'alice'", out)
    # a DM delivered, read, answered, and the answer delivered and read
    assert len(re.findall(r"^delivered: message \w+ to (?:bob|alice)$", out, re.M)) == 2, out
    assert re.search(r"^\S+ \S+ alice: hi bob, only you can read this$", out, re.M), out
    assert re.search(r"^\S+ \S+ bob: hello alice, received$", out, re.M), out
    assert re.search(r"^bob +\w+ +unverified$", out, re.M), out  # pinned on first contact
    # the call: 3 s of the other side's tone heard on each side
    assert re.search(r"^call \w+ out bob: ended \(duration reached\)", out, re.M), out
    for who, hz in (("alice", 660), ("bob", 440)):
        heard = re.search(rf"^{who} heard ([\d.]+) s of audio, dominant (\d+) Hz", out, re.M)
        assert heard is not None, out
        assert float(heard[1]) >= 2.7 and int(heard[2]) == hz, heard[0]
    # a small file: sent, received, saved where bob's config says, byte for byte
    assert re.search(r"^\w+ +done +to bob +notes\.txt +66\.9 kB$", out, re.M), out
    assert re.search(r"^\w+ +done +from alice +notes\.txt +66\.9 kB: saved to \S+$", out, re.M)
    assert re.search(r"^bob's copy \S+/bob-files/notes\.txt: identical$", out, re.M), out
    # and every daemon stopped cleanly
    assert len(re.findall(r"^\w+#\w+: exit 0$", out, re.M)) == 3, out


@pytest.mark.parametrize(
    ("shell", "hook"),
    [
        ("bash", "complete -o nosort -F _p2pd_completion p2pd"),
        ("zsh", "compdef _p2pd_completion p2pd"),
        ("fish", "complete --no-files --command p2pd"),
    ],
)
def test_shell_completion_prints_a_script(shell: str, hook: str) -> None:
    """README: eval "$(_P2PD_COMPLETE=bash_source p2pd)" (click's shell completion)."""
    proc = subprocess.run(
        p2pd_command(),
        env={**os.environ, "_P2PD_COMPLETE": f"{shell}_source"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and hook in proc.stdout, proc.stdout + proc.stderr


def test_bash_completion_completes_a_command() -> None:
    proc = subprocess.run(
        p2pd_command(),
        env={
            **os.environ,
            "_P2PD_COMPLETE": "bash_complete",
            "COMP_WORDS": "p2pd wh",
            "COMP_CWORD": "1",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.stdout.split() == ["plain,whois"], proc.stdout + proc.stderr
