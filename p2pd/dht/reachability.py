"""Address discovery and reachability (issue 13): sans-I/O, driven by the DHT core.

Two questions a node behind a NAT must answer before it can be reached, the way STUN
(RFC 8489) and RFC 4787's tests answer them, but with the DHT's own peers as servers:

**Where does the world see me, and how does my NAT map?** Every DHT reply carries
``observed``, the address the responder saw the request come from (docs/PROTOCOL.md,
"Address discovery and dial-back"), and every peer on a direct QUIC connection reports
the address it sees us at (p2pd/transport/quic/observed.py). :class:`Observations`
keeps the latest one per *observer group* (the observer's /24, or /48 for IPv6), by
whichever way it came: several nodes of one operator in one subnet count once, and one
liar never reaches a quorum alone. The mapping kind is:

- ``none`` (not NATed): at least :data:`QUORUM` groups saw one of our own addresses;
- ``endpoint-independent``: at least :data:`QUORUM` groups saw the same other ip:port;
- ``endpoint-dependent``: at least :data:`EDM_QUORUM` groups saw the same IP, no two of
  them the same port (three, so that one liar beside one honest observer of an
  endpoint-independent NAT cannot make it look endpoint-dependent);
- ``unknown`` otherwise.

**Can a stranger reach me?** Only a dial-back tells: we ask up to :data:`DIALBACK_HELPERS`
contacts in distinct groups (``dialback`` with a fresh nonce); each helper, if it agrees,
answers ``True`` and sends the nonce in a ``dialed`` datagram from a *second* UDP socket
of its own (another port: no NAT filter that keeps only the flows we opened lets it in).
A nonce that arrives from any address other than the helper's DHT address is proof that
unsolicited traffic reaches us. :data:`QUORUM` proofs from distinct groups make us
``reachable``; at least :data:`QUORUM` helpers that agreed and not one proof make us
``unreachable``; anything else leaves the verdict as it was. Probes repeat every
:data:`PROBE_INTERVAL` (sooner while unknown).

A helper sends its nonce only to the address the ``dialback`` request came from (never
to an address named in it), at most once per requester group per
:data:`HELP_GROUP_INTERVAL` and :data:`HELP_PER_MINUTE` times a minute in all; the request
is padded so that the ack and the ``dialed`` datagram together are smaller than it: a
spoofed request makes a helper send less than the spoofer sent (docs/SECURITY.md).

**Client mode** (:attr:`Reachability.server`): a node whose quorum says it is NATed and
that is not proven reachable never sends a ``proof`` for the cookies others hand it, so
it never enters their routing tables (docs/ARCHITECTURE.md, "Earned ids"): they never
hand out an address nobody can reach. It still asks everything (lookups, stores,
mailboxes). All of this is off until the driver calls :meth:`Reachability.enable`
(tests of the core alone keep today's behaviour); observations are collected regardless.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .. import wire
from ..wire import Address
from .routing import Node

if TYPE_CHECKING:
    from .core import DHTCore

log = logging.getLogger(__name__)

MappingKind = Literal["unknown", "none", "endpoint-independent", "endpoint-dependent"]
Verdict = Literal["unknown", "reachable", "unreachable"]

#: Distinct observer (or helper) groups that must agree on a conclusion.
QUORUM = 2
#: Groups that must see one IP with all-different ports for "endpoint-dependent".
EDM_QUORUM = 3
#: Most observer groups remembered (the least recently heard are forgotten first).
OBSERVERS_MAX = 64
#: An observation older than this no longer counts (a NAT may have remapped us).
OBSERVATION_TTL = 600.0
#: Most reflexive addresses reported (status, presence records).
REFLEXIVE_MAX = 8
#: Helpers asked per dial-back round; how long a round waits for their nonces is
#: ``[dht] dialback_wait`` (5 s).
DIALBACK_HELPERS = 3
#: Rounds start this often once a verdict is in; while unknown, this often.
PROBE_INTERVAL = 600.0
PROBE_INTERVAL_UNKNOWN = 30.0
#: With too few helpers to ask, look again after this long.
PROBE_RETRY = 5.0
#: After enabling, a node that someone saw at an address not its own holds its proofs
#: back this long for the quorum on its mapping kind (it shows within the bootstrap's
#: first replies); still unknown then, it acts as a server.
DECIDE_WAIT = 5.0
#: Most proofs held back while deciding.
DEFERRED_MAX = 32
#: Helper side: one dial-back per requester group this often, this many a minute in all.
HELP_GROUP_INTERVAL = 30.0
HELP_PER_MINUTE = 30
HELP_GROUPS_MAX = 4096


@functools.lru_cache(maxsize=4096)  # every reply is observed: parsing was a hot spot
def group_of(host: str) -> str:
    """The observer group of an IP: its /24 (IPv4) or /48 (IPv6), private ones too."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@dataclass(frozen=True, slots=True)
