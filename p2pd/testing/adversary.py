"""Hostile DHT nodes for tests and benchmarks: they speak the real wire protocol, on
real loopback sockets or on a :class:`~p2pd.testing.fakenet.FakeNetwork`.

A hostile node is a :class:`HostileCore`, a :class:`~p2pd.dht.core.DHTCore` with a real
node key of its own: it answers proving pings and signs its replies like any node, so it
earns its place in honest routing tables the honest way. It is driven by the daemon's own
trio driver (:class:`~p2pd.dht.driver.DHT`). Its ``_on_request`` lies for some requests
and defers to the honest one for the rest. The hostile nodes of one attack share a
:class:`Coalition`: their contacts, the rival and stale records they serve, and the
behaviours switched on (which may change while the nodes run: a benchmark lets them
behave until the handles are registered, then attacks).

The behaviours (:class:`Behaviour`, combine them with ``|``):

- ``FABRICATE``: many ids on one address. It is a *placement*, chosen when the nodes
  start (:func:`open_coalition` with ``ip=``): one IP (e.g. 127.66.0.1), one port and one
  node key per id. A single socket cannot prove several ids: a request does not name the
  id it is meant for, so the socket cannot know which key to sign with, and a proof
  signed by another key than the contact's is refused. One socket is one id.
- ``ECLIPSE``: every find_node and find_value is answered with coalition contacts only,
  the ones nearest the target, and no value.
- ``LIAR``: find_value for a targeted key is answered with the coalition's rival record
  (a validly signed claim by an attacker's key for that handle, with ``seen`` 1, the
  earliest time there is) or, if it holds one, a stale (rolled back) record of the owner.
- ``BLACKHOLE``: store and mailbox_put are answered True and nothing is kept; find_value
  never carries a value.
- ``SQUATTER``: :meth:`Coalition.squat` publishes the rival claims through the hostile
  nodes, e.g. before an owner claims a handle, or while the owner is offline.
- ``SPOOF``: :meth:`Coalition.spoof` sends requests with a forged source address (e.g. an
  honest node's, with the attacker's node key, to get the attacker's id into tables):
  on real sockets with a raw IPv4 socket (``IP_HDRINCL``; root only, see
  :func:`can_spoof`), on a FakeNetwork by handing the datagram to the network with the
  forged source.

Placement: random node keys by default; ``near=`` grinds keys whose ids share ``bits``
leading bits with a target key (an attacker who targets one handle): see
:func:`grind_node_key`. ``keys=`` places members exactly: :func:`depth_fill_keys` grinds
ids for each depth of one chosen resolver's routing table (``seeds=`` its address), the
attack on that resolver's size estimate (docs/SECURITY.md, "A resolver's table filled
depth by depth").

Every loop here is bounded; real sockets are bound on 127.0.0.0/8 only::

    async with open_swarm(15) as swarm, open_coalition(
        swarm, 20, Behaviour.FABRICATE | Behaviour.LIAR, ip="127.66.0.1", near=dht_key("alice")
    ) as coalition:
        coalition.add_rival("alice", swarm.wall())
        ...
"""

from __future__ import annotations

import enum
import ipaddress
import os
import random
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import wire
from ..config import DHTConfig
from ..dht.core import DHTCore
from ..dht.driver import DHT
from ..dht.mailbox import MailboxStorage
from ..dht.nodekey import NodeKey
from ..dht.routing import Node
from ..dht.storage import RecordStorage
from ..identity import Identity
from ..records import MAX_LIFETIME, HandleRecord, dht_key
from ..transport.udp import UdpEndpoint
from ..wire import Address
from .fakenet import FakeHost, FakeUdpEndpoint
from .swarm import FAKE_PORT, Swarm, run_node

#: The address fabricated ids share by default (one IP, many ports).
FABRICATE_IP = "127.66.0.1"
#: The ``seen`` a liar states: the earliest first-seen time there is.
EARLY_SEEN = 1
#: grind_node_key tries at most this many keys per bit asked for (2^bits on average).
GRIND_TRIES_FACTOR = 64


