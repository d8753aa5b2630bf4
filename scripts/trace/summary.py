#!/usr/bin/env python3
"""Where one message's time goes, from the stamps of scripts/trace/sitecustomize.py.

The sender is the daemon that emitted ``queued`` events, the receiver the other one
that handled streams. For each of the last ``--samples`` messages (one at a time, as
bench_messages.py's established phase sends them): the ``send`` call reaching the
daemon -> its packet out -> in at the receiver -> the answer out -> in at the sender ->
``delivered`` emitted, as medians, and datagrams sent per message by each side.
``--show N`` prints message N's every stamp, both daemons merged.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
from pathlib import Path

Record = tuple[int, str, str]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--show", type=int, default=None, metavar="N")
    args = parser.parse_args()
    procs: dict[str, list[Record]] = {
        f.name: [tuple(r) for r in json.loads(f.read_text())["records"]]  # type: ignore[misc]
        for f in sorted(args.directory.glob("*.json"))
    }

    def count(name: str, label: str) -> int:
        return sum(1 for _, what, _ in procs[name] if what == label)

    sender = max(procs, key=lambda n: count(n, "EMIT message_status queued"))
    receiver = max(
        (n for n in procs if n != sender), key=lambda n: count(n, "Delivery.handle_stream")
    )
    s, r = procs[sender], procs[receiver]

    def stamps(rec: list[Record], prefix: str, kind: str | None = None) -> list[int]:
        return [t for t, what, k in rec if what.startswith(prefix) and (kind is None or k == kind)]

    sends = stamps(s, "Delivery.send_many", "b")[-args.samples :]
    delivered = stamps(s, "EMIT message_status delivered")
    s_out, s_in, r_out, r_in = (
        stamps(s, "UDP out"), stamps(s, "UDP in"), stamps(r, "UDP out"), stamps(r, "UDP in")
    )  # fmt: skip

    def after(xs: list[int], t: int | None) -> int | None:
        if t is None:
            return None
        i = bisect.bisect_left(xs, t)
        return xs[i] if i < len(xs) else None

    def within(xs: list[int], a: int, b: int) -> int:
        return bisect.bisect_left(xs, b) - bisect.bisect_left(xs, a)

    hops: dict[str, list[float]] = {
        name: []
        for name in ("send -> packet out", "-> in at receiver", "-> answer out",
                     "-> in at sender", "-> delivered emitted", "total (daemons)")
    }  # fmt: skip
    sent_by: dict[str, list[int]] = {"sender": [], "receiver": []}
    for n in range(len(sends) - 1):
        t0, t_next = sends[n], sends[n + 1]
        t1 = after(delivered, t0)
        so = after(s_out, t0)
        ri = after(r_in, so)
        ro = after(r_out, ri)
        si = after(s_in, ro)
        if t1 is None or so is None or ri is None or ro is None or si is None or si > t1:
            continue
        for name, (a, b) in zip(
            hops, [(t0, so), (so, ri), (ri, ro), (ro, si), (si, t1), (t0, t1)], strict=True
        ):
            hops[name].append((b - a) / 1000)
        sent_by["sender"].append(within(s_out, t0, t_next))
        sent_by["receiver"].append(within(r_out, t0, t_next))
        if n == args.show:
            merged = sorted([(t, "S", w, k) for t, w, k in s] + [(t, "R", w, k) for t, w, k in r])
            last = t0
            for t, who, label, kind in merged:
                if t0 <= t <= t1:
                    print(f"{(t - t0) / 1e3:8.1f} {(t - last) / 1e3:7.1f} {who} {kind} {label}")
                    last = t
    print(f"{len(hops['total (daemons)'])} messages")
    for name, values in hops.items():
        print(f"  {name:22s} p50 {statistics.median(values):6.0f} us")
    for side, counts in sent_by.items():
        print(f"  UDP sends a message, {side}: {statistics.mean(counts):.2f}")


if __name__ == "__main__":
    main()
