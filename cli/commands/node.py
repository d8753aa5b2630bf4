"""This node and the network: ``init``, ``daemon``, ``status``, ``whois``, ``peers``."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from p2pd.control_client import ControlClient
from p2pd.errors import NoIdentity, PassphraseRequired, UsageError

from .. import render
from . import home_of, parse_handle

if TYPE_CHECKING:
    from p2pd.identity import Identity
    from p2pd.wire import Address


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


@click.command()
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
    (prompted for on a terminal), unless you say --no-passphrase. The home's database
    gets the identity's X3DH prekeys (what peers use to start an encrypted session),
    sealed under the passphrase too.
    """
    import secrets

    from p2pd.identity import Identity, check_handle, self_certifying
    from p2pd.keystore import STORAGE_KEY_LEN, save_identity

    check_handle(handle)
    home = home_of(ctx)
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
    storage_key = None if passphrase is None else secrets.token_bytes(STORAGE_KEY_LEN)
    path = save_identity(home, identity, passphrase, storage_key=storage_key)
    _make_prekeys(home, identity, storage_key)
    data = {
        "handle": handle,
        "self_certifying": self_certifying(handle, identity.public_key),
        "fingerprint": identity.fingerprint,
        "key_file": str(path),
        "encrypted": passphrase is not None,
    }
    render.emit(data, as_json, render.init_text)


def _make_prekeys(home: Path, identity: Identity, storage_key: bytes | None) -> None:
    """Make the new identity's X3DH prekeys in the home's database, as the daemon's first
    start would: making them loads the X3DH library and pydantic, ~8 MB that a daemon
    would then keep for good; from its second start on it reads only their public side
    (p2pd/session/public_prekeys.py). Made here, in a process that ends, a new daemon is
    as light as a restarted one (scripts/bench_idle.py; issue 9). A home that already
    has a database is left to the daemon, as before."""
    import time

    from p2pd.at_rest import open_at_rest
    from p2pd.session import SessionManager
    from p2pd.store import db_path, open_database

    path = db_path(home)
    if path.exists():
        return
    conn = open_database(path)
    try:
        at_rest = open_at_rest(conn, storage_key)
        SessionManager.open(conn, identity, now=time.time(), at_rest=at_rest)
    finally:
        conn.close()


def _addresses(values: tuple[str, ...]) -> tuple[Address, ...]:
    from p2pd.invite import Invite, is_invite
    from p2pd.wire import Address

    out: list[Address] = []
    for value in values:
        for word in value.split():
            if is_invite(word):  # its own commas separate its addresses
                out.extend(Invite.parse(word).addresses)
                continue
            out.extend(Address.parse(part) for part in word.split(",") if part)
    return tuple(out)


