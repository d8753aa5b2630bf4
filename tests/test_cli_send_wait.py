"""`send --wait` follows the daemon's event stream: it returns when the `delivered` event
comes, asks the daemon only every DELIVERY_RECHECK seconds (in case that event was
dropped), and never polls. No daemon here: a fake one, on a fake clock that its event
stream moves. tests/test_cli_e2e.py runs the real thing."""

from __future__ import annotations

from typing import Any

import pytest

from p2pd_cli.commands.messages import DELIVERY_RECHECK, wait_delivered


class FakeDaemon:
    """Both control connections of the CLI: ``call`` answers ``message`` from the states
    the test set up, ``next_event`` hands out the events due, moving the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.delivered_at: dict[str, float] = {}  # when the daemon marks it delivered
        self.events: list[tuple[float, dict[str, Any]]] = []  # (due, event), in time order
        self.calls: list[str] = []

    def deliver(self, msg_id: str, after: float, *, event: bool = True) -> None:
        """``msg_id`` is delivered ``after`` seconds from now; ``event=False``: the event
        stream drops its `delivered` event (a slow reader of a busy daemon)."""
        self.delivered_at[msg_id] = self.now + after
        if event:
            note = {"event": "message_status", "id": msg_id, "state": "delivered"}
            self.events.append((self.now + after, note))
            self.events.sort(key=lambda e: e[0])

    def clock(self) -> float:
        return self.now

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self.calls.append(method)
        assert method == "message" and params is not None
        delivered = self.now >= self.delivered_at.get(params["id"], float("inf"))
        return {"id": params["id"], "state": "delivered" if delivered else "sent"}

    def next_event(self, timeout: float | None) -> dict[str, Any] | None:
        assert timeout is not None and timeout > 0  # never a busy loop
        if self.events and self.events[0][0] <= self.now + timeout:
            due, event = self.events.pop(0)
            self.now = max(self.now, due)
            return event
        self.now += timeout
        return None

    def wait(self, ids: list[str], timeout: float) -> set[str]:
        return wait_delivered(self, self, ids, timeout, clock=self.clock)  # type: ignore[arg-type]


@pytest.fixture()
def daemon() -> FakeDaemon:
    return FakeDaemon()


def test_returns_when_the_delivered_event_comes_without_asking(daemon: FakeDaemon) -> None:
    start = daemon.now
    daemon.events.append((start + 0.01, {"event": "message", "id": "other"}))  # not ours
    daemon.deliver("m1", after=0.2)
    assert daemon.wait(["m1"], timeout=60) == {"m1"}
    assert daemon.now == pytest.approx(start + 0.2)  # at once, not at the next look
    assert daemon.calls == []


def test_a_dropped_event_is_made_up_for_at_the_next_look(daemon: FakeDaemon) -> None:
    start = daemon.now
    daemon.deliver("m1", after=0.2, event=False)
    assert daemon.wait(["m1"], timeout=60) == {"m1"}
    assert daemon.now == pytest.approx(start + DELIVERY_RECHECK)
    assert daemon.calls == ["message"]


def test_times_out_asking_only_every_recheck_interval(daemon: FakeDaemon) -> None:
    start = daemon.now
    assert daemon.wait(["m1"], timeout=3) == set()
    assert daemon.now == pytest.approx(start + 3)
    # the 50 ms poll it replaces asked 60 times in 3 s
    assert len(daemon.calls) <= 3 / DELIVERY_RECHECK + 1


def test_many_messages_out_of_order_and_one_event_dropped(daemon: FakeDaemon) -> None:
    start = daemon.now
    daemon.deliver("m3", after=0.1)
    daemon.deliver("m1", after=0.2, event=False)
    daemon.deliver("m2", after=0.3)
    assert daemon.wait(["m1", "m2", "m3"], timeout=60) == {"m1", "m2", "m3"}
    # m1's dropped event is found at the first look; m2 and m3 were known by then
    assert daemon.now == pytest.approx(start + DELIVERY_RECHECK)
    assert daemon.calls == ["message"]


def test_partly_delivered_at_the_timeout(daemon: FakeDaemon) -> None:
    daemon.deliver("m2", after=0.1)
    assert daemon.wait(["m1", "m2"], timeout=2) == {"m2"}
