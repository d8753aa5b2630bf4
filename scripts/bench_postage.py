"""What mailbox postage costs (p2pd/dht/mailbox_entry.py): an honest put, a flood.

Prints, for a few difficulties, the time to stamp one entry (mean, p50, p99 over N
stamps of fresh entries), the time to check one, and what a flood of 256 junk puts to
one mailbox (its default per-address quota, and about half its 500-entry cap) costs the
sender at that difficulty. The baseline is 0 bits (no postage: a put costs a hash).

    .venv/bin/python scripts/bench_postage.py [--stamps 40] [--bits 0,14,16,18,20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from p2pd.config import DHTConfig
from p2pd.dht import mailbox_entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stamps", type=int, default=40)
    parser.add_argument("--bits", default="0,14,16,18,20")
    args = parser.parse_args()
    default = DHTConfig().postage_bits
    sealed = os.urandom(512 - mailbox_entry.HEADER_LEN)
    print(f"default postage_bits = {default}; {args.stamps} stamps per row, 512-byte entries")
    heads = ("bits", "mean ms", "p50 ms", "p99 ms", "check us", "256 puts s")
    print(" ".join(f"{h:>{w}}" for h, w in zip(heads, (4, 8, 8, 8, 9, 11), strict=True)))
    for bits in (int(b) for b in args.bits.split(",")):
        times = []
        entries = []
        for _ in range(args.stamps):
            key = os.urandom(20)
            start = time.perf_counter()
            entries.append((key, mailbox_entry.stamp(key, sealed, time.time(), bits)))
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for key, entry in entries:
            assert mailbox_entry.check(key, entry, time.time(), bits) is None
        check = (time.perf_counter() - start) / len(entries)
        times.sort()
        mean = statistics.fmean(times)
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        mark = " <- default" if bits == default else ""
        print(
            f"{bits:>4} {mean * 1e3:>8.1f} {times[len(times) // 2] * 1e3:>8.1f} "
            f"{p99 * 1e3:>8.1f} {check * 1e6:>9.1f} {256 * mean:>11.1f}{mark}"
        )


if __name__ == "__main__":
    main()
