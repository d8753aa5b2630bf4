"""Configuration: one frozen dataclass per subsystem, read once and passed down.

Sources, later ones winning: the defaults here, ``<home>/config.toml`` (sections ``[node]``,
``[dht]``, ``[lan]``, ``[calls]``, ``[files]``, ``[privacy]``), then the command line (click
options, with environment variables).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import UsageError
from .invite import bootstrap_addresses
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
    #: Handle records are stored at the ``claim_factor * ksize`` closest nodes, and a
    #: resolve that the k closest leave unsettled asks them all (p2pd/dht/core.py
    #: start_resolve): more voters against liars (docs/SECURITY.md). 4, not 3: at 20 %
    #: liars a third of 60 voters are liars for about 2 % of keys (binomial; seen as
    #: "contested" in 3-5 of 150 lookups under the combined attack), of 80 for 0.2 %.
    claim_factor: int = 4
    #: How long a dial-back round waits for its helpers' nonces (docs/PROTOCOL.md
    #: "Address discovery and dial-back"); a round with no nonce ends only then, so it
    #: is how soon a NATed node learns it is unreachable. 0.5-60 s. Tests that claim no
    #: reachability timing shorten it (a round on a LAN or loopback answers in ms).
    dialback_wait: float = 5.0
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
    #: Skip node ids packed around a key more densely than chance allows, given the
    #: network's size (p2pd/dht/density.py): a cluster of ground ids next to a handle's
    #: key gets a few replica slots, not all k. FOR BENCHMARKS ONLY (the configuration
    #: file cannot turn it off), like ``defences``.
    packed_check: bool = True
    #: Take the ``observed`` address of DHT replies as evidence of our reflexive address
    #: (p2pd/dht/reachability.py). Tests turn it off to see what the observed-address
    #: reports of QUIC connections teach alone; off, a NATed node learns its mapping
    #: only from the peers it connects to.
    observe_replies: bool = True
    #: A resolve's second round takes the first round's replies instead of asking those
    #: nodes again (p2pd/dht/resolve.py): every replica still answers once and votes
    #: once; under bench_adversary's attacks 49-51 RPCs a lookup instead of 61-63 and
    #: p50 0.36-0.46 s instead of 0.52-0.54 s at N=200, p99 2.3-4.3 s instead of 3.7-6.9
    #: s at N=1000. On since the rule asks 8 votes whenever replicas were set aside and
    #: lookups are seeded past them (docs/SECURITY.md, "Where a lookup's time went": the
    #: wrong keys at N=1000 came with it off too). Off (``reuse_replies=False``) is the
    #: benchmark's "again" mode: FOR BENCHMARKS ONLY, like ``defences``.
    reuse_replies: bool = True
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
    #: Postage (p2pd/dht/mailbox_entry.py): a mailbox entry is refused unless BLAKE2b
    #: over its mailbox key, its sealed bytes, a ten-minute window and a nonce has this
    #: many leading zero bits (``mailbox_refused_postage``). The sender finds the nonce
    #: in about 2**bits hashes: at 17, 60-115 ms on average on the shared 2-core test
    #: box (p99 0.4-0.6 s: the tries are geometric; scripts/bench_postage.py), i.e.
    #: 2**17 BLAKE2b calls of ~0.45 us; checking it is one hash. Every node
    #: of a network must ask no more than senders pay: raise it network-wide only.
    postage_bits: int = 17
    #: A mailbox put counts as left only when this many of the replicas it was sent to,
    #: in distinct /24s (/48s; each loopback or private address alone), said they took
    #: it; fewer, and the sender tries again later: one black hole's "stored" is not
    #: believed (p2pd/dht/operations.py ``MailboxPut``). Capped by how many replicas
    #: there are.
    mailbox_copies: int = 2
    #: Mailbox puts go through this many relays (nodes of our table that are not among
    #: the replicas, in distinct networks) so that no storing node sees our address
    #: (p2pd/dht/mailbox_relay.py); 0, or no such node known: straight to the replicas.
    mailbox_relays: int = 2
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
            "mailbox_copies",
        )
        for name in budgets:
            if not getattr(self, name) > 0:
                raise UsageError(f"dht {name} must be greater than 0")
        if not 0 <= self.postage_bits <= 32:
            raise UsageError("dht postage_bits must be between 0 and 32")
        if not 0.5 <= self.dialback_wait <= 60.0:
            raise UsageError("dht dialback_wait must be between 0.5 and 60 seconds")


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
    #: How many more may wait when the new one is ``urgent`` (a call's reports, NACKs and
    #: keyframe requests): those are refused only when ``max_pending_datagrams`` plus
    #: this many wait, so at most 80 frames (~93 KB) ever wait on a connection.
    urgent_datagram_reserve: int = 16
    #: Receive window per stream (initial_max_stream_data_*, RFC 9000 section 4): what a
    #: peer may send beyond what the application has read. Bounds the memory of a stream.
    stream_window: int = 1 << 20
    #: Initial connection-wide receive window (initial_max_data).
    connection_window: int = 4 << 20
    #: ``send_all`` waits while a stream holds more unacknowledged bytes than this.
    send_buffer: int = 1 << 20
    #: Connections (both directions, every state) at most.
    max_connections: int = 1024
    #: Share of ``max_connections`` that incoming connections from strangers (keys no
    #: contact pins) and incoming handshakes never take: kept for our outgoing
    #: connections and for pinned contacts (docs/SECURITY.md, "QUIC budgets").
    reserved_share: float = 0.25
    #: Incoming connections (any state) from one IP address at most; one p2pd peer
    #: needs one, a few share a NAT.
    max_connections_per_address: int = 8
    #: Incoming handshakes in progress (half-open) from one IP address at most.
    max_half_open_per_address: int = 4
    #: Once this many incoming handshakes are in progress, a new Initial without a valid
    #: Retry token is answered with a stateless Retry (RFC 9000 section 8.1.2) and takes
    #: no slot: a spoofed source never gets the token, so never a slot.
    retry_after_half_open: int = 32
    #: An incoming handshake not complete after this long is discarded without a word
    #: (its slot freed at once). Why 3 s: our delivery gives up on a handshake after
    #: ``connect_timeout`` (3 s), so a server that waits longer only serves spoofers;
    #: measured connect + echo on loopback (scripts/bench_quic_flood.py) took p99 70 ms
    #: quiet and 0.4-1.1 s under a full-speed Initial flood on a busy machine; and
    #: aioquic retransmits a lost flight after 2 x its initial RTT of 100 ms, doubling
    #: (0.2, 0.4, 0.8 s): two lost flights on a 300 ms path still finish in time.
    half_open_timeout: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.reserved_share < 1.0:
            raise UsageError("quic reserved_share must be at least 0 and below 1")
        positive = (
            "max_connections",
            "max_connections_per_address",
            "max_half_open_per_address",
            "half_open_timeout",
            "handshake_timeout",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"quic {name} must be positive")
        if self.retry_after_half_open < 0:
            raise UsageError("quic retry_after_half_open must not be negative")


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Relays (``[relay]`` in config.toml; p2pd/relay/, docs/PROTOCOL.md "Relays",
    docs/SECURITY.md "Relays"). A publicly reachable daemon relays by default; a NATed
    one keeps registrations with ``registrations`` relays. Sizes in bytes, times in
    seconds."""

    #: Relay for others while we are publicly reachable (a NATed node never relays).
    enabled: bool = True
    #: Registered (NATed) clients held at most, and per IP address: a household's NAT,
    #: or a carrier-grade NAT's, which puts many subscribers behind one address (so not
    #: lower; the benchmark puts 8 daemons behind one NAT, each wanting 3 relays).
    max_registrations: int = 256
    max_registrations_per_address: int = 16
    #: Circuits (pending or open) at most, and per peer key on either end.
    max_circuits: int = 128
    max_circuits_per_peer: int = 8
    #: Relayed bytes per second in all (a token bucket holding one second's worth);
    #: 2 MB/s is ~16 Mbit/s, a few calls with video.
    bandwidth: int = 2_000_000
    #: Relayed bytes per second sent by one peer key.
    peer_bandwidth: int = 500_000
    #: Bytes one circuit may carry in all before it is closed.
    circuit_bytes: int = 256 << 20
    #: A NATed node keeps this many relay registrations (2-3: one relay may die).
    registrations: int = 3
    #: A NATed node refreshes each registration this often: below the 30 s UDP mapping
    #: timeout measured on the testbed's routers for a flow that saw one answer
    #: (tests/test_nat_cells.py); it is also the keepalive that holds the mapping.
    refresh_interval: float = 25.0
    #: Between refreshes a NATed node asks each relay every this often whether it still
    #: holds us at the address it sees (a KEEPALIVE, 41 bytes, answered with 10): a NAT
    #: that rebooted or flushed its mappings is noticed within about this long, and we
    #: register again at once (issue 13 item 5: reachable again within 10 s). About
    #: 38 bytes/s per relay both ways with IPv4/UDP headers (docs/SECURITY.md). A NATed
    #: node also PINGs each direct QUIC connection this often, which holds (and after a
    #: flush restores) its NAT mapping towards that peer.
    keepalive_interval: float = 4.0

    def __post_init__(self) -> None:
        for name in (
            "max_registrations",
            "max_registrations_per_address",
            "max_circuits",
            "max_circuits_per_peer",
            "bandwidth",
            "peer_bandwidth",
            "circuit_bytes",
            "refresh_interval",
            "keepalive_interval",
        ):
            if getattr(self, name) <= 0:
                raise UsageError(f"relay {name} must be positive")
        if not 0 <= self.registrations <= 8:
            raise UsageError("relay registrations must be between 0 and 8")


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
    #: Of those, at most this many for one source address (contacts seen lately are
    #: recognised without a scan: p2pd.lan_announcement.TagScanBudget).
    max_tag_scans_per_source: int = 10
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
            "max_tag_scans_per_source",
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
    #: What ``p2pd call`` / ``answer`` send when no ``--audio-in`` is given: ``mic``
    #: (the default microphone), ``mic:NAME``, ``tone:HZ`` or a file.
    audio_in: str = "mic"
    #: Where they play what they receive when neither ``--audio-out`` nor ``--record``
    #: is given: ``speaker`` (the default output), ``speaker:NAME``, or ``none``.
    audio_out: str = "speaker"

    def __post_init__(self) -> None:
        if self.allow_from not in ("everyone", "contacts"):
            raise UsageError("calls from must be 'everyone' or 'contacts'")
        if not self.audio_in:
            raise UsageError("calls audio_in must name a source (mic, tone:HZ, a file)")
        if self.audio_out != "none" and self.audio_out.partition(":")[0] != "speaker":
            raise UsageError("calls audio_out must be speaker, speaker:NAME or none")


