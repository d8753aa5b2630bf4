"""``p2pd``: claim a handle, run the daemon, look people up.

One dispatcher maps p2pd's errors to ``ERROR: <message>`` on stderr and an exit code:
0 success, 1 failure (not found, no daemon, bad passphrase...), 2 usage.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from p2pd import __version__
from p2pd.config import default_home, load_config
from p2pd.control import ControlClient
from p2pd.errors import NoIdentity, P2PDError, PassphraseRequired, UsageError
from p2pd.identity import Identity, check_handle, format_fingerprint, self_certifying
from p2pd.keystore import identity_path, is_encrypted, load_identity, save_identity
from p2pd.wire import Address

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    """The one place that turns a P2PDError into a message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except P2PDError as exc:
            click.echo(f"ERROR: {exc.message}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _home(ctx: click.Context) -> Path:
    home: Path = ctx.obj["home"]
    return home


def _emit(data: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(human(data))


def _when(ts: int | None) -> str:
    if ts is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    delta = int(ts - datetime.datetime.now(tz=datetime.UTC).timestamp())
    sign, delta = ("in ", delta) if delta >= 0 else ("", -delta)
    ago = "" if sign else " ago"
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC ({sign}{delta // 3600}h {delta % 3600 // 60}m{ago})"


def _read_passphrase(passphrase_file: Path | None) -> bytes | None:
    if passphrase_file is not None:
        try:
            data = passphrase_file.read_bytes()
        except OSError as exc:
            raise UsageError(
                f"cannot read passphrase file {passphrase_file}: {exc.strerror}"
            ) from None
        phrase = data.split(b"\n", 1)[0].rstrip(b"\r")
        if not phrase:
            raise UsageError(f"passphrase file {passphrase_file} is empty")
        return phrase
    env = os.environ.get("P2PD_PASSPHRASE")
    if env:
        return env.encode()
    return None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    ctx.ensure_object(dict)
    ctx.obj["home"] = (home or default_home()).expanduser().absolute()


@cli.command()
@click.argument("handle")
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Encrypt the key with the passphrase in this file (first line).",
)
@click.option(
    "--no-passphrase", is_flag=True, help="Store the key unencrypted (the file is still 0600)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
@handle_errors
def init(
    ctx: click.Context,
    handle: str,
    passphrase_file: Path | None,
    no_passphrase: bool,
    as_json: bool,
) -> None:
    """Create an identity (an Ed25519 key) for HANDLE.

    HANDLE is 3-32 characters of a-z, 0-9 and _, starting with a letter. The key is
    encrypted at rest with a passphrase from --passphrase-file or P2PD_PASSPHRASE
    (prompted for on a terminal), unless you say --no-passphrase.
    """
    check_handle(handle)
    home = _home(ctx)
    if no_passphrase and passphrase_file is not None:
        raise UsageError("give either --passphrase-file or --no-passphrase, not both")
    passphrase = None if no_passphrase else _read_passphrase(passphrase_file)
    if passphrase is None and not no_passphrase:
        if not sys.stdin.isatty():
            raise UsageError(
                "no passphrase: give --passphrase-file FILE, set P2PD_PASSPHRASE, "
                "or say --no-passphrase"
            )
        passphrase = click.prompt(
            "Passphrase for the new key", hide_input=True, confirmation_prompt=True
        ).encode()
    identity = Identity.generate(handle)
    path = save_identity(home, identity, passphrase)
    data = {
        "handle": handle,
        "self_certifying": self_certifying(handle, identity.public_key),
        "fingerprint": identity.fingerprint,
        "key_file": str(path),
        "encrypted": passphrase is not None,
    }
    _emit(
        data,
        as_json,
        lambda d: "\n".join(
            [
                f"created identity {d['self_certifying']}",
                f"fingerprint  {format_fingerprint(d['fingerprint'])}",
                f"key file     {d['key_file']} "
                f"({'encrypted with your passphrase' if d['encrypted'] else 'NOT encrypted'})",
                "next: p2pd daemon [--bootstrap HOST:PORT]",
            ]
        ),
    )


def _addresses(values: tuple[str, ...]) -> tuple[Address, ...]:
    out: list[Address] = []
    for value in values:
        for part in value.replace(",", " ").split():
            out.append(Address.parse(part))
    return tuple(out)


@cli.command()
@click.option(
    "--listen",
    envvar="P2PD_LISTEN",
    help="UDP HOST:PORT to listen on (env P2PD_LISTEN; default 0.0.0.0:4747; port 0 picks one).",
)
@click.option(
    "--bootstrap",
    multiple=True,
    envvar="P2PD_BOOTSTRAP",
    help="HOST:PORT of a node to join through; repeatable (env P2PD_BOOTSTRAP, space "
    "separated). Without one, this node starts a new network (or rejoins saved contacts).",
)
@click.option(
    "--advertise",
    multiple=True,
    help="HOST:PORT to publish in our record instead of the listen address; repeatable.",
)
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the key's passphrase (or set P2PD_PASSPHRASE).",
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
@handle_errors
def daemon(
    ctx: click.Context,
    listen: str | None,
    bootstrap: tuple[str, ...],
    advertise: tuple[str, ...],
    passphrase_file: Path | None,
    verbose: int,
    quiet: bool,
) -> None:
    """Run the daemon in the foreground until Ctrl-C or SIGTERM.

    It joins the DHT, publishes this identity's signed handle record, republishes it
    before it expires, and serves the control API on <home>/control.sock. Logs go to
    stderr; a line starting with "ready:" says it is listening and registered.
    """
    import dataclasses

    import trio

    from p2pd.daemon import run_daemon

    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if verbose < 2:
        logging.getLogger("kademlia").setLevel(logging.WARNING)
        logging.getLogger("rpcudp").setLevel(logging.WARNING)
    home = _home(ctx)
    config = load_config(home)
    changes: dict[str, Any] = {}
    if listen:
        changes["listen"] = Address.parse(listen)
    if bootstrap:
        changes["bootstrap"] = _addresses(bootstrap)
    if advertise:
        changes["advertise"] = _addresses(advertise)
    config = dataclasses.replace(config, **changes)
    if not identity_path(home).exists():
        raise NoIdentity(f"no identity in {home}: run `p2pd init HANDLE` first")
    passphrase = _read_passphrase(passphrase_file)
    if passphrase is None and is_encrypted(home):
        raise PassphraseRequired(
            "the key is encrypted: give --passphrase-file FILE or set P2PD_PASSPHRASE"
        )
    identity = load_identity(home, passphrase)
    trio.run(run_daemon, config, identity)


def _status_text(s: dict[str, Any]) -> str:
    rows = [
        ("handle", s["self_certifying"]),
        ("fingerprint", s["fingerprint_display"]),
        ("listen", s["listen"]),
        ("addresses", ", ".join(s["addresses"]) or "-"),
        ("routing table", f"{s['routing_table_size']} contacts"),
        ("records stored", str(s["records_stored"])),
        (
            "own record",
            f"seq {s['record_seq']}, on {s['replicas']} node(s), expires "
            f"{_when(s['record_expires'])}"
            if s["record_seq"] is not None
            else "not published yet",
        ),
        ("uptime", f"{s['uptime']:.0f} s"),
    ]
    return "\n".join(f"{k:<15} {v}" for k, v in rows)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's status as JSON.")
@click.pass_context
@handle_errors
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the running daemon's handle, addresses and DHT state."""
    with ControlClient(_home(ctx)) as client:
        _emit(client.call("status"), as_json, _status_text)


def _whois_text(r: dict[str, Any]) -> str:
    rows = [
        ("handle", r["self_certifying"]),
        ("fingerprint", r["fingerprint_display"]),
        ("addresses", ", ".join(r["addresses"]) or "-"),
        ("sequence", str(r["seq"])),
        ("issued", _when(r["issued"])),
        ("expires", _when(r["expires"])),
    ]
    return "\n".join(f"{k:<12} {v}" for k, v in rows)


@cli.command()
@click.argument("handle")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@click.pass_context
@handle_errors
def whois(ctx: click.Context, handle: str, as_json: bool) -> None:
    """Look up HANDLE in the DHT: its key's fingerprint and where it is reachable.

    HANDLE may be self-certifying, `alice#<fingerprint prefix>`: then a record whose
    key does not match the prefix is refused. Exit 0 found, 1 not found, 2 bad handle.
    """
    from p2pd.identity import HandleRef

    HandleRef.parse(handle)  # usage errors before we bother the daemon
    with ControlClient(_home(ctx), timeout=60) as client:
        _emit(client.call("whois", {"handle": handle}), as_json, _whois_text)


def main() -> None:
    cli(prog_name="p2pd")


if __name__ == "__main__":
    main()
