"""Messages and contacts: ``send``, ``inbox``, ``contacts``, ``verify``, ``mailbox``."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from p2pd.control_client import ControlClient
from p2pd.errors import NotDelivered, UsageError

from .. import render
from . import home_of, parse_handle

#: How long `send --wait` waits by default.
SEND_WAIT_DEFAULT = 60.0
#: `send --wait` learns of deliveries from the daemon's event stream. This often it also
#: asks for the earliest message still undelivered: a busy daemon drops events for a slow
#: reader (docs/CONTROL_API.md, `subscribe`), and a dropped `delivered` must not leave us
#: waiting until the timeout.
DELIVERY_RECHECK = 0.5

#: `send --lines`: texts per control call, and their size (the daemon takes 1 MiB lines).
SEND_CHUNK_TEXTS = 1000
SEND_CHUNK_BYTES = 512 * 1024

#: `inbox` reads the daemon's inbox this many messages per call, at most this many calls.
INBOX_PAGE = 1000
INBOX_MAX_PAGES = 10_000


@contextlib.contextmanager
def _open_clients(home: Path, wait: bool) -> Iterator[tuple[ControlClient, ControlClient | None]]:
    """A connection for requests and, with ``wait``, a second one already subscribed to
    events: subscribed before anything is sent, no delivery can fall before it."""
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(ControlClient(home, timeout=60))
        events = None
        if wait:
            events = stack.enter_context(ControlClient(home, timeout=60))
            events.subscribe()
        yield client, events


def wait_delivered(
    client: ControlClient,
    events: ControlClient,
    ids: list[str],
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
) -> set[str]:
    """Which of ``ids`` are delivered within ``timeout``.

    From the event stream ``events`` (subscribed before sending), so this returns as soon
    as the last ``delivered`` event arrives; and, every DELIVERY_RECHECK seconds, by asking
    ``client`` for the earliest still missing, in order, until one is not delivered.
    ``clock`` is for tests, whose fake event stream moves it.
    """
    missing = list(ids)  # in order
    delivered: set[str] = set()
    deadline = clock() + timeout
    next_look = clock() + DELIVERY_RECHECK
    while missing:
        now = clock()
        if now >= next_look or now >= deadline:
            while missing and (
                missing[0] in delivered
                or client.call("message", {"id": missing[0]})["state"] == "delivered"
            ):
                delivered.add(missing.pop(0))
            next_look = clock() + DELIVERY_RECHECK
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


@click.command()
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
    delivered. The first message to a handle pins its key, and every later one goes to
    that key, whatever the DHT says later; another key seen for the handle is shown by
    `p2pd contacts` and `p2pd verify HANDLE` (pin it with `--accept-new FINGERPRINT`).
    """
    parse_handle(handle)
    if text == "-":
        text = sys.stdin.read()
    if lines:
        texts = [t for t in text.splitlines() if t.strip()]
        _send_lines(home_of(ctx), handle, texts, wait, timeout, as_json)
        return
    if not text:
        raise UsageError("the message is empty")
    with _open_clients(home_of(ctx), wait) as (client, events):
        message = client.call("send", {"handle": handle, "text": text})
        if events is not None:
            wait_delivered(client, events, [message["id"]], timeout)
            message = client.call("message", {"id": message["id"]})  # as the daemon has it
    if as_json:
        click.echo(json.dumps(message, indent=2, sort_keys=True))
    else:
        click.echo(render.sent_text(message))
    if wait and message["state"] != "delivered":
        raise NotDelivered(f"not delivered within {timeout:g} s; the message stays queued")


def _send_lines(
    home: Path, handle: str, texts: list[str], wait: bool, timeout: float, as_json: bool
) -> None:
    if not texts:
        raise UsageError("no lines to send")
    messages: list[dict[str, Any]] = []
    delivered: set[str] = set()
    with _open_clients(home, wait) as (client, events):
        chunks = _chunks(texts)
        for chunk in chunks:
            result = client.call("send", {"handle": handle, "texts": chunk})
            messages += result["messages"]
            if len(chunks) > 1 and not as_json:
                click.echo(f"queued {len(messages)} of {len(texts)}", err=True)
        if events is not None:
            delivered = wait_delivered(client, events, [m["id"] for m in messages], timeout)
            for m in messages:
                if m["id"] in delivered:
                    m["state"] = "delivered"
    if as_json:
        click.echo(json.dumps(messages, indent=2, sort_keys=True))
    else:
        click.echo(render.sent_lines_text(handle, len(messages), len(delivered) if wait else None))
    if wait and len(delivered) < len(messages):
        left = len(messages) - len(delivered)
        raise NotDelivered(f"{left} not delivered within {timeout:g} s; they stay queued")


