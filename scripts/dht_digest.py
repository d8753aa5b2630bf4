#!/usr/bin/env python3
"""A digest of every datagram the DHT delivers in a seeded run, and its CPU: a change
meant to be pure performance (same events for the same seed) must print the same
digests before and after, and less CPU.

Two runs, both in virtual time:

- sans-I/O: tests/test_dht_core.py's ``small_network`` (``CoreNet``) of ``--nodes``
  cores at k = ``--k`` (each joining through the first), then ten node lookups of
  k and ten of 4k (a store's, with probes). The digest covers each delivery's time,
  source, destination core and bytes (the cores' keys and message ids are seeded);
- trio: a FakeNetwork swarm (seed 5, 1 % loss, k = 8) of ``--swarm`` nodes with six
  handles published. Record signatures are not seeded, so the digest covers each
  delivery's time, source, destination and length.

    scripts/dht_digest.py --nodes 200      # then again on the other commit
    scripts/dht_digest.py --nodes 0 --swarm 60

(branch swarmcpu, docs/BENCHMARKS.md "The DHT swarm tests' CPU, per datagram": 200
cores 04c94ba42d032e9c, 30,188 datagrams; with the lookups f85b92584611df0d; the
60-node swarm e9e8419178653808, 5,796 datagrams. Since the pool of eight size samples,
53c86dd, which changes what the lookups set aside: the lookups eaf7d02593b0a526, 34,335
datagrams; the build the same.)"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from p2pd.config import DHTConfig
from p2pd.dht.core import DHTCore
from p2pd.testing.fakenet import FakeNetwork
from p2pd.testing.swarm import open_swarm


def record_deliveries(with_bytes: bool) -> tuple[Any, list[int]]:
    """Hash what ``DHTCore.datagram_received`` is given from now on (each run once, in
    its own process: the class stays patched)."""
    digest = hashlib.sha256()
    count = [0]
    received = DHTCore.datagram_received

    def recorded(self: DHTCore, data: bytes, addr: Any, now: float) -> None:
        digest.update(repr((round(now, 9), tuple(addr), self.node_id, len(data))).encode())
        if with_bytes:
            digest.update(data)
        count[0] += 1
        received(self, data, addr, now)

    DHTCore.datagram_received = recorded  # type: ignore[method-assign]
    return digest, count


def sans_io(nodes: int, k: int) -> None:
    from test_dht_core import small_network

    digest, count = record_deliveries(with_bytes=True)
    started = time.process_time()
    net, cores = small_network(nodes, DHTConfig(ksize=k))
    built = time.process_time() - started
    print(
        f"{nodes} cores: build {built:.2f} s of CPU,",
        f"{count[0]} datagrams, {digest.hexdigest()[:16]}",
    )
    started = time.process_time()
    for i in range(0, nodes, max(1, nodes // 10)):
        core, target = cores[i], cores[(7 * i + 3) % nodes].node_id
        net.call(lambda done, c=core, t=target: c.start_lookup(t, net.now, done))
        net.call(lambda done, c=core, t=target: c.start_lookup(t[::-1], net.now, done, k=4 * k))
    spent = time.process_time() - started
    print(f"  + 20 lookups: {spent:.2f} s of CPU, {count[0]} datagrams, {digest.hexdigest()[:16]}")


def swarm(nodes: int) -> None:
    digest, count = record_deliveries(with_bytes=False)

    async def run() -> None:
        net = FakeNetwork(seed=5, median_rtt=0.05, loss=0.01)
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            async with open_swarm(nodes, network=net, seed=5, config=DHTConfig(ksize=8)) as s:
                for i in range(0, nodes, 10):
                    await s.publish(i)
            nursery.cancel_scope.cancel()

    started = time.process_time()
    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    spent = time.process_time() - started
    print(
        f"trio swarm of {nodes}: {spent:.2f} s of CPU,",
        f"{count[0]} datagrams, {digest.hexdigest()[:16]}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200, help="sans-I/O cores (0: none)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--swarm", type=int, default=0, help="trio swarm nodes (0: none)")
    args = parser.parse_args()
    if args.nodes and args.swarm:
        parser.error("one of --nodes and --swarm per run (the other 0)")
    if args.nodes:
        sans_io(args.nodes, args.k)
    if args.swarm:
        swarm(args.swarm)


if __name__ == "__main__":
    main()
