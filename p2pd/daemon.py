"""The Node: one trio nursery that owns every service of a running daemon.

``open_node`` binds the node's one UDP socket, starts the DHT (driven from that socket's
task, see p2pd/dht/driver.py), joins the network through the bootstrap addresses and the
contacts saved last time, publishes our handle record, and serves the control API.
Leaving the context cancels them all together; routing contacts are saved on the way out.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from .address_hints import AddressHints, HintAnnouncer, hints_first, is_hint
from .api import Api
from .at_rest import open_at_rest
from .calls import CallManager
from .config import NodeConfig
from .control import check_stale_socket, serve_control_api
from .delivery import Delivery, EventBus
from .dht import DHT, load_or_create_node_key, open_dht
from .dht.mailbox_pass_share import MailboxPasses, PassAnnouncer, is_pass
from .discovery import LanDiscovery, LanPeer, announced_hosts, local_ips
from .errors import LocalError
from .files import FilesService, files_hooks
from .identity import Identity, self_certifying
from .key_rotation import stored_notice
from .keystore import ensure_home
from .maintenance import MaintenanceSchedule, Wakeup
from .messaging import Contacts
from .netif import global_ipv6, is_wildcard
from .records import MAX_ADDRESSES, MAX_RELAYS, HandleRecord
from .relay import Relays, is_virtual
from .relay.upgrade import DirectUpgrade
from .rotation import RotationNotice
from .session import SessionManager
from .store import db_path, get_meta, open_database, set_meta
from .transport.portmap_driver import PortMapping
from .transport.punch_driver import PunchRunner
from .transport.quic import QuicEndpoint, QuicPeer, QuicStream
from .transport.udp import UdpEndpoint
from .wire import Address

log = logging.getLogger(__name__)

MAX_SAVED_CONTACTS = 200


class Node:
    """A running daemon's state, as the control API sees it."""

    def __init__(
        self,
        config: NodeConfig,
        identity: Identity,
        conn: sqlite3.Connection,
        *,
        endpoint: UdpEndpoint,
        dht: DHT,
        quic: QuicEndpoint,
        delivery: Delivery,
        calls: CallManager,
        lan: LanDiscovery | None,
        schedule: MaintenanceSchedule,
        wakeup: Wakeup,
        rotation: RotationNotice | None,
        hints: AddressHints,
        files: FilesService | None = None,
        relays: Relays | None = None,
        upgrade: DirectUpgrade | None = None,
        portmap: PortMapping | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.endpoint = endpoint
        self.dht = dht
        self.quic = quic
        self.delivery = delivery
        self.events = delivery.events
        self.calls = calls
        self.files = files
        #: None when LAN discovery is off.
        self.lan = lan
        self._conn = conn
        self._schedule = schedule
        self._wakeup = wakeup
        self.started = time.time()
        self.record: HandleRecord | None = None
        self.replicas = 0
        self.control_path = config.home / "control.sock"
        #: The notice of our last key rotation (`p2pd rotate-key`), if it is ours.
        self.rotation = rotation
        #: Where pinned contacts said they are (invites, in-session hints).
        self.hints = hints
        #: Relaying for others, and our registrations with relays (p2pd/relay/).
        self.relays = relays
        #: Relayed connections upgraded to direct ones (hole punching).
        self.upgrade = upgrade
        #: Our mapping at the default gateway (PCP/NAT-PMP); None with ``[nat]
        #: port_mapping = false`` or a loopback listen address.
        self.portmap = portmap
        #: Passes into contacts' mailboxes, and our pass epoch (p2pd/dht/mailbox_pass_share.py).
        self.mailbox_passes: MailboxPasses | None = None

    @property
    def listen_address(self) -> Address:
        return self.endpoint.local_address

    def advertised_addresses(self) -> list[Address]:
        """What our record tells peers. Configured, else the listen address; a wildcard
        listen address is replaced by the source address of the route to each bootstrap
        peer (a UDP connect() sends nothing) and, without any, by loopback."""
        if self.config.advertise:
            return list(self.config.advertise)
        # A port our gateway mapped for us (PCP/NAT-PMP: one address at most) comes
        # first; then, behind an endpoint-independent NAT, the mapped address a quorum
        # of DHT peers saw (issue 13): what strangers may reach; the rest is for the LAN.
        mapped = None if self.portmap is None else self.portmap.mapped_address()
        public = self.dht.reachability().public_address
        found = list(dict.fromkeys(a for a in (mapped, public) if a is not None))
        return (found + [a for a in self._local_addresses() if a not in found])[:MAX_ADDRESSES]

    def nat_mapping(self) -> str:
        """The mapping kind we offer for hole punching: ``endpoint-independent`` while the
        gateway maps our port for everyone (a port mapping), else what observers saw."""
        if self.portmap is not None and self.portmap.mapped_address() is not None:
            return "endpoint-independent"
        return self.dht.reachability().mapping

    def published_addresses(self) -> list[Address]:
        """What our public record lists: none with ``[privacy] addresses = "contacts"``
        (contacts learn them in the session: p2pd/address_hints.py), else all."""
        return [] if self.config.hides_addresses else self.advertised_addresses()

    def published_relays(self) -> list[Address]:
        """The relays that hold a registration for us (none while we are reachable)."""
        return [] if self.relays is None else self.relays.registered()[:MAX_RELAYS]

    def _addresses_moved(self) -> bool:
        """Whether our published record's addresses or relays are no longer what we
        would publish (a NAT mapping learnt or changed, a relay gained or lost: issue
        13); then we republish at once."""
        record = self.record
        return record is not None and (
            record.addresses != tuple(self.published_addresses())
            or record.relays != tuple(self.published_relays())
        )

    def _local_addresses(self) -> list[Address]:
        local = self.listen_address
        if local.host not in ("0.0.0.0", "::"):
            return [local]
        if not self.config.bootstrap and self.config.lan.mode != "off":
            # No way to learn which route matters: publish what we announce on the LAN.
            hosts = announced_hosts([local], self.config.lan.interfaces, local_ips())
            lan = [Address(h, local.port) for h in hosts if not h.startswith("127.")]
            if lan:
                return lan
        found: list[Address] = []
        for peer in self.config.bootstrap:
            family = socket.AF_INET6 if peer.version == 6 else socket.AF_INET
            if family == socket.AF_INET6 and local.host != "::":
                continue  # an IPv4 socket; on :: (dual stack) both families
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                try:
                    probe.connect(peer.as_tuple())
                except OSError:
                    continue
                address = Address(probe.getsockname()[0], local.port)
            if address not in found:
                found.append(address)
        if local.host == "::":
            # Dual stack: our global IPv6 addresses too (issue 13, item 6). Behind a
            # firewall that lets in only replies they are for hole punching (both sides
            # send at once); without one, anyone reaches them.
            found += [Address(h, local.port) for h in global_ipv6(local_ips())][:4]
        return found or [Address("127.0.0.1" if local.host == "0.0.0.0" else "::1", local.port)]

    def _next_seq(self) -> int:
        # Milliseconds of wall clock, never below the last one used: a lost database or a
        # second machine with the same key still produces a higher sequence number.
        last = int(get_meta(self._conn, "own_seq") or 0)
        seq = max(last + 1, int(time.time() * 1000))
        set_meta(self._conn, "own_seq", str(seq))
        return seq

    async def publish(self) -> int:
        now = int(time.time())
        sessions = self.delivery.sessions
        record = HandleRecord.create(
            self.identity,
            self.published_addresses(),
            seq=self._next_seq(),
            now=now,
            lifetime=self.config.record_lifetime,
            extension=sessions.prekey_bundle(),
            # storing nodes that hold our old key's claim let this record replace it
            rotation=b"" if self.rotation is None else self.rotation.encode(),
            relays=self.published_relays(),
        )
        sessions.mark_bundle_published()
        self._schedule.published(trio.current_time())
        self.replicas = await self.dht.publish(record)
        table = self.dht.statistics()["routing_table_size"]
        self._schedule.stored(self.replicas, min(table, self.config.dht.ksize))
        self.record = record
        log.info("published record seq=%d to %d node(s)", record.seq, self.replicas)
        return self.replicas

    async def join(self) -> int:
        """Join the DHT through the bootstrap addresses, the LAN peers and the contacts
        saved last time. Returns the routing table's size (0: nobody answered)."""
        self._schedule.joined(trio.current_time())
        seeds = list(self.config.bootstrap)
        for peer in self.lan.peers() if self.lan is not None else []:
            for address in peer.addresses:
                if address not in seeds and address != self.listen_address:
                    seeds.append(address)
        for _, host, port in self._saved_contacts():
            address = Address(host, port)
            if address not in seeds and address != self.listen_address:
                seeds.append(address)
        if not seeds:
            return 0
        size = await self.dht.bootstrap(seeds)
        if size == 0:
            log.warning("no bootstrap peer answered (%d tried); will retry", len(seeds))
        return size

    def _saved_contacts(self) -> list[tuple[bytes, str, int]]:
        rows = self._conn.execute(
            "SELECT node_id, host, port FROM dht_contacts ORDER BY last_seen DESC LIMIT ?",
            (MAX_SAVED_CONTACTS,),
        ).fetchall()
        out = []
        for node_id, host, port in rows:
            try:
                if not isinstance(node_id, bytes) or len(node_id) != 20:
                    raise ValueError("bad node id")
                Address(host, port)
            except Exception:
                log.warning("ignoring a corrupt saved contact row")
                continue
            out.append((node_id, host, int(port)))
        return out

    async def save_contacts(self) -> int:
        contacts = self.dht.contacts()
        now = time.time()
        with self._conn:
            self._conn.execute("DELETE FROM dht_contacts")
            self._conn.executemany(
                "INSERT OR REPLACE INTO dht_contacts(node_id, host, port, last_seen) "
                "VALUES (?,?,?,?)",
                [(n, h, p, now) for n, h, p in contacts[:MAX_SAVED_CONTACTS]],
            )
        return len(contacts)

    async def pin_mailbox_pass(self) -> int:
        """Send our last revocation's pin again, while in effect (the replicas change):
        p2pd/dht/mailbox_pass_share.py. How many replicas took it."""
        passes, identity = self.mailbox_passes, self.identity
        pin = passes and passes.current_pin(identity.public_key, identity.sign, time.time())
        return 0 if not pin else await self.dht.mailbox_revoke(pin)

    async def maintain(self) -> None:
        """Rejoin while alone, republish our record, save contacts, clean up sessions;
        forever. Sleeps until the next of these is due (p2pd/maintenance.py), or until
        woken: a one-time prekey used (the bundle is republished), a LAN peer seen, the
        routing table's last contact gone (rejoin at once)."""
        sessions = self.delivery.sessions
        for _ in range(1 << 62):  # forever, in practice; cancelled with the daemon
            alone = self.dht.statistics()["routing_table_size"] == 0
            changed = sessions.bundle_changed or self._addresses_moved()
            await self._wakeup.wait_until(
                self._schedule.next_deadline(alone=alone, bundle_changed=changed)
            )
            now = trio.current_time()
            alone = self.dht.statistics()["routing_table_size"] == 0
            changed = sessions.bundle_changed or self._addresses_moved()
            due = self._schedule.due(now, alone=alone, bundle_changed=changed)
            if due.upkeep or due.publish:  # the bundle topped up before it is published
                sessions.maintain(time.time())
                self._schedule.kept_up(now)
            try:
                joined = due.join and await self.join() > 0
                if joined or due.publish:
                    await self.publish()
                    await self.pin_mailbox_pass()
            except Exception:  # the next deadline tries again
                log.exception("joining or publishing failed")
            if due.save_contacts:
                self._schedule.saved_contacts(now)
                await self.save_contacts()


def punch_candidates(advertised: list[Address], dht: DHT) -> list[Address]:
    """What we offer for hole punching: the addresses we advertise (a mapped public
    address first), then the reflexive addresses observers saw (behind an
    endpoint-dependent NAT their ports mean nothing, but the IP is where the peer's
    port probes go). At most 8."""
    seen = [a for a, _ in dht.reachability().reflexive]
    return list(dict.fromkeys(advertised + seen))[:8]


def bind_listen(listen: Address) -> UdpEndpoint:
    """The node's socket on ``listen``; ``::`` (the default, dual stack) on a machine
    without IPv6 falls back to ``0.0.0.0``."""
    try:
        return UdpEndpoint.bind(listen)
    except (LocalError, OSError) as exc:
        cause = exc.__cause__ if isinstance(exc, LocalError) else exc
        no_ipv6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)
        if listen.host != "::" or not isinstance(cause, OSError) or cause.errno not in no_ipv6:
            raise
        log.warning("no IPv6 here (%s): listening on IPv4 only", cause.strerror)
        return UdpEndpoint.bind(Address("0.0.0.0", listen.port))


