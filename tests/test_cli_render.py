"""The CLI's human output, from the control API's results (docs/CONTROL_API.md): pure
functions, tested on dicts."""

from __future__ import annotations

import time

from p2pd_cli import render


def test_when() -> None:
    assert render.when(None) == "-"
    assert render.when(0).startswith("1970-01-01 00:00:00 UTC (")
    assert render.when(0).endswith(" ago)")
    assert render.when(time.time() + 3700).endswith("(in 1h 1m)")


def test_status_before_the_record_is_published() -> None:
    status = {
        "self_certifying": "bob#u6cmphjezpfb",
        "fingerprint_display": "u6cm phje",
        "listen": "127.0.0.1:4747",
        "addresses": [],
        "routing_table_size": 0,
        "records_stored": 0,
        "record_seq": None,
        "replicas": 0,
        "record_expires": None,
        "uptime": 1.6,
    }
    assert render.status_text(status).splitlines() == [
        "handle          bob#u6cmphjezpfb",
        "fingerprint     u6cm phje",
        "listen          127.0.0.1:4747",
        "addresses       -",
        "routing table   0 contacts",
        "records stored  0",
        "own record      not published yet",
        "uptime          2 s",
    ]


def test_status_port_mapping() -> None:
    base = {
        "self_certifying": "bob#u6cmphjezpfb",
        "fingerprint_display": "u6cm phje",
        "listen": "0.0.0.0:4747",
        "addresses": ["198.18.11.1:4747"],
        "routing_table_size": 3,
        "records_stored": 0,
        "record_seq": None,
        "replicas": 0,
        "record_expires": None,
        "uptime": 1.6,
    }
    mapped = {
        "enabled": True,
        "gateway": "10.1.0.1",
        "protocol": "pcp",
        "mapped_address": "198.18.11.1:4747",
        "expires_in": 7190.4,
        "failure": None,
    }
    failed = {**mapped, "protocol": None, "mapped_address": None, "expires_in": None}
    failed["failure"] = "pcp: no answer; nat-pmp: no answer"

    def row(port_mapping: dict[str, object]) -> list[str]:
        lines = render.status_text({**base, "port_mapping": port_mapping}).splitlines()
        return [line for line in lines if line.startswith("port mapping")]

    assert row(mapped) == [
        "port mapping    198.18.11.1:4747 by pcp at 10.1.0.1 (renewed; expires in 7190 s)"
    ]
    assert row(failed) == ["port mapping    none (10.1.0.1: pcp: no answer; nat-pmp: no answer)"]
    assert row({**failed, "gateway": None, "failure": None}) == [
        "port mapping    none (no default gateway)"
    ]
    assert row({"enabled": False}) == []


def test_messages() -> None:
    received = {
        "sent_at": 0,
        "direction": "in",
        "handle": "alice",
        "from": "alice#mallorymallory",
        "text": "hi",
    }
    # Unverified: the claimed handle with the sender's own key, never the bare handle.
    assert render.message_line(received) == (
        "1970-01-01 00:00:00 alice#mallorymallory (unverified): hi"
    )
    verified = {**received, "sender_verified": True}
    assert render.message_line(verified) == "1970-01-01 00:00:00 alice: hi"
    sent = {"sent_at": 0, "direction": "out", "handle": "bob", "state": "sent", "text": "yo"}
    assert render.message_line(sent) == "1970-01-01 00:00:00 -> bob [sent]: yo"
    assert render.sent_text({"id": "ab" * 16, "handle": "bob", "state": "queued"}) == (
        "queued: message abababababab to bob"
    )
    assert render.sent_lines_text("bob", 3, None) == "queued: 3 messages to bob"
    assert render.sent_lines_text("bob", 3, 2) == "delivered: 2 of 3 messages to bob"


def test_contacts() -> None:
    assert render.contacts_text([]) == "no contacts yet"
    suspected = {
        "fingerprint": "c" * 32,
        "source": "dht",
        "where": "whois",
        "first_seen": 0,
        "last_seen": 0,
        "count": 2,
    }
    carol = {
        "handle": "carol",
        "fingerprint": "b" * 32,
        "verified": False,
        "rotated_from": "a" * 32,
        "rotated_at": 0,
        "suspected_keys": [suspected, {**suspected, "source": "message", "where": "direct"}],
        "pending": 3,
    }
    lines = render.contacts_text([carol]).splitlines()
    assert lines[0] == f"{'carol':<33} {'b' * 16}  unverified, 1 other key(s) seen, 3 pending"
    assert lines[1].startswith(f"  rotated from {'a' * 16} on 1970-01-01 00:00:00 UTC")
    assert lines[2].startswith(f"  SUSPECTED KEY {'c' * 32}: seen 2x by dht (whois), first 1970")
    assert lines[3].startswith(f"  SUSPECTED KEY {'c' * 32}: seen 2x by message (direct)")


def test_calls() -> None:
    assert render.calls_text([]) == "no calls yet"
    ringing = {"id": "0123456789abcdef", "direction": "in", "handle": "bob", "state": "ringing"}
    assert render.call_text({**ringing, "duration_s": 0}) == "call 01234567 in bob: ringing"
    ended = {
        **ringing,
        "state": "ended",
        "reason": "hangup",
        "duration_s": 3.25,
        "media": {"rtt_ms": None, "loss_pct": 1, "video_frames_sent": 9},
    }
    assert render.call_text(ended) == (
        "call 01234567 in bob: ended (hangup), 3.2 s\n"
        "  rtt -, loss 1%, jitter 0 ms, bitrate 0/0 kbit/s (sent/received), concealed 0, "
        "FEC 0, redundant copies 0, video frames 9/0"
    )


def test_peer_events() -> None:
    peer = {"handle": "eve", "fingerprint": "e" * 32, "via": "lan", "addresses": []}
    assert render.peer_event_line({**peer, "change": "removed"}).startswith("- eve?  ")
    assert render.peer_event_line({**peer, "change": "added"}).endswith("lan  -         -")


def test_revoke_pass_says_who_holds_the_pin_and_what_contacts_do() -> None:
    until = time.time() + 10 * 86400
    text = render.revoked_text({"epoch": 2, "replicas": 5, "until": until}).splitlines()
    assert text[0] == "revoked your mailbox passes: now at pass epoch 2"
    assert text[1] == "pin          held by 5 replica(s) of your mailbox"
    assert text[2].startswith("until        ") and "(in 2" in text[2]
    assert "nothing to do" in text[3]
    none = render.revoked_text({"epoch": 1, "replicas": 0, "until": until})
    assert "held by no replica yet" in none and "run this again later" in none
