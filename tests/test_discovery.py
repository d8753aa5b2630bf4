"""LAN discovery: the zeroconf service, p2pd.discovery.LanDiscovery, its decisions fed
with records directly. Nothing here opens a socket: tests that send mDNS run in network
namespaces (tests/test_lan.py, tests/test_lan_avahi.py), never from the root namespace.
The pure core is tested in tests/test_lan_announcement.py."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, cast

import pytest
import trio
from lan_helpers import ALICE, BOB, HOSTS, MALLORY, NOW, PORT, contacts_of, no_pins, pins_of, txt
from zeroconf import InterfaceChoice, IPVersion

from p2pd import discovery
from p2pd.config import LanConfig
from p2pd.discovery import LanDiscovery, LanPeer, build_txt, encode_txt, zeroconf_interfaces
from p2pd.errors import UsageError
from p2pd.identity import Identity
from p2pd.wire import Address

# --------------------------------------------------------------------------- interfaces


def test_zeroconf_interfaces() -> None:
    assert zeroconf_interfaces([Address("0.0.0.0", 1)], ()) == (
        InterfaceChoice.All,
        IPVersion.V4Only,
    )
    assert zeroconf_interfaces([Address("::", 1)], ()) == (InterfaceChoice.All, IPVersion.All)
    assert zeroconf_interfaces([Address("192.0.2.1", 1)], ()) == (["192.0.2.1"], None)
    assert zeroconf_interfaces([Address("0.0.0.0", 1)], ("10.1.2.3",)) == (["10.1.2.3"], None)


def test_lan_config() -> None:
    assert LanConfig().mode == "everyone"
    for bad in (
        {"mode": "all"},
        {"interfaces": ("eth0",)},
        {"ttl": 5},
        {"announce_interval": 400.0},
        {"max_peers": 0},
    ):
        with pytest.raises(UsageError):
            LanConfig(**bad)


# ------------------------------------------------------------------ the service, fed directly


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __call__(self, event: str, peer: LanPeer) -> None:
        self.events.append((event, peer.handle))


def _service(
    *,
    mode: str = "everyone",
    contacts: Mapping[bytes, str] | None = None,
    pins: Callable[[str], bytes | None] = no_pins,
    **config: object,
) -> tuple[LanDiscovery, Recorder]:
    recorder = Recorder()
    service = LanDiscovery(
        BOB,
        LanConfig(mode=mode, **config),  # type: ignore[arg-type]
        port=PORT,
        addresses=[Address("0.0.0.0", PORT)],
        contacts=lambda: contacts or {},
        pins=pins,
        on_peer=recorder,
    )
    return service, recorder


def test_service_consider_and_forget(caplog: pytest.LogCaptureFixture) -> None:
    service, recorder = _service(pins=pins_of(ALICE))
    service.consider("a._p2pd._udp.local.", txt(), PORT, HOSTS, now=NOW)
    service.consider("a._p2pd._udp.local.", txt(now=NOW + 300), PORT, HOSTS, now=NOW + 300)
    [peer] = service.peers()
    assert (peer.handle, peer.pinned, peer.last_seen) == ("alice", True, NOW + 300)
    # our own announcement, heard back, is not a peer
    service.consider("b._p2pd._udp.local.", txt(BOB), PORT, HOSTS, now=NOW)
    assert len(service.peers()) == 1
    # an impostor of a pinned handle: warning, ignored
    impostor = Identity.from_seed("alice", b"\x09" * 32)
    with caplog.at_level(logging.WARNING, logger="p2pd.discovery"):
        service.consider("i._p2pd._udp.local.", txt(impostor), PORT, HOSTS, now=NOW)
    assert "pinned" in caplog.text
    # garbage: one log line, nothing else
    with caplog.at_level(logging.INFO, logger="p2pd.discovery"):
        service.consider("g._p2pd._udp.local.", b"\x03x=y", PORT, HOSTS, now=NOW)
    assert "ignored instance" in caplog.text
    assert [p.handle for p in service.peers()] == ["alice"]
    service.forget("a._p2pd._udp.local.")
    assert service.peers() == []
    assert recorder.events == [("added", "alice"), ("updated", "alice"), ("removed", "alice")]
    assert service.statistics()["refused"] == 2


def test_service_refused_update_drops_the_peer() -> None:
    service, recorder = _service()
    service.consider("a", txt(), PORT, HOSTS, now=NOW)
    service.consider("a", txt(now=NOW - 3600), PORT, HOSTS, now=NOW)  # stale now
    assert service.peers() == []
    assert recorder.events == [("added", "alice"), ("removed", "alice")]


CAROL = Identity.from_seed("carol", b"\x04" * 32)


def contacts_txt(identity: Identity, hosts: list[str], now: float, nonce: bytes) -> bytes:
    return encode_txt(
        build_txt(identity, port=PORT, addresses=hosts, mode="contacts", now=int(now), nonce=nonce)
    )


def test_service_contacts_mode_and_tag_budget() -> None:
    service, recorder = _service(
        contacts=contacts_of(BOB, ALICE, CAROL),
        pins=pins_of(ALICE, CAROL),
        max_tag_scans_per_minute=2,
    )

    def scans() -> int:
        return service.statistics()["tag_scans"]

    text = txt(mode="contacts")
    service.consider("a", text, PORT, HOSTS, now=NOW)
    service.consider("a", text, PORT, HOSTS, now=NOW + 1)  # same tag: remembered, no scan
    assert scans() == 1
    assert [p.handle for p in service.peers()] == ["alice"]
    stranger = txt(MALLORY, mode="contacts")
    service.consider("m", stranger, PORT, ["192.0.2.66"], now=NOW + 2)
    # its addresses are none it signs: refused before any scan
    assert scans() == 1 and service.statistics()["refused"] == 1
    stranger = contacts_txt(MALLORY, ["192.0.2.66"], NOW, b"\x05" * 16)
    service.consider("m", stranger, PORT, ["192.0.2.66"], now=NOW + 2)
    assert scans() == 2 and service.statistics()["not_a_contact"] == 1
    # budget spent: carol, never seen before, is not judged, and what we knew stays
    carol = contacts_txt(CAROL, ["192.0.2.12"], NOW, b"\x06" * 16)
    service.consider("c", carol, PORT, ["192.0.2.12"], now=NOW + 3)
    assert scans() == 2 and [p.handle for p in service.peers()] == ["alice"]
    assert service.statistics()["tag_scans_skipped"] == 1
    # alice, with a new nonce, is recognised among the contacts seen lately: no scan
    other = contacts_txt(ALICE, HOSTS, NOW, b"\x07" * 16)
    service.consider("a", other, PORT, HOSTS, now=NOW + 4)
    assert scans() == 2 and service.statistics()["tag_recent_hits"] == 1
    assert service.peers()[0].last_seen == NOW + 4
    # a minute later there is budget again, for carol
    service.consider("c", carol, PORT, ["192.0.2.12"], now=NOW + 61)
    assert scans() == 3 and {p.handle for p in service.peers()} == {"alice", "carol"}
    assert recorder.events == [
        ("added", "alice"), ("updated", "alice"), ("updated", "alice"), ("added", "carol")
    ]  # fmt: skip


def test_a_flood_from_one_address_does_not_hide_contacts() -> None:
    """90 junk contacts-mode announcements in a minute from one address (well formed,
    signed by random keys nobody pinned): a contact seen before is recognised again
    each time it announces a new nonce, and one never seen before, from another address,
    is recognised at its first announcement. The junk gets its address's 10 scans;
    the rest is counted, not scanned."""
    service, recorder = _service(contacts=contacts_of(ALICE, CAROL), pins=pins_of(ALICE, CAROL))
    service.consider("a", txt(mode="contacts"), PORT, HOSTS, now=NOW)  # alice, seen once
    flooder = ["192.0.2.66"]
    for i in range(90):
        junk = contacts_txt(Identity.generate("junk"), flooder, NOW, os.urandom(16))
        service.consider(f"j{i}", junk, PORT, flooder, now=NOW + i * 0.5)
        if i % 30 == 29:  # alice's next announcement, with a fresh nonce
            fresh = contacts_txt(ALICE, HOSTS, NOW, os.urandom(16))
            service.consider("a", fresh, PORT, HOSTS, now=NOW + i * 0.5)
            assert service.peers()[0].last_seen == NOW + i * 0.5
    carol = contacts_txt(CAROL, ["192.0.2.12"], NOW, os.urandom(16))
    service.consider("c", carol, PORT, ["192.0.2.12"], now=NOW + 50)
    assert {p.handle for p in service.peers()} == {"alice", "carol"}
    stats = service.statistics()
    assert stats["not_a_contact"] == 10  # the junk's address budget, each scanned...
    assert stats["tag_scans_skipped_source"] == 80  # ...the rest not
    assert stats["tag_recent_hits"] == 3 and stats["tag_scans"] == 12
    assert ("added", "carol") in recorder.events


async def test_mode_off_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_zeroconf(*args: object) -> None:
        raise AssertionError("mode off must not open zeroconf")

    monkeypatch.setattr(discovery, "_open_zeroconf", no_zeroconf)
    service, _ = _service(mode="off")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            assert service.peers() == []
            nursery.cancel_scope.cancel()


async def test_no_multicast_interface_leaves_the_node_running(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_interfaces(*args: object) -> None:
        raise RuntimeError("No interfaces to listen on")

    monkeypatch.setattr(discovery, "_open_zeroconf", no_interfaces)
    service, _ = _service()
    with trio.fail_after(5), caplog.at_level(logging.WARNING, logger="p2pd.discovery"):
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            assert service.statistics()["disabled"] == 1
            nursery.cancel_scope.cancel()
    assert "LAN discovery is off" in caplog.text


class _LoopInAThread:
    """What :func:`discovery._in_zeroconf` uses of a Zeroconf: ``loop``, an asyncio loop
    running in a thread of its own, as zeroconf's does (no socket is opened)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class _SlowRegistration:
    """Stands in for ``Zeroconf.async_register_service``: probes (sleeps), then returns
    the task that broadcasts (sleeps again). Records the phases reached and cancelled."""

    def __init__(self, probing: float, broadcasting: float) -> None:
        self.seconds = {"probing": probing, "broadcasting": broadcasting}
        self.reached = {phase: threading.Event() for phase in self.seconds}
        self.cancelled: list[str] = []
        self.done = False

    async def _phase(self, phase: str) -> None:
        self.reached[phase].set()
        try:
            await asyncio.sleep(self.seconds[phase])
        except asyncio.CancelledError:
            self.cancelled.append(phase)
            raise

    async def _broadcasts(self) -> None:
        await self._phase("broadcasting")
        self.done = True

    async def __call__(self) -> asyncio.Future[None]:
        await self._phase("probing")
        return asyncio.ensure_future(self._broadcasts())