def wants_port_mapping(config: NodeConfig, listen: Address) -> bool:
    """Whether to ask the default gateway for a port mapping (issue 13, item 9):
    ``[nat] port_mapping`` on, no ``--advertise`` (it decides what we publish), and a
    socket that the gateway's side can reach: a wildcard or a non-loopback IPv4
    address (a loopback daemon, as in tests, never talks to a gateway)."""
    if not config.nat.port_mapping or config.advertise:
        return False
    if is_wildcard(listen.host):
        return True
    ip = ipaddress.ip_address(listen.host)
    return ip.version == 4 and not ip.is_loopback


def needs_relays(dht: DHT) -> bool:
    """Whether we are behind a NAT that strangers cannot get through: then we keep
    registrations with relays (and relay for no one)."""
    status = dht.reachability()
    if status.reachability == "reachable":
        return False
    return status.reachability == "unreachable" or status.mapping in (
        "endpoint-independent",
        "endpoint-dependent",
    )


def _lan_peer_handler(
    events: EventBus, schedule: MaintenanceSchedule, wakeup: Wakeup
) -> Callable[[str, LanPeer], None]:
    """LAN discovery's ``on_peer``: an event for subscribers; a peer that appeared is a
    way into the DHT, which the maintenance loop takes at once if we are alone."""

    def on_peer(change: str, peer: LanPeer) -> None:
        events.emit("peer", change=change, **peer.summary())
        if change == "added":
            schedule.request_join()
            wakeup.set()

    return on_peer


