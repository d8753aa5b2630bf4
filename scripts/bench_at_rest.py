#!/usr/bin/env python3
"""What encryption at rest (p2pd/at_rest.py) costs per message, sans I/O.

alice and bob, each on a SQLite file in WAL mode as the daemon opens it, do what the
daemon does for one message and its reply: queue it (MessageStore), encrypt it (a ratchet
step, stored), keep its envelope; bob decrypts it (a ratchet step, stored) and stores it;
bob replies in the same session and alice decrypts. CPU time per message pair (fsync
waits are not in it), in the clear (the baseline) and with both databases encrypted at
rest, in the same run, alternating rounds so that machine noise hits both alike. Also
the one-off migration of a clear database of that size.

    .venv/bin/python scripts/bench_at_rest.py               # 2,000 messages, 5 rounds
    .venv/bin/python scripts/bench_at_rest.py --messages 500 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from p2pd.at_rest import open_at_rest
from p2pd.identity import Identity
from p2pd.messaging import MessageStore
from p2pd.session import SessionManager
from p2pd.store import open_database

NOW = 1_700_000_000.0


def converse(root: Path, key: bytes | None, messages: int) -> tuple[float, Path]:
    """CPU seconds per message pair; the path of alice's database. Each database is opened
    as the daemon opens it (open_database, then open_at_rest with the storage key)."""
    alice_id, bob_id = Identity.generate("alice"), Identity.generate("bob")
    alice_conn, bob_conn = open_database(root / "a.db"), open_database(root / "b.db")
    alice_rest, bob_rest = open_at_rest(alice_conn, key), open_at_rest(bob_conn, key)
    alice = SessionManager.open(alice_conn, alice_id, now=NOW, at_rest=alice_rest)
    bob = SessionManager.open(bob_conn, bob_id, now=NOW, at_rest=bob_rest)
    alice_store = MessageStore(alice_conn, at_rest=alice_rest)
    bob_store = MessageStore(bob_conn, at_rest=bob_rest)
    text = "x" * 200
    started = time.process_time()  # CPU time: other work on a shared machine is not ours
    for i in range(messages):
        (queued,) = alice_store.enqueue_many("bob", bob_id.public_key, [text], NOW + i)
        envelope = alice.encrypt(
            bob_id.public_key, text.encode(), now=NOW + i, peer_bundle=bob.prekey_bundle()
        )
        alice_store.set_envelope(queued.id, envelope)
        peer, _ = bob.decrypt(envelope, now=NOW + i, commit=False)
        bob_store.record_incoming(
            queued.id, "alice", peer, queued.seq, text, int(NOW * 1000), NOW + i, via="direct"
        )
        reply = bob.encrypt(alice_id.public_key, b"ok", now=NOW + i)
        alice.decrypt(reply, now=NOW + i)
    elapsed = time.process_time() - started
    alice_conn.close()
    bob_conn.close()
    return elapsed / messages, root / "a.db"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    clear: list[float] = []
    sealed: list[float] = []
    migration: list[float] = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            per, db = converse(Path(tmp), None, args.messages)
            clear.append(per)
            conn = open_database(db)
            started = time.perf_counter()
            open_at_rest(conn, os.urandom(32))
            migration.append(time.perf_counter() - started)
            conn.close()
        with tempfile.TemporaryDirectory() as tmp:
            sealed.append(converse(Path(tmp), os.urandom(32), args.messages)[0])
    c, s = statistics.median(clear), statistics.median(sealed)
    print(f"{args.messages} message pairs x {args.rounds} rounds (medians)")
    print(f"  clear (baseline):   {c * 1e6:8.0f} us CPU per message pair")
    change = (s / c - 1) * 100
    print(f"  encrypted at rest:  {s * 1e6:8.0f} us CPU per message pair  ({change:+.1f}%)")
    print(f"  migrating alice's clear database of {args.messages} messages: "
          f"{statistics.median(migration) * 1000:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
