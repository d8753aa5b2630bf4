"""The port-mapping driver (p2pd/transport/portmap_driver.py) on loopback, against two
small PCP gateways of the test's own (127.x addresses, port 5351): it maps, says so in
``statistics``, maps again when its gateway announces a restart (another's announcement
is ignored), follows a change of default gateway (the old mapping deleted at the old
gateway first) and deletes its mapping when cancelled. The default-route reader on a
/proc/net/route of the test's own."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
import trio

from p2pd.transport import portmap_driver
from p2pd.transport.portmap_driver import PortMapping, default_gateway


class Gateway:
    """Answers PCP MAP requests: external 203.0.113.<n>, the suggested port; counts."""

    def __init__(self, host: str, n: int) -> None:
        self.host, self.n = host, n
        self.maps: list[int] = []  # requested lifetimes, in order
        self.sock: trio.socket.SocketType | None = None

    async def announce(self, to: tuple[str, int]) -> None:
        """A PCP ANNOUNCE (RFC 6887 14.1.3: a restart) from our port 5351."""
        assert self.sock is not None
        await self.sock.sendto(bytes([2, 0x80, 0, 0]) + bytes(20), to)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind((self.host, 5351))
            self.sock = sock
            task_status.started()
            for _ in range(1000):  # bounded
                data, source = await sock.recvfrom(2048)
                if len(data) != 60 or data[:2] != b"\x02\x01":
                    continue
                lifetime = struct.unpack_from("!I", data, 4)[0]
                self.maps.append(lifetime)
                header = bytes([2, 0x81, 0, 0]) + struct.pack("!II", lifetime, 1) + bytes(12)
                payload = data[24:44] + bytes(10) + b"\xff\xff" + bytes([203, 0, 113, self.n])
                await sock.sendto(header + payload, source)


def test_maps_follows_the_gateway_and_deletes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(portmap_driver, "ROUTE_CHECK", 0.2)
    net = f"127.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
    one, two = Gateway(f"{net}.1", 1), Gateway(f"{net}.2", 2)
    route = [(one.host, "127.0.0.1")]
    changes: list[int] = []
    announce_at = (f"{net}.9", random.randrange(20000, 60000))

    async def main() -> None:
        mapping = PortMapping(
            4747, lambda: changes.append(1), route=lambda: route[0], announcements=announce_at
        )
        async with trio.open_nursery() as gateways:
            await gateways.start(one.serve)
            await gateways.start(two.serve)
            async with trio.open_nursery() as nursery:
                await nursery.start(mapping.run)
                with trio.fail_after(5):
                    while mapping.mapped_address() is None:
                        await trio.sleep(0.02)
                stats = mapping.statistics()
                assert stats["mapped_address"] == "203.0.113.1:4747"
                assert stats["protocol"] == "pcp" and stats["gateway"] == one.host
                assert 7100 < stats["expires_in"] <= 7200
                # the gateway restarted and says so: the mapping is made again at once
                await one.announce(announce_at)
                with trio.fail_after(2):
                    while len(one.maps) < 2:
                        await trio.sleep(0.02)
                await two.announce(announce_at)  # not our gateway: ignored
                await trio.sleep(0.2)
                assert len(one.maps) == 2
                assert mapping.statistics()["counters"]["announce_dropped"] == 1
                route[0] = (two.host, "127.0.0.1")  # the laptop moved
                with trio.fail_after(5):
                    while str(mapping.mapped_address()) != "203.0.113.2:4747":
                        await trio.sleep(0.02)
                nursery.cancel_scope.cancel()  # a clean shutdown
            await trio.sleep(0.1)  # the gateways read what came
            gateways.cancel_scope.cancel()
        assert one.maps == [7200, 7200, 0]  # mapped, again, deleted when the gateway changed
        assert two.maps == [7200, 0]  # mapped, then deleted at shutdown

    trio.run(main)
    assert changes  # the daemon was woken to republish


@pytest.mark.parametrize(
    ("route", "listen_host"),
    [
        (None, None),  # no default gateway
        (("127.0.0.1", "127.0.0.5"), "127.0.0.6"),  # reached from another address of ours
    ],
)
def test_no_usable_gateway_sends_nothing(
    route: tuple[str, str] | None, listen_host: str | None
) -> None:
    async def main() -> None:
        mapping = PortMapping(
            4747, lambda: None, route=lambda: route, announcements=None, listen_host=listen_host
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(mapping.run)
            await trio.sleep(0.1)
            assert mapping.statistics()["gateway"] is None
            assert mapping.mapped_address() is None
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_default_gateway_from_proc_net_route(tmp_path: Path) -> None:
    route = tmp_path / "route"
    head = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    route.write_text(
        head
        + "eth0\t0001010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        + "eth0\t00000000\t0101010A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    )
    assert default_gateway(str(route)) == "10.1.1.1"
    route.write_text(head + "eth0\t0001010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    assert default_gateway(str(route)) is None
    assert default_gateway(str(tmp_path / "missing")) is None
