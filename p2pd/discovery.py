"""LAN discovery: announce this node and find nearby peers with mDNS / DNS-SD.

The trio service that drives python-zeroconf, :class:`LanDiscovery`. What is announced
and how it is checked is the sans-I/O core in :mod:`p2pd.lan_announcement` (docstring
there, format in docs/PROTOCOL.md, "LAN discovery"); which addresses are announced is
:mod:`p2pd.netif`. Their public names are re-exported here, so ``from p2pd.discovery
import ...`` of any public name it had before the split still works.

Zeroconf runs its own thread and asyncio loop (``use_asyncio=False``); its blocking
calls are made through ``trio.to_thread.run_sync``, and its browser callback only
forwards ``(name, change)`` into a memory channel with ``trio.from_thread.run_sync``.
Every decision is taken in the trio task that reads that channel. What fails
verification is dropped with a log line (logger ``p2pd.discovery``, rate-limited).

zeroconf itself (about 3 MB of a daemon's memory) is imported by :meth:`LanDiscovery.run`
and :func:`zeroconf_interfaces`, not with this module: a daemon with ``--lan off`` never
loads it.
"""

from __future__ import annotations

import collections
import enum
import functools
import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import trio

if TYPE_CHECKING:
    from zeroconf import (
        InterfaceChoice,
        IPVersion,
        ServiceBrowser,
        ServiceInfo,
        ServiceStateChange,
        Zeroconf,
    )

from .config import LanConfig
from .errors import InvalidAddress, WireError
from .identity import Identity
from .lan_announcement import (
    MAX_CONTACTS_SCANNED,
    MAX_TXT_KEYS,
    MAX_TXT_SIZE,
    NONCE_LEN,
    SERVICE_TYPE,
    Announcement,
    LanAnnouncementError,
    LanNotAContact,
    LanPeer,
    LanPeerTable,
    LanPinConflict,
    Mode,
    TagScanBudget,
    TagScanSkipped,
    build_txt,
    decode_announcement,
    decode_txt,
    encode_txt,
    epoch_day,
    lan_tag,
    parse_txt,
    recognise_tag,
    verify_announcement,
)
from .netif import announced_hosts, is_wildcard, local_ips
from .wire import Address

log = logging.getLogger(__name__)


__all__ = [
    "MAX_TXT_KEYS",
    "MAX_TXT_SIZE",
    "SERVICE_TYPE",
    "Announcement",
    "LanAnnouncementError",
    "LanDiscovery",
    "LanNotAContact",
    "LanPeer",
    "LanPeerTable",
    "LanPinConflict",
    "announced_hosts",
    "build_txt",
    "decode_announcement",
    "decode_txt",
    "encode_txt",
    "epoch_day",
    "lan_tag",
    "local_ips",
    "parse_txt",
    "recognise_tag",
    "verify_announcement",
    "zeroconf_interfaces",
]


# --------------------------------------------------------------------------- interfaces


def zeroconf_interfaces(
    listen: Sequence[Address], configured: Sequence[str]
) -> tuple[list[str] | InterfaceChoice, IPVersion | None]:
    """``(interfaces, ip_version)`` for ``Zeroconf()``: where the node listens.

    Configured interface addresses win. A wildcard listen address means every interface
    (IPv4 only for 0.0.0.0; both for ::). Otherwise the interfaces of the listen addresses;
    ``None`` lets zeroconf pick the IP version from that list.
    """
    from zeroconf import InterfaceChoice, IPVersion

    if configured:
        return list(configured), None
    hosts = [a.host for a in listen]
    if any(is_wildcard(h) for h in hosts):
        v6 = any(is_wildcard(h) and ":" in h for h in hosts)
        return InterfaceChoice.All, (IPVersion.All if v6 else IPVersion.V4Only)
    return sorted(set(hosts)), None


# --------------------------------------------------------------------------- the service


