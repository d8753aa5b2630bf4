"""The text report of scripts/bench_messages.py (its figures, goals and verdicts)."""

from __future__ import annotations

from typing import Any

from _bench import percentile

GOALS = {"established_p50_ms": 2.0, "established_p99_ms": 10.0, "throughput_msgs_per_s": 2000.0}


def _f(value: float | None, unit: str = " ms") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_text(r: dict[str, Any]) -> None:
    c = r["config"]
    print(
        f"\np2pd messages between real daemons on loopback (127.0.N.1): {c['cpus']} CPU(s), "
        f"Python {c['python']}, load average {c['loadavg_at_start'][0]:.2f} at start, "
        f"{c['loadavg_at_end'][0]:.2f} at end, {r['seconds']} s"
        + ("  [PROFILED: timings inflated by cProfile]" if c["profiled"] else "")
    )
    b = r["baseline"]
    print("\nbaseline, same daemons, same run (round trip of one control call on alice):")
    for name, what in (
        ("message", "control socket + one SQLite read"),
        ("status", "+ the DHT's statistics"),
        ("whois", "+ a DHT lookup over UDP (send: first contact, then once a minute)"),
    ):
        s = b[name]
        print(f"  {name:<8} p50 {_f(s['p50_ms']):>10}  p99 {_f(s['p99_ms']):>10}   {what}")
        if "sender_dht" in s:
            _print_dht(s["sender_dht"], "whois")

    if fc := r.get("first_contact"):
        print(
            f"\nfirst contact ({fc['n']} fresh recipients, send call -> delivered event; "
            "resolve, QUIC handshake, X3DH, deliver, ack):"
        )
        print(
            f"  p50 {_f(fc['p50_ms'])}  p95 {_f(fc['p95_ms'])}  max {_f(fc['max_ms'])}"
            f"  lost {fc['lost']}   (no goal)"
        )
        _print_breakdown(fc["breakdown"])

    if e := r.get("established"):
        ok50 = e["p50_ms"] is not None and e["p50_ms"] < GOALS["established_p50_ms"]
        ok99 = e["p99_ms"] is not None and e["p99_ms"] < GOALS["established_p99_ms"]
        print(f"\nestablished session ({e['n']} messages alice -> bob, one at a time):")
        print(
            f"  p50 {_f(e['p50_ms']):>10}   goal < {GOALS['established_p50_ms']:g} ms: "
            f"{_verdict(ok50)}"
        )
        print(
            f"  p99 {_f(e['p99_ms']):>10}   goal < {GOALS['established_p99_ms']:g} ms: "
            f"{_verdict(ok99)}"
        )
        print(f"  p90 {_f(e['p90_ms'])}, max {_f(e['max_ms'])}, lost {e['lost']}")
        _print_breakdown(e["breakdown"])
        cpu = e["cpu_ms_per_message"]
        print(
            f"  CPU per message: sender {cpu['sender']:.2f} ms, receiver {cpu['receiver']:.2f} ms"
        )
        _print_switches(e["switches"])
        _print_dht(e["sender_dht"])

    for t in (r.get("throughput"), r.get("throughput_batched")):
        if t is None:
            continue
        ok = t["msgs_per_s"] is not None and t["msgs_per_s"] >= GOALS["throughput_msgs_per_s"]
        calls = "one send call per message" if t["batch"] == 1 else f"{t['batch']} per send call"
        print(
            f"\nthroughput ({t['messages']} messages alice -> bob, {calls}, "
            f"{t['connections']} control connection(s)):"
        )
        print(
            f"  {t['delivered']} delivered in {t['seconds']:.2f} s = {_f(t['msgs_per_s'], '')}"
            f" msgs/s   goal >= {GOALS['throughput_msgs_per_s']:,.0f} msgs/s: {_verdict(ok)}"
            + ("" if t["complete"] else "   (INCOMPLETE)")
        )
        if t["completion_seen_by"] != "events":
            print(f"  completion seen by {t['completion_seen_by']}: up to 0.2 s late")
        print(
            f"  send calls alone: {t['send_calls_per_s']} /s; events dropped: "
            f"{t['events_dropped']}; messages per batch on the wire: {t.get('messages_per_batch')}"
        )
        if t["msgs_per_s_by_tenth"]:
            tenths = " ".join(f"{v:.0f}" for v in t["msgs_per_s_by_tenth"])
            print(f"  msgs/s in each tenth of the run: {tenths}")
        cpu, util = t["cpu_ms_per_message"], t["cpu_utilisation"]
        print(
            f"  CPU per message: sender {cpu['sender']:.2f} ms, receiver "
            f"{cpu['receiver']:.2f} ms (this client {cpu['bench_client']:.2f} ms)"
        )
        print(
            f"  CPU busy: sender {util['sender']:.0%}, receiver {util['receiver']:.0%},"
            f" client {util['bench_client']:.0%} of one core"
        )
        _print_switches(t["switches"])
        _print_dht(t["sender_dht"])

    a, bb = r["counters"]["alice"], r["counters"]["bob"]
    print(
        f"\ncounters: alice sent_direct {a['sent_direct']}, sent_mailbox {a['sent_mailbox']},"
        f" acks_in {a['acks_in']}, nacks_in {a['nacks_in']}; bob received_direct "
        f"{bb['received_direct']}, duplicates {bb['duplicates']}, refused {bb['refused']}"
    )
    if "tox" in r:
        _print_tox(r)
    for name, p in r.get("profile", {}).items():
        sq = p["sqlite_per_message"]
        print(
            f"\nprofile of {name} (main thread, {p['messages']} messages): "
            f"{p['busy_ms_per_message']:.2f} ms busy (wall, not waiting in epoll) per message;"
            " SQLite per message: "
            f"{sq['commit_calls']} commit(), {sq['with_conn_blocks']} `with conn`, "
            f"{sq['execute_calls']} execute()"
        )
        print(f"  {'own ms/msg':>10} {'cum ms/msg':>10} {'calls/msg':>9}  function")
        for row in p["top_by_own_time"]:
            print(
                f"  {row['own_ms_per_message']:>10.4f} {row['cumulative_ms_per_message']:>10.4f}"
                f" {row['calls_per_message']:>9.2f}  {row['function']}"
            )