class Behaviour(enum.Flag):
    """What the hostile nodes of a coalition do (module docstring)."""

    HONEST = 0
    FABRICATE = enum.auto()
    ECLIPSE = enum.auto()
    LIAR = enum.auto()
    BLACKHOLE = enum.auto()
    SQUATTER = enum.auto()
    SPOOF = enum.auto()


ALL = (
    Behaviour.FABRICATE
    | Behaviour.ECLIPSE
    | Behaviour.LIAR
    | Behaviour.BLACKHOLE
    | Behaviour.SQUATTER
    | Behaviour.SPOOF
)


def hostile_address(index: int) -> Address:
    """``127.200+.x.1``: a loopback /24 of its own for hostile node ``index`` (spread
    placement), apart from the swarm's honest nodes (127.1-127.199 for up to 50,000)."""
    index %= 50 * 256
    return Address(f"127.{200 + index // 256}.{index % 256}.1", 0)


def shared_bits(a: bytes, b: bytes) -> int:
    """How many leading bits two ids share."""
    x = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return len(a) * 8 - x.bit_length()


def grind_node_key(target: bytes, bits: int, rng: random.Random | None = None) -> NodeKey:
    """A node key whose id shares ``bits`` leading bits with ``target``: about 2^bits
    keys to try (60 µs each), at most ``GRIND_TRIES_FACTOR * 2^bits``. Raises
    RuntimeError if none turned up (probability about e^-64)."""
    seed = (rng or random.Random()).randbytes
    for _ in range(GRIND_TRIES_FACTOR << bits):
        key = NodeKey.from_seed(seed(32))
        if shared_bits(key.node_id, target) >= bits:
            return key
    raise RuntimeError(f"no node id sharing {bits} bits with the target turned up")


def grind_depth_key(own: bytes, depth: int, rng: random.Random | None = None) -> NodeKey:
    """A node key whose id shares exactly ``depth`` leading bits with ``own``: it lands in
    the bucket at that depth of ``own``'s routing table. About 2^(depth + 1) keys to try,
    at most ``GRIND_TRIES_FACTOR * 2^(depth + 1)``; RuntimeError if none turned up."""
    seed = (rng or random.Random()).randbytes
    for _ in range(GRIND_TRIES_FACTOR << (depth + 1)):
        key = NodeKey.from_seed(seed(32))
        if shared_bits(key.node_id, own) == depth:
            return key
    raise RuntimeError(f"no node id sharing exactly {depth} bits with the target turned up")


def first_thin_depth(n: int, k: int) -> int:
    """The first depth of a routing table in a network of ``n`` at which fewer than ``k``
    nodes are expected (n / 2^(depth + 1) < k): where the table's depth bound
    (p2pd/dht/density.py ``depth_bound``) is taken, and where a depth-filling attacker
    starts."""
    depth = 0
    while n / 2 ** (depth + 1) >= k and depth < 159:
        depth += 1
    return depth


def depth_fill_keys(
    resolver: bytes, depths: list[int], per_depth: int, rng: random.Random | None = None
) -> list[NodeKey]:
    """``per_depth`` node keys for each depth of ``resolver``'s table in ``depths``: ids
    that, once they contacted the resolver, fill those buckets with k contacts each.
    The depth bound on its size estimate doubles with every depth filled past the first
    thin one, and its own neighbourhood (the k nearest, now ids at the deepest depth
    filled) is 2^depth times denser than the network (docs/SECURITY.md). The cost is
    2^(depth + 1) keys of 60 µs per id, and one /24 per 3 ids per bucket."""
    rng = rng or random.Random()
    return [grind_depth_key(resolver, d, rng) for d in depths for _ in range(per_depth)]