class ReachabilityStatus:
    """What a node knows of how the world reaches it (``p2pd status``)."""

    reachability: Verdict
    mapping: MappingKind
    #: (address, how many observer groups saw us there), most seen first.
    reflexive: tuple[tuple[Address, int], ...]
    #: Whether we let other nodes put us in their routing tables (False: client mode).
    server: bool
    #: The mapped address a stranger can use: set for "endpoint-independent" only.
    public_address: Address | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "reachability": self.reachability,
            "mapping": self.mapping,
            "reflexive_addresses": [{"address": str(a), "observers": n} for a, n in self.reflexive],
            "dht_mode": "server" if self.server else "client",
            "public_address": None if self.public_address is None else str(self.public_address),
        }


class Observations:
    """The latest ``observed`` address per observer group, and what they add up to."""

    def __init__(self) -> None:
        # group -> (what it saw, when)
        self._seen: OrderedDict[str, tuple[Address, float]] = OrderedDict()

    def repeats(self, observer_host: str, seen: Address, now: float) -> bool:
        """Whether the observer's group says ``seen`` already, still current: adding it
        again only refreshes its time and changes no count."""
        held = self._seen.get(group_of(observer_host))
        return held is not None and held[0] == seen and now - held[1] < OBSERVATION_TTL

    def add(self, observer_host: str, seen: Address, now: float) -> None:
        group = group_of(observer_host)
        self._seen.pop(group, None)
        self._seen[group] = (seen, now)
        while len(self._seen) > OBSERVERS_MAX:
            self._seen.popitem(last=False)

    def current(self, now: float) -> list[Address]:
        """One address per group, heard within OBSERVATION_TTL."""
        return [a for a, when in self._seen.values() if now - when < OBSERVATION_TTL]

    def reflexive(self, now: float) -> list[tuple[Address, int]]:
        # Counted by (host, port) tuples, not by Address: its dataclass __hash__, __eq__
        # and ordering run in Python, and this runs on every reply that tells us
        # something new (up to 64 observations each). Address orders as that tuple.
        counts: dict[tuple[str, int], int] = {}
        first: dict[tuple[str, int], Address] = {}
        for address in self.current(now):
            pair = (address.host, address.port)
            if pair in counts:
                counts[pair] += 1
            else:
                counts[pair] = 1
                first[pair] = address
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return [(first[pair], n) for pair, n in ranked[:REFLEXIVE_MAX]]

    def mapping(self, now: float, local_hosts: Iterable[str]) -> tuple[MappingKind, Address | None]:
        """The mapping kind, and the endpoint-independent mapped address if that is it."""
        local = set(local_hosts)
        ranked = self.reflexive(now)
        if not ranked:
            return "unknown", None
        mine = sum(n for a, n in ranked if a.host in local)
        if mine >= QUORUM:
            return "none", None
        top, count = next(((a, n) for a, n in ranked if a.host not in local), ranked[0])
        if count >= QUORUM and top.host not in local:
            return "endpoint-independent", top
        by_host: dict[str, list[int]] = {}
        for address in self.current(now):
            by_host.setdefault(address.host, []).append(address.port)
        for host, ports in by_host.items():
            if host not in local and len(ports) >= EDM_QUORUM and len(set(ports)) == len(ports):
                return "endpoint-dependent", None
        return "unknown", None


class HelpBudget:
    """A helper's limits: per requester group, and in all per minute."""

    def __init__(self) -> None:
        self._groups: OrderedDict[str, float] = OrderedDict()
        self._recent: deque[float] = deque()

    def allow(self, requester_host: str, now: float) -> bool:
        group = group_of(requester_host)
        last = self._groups.get(group)
        if last is not None and now - last < HELP_GROUP_INTERVAL:
            return False
        while self._recent and now - self._recent[0] >= 60.0:
            self._recent.popleft()
        if len(self._recent) >= HELP_PER_MINUTE:
            return False
        self._recent.append(now)
        self._groups.pop(group, None)
        self._groups[group] = now
        while len(self._groups) > HELP_GROUPS_MAX:
            self._groups.popitem(last=False)
        return True


@dataclass(slots=True)
class DialbackRound:
    """One round of dial-back requests: nonce -> helper, and what came of it."""

    deadline: float
    helpers: dict[bytes, Node] = field(default_factory=dict)
    agreed: set[str] = field(default_factory=set)  # helper groups that answered True
    proven: set[str] = field(default_factory=set)  # helper groups whose nonce arrived

    def nonce_arrived(self, nonce: bytes, source: Address) -> bool:
        """Whether this nonce is one of ours and came in unsolicited: from an address
        that is not the helper's DHT address (the one our NAT has a flow to)."""
        helper = self.helpers.get(nonce)
        if helper is None or (helper.ip, helper.port) == source.as_tuple():
            return False
        self.proven.add(group_of(helper.ip))
        return True

    def verdict(self) -> Verdict:
        if len(self.proven) >= QUORUM:
            return "reachable"
        if len(self.agreed) >= QUORUM and not self.proven:
            return "unreachable"
        return "unknown"


