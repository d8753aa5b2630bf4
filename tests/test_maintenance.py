"""The node's upkeep on deadlines (p2pd/maintenance.py): the pure schedule, and
Node.maintain under trio's autojump clock, with the DHT, the sessions and the network
work replaced by recorders; and the real DHT's call when its last contact goes."""

from __future__ import annotations

import sqlite3
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, cast

import trio
import trio.testing

from p2pd.address_hints import AddressHints
from p2pd.config import DHTConfig, NodeConfig
from p2pd.daemon import Node
from p2pd.dht import NodeKey, open_dht
from p2pd.dht.routing import Node as Contact
from p2pd.identity import Identity
from p2pd.maintenance import (
    BUNDLE_REPUBLISH_MIN,
    REJOIN_INTERVAL,
    UPKEEP_INTERVAL,
    MaintenanceSchedule,
    Wakeup,
)
from p2pd.store import open_database
from p2pd.testing.swarm import loopback_address
from p2pd.transport.udp import UdpEndpoint

HOUR = 3600.0


def schedule(now: float = 0.0) -> MaintenanceSchedule:
    return MaintenanceSchedule(now, republish_interval=HOUR, save_contacts_interval=300.0)


def test_the_next_deadline_is_the_earliest_thing_due() -> None:
    s = schedule()
    assert s.next_deadline(alone=False, bundle_changed=False) == UPKEEP_INTERVAL
    assert s.next_deadline(alone=True, bundle_changed=False) == REJOIN_INTERVAL
    assert s.next_deadline(alone=False, bundle_changed=True) == BUNDLE_REPUBLISH_MIN
    assert not s.due(5.0, alone=True, bundle_changed=True)
    due = s.due(UPKEEP_INTERVAL, alone=True, bundle_changed=True)
    assert due.join and due.publish and due.upkeep and not due.save_contacts
    s.kept_up(UPKEEP_INTERVAL)
    s.published(UPKEEP_INTERVAL)
    s.joined(UPKEEP_INTERVAL)
    assert s.next_deadline(alone=False, bundle_changed=False) == 2 * UPKEEP_INTERVAL
    s.saved_contacts(300.0)
    s.kept_up(HOUR)
    assert s.due(HOUR + UPKEEP_INTERVAL, alone=False, bundle_changed=False).publish


def test_a_publish_that_reached_too_few_replicas_is_tried_again_soon() -> None:
    """A store that met only timeouts (a busy moment) left our record nowhere: until it
    is stored, a rival's claim would be the first the network sees. Published again
    after BUNDLE_REPUBLISH_MIN, as a changed record is, not an hour later."""
    s = schedule()
    s.published(0.0)
    s.stored(3, 20)  # under half of the k (20) it could reach
    assert s.next_deadline(alone=False, bundle_changed=False) == BUNDLE_REPUBLISH_MIN
    assert not s.due(BUNDLE_REPUBLISH_MIN - 1, alone=False, bundle_changed=False).publish
    assert s.due(BUNDLE_REPUBLISH_MIN, alone=False, bundle_changed=False).publish
    s.published(BUNDLE_REPUBLISH_MIN)
    s.stored(0, 20)  # short again: the wait doubles (replicas that refuse us cost less)
    assert s.next_deadline(alone=False, bundle_changed=False) == 3 * BUNDLE_REPUBLISH_MIN
    s.published(3 * BUNDLE_REPUBLISH_MIN)
    s.stored(10, 20)  # half: stored
    assert not s.due(4 * BUNDLE_REPUBLISH_MIN, alone=False, bundle_changed=False).publish
    assert s.due(3 * BUNDLE_REPUBLISH_MIN + HOUR, alone=False, bundle_changed=False).publish
    s.published(HOUR)
    s.stored(2, 3)  # a small network: 2 of the 3 it knows
    assert not s.due(HOUR + BUNDLE_REPUBLISH_MIN, alone=False, bundle_changed=False).publish
    s.stored(0, 0)  # alone: nothing it could reach (the rejoin publishes after it)
    assert not s.due(HOUR + BUNDLE_REPUBLISH_MIN, alone=False, bundle_changed=False).publish


def test_a_join_request_counts_only_while_alone() -> None:
    s = schedule()
    s.request_join()
    assert s.next_deadline(alone=True, bundle_changed=False) < 0  # now
    assert s.due(1.0, alone=True, bundle_changed=False).join
    s.request_join()
    assert not s.due(1.0, alone=False, bundle_changed=False)  # connected: nothing to do
    assert not s.due(1.0, alone=True, bundle_changed=False).join  # and it is spent


class FakeSessions:
    def __init__(self) -> None:
        self.bundle_changed = False
        self.maintained = 0

    def maintain(self, now: float) -> bool:
        self.maintained += 1
        return False


class FakeDHT:
    def __init__(self) -> None:
        self.size = 5
        self.looks = 0

    def statistics(self) -> dict[str, Any]:
        self.looks += 1
        return {"routing_table_size": self.size}


class RecordingNode(Node):
    """Node.maintain as it is; what it calls records the time instead."""

    done: list[tuple[str, float]]

    async def join(self) -> int:
        self.done.append(("join", trio.current_time()))
        self._schedule.joined(trio.current_time())
        return cast(FakeDHT, self.dht).size

    async def publish(self) -> int:
        self.done.append(("publish", trio.current_time()))
        self._schedule.published(trio.current_time())
        cast(FakeSessions, self.delivery.sessions).bundle_changed = False
        return 1

    async def save_contacts(self) -> int:
        self.done.append(("save", trio.current_time()))
        return 0


