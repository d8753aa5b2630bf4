"""Configuration: one frozen dataclass per subsystem, read once and passed down.

Sources, later ones winning: the defaults here, ``<home>/config.toml`` (sections ``[node]``
and ``[dht]``), then the command line (click options, with environment variables).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import UsageError
from .wire import Address

DEFAULT_PORT = 4747


@dataclass(frozen=True, slots=True)
class DHTConfig:
    """The Kademlia node. Times in seconds."""

    #: k: replication factor and bucket size (Kademlia paper, section 2.2).
    ksize: int = 20
    #: alpha: how many RPCs a lookup keeps in flight.
    alpha: int = 3
    #: A reply later than this is lost and counts as a failure of that contact.
    rpc_timeout: float = 2.0
    #: Bounds of the adaptive per-contact timeout (RFC 6298 RTO from measured round trips)
    #: after which a lookup stops waiting on a contact and asks another.
    soft_timeout_min: float = 0.010
    soft_timeout_max: float = 1.0
    #: Consecutive lost replies before a contact leaves the routing table (stock kademlia
    #: evicts on the first).
    failures_before_eviction: int = 2
    #: After a lost reply, lookups skip that node for this long (unless it speaks first).
    suspect_period: float = 60.0
    #: A whole lookup gives up after this long.
    lookup_deadline: float = 10.0
    #: Hard cap of RPCs one lookup may send.
    lookup_max_rpcs: int = 300
    #: A value lookup may end once this many of the closest live nodes have all answered
    #: and at least this many answers carried a value (not all k: waiting for the
    #: slowest of 20 costs about twice the median lookup time; measured with
    #: scripts/sim_dht.py). ``ksize`` waits for all k.
    value_quorum: int = 8
    #: Stored records are re-replicated to the current k closest nodes this often.
    replicate_interval: float = 3600.0
    #: Buckets with no lookup for this long are refreshed.
    refresh_interval: float = 3600.0
    #: Most records one node stores for others (each at most 2,601 bytes).
    max_records: int = 100_000
    #: Sybil limits (docs/ARCHITECTURE.md, "Earned ids"): most node ids with one IP
    #: address in a routing-table bucket, and among a lookup's candidates and result.
    max_per_ip: int = 2
    #: Most node ids per /24 (IPv4) or /48 (IPv6) there. Private, unique-local and
    #: link-local addresses are exempt (a LAN is one /24), loopback is not. 3, not 2: a
    #: home or small office /24 with a few nodes behind one or two public addresses
    #: still fits, while an attacker needs a /24 per 3 slots of a bucket of 20.
    max_per_subnet: int = 3
    #: A lookup runs this many disjoint paths (S/Kademlia section 4.4): the seeds are
    #: dealt round-robin, a node is asked by one path only, the answers are merged.
    disjoint_paths: int = 2
    #: How long a node that proved its id from an address is asked without a proof.
    verified_lifetime: float = 3600.0
    #: Request budgets (p2pd/dht/budget.py, docs/SECURITY.md "DHT budgets"): token
    #: buckets per request kind and source address, refilled at ``request_rate`` tokens a
    #: second up to ``request_burst``. A ping or find_node takes 1 token, a find_value or
    #: proof 2, a store or mailbox request 4. Over budget, a request is dropped (counted
    #: as ``rate_limited_<kind>``). Honest traffic to one node from one address is a few
    #: requests a second; a lookup or a replication round a few dozen at once.
    request_rate: float = 50.0
    request_burst: float = 200.0
    #: The same per /24 (IPv4) or /48 (IPv6) of the source: this many times the rate and
    #: burst of one address.
    subnet_rate_factor: float = 4.0
    #: One bucket for every source not validated yet (it has not proved it receives at its
    #: address), all together: a flood from many (spoofed) sources gets a fresh bucket
    #: per source above, and is held to this (``unvalidated_limited_<kind>``).
    unvalidated_rate: float = 1000.0
    unvalidated_burst: float = 2000.0
    #: Most buckets remembered (least recently used forgotten first), each table: bounds
    #: the memory a flood from spoofed sources can take.
    rate_table_max: int = 8192
    #: Most new records one source address (and one /24|/48) may have stored here at once;
    #: past it, its stores of new keys are refused (``record_refused_quota``).
    records_per_address: int = 1000
    records_per_subnet: int = 4000
    #: Most mailbox entries one source address (and one /24|/48) may have stored here at
    #: once (``mailbox_refused_quota``).
    mailbox_per_address: int = 256
    mailbox_per_subnet: int = 1024
    #: The defences against hostile nodes (docs/SECURITY.md): earned contacts, address
    #: limits, disjoint paths, storing only when among the k closest, and a lookup that
    #: believes a key only with 2/3 of independent replicas. FOR BENCHMARKS ONLY
    #: (scripts/bench_*.py compare with them off: then a lookup believes the key most
    #: replicas return); the configuration file cannot turn them off.
    defences: bool = True

    def __post_init__(self) -> None:
        budgets = (
            "request_rate",
            "request_burst",
            "subnet_rate_factor",
            "unvalidated_rate",
            "unvalidated_burst",
            "rate_table_max",
            "records_per_address",
            "records_per_subnet",
            "mailbox_per_address",
            "mailbox_per_subnet",
        )
        for name in budgets:
            if not getattr(self, name) > 0:
                raise UsageError(f"dht {name} must be greater than 0")


@dataclass(frozen=True, slots=True)
class QuicConfig:
    """The QUIC transport (p2pd/transport/quic/, docs/PROTOCOL.md "QUIC"). Times in
    seconds, sizes in bytes."""

    #: Our max_idle_timeout transport parameter (RFC 9000 section 10.1): a connection that
    #: hears nothing for this long (the smaller of both sides' values) is gone.
    idle_timeout: float = 30.0
    #: While a connection is in use, a PING goes out after this long without sending, so
    #: the idle timeout never ends a connection someone still uses (section 10.1.2).
    keepalive_interval: float = 10.0
    #: A connection with no open stream and no stream or datagram traffic for this long is
    #: closed (gracefully, CONNECTION_CLOSE with NO_ERROR).
    idle_close: float = 60.0
    #: ``connect`` (and an incoming handshake) gives up after this long.
    handshake_timeout: float = 10.0
    #: Largest UDP payload we send. 1200 is the size every QUIC path must carry (RFC 9000
    #: section 14); aioquic does no path MTU discovery, so larger values are for known
    #: paths (loopback, a LAN) only.
    max_datagram_size: int = 1200
    #: Our max_datagram_frame_size transport parameter (RFC 9221 section 3): 65535 means
    #: "any DATAGRAM frame that fits in a packet".
    max_datagram_frame_size: int = 65535
    #: DATAGRAM frames waiting for congestion window before ``send_datagram`` drops new ones.
    max_pending_datagrams: int = 64
    #: Receive window per stream (initial_max_stream_data_*, RFC 9000 section 4): what a
    #: peer may send beyond what the application has read. Bounds the memory of a stream.
    stream_window: int = 1 << 20
    #: Initial connection-wide receive window (initial_max_data).
    connection_window: int = 4 << 20
    #: ``send_all`` waits while a stream holds more unacknowledged bytes than this.
    send_buffer: int = 1 << 20
    #: Connections (both directions) at most; Initial packets beyond it are dropped.
    max_connections: int = 1024


LAN_MODES = ("everyone", "contacts", "off")


@dataclass(frozen=True, slots=True)
class LanConfig:
    """LAN discovery over mDNS (p2pd/discovery.py, docs/PROTOCOL.md "LAN discovery").
    Times in seconds."""

    #: ``everyone``: announce handle and key in the clear; ``contacts``: announce a
    #: rotating tag only our contacts can recognise; ``off``: neither announce nor browse.
    mode: str = "everyone"
    #: IP addresses of the interfaces to announce and browse on. Empty: the interface of
    #: the listen address, or every interface when the daemon listens on 0.0.0.0 / ::.
    interfaces: tuple[str, ...] = ()
    #: Our announcement is re-signed with a fresh ``issued`` time (and, in contacts mode,
    #: a fresh nonce) and sent again this often. Shorter than ``ttl``, so that a live
    #: node's records never lapse from its peers' caches, and at most half of
    #: ``max_clock_skew``, so that a peer who arrives later always finds a current one.
    announce_interval: float = 100.0
    #: TTL of our mDNS records (SRV, TXT, PTR, A/AAAA): RFC 6762 section 10's 120 s for
    #: host records, which we also use for PTR and TXT (instead of 75 minutes). A peer not
    #: heard from for this long is asked again, and dropped if it does not answer: a node
    #: that vanishes without a goodbye (crash, cable) leaves the list in about two minutes.
    #: (python-zeroconf raises the TTL of PTR records it receives to 1125 s, so its
    #: browser alone would take 19 minutes to notice.)
    ttl: int = 120
    #: An announcement's ``issued`` time may differ from ours by this much either way;
    #: older ones are replays and refused. Peers' clocks must agree to this precision.
    max_clock_skew: int = 600
    #: How long to wait for a peer's SRV/TXT/A records once the browser reports it.
    resolve_timeout: float = 3.0
    #: Most peers kept; announcements from more are ignored.
    max_peers: int = 256
    #: Browser events waiting, and instances being resolved, at most; beyond, dropped.
    max_pending: int = 256
    #: Instances resolved at the same time (each holds a worker thread while it waits).
    max_concurrent_resolves: int = 4
    #: New contacts-mode tags tried against all pinned keys per minute (each try costs one
    #: HMAC per contact: ~20 ms for 10,000 contacts); the rest wait for their next period.
    max_tag_scans_per_minute: int = 60
    #: Withdrawing the announcement and closing zeroconf on shutdown gives up after this.
    close_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.mode not in LAN_MODES:
            raise UsageError(f"lan mode must be one of {', '.join(LAN_MODES)}, not {self.mode!r}")
        for host in self.interfaces:
            try:
                Address(host, 0)
            except UsageError:
                raise UsageError(f"lan interface {host!r} is not an IP address") from None
        if not 10 <= self.ttl <= 4500:
            raise UsageError("lan ttl must be between 10 and 4500 seconds")
        if not 60 <= self.max_clock_skew <= 86400:
            raise UsageError("lan max_clock_skew must be between 60 and 86400 seconds")
        if not 1 <= self.announce_interval <= min(self.ttl - 1, self.max_clock_skew / 2):
            raise UsageError(
                "lan announce_interval must be at least 1 s, shorter than ttl and at most "
                "max_clock_skew / 2"
            )
        positive = (
            "resolve_timeout",
            "max_peers",
            "max_pending",
            "max_concurrent_resolves",
            "max_tag_scans_per_minute",
            "close_timeout",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"lan {name} must be positive")


@dataclass(frozen=True, slots=True)
class CallsConfig:
    """Incoming calls (``[calls]`` in config.toml)."""

    #: Who may ring us: ``everyone`` (a caller whose key is no contact's pin is shown
    #: as ``claimed#<fingerprint> (unverified)``) or ``contacts`` (such a call is refused
    #: without ringing; the caller is told "takes calls from contacts only").
    allow_from: str = "everyone"

    def __post_init__(self) -> None:
        if self.allow_from not in ("everyone", "contacts"):
            raise UsageError("calls from must be 'everyone' or 'contacts'")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A daemon."""

    home: Path
    listen: Address = field(default_factory=lambda: Address("0.0.0.0", DEFAULT_PORT))
    bootstrap: tuple[Address, ...] = ()
    #: Addresses published in our handle record; empty: derived from the listen address.
    advertise: tuple[Address, ...] = ()
    dht: DHTConfig = field(default_factory=DHTConfig)
    #: How long our handle record claims the handle; republished well before.
    record_lifetime: int = 24 * 3600
    #: How often the daemon republishes its own record.
    republish_interval: float = 3600.0
    #: How often the routing contacts are written to the database.
    save_contacts_interval: float = 300.0
    quic: QuicConfig = field(default_factory=QuicConfig)
    lan: LanConfig = field(default_factory=LanConfig)
    #: How often the daemon asks the DHT for messages left in its mailbox (also at start).
    mailbox_poll_interval: float = 30.0
    #: How long one delivery attempt waits for a QUIC handshake with the recipient.
    connect_timeout: float = 3.0
    #: How long one delivery attempt waits for acks after sending.
    ack_timeout: float = 5.0
    #: A call not answered within this many seconds ends as "no-answer".
    ring_timeout: float = 30.0
    calls: CallsConfig = field(default_factory=CallsConfig)