class Reachability:
    """The core's address discovery, dial-back (both sides) and client-mode switch."""

    def __init__(
        self, core: DHTCore, now: float, randbytes: Callable[[int], bytes] | None = None
    ) -> None:
        self.core = core
        self.observations = Observations()
        self.help_budget = HelpBudget()
        self.verdict: Verdict = "unknown"
        #: Our own IPs (from the driver): an observer that sees one means "no NAT".
        self.local_hosts: frozenset[str] = frozenset()
        #: Whether our driver has a second socket to send ``dialed`` from.
        self.can_dial_back = False
        self.enabled = False
        self._randbytes = randbytes or core._randbytes
        self._round: DialbackRound | None = None
        self._next_probe = now
        self._dialed: list[tuple[bytes, tuple[str, int]]] = []
        self._decide_by = now
        self._deferred: list[tuple[bytes, bytes, tuple[str, int]]] = []
        #: Called when the mapping kind, the public address or the verdict changes (the
        #: daemon wakes its maintenance to republish its presence).
        self.on_change: Callable[[], None] | None = None
        #: The mapping as the last new observation left it: what the next one is
        #: compared with (one mapping() per new observation, not two; a change by
        #: expiry alone is then reported with the next observation).
        self._last_mapping: tuple[MappingKind, Address | None] | None = None

    def enable(
        self,
        local_hosts: Iterable[str],
        *,
        can_dial_back: bool,
        now: float,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """Start probing and switching modes: the driver knows our addresses now.
        ``on_change`` is called when the mapping or the verdict changes."""
        self.local_hosts = frozenset(local_hosts)
        self.can_dial_back = can_dial_back
        if on_change is not None:
            self.on_change = on_change
        if not self.enabled:
            self.enabled = True
            self._decide_by = now + DECIDE_WAIT
            self.core._schedule(self._decide_by, _DEADLINE, self)
            self._next_probe = now + 1.0  # after the bootstrap's first replies
            self.core._schedule(self._next_probe, _DEADLINE, self)

    # ------------------------------------------------------------------ what we know

    def mapping(self, now: float) -> tuple[MappingKind, Address | None]:
        return self.observations.mapping(now, self.local_hosts)

    @property
    def server(self) -> bool:
        """False (client mode) when a quorum says we are NATed and no dial-back proved
        that strangers reach us anyway."""
        if not self.enabled or self.verdict == "reachable":
            return True
        kind, _ = self.mapping(self.core.now)
        return kind in ("unknown", "none") and self.verdict != "unreachable"

    def may_prove(self, responder_key: bytes, cookie: bytes, address: tuple[str, int]) -> bool:
        """Whether to send this ``proof`` (enter that node's table) now. While the mapping
        is still being decided it is held back (a cookie is good for a minute) and sent,
        or dropped, once it is."""
        now = self.core.now
        if self.enabled and now < self._decide_by and self._looks_natted(now):
            if len(self._deferred) < DEFERRED_MAX:
                self._deferred.append((responder_key, cookie, address))
            return False
        if self.server:
            return True
        self.core.stats["proofs_withheld"] += 1  # client mode
        return False

    def _looks_natted(self, now: float) -> bool:
        """Undecided, but someone saw us at an address not ours: wait for the quorum.
        (Seen at our own address, we prove at once, as a public node should.)"""
        if self.mapping(now)[0] != "unknown":
            return False
        return any(a.host not in self.local_hosts for a in self.observations.current(now))

    def _flush_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for key, cookie, address in deferred:
            self.core._send_proof(key, cookie, address)

    def status(self, now: float) -> ReachabilityStatus:
        kind, public = self.mapping(now)
        return ReachabilityStatus(
            self.verdict, kind, tuple(self.observations.reflexive(now)), self.server, public
        )

    # ------------------------------------------------------------------ from the core

    def observed(self, responder: tuple[str, int], seen: Address, now: float) -> None:
        """A reply (matched to our request, decoded) said where it saw us."""
        if not self.core.config.observe_replies:
            return  # tests: what QUIC's reports alone teach
        self.core.stats["observed"] += 1
        self._add(responder[0], seen, now)

    def reported(self, observer_host: str, seen: Address, now: float) -> None:
        """A peer on a direct QUIC connection from ``observer_host`` said where it sees
        us (p2pd/transport/quic/observed.py): the same evidence as a DHT reply's, one
        observer group's latest view, whichever of the two it came by."""
        self.core.stats["observed_quic"] += 1
        self._add(observer_host, seen, now)

    def _add(self, observer_host: str, seen: Address, now: float) -> None:
        if not self._deferred and self.observations.repeats(observer_host, seen, now):
            # The same answer again (most replies): nothing to recompute. Three mapping()
            # per reply were 15 % of bench_adversary's CPU (issue 11, latency).
            self.observations.add(observer_host, seen, now)
            return
        before = self._last_mapping or self.mapping(now)
        self.observations.add(observer_host, seen, now)
        after = self._last_mapping = self.mapping(now)
        if after != before and self.on_change is not None:
            self.on_change()
        if self._deferred and after[0] != "unknown":
            self._decide_by = now  # decided: send or drop what waited
            self._flush_deferred()

    def dialback_requested(self, req: wire.DHTRequest, source: tuple[str, int], now: float) -> bool:
        """Helper side: send the nonce from our second socket to where the request came
        from, if our budget allows; the answer says whether we did."""
        if not self.can_dial_back or not self.help_budget.allow(source[0], now):
            self.core.stats["dialback_refused"] += 1
            return False
        assert req.nonce is not None
        msg_id = self._randbytes(wire.MSG_ID_LEN)
        args = [self.core.node_key.public_key, req.nonce]
        self._dialed.append((wire.encode_request(msg_id, "dialed", args), source))
        self.core.stats["dialbacks_sent"] += 1
        return True

    def dialed(self, req: wire.DHTRequest, source: tuple[str, int], now: float) -> None:
        """A ``dialed`` datagram: one of our nonces, unsolicited? Never answered."""
        assert req.nonce is not None
        current = self._round
        if current is None or not current.nonce_arrived(req.nonce, Address(*source)):
            self.core.stats["dialed_unexpected"] += 1
            return
        self.core.stats["dialed_received"] += 1
        if current.verdict() == "reachable":
            self._conclude(now)

    def dialbacks_to_send(self) -> list[tuple[bytes, tuple[str, int]]]:
        """``dialed`` datagrams for the driver's second socket."""
        out, self._dialed = self._dialed, []
        return out

    # ------------------------------------------------------------------ probing

    def pump(self, now: float) -> None:
        """The core's timer for us (a _DEADLINE entry)."""
        if self._deferred and now >= self._decide_by:
            self._flush_deferred()
        current = self._round
        if current is not None:
            if now >= current.deadline:
                self._conclude(now)
            return
        if now < self._next_probe:
            return
        helpers = self._helpers()
        if len(helpers) < QUORUM:
            self._next_probe = now + PROBE_RETRY
            self.core._schedule(self._next_probe, _DEADLINE, self)
            return
        current = self._round = DialbackRound(now + self.core.config.dialback_wait)
        self.core._schedule(current.deadline, _DEADLINE, self)
        for helper in helpers:
            nonce = self._randbytes(wire.NONCE_LEN)
            current.helpers[nonce] = helper
            args = [nonce, bytes(wire.DIALBACK_PAD)]
            self.core.request(helper, "dialback", args, now, _Asked(self, current), probe=True)

    def _helpers(self) -> list[Node]:
        """Contacts in distinct groups, none in a group of ours (a neighbour on our LAN
        reaches us without crossing the NAT)."""
        ours = {group_of(h) for h in self.local_hosts}
        chosen: dict[str, Node] = {}
        for node in self.core.table:
            if node.key is None or node.ip is None:
                continue
            group = group_of(node.ip)
            if group not in ours and group not in chosen:
                chosen[group] = node
        return list(chosen.values())[:DIALBACK_HELPERS]

    def _conclude(self, now: float) -> None:
        current, self._round = self._round, None
        if current is None:
            return
        verdict = current.verdict()
        if verdict != "unknown":
            changed, self.verdict = verdict != self.verdict, verdict
            if changed:
                log.info("reachability: %s", verdict)
                if self.on_change is not None:
                    self.on_change()
        self.core.stats[f"dialback_rounds_{verdict}"] += 1
        wait = PROBE_INTERVAL if self.verdict != "unknown" else PROBE_INTERVAL_UNKNOWN
        self._next_probe = now + wait
        self.core._schedule(self._next_probe, _DEADLINE, self)


class _Asked:
    """The RpcOwner of one dial-back request: an agreeing helper counts in its round."""

    def __init__(self, reach: Reachability, round_: DialbackRound) -> None:
        self.reach = reach
        self.round = round_

    def rpc_done(self, node: Node, result: wire.DHTResult | None, now: float) -> None:
        if result is True and node.ip is not None:
            self.round.agreed.add(group_of(node.ip))

    def rpc_slow(self, node: Node, now: float) -> None:
        pass


#: The core's timer kind that calls ``pump(now)`` (p2pd.dht.core._DEADLINE).
_DEADLINE = 2
