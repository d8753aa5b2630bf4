"""What the commands print for people: pure functions from the control API's results
(docs/CONTROL_API.md) to text. ``--json`` prints those results as they are instead.

No I/O and no daemon here, so each can be tested on a dict (tests/test_cli_render.py).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any

import click


def emit(data: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    """Print ``data`` as indented JSON, or as ``human`` renders it."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(human(data))


def when(ts: float | None) -> str:
    """A UNIX time as UTC, with how far from now: ``2026-01-02 03:04:05 UTC (in 23h 59m)``."""
    if ts is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    delta = int(ts - datetime.datetime.now(tz=datetime.UTC).timestamp())
    sign, delta = ("in ", delta) if delta >= 0 else ("", -delta)
    ago = "" if sign else " ago"
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC ({sign}{delta // 3600}h {delta % 3600 // 60}m{ago})"


# ---------------------------------------------------------------------- this node, the DHT


def init_text(d: dict[str, Any]) -> str:
    from p2pd.identity import format_fingerprint

    return "\n".join(
        [
            f"created identity {d['self_certifying']}",
            f"fingerprint  {format_fingerprint(d['fingerprint'])}",
            f"key file     {d['key_file']} "
            f"({'encrypted with your passphrase' if d['encrypted'] else 'NOT encrypted'})",
            "next: p2pd daemon [--bootstrap HOST:PORT]",
        ]
    )


def rotate_text(d: dict[str, Any]) -> str:
    from p2pd.identity import format_fingerprint

    return "\n".join(
        [
            f"rotated {d['handle']}: new key {d['self_certifying']}",
            f"fingerprint  {format_fingerprint(d['fingerprint'])}",
            f"was          {format_fingerprint(d['old_fingerprint'])}",
            "next: start the daemon; it publishes the new key and sends the signed notice "
            "to your contacts",
        ]
    )


def status_text(s: dict[str, Any]) -> str:
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
            f"{when(s['record_expires'])}"
            if s["record_seq"] is not None
            else "not published yet",
        ),
        ("uptime", f"{s['uptime']:.0f} s"),
    ]
    if "reachability" in s:  # a daemon of issue 13 or later
        reflexive = ", ".join(
            f"{r['address']} ({r['observers']} observers)" for r in s["reflexive_addresses"]
        )
        nat = {"none": "no NAT", "unknown": "NAT: not known yet"}.get(
            s["nat_mapping"], f"behind an {s['nat_mapping']} NAT"
        )
        reach = "public" if s["nat_mapping"] == "none" else nat
        rows += [
            ("reachability", f"{s['reachability']} ({reach}); DHT {s['dht_mode']} mode"),
            ("seen as", reflexive or "-"),
        ]
    mapping = s.get("port_mapping")
    if mapping and mapping.get("enabled"):  # issue 13, item 9
        if mapping.get("mapped_address"):
            text = (
                f"{mapping['mapped_address']} by {mapping['protocol']} at "
                f"{mapping['gateway']} (renewed; expires in {mapping['expires_in']:.0f} s)"
            )
        elif mapping.get("failure"):
            text = f"none ({mapping['gateway']}: {mapping['failure']})"
        else:
            text = "none" if mapping.get("gateway") else "none (no default gateway)"
        rows.append(("port mapping", text))
    if "relays_in_use" in s:  # relays (issue 13, item 3)
        relaying = s.get("relay", {}).get("relaying", {})
        rows.append(("relays", ", ".join(s["relays_in_use"]) or "-"))
        if relaying.get("serving"):
            rows.append(
                (
                    "relaying",
                    f"{relaying['registrations']} registered, {relaying['circuits']} "
                    f"circuit(s), {relaying['relayed_bytes']} bytes relayed",
                )
            )
    return "\n".join(f"{k:<15} {v}" for k, v in rows)


def whois_text(r: dict[str, Any]) -> str:
    if r.get("status") == "contested":
        return contested_text(r)
    addresses = ", ".join(r["addresses"]) or "-"
    if r.get("presence") == "stale":
        addresses = "- (presence expired: messages go to its mailbox)"
    rows = [
        ("handle", r["self_certifying"]),
        ("fingerprint", r["fingerprint_display"]),
        ("addresses", addresses),
        *([("relays", ", ".join(r["relays"]))] if r.get("relays") else []),
        ("sequence", str(r["seq"])),
        ("issued", when(r["issued"])),
        ("expires", when(r["expires"])),
    ]
    return "\n".join(f"{k:<12} {v}" for k, v in rows)