@dataclass(frozen=True, slots=True)
class FilesConfig:
    """Files and attachments (``[files]`` in config.toml; p2pd/files/)."""

    #: Where received files are saved; empty: the platform's download directory
    #: (platformdirs), else ~/Downloads.
    dir: str = ""
    #: Files from pinned contacts up to this many bytes are accepted without asking;
    #: anything larger, or from anyone else, waits for `p2pd accept`.
    auto_accept_max: int = 100 * 1000 * 1000
    #: Bytes accepted from one contact, and from everyone, in any 24 hours: an offer
    #: beyond either waits for `accept` (``status`` ``files.offers_over_quota``), so a
    #: contact cannot fill the disk with many files each under auto_accept_max.
    auto_accept_daily_per_peer: int = 1_000_000_000
    auto_accept_daily: int = 4_000_000_000
    #: Most bytes per second one outgoing transfer sends; 0: as fast as QUIC goes.
    max_rate: int = 0
    #: Chunk groups (1 MiB each by default) an outgoing transfer may have in flight
    #: beyond the receiver's last ack: more is faster, and is what a receiver killed
    #: mid-way can cost in bytes sent twice (it receives at most one group twice
    #: whatever this is). 2 reached 56 % of a raw QUIC stream's throughput on loopback,
    #: 8 reached 97 % (scripts/bench_files.py, docs/BENCHMARKS.md).
    window_groups: int = 8
    #: How long (ms) a DM or a call's audio may wait behind an outgoing transfer's
    #: data: the transfer keeps the queue it builds near this (p2pd/files/scavenger.py,
    #: LEDBAT's idea); 0: off, the transfer takes all that QUIC's window gives.
    queue_target_ms: int = 25
    #: Offers waiting for `accept` kept from one key, and from everyone: an offer
    #: beyond either is dropped and counted (``status`` ``files.offers_over_limit``).
    max_pending_per_peer: int = 20
    max_pending: int = 200

    def __post_init__(self) -> None:
        if self.auto_accept_max < 0 or self.max_rate < 0:
            raise UsageError("files auto_accept_max and max_rate must be 0 or more")
        if self.auto_accept_daily_per_peer < 0 or self.auto_accept_daily < 0:
            raise UsageError(
                "files auto_accept_daily_per_peer and auto_accept_daily must be 0 or more"
            )
        if self.max_pending_per_peer < 0 or self.max_pending < 0:
            raise UsageError("files max_pending_per_peer and max_pending must be 0 or more")
        if not 1 <= self.window_groups <= 64:
            raise UsageError("files window_groups must be between 1 and 64")
        if not 0 <= self.queue_target_ms <= 1000:
            raise UsageError("files queue_target_ms must be between 0 and 1000")


