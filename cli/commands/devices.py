"""``devices``: the microphones and speakers a call can use.

Local to the CLI, not a control method: the daemon that places a call runs on this
machine as the same user, so it sees the same devices, and listing them needs no daemon.
(A daemon started with another environment, e.g. another ``PULSE_SERVER``, may see others.)
"""

from __future__ import annotations

from typing import Any

import click

from .. import render


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the devices as JSON.")
def devices(as_json: bool) -> None:
    """List the microphones and speakers for `call --audio-in mic:NAME` and
    `--audio-out speaker:NAME` (marked * the defaults, used when none is named)."""
    from p2pd.media.devices import list_devices  # PortAudio: only for this command

    found: dict[str, Any] = list_devices().summary()
    render.emit(found, as_json, _devices_text)


def _devices_text(found: dict[str, Any]) -> str:
    lines: list[str] = []
    for kind, what, flag in (
        ("inputs", "microphones", "--audio-in mic:NAME"),
        ("outputs", "speakers", "--audio-out speaker:NAME"),
    ):
        rows = found[kind]
        if not rows:
            lines.append(f"no {what} found")
            continue
        lines.append(f"{what} ({flag}):")
        for d in rows:
            mark = "*" if d["default"] else " "
            lines.append(
                f" {mark} {d['index']:>3}  {d['name']}  ({d['host_api']}, "
                f"{d['channels']} ch, {d['default_samplerate']:g} Hz)"
            )
    if not found["inputs"]:
        lines.append("calls need --audio-in FILE|tone:HZ here")
    if not found["outputs"]:
        lines.append("calls need --audio-out none or --record FILE here")
    return "\n".join(lines)
