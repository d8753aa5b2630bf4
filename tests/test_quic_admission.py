"""Who gets a QUIC connection slot (p2pd.transport.quic.admission.SlotBudget): Retry
above the half-open threshold, per-address limits, the reserve for outgoing connections
and pinned contacts. Pure: no socket, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.config import QuicConfig
from p2pd.errors import UsageError
from p2pd.transport.quic.admission import Slot, SlotBudget, SlotKind, Verdict

SMALL = QuicConfig(
    max_connections=20,
    reserved_share=0.25,
    max_connections_per_address=3,
    max_half_open_per_address=2,
    retry_after_half_open=4,
)


def test_defaults_are_the_documented_ones() -> None:
    config = QuicConfig()
    assert (
        config.max_connections,
        config.reserved_share,
        config.max_connections_per_address,
        config.max_half_open_per_address,
        config.retry_after_half_open,
        config.half_open_timeout,
    ) == (1024, 0.25, 8, 4, 32, 3.0)
    assert SlotBudget(config).strangers_share == 768


def test_unvalidated_initials_get_a_retry_once_half_open_reaches_the_threshold() -> None:
    budget = SlotBudget(SMALL)
    for i in range(4):
        assert budget.incoming(f"10.0.0.{i}", validated=False) is Verdict.ADMIT
        budget.take_incoming(f"10.0.0.{i}")
    assert budget.half_open == 4
    assert budget.incoming("10.0.0.99", validated=False) is Verdict.RETRY
    # The same address with a valid token gets in: it receives where it claims to be.
    assert budget.incoming("10.0.0.99", validated=True) is Verdict.ADMIT


def test_per_address_limits_on_handshakes_and_connections() -> None:
    budget = SlotBudget(SMALL)
    slots = [budget.take_incoming("10.0.0.1") for _ in range(2)]
    assert budget.incoming("10.0.0.1", validated=True) is Verdict.REFUSE_ADDRESS
    assert budget.incoming("10.0.0.2", validated=True) is Verdict.ADMIT  # others unaffected
    for slot in slots:
        budget.established(slot, pinned=False)
    # Both handshakes done: a third connection from that address may start...
    assert budget.incoming("10.0.0.1", validated=True) is Verdict.ADMIT
    budget.established(budget.take_incoming("10.0.0.1"), pinned=False)
    # ... but not a fourth (max_connections_per_address = 3), pinned or not.
    assert budget.incoming("10.0.0.1", validated=True) is Verdict.REFUSE_ADDRESS
    budget.release(slots[0])
    assert budget.incoming("10.0.0.1", validated=True) is Verdict.ADMIT


def test_strangers_never_take_the_reserve_but_outgoing_and_pinned_do() -> None:
    budget = SlotBudget(SMALL)  # 20 slots, 15 for strangers and handshakes
    assert budget.strangers_share == 15
    strangers = []
    for i in range(15):
        host = f"10.0.1.{i}"
        assert budget.incoming(host, validated=True) is Verdict.ADMIT
        slot = budget.take_incoming(host)
        budget.established(slot, pinned=False)
        strangers.append(slot)
    assert budget.incoming("10.0.2.1", validated=True) is Verdict.REFUSE_FULL
    # Our own connections still have the other 5 slots.
    outgoing = [budget.take_outgoing(f"10.0.3.{i}") for i in range(5)]
    assert all(s is not None for s in outgoing)
    assert budget.take_outgoing("10.0.3.9") is None  # every slot taken
    released = outgoing.pop()
    assert released is not None
    budget.release(released)
    # A stranger leaving frees a place in the strangers' share for a handshake, which
    # moves to the reserve when it proves a pinned key.
    budget.release(strangers.pop())
    assert budget.incoming("10.0.4.1", validated=True) is Verdict.ADMIT
    contact = budget.take_incoming("10.0.4.1")
    budget.established(contact, pinned=True)
    assert contact.kind is SlotKind.PINNED
    assert budget.statistics()["slots_pinned"] == 1
    # The strangers' share has room again (14 of 15) for one more, and then every
    # slot is taken: 15 strangers, 4 outgoing, 1 pinned.
    assert budget.incoming("10.0.4.2", validated=True) is Verdict.ADMIT
    budget.take_incoming("10.0.4.2")
    assert budget.incoming("10.0.4.3", validated=True) is Verdict.REFUSE_FULL
    assert budget.total == 20
    assert budget.take_outgoing("10.0.3.9") is None


def test_release_is_idempotent_and_per_host_maps_shrink() -> None:
    budget = SlotBudget(SMALL)
    slot = budget.take_incoming("10.0.0.1")
    budget.release(slot)
    budget.release(slot)
    budget.established(slot, pinned=True)  # late event for a released slot: nothing
    assert budget.total == 0
    assert budget.statistics()["addresses"] == 0
    assert budget.statistics()["slots_pinned"] == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"reserved_share": 1.0},
        {"reserved_share": -0.1},
        {"max_connections": 0},
        {"max_half_open_per_address": 0},
        {"retry_after_half_open": -1},
        {"half_open_timeout": 0.0},
    ],
)
def test_bad_settings_are_refused(changes: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        QuicConfig(**changes)  # type: ignore[arg-type]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["in", "in_valid", "out", "establish", "pin", "release"]),
            st.integers(0, 5),
        ),
        max_size=200,
    )
)
def test_the_budget_holds_under_any_sequence_of_events(ops: list[tuple[str, int]]) -> None:
    budget = SlotBudget(SMALL)
    live: list[Slot] = []
    for op, n in ops:
        host = f"10.0.0.{n}"
        if op in ("in", "in_valid"):
            if budget.incoming(host, validated=op == "in_valid") is Verdict.ADMIT:
                live.append(budget.take_incoming(host))
        elif op == "out":
            slot = budget.take_outgoing(host)
            if slot is not None:
                live.append(slot)
        elif live and op in ("establish", "pin"):
            budget.established(live[n % len(live)], pinned=op == "pin")
        elif live:
            budget.release(live.pop(n % len(live)))
        kinds = [s.kind for s in live]
        strangers = kinds.count(SlotKind.HALF_OPEN) + kinds.count(SlotKind.STRANGER)
        assert budget.total == len(live) <= SMALL.max_connections
        assert strangers <= budget.strangers_share
        for h in {s.host for s in live if s.kind is not SlotKind.OUTGOING}:
            mine = [s for s in live if s.host == h and s.kind is not SlotKind.OUTGOING]
            assert len(mine) <= SMALL.max_connections_per_address
            half = [s for s in mine if s.kind is SlotKind.HALF_OPEN]
            assert len(half) <= SMALL.max_half_open_per_address