PRIVACY_ADDRESSES = ("everyone", "contacts")


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    """Presence privacy (``[privacy]`` in config.toml; issue 13, item 8)."""

    #: Who learns our direct (IP) addresses. ``everyone``: they are in our public handle
    #: record. ``contacts``: the public record lists none (relays only, once there are
    #: relays), and pinned contacts learn them inside the encrypted session
    #: (p2pd/address_hints.py). Empty (unset): ``contacts`` when LAN discovery is in
    #: ``contacts`` mode, else ``everyone``.
    addresses: str = ""

    def __post_init__(self) -> None:
        if self.addresses not in ("", *PRIVACY_ADDRESSES):
            raise UsageError(
                f"privacy addresses must be one of {', '.join(PRIVACY_ADDRESSES)}, "
                f"not {self.addresses!r}"
            )


@dataclass(frozen=True, slots=True)
class NatConfig:
    """Our own NAT (``[nat]`` in config.toml; issue 13, item 9)."""

    #: Ask the default gateway for a mapping of our UDP port (PCP, else NAT-PMP:
    #: p2pd/transport/portmap.py) and publish the address it gives first. ``false``
    #: sends the gateway nothing.
    port_mapping: bool = True


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A daemon."""

    home: Path
    #: Dual stack by default (issue 13, item 6): ``::`` carries IPv4 too (IPV6_V6ONLY
    #: off); on a machine without IPv6 the daemon falls back to 0.0.0.0.
    listen: Address = field(default_factory=lambda: Address("::", DEFAULT_PORT))
    bootstrap: tuple[Address, ...] = ()
    #: Addresses published in our handle record; empty: derived from the listen address.
    advertise: tuple[Address, ...] = ()
    dht: DHTConfig = field(default_factory=DHTConfig)
    #: How long our handle record claims the handle; republished well before.
    record_lifetime: int = 24 * 3600
    #: How often the daemon republishes its own record.
    republish_interval: float = 3600.0
    #: A record that changed (a one-time prekey used, an address learnt, a relay gained
    #: or lost) is republished as soon as this long has passed since the last publish:
    #: a burst of changes costs one publish, not one each. At least 1 s, at most
    #: ``republish_interval``. (A NATed daemon's first record, published at start, has
    #: no relays yet; strangers reach it once this republish lists them.)
    republish_min: float = 10.0
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
    files: FilesConfig = field(default_factory=FilesConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    nat: NatConfig = field(default_factory=NatConfig)

    def __post_init__(self) -> None:
        if not 1.0 <= self.republish_min <= self.republish_interval:
            raise UsageError(
                "node republish_min must be at least 1 s and at most republish_interval"
            )

    @property
    def hides_addresses(self) -> bool:
        """Whether our public record leaves out our direct addresses (``[privacy]
        addresses = "contacts"``, which ``--lan contacts`` implies unless set)."""
        if self.privacy.addresses:
            return self.privacy.addresses == "contacts"
        return self.lan.mode == "contacts"


_SECTIONS = ("home", "dht", "quic", "lan", "calls", "files", "privacy", "relay", "nat")


def _apply(obj: Any, section: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    for name, value in section.items():
        if name not in known or name in _SECTIONS:
            raise UsageError(f"{where}: unknown setting {name!r}")
        current = getattr(obj, name)
        if name in ("listen",):
            changes[name] = Address.parse(str(value))
        elif name in ("bootstrap", "advertise"):
            if not isinstance(value, list):
                raise UsageError(f"{where}: {name} must be a list of HOST:PORT strings")
            parse = bootstrap_addresses if name == "bootstrap" else lambda v: [Address.parse(v)]
            changes[name] = tuple(a for v in value for a in parse(str(v)))  # invites too
        elif name == "interfaces":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{where}: {name} must be a list of IP address strings")
            changes[name] = tuple(value)
        elif isinstance(current, bool):  # [relay] enabled
            if not isinstance(value, bool):
                raise UsageError(f"{where}: {name} must be true or false")
            changes[name] = value
        elif not isinstance(value, type(current) | int) or isinstance(value, bool):
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
    unknown = set(doc) - {"node", *_SECTIONS}
    if unknown:
        raise UsageError(f"{path}: unknown section(s) {sorted(unknown)}")
    for switch in ("defences", "packed_check", "reuse_replies"):
        if switch in doc.get("dht", {}):
            raise UsageError(f"{path} [dht]: {switch} is a benchmark switch, not a setting")
    dht = _apply(config.dht, doc.get("dht", {}), f"{path} [dht]")
    lan = _apply(config.lan, doc.get("lan", {}), f"{path} [lan]")
    calls_doc = doc.get("calls", {})
    settings = {"from": "allow_from", "audio_in": "audio_in", "audio_out": "audio_out"}
    if not isinstance(calls_doc, dict) or set(calls_doc) - set(settings):
        raise UsageError(
            f"{path} [calls]: the settings are from = contacts|everyone, audio_in, audio_out"
        )
    if not all(isinstance(v, str) for v in calls_doc.values()):
        raise UsageError(f"{path} [calls]: from, audio_in and audio_out are strings")
    calls = CallsConfig(**{settings[k]: v for k, v in calls_doc.items()})
    config = _apply(config, doc.get("node", {}), f"{path} [node]")
    files = _apply(config.files, doc.get("files", {}), f"{path} [files]")
    quic = _apply(config.quic, doc.get("quic", {}), f"{path} [quic]")
    relay = _apply(config.relay, doc.get("relay", {}), f"{path} [relay]")
    nat = _apply(config.nat, doc.get("nat", {}), f"{path} [nat]")
    privacy_doc = doc.get("privacy", {})
    if not isinstance(privacy_doc, dict) or set(privacy_doc) - {"addresses"}:
        raise UsageError(f"{path} [privacy]: the one setting is addresses = everyone|contacts")
    if not all(isinstance(v, str) and v for v in privacy_doc.values()):
        raise UsageError(f"{path} [privacy]: addresses is everyone or contacts")
    privacy = PrivacyConfig(**privacy_doc)
    out: NodeConfig = replace(
        config,
        dht=dht,
        quic=quic,
        lan=lan,
        calls=calls,
        files=files,
        privacy=privacy,
        relay=relay,
        nat=nat,
    )
    return out
