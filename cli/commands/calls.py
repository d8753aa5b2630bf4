"""Calls: ``call``, ``answer``, ``hangup``, ``calls``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from p2pd.control_client import ControlClient
from p2pd.errors import CallFailed

from .. import render
from . import home_of, parse_handle

F = TypeVar("F", bound=Callable[..., Any])

CALL_ENDED = ("ended", "rejected", "busy", "no-answer", "failed")
#: `call` and `answer` follow the call's events; after this long without one they ask
#: the daemon (events are dropped for a reader that falls behind).
CALL_RECHECK = 2.0


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
        "--audio-out",
        metavar="OUT",
        help="Play what you receive on OUT: speaker, speaker:NAME (see `p2pd devices`) or "
        "none. Default: [calls] audio_out in config.toml (speaker), or none with --record.",
    )(func)
    func = click.option(
        "--audio-in",
        metavar="SRC",
        help="Send audio from SRC: mic, mic:NAME (see `p2pd devices`), tone:FREQ, or a file "
        "PyAV can read. Default: [calls] audio_in in config.toml (mic).",
    )(func)
    return func


def _media_params(
    audio_in: str | None,
    video_in: str | None,
    record: Path | None,
    duration: float | None,
    *,
    home: Path | None = None,
    audio_out: str | None = None,
) -> dict[str, Any]:
    """The media params of `call` and `answer`. Audio in and out not given come from
    the ``[calls]`` section of ``home``'s config.toml (default: the microphone and the
    speaker); a recording alone means no speaker, as before devices existed."""
    if home is not None and (audio_in is None or (audio_out is None and record is None)):
        from p2pd.config import load_config

        calls = load_config(home).calls
        audio_in = calls.audio_in if audio_in is None else audio_in
        if audio_out is None and record is None:
            audio_out = calls.audio_out
    params = {
        "audio_in": audio_in,
        "video_in": video_in,
        "record": str(record.resolve()) if record is not None else None,
        "duration": duration,
    }
    if audio_out is not None and audio_out != "none":
        params["audio_out"] = audio_out
    return params


def _follow_call(home: Path, client: ControlClient, call: dict[str, Any], as_json: bool) -> None:
    """Show the call until it ends; CallFailed unless it connected and ended normally.

    Follows the daemon's ``call`` events, subscribed after ``call``/``answer`` returned
    and checked against ``calls`` once subscribed (nothing falls between the two); and
    asks ``calls`` again after CALL_RECHECK seconds without an event of this call, since
    a busy daemon drops events for a slow reader (docs/CONTROL_API.md, `subscribe`).
    """
    last = call["state"]
    if not as_json:
        click.echo(render.call_text(call))
    if last not in CALL_ENDED:
        with ControlClient(home, timeout=60) as events:
            events.subscribe()
            state: str | None = _state_of(client, call["id"])
            for _ in range(24 * 3600):  # bounded: a day of quiet rechecks
                if state is None:  # gone from the daemon's history
                    break
                if state != last and not as_json:
                    click.echo(f"... {state}")
                last = state
                if state in CALL_ENDED:
                    break
                event = events.next_event(CALL_RECHECK)
                if event is None:
                    state = _state_of(client, call["id"])
                elif event.get("event") == "call" and event.get("id") == call["id"]:
                    state = str(event.get("state"))
        call = _current(client, call["id"]) or call
    if as_json:
        click.echo(json.dumps(call, indent=2, sort_keys=True))
    else:
        click.echo(render.call_text(call))
    if call["state"] != "ended" or not call["duration_s"]:
        raise CallFailed(f"the call {call['state']}: {call.get('reason') or '-'}")


def _current(client: ControlClient, call_id: str) -> dict[str, Any] | None:
    """The call ``call_id`` as the daemon's ``calls`` shows it now (None: forgotten)."""
    found: list[dict[str, Any]] = [c for c in client.call("calls") if c["id"] == call_id]
    return found[0] if found else None


def _state_of(client: ControlClient, call_id: str) -> str | None:
    current = _current(client, call_id)
    return None if current is None else str(current["state"])


@click.command(name="call")
@click.argument("handle")
@_media_options
@click.option("--json", "as_json", is_flag=True, help="Print the final call as JSON.")
@click.pass_context
def call_cmd(
    ctx: click.Context,
    handle: str,
    audio_in: str | None,
    video_in: str | None,
    record: Path | None,
    duration: float | None,
    as_json: bool,
    audio_out: str | None = None,
) -> None:
    """Call HANDLE: ring its daemon (30 s), then talk until someone hangs up.

    Audio goes from your microphone to the peer's speaker by default (`p2pd devices`
    lists them; a headset avoids echo). Audio is Opus over QUIC datagrams, encrypted end
    to end on the connection both identity keys authenticated; --video-in adds VP8.
    Runs until the call ends (Ctrl-C leaves it running: `p2pd hangup` ends it). Exit 0
    when a call took place.
    """
    parse_handle(handle)
    media = _media_params(
        audio_in, video_in, record, duration, home=home_of(ctx), audio_out=audio_out
    )
    params = {"handle": handle, **media}
    with ControlClient(home_of(ctx), timeout=60) as client:
        result = client.call("call", params)
        _follow_call(home_of(ctx), client, result, as_json)


@click.command()
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
def answer(
    ctx: click.Context,
    wait: float,
    audio_in: str | None,
    video_in: str | None,
    record: Path | None,
    duration: float | None,
    as_json: bool,
    audio_out: str | None = None,
) -> None:
    """Answer the ringing call (or wait for the next one), and talk until it ends."""
    media = _media_params(
        audio_in, video_in, record, duration, home=home_of(ctx), audio_out=audio_out
    )
    params = {"wait": wait, **media}
    with ControlClient(home_of(ctx), timeout=wait + 60) as client:
        result = client.call("answer", params)
        _follow_call(home_of(ctx), client, result, as_json)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the call as JSON.")
@click.pass_context
def hangup(ctx: click.Context, as_json: bool) -> None:
    """End the current call, or reject the one ringing."""
    with ControlClient(home_of(ctx)) as client:
        render.emit(client.call("hangup"), as_json, render.call_text)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the calls as JSON.")
@click.pass_context
def calls(ctx: click.Context, as_json: bool) -> None:
    """The current call and recent ones: state, duration, RTT, loss, jitter, bitrate."""
    with ControlClient(home_of(ctx)) as client:
        rows = client.call("calls")
    render.emit(rows, as_json, render.calls_text)