class _LogLimiter:
    """At most ``burst`` lines a minute about peers' garbage, whoever sends it."""

    def __init__(self, burst: int = 20) -> None:
        self._burst = burst
        self._window = 0.0
        self._count = 0
        self._suppressed = 0

    def __call__(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window >= 60:
            if self._suppressed:
                log.info("mDNS: %d more refused announcements not logged", self._suppressed)
            self._window, self._count, self._suppressed = now, 0, 0
        if self._count < self._burst:
            self._count += 1
            log.log(level, msg, *args)
        else:
            self._suppressed += 1


class _Event(enum.Enum):
    CHANGED = "changed"
    REMOVED = "removed"


PeerCallback = Callable[[str, LanPeer], None]


class LanDiscovery:
    """Announce this node and browse for peers on the LAN (a trio service).

    ``await nursery.start(discovery.run)`` returns once zeroconf's sockets are open and the
    browser runs; the announcement itself goes out in the background (probing takes about
    two seconds; :meth:`wait_announced`). Cancelling ``run`` withdraws the announcement
    (goodbye packets, RFC 6762 section 10.1) and closes zeroconf.

    ``contacts()`` (pinned key -> handle) and ``pins(handle)`` are called on the trio
    thread, so they may read the daemon's SQLite connection. ``on_peer(event, peer)``,
    event one of ``added``, ``updated``, ``removed``, is called on the trio thread too and
    must not block.
    """

    def __init__(
        self,
        identity: Identity,
        config: LanConfig,
        *,
        port: int,
        addresses: list[Address],
        contacts: Callable[[], Mapping[bytes, str]],
        pins: Callable[[str], bytes | None],
        on_peer: PeerCallback | None = None,
        on_pin_conflict: Callable[[str, bytes, str], object] | None = None,
    ) -> None:
        self._identity = identity
        #: (handle, key, mDNS instance name) of an announcement that claims a pinned
        #: handle with another key: the daemon keeps it as evidence.
        self._on_pin_conflict = on_pin_conflict
        self._config = config
        self._port = port
        self._listen = list(addresses)
        self._contacts = contacts
        self._pins = pins
        self._on_peer = on_peer
        self._table = LanPeerTable(
            identity.public_key,
            max_peers=config.max_peers,
            stale_after=config.max_clock_skew + config.ttl,
        )
        self._tags = TagScanBudget(
            config.max_tag_scans_per_minute, per_source=config.max_tag_scans_per_source
        )
        self._complain = _LogLimiter()
        # Our current and recent instance names: the browser reports them too.
        self._own_names: collections.deque[str] = collections.deque(maxlen=4)
        self._announced = trio.Event()
        self._info: ServiceInfo | None = None
        self._resolving: set[str] = set()
        self._again: set[str] = set()
        self._dropped_events = 0
        self._contacts_cache: tuple[float, Mapping[bytes, str]] | None = None
        self._stats: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ public

    def peers(self) -> list[LanPeer]:
        return self._table.peers()

    async def wait_announced(self) -> None:
        """Return once our first announcement has been sent."""
        await self._announced.wait()

    def statistics(self) -> dict[str, int]:
        """``peers``, ``dropped_events``, the refusals (``refused``, ``not_a_contact``:
        a contacts-mode announcement none of our pins made), ``unresolved``, and the
        tag-scan budget's counters (p2pd.lan_announcement.TagScanBudget.stats)."""
        return {
            "peers": len(self._table),
            "dropped_events": self._dropped_events,
            "not_a_contact": 0,
            "tag_scans_skipped": 0,
            **self._stats,
            **self._tags.stats,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._config.mode == "off":
            task_status.started()
            await trio.sleep_forever()
        from zeroconf import ServiceBrowser, ServiceStateChange

        send, receive = trio.open_memory_channel[tuple[str, _Event]](self._config.max_pending)
        token = trio.lowlevel.current_trio_token()

        def deliver(item: tuple[str, _Event]) -> None:  # runs in trio
            try:
                send.send_nowait(item)
            except trio.WouldBlock:
                self._dropped_events += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

        def on_change(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:  # runs in zeroconf's browser thread: forward, touch nothing
            event = _Event.REMOVED if state_change is ServiceStateChange.Removed else _Event.CHANGED
            try:
                trio.from_thread.run_sync(deliver, (name, event), trio_token=token)
            except (trio.RunFinishedError, trio.Cancelled):
                pass
            except Exception:  # an exception here would end zeroconf's browser thread
                log.exception("mDNS: could not hand an event to trio")

        interfaces, ip_version = zeroconf_interfaces(self._listen, self._config.interfaces)
        try:
            zc = await trio.to_thread.run_sync(_open_zeroconf, interfaces, ip_version)
        except (OSError, RuntimeError, ValueError) as exc:
            # No usable multicast interface (or port 5353 refused): the node works without
            # LAN discovery, so say so and carry on rather than fail the daemon.
            log.warning("mDNS: LAN discovery is off: cannot open zeroconf: %s", exc)
            self._stats["disabled"] = 1
            task_status.started()
            await trio.sleep_forever()
        browser: ServiceBrowser | None = None
        try:
            browser = await trio.to_thread.run_sync(
                lambda: ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._announce_loop, zc)
                nursery.start_soon(self._liveness_loop, deliver)
                task_status.started()
                await self._handle_events(zc, receive)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self._config.close_timeout):
                await trio.to_thread.run_sync(
                    self._close, zc, browser, self._info, abandon_on_cancel=True
                )
            send.close()

    # ------------------------------------------------------------------ announcing

    def _new_info(self, name: str, server: str) -> ServiceInfo:
        from zeroconf import ServiceInfo

        hosts = announced_hosts(self._listen, self._config.interfaces, local_ips())
        if not hosts:
            raise LanAnnouncementError("no address to announce")
        now = int(time.time())
        mode: Mode = "contacts" if self._config.mode == "contacts" else "everyone"
        nonce = secrets.token_bytes(NONCE_LEN) if mode == "contacts" else None
        props = build_txt(
            self._identity, port=self._port, addresses=hosts, mode=mode, now=now, nonce=nonce
        )
        return ServiceInfo(
            SERVICE_TYPE,
            name,
            port=self._port,
            properties=encode_txt(props),
            server=server,
            host_ttl=self._config.ttl,
            other_ttl=self._config.ttl,
            parsed_addresses=hosts,
        )

    @staticmethod
    def _random_names() -> tuple[str, str]:
        # Random, in both modes: an instance name never carries the handle (contacts mode
        # must not leak it; everyone mode gains nothing and would collide between two
        # nodes claiming the same handle), nor the machine's host name.
        label = secrets.token_hex(8)
        return f"p2pd-{label}.{SERVICE_TYPE}", f"p2pd-{label}.local."

    async def _announce_loop(self, zc: Zeroconf) -> None:
        # zeroconf's register/update/unregister take as long as their probes and repeated
        # broadcasts (about 1.7 s, 0.45 s, 0.25 s). They run in zeroconf's loop through
        # _in_zeroconf, which cancels them there when we are cancelled: a daemon stopped
        # while it still probes does not wait for the probes, and what they leave
        # registered is withdrawn by _close (zeroconf's close says goodbye for it).
        day: int | None = None
        while True:
            today = epoch_day(time.time())
            try:
                if self._info is None or (self._config.mode == "contacts" and today != day):
                    # Contacts mode takes new names every day, so that nothing in the
                    # records we choose stays the same from one day to the next. The new
                    # instance is registered before the old one says goodbye: contacts see
                    # one peer under two names for a moment, not a departure.
                    old = self._info
                    name, server = self._random_names()
                    info = self._new_info(name, server)
                    self._own_names.append(name)
                    await _in_zeroconf(zc, functools.partial(zc.async_register_service, info))
                    self._info, day = info, today
                    log.info("mDNS: announcing %s on the LAN", name)
                    if old is not None:
                        await _in_zeroconf(zc, functools.partial(zc.async_unregister_service, old))
                else:
                    info = self._new_info(self._info.name, self._info.server or "")
                    await _in_zeroconf(zc, functools.partial(zc.async_update_service, info))
                    self._info = info
                self._announced.set()
            except Exception as exc:  # zeroconf's own errors: log, try again later
                log.warning("mDNS: could not announce: %r", exc)
            await trio.sleep(self._config.announce_interval)

    @staticmethod
    def _close(zc: Zeroconf, browser: ServiceBrowser | None, info: ServiceInfo | None) -> None:
        try:
            if browser is not None:
                browser.cancel()
            if info is not None:
                zc.unregister_service(info)  # goodbye: TTL 0 (RFC 6762 section 10.1)
        except Exception as exc:
            log.warning("mDNS: could not withdraw the announcement: %r", exc)
        finally:
            # Says goodbye for whatever is still registered too: an instance whose
            # registration was cancelled after its probes, an old contacts-mode name.
            zc.close()

    # ------------------------------------------------------------------ browsing

    async def _liveness_loop(self, deliver: Callable[[tuple[str, _Event]], None]) -> None:
        """Ask again about peers not heard from for a TTL; drop the long silent.

        A live peer re-announces more often than its TTL (LanConfig.announce_interval), so
        a peer silent for a whole TTL has its records expired from zeroconf's cache; the
        resolve then queries the network, and a peer that does not answer is forgotten.
        The browser's own "Removed" comes only with a goodbye or when the PTR record
        expires, which python-zeroconf stretches to at least 1125 s.
        """
        ttl = self._config.ttl
        while True:
            await trio.sleep(min(ttl / 4, 30.0))
            now = time.time()
            for peer in self._table.expire(now):
                log.info("mDNS: %s no longer announced", peer.handle)
                self._notify("removed", peer)
            for name in self._table.names_silent_since(now - ttl):
                deliver((name, _Event.CHANGED))

    async def _handle_events(
        self, zc: Zeroconf, receive: trio.MemoryReceiveChannel[tuple[str, _Event]]
    ) -> None:
        limiter = trio.CapacityLimiter(self._config.max_concurrent_resolves)
        async with trio.open_nursery() as nursery:
            async for name, event in receive:
                if name in self._own_names:
                    continue
                if event is _Event.REMOVED:
                    self._forget(name)
                elif name in self._resolving:
                    self._again.add(name)  # resolve once more when the current one ends
                elif len(self._resolving) >= self._config.max_pending:
                    self._dropped_events += 1
                else:
                    self._resolving.add(name)
                    nursery.start_soon(self._resolve, zc, name, limiter)

    async def _resolve(self, zc: Zeroconf, name: str, limiter: trio.CapacityLimiter) -> None:
        try:
            while True:
                self._again.discard(name)
                async with limiter:
                    info = await trio.to_thread.run_sync(
                        _get_service_info,
                        zc,
                        name,
                        int(self._config.resolve_timeout * 1000),
                        abandon_on_cancel=True,
                    )
                if info is None:
                    self._stats["unresolved"] += 1
                    log.debug("mDNS: %r did not answer", name[:80])
                    self._forget(name)
                else:
                    self.consider(name, *info, now=time.time())
                if name not in self._again:
                    return
        finally:
            self._resolving.discard(name)
            self._again.discard(name)

    def consider(
        self, name: str, text: bytes, port: int, hosts: Sequence[str], *, now: float
    ) -> None:
        """Verify what instance ``name`` announces and update the peers (trio thread).

        Public so that tests and the namespace testbed can feed it records directly.
        """
        sources: list[Address] = []
        for host in hosts:
            try:
                sources.append(Address(host, port))
            except InvalidAddress:
                continue
        try:
            announcement = decode_announcement(
                decode_txt(text), now=now, max_clock_skew=self._config.max_clock_skew
            )
            contacts = self._contacts_for(announcement, hosts, now)
            peer = verify_announcement(
                announcement,
                source_addresses=sources,
                now=now,
                contacts=contacts,
                pins=self._pins,
            )
        except TagScanSkipped as exc:  # counted by the budget
            log.debug("mDNS: %r not judged: %s", name[:80], exc)
            return  # what we knew of it stays as it was
        except LanPinConflict as exc:
            self._stats["refused"] += 1
            self._complain(logging.WARNING, "%s (mDNS instance %r)", exc, name[:80])
            if self._on_pin_conflict is not None and exc.handle:
                self._on_pin_conflict(exc.handle, exc.key, f"mDNS {name[:80]}")
            self._forget(name)
            return
        except LanNotAContact:
            self._stats["not_a_contact"] += 1
            log.debug("mDNS: %r is nobody we know", name[:80])
            self._forget(name)
            return
        except WireError as exc:
            self._stats["refused"] += 1
            self._complain(logging.INFO, "mDNS: ignored instance %r: %s", name[:80], exc)
            self._forget(name)
            return
        event = self._table.update(name, peer)
        if event is not None:
            self._notify(event, peer)

    def forget(self, name: str) -> None:
        """The browser says instance ``name`` is gone (goodbye or TTL expiry)."""
        self._forget(name)

    def _forget(self, name: str) -> None:
        peer = self._table.remove(name)
        if peer is not None:
            log.info("mDNS: %s left", peer.handle)
            self._notify("removed", peer)

    def _contacts_for(
        self, announcement: Announcement, hosts: Sequence[str], now: float
    ) -> Mapping[bytes, str]:
        """The pinned keys a contacts-mode announcement is tried against (the budget:
        p2pd.lan_announcement.TagScanBudget). Its source is the first of its A/AAAA
        addresses that it signs; one with none is refused before any scan (as
        verify_announcement would refuse it after)."""
        if announcement.mode != "contacts":
            return {}
        assert announcement.nonce is not None and announcement.tag is not None
        signed = set(announcement.hosts)
        source = next((h for h in hosts if h in signed), None)
        if source is None:
            raise LanAnnouncementError("none of the announced addresses is signed")
        contacts = self._contacts_snapshot()
        if len(contacts) > MAX_CONTACTS_SCANNED:
            self._complain(
                logging.WARNING,
                "mDNS: %d contacts; only the first %d are recognised on the LAN",
                len(contacts),
                MAX_CONTACTS_SCANNED,
            )
        key = self._tags.recognise(
            announcement.nonce,
            announcement.tag,
            epoch_day(announcement.issued),
            contacts,
            source=source,
            now=now,
        )
        if key is None or key not in contacts:
            raise LanNotAContact("contacts-mode announcement from no contact of ours")
        return {key: contacts[key]}

    def _contacts_snapshot(self) -> Mapping[bytes, str]:
        """``contacts()``, read at most every few seconds: a burst of announcements (or
        of replays of one) must not read the whole contact list each time. A contact
        removed meanwhile is still caught: verify_announcement asks ``pins`` too."""
        now = time.monotonic()
        if self._contacts_cache is None or now - self._contacts_cache[0] > 5.0:
            self._contacts_cache = (now, self._contacts())
        return self._contacts_cache[1]

    def _notify(self, event: str, peer: LanPeer) -> None:
        if self._on_peer is None:
            return
        try:
            self._on_peer(event, peer)
        except Exception:
            log.exception("mDNS: on_peer callback failed")


# --------------------------------------------------------------------------- zeroconf glue

#: A register, update or unregister that takes longer fails (and is tried again at the
#: next announcement); each takes about 2 s at most when zeroconf's loop is well.
ZEROCONF_CALL_TIMEOUT: Final = 15.0


async def _in_zeroconf(
    zc: Zeroconf, call: Callable[[], Coroutine[Any, Any, Awaitable[object]]]
) -> None:
    """Make one of zeroconf's ``async_*_service`` calls in its loop and wait until its
    broadcasts are sent; cancellable.

    zeroconf's blocking ``register_service`` and friends do the same from a worker thread,
    but cannot be cancelled: a daemon stopped during the probes of its registration
    waited for them (up to 2 s) before it could even start to say goodbye. Cancelled
    here, the call is cancelled in zeroconf's loop too, and before anything we do next
    there (the goodbye, the close): the loop runs what it is handed in order.
    """
    import asyncio

    async def call_and_broadcasts() -> None:  # runs in zeroconf's loop
        broadcasts = await call()  # returns the task that sends the broadcasts
        await broadcasts  # cancelling us cancels it

    assert zc.loop is not None
    future = asyncio.run_coroutine_threadsafe(call_and_broadcasts(), zc.loop)
    try:
        with trio.fail_after(ZEROCONF_CALL_TIMEOUT):
            await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)
    finally:
        future.cancel()  # done: nothing; else it stops, and so does the abandoned thread


# These run in trio worker threads.


def _open_zeroconf(
    interfaces: list[str] | InterfaceChoice, ip_version: IPVersion | None
) -> Zeroconf:
    from zeroconf import Zeroconf

    kwargs: dict[str, Any] = {"interfaces": interfaces, "ip_version": ip_version}
    # zeroconf >= 0.154 lets us say so; older ones start their own thread anyway because
    # no asyncio loop runs in this worker thread.
    if "use_asyncio" in inspect.signature(Zeroconf.__init__).parameters:
        kwargs["use_asyncio"] = False
    return Zeroconf(**kwargs)


def _get_service_info(
    zc: Zeroconf, name: str, timeout_ms: int
) -> tuple[bytes, int, list[str]] | None:
    """SRV, TXT and A/AAAA of one instance (from zeroconf's cache, else asked for)."""
    info = zc.get_service_info(SERVICE_TYPE, name, timeout=timeout_ms)
    if info is None or info.port is None:
        return None
    return bytes(info.text or b""), int(info.port), info.parsed_addresses()