def _print_dht(d: dict[str, Any], per: str = "message") -> None:
    print(
        f"  alice's DHT requests per {per} {d['requests_out_per_message']:.2f}"
        f", soft timeouts {d['soft_timeouts']}"
    )


def _print_switches(sw: dict[str, Any]) -> None:
    print(
        "  context switches per message (voluntary/involuntary): "
        + ", ".join(
            f"{name} {s['voluntary_per_message']:.1f}/{s['involuntary_per_message']:.1f}"
            for name, s in sw.items()
        )
    )


def _print_breakdown(bd: dict[str, Any]) -> None:
    print(
        "  medians: send call {} (of which to 'queued' {}); queued -> sent {}; "
        "sent -> delivered {}; event -> reader {}".format(
            _f(bd["send_call_p50_ms"]),
            _f(bd["to_queued_p50_ms"]),
            _f(bd["queued_to_sent_p50_ms"]),
            _f(bd["sent_to_delivered_p50_ms"]),
            _f(bd["delivered_to_read_p50_ms"]),
        )
    )


def _print_tox(r: dict[str, Any]) -> None:
    """Tox's figures beside p2pd's (not graded: the goals name p2pd's workload)."""
    t = r["tox"]
    print("\nTox (c-toxcore, libtoxcore2) beside p2pd, same run, loopback: not graded")
    if "skipped" in t:
        print(f"  skipped: {t['skipped']}")
        return
    firsts = t["first_contact_s"]
    fc = r.get("first_contact")
    print(
        "  first contact: Tox friend request -> connected "
        + (f"p50 {percentile(firsts, 50) or 0:.2f} s of {len(firsts)}" if firsts else "never")
        + (f", {t['first_contact_failed']} failed" if t["first_contact_failed"] else "")
        + (f"; p2pd send -> delivered p50 {_f(fc['p50_ms'])}" if fc else "")
    )
    e, rt = r.get("established"), t.get("round_trip_ms", [])
    if rt:
        print(
            f"  latency: Tox round trip (bob echoes) p50 {percentile(rt, 50) or 0:.2f} ms p99 "
            f"{percentile(rt, 99) or 0:.2f} ms, lost {t['latency_lost']}"
            + (
                f"; p2pd send -> delivered (acked, durable) p50 {_f(e['p50_ms'])} p99 "
                f"{_f(e['p99_ms'])}"
                if e
                else ""
            )
        )
    if b := t.get("burst"):
        tp = r.get("throughput")
        print(
            f"  throughput: Tox burst of {b['messages']}: {b['received']} received in "
            f"{b['seconds']:.2f} s = {_f(b['msgs_per_s'], '')} msgs/s, lost {b['lost']}, "
            f"refused by Tox {b['refused_by_tox']} (in memory, not durable)"
            + (
                f"; p2pd {_f(tp['msgs_per_s'], '')} msgs/s, one durable send call each, "
                f"lost {tp['messages'] - tp['delivered']}"
                if tp
                else ""
            )
            + (
                f"; p2pd with {tb['batch']} per call {_f(tb['msgs_per_s'], '')} msgs/s"
                if (tb := r.get("throughput_batched"))
                else ""
            )
        )
