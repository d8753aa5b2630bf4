"""Files: ``send-file``, ``files``, ``accept``, ``reject``, ``cancel`` (p2pd/files/)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from p2pd.control_client import ControlClient
from p2pd.errors import NotDelivered, UsageError

from .. import render
from . import home_of, parse_handle

#: `send-file --wait` asks the daemon for progress this often.
PROGRESS_INTERVAL = 0.5
#: Without a terminal, a progress line at most this often.
PLAIN_PROGRESS_INTERVAL = 2.0
FINAL = ("done", "rejected", "cancelled", "failed")


@click.command("send-file")
@click.argument("handle")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--wait",
    is_flag=True,
    help="Block until every file is received and verified (exit 0), refused or failed "
    "(exit 1), showing progress; or until --timeout (exit 1; the transfer goes on).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 30 * 24 * 3600),
    default=24 * 3600.0,
    show_default=True,
    help="Seconds --wait waits.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the transfers as JSON.")
@click.pass_context
def send_file(
    ctx: click.Context,
    handle: str,
    paths: tuple[Path, ...],
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Send each file of PATHS to HANDLE, encrypted end to end.

    The offer goes through the encrypted session like a message (and waits in the
    outbox or the mailbox while HANDLE is offline); the bytes go over QUIC once HANDLE
    accepts (at once for a pinned contact and a file under its `[files]
    auto_accept_max`), each chunk group verified as it arrives, resumed after any
    interruption. `p2pd files` shows progress.
    """
    parse_handle(handle)
    for path in paths:
        if not path.exists():
            raise UsageError(f"{path}: no such file")
        if not path.is_file():
            raise UsageError(f"{path}: not a regular file")
    sent: list[dict[str, Any]] = []
    with ControlClient(home_of(ctx), timeout=600) as client:
        for path in paths:
            sent.append(client.call("send_file", {"handle": handle, "path": str(path.absolute())}))
            if not as_json:
                click.echo(
                    f"offered {sent[-1]['name']} ({render.size_text(sent[-1]['size'])}) "
                    f"to {handle}: id {sent[-1]['id'][:8]}"
                )
        if wait:
            sent = _wait(client, sent, timeout, quiet=as_json)
    if as_json:
        click.echo(json.dumps(sent, indent=2, sort_keys=True))
    if wait:
        bad = [f for f in sent if f["state"] != "done"]
        if bad:
            states = ", ".join(f"{f['name']}: {f['state']}" for f in bad)
            raise NotDelivered(f"not received: {states}")


def _with_average_rate(
    f: dict[str, Any], now: float, first_seen: dict[str, tuple[float, int]]
) -> dict[str, Any]:
    """The daemon gives a transfer's rate while it moves, 0 once it is done: a finished
    transfer shows instead the average rate over the time this command watched it (its
    last line said "0 B/s  [done]" when that line fell after the end)."""
    since, start = first_seen.setdefault(f["id"], (now, f["bytes_done"]))
    if f["state"] == "done" and not f["rate"] and now - since > 0.2:
        return {**f, "rate": max(0.0, (f["bytes_done"] - start) / (now - since))}
    return f


def _wait(
    client: ControlClient, sent: list[dict[str, Any]], timeout: float, *, quiet: bool
) -> list[dict[str, Any]]:
    """Poll each transfer until it is final or ``timeout`` passes; show progress on
    stderr: a bar on a terminal, a line every PLAIN_PROGRESS_INTERVAL otherwise."""
    tty = sys.stderr.isatty()
    deadline = time.monotonic() + timeout
    last_line = 0.0
    current = list(sent)
    first_seen: dict[str, tuple[float, int]] = {}  # id: (when, bytes_done) at our first look
    for _ in range(int(timeout / PROGRESS_INTERVAL) + 2):
        current = [client.call("file", {"id": f["id"]}) for f in current]
        now = time.monotonic()
        current = [_with_average_rate(f, now, first_seen) for f in current]
        if not quiet:
            if tty:
                click.echo(
                    "\r" + " | ".join(render.progress_bar(f) for f in current), nl=False, err=True
                )
            elif now - last_line >= PLAIN_PROGRESS_INTERVAL:
                for f in current:
                    click.echo(render.progress_line(f), err=True)
                last_line = now
        if all(f["state"] in FINAL for f in current) or now >= deadline:
            break
        time.sleep(PROGRESS_INTERVAL)
    if not quiet:
        if tty:
            click.echo("", err=True)
        for f in current:
            click.echo(render.file_line(f))
    return current


@click.command("files")
@click.option("--json", "as_json", is_flag=True, help="Print the transfers as JSON.")
@click.option(
    "--follow", "-f", is_flag=True, help="Then print every change and progress until interrupted."
)
@click.pass_context
def files(ctx: click.Context, as_json: bool, follow: bool) -> None:
    """Incoming and outgoing file transfers, newest first: state, size, progress, rate."""
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(ControlClient(home_of(ctx)))
        if follow:  # subscribed before the listing: nothing falls between the two
            events = stack.enter_context(ControlClient(home_of(ctx)))
            events.subscribe()
        rows = client.call("files")
        render.emit(rows, as_json, render.files_text)
        if not follow:
            return
        names = {f["id"]: f["name"] for f in rows}
        while True:
            event = events.next_event(None)
            if event is None or event.get("event") not in ("file", "file_progress"):
                continue
            if as_json:
                click.echo(json.dumps(event, sort_keys=True))
            elif event["event"] == "file":
                names[event["id"]] = event["name"]
                click.echo(render.file_line(event))
            else:
                name = names.get(event["id"], event["id"][:8])
                click.echo(
                    render.progress_line(
                        {
                            **event,
                            "name": name,
                            "state": "running",
                            "progress": event["bytes_done"] / max(1, event["size"]),
                        }
                    )
                )


@click.command("accept")
@click.argument("transfer_id")
@click.option(
    "--to",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Save it there instead of the `[files] dir`.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def accept(ctx: click.Context, transfer_id: str, directory: Path | None, as_json: bool) -> None:
    """Accept the incoming file TRANSFER_ID (its first digits, from `p2pd files`)."""
    params: dict[str, Any] = {"id": transfer_id}
    if directory is not None:
        params["dir"] = str(directory.expanduser().absolute())
    _transfer_call(ctx, "accept_file", params, as_json)


@click.command("reject")
@click.argument("transfer_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def reject(ctx: click.Context, transfer_id: str, as_json: bool) -> None:
    """Refuse the incoming file TRANSFER_ID; the sender is told."""
    _transfer_call(ctx, "reject_file", {"id": transfer_id}, as_json)


@click.command("cancel")
@click.argument("transfer_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def cancel(ctx: click.Context, transfer_id: str, as_json: bool) -> None:
    """Stop the transfer TRANSFER_ID, either way; the other side is told."""
    _transfer_call(ctx, "cancel_file", {"id": transfer_id}, as_json)


def _transfer_call(ctx: click.Context, method: str, params: dict[str, Any], as_json: bool) -> None:
    """One control call on a transfer; prints the transfer's row as it is now."""
    with ControlClient(home_of(ctx)) as client:
        row = client.call(method, params)
    render.emit(row, as_json, render.file_line)
