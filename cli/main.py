"""``p2pd``: claim a handle, run the daemon, look people up.

This module is the command group, its global options and the one dispatcher that turns
p2pd's errors into ``ERROR: <message>`` on stderr and an exit code: 0 success, 1 failure
(not found, no daemon, bad passphrase, not delivered...), 2 usage. The commands are in
cli/commands/, what they print for people in cli/render.py.

Every ``p2pd`` run imports this module and every command module, ``p2pd --version``
included, so they import at module level only click, the standard library and the light
parts of p2pd (errors, control_client, identity's handle syntax). Whatever one command
needs (trio and the daemon, PyNaCl and the keystore, segno) it imports itself;
tests/test_cli_imports.py holds that line.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from p2pd import __version__
from p2pd.errors import P2PDError

from .commands import calls, messages, node


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


class P2PDGroup(click.Group):
    """A group that runs itself and its command under :func:`handle_errors`, so that no
    command can bypass it. Click's own usage errors still exit 2 its way."""

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


for command in (
    node.init,
    node.daemon,
    node.status,
    node.whois,
    node.peers,
    messages.send,
    messages.inbox,
    messages.contacts,
    messages.verify,
    calls.call_cmd,
    calls.answer,
    calls.hangup,
    calls.calls,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="p2pd")


if __name__ == "__main__":
    main()