def _lan_addresses(lan: LanDiscovery | None) -> Callable[[bytes], list[Address]]:
    """Where the LAN says the node with a key is (verified announcements)."""

    def addresses(public_key: bytes) -> list[Address]:
        for peer in lan.peers() if lan is not None else ():
            if peer.public_key == public_key:
                return list(peer.addresses)
        return []

    return addresses


def _hinted(
    lan: Callable[[bytes], list[Address]],
    hints: AddressHints,
    record: Callable[[bytes], HandleRecord | None],
) -> Callable[[bytes], list[Address]]:
    """Where to try a key before its record's addresses: the LAN, then its hints
    (unless a newer record of the key lists addresses: p2pd/address_hints.py)."""

    def addresses(public_key: bytes) -> list[Address]:
        found = lan(public_key)
        hinted = hints_first(*hints.get_dated(public_key), record(public_key))
        return found + [a for a in hinted if a not in found]

    return addresses


@asynccontextmanager
async def open_node(
    config: NodeConfig, identity: Identity, *, storage_key: bytes | None = None
) -> AsyncIterator[Node]:
    """Run a node until the context exits. ``storage_key`` (p2pd.keystore.unlock)
    encrypts the database's secrets at rest (p2pd/at_rest.py); None keeps them clear."""
    ensure_home(config.home)
    check_stale_socket(config.home / "control.sock")  # before we touch anything else
    conn = open_database(db_path(config.home))
    try:
        at_rest = open_at_rest(conn, storage_key)  # DatabaseLocked: before anything else
    except BaseException:
        conn.close()
        raise
    endpoint = bind_listen(config.listen)
    # Dial-back help (issue 13) goes out from a second port of ours, never read.
    dialback = UdpEndpoint.bind(Address(endpoint.local_address.host, 0), split=False)
    # The maintenance loop's: a prekey used, a LAN peer seen, our NAT mapping learnt or
    # changed, the DHT's last contact gone.
    wakeup = Wakeup()
    try:
        async with (
            open_dht(
                node_key=load_or_create_node_key(config.home),
                conn=conn,
                config=config.dht,
                transport=endpoint,
                on_alone=wakeup.set,
            ) as dht,
            trio.open_nursery() as nursery,
        ):
            # Every service is built here, in dependency order, and handed what it uses
            # (docs/ARCHITECTURE.md, "Composition"). QUIC's handlers and delivery's
            # call signals forward to services built after them: none is called before
            # the endpoint serves, below.
            events = EventBus()
            own = config.listen.host

            def reachability_changed() -> None:
                wakeup.set()  # republish: our addresses may have changed
                relays.reachability_changed()  # NATed now? register with relays at once

            dht.enable_reachability(
                local_ips() if is_wildcard(own) else [own], dialback,
                on_change=reachability_changed,
            )  # fmt: skip
            schedule = MaintenanceSchedule(
                trio.current_time(),
                republish_interval=config.republish_interval,
                save_contacts_interval=config.save_contacts_interval,
                bundle_republish_min=config.republish_min,
            )
            contacts = Contacts(conn)
            sessions = SessionManager.open(
                conn, identity, now=time.time(), on_bundle_changed=wakeup.set, at_rest=at_rest
            )
            lan = None
            if config.lan.mode != "off":
                lan = LanDiscovery(
                    identity,
                    config.lan,
                    port=endpoint.local_address.port,
                    addresses=[endpoint.local_address],
                    contacts=lambda: {c.public_key: c.handle for c in contacts.all()},
                    pins=lambda h: c.public_key if (c := contacts.get(h)) else None,
                    on_peer=_lan_peer_handler(events, schedule, wakeup),
                    on_pin_conflict=lambda h, k, where: contacts.observe(
                        h, k, time.time(), source="lan", place=where
                    ),
                )
            hints = AddressHints(conn)
            # passes into contacts' mailboxes, and ours to them (p2pd/dht/mailbox_pass_share.py)
            passes = MailboxPasses(conn, dht.core.stats, at_rest=at_rest)
            dht.mailbox_passes = lambda owner: passes.get(owner, time.time())

            def cached(key: bytes) -> HandleRecord | None:  # delivery's looked-up records
                return next((r for r in delivery.resolved_records() if r.public_key == key), None)

            async def other_streams(peer: QuicPeer, stream: QuicStream, first: bytes) -> None:
                await upgrade.route_stream(peer, stream, first, delivery.handle_stream)

            relays = Relays(
                config.relay, identity, endpoint.sendto,
                # an unwrapped QUIC packet of a circuit, under its virtual address
                on_packet=lambda packet, virtual: quic.datagram_received(packet, virtual),
                needs_relays=lambda: needs_relays(dht),
                candidates=lambda: [Address(h, p) for _, h, p in dht.contacts()],
                hides_addresses=config.hides_addresses,  # its record lists relays only
                on_registrations_changed=wakeup.set,  # republish with the new relays
                # our NAT mapped us anew: drop direct paths that cannot follow (issue 13)
                on_mapping_moved=lambda: upgrade.our_mapping_moved(),
            )  # fmt: skip
            quic = QuicEndpoint(
                endpoint,
                identity,
                config.quic,
                # p2pd/files/ routes file streams on their first byte, then the upgrade
                # (hole punching) takes its streams, and delivery the rest
                on_stream=lambda peer, stream: files.route_stream(peer, stream, other_streams),
                on_datagram=lambda peer, data: calls.datagram_received(peer, data),
                is_pinned=lambda key: contacts.by_key(key) is not None,  # QUIC's reserve
                virtual_send=relays.send,  # a circuit's packets go wrapped to its relay
                is_virtual=is_virtual,
                on_connection=lambda peer: connection_opened(peer),
                # where a direct peer sees us: evidence beside the DHT replies' (issue 13)
                on_observed=lambda peer, seen: dht.address_reported(peer.path[0], seen),
            )

            def connection_opened(peer: QuicPeer) -> None:
                upgrade.on_relayed_connection(peer)  # relayed: try for a direct path
                calls.connection_opened(peer)  # direct: a call over a relay moves to it

            # Side sockets serve the birthday case, an IPv4 NAT's: IPv4 ones (plain
            # a.b.c.d peers, as the main socket's are spelt) even when we listen on ::.
            own_host = endpoint.local_address.host
            runner = PunchRunner(endpoint.sendto, "0.0.0.0" if own_host == "::" else own_host)
            upgrade = DirectUpgrade(
                quic, runner,
                mapping=lambda: node.nat_mapping(),
                candidates=lambda: punch_candidates(node.advertised_addresses(), dht),
                may_share_addresses=lambda key: (
                    not config.hides_addresses or contacts.by_key(key) is not None
                ),
                on_direct=lambda peer: calls.connection_opened(peer),
                natted=lambda: needs_relays(dht),  # ping direct peers: hold our mappings
                ping_interval=config.relay.keepalive_interval,
                relay_seen=relays.peer_seen,  # the relay's SEEN: a punching candidate
            )  # fmt: skip
            delivery = Delivery(
                config, identity, conn, dht, events, quic=quic, sessions=sessions,
                contacts=contacts, lan_addresses=_hinted(_lan_addresses(lan), hints, cached),
                on_signal=lambda *signal: on_signal(*signal),
                on_direct=lambda key: direct_to(key),
                on_direct_message=lambda key: giver.peer_seen(key),  # it may write again
                on_file_offer=lambda *offer: files.offer_received(*offer),
                relay_connect=relays.connect,
            )  # fmt: skip
            calls = CallManager(delivery, events)
            announcer = HintAnnouncer(
                hints, enabled=lambda: config.hides_addresses,
                addresses=lambda: node.advertised_addresses(),
                handle_of=lambda key: c.handle if (c := contacts.by_key(key)) else None,
                send=delivery.send_signal,
            )  # fmt: skip

            giver = PassAnnouncer(
                identity.public_key, identity.sign, dht.core.stats, wall=time.time,
                handle_of=lambda key: c.handle if (c := contacts.by_key(key)) else None,
                send=delivery.send_signal, epoch=lambda: passes.epoch(identity.public_key),
            )  # fmt: skip

            def direct_to(key: bytes) -> None:  # a direct connection: hints, our pass
                announcer.peer_seen(key)
                giver.peer_seen(key)

            def on_signal(key: bytes, claimed: str, peer: QuicPeer | None, text: str) -> bool:
                """True for housekeeping (a hint, a pass): its sender is not looked up."""
                if is_hint(text):  # where a contact is: p2pd/address_hints.py
                    hints.received(key, contacts.by_key(key) is not None, text, time.time())
                elif is_pass(text):  # a contact's mailbox pass
                    passes.received(key, contacts.by_key(key) is not None, text, time.time())
                else:
                    calls.on_signal(key, claimed, peer, text)
                    return False
                return True

            files = FilesService(
                config.files, identity, conn, events.emit, quic=quic, at_rest=at_rest,
                **files_hooks(delivery, dht, quic, _hinted(_lan_addresses(lan), hints, cached)),
            )  # fmt: skip
            portmap = None
            if wants_port_mapping(config, endpoint.local_address):
                local = endpoint.local_address
                portmap = PortMapping(
                    local.port,
                    on_change=wakeup.set,
                    listen_host=None if is_wildcard(local.host) else local.host,
                )
            notice, rotation = stored_notice(conn), None
            if notice is not None and notice.new_key == identity.public_key:
                rotation = notice  # ours: announced to every contact, and in our record
            elif notice is not None and notice.old_key == identity.public_key:
                log.warning("a key rotation was not completed: run `p2pd rotate-key` again")
            node = Node(
                config, identity, conn, endpoint=endpoint, dht=dht, quic=quic,
                delivery=delivery, calls=calls, lan=lan, schedule=schedule, wakeup=wakeup,
                rotation=rotation, files=files, hints=hints, relays=relays, upgrade=upgrade,
                portmap=portmap,
            )  # fmt: skip
            node.mailbox_passes = passes  # for revoke_mailbox_pass
            if rotation is not None:
                delivery.announce_rotation(rotation)  # once; the outbox delivers it
            await nursery.start(quic.serve)
            await nursery.start(relays.run)
            await nursery.start(upgrade.run)
            if portmap is not None:  # before the first publish: a mapping may come first
                await nursery.start(portmap.run)
            await nursery.start(
                endpoint.serve, dht.datagram_received, quic.datagram_received,
                relays.datagram_received, runner.datagram_received,
            )  # fmt: skip
            await nursery.start(calls.run)
            await nursery.start(announcer.run)
            await nursery.start(giver.run)
            await nursery.start(files.run)
            await nursery.start(serve_control_api, node.control_path, Api(node), events)
            if lan is not None:
                await nursery.start(lan.run)
            await node.join()
            await node.publish()
            nursery.start_soon(node.maintain)
            await nursery.start(delivery.run)
            try:
                yield node
            finally:
                with trio.CancelScope(shield=True):
                    try:
                        await node.save_contacts()
                    except Exception:
                        log.exception("could not save routing contacts")
                nursery.cancel_scope.cancel()
    finally:
        dialback.close()
        endpoint.close()
        conn.close()


async def run_daemon(
    config: NodeConfig, identity: Identity, storage_key: bytes | None = None
) -> None:
    """Run in the foreground until SIGINT or SIGTERM, then shut down cleanly."""
    import signal

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(config, identity, storage_key=storage_key) as node:
            log.info(
                "ready: handle=%s fingerprint=%s listen=%s addresses=%s replicas=%d control=%s",
                self_certifying(identity.handle, identity.public_key),
                identity.fingerprint,
                node.listen_address,
                ",".join(str(a) for a in node.record.addresses) if node.record else "-",
                node.replicas,
                node.control_path,
            )
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                break
    log.info("stopped")