async def test_a_zeroconf_call_waits_for_its_broadcasts() -> None:
    zc = _LoopInAThread()
    try:
        call = _SlowRegistration(probing=0.05, broadcasting=0.05)
        with trio.fail_after(10):
            await discovery._in_zeroconf(cast(Any, zc), call)
        assert call.done and call.cancelled == []
    finally:
        zc.close()


@pytest.mark.parametrize("phase", ["probing", "broadcasting"])
async def test_a_cancelled_zeroconf_call_stops_in_zeroconfs_loop_at_once(phase: str) -> None:
    """A daemon stopped while it still registers does not wait for zeroconf's probes or
    announcements (which took up to 2 s): cancelled, the call is cancelled in zeroconf's
    loop, in whichever phase it is."""
    zc = _LoopInAThread()
    try:
        call = _SlowRegistration(
            probing=30.0 if phase == "probing" else 0.0,
            broadcasting=30.0,
        )
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(discovery._in_zeroconf, cast(Any, zc), call)
                assert await trio.to_thread.run_sync(call.reached[phase].wait, 5)
                cancelled_at = trio.current_time()
                nursery.cancel_scope.cancel()
            assert trio.current_time() - cancelled_at < 1.0
            while not call.cancelled:  # the cancellation is on its way to zeroconf's loop
                await trio.sleep(0.01)
        assert call.cancelled == [phase] and not call.done
    finally:
        zc.close()
