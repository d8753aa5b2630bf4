"""The CLI imports only what a command needs: `p2pd --version` and `p2pd status` run in
well under 100 ms of CPU because they load neither trio nor the daemon's stack.

The probes run in a fresh interpreter (this one has imported everything already)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

#: What no command but `daemon` needs: the event loop, QUIC, the media stack.
HEAVY = ("trio", "aioquic", "av", "numpy")
#: What most commands do without: the DHT's codecs and library, crypto, the QR code.
MEDIUM = ("kademlia", "msgpack", "nacl", "cryptography", "segno", "zeroconf")

#: Modules loaded before the probe's first line (by ``scripts/test --coverage``, which
#: starts coverage in every child process and so loads hashlib) are not the CLI's.
_PROBE = """
import json, sys
before = set(sys.modules)
from click.testing import CliRunner
import p2pd_cli.main as m
args = json.loads(sys.argv[1])
if args:
    result = CliRunner().invoke(m.cli, args)
    assert result.exit_code in (0, 1, 2), result.output
watched = json.loads(sys.argv[2])
print(json.dumps(sorted(n for n in watched if n in sys.modules and n not in before)))
"""


def loaded_after(args: list[str], watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` are in sys.modules after importing the CLI and running it
    with ``args`` (no args: only the import)."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args), json.dumps(watched)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    loaded: list[str] = json.loads(proc.stdout)
    return loaded


def test_importing_the_cli_loads_no_heavy_module() -> None:
    assert loaded_after([], HEAVY + MEDIUM) == []


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["--help"],
        ["status"],  # no daemon there: exit 1, which is as far as status goes without one
        ["whois", "alice"],
        ["send", "bob", "hi", "--wait"],
        ["inbox", "--from", "alice"],
        ["calls"],
    ],
)
def test_commands_of_the_daemon_load_only_the_control_client(
    args: list[str], tmp_path: Path
) -> None:
    loaded = loaded_after(["--home", str(tmp_path / "none"), *args], HEAVY + MEDIUM)
    assert loaded == []


def test_status_does_not_even_parse_handles(tmp_path: Path) -> None:
    watched = ("p2pd.identity", "hashlib", "platformdirs", "p2pd.config", "p2pd.wire")
    assert loaded_after(["--home", str(tmp_path), "status"], watched) == []


def test_init_loads_the_keystore_but_not_the_daemon(tmp_path: Path) -> None:
    args = ["--home", str(tmp_path / "h"), "init", "alice", "--no-passphrase"]
    assert loaded_after(args, ("nacl", *HEAVY)) == ["nacl"]


def test_whois_parses_the_handle_without_loading_nacl(tmp_path: Path) -> None:
    args = ["--home", str(tmp_path), "whois", "alice#abcdefghijkl"]
    assert loaded_after(args, ("p2pd.identity", "nacl")) == ["p2pd.identity"]


def test_a_command_loads_only_its_own_module(tmp_path: Path) -> None:
    modules = tuple(f"p2pd_cli.commands.{m}" for m in ("node", "messages", "calls"))
    watched = (*modules, "p2pd.control_client")
    assert loaded_after(["--version"], watched) == []
    assert loaded_after(["--home", str(tmp_path), "status"], watched) == [
        "p2pd.control_client",
        "p2pd_cli.commands.node",
    ]
    assert loaded_after(["--help"], watched) == sorted(watched)  # it lists them all


def test_every_command_is_where_the_group_says() -> None:
    import click

    from p2pd_cli.main import COMMANDS, cli

    ctx = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
    assert cli.get_command(ctx, "sned") is None


def test_the_daemon_loads_no_media_stack_until_a_call() -> None:
    """An idle daemon does without PyAV and numpy (about 40 MB of its memory): p2pd.calls
    imports the media stack when a call is placed or answered (issue 9). zeroconf waits
    for LAN discovery to start: a daemon with ``--lan off`` never loads it."""
    probe = (
        "import json, sys; import p2pd.daemon; "
        "print(json.dumps(sorted(m for m in sys.argv[1:] if m in sys.modules)))"
    )
    watched = ["av", "numpy", "p2pd.media", "zeroconf", "p2pd.daemon"]
    proc = subprocess.run(
        [sys.executable, "-c", probe, *watched], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["p2pd.daemon"]


async def test_a_media_stack_that_does_not_load_fails_the_call_not_the_daemon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import trio

    from p2pd import calls

    monkeypatch.setattr(calls, "MEDIA_MODULE", "p2pd_no_such_media_stack")
    with trio.fail_after(10), pytest.raises(calls.CallError, match="PyAV and numpy"):
        await calls.load_media()