@dataclass
class HostileNode:
    node_key: NodeKey
    endpoint: UdpEndpoint | FakeUdpEndpoint
    dht: DHT
    address: Address
    stack: AsyncExitStack
    host: FakeHost | None = None

    @property
    def node_id(self) -> bytes:
        return self.node_key.node_id

    @property
    def contact(self) -> wire.Contact:
        return wire.Contact(self.node_key.public_key, self.address)


@dataclass
class Coalition:
    """What the hostile nodes of one attack share."""

    behaviours: Behaviour = Behaviour.HONEST
    members: list[HostileNode] = field(default_factory=list)
    #: DHT key -> the rival claim the liars serve and the squatters publish.
    rivals: dict[bytes, bytes] = field(default_factory=dict)
    #: DHT key -> an old record of the owner the liars serve when they hold no rival.
    stale: dict[bytes, bytes] = field(default_factory=dict)
    #: handle -> the attacker's identity that signs its rival claim.
    attackers: dict[str, Identity] = field(default_factory=dict)
    #: The nursery, network and clock the nodes run in (set by open_coalition).
    swarm: Swarm | None = None
    #: Requests spoofed so far (by Coalition.spoof).
    spoofed: int = 0

    def has(self, behaviour: Behaviour) -> bool:
        return bool(self.behaviours & behaviour)

    def lies_told(self, method: str = "find_value") -> int:
        """How many ``method`` requests the members answered with a lie so far."""
        return sum(
            m.dht.core.lies.get(method, 0)
            for m in self.members
            if isinstance(m.dht.core, HostileCore)
        )

    @property
    def ids(self) -> set[bytes]:
        return {m.node_id for m in self.members}

    def add_rival(self, handle: str, wall: float, *, attacker: Identity | None = None) -> bytes:
        """A validly signed claim of ``handle`` by an attacker's key, issued a week ago
        (an "earlier" self-asserted time), served from now on; returns the attacker's key."""
        identity = attacker or self.attackers.get(handle) or Identity.generate(handle)
        self.attackers[handle] = identity
        addresses = [m.address for m in self.members[:1] if m.address.port]
        record = HandleRecord.create(
            identity,
            addresses,
            seq=1,
            now=max(0, int(wall) - MAX_LIFETIME + 3600),
            lifetime=MAX_LIFETIME,
        )
        self.rivals[record.key] = record.encode()
        return identity.public_key

    def add_stale(self, record: HandleRecord) -> None:
        """Serve this (older) record of the owner: a rollback attempt."""
        self.stale[record.key] = record.encode()

    def contacts_near(self, key: bytes, count: int, exclude: bytes = b"") -> list[list[Any]]:
        """The ``count`` coalition contacts nearest ``key``, encoded for a reply."""
        target = int.from_bytes(key, "big")
        members = sorted(
            (m for m in self.members if m.node_id != exclude),
            key=lambda m: int.from_bytes(m.node_id, "big") ^ target,
        )
        return wire.encode_contacts([m.contact for m in members[:count]])

    async def squat(self, handles: list[str], wall: float) -> int:
        """SQUATTER: publish a rival claim for each handle through the hostile nodes
        (one member per handle, in turn); returns how many replicas accepted them."""
        if not self.members:
            return 0
        accepted = 0
        for i, handle in enumerate(handles):
            if dht_key(handle) not in self.rivals:
                self.add_rival(handle, wall)
            rival = HandleRecord.decode(self.rivals[dht_key(handle)])
            accepted += await self.members[i % len(self.members)].dht.publish(rival)
        return accepted

    def spoof(
        self, member: HostileNode, source: Address, to: Address, method: str = "ping"
    ) -> None:
        """SPOOF: send ``to`` a request by ``member``'s node key that seems to come from
        ``source`` (an honest node's address, say). ``find_node`` asks for ``member``'s
        own id; ``ping`` takes no argument."""
        args: list[Any] = [member.node_key.public_key]
        if method == "find_node":
            args.append(member.node_id)
        frame = wire.encode_request(os.urandom(wire.MSG_ID_LEN), method, args, False)
        self.spoofed += 1
        if isinstance(member.endpoint, FakeUdpEndpoint):
            send_spoofed_fake(member.endpoint, frame, source, to)
        else:
            send_spoofed_udp(frame, source, to)