@click.command()
@click.option("--from", "sender", metavar="HANDLE", help="Only messages from HANDLE.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing messages as they arrive.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message and line.")
@click.option("--after", type=click.IntRange(0), default=0, help="Only messages after this cursor.")
@click.pass_context
def inbox(ctx: click.Context, sender: str | None, follow: bool, as_json: bool, after: int) -> None:
    """Show received messages, each conversation in the order it was written.

    A sender shown as "(unverified)" claimed a handle that the DHT does not (yet) bind
    to its key. With --follow, runs until interrupted.
    """
    sender_handle = None if sender is None else parse_handle(sender).handle

    def show(m: dict[str, Any]) -> None:
        click.echo(json.dumps(m, sort_keys=True) if as_json else render.message_line(m))

    params: dict[str, Any] = {"after": after}
    if sender is not None:
        params["from"] = sender
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(ControlClient(home_of(ctx)))
        if follow:  # subscribed before the listing: nothing falls between the two
            events = stack.enter_context(ControlClient(home_of(ctx)))
            events.subscribe()
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
        if not as_json and not after:  # a line per received file (p2pd/files/)
            for f in client.call("files"):
                if f["direction"] == "in" and sender_handle in (None, f["handle"]):
                    shown.append(f)
                    click.echo(render.inbox_file_line(f))
        if not follow:
            if not shown and not as_json:
                click.echo("no messages", err=True)
            return
        seen = {m["id"] for m in shown}
        while True:
            event = events.next_event(None)
            if event is None or event.get("event") != "message":
                continue
            if event["id"] in seen:
                continue
            if sender_handle is not None and (
                event["handle"] != sender_handle or not event.get("sender_verified")
            ):
                continue  # another key claiming the handle is not that contact
            seen.add(event["id"])
            show(event)


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the contacts as JSON.")
@click.pass_context
def contacts(ctx: click.Context, as_json: bool) -> None:
    """List contacts: each handle's pinned key, verified or not, how it last changed
    (a rotation notice), and every other key seen for it (suspected, never used).
    `p2pd contacts add INVITE` adds one from an invite."""
    if ctx.invoked_subcommand is not None:
        return
    with ControlClient(home_of(ctx)) as client:
        render.emit(client.call("contacts"), as_json, render.contacts_text)


@contacts.command("add")
@click.argument("invite")
@click.option("--json", "as_json", is_flag=True, help="Print the contact as JSON.")
@click.pass_context
def contacts_add(ctx: click.Context, invite: str, as_json: bool) -> None:
    """Add the contact an invite names (`p2pd invite` prints one): pin its handle to
    the key the invite's fingerprint names, fetched from the DHT (through the invite's
    addresses if need be) and checked against it; keep its addresses to reach it
    directly. Running it again changes nothing. A handle pinned to another key is
    never re-pinned: see `p2pd verify HANDLE --accept-new FINGERPRINT`."""
    from p2pd.invite import Invite

    Invite.parse(invite)  # usage errors before we bother the daemon
    with ControlClient(home_of(ctx), timeout=60) as client:
        result = client.call("add_contact", {"invite": invite})

    def text(r: dict[str, Any]) -> str:
        state = "added" if r["added"] else "already a contact"
        where = ", ".join(r["address_hints"]) or "-"
        return f"{r['handle']}#{r['fingerprint']}: {state} (reachable at {where})"

    render.emit(result, as_json, text)


@click.command()
@click.argument("handle")
@click.option(
    "--accept",
    is_flag=True,
    help="Mark HANDLE's pinned key verified (it never pins another key).",
)
@click.option(
    "--accept-new",
    metavar="FINGERPRINT",
    help="Pin this suspected key of HANDLE instead, verified: its full fingerprint, or "
    "12 or more of its first characters matching exactly one suspected key.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def verify(
    ctx: click.Context, handle: str, accept: bool, accept_new: str | None, as_json: bool
) -> None:
    """Show the safety number you share with HANDLE, as digits and a QR code.

    Both of you see the same 60 digits if, and only if, each holds the other's real
    key. Compare them out of band, then run with --accept. Other keys seen for HANDLE
    (a lookup, the LAN, a message or call claiming it) are listed as suspected: none is
    used unless you name it with --accept-new, after comparing its safety number.
    """
    parse_handle(handle)
    params: dict[str, Any] = {"handle": handle, "accept": accept}
    if accept_new is not None:
        params["accept_new"] = accept_new
    with ControlClient(home_of(ctx), timeout=60) as client:
        result = client.call("verify", params)
    render.emit(result, as_json, render.verify_text)


@click.group()
def mailbox() -> None:
    """Your offline mailbox: the sealed messages DHT nodes keep for you while you are
    away. `p2pd mailbox revoke-pass` when a contact leaked your mailbox pass."""


@mailbox.command("revoke-pass")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def mailbox_revoke_pass(ctx: click.Context, as_json: bool) -> None:
    """Revoke the mailbox pass your contacts hold (one of them leaked it).

    Your contacts put messages into your mailbox with a weekly pass you gave them,
    which spares them postage and a flood of strangers' junk. A leaked pass lets anyone
    fill that space. This moves you to a new pass at once and sends your mailbox's
    replicas a pin signed by your key: from then on they refuse the old pass (its
    holder pays postage like any stranger). The daemon sends the pin again with each
    republish of your record while it holds.

    Contacts need do nothing: each gets the new pass from your daemon on its next direct
    contact with you; until then its offline messages to you still arrive, with postage.
    """
    with ControlClient(home_of(ctx), timeout=60) as client:
        result = client.call("revoke_mailbox_pass")
    render.emit(result, as_json, render.revoked_text)