@click.command()
@click.option(
    "--listen",
    envvar="P2PD_LISTEN",
    help="UDP HOST:PORT to listen on (env P2PD_LISTEN; default [::]:4747, IPv4 too; port 0: any).",
)
@click.option(
    "--bootstrap",
    multiple=True,
    envvar="P2PD_BOOTSTRAP",
    help="HOST:PORT of a node to join through, or an invite (`p2pd invite`); repeatable "
    "(env P2PD_BOOTSTRAP, space separated). Without one, this node starts a new network "
    "(or rejoins saved contacts).",
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
@click.option(
    "--lan",
    type=click.Choice(["everyone", "contacts", "off"]),
    help="LAN discovery over mDNS: announce handle and key to everyone on the link "
    "(default), only a rotating tag your contacts recognise, or nothing.",
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def daemon(
    ctx: click.Context,
    listen: str | None,
    bootstrap: tuple[str, ...],
    advertise: tuple[str, ...],
    passphrase_file: Path | None,
    lan: str | None,
    verbose: int,
    quiet: bool,
) -> None:
    """Run the daemon in the foreground until Ctrl-C or SIGTERM.

    It joins the DHT, publishes this identity's signed handle record, republishes it
    before it expires, and serves the control API on <home>/control.sock. Logs go to
    stderr; a line starting with "ready:" says it is listening and registered.
    """
    import dataclasses
    import gc
    import logging

    import trio

    from p2pd.config import load_config
    from p2pd.daemon import run_daemon
    from p2pd.keystore import forget_passphrase_env, identity_path, is_encrypted, unlock
    from p2pd.wire import Address

    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if verbose < 2:
        logging.getLogger("kademlia").setLevel(logging.WARNING)
        logging.getLogger("rpcudp").setLevel(logging.WARNING)
        logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic: a line per connection
        logging.getLogger("zeroconf").setLevel(logging.WARNING)
    home = home_of(ctx)
    config = load_config(home)
    changes: dict[str, Any] = {}
    if listen:
        changes["listen"] = Address.parse(listen)
    if bootstrap:
        changes["bootstrap"] = _addresses(bootstrap)
    if advertise:
        changes["advertise"] = _addresses(advertise)
    if lan:
        changes["lan"] = dataclasses.replace(config.lan, mode=lan)
    config = dataclasses.replace(config, **changes)
    if not identity_path(home).exists():
        raise NoIdentity(f"no identity in {home}: run `p2pd init HANDLE` first")
    passphrase = _read_passphrase(passphrase_file)
    forget_passphrase_env()  # a long-running daemon keeps no copy where others look
    if passphrase is None and is_encrypted(home):
        raise PassphraseRequired(
            "the key is encrypted: give --passphrase-file FILE or set P2PD_PASSPHRASE"
        )
    unlocked = unlock(home, passphrase)  # and the database's storage key (p2pd/at_rest.py)
    del passphrase
    trio.run(run_daemon, config, unlocked.identity, unlocked.storage_key)
    # Stopped cleanly: contacts saved, sockets closed, goodbye said. What is left is the
    # interpreter's exit, whose garbage collections walk every object the imports made:
    # 0.1-0.4 s on a busy 2-core machine, most of what SIGTERM took without LAN. Objects
    # frozen now are left out of them (the exit then takes ~30 ms); the OS takes back the
    # memory all the same, and every file and socket of the daemon is closed already.
    gc.freeze()


@click.command(name="rotate-key")
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the key's passphrase (or set P2PD_PASSPHRASE); the new key is "
    "stored under the same one.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def rotate_key(ctx: click.Context, passphrase_file: Path | None, yes: bool, as_json: bool) -> None:
    """Replace this identity's key with a new one, keeping the handle.

    Stop the daemon first: this changes the key it runs with. A notice signed by the
    old key and the new one is stored; at its next start the daemon publishes the new
    key and sends the notice to every contact, whose pin then moves to the new key by
    itself (they see "rotated from ..." in `p2pd contacts`). The new key is stored as
    the old one was (same passphrase, file mode 0600); the old key is not kept.
    Sessions start afresh. Contacts added later learn the new key only.
    """
    import socket

    from p2pd.errors import DaemonAlreadyRunning
    from p2pd.identity import fingerprint, self_certifying
    from p2pd.key_rotation import rotate_identity
    from p2pd.keystore import is_encrypted, read_identity_file

    home = home_of(ctx)
    read_identity_file(home)  # NoIdentity, KeystoreCorrupt: before anything else
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(home / "control.sock"))
    except OSError:
        pass
    else:
        raise DaemonAlreadyRunning(
            f"the daemon for {home} is running: stop it first (rotate-key changes the key "
            "it runs with), then start it again"
        )
    finally:
        probe.close()
    passphrase = _read_passphrase(passphrase_file)
    if passphrase is None and is_encrypted(home):
        if not sys.stdin.isatty():
            raise PassphraseRequired(
                "the key is encrypted: give --passphrase-file FILE or set P2PD_PASSPHRASE"
            )
        passphrase = click.prompt("Passphrase of the key", hide_input=True).encode()
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("rotate-key replaces your key: confirm with --yes")
        click.confirm("Replace your identity key with a new one (the handle stays)?", abort=True)
    old = read_identity_file(home)["public_key"]
    new, notice = rotate_identity(home, passphrase)
    data = {
        "handle": new.handle,
        "self_certifying": self_certifying(new.handle, new.public_key),
        "fingerprint": new.fingerprint,
        "old_fingerprint": fingerprint(bytes.fromhex(old)),
        "issued": notice.issued,
    }
    render.emit(data, as_json, render.rotate_text)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's status as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the running daemon's handle, addresses and DHT state."""
    with ControlClient(home_of(ctx)) as client:
        render.emit(client.call("status"), as_json, render.status_text)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the invite as JSON.")
@click.option("--qr", is_flag=True, help="Also draw it as a QR code in the terminal.")
@click.pass_context
def invite(ctx: click.Context, as_json: bool, qr: bool) -> None:
    """Print an invite: one line with this daemon's self-certifying handle and where it
    is now (its public mapped address first, behind a NAT; behind a NAT that lets no
    stranger in, also the relays it is registered with). Whoever has it can run
    `p2pd daemon --bootstrap INVITE` to join through this daemon, with no other
    bootstrap node, or `p2pd contacts add INVITE`. It holds your direct addresses even
    with `[privacy] addresses = "contacts"`: give it only to whom may know them."""
    from p2pd.invite import MAX_INVITE_ADDRESSES, Invite
    from p2pd.wire import Address

    with ControlClient(home_of(ctx)) as client:
        s = client.call("status")
    # Our direct addresses, whether or not the public record lists them (privacy).
    addresses = [Address.parse(a) for a in s.get("direct_addresses", s["addresses"])]
    if s.get("public_address") and Address.parse(s["public_address"]) not in addresses:
        addresses.insert(0, Address.parse(s["public_address"]))
    # Behind a NAT that lets no stranger in, our addresses serve only our LAN: the relays
    # we are registered with are public nodes, through which a stranger joins the DHT
    # and reaches us (p2pd/relay/).
    relays = [Address.parse(a) for a in s.get("relays_in_use", [])]
    relays = [a for a in relays if a not in addresses][: MAX_INVITE_ADDRESSES // 2]
    addresses = addresses[: MAX_INVITE_ADDRESSES - len(relays)] + relays
    if not addresses:
        raise UsageError("the daemon has not published its addresses yet: try again shortly")
    line = Invite(s["handle"], s["fingerprint"], tuple(addresses))
    data: dict[str, Any] = {
        "invite": str(line),
        "handle": s["handle"],
        "addresses": [str(a) for a in line.addresses],
    }
    drawn = ""
    if qr and not as_json:
        import io

        import segno  # 40 ms of imports: only `invite --qr` pays for them

        out = io.StringIO()
        # Byte mode, error correction M: an invite of 8 IPv6 addresses (~420
        # characters) still fits a version-16 code that a phone reads off a terminal.
        segno.make(str(line), error="m", boost_error=False).terminal(
            out=out, compact=True, border=2
        )
        drawn = out.getvalue()
    render.emit(data, as_json, lambda d: f"{drawn}{d['invite']}")


@click.command()
@click.argument("handle")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@click.pass_context
def whois(ctx: click.Context, handle: str, as_json: bool) -> None:
    """Look up HANDLE in the DHT: its key's fingerprint and where it is reachable.

    HANDLE may be self-certifying, `alice#<fingerprint prefix>`: then a record whose
    key does not match the prefix is refused. When different keys claim HANDLE and the
    network cannot tell which came first, it is "contested": each key's fingerprint,
    which replicas hold it and since when, and exit 1. Exit 0 found, 1 not found or
    contested, 2 bad handle.
    """
    parse_handle(handle)  # usage errors before we bother the daemon
    with ControlClient(home_of(ctx), timeout=60) as client:
        result = client.call("whois", {"handle": handle})
    render.emit(result, as_json, render.whois_text)
    if result.get("status") == "contested":
        ctx.exit(1)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the peers as JSON.")
@click.option(
    "--follow", "-f", is_flag=True, help="Then print peers as they come and go (one per line)."
)
@click.pass_context
def peers(ctx: click.Context, as_json: bool, follow: bool) -> None:
    """List nearby peers found on the LAN (mDNS), and contacts found through the DHT.

    Columns: handle (with "?" when only claimed: not a pinned contact), fingerprint,
    how it was seen (lan or dht), when last seen, addresses. A LAN peer that leaves
    disappears (its goodbye, or its records' TTL).
    """
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(ControlClient(home_of(ctx)))
        if follow:  # subscribed before the listing: nothing falls between the two
            events = stack.enter_context(ControlClient(home_of(ctx)))
            events.subscribe()
        rows = client.call("peers")
        if as_json and not follow:
            click.echo(json.dumps(rows, indent=2, sort_keys=True))
        else:
            for row in rows:
                click.echo(json.dumps(row, sort_keys=True) if as_json else render.peer_line(row))
            if not rows and not as_json:
                click.echo("no peers yet", err=True)
        if not follow:
            return
        while True:
            event = events.next_event(None)
            if event is None or event.get("event") != "peer":
                continue
            click.echo(
                json.dumps(event, sort_keys=True) if as_json else render.peer_event_line(event)
            )
