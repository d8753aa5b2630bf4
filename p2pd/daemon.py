"""The Node: one trio nursery that owns every service of a running daemon.

``open_node`` binds the node's one UDP socket, starts the DHT (driven from that socket's
task, see p2pd/dht/driver.py), joins the network through the bootstrap addresses and the
contacts saved last time, publishes our handle record, and serves the control API.
Leaving the context cancels them all together; routing contacts are saved on the way out.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from . import __version__
from .calls import CallManager
from .config import NodeConfig
from .delivery import Delivery, EventBus
from .dht import DHT, load_or_create_node_key, open_dht
from .discovery import LanDiscovery, LanPeer, announced_hosts, local_ips
from .errors import Contested, NotFound
from .identity import HandleRef, Identity, format_fingerprint, self_certifying
from .key_rotation import stored_notice
from .keystore import ensure_home
from .records import HandleRecord
from .rotation import RotationNotice
from .store import db_path, get_meta, open_database, set_meta
from .transport.quic import QuicEndpoint
from .transport.udp import UdpEndpoint
from .wire import Address

log = logging.getLogger(__name__)

#: While the routing table is empty, retry the bootstrap this often.
REJOIN_INTERVAL = 15.0
#: A changed prekey bundle (a one-time prekey used) is republished at most this often.
BUNDLE_REPUBLISH_MIN = 10.0
MAX_SAVED_CONTACTS = 200


class Node:
    """A running daemon's state, as the control API sees it."""

    def __init__(
        self,
        config: NodeConfig,
        identity: Identity,
        endpoint: UdpEndpoint,
        dht: DHT,
        conn: sqlite3.Connection,
        delivery: Delivery,
        quic: QuicEndpoint,
    ) -> None:
        self.config = config
        self.identity = identity
        self.endpoint = endpoint
        self.dht = dht
        self.delivery = delivery
        self.events = delivery.events
        self.quic = quic
        self.lan: LanDiscovery | None = None
        self.calls: CallManager | None = None
        self._joining = False
        self._nursery: trio.Nursery | None = None
        self._conn = conn
        self.started = time.time()
        self.record: HandleRecord | None = None
        self.replicas = 0
        self.control_path = config.home / "control.sock"
        #: The notice of our last key rotation (`p2pd rotate-key`), if it is ours.
        self.rotation: RotationNotice | None = None

    @property
    def listen_address(self) -> Address:
        return self.endpoint.local_address

    def advertised_addresses(self) -> list[Address]:
        """What our record tells peers. Configured, else the listen address; a wildcard
        listen address is replaced by the source address of the route to each bootstrap
        peer (a UDP connect() sends nothing) and, without any, by loopback."""
        if self.config.advertise:
            return list(self.config.advertise)
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
            if (family == socket.AF_INET6) != (local.host == "::"):
                continue
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                try:
                    probe.connect(peer.as_tuple())
                except OSError:
                    continue
                address = Address(probe.getsockname()[0], local.port)
            if address not in found:
                found.append(address)
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
            self.advertised_addresses(),
            seq=self._next_seq(),
            now=now,
            lifetime=self.config.record_lifetime,
            extension=sessions.prekey_bundle(),
            # storing nodes that hold our old key's claim let this record replace it
            rotation=b"" if self.rotation is None else self.rotation.encode(),
        )
        sessions.mark_bundle_published()
        self.replicas = await self.dht.publish(record)
        self.record = record
        log.info("published record seq=%d to %d node(s)", record.seq, self.replicas)
        return self.replicas

    def lan_addresses(self, public_key: bytes) -> list[Address]:
        """Where the LAN says the node with this key is (verified announcements)."""
        if self.lan is None:
            return []
        for peer in self.lan.peers():
            if peer.public_key == public_key:
                return list(peer.addresses)
        return []

    def on_lan_peer(self, event: str, peer: LanPeer) -> None:
        self.events.emit("peer", change=event, **peer.summary())
        if event == "added" and self._nursery is not None and not self._joining:
            self._nursery.start_soon(self._join_via_lan)

    async def _join_via_lan(self) -> None:
        """A LAN peer appeared: if we know nobody yet, join the DHT through it now."""
        if self._joining:
            return
        self._joining = True
        try:
            stats = self.dht.statistics()
            if stats["routing_table_size"] == 0 and await self.join() > 0:
                await self.publish()
        except Exception:
            log.exception("joining through a LAN peer failed")
        finally:
            self._joining = False

    async def join(self) -> int:
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

    async def maintain(self) -> None:
        """Rejoin while alone, republish our record, save contacts; forever."""
        last_publish = time.monotonic()
        last_save = time.monotonic()
        while True:
            stats = self.dht.statistics()
            alone = stats["routing_table_size"] == 0
            await trio.sleep(REJOIN_INTERVAL if alone else 5.0)
            now = time.monotonic()
            if alone and await self.join() > 0:
                await self.publish()
                last_publish = now
            self.delivery.sessions.maintain(time.time())
            bundle_due = (
                self.delivery.sessions.bundle_changed and now - last_publish >= BUNDLE_REPUBLISH_MIN
            )
            if bundle_due or now - last_publish >= self.config.republish_interval:
                await self.publish()
                last_publish = now
            if now - last_save >= self.config.save_contacts_interval:
                await self.save_contacts()
                last_save = now

    # ------------------------------------------------------------------ control API

    async def status(self) -> dict[str, Any]:
        stats = self.dht.statistics()
        return {
            "version": __version__,
            "handle": self.identity.handle,
            "self_certifying": self_certifying(self.identity.handle, self.identity.public_key),
            "fingerprint": self.identity.fingerprint,
            "fingerprint_display": format_fingerprint(self.identity.fingerprint),
            "listen": str(self.listen_address),
            "addresses": [str(a) for a in (self.record.addresses if self.record else ())],
            "node_id": stats["node_id"],
            "routing_table_size": stats["routing_table_size"],
            "records_stored": stats["records_stored"],
            "record_seq": self.record.seq if self.record else None,
            "record_expires": self.record.expires if self.record else None,
            "replicas": self.replicas,
            "uptime": round(time.time() - self.started, 3),
            "dht_counters": stats["counters"],
            "refused_records": stats["refused_records"],
            "udp_counters": dict(self.endpoint.stats),
            "quic_counters": dict(self.quic.stats),
            "quic_connections": len(self.quic.peers()),
            "messages": self.delivery.statistics(),
            "lan_mode": self.config.lan.mode,
            "lan_peers": len(self.lan.peers()) if self.lan is not None else 0,
        }

    def peers(self) -> list[dict[str, Any]]:
        """Nearby peers (LAN), then contacts whose records we resolved (DHT)."""
        out = [p.summary() for p in (self.lan.peers() if self.lan is not None else [])]
        seen = {p["fingerprint"] for p in out}
        for key, (record, _) in list(self.delivery._records.items()):
            summary = record_summary(record)
            if summary["fingerprint"] in seen:
                continue
            out.append(
                {
                    "handle": record.handle,
                    "fingerprint": summary["fingerprint"],
                    "addresses": summary["addresses"],
                    "via": "dht",
                    "last_seen": None,
                    "pinned": self.delivery.contacts.by_key(key) is not None,
                    "verified": True,
                    "mode": None,
                }
            )
        return out

    async def whois(self, text: str) -> dict[str, Any]:
        """``{"status": "ok", "presence": "current" | "stale", <record_summary>}``, or
        ``{"status": "contested", "handle", "message", "claims": [...]}`` when different
        keys claim it (p2pd/claims.py). Raises NotFound."""
        ref = HandleRef.parse(text)
        if ref.handle == self.identity.handle and ref.matches(self.identity.public_key):
            if self.record is None:
                raise NotFound("our own record is not published yet")
            record = self.record
        else:
            try:
                record = await self.dht.resolve(ref)
            except Contested as exc:
                return {
                    "status": "contested",
                    "handle": ref.handle,
                    "message": exc.message,
                    "claims": exc.claims,
                }
        presence = "current" if record.present(time.time()) else "stale"
        return {"status": "ok", "presence": presence, **record_summary(record)}