def recording_node(tmp_path: Path) -> tuple[RecordingNode, FakeDHT, FakeSessions, Wakeup]:
    dht, sessions, wakeup = FakeDHT(), FakeSessions(), Wakeup()
    delivery: Any = type("FakeDelivery", (), {"sessions": sessions, "events": None})()
    none: Any = None
    node = RecordingNode(
        NodeConfig(home=tmp_path),
        Identity.generate("alice"),
        cast(sqlite3.Connection, none),
        endpoint=none, dht=dht, quic=none, delivery=delivery, calls=none, lan=None,
        schedule=schedule(trio.current_time()), wakeup=wakeup, rotation=None,
        hints=AddressHints(open_database(None)),
    )  # fmt: skip
    node.done = []
    return node, dht, sessions, wakeup


def times(node: RecordingNode, what: str) -> list[float]:
    return [t for done, t in node.done if done == what]


async def test_maintain_sleeps_until_something_is_due(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    node, dht, sessions, _ = recording_node(tmp_path)
    with trio.move_on_after(HOUR + 1):
        await node.maintain()
    assert times(node, "publish") == [HOUR]
    assert times(node, "save") == [300.0 * i for i in range(1, 13)]
    assert sessions.maintained == HOUR / UPKEEP_INTERVAL
    # one look at the routing table before and after each sleep; a 5 s poll made 720
    assert dht.looks <= 2 * (HOUR / UPKEEP_INTERVAL + 1)


async def test_maintain_wakes_for_a_changed_bundle_and_a_lan_peer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    node, dht, sessions, wakeup = recording_node(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.maintain)
        await trio.sleep(30)
        sessions.bundle_changed = True  # a one-time prekey used: republished now
        wakeup.set()
        await trio.sleep(3)
        sessions.bundle_changed = True  # again: not before BUNDLE_REPUBLISH_MIN
        wakeup.set()
        await trio.sleep(20)
        assert times(node, "publish") == [30, 30 + BUNDLE_REPUBLISH_MIN]
        # Alone from now on: seen at the next upkeep (the publish at 40 did the last
        # one), then a join every REJOIN_INTERVAL.
        dht.size = 0
        await trio.sleep(UPKEEP_INTERVAL + REJOIN_INTERVAL)
        assert times(node, "join") == [40 + UPKEEP_INTERVAL, 40 + UPKEEP_INTERVAL + REJOIN_INTERVAL]
        node._schedule.request_join()  # a LAN peer appeared: join through it at once
        wakeup.set()
        await trio.sleep(0)
        await trio.testing.wait_all_tasks_blocked()
        assert node.done[-1] == ("join", trio.current_time())
        nursery.cancel_scope.cancel()


async def test_maintain_publishes_again_soon_after_a_publish_that_fell_short(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    node, _, _, _ = recording_node(tmp_path)
    copies = [0, 0, 20]  # two stores that reach no replica, then one that does

    async def publish() -> int:
        node.done.append(("publish", trio.current_time()))
        node._schedule.published(trio.current_time())
        node._schedule.stored(copies.pop(0), 20)
        return 1

    node._schedule.stored(0, 20)  # the start's publish fell short too
    node.publish = publish  # type: ignore[method-assign]
    with trio.move_on_after(HOUR / 2):
        await node.maintain()
    short = BUNDLE_REPUBLISH_MIN  # each short one in a row doubles the wait
    assert times(node, "publish") == [short, 3 * short, 7 * short]  # then stored: no more


async def test_maintain_rejoins_as_soon_as_the_dht_says_it_is_alone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    node, dht, _, wakeup = recording_node(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.maintain)
        await trio.sleep(100)  # connected: nothing to join
        assert times(node, "join") == []
        dht.size = 0  # the last contact evicted: the DHT's on_alone
        wakeup.set()
        await trio.sleep(0)
        await trio.testing.wait_all_tasks_blocked()
        assert times(node, "join") == [100]  # not at the next upkeep (120)
        nursery.cancel_scope.cancel()


async def test_the_dht_says_when_its_last_contact_goes() -> None:
    """Real DHT nodes on loopback: a's only contact b goes silent; the failed requests
    that evict it tell a's maintenance at once (before, it noticed at the next upkeep,
    up to a minute later, and only then began to rejoin)."""
    told: list[float] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            nodes = []
            for i in range(2):
                endpoint = UdpEndpoint.bind(loopback_address(60 + i))
                stack.callback(endpoint.close)
                on_alone = (lambda: told.append(trio.current_time())) if i == 0 else None
                dht = await stack.enter_async_context(
                    open_dht(
                        node_key=NodeKey.generate(),
                        conn=None,
                        config=DHTConfig(rpc_timeout=0.5),
                        transport=endpoint,
                        on_alone=on_alone,
                    )
                )
                await nursery.start(endpoint.serve, dht.datagram_received)
                nodes.append((endpoint, dht))
            (_, a), (b_endpoint, b) = nodes
            assert await a.bootstrap([b_endpoint.local_address]) == 1
            assert a.statistics()["routing_table_size"] == 1 and told == []
            contact = Contact(
                b.node_id, b_endpoint.local_address.host, b_endpoint.local_address.port
            )
            b_endpoint.close()  # b goes silent
            for _ in range(DHTConfig().failures_before_eviction):
                assert told == []  # not before its last failure
                assert await a.gather([(contact, "ping", [])]) == [None]
            assert a.statistics()["routing_table_size"] == 0
            assert len(told) == 1
            nursery.cancel_scope.cancel()