def contested_text(r: dict[str, Any]) -> str:
    """A contested handle: each key grouped with where and since when it was seen."""
    claims = r["claims"]
    lines = [
        f"{r['handle']} is CONTESTED: {len(claims)} keys claim it and the network cannot "
        "tell which came first.",
        "Ask its owner which fingerprint is theirs, and use that self-certifying form.",
    ]
    for c in claims:
        lines += [
            "",
            f"{c['self_certifying']}",
            f"  fingerprint  {c['fingerprint_display']}",
            f"  replicas     {c['votes']} vote(s): {', '.join(c['replicas']) or '-'}",
            f"  first seen   {when(c['seen'])}",
        ]
    return "\n".join(lines)


def peer_line(p: dict[str, Any]) -> str:
    seen = "-"
    if p.get("last_seen"):
        moment = datetime.datetime.fromtimestamp(p["last_seen"], tz=datetime.UTC)
        seen = f"{moment:%H:%M:%S}"
    who = p["handle"] if p.get("verified") else f"{p['handle']}?"
    addresses = ", ".join(p["addresses"]) or "-"
    return f"{who:<33} {p['fingerprint'][:16]}  {p['via']:<4} {seen:<8}  {addresses}"


def peer_event_line(event: dict[str, Any]) -> str:
    """A ``peer`` event of ``peers --follow``: ``+`` came or changed, ``-`` left."""
    sign = "-" if event["change"] == "removed" else "+"
    return f"{sign} {peer_line(event)}"


# ---------------------------------------------------------------------- messages, contacts


def message_line(m: dict[str, Any]) -> str:
    sent = datetime.datetime.fromtimestamp(m["sent_at"], tz=datetime.UTC)
    if m["direction"] == "in":
        who = m["handle"] if m.get("sender_verified") else f"{m['from']} (unverified)"
        return f"{sent:%Y-%m-%d %H:%M:%S} {who}: {m['text']}"
    return f"{sent:%Y-%m-%d %H:%M:%S} -> {m['handle']} [{m['state']}]: {m['text']}"


def sent_text(m: dict[str, Any]) -> str:
    """One message after ``send``: its state, short id and recipient."""
    relayed = " (through a relay)" if m.get("via") == "relay" else ""
    return f"{m['state']}: message {m['id'][:12]} to {m['handle']}{relayed}"


def sent_lines_text(handle: str, count: int, delivered: int | None) -> str:
    """``send --lines``: how many were queued, or (with --wait) delivered."""
    if delivered is None:
        return f"queued: {count} messages to {handle}"
    return f"delivered: {delivered} of {count} messages to {handle}"


def key_history_lines(c: dict[str, Any]) -> list[str]:
    """A contact's rotation and suspected keys, one indented line each."""
    lines = []
    if c.get("rotated_from"):
        lines.append(
            f"  rotated from {c['rotated_from'][:16]} on {when(c['rotated_at'])} "
            "(notice signed by the old key)"
        )
    for e in c.get("suspected_keys", []):
        where = f" ({e['where']})" if e["where"] else ""
        lines.append(
            f"  SUSPECTED KEY {e['fingerprint']}: seen {e['count']}x by {e['source']}{where}, "
            f"first {when(e['first_seen'])}, last {when(e['last_seen'])}"
        )
    return lines


def contacts_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no contacts yet"
    lines = []
    for c in rows:
        flags = ["verified" if c["verified"] else "unverified"]
        if c.get("suspected_keys"):
            flags.append(
                f"{len({e['fingerprint'] for e in c['suspected_keys']})} other key(s) seen"
            )
        if c["pending"]:
            flags.append(f"{c['pending']} pending")
        lines.append(f"{c['handle']:<33} {c['fingerprint'][:16]}  {', '.join(flags)}")
        lines += key_history_lines(c)
    return "\n".join(lines)


def verify_text(r: dict[str, Any]) -> str:
    """The safety number as digits in rows of four groups, and as a terminal QR code."""
    import io

    import segno  # 40 ms of imports: only `verify` pays for them

    qr = io.StringIO()
    segno.make(f"p2pd-safety:0:{r['safety_number'].replace(' ', '')}").terminal(
        out=qr, compact=True, border=2
    )
    groups = r["safety_number"].split()
    number = "\n".join(" ".join(groups[i : i + 4]) for i in range(0, len(groups), 4))
    state = "verified" if r["verified"] else "not verified"
    lines = [f"{r['handle']}: {state}"]
    if r.get("previous_fingerprint"):
        lines.append(f"pinned the key you named; was {r['previous_fingerprint']}")
    lines.append(f"pinned fingerprint  {r['fingerprint_display']}")
    lines += key_history_lines(r)
    lines += [
        "",
        "Safety number (compare it with theirs, in person or on a call):",
        number,
        "",
        qr.getvalue().rstrip("\n"),
    ]
    if not r["verified"]:
        lines.append(f"If it matches, run `p2pd verify {r['handle']} --accept`.")
    if r.get("suspected_keys"):
        lines.append(
            "Messages and calls still go to the pinned key. If the owner of "
            f"{r['handle']!r} really changed keys, compare fingerprints with them (their "
            "`p2pd status`) and run "
            f"`p2pd verify {r['handle']} --accept-new FINGERPRINT`."
        )
    return "\n".join(lines)