class HostileCore(DHTCore):
    """A DHT node that lies as its coalition's behaviours say, and is honest otherwise."""

    def __init__(self, *args: Any, coalition: Coalition, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.coalition = coalition
        self.lies: dict[str, int] = {}

    def _on_request(self, req: wire.DHTRequest, address: tuple[str, int], now: float) -> None:
        result = self._lie(req)
        if result is None:
            super()._on_request(req, address, now)
            return
        self.lies[req.method] = self.lies.get(req.method, 0) + 1
        if req.sender_id == self.node_id:
            return
        # The honest core's bookkeeping of the sender (a hostile node keeps a working
        # table: it is the easier to find).
        sender = Node(req.sender_id, address[0], address[1], req.sender_key)
        cookie = self.note_sender(sender, now)
        sign = self.node_key.sign if req.prove else None
        self._send(wire.encode_response(req.msg_id, result, sign, cookie), address)

    def _lie(self, req: wire.DHTRequest) -> Any:
        """The lying answer to ``req``, or None to answer honestly."""
        c = self.coalition
        method, key = req.method, req.key
        if method in ("store", "mailbox_put") and c.has(Behaviour.BLACKHOLE):
            return True
        if method not in ("find_node", "find_value") or key is None:
            return None
        value = (c.rivals.get(key) or c.stale.get(key)) if c.has(Behaviour.LIAR) else None
        eclipse = c.has(Behaviour.ECLIPSE)
        if method == "find_node":
            return c.contacts_near(key, self.config.ksize, req.sender_id) if eclipse else None
        if value is None and not eclipse and not c.has(Behaviour.BLACKHOLE):
            return None
        nodes = (
            c.contacts_near(key, self.config.ksize, req.sender_id)
            if eclipse
            else self._neighbors(key, exclude=req.sender_id)
        )
        result: dict[str, Any] = {"nodes": nodes}
        if value is not None:
            result["value"] = value
            result["seen"] = EARLY_SEEN
        return result


# ---------------------------------------------------------------------- running them


async def start_hostile_node(
    swarm: Swarm,
    coalition: Coalition,
    *,
    listen: Address,
    node_key: NodeKey,
    config: DHTConfig | None = None,
    host: FakeHost | None = None,
) -> HostileNode:
    """A hostile node in ``swarm``'s nursery, on ``listen`` (real sockets) or on ``host``
    (the swarm's FakeNetwork), as :meth:`Swarm.start_node` starts an honest one."""
    stack = AsyncExitStack()
    endpoint: UdpEndpoint | FakeUdpEndpoint
    if swarm.network is not None:
        host = host or swarm.network.add_host()
        port = FAKE_PORT if not host.endpoints else 0
        endpoint = host.bind(port)
    else:
        if not ipaddress.ip_address(listen.host).is_loopback:
            raise ValueError("hostile nodes listen on 127.0.0.0/8 only")
        endpoint = UdpEndpoint.bind(listen)
    stack.callback(endpoint.close)
    wall = swarm.wall
    core = HostileCore(
        node_key,
        config or swarm.config,
        RecordStorage(None, clock=wall),
        MailboxStorage(None, clock=wall),
        trio.current_time(),
        coalition=coalition,
    )
    dht = DHT(core, endpoint, wall=wall)
    stack.callback(dht.close)
    await run_node(swarm.nursery, dht, endpoint, stack)
    address = endpoint.local_address
    return HostileNode(node_key, endpoint, dht, address, stack, host)


@asynccontextmanager
async def open_coalition(
    swarm: Swarm,
    count: int,
    behaviours: Behaviour = Behaviour.HONEST,
    *,
    ip: str | None = None,
    near: bytes | list[bytes] | None = None,
    bits: int = 8,
    config: DHTConfig | None = None,
    bootstrap: int = 2,
    seed: int | None = None,
    first_index: int = 0,
    keys: list[NodeKey] | None = None,
    seeds: list[Address] | None = None,
) -> AsyncIterator[Coalition]:
    """Start ``count`` hostile nodes in ``swarm`` (before the context's body: the attacker
    is online before the victims claim their handles), each bootstrapped from ``bootstrap``
    random live honest nodes. ``ip``: all on that one address, many ports (FABRICATE);
    otherwise each on a /24 of its own (:func:`hostile_address` from ``first_index``).
    ``near``: ids ground to share ``bits`` leading bits with that key (or, for a list, with
    each key in turn); otherwise random. ``keys``: the node keys of the first
    ``len(keys)`` members (e.g. :func:`depth_fill_keys`), the rest placed as ``near``
    says. ``seeds``: addresses every member bootstraps from as well (a chosen resolver's:
    its table then holds them). ``config``: theirs (default: the swarm's)."""
    rng = random.Random(seed)
    coalition = Coalition(behaviours, swarm=swarm)
    targets = [near] if isinstance(near, bytes) else list(near or [])
    shared_host: FakeHost | None = None
    if swarm.network is not None and ip is not None:
        shared_host = swarm.network.add_host(ip)
    try:
        for i in range(count):
            if keys is not None and i < len(keys):
                key = keys[i]
            elif targets:
                key = grind_node_key(targets[i % len(targets)], bits, rng)
            else:
                key = NodeKey.from_seed(rng.randbytes(32))
            listen = Address(ip, 0) if ip is not None else hostile_address(first_index + i)
            host = shared_host
            if swarm.network is not None and host is None:
                host = swarm.network.add_host()
            member = await start_hostile_node(
                swarm, coalition, listen=listen, node_key=key, config=config, host=host
            )
            coalition.members.append(member)
            alive = [n for n in swarm.nodes if n.alive]
            chosen = [s.address for s in rng.sample(alive, min(bootstrap, len(alive)))]
            if chosen or seeds:
                await member.dht.bootstrap(list(dict.fromkeys([*(seeds or []), *chosen])))
        yield coalition
    finally:
        with trio.CancelScope(shield=True):
            for member in coalition.members:
                await member.stack.aclose()
            if shared_host is not None:
                shared_host.shutdown()


# ---------------------------------------------------------------------- spoofing


def can_spoof() -> bool:
    """Whether this process may send from a forged source address on real sockets (a raw
    socket needs root, or CAP_NET_RAW, which we do not probe: root only)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def send_spoofed_udp(payload: bytes, source: Address, to: Address) -> None:
    """One UDP datagram from ``source`` (forged) to ``to``, through a raw IPv4 socket with
    IP_HDRINCL. Loopback only (both ends in 127.0.0.0/8); root only (:func:`can_spoof`)."""
    for end in (source, to):
        if not ipaddress.ip_address(end.host).is_loopback:
            raise ValueError("spoofed datagrams go from and to 127.0.0.0/8 only")
    src = socket.inet_aton(source.host)
    dst = socket.inet_aton(to.host)
    length = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    header = struct.pack("!HHHH", source.port, to.port, length, 0)
    checksum = _checksum(pseudo + header + payload) or 0xFFFF
    udp = struct.pack("!HHHH", source.port, to.port, length, checksum) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0, src, dst
    )
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        raw.sendto(ip + udp, (to.host, 0))


def send_spoofed_fake(
    endpoint: FakeUdpEndpoint, payload: bytes, source: Address, to: Address
) -> None:
    """The FakeNetwork's version of :func:`send_spoofed_udp`: the datagram is handed to the
    network as if ``source`` had sent it (one way delay of the real sender's path)."""
    network = endpoint.host.network
    target = network._hosts.get(to.host)
    if target is None:
        return
    delay = network.median_rtt / 2
    network._push(
        trio.current_time() + delay,
        endpoint.host,
        (source.host, source.port),
        target,
        target._nat,
        to.port,
        payload,
    )
