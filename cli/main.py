"""``p2pd``: claim a handle, run the daemon, look people up.

This module is the command group, its global options and the one dispatcher that turns
p2pd's errors into ``ERROR: <message>`` on stderr and an exit code: 0 success, 1 failure
(not found, no daemon, bad passphrase, not delivered...), 2 usage. The commands are in
cli/commands/, what they print for people in cli/render.py.

Every ``p2pd`` run imports this module, so it imports only click and p2pd.errors; a
command's module is imported when that command runs (``--help`` imports them all), and
imports at its top only what its neighbours need too. Whatever one command needs (trio
and the daemon, PyNaCl and the keystore, segno) it imports itself.
tests/test_cli_imports.py holds that line: `p2pd --version` and `p2pd status` take well
under 100 ms of CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from p2pd import __version__
from p2pd.errors import P2PDError

#: Every command, and where it is: ``module:function`` in cli/commands/.
COMMANDS = {
    "init": "node:init",
    "daemon": "node:daemon",
    "status": "node:status",
    "invite": "node:invite",
    "whois": "node:whois",
    "peers": "node:peers",
    "rotate-key": "node:rotate_key",
    "send": "messages:send",
    "inbox": "messages:inbox",
    "contacts": "messages:contacts",
    "verify": "messages:verify",
    "mailbox": "messages:mailbox",
    "call": "calls:call_cmd",
    "answer": "calls:answer",
    "hangup": "calls:hangup",
    "calls": "calls:calls",
    "devices": "devices:devices",
    "send-file": "files:send_file",
    "files": "files:files",
    "accept": "files:accept",
    "reject": "files:reject",
    "cancel": "files:cancel",
}


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """The one place that turns a P2PDError into a message and an exit code."""
    try:
        yield
    except P2PDError as exc:
        click.echo(f"ERROR: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(1)


def _load(name: str) -> click.Command:
    module_name, _, attr = COMMANDS[name].partition(":")
    module = importlib.import_module(f"{__package__}.commands.{module_name}")
    command = getattr(module, attr)
    assert isinstance(command, click.Command) and command.name == name, COMMANDS[name]
    return command


class P2PDGroup(click.Group):
    """p2pd's commands, each imported when it is used, all run under :func:`handle_errors`
    so that none can bypass it. Click's own usage errors still exit 2 its way."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        # An unknown name (a typo) loads them all, for click's "Did you mean" suggestion.
        for name in [cmd_name] if cmd_name in COMMANDS else list(COMMANDS):
            if name not in self.commands:
                self.add_command(_load(name))
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        with handle_errors():
            return super().invoke(ctx)


@click.group(cls=P2PDGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="P2PD_HOME",
    help="Where this identity and its daemon live (env P2PD_HOME; default: the "
    "platform's user data dir).",
)
@click.version_option(__version__, prog_name="p2pd")
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """p2pd: a peer-to-peer messenger daemon.

    Claim a handle with `p2pd init`, run `p2pd daemon`, and look people up with
    `p2pd whois`. Every node is equal: handles live in a DHT that the daemons form
    among themselves, signed by their owners' keys.
    """
    if home is None:
        from p2pd.home import default_home  # platformdirs: only when no home was given

        home = default_home()
    ctx.ensure_object(dict)
    ctx.obj["home"] = home.expanduser().absolute()


def main() -> None:
    cli(prog_name="p2pd")


if __name__ == "__main__":
    main()