def revoked_text(r: dict[str, Any]) -> str:
    """``mailbox revoke-pass``: the new epoch, who holds the pin, what contacts do."""
    held = (
        f"held by {r['replicas']} replica(s) of your mailbox"
        if r["replicas"]
        else "held by no replica yet (none answered): the daemon sends it again with "
        "each republish of your record, or run this again later"
    )
    return "\n".join(
        [
            f"revoked your mailbox passes: now at pass epoch {r['epoch']}",
            f"pin          {held}",
            f"until        {when(r['until'])}",
            "contacts     nothing to do: each gets your new pass on its next direct "
            "contact with you",
        ]
    )


# ---------------------------------------------------------------------- calls


def call_text(c: dict[str, Any]) -> str:
    """A call's state line and, once media flowed, its statistics."""
    m = c.get("media") or {}
    line = f"call {c['id'][:8]} {c['direction']} {c.get('display', c['handle'])}: {c['state']}"
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


def calls_text(rows: list[dict[str, Any]]) -> str:
    return "\n".join(call_text(c) for c in rows) or "no calls yet"


# ---------------------------------------------------------------------- files


def size_text(n: float) -> str:
    """Bytes for people: ``0 B``, ``999 B``, ``2.1 MB`` (powers of 1000, as file managers)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover  (the loop returns at GB)


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}:{seconds % 60:02d}"


def file_line(f: dict[str, Any]) -> str:
    """One transfer: ``3fa2c1d0  in   alice  photo.jpg  2.1 MB  done  -> /path``."""
    arrow = "from" if f["direction"] == "in" else "to"
    line = f"{f['id'][:8]}  {f['state']:<9} {arrow} {f['handle']}  {f['name']}"
    line += f"  {size_text(f['size'])}"
    if f["state"] in ("sending", "accepted") and f["size"]:
        line += f"  {100 * f['progress']:.0f}%  {size_text(f['rate'])}/s  eta {eta_text(f['eta'])}"
    if f["state"] == "pending":
        line += f"  (p2pd accept {f['id'][:8]})"
    if f["direction"] == "in" and f["state"] == "done":
        line += f": saved to {f['path']}"
    if f.get("error"):
        line += f"  [{f['error']}]"
    return line


def files_text(rows: list[dict[str, Any]]) -> str:
    return "\n".join(file_line(f) for f in rows) if rows else "no file transfers"


def inbox_file_line(f: dict[str, Any]) -> str:
    """``inbox``'s line for a received file: ``alice sent photo.jpg, 2.1 MB: saved to ...``."""
    who = f["handle"] if f.get("verified", True) else f"{f['peer']} (unverified)"
    what = f"{who} sent {f['name']}, {size_text(f['size'])}"
    if f["state"] == "done":
        return f"{what}: saved to {f['path']}"
    if f["state"] == "pending":
        return f"{what}: waiting (p2pd accept {f['id'][:8]}, or p2pd reject {f['id'][:8]})"
    return f"{what}: {f['state']}"


def progress_line(f: dict[str, Any]) -> str:
    """A plain progress line (not a terminal): name, percent, bytes, rate, ETA."""
    return (
        f"{f['name']}: {100 * f['progress']:5.1f}%  {size_text(f['bytes_done'])} of "
        f"{size_text(f['size'])}  {size_text(f['rate'])}/s  eta {eta_text(f['eta'])}  "
        f"[{f['state']}]"
    )


def progress_bar(f: dict[str, Any], width: int = 30) -> str:
    """A one-line bar for a terminal (redrawn with a carriage return)."""
    filled = int(width * min(1.0, f["progress"]))
    bar = "#" * filled + "-" * (width - filled)
    return (
        f"{f['name'][:24]:<24} [{bar}] {100 * f['progress']:5.1f}%  "
        f"{size_text(f['rate'])}/s  eta {eta_text(f['eta'])}"
    )
