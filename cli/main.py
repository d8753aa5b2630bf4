"""``p2pd``: claim a handle, run the daemon, look people up.

One dispatcher maps p2pd's errors to ``ERROR: <message>`` on stderr and an exit code:
0 success, 1 failure (not found, no daemon, bad passphrase...), 2 usage.
"""

from __future__ import annotations

import contextlib
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
from p2pd.config import load_config
from p2pd.control_client import ControlClient
from p2pd.errors import NoIdentity, P2PDError, PassphraseRequired, UsageError
from p2pd.home import default_home
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
@click.option(
    "--lan",
    type=click.Choice(["everyone", "contacts", "off"]),
    help="LAN discovery over mDNS: announce handle and key to everyone on the link "
    "(default), only a rotating tag your contacts recognise, or nothing.",
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

    import trio

    from p2pd.daemon import run_daemon

    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if verbose < 2:
        logging.getLogger("kademlia").setLevel(logging.WARNING)
        logging.getLogger("rpcudp").setLevel(logging.WARNING)
        logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic: a line per connection
        logging.getLogger("zeroconf").setLevel(logging.WARNING)
    home = _home(ctx)
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


# ---------------------------------------------------------------------- messages

#: How long `send --wait` waits by default, and how often it looks.
SEND_WAIT_DEFAULT = 60.0


def _message_line(m: dict[str, Any]) -> str:
    when = datetime.datetime.fromtimestamp(m["sent_at"], tz=datetime.UTC)
    if m["direction"] == "in":
        who = m["handle"] if m.get("sender_verified") else f"{m['handle']} (unverified)"
        return f"{when:%Y-%m-%d %H:%M:%S} {who}: {m['text']}"
    return f"{when:%Y-%m-%d %H:%M:%S} -> {m['handle']} [{m['state']}]: {m['text']}"


#: `send --lines`: texts per control call, and their size (the daemon takes 1 MiB lines).
SEND_CHUNK_TEXTS = 1000
SEND_CHUNK_BYTES = 512 * 1024


def _chunks(texts: list[str]) -> list[list[str]]:
    chunks: list[list[str]] = [[]]
    size = 0
    for text in texts:
        cost = len(json.dumps(text))
        if chunks[-1] and (len(chunks[-1]) >= SEND_CHUNK_TEXTS or size + cost > SEND_CHUNK_BYTES):
            chunks.append([])
            size = 0
        chunks[-1].append(text)
        size += cost
    return chunks


def _wait_delivered(
    client: ControlClient, events: ControlClient, ids: list[str], timeout: float
) -> set[str]:
    """Which of ``ids`` are delivered within ``timeout``. From the event stream (subscribed
    before sending), and, every half second, by asking for the earliest still missing in
    order until one is not delivered: a busy daemon drops events for a slow reader."""
    import time

    missing = list(ids)  # in order
    delivered: set[str] = set()
    deadline = time.monotonic() + timeout
    next_look = time.monotonic() + 0.5
    while missing:
        now = time.monotonic()
        if now >= next_look or now >= deadline:
            while missing and (
                missing[0] in delivered
                or client.call("message", {"id": missing[0]})["state"] == "delivered"
            ):
                delivered.add(missing.pop(0))
            next_look = time.monotonic() + 0.5
            if now >= deadline:
                break
            continue
        event = events.next_event(min(deadline, next_look) - now)
        if (
            event is not None
            and event.get("event") == "message_status"
            and event.get("state") == "delivered"
        ):
            delivered.add(str(event.get("id")))
            while missing and missing[0] in delivered:
                missing.pop(0)
    return delivered & set(ids)


@cli.command()
@click.argument("handle")
@click.argument("text")
@click.option(
    "--lines",
    is_flag=True,
    help="Each non-empty line of TEXT is a message of its own, in order (with `-`, each "
    "line of stdin). They are queued up to 1,000 per call to the daemon, each call all or "
    "nothing.",
)
@click.option(
    "--wait",
    "wait",
    is_flag=True,
    help="Block until the recipient's daemon acknowledges the message (exit 0), or until "
    "--timeout passes (exit 1; the message stays queued and is still retried).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 7 * 24 * 3600),
    default=SEND_WAIT_DEFAULT,
    show_default=True,
    help="Seconds --wait waits.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the message's state as JSON.")
@click.pass_context
@handle_errors
def send(
    ctx: click.Context,
    handle: str,
    text: str,
    lines: bool,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Send TEXT to HANDLE, encrypted end to end. TEXT `-` reads it from stdin.

    The message is stored in the daemon's outbox before this returns, and the daemon
    delivers it directly over QUIC when HANDLE is online, or leaves it sealed in
    HANDLE's DHT mailbox, retrying until it is acknowledged. States: queued, sent,
    delivered. The first message to a handle pins its key; if the key ever changes,
    sending stops until you accept the new one with `p2pd verify HANDLE --accept`.
    """
    import time

    from p2pd.identity import HandleRef

    HandleRef.parse(handle)
    if text == "-":
        text = sys.stdin.read()
    if lines:
        _send_lines(ctx, handle, [t for t in text.splitlines() if t.strip()], wait, timeout,
                    as_json)  # fmt: skip
        return
    if not text:
        raise UsageError("the message is empty")
    with ControlClient(_home(ctx), timeout=60) as client:
        message = client.call("send", {"handle": handle, "text": text})
        if wait:
            deadline = time.monotonic() + timeout
            while message["state"] != "delivered" and time.monotonic() < deadline:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                message = client.call("message", {"id": message["id"]})
    if as_json:
        click.echo(json.dumps(message, indent=2, sort_keys=True))
    else:
        click.echo(f"{message['state']}: message {message['id'][:12]} to {message['handle']}")
    if wait and message["state"] != "delivered":
        click.echo(f"ERROR: not delivered within {timeout:g} s; the message stays queued", err=True)
        sys.exit(1)


def _send_lines(
    ctx: click.Context, handle: str, texts: list[str], wait: bool, timeout: float, as_json: bool
) -> None:
    if not texts:
        raise UsageError("no lines to send")
    messages: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(ControlClient(_home(ctx), timeout=60))
        events = None
        if wait:  # subscribed before sending: no delivery can fall before it
            events = stack.enter_context(ControlClient(_home(ctx), timeout=60))
            events.subscribe()
        chunks = _chunks(texts)
        for chunk in chunks:
            result = client.call("send", {"handle": handle, "texts": chunk})
            messages += result["messages"]
            if len(chunks) > 1 and not as_json:
                click.echo(f"queued {len(messages)} of {len(texts)}", err=True)
        delivered: set[str] = set()
        if events is not None:
            delivered = _wait_delivered(client, events, [m["id"] for m in messages], timeout)
            for m in messages:
                if m["id"] in delivered:
                    m["state"] = "delivered"
    if as_json:
        click.echo(json.dumps(messages, indent=2, sort_keys=True))
    elif wait:
        click.echo(f"delivered: {len(delivered)} of {len(messages)} messages to {handle}")
    else:
        click.echo(f"queued: {len(messages)} messages to {handle}")
    if wait and len(delivered) < len(messages):
        left = len(messages) - len(delivered)
        click.echo(f"ERROR: {left} not delivered within {timeout:g} s; they stay queued", err=True)
        sys.exit(1)


#: `inbox` reads the daemon's inbox this many messages per call, at most this many calls.
INBOX_PAGE = 1000
INBOX_MAX_PAGES = 10_000


@cli.command()
@click.option("--from", "sender", metavar="HANDLE", help="Only messages from HANDLE.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing messages as they arrive.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message and line.")
@click.option("--after", type=click.IntRange(0), default=0, help="Only messages after this cursor.")
@click.pass_context
@handle_errors
def inbox(ctx: click.Context, sender: str | None, follow: bool, as_json: bool, after: int) -> None:
    """Show received messages, each conversation in the order it was written.

    A sender shown as "(unverified)" claimed a handle that the DHT does not (yet) bind
    to its key. With --follow, runs until interrupted.
    """
    from p2pd.identity import HandleRef

    if sender is not None:
        HandleRef.parse(sender)

    def show(m: dict[str, Any]) -> None:
        click.echo(json.dumps(m, sort_keys=True) if as_json else _message_line(m))

    params: dict[str, Any] = {"after": after}
    if sender is not None:
        params["from"] = sender
    with ControlClient(_home(ctx)) as client:
        if follow:
            events = ControlClient(_home(ctx))
            events.subscribe()  # before the listing: nothing falls between the two
        shown: list[dict[str, Any]] = []
        for _ in range(INBOX_MAX_PAGES):  # page by cursor; bounded
            page = client.call("inbox", {**params, "limit": INBOX_PAGE})
            shown += page["messages"]
            params["after"] = page["cursor"]
            if len(page["messages"]) < INBOX_PAGE:
                break
        if len(shown) > INBOX_PAGE:  # each page is in conversation order: so is the whole
            shown.sort(key=lambda m: (m["fingerprint"], m["seq"]))
        for m in shown:
            show(m)
        if not follow:
            if not shown and not as_json:
                click.echo("no messages", err=True)
            return
        seen = {m["id"] for m in shown}
        with events:
            while True:
                event = events.next_event(None)
                if event is None or event.get("event") != "message":
                    continue
                if event["id"] in seen:
                    continue
                if sender is not None and event["handle"] != HandleRef.parse(sender).handle:
                    continue
                seen.add(event["id"])
                show(event)


def _contacts_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no contacts yet"
    lines = []
    for c in rows:
        flags = ["verified" if c["verified"] else "unverified"]
        if c["key_changed"]:
            flags.append(f"KEY CHANGED to {c['new_fingerprint'][:16]}")
        if c["pending"]:
            flags.append(f"{c['pending']} pending")
        lines.append(f"{c['handle']:<33} {c['fingerprint'][:16]}  {', '.join(flags)}")
    return "\n".join(lines)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the contacts as JSON.")
@click.pass_context
@handle_errors
def contacts(ctx: click.Context, as_json: bool) -> None:
    """List contacts: handles whose keys are pinned, verified or not, and key changes."""
    with ControlClient(_home(ctx)) as client:
        _emit(client.call("contacts"), as_json, _contacts_text)


def _verify_text(r: dict[str, Any]) -> str:
    import io

    import segno

    qr = io.StringIO()
    segno.make(f"p2pd-safety:0:{r['safety_number'].replace(' ', '')}").terminal(
        out=qr, compact=True, border=2
    )
    groups = r["safety_number"].split()
    number = "\n".join(" ".join(groups[i : i + 4]) for i in range(0, len(groups), 4))
    state = "verified" if r["verified"] else "not verified"
    lines = [
        f"{r['handle']}: {state}",
        f"their fingerprint  {r['fingerprint_display']}",
    ]
    if r["key_changed"]:
        lines.append(f"NEW KEY (not accepted) {r['new_fingerprint']}")
    lines += [
        "",
        "Safety number (compare it with theirs, in person or on a call):",
        number,
        "",
        qr.getvalue().rstrip("\n"),
    ]
    if not r["verified"] or r["key_changed"]:
        lines.append(f"If it matches, run `p2pd verify {r['handle']} --accept`.")
    return "\n".join(lines)


@cli.command()
@click.argument("handle")
@click.option(
    "--accept",
    is_flag=True,
    help="Mark HANDLE verified; if its key changed, pin the new key and resume sending.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
@handle_errors
def verify(ctx: click.Context, handle: str, accept: bool, as_json: bool) -> None:
    """Show the safety number you share with HANDLE, as digits and a QR code.

    Both of you see the same 60 digits if, and only if, each holds the other's real
    key. Compare them out of band, then run with --accept.
    """
    from p2pd.identity import HandleRef

    HandleRef.parse(handle)
    with ControlClient(_home(ctx), timeout=60) as client:
        result = client.call("verify", {"handle": handle, "accept": accept})
    _emit(result, as_json, _verify_text)


def _peer_line(p: dict[str, Any]) -> str:
    seen = "-"
    if p.get("last_seen"):
        moment = datetime.datetime.fromtimestamp(p["last_seen"], tz=datetime.UTC)
        seen = f"{moment:%H:%M:%S}"
    who = p["handle"] if p.get("verified") else f"{p['handle']}?"
    addresses = ", ".join(p["addresses"]) or "-"
    return f"{who:<33} {p['fingerprint'][:16]}  {p['via']:<4} {seen:<8}  {addresses}"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the peers as JSON.")
@click.option(
    "--follow", "-f", is_flag=True, help="Then print peers as they come and go (one per line)."
)
@click.pass_context
@handle_errors
def peers(ctx: click.Context, as_json: bool, follow: bool) -> None:
    """List nearby peers found on the LAN (mDNS), and contacts found through the DHT.

    Columns: handle (with "?" when only claimed: not a pinned contact), fingerprint,
    how it was seen (lan or dht), when last seen, addresses. A LAN peer that leaves
    disappears (its goodbye, or its records' TTL).
    """
    with ControlClient(_home(ctx)) as client:
        if follow:
            events = ControlClient(_home(ctx))
            events.subscribe()
        rows = client.call("peers")
        if as_json and not follow:
            click.echo(json.dumps(rows, indent=2, sort_keys=True))
        else:
            for row in rows:
                click.echo(json.dumps(row, sort_keys=True) if as_json else _peer_line(row))
            if not rows and not as_json:
                click.echo("no peers yet", err=True)
        if not follow:
            return
        with events:
            while True:
                event = events.next_event(None)
                if event is None or event.get("event") != "peer":
                    continue
                if as_json:
                    click.echo(json.dumps(event, sort_keys=True))
                else:
                    sign = "-" if event["change"] == "removed" else "+"
                    click.echo(f"{sign} {_peer_line(event)}")


# ---------------------------------------------------------------------- calls

CALL_ENDED = ("ended", "rejected", "busy", "no-answer", "failed")


def _media_options(func: F) -> F:
    func = click.option(
        "--duration",
        type=click.FloatRange(0.1, 24 * 3600),
        help="Hang up after this many seconds of conversation.",
    )(func)
    func = click.option(
        "--record",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write what you receive: .wav (audio), .mkv/.webm (audio and video), .mka.",
    )(func)
    func = click.option(
        "--video-in",
        metavar="SRC",
        help="Send video from SRC: testsrc (a test pattern), a file, or a camera device.",
    )(func)
    func = click.option(
        "--audio-in",
        metavar="SRC",
        default="tone:440",
        show_default=True,
        help="Send audio from SRC: tone:FREQ, a file PyAV can read, or a microphone.",
    )(func)
    return func


def _media_params(
    audio_in: str | None, video_in: str | None, record: Path | None, duration: float | None
) -> dict[str, Any]:
    return {
        "audio_in": audio_in,
        "video_in": video_in,
        "record": str(record.resolve()) if record is not None else None,
        "duration": duration,
    }


def _call_text(c: dict[str, Any]) -> str:
    m = c.get("media") or {}
    line = f"call {c['id'][:8]} {c['direction']} {c['handle']}: {c['state']}"
    if c.get("reason"):
        line += f" ({c['reason']})"
    if c["duration_s"]:
        line += f", {c['duration_s']:.1f} s"
    if m:
        rtt = "-" if m.get("rtt_ms") is None else f"{m['rtt_ms']:.1f} ms"
        line += (
            f"\n  rtt {rtt}, loss {m.get('loss_pct', 0)}%, jitter {m.get('jitter_ms', 0)} ms, "
            f"bitrate {m.get('bitrate_sent_kbps', 0)}/{m.get('bitrate_received_kbps', 0)} kbit/s "
            f"(sent/received), concealed {m.get('audio_frames_concealed', 0)}, "
            f"FEC {m.get('audio_fec_recovered', 0)}, "
            f"redundant copies {m.get('audio_red_recovered', 0)}, video frames "
            f"{m.get('video_frames_sent', 0)}/{m.get('video_frames_received', 0)}"
        )
    return line


def _follow_call(client: ControlClient, call: dict[str, Any], as_json: bool) -> None:
    """Show the call until it ends; exit 1 unless it connected and ended normally."""
    import time

    last = call["state"]
    if not as_json:
        click.echo(_call_text(call))
    for _ in range(24 * 3600 * 5):  # bounded: a day of 0.2 s polls
        if call["state"] in CALL_ENDED:
            break
        time.sleep(0.2)
        current = [c for c in client.call("calls") if c["id"] == call["id"]]
        if not current:
            break
        call = current[0]
        if call["state"] != last and not as_json:
            click.echo(f"... {call['state']}")
        last = call["state"]
    if as_json:
        click.echo(json.dumps(call, indent=2, sort_keys=True))
    else:
        click.echo(_call_text(call))
    if call["state"] != "ended" or not call["duration_s"]:
        click.echo(f"ERROR: the call {call['state']}: {call.get('reason') or '-'}", err=True)
        sys.exit(1)


@cli.command(name="call")
@click.argument("handle")
@_media_options
@click.option("--json", "as_json", is_flag=True, help="Print the final call as JSON.")
@click.pass_context
@handle_errors
def call_cmd(
    ctx: click.Context,
    handle: str,
    audio_in: str | None,
    video_in: str | None,
    record: Path | None,
    duration: float | None,
    as_json: bool,
) -> None:
    """Call HANDLE: ring its daemon (30 s), then talk until someone hangs up.

    Audio is Opus over QUIC datagrams, encrypted end to end on the connection both
    identity keys authenticated; --video-in adds VP8. Runs until the call ends (Ctrl-C
    leaves it running: `p2pd hangup` ends it). Exit 0 when a call took place.
    """
    from p2pd.identity import HandleRef

    HandleRef.parse(handle)
    params = {"handle": handle, **_media_params(audio_in, video_in, record, duration)}
    with ControlClient(_home(ctx), timeout=60) as client:
        result = client.call("call", params)
        _follow_call(client, result, as_json)


@cli.command()
@click.option(
    "--wait",
    type=click.FloatRange(0, 3600),
    default=0,
    show_default=True,
    help="Seconds to wait for an incoming call if none is ringing.",
)
@_media_options
@click.option("--json", "as_json", is_flag=True, help="Print the final call as JSON.")
@click.pass_context
@handle_errors
def answer(
    ctx: click.Context,
    wait: float,
    audio_in: str | None,
    video_in: str | None,
    record: Path | None,
    duration: float | None,
    as_json: bool,
) -> None:
    """Answer the ringing call (or wait for the next one), and talk until it ends."""
    params = {"wait": wait, **_media_params(audio_in, video_in, record, duration)}
    with ControlClient(_home(ctx), timeout=wait + 60) as client:
        result = client.call("answer", params)
        _follow_call(client, result, as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the call as JSON.")
@click.pass_context
@handle_errors
def hangup(ctx: click.Context, as_json: bool) -> None:
    """End the current call, or reject the one ringing."""
    with ControlClient(_home(ctx)) as client:
        _emit(client.call("hangup"), as_json, _call_text)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the calls as JSON.")
@click.pass_context
@handle_errors
def calls(ctx: click.Context, as_json: bool) -> None:
    """The current call and recent ones: state, duration, RTT, loss, jitter, bitrate."""
    with ControlClient(_home(ctx)) as client:
        rows = client.call("calls")
    _emit(rows, as_json, lambda r: "\n".join(_call_text(c) for c in r) or "no calls yet")


def main() -> None:
    cli(prog_name="p2pd")


if __name__ == "__main__":
    main()