def record_summary(record: HandleRecord) -> dict[str, Any]:
    return {
        "handle": record.handle,
        "self_certifying": self_certifying(record.handle, record.public_key),
        "public_key": record.public_key.hex(),
        "fingerprint": record.fingerprint,
        "fingerprint_display": format_fingerprint(record.fingerprint),
        "addresses": [str(a) for a in record.addresses],
        "seq": record.seq,
        "issued": record.issued,
        "expires": record.expires,
    }


@asynccontextmanager
async def open_node(config: NodeConfig, identity: Identity) -> AsyncIterator[Node]:
    """Run a node until the context exits."""
    from .control import check_stale_socket, serve_control_api

    ensure_home(config.home)
    check_stale_socket(config.home / "control.sock")  # before we touch anything else
    conn = open_database(db_path(config.home))
    endpoint = UdpEndpoint.bind(config.listen)
    try:
        async with (
            open_dht(
                node_key=load_or_create_node_key(config.home),
                conn=conn,
                config=config.dht,
                transport=endpoint,
            ) as dht,
            trio.open_nursery() as nursery,
        ):
            delivery = Delivery(config, identity, conn, dht, EventBus())
            calls = CallManager(delivery, delivery.events)
            delivery.on_signal = calls.on_signal
            quic = QuicEndpoint(
                endpoint,
                identity,
                config.quic,
                on_stream=delivery.handle_stream,
                on_datagram=calls.datagram_received,
            )
            delivery.quic = quic
            await nursery.start(quic.serve)
            await nursery.start(endpoint.serve, dht.datagram_received, quic.datagram_received)
            node = Node(config, identity, endpoint, dht, conn, delivery, quic)
            node.calls = calls
            notice = stored_notice(conn)
            if notice is not None and notice.new_key == identity.public_key:
                node.rotation = notice
                delivery.announce_rotation(notice)  # once; the outbox delivers it
            elif notice is not None and notice.old_key == identity.public_key:
                log.warning("a key rotation was not completed: run `p2pd rotate-key` again")
            await nursery.start(calls.run)
            node._nursery = nursery
            delivery.lan_addresses = node.lan_addresses
            await nursery.start(serve_control_api, node.control_path, node)
            if config.lan.mode != "off":
                contacts = delivery.contacts
                node.lan = LanDiscovery(
                    identity,
                    config.lan,
                    port=endpoint.local_address.port,
                    addresses=[endpoint.local_address],
                    contacts=lambda: {c.public_key: c.handle for c in contacts.all()},
                    pins=lambda h: c.public_key if (c := contacts.get(h)) else None,
                    on_peer=node.on_lan_peer,
                    on_pin_conflict=lambda h, k, where: contacts.observe(
                        h, k, time.time(), source="lan", place=where
                    ),
                )
                await nursery.start(node.lan.run)
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
        endpoint.close()
        conn.close()


async def run_daemon(config: NodeConfig, identity: Identity) -> None:
    """Run in the foreground until SIGINT or SIGTERM, then shut down cleanly."""
    import signal

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(config, identity) as node:
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
