"""A seeded in-memory UDP network for trio's ``MockClock``: thousands of nodes, hours of
virtual time, no socket and no real sleep.

It replaces the node's one UDP socket, :class:`p2pd.transport.udp.UdpEndpoint`, at its
seam: :class:`FakeUdpEndpoint` has the same public surface (``local_address``, ``stats``,
``sendto``, ``serve``, the flush hooks, ``close``), so the same daemon code runs over it::

    with trio.fail_after(3600):                          # virtual seconds
        async with open_fake_network(seed=1, loss=0.01) as net, trio.open_nursery() as nursery:
            alice = net.add_host().bind(4000)
            bob = net.add_host(nat="eim").bind()
            await nursery.start(alice.serve, on_dht)     # on_dht(data, (ip, port))
            bob.sendto(b"\\x00ping", alice.local_address.as_tuple())
            ...
            nursery.cancel_scope.cancel()

Run it under ``trio.testing.MockClock(autojump_threshold=0)`` (pytest-trio's
``autojump_clock`` fixture): every delay is a deadline on that clock, so the clock jumps
from one delivery to the next. It works under the real clock too, in real time.

What it models:

- Latency. Each unordered pair of hosts has a fixed round-trip time drawn from a lognormal
  distribution (median ``median_rtt``, shape ``rtt_sigma``: the heavy tail of the
  Internet) and fixed by the seed and the two public addresses, so the same pair has the
  same RTT in every run and in both directions. The draw is quantised to 4096 levels of
  the distribution, so the tail stops at about 3.7 sigma. A datagram takes half the RTT
  plus its own jitter, exponential with mean ``jitter`` times that half; jitter reorders
  datagrams sent close together. A host's datagrams to itself take 50 microseconds.
- Loss and duplication: per-datagram probabilities (``loss``, ``duplicate``; both may be
  changed at any time). A duplicate is a second copy with its own jitter.
- NAT, one NAT per NATed host (RFC 4787 terms). ``"eim"``: endpoint-independent mapping,
  address-and-port-dependent filtering, like Linux ``masquerade``: one public port for
  every destination of a local port, and a datagram gets in only from an ``(ip, port)``
  the inside sent to. ``"edm"``: endpoint-dependent (symmetric) mapping: a new public
  port per destination, open only to that destination. Public ports are random (Linux
  would keep the local port when it can; a random one shows code that mixes the two up).
  A mapping, and each destination's permission in it, lasts ``nat_timeout`` seconds from
  the last datagram *out* (RFC 4787 REQ-6); inbound traffic does not refresh it. A NATed
  host's datagram to its own public address goes through its NAT like any other
  (hairpinning works).
- Churn and failures: :meth:`FakeHost.shutdown` (the host leaves; it may bind again
  later, as after a restart), :meth:`FakeHost.blackout` (its link is down for a while),
  :meth:`FakeNetwork.set_partition` (groups of hosts cannot reach each other).
- A socket receive buffer: datagrams that reach an endpoint that is bound but not served
  (between ``bind`` and ``serve``, or after ``serve`` was cancelled) wait, up to
  :data:`RECEIVE_QUEUE` of them, and are handed out when ``serve`` starts.

What it does not model: bandwidth and queueing (a datagram's delay does not depend on
the traffic), the MTU and fragmentation (any size passes whole), corruption, ICMP errors,
IPv6-specific behaviour, NATs shared by several hosts, NATs in series, and port
prediction or port preservation. Addresses are routed only by exact match on a host's
public IP (and on a NATed host's own private IP, from itself): a datagram to any other
address, 127.0.0.1 included, is dropped (``no_listener``).

Delivery. :meth:`FakeNetwork.run` is the one task that delivers: a heap of
``(due, seq, ...)`` entries, and one cancel scope whose deadline is the earliest due
time (``sendto`` moves it earlier; no task or timer per datagram, no polling). When the
deadline comes, it pops every datagram due, calls the destination endpoint's handler
synchronously (demultiplexed on the first byte exactly as ``UdpEndpoint.serve`` does),
then calls the flush hooks of each endpoint that received something in that pass: a
pass is an endpoint's burst. A handler or hook that raises is counted
(``handler_errors``, ``flush_errors``) and logged at debug level; delivery goes on.
At scale the time goes into trio's scheduling, about 25 microseconds per pass; with
``resolution`` > 0 passes happen only at multiples of it, so a datagram arrives up to
that much late (never early, still in order of due time) and dense traffic needs fewer
passes (``resolution=0.001`` makes 100,000 datagrams among 2,000 nodes 3-4 times faster).

Determinism. Each endpoint draws its loss and jitter from its own RNG, seeded by the
network's seed and its address, so what happens to a datagram depends only on the seed
and on what its endpoint sent before; each NAT has its own RNG for its ports too. The
same seed and the same sends give the same deliveries in the same order. (Which of
several tasks woken at one instant runs first is trio's choice, randomised on purpose:
where that changes the order in which an endpoint sends, runs differ.)

Counters in :attr:`FakeNetwork.stats`: ``sent`` and ``bytes_sent`` (datagrams handed to
``sendto`` of an open endpoint), ``duplicated`` (extra copies), and the fate of each
copy: ``delivered`` (to an endpoint's handler or receive queue), ``lost``,
``no_listener`` (no such address, or nothing bound on that port), ``nat_dropped``
(filtered by the destination's NAT, or no public port left in the sender's),
``partitioned``, ``blackout_dropped``, ``queue_dropped`` (receive queue full). Once
nothing is in flight, ``sent + duplicated`` equals the sum of those fates. Also
``handler_errors`` and ``flush_errors``. Each endpoint's ``stats`` counts as
``UdpEndpoint``'s does: ``datagrams_in``, ``dropped_unknown`` (first byte is neither
DHT nor QUIC), ``send_errors`` (``sendto`` on a closed endpoint), and ``handler_errors``,
``flush_errors``, ``queue_dropped``.

``sendto`` must be called from the trio thread that runs the network (it reads
``trio.current_time()``): the DHT's asyncio thread, which calls ``UdpEndpoint.sendto``
directly, has to hand its datagrams to trio first.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import logging
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from hashlib import blake2b
from statistics import NormalDist

import trio

from ..errors import LocalError, UsageError
from ..transport.punch import PUNCH_BYTE
from ..transport.udp import DatagramHandler, FlushHook
from ..wire import Address

__all__ = [
    "RECEIVE_QUEUE",
    "FakeHost",
    "FakeNetwork",
    "FakeUdpEndpoint",
    "open_fake_network",
]

log = logging.getLogger(__name__)

#: Where :meth:`FakeNetwork.add_host` finds addresses: RFC 2544's benchmarking range.
#: The n-th host gets ``198.18.0.0 + (n % 512) * 256 + n // 512 + 1``: the first 512 hosts
#: each have a /24 of their own, because Sybil defences count ids per /24.
AUTO_NETWORK = ipaddress.IPv4Network("198.18.0.0/15")
#: Private addresses of NATed hosts, one each.
PRIVATE_NETWORK = ipaddress.IPv4Network("10.0.0.0/8")
#: Ports ``bind(0)`` picks from (Linux's default ``ip_local_port_range``).
EPHEMERAL_PORTS = (32768, 60999)
#: Public ports a NAT picks from.
NAT_PORTS = (1024, 65535)
#: Datagrams an endpoint that is bound but not served holds (a ~1 MB socket buffer of
#: small datagrams); more are dropped.
RECEIVE_QUEUE = 256
#: One-way delay of a datagram from a host to itself, in seconds.
LOOPBACK_DELAY = 50e-6
#: Each pair's RTT is one of 2**RTT_LEVELS quantiles of the lognormal distribution.
RTT_LEVELS = 12

_MASK64 = (1 << 64) - 1
_SUBNETS = AUTO_NETWORK.num_addresses // 256

Source = tuple[str, int]


def _probability(name: str, value: float) -> float:
    if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise UsageError(f"{name} must be a probability in 0..1, not {value!r}")
    return float(value)


def _non_negative(name: str, value: float) -> float:
    if not isinstance(value, int | float) or not 0.0 <= value < math.inf:
        raise UsageError(f"{name} must be a finite number >= 0, not {value!r}")
    return float(value)


def _host_key(seed: int, ip: str) -> int:
    """64 bits fixed by the seed and the address, from which pair RTTs are derived."""
    return int.from_bytes(blake2b(f"{seed}/{ip}".encode(), digest_size=8).digest())


def _pair_level(key_a: int, key_b: int) -> int:
    """A symmetric, well-mixed function of two host keys: the index of the pair's RTT.
    (SplitMix64's finaliser; XOR alone would make the RTTs of a triangle dependent.)"""
    x = key_a ^ key_b
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x >> (64 - RTT_LEVELS)


class _Mapping:
    """One NAT mapping: a local port's public port, and who may send to it (remote
    ``(ip, port)`` -> time of the last datagram out to it)."""

    __slots__ = ("key", "last_out", "permits", "private_port", "public", "sweep_at")

    def __init__(self, key: object, private_port: int, public: Source, now: float) -> None:
        self.key = key
        self.private_port = private_port
        self.public = public
        self.last_out = now
        self.permits: dict[Source, float] = {}
        self.sweep_at = 16


class _Nat:
    """The NAT in front of one host (module docstring). Expired state is dropped lazily:
    when looked up, and in sweeps whose cost is amortised over the growth of the table."""

    def __init__(
        self, public_ip: str, *, endpoint_dependent: bool, timeout: float, seed: int
    ) -> None:
        self.public_ip = public_ip
        self.endpoint_dependent = endpoint_dependent
        self.timeout = timeout
        self._rng = random.Random(f"{seed}/nat/{public_ip}")
        #: local port (EIM) or (local port, remote) (EDM) -> mapping
        self._out: dict[object, _Mapping] = {}
        #: public port -> mapping
        self._in: dict[int, _Mapping] = {}
        self._sweep_at = 64

    def outbound(self, private_port: int, remote: Source, now: float) -> Source | None:
        """The public source of a datagram going out; None if no public port is free."""
        key: object = (private_port, remote) if self.endpoint_dependent else private_port
        mapping = self._out.get(key)
        if mapping is None or now - mapping.last_out >= self.timeout:
            if mapping is not None:
                self._forget(mapping)
            port = self._free_port(now)
            if port is None:
                return None
            mapping = _Mapping(key, private_port, (self.public_ip, port), now)
            self._out[key] = mapping
            self._in[port] = mapping
        mapping.last_out = now
        permits = mapping.permits
        permits[remote] = now
        if len(permits) > mapping.sweep_at:
            timeout = self.timeout
            for peer in [peer for peer, t in permits.items() if now - t >= timeout]:
                del permits[peer]
            mapping.sweep_at = max(16, 2 * len(permits))
        return mapping.public

    def inbound(self, public_port: int, remote: Source, now: float) -> int | None:
        """The local port a datagram from ``remote`` to ``public_port`` goes to, or None
        if the NAT drops it."""
        mapping = self._in.get(public_port)
        if mapping is None:
            return None
        sent = mapping.permits.get(remote)
        if sent is None or now - sent >= self.timeout:
            return None
        return mapping.private_port

    def _free_port(self, now: float) -> int | None:
        if len(self._out) > self._sweep_at:
            self._sweep(now)
        low, high = NAT_PORTS
        if len(self._in) > high - low:
            self._sweep(now)
            if len(self._in) > high - low:
                return None
        while True:
            port = self._rng.randint(low, high)
            mapping = self._in.get(port)
            if mapping is None:
                return port
            if now - mapping.last_out >= self.timeout:
                self._forget(mapping)
                return port

    def _forget(self, mapping: _Mapping) -> None:
        port = mapping.public[1]
        if self._in.get(port) is mapping:
            del self._in[port]
        if self._out.get(mapping.key) is mapping:
            del self._out[mapping.key]

    def _sweep(self, now: float) -> None:
        timeout = self.timeout
        for mapping in [m for m in self._out.values() if now - m.last_out >= timeout]:
            self._forget(mapping)
        self._sweep_at = max(64, 2 * len(self._out))


class FakeNetwork:
    """The network: hosts, and the task that delivers their datagrams.

    ``median_rtt`` (seconds) and ``rtt_sigma`` shape the lognormal distribution of the
    pairs' round-trip times; ``jitter`` is the mean extra one-way delay per datagram, as
    a fraction of the pair's one-way delay; ``loss`` and ``duplicate`` are per-datagram
    probabilities. ``nat_timeout``: seconds a NAT mapping lives without outbound use.
    ``resolution``: 0 delivers each datagram when it is due; more batches deliveries at
    multiples of that many seconds (module docstring). Out-of-range values raise
    :class:`~p2pd.errors.UsageError`.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        median_rtt: float = 0.050,
        rtt_sigma: float = 0.5,
        jitter: float = 0.1,
        loss: float = 0.0,
        duplicate: float = 0.0,
        nat_timeout: float = 120.0,
        resolution: float = 0.0,
    ) -> None:
        if not isinstance(median_rtt, int | float) or not 0.0 < median_rtt < math.inf:
            raise UsageError(f"median_rtt must be a positive number, not {median_rtt!r}")
        if not isinstance(nat_timeout, int | float) or not 0.0 < nat_timeout < math.inf:
            raise UsageError(f"nat_timeout must be a positive number, not {nat_timeout!r}")
        self.seed = seed
        self.median_rtt = float(median_rtt)
        self.rtt_sigma = _non_negative("rtt_sigma", rtt_sigma)
        self.jitter = _non_negative("jitter", jitter)
        self.loss = _probability("loss", loss)
        self.duplicate = _probability("duplicate", duplicate)
        self.nat_timeout = float(nat_timeout)
        self.resolution = _non_negative("resolution", resolution)
        self.stats: Counter[str] = Counter()
        # One-way delays, indexed by _pair_level: the midpoints of 4096 equal-probability
        # slices of lognormal(ln(median), sigma), halved.
        levels = 1 << RTT_LEVELS
        normal = NormalDist()
        self._one_way = [
            self.median_rtt / 2 * math.exp(self.rtt_sigma * normal.inv_cdf((i + 0.5) / levels))
            for i in range(levels)
        ]
        self._hosts: dict[str, FakeHost] = {}
        self._auto_count = 0
        self._private_count = 0
        #: (due, seq, source host, source address, destination host, destination NAT or
        #: None, destination port, data); seq keeps equal due times in send order.
        self._heap: list[
            tuple[float, int, FakeHost, Source, FakeHost, _Nat | None, int, bytes]
        ] = []
        self._seq = itertools.count()
        self._wait: trio.CancelScope | None = None
        self._running = False

    @property
    def hosts(self) -> list[FakeHost]:
        return list(self._hosts.values())

    @property
    def in_flight(self) -> int:
        """Datagram copies sent and not yet delivered or dropped."""
        return len(self._heap)

    def add_host(self, ip: str | None = None, *, nat: str | None = None) -> FakeHost:
        """A new host: public (``nat=None``) or behind its own NAT (``"eim"``, ``"edm"``).

        ``ip`` is its public address; by default the next free one in
        :data:`AUTO_NETWORK`, spread over the /24s. A NATed host also gets a private
        address in 10.0.0.0/8, which is what its endpoints bind.
        """
        if nat not in (None, "eim", "edm"):
            raise UsageError(f"nat must be None, 'eim' or 'edm', not {nat!r}")
        if ip is None:
            ip = self._next_auto_ip()
        else:
            ip = Address(ip, 0).host  # one spelling per address; InvalidAddress if not IP
            if ip in self._hosts:
                raise LocalError(f"{ip} is already a host on this network")
        private_ip = None
        nat_box = None
        if nat is not None:
            self._private_count += 1
            if self._private_count >= PRIVATE_NETWORK.num_addresses - 1:
                raise LocalError("no private address left in 10.0.0.0/8")
            private_ip = str(PRIVATE_NETWORK[self._private_count])
            nat_box = _Nat(
                ip,
                endpoint_dependent=nat == "edm",
                timeout=self.nat_timeout,
                seed=self.seed,
            )
        host = FakeHost(self, ip, private_ip, nat, nat_box)
        self._hosts[ip] = host
        return host

    def set_partition(self, *groups: Iterable[FakeHost]) -> None:
        """Split the network: hosts in different groups cannot reach each other (copies
        in flight across the cut are dropped on arrival, ``partitioned``). Hosts in no
        group form one more group. With no argument, the network is whole again."""
        for host in self._hosts.values():
            host._group = 0
        for number, group in enumerate(groups, start=1):
            for host in group:
                host._group = number

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver datagrams forever (module docstring). One task per network."""
        if self._running:
            raise trio.BusyResourceError("this FakeNetwork is already running")
        self._running = True
        heap = self._heap
        try:
            task_status.started()
            while True:
                # The scope's deadline is moved earlier by sendto while we wait; it is
                # replaced only when it expires, that is once per delivery pass.
                deadline = self._wake_time(heap[0][0]) if heap else math.inf
                with trio.CancelScope(deadline=deadline) as wait:
                    self._wait = wait
                    await trio.sleep_forever()
                self._wait = None
                self._deliver_due(trio.current_time())
        finally:
            self._wait = None
            self._running = False

    # ---- internals

    def _next_auto_ip(self) -> str:
        base = int(AUTO_NETWORK.network_address)
        while True:
            n = self._auto_count
            subnet, index = n % _SUBNETS, n // _SUBNETS + 1
            if index > 254:
                raise LocalError(f"no free address left in {AUTO_NETWORK}")
            self._auto_count += 1
            ip = str(ipaddress.IPv4Address(base + subnet * 256 + index))
            if ip not in self._hosts:
                return ip

    def _push(
        self,
        due: float,
        source_host: FakeHost,
        source: Source,
        host: FakeHost,
        nat: _Nat | None,
        port: int,
        data: bytes,
    ) -> None:
        heapq.heappush(
            self._heap, (due, next(self._seq), source_host, source, host, nat, port, data)
        )
        wait = self._wait
        if wait is not None and due < wait.deadline:
            wake = self._wake_time(due)
            if wake < wait.deadline:
                wait.deadline = wake

    def _wake_time(self, due: float) -> float:
        """When to deliver a datagram due at ``due``: then, or at the next multiple of
        the resolution (never earlier than due)."""
        step = self.resolution
        if not step:
            return due
        return max(math.ceil(due / step) * step, due)

    def _deliver_due(self, now: float) -> None:
        heap = self._heap
        stats = self.stats
        pop = heapq.heappop
        touched: dict[FakeUdpEndpoint, None] = {}  # insertion-ordered: deterministic
        delivered = 0
        while heap and heap[0][0] <= now:
            _, _, source_host, source, host, nat, port, data = pop(heap)
            if host._dark_until > now:
                stats["blackout_dropped"] += 1
                continue
            if host._group != source_host._group:
                stats["partitioned"] += 1
                continue
            if nat is not None:
                private_port = nat.inbound(port, source, now)
                if private_port is None:
                    stats["nat_dropped"] += 1
                    continue
                port = private_port
            endpoint = host._endpoints.get(port)
            if endpoint is None:
                stats["no_listener"] += 1
                continue
            if endpoint._on_dht is not None:
                endpoint._dispatch(data, source)
                touched[endpoint] = None
            elif not endpoint._enqueue(data, source):
                stats["queue_dropped"] += 1
                continue
            delivered += 1
        if delivered:
            stats["delivered"] += delivered
        for endpoint in touched:
            endpoint._flush()


class FakeHost:
    """A machine on a :class:`FakeNetwork` (made by :meth:`FakeNetwork.add_host`).

    ``ip`` is the address other hosts see and send to (the NAT's public address for a
    NATed host); ``private_ip`` is the address its endpoints bind behind a NAT, else None.
    """

    def __init__(
        self,
        network: FakeNetwork,
        ip: str,
        private_ip: str | None,
        nat: str | None,
        box: _Nat | None,
    ) -> None:
        self.network = network
        self.ip = ip
        self.private_ip = private_ip
        self.nat = nat
        self._nat = box
        self._key = _host_key(network.seed, ip)
        self._rng = random.Random(f"{network.seed}/host/{ip}")
        self._endpoints: dict[int, FakeUdpEndpoint] = {}
        self._dark_until = -math.inf
        self._group = 0

    def __repr__(self) -> str:
        behind = f" behind {self.nat} NAT as {self.private_ip}" if self.nat else ""
        return f"<FakeHost {self.ip}{behind}>"

    @property
    def endpoints(self) -> list[FakeUdpEndpoint]:
        """The open endpoints, in the order they were bound."""
        return list(self._endpoints.values())

    def bind(self, port: int = 0) -> FakeUdpEndpoint:
        """A UDP endpoint on ``port`` of this host (0: a free ephemeral port). Raises
        :class:`~p2pd.errors.LocalError` if the port is taken, like ``UdpEndpoint.bind``."""
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise UsageError(f"port out of range: {port!r}")
        local_ip = self.private_ip or self.ip
        if port == 0:
            low, high = EPHEMERAL_PORTS
            if len(self._endpoints) > high - low:
                raise LocalError(f"cannot listen on {local_ip}: no free port")
            port = self._rng.randint(low, high)
            while port in self._endpoints:
                port = self._rng.randint(low, high)
        elif port in self._endpoints:
            raise LocalError(f"cannot listen on {local_ip}:{port}: the port is in use")
        endpoint = FakeUdpEndpoint(self, port)
        self._endpoints[port] = endpoint
        return endpoint

    def shutdown(self) -> None:
        """The host leaves: every endpoint closes, and datagrams to it are dropped
        (``no_listener``). Its NAT keeps its mappings until they expire; the host may
        bind again later, like a machine that restarts."""
        for endpoint in list(self._endpoints.values()):
            endpoint.close()

    def blackout(self, duration: float) -> None:
        """Take the host's link down for ``duration`` seconds from now: what it sends,
        and what arrives for it, is dropped (``blackout_dropped``). 0 ends a blackout."""
        duration = _non_negative("duration", duration)
        self._dark_until = trio.current_time() + duration if duration else -math.inf


class FakeUdpEndpoint:
    """One bound UDP port on a :class:`FakeHost`; the surface of ``UdpEndpoint``.

    Differences from a real socket: closing it does not wake a running :meth:`serve`
    (which just receives nothing more), so a host that shuts down is, to its own code,
    like a machine whose cable was pulled.
    """

    def __init__(self, host: FakeHost, port: int) -> None:
        network = host.network
        self.host = host
        self.stats: Counter[str] = Counter()
        self.local_address = Address(host.private_ip or host.ip, port)
        self._network = network
        self._port = port
        #: What a receiver sees as the source, when no NAT is in the way.
        self._source: Source = (self.local_address.host, port)
        self._rng = random.Random(f"{network.seed}/endpoint/{host.ip}/{port}")
        self._on_dht: DatagramHandler | None = None
        self._on_quic: DatagramHandler | None = None
        self._on_relay: DatagramHandler | None = None
        self._on_punch: DatagramHandler | None = None
        self._flush_hooks: list[FlushHook] = []
        self._queue: list[tuple[bytes, Source]] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"<FakeUdpEndpoint {self.local_address} on {self.host!r}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send one datagram; it arrives after the path's delay, or not at all. Never
        blocks, never raises for a network reason; on a closed endpoint it counts
        ``send_errors`` (a real socket's EBADF) and sends nothing."""
        if self._closed:
            self.stats["send_errors"] += 1
            return
        network = self._network
        stats = network.stats
        host = self.host
        now = trio.current_time()
        stats["sent"] += 1
        stats["bytes_sent"] += len(data)
        if host._dark_until > now:
            stats["blackout_dropped"] += 1
            return
        ip, port = addr[0], addr[1]
        target = network._hosts.get(ip)
        nat = host._nat
        if target is None and ip == host.private_ip:  # to itself, inside its NAT
            target, source, target_nat, one_way = host, self._source, None, LOOPBACK_DELAY
        elif target is None:
            stats["no_listener"] += 1
            return
        else:
            if nat is None:
                source = self._source
            else:
                public = nat.outbound(self._port, (ip, port), now)
                if public is None:
                    stats["nat_dropped"] += 1
                    return
                source = public
            target_nat = target._nat
            if target is host:
                one_way = LOOPBACK_DELAY
            else:
                one_way = network._one_way[_pair_level(host._key, target._key)]
        rng = self._rng
        loss = network.loss
        if loss and rng.random() < loss:
            stats["lost"] += 1
            return
        jitter = network.jitter * one_way
        delay = one_way + rng.expovariate(1.0) * jitter if jitter else one_way
        network._push(now + delay, host, source, target, target_nat, port, data)
        duplicate = network.duplicate
        if duplicate and rng.random() < duplicate:
            stats["duplicated"] += 1
            delay = one_way + rng.expovariate(1.0) * jitter if jitter else one_way
            network._push(now + delay, host, source, target, target_nat, port, data)

    def send_many(self, datagrams: list[bytes], addr: tuple[str, int]) -> None:
        """``UdpEndpoint.send_many``: each datagram as :meth:`sendto` would, in order (no
        segmentation offload to model: each copy meets its own loss and delay)."""
        for data in datagrams:
            self.sendto(data, addr)

    def close(self) -> None:
        """Unbind: datagrams to this port are dropped (``no_listener``), ``sendto``
        counts ``send_errors``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.host._endpoints.get(self._port) is self:
            del self.host._endpoints[self._port]
        self._queue.clear()
        self._on_dht = self._on_quic = self._on_relay = self._on_punch = None

    def add_flush_hook(self, hook: FlushHook) -> None:
        """Have ``hook()`` called after each delivery pass that handed this endpoint
        something (its burst). It runs in the network's task and must not raise."""
        self._flush_hooks.append(hook)

    def remove_flush_hook(self, hook: FlushHook) -> None:
        if hook in self._flush_hooks:
            self._flush_hooks.remove(hook)

    async def serve(
        self,
        on_dht: DatagramHandler,
        on_quic: DatagramHandler | None = None,
        on_relay: DatagramHandler | None = None,
        on_punch: DatagramHandler | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hand each datagram to its protocol by its first byte, until cancelled.

        The handlers are called by the network's task, not this one; this task only
        registers them, hands out what queued before it started, and waits.
        """
        if self._closed:
            raise trio.ClosedResourceError("this endpoint is closed")
        if self._on_dht is not None:
            raise trio.BusyResourceError("another task already serves this endpoint")
        self._on_dht, self._on_quic, self._on_relay = on_dht, on_quic, on_relay
        self._on_punch = on_punch
        try:
            task_status.started()
            if self._queue:
                queued, self._queue = self._queue, []
                for data, source in queued:
                    self._dispatch(data, source)
                self._flush()
            await trio.sleep_forever()
        finally:
            self._on_dht = self._on_quic = self._on_relay = self._on_punch = None

    # ---- internals, called by the network's task

    def _dispatch(self, data: bytes, source: Source) -> None:
        """As UdpEndpoint.serve: 0x00..0x03 to the DHT, the QUIC fixed bit to QUIC,
        0x04..0x3e to the relay (p2pd/relay/), 0x3f to hole punching."""
        self.stats["datagrams_in"] += 1
        first = data[0] if data else 0x80  # an empty datagram: neither
        if first & 0x40:
            handler = self._on_quic
        elif first <= 0x03:
            handler = self._on_dht
        elif first <= 0x3E:
            handler = self._on_relay
        elif first == PUNCH_BYTE:
            handler = self._on_punch
        else:
            handler = None
        if handler is None:
            self.stats["dropped_unknown"] += 1
            return
        try:
            handler(data, source)
        except Exception:
            self.stats["handler_errors"] += 1
            self._network.stats["handler_errors"] += 1
            log.debug("handler of %r raised on a datagram from %s", self, source, exc_info=True)

    def _enqueue(self, data: bytes, source: Source) -> bool:
        """Hold a datagram until serve starts; False if the queue is full."""
        if len(self._queue) >= RECEIVE_QUEUE:
            self.stats["queue_dropped"] += 1
            return False
        self._queue.append((data, source))
        return True

    def _flush(self) -> None:
        for hook in list(self._flush_hooks):
            try:
                hook()
            except Exception:
                self.stats["flush_errors"] += 1
                self._network.stats["flush_errors"] += 1
                log.debug("flush hook of %r raised", self, exc_info=True)


@asynccontextmanager
async def open_fake_network(
    *,
    seed: int = 0,
    median_rtt: float = 0.050,
    rtt_sigma: float = 0.5,
    jitter: float = 0.1,
    loss: float = 0.0,
    duplicate: float = 0.0,
    nat_timeout: float = 120.0,
    resolution: float = 0.0,
) -> AsyncIterator[FakeNetwork]:
    """A :class:`FakeNetwork` whose delivery task runs for the duration of the block."""
    network = FakeNetwork(
        seed=seed,
        median_rtt=median_rtt,
        rtt_sigma=rtt_sigma,
        jitter=jitter,
        loss=loss,
        duplicate=duplicate,
        nat_timeout=nat_timeout,
        resolution=resolution,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        yield network
        nursery.cancel_scope.cancel()
