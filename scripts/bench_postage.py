"""What mailbox postage costs (p2pd/dht/mailbox_entry.py): an honest put, a flood.

Prints, for a few difficulties, the time to stamp one entry (mean, p50, p99 over N
stamps of fresh entries), the time to check one, and what a flood of 256 junk puts to
one mailbox (its default per-address quota, and about half its 500-entry cap) costs the
sender at that difficulty. The baseline is 0 bits (no postage: a put costs a hash).
Then what a contact's put with the recipient's pass costs instead
(p2pd/dht/mailbox_pass.py): the sender's signature, the storing node's check with the
certificate cached and not. Last, how late a trio task that wakes every millisecond is
while stamps at the default difficulty run in a worker thread (as the daemon runs
them), against the same task idle.

    .venv/bin/python scripts/bench_postage.py [--stamps 40] [--bits 0,14,16,18,20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import trio

from p2pd.config import DHTConfig
from p2pd.dht import mailbox_entry
from p2pd.dht.mailbox import mailbox_key
from p2pd.dht.mailbox_pass import PassChecker, issue_pass, wrap
from p2pd.identity import Identity


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
    passes(args.stamps, sealed)
    for label, n in (("idle", 0), (f"{args.stamps} stamps in a thread", args.stamps)):
        p50, p99, worst = trio.run(lateness, n, default)
        print(f"trio 1 ms sleep overshoot, {label}: p50 {p50:.2f} p99 {p99:.2f} max {worst:.2f} ms")


def passes(count: int, sealed: bytes) -> None:
    """A contact's put: wrap (stamp at 0 bits + one signature) and check, in µs."""
    owner = Identity.generate("owner")
    key = mailbox_key(owner.public_key)
    held = issue_pass(owner.public_key, owner.sign, time.time())
    puts, start = [], time.perf_counter()
    for _ in range(count):
        puts.append(wrap(held, key, mailbox_entry.stamp(key, sealed, time.time(), 0)))
    make = (time.perf_counter() - start) / count
    timings = {}
    for label, cache in (("certificate not cached", False), ("certificate cached", True)):
        checker = PassChecker(mailbox_key)
        start = time.perf_counter()
        for put in puts:
            if not cache:
                checker = PassChecker(mailbox_key)
            entry, why = checker.check(key, put, time.time())
            assert entry is not None, why
        timings[label] = (time.perf_counter() - start) / count
    print(
        f"contact put with a pass: make {make * 1e6:.0f} us (no postage); check "
        + ", ".join(f"{v * 1e6:.0f} us ({k})" for k, v in timings.items())
    )


async def lateness(stamps: int, bits: int) -> tuple[float, float, float]:
    """(p50, p99, max) ms by which 1 ms sleeps overshoot while ``stamps`` stamps run in
    a worker thread one after another (``stamps`` 0: idle)."""
    late: list[float] = []
    sealed = os.urandom(512 - mailbox_entry.HEADER_LEN)

    async def ticker(done: trio.Event) -> None:
        while not done.is_set():
            start = trio.current_time()
            await trio.sleep(0.001)
            late.append((trio.current_time() - start - 0.001) * 1e3)

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker, done)
        if stamps:
            for _ in range(stamps):
                key = os.urandom(20)
                await trio.to_thread.run_sync(mailbox_entry.stamp, key, sealed, time.time(), bits)
        else:
            await trio.sleep(2)
        done.set()
    late.sort()
    return late[len(late) // 2], late[int(len(late) * 0.99)], late[-1]


if __name__ == "__main__":
    main()