def _apply(obj: Any, section: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    for name, value in section.items():
        if name not in known or name in ("home", "dht", "quic", "lan", "calls"):
            raise UsageError(f"{where}: unknown setting {name!r}")
        current = getattr(obj, name)
        if name in ("listen",):
            changes[name] = Address.parse(str(value))
        elif name in ("bootstrap", "advertise"):
            if not isinstance(value, list):
                raise UsageError(f"{where}: {name} must be a list of HOST:PORT strings")
            changes[name] = tuple(Address.parse(str(v)) for v in value)
        elif name == "interfaces":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{where}: {name} must be a list of IP address strings")
            changes[name] = tuple(value)
        elif isinstance(current, bool) or not isinstance(value, type(current) | int):
            raise UsageError(f"{where}: {name} must be a {type(current).__name__}")
        else:
            changes[name] = type(current)(value)
    return replace(obj, **changes)


def load_config(home: Path) -> NodeConfig:
    """Defaults, overlaid with ``<home>/config.toml`` if it exists."""
    config = NodeConfig(home=home)
    path = home / "config.toml"
    if not path.exists():
        return config
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    unknown = set(doc) - {"node", "dht", "lan", "calls"}
    if unknown:
        raise UsageError(f"{path}: unknown section(s) {sorted(unknown)}")
    if "defences" in doc.get("dht", {}):
        raise UsageError(f"{path} [dht]: defences is a benchmark switch, not a setting")
    dht = _apply(config.dht, doc.get("dht", {}), f"{path} [dht]")
    lan = _apply(config.lan, doc.get("lan", {}), f"{path} [lan]")
    calls_doc = doc.get("calls", {})
    if not isinstance(calls_doc, dict) or set(calls_doc) - {"from"}:
        raise UsageError(f"{path} [calls]: the only setting is from = contacts|everyone")
    calls = CallsConfig(allow_from=str(calls_doc.get("from", "everyone")))
    config = _apply(config, doc.get("node", {}), f"{path} [node]")
    out: NodeConfig = replace(config, dht=dht, lan=lan, calls=calls)
    return out
