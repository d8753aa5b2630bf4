"""Who gets a QUIC connection slot (p2pd.transport.quic.admission.SlotBudget): Retry
above the half-open threshold, per-address limits, the reserve for outgoing connections
and pinned contacts. Pure: no socket, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.config import QuicConfig
from p2pd.errors import UsageError
from p2pd.transport.quic.admission import Slot, SlotBudget, SlotKind, Verdict, source_key
from p2pd.transport.quic.tokens import TOKEN_LIFETIME, RetryTokens

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


def test_strangers_never_hold_the_reserve_but_outgoing_and_pinned_do() -> None:
    budget = SlotBudget(SMALL)  # 20 slots: 15 for strangers, 5 reserved
    assert (budget.strangers_share, budget.reserve_handshakes) == (15, 2)
    strangers = []
    for i in range(15):
        host = f"10.0.1.{i}"
        assert budget.incoming(host, validated=True) is Verdict.ADMIT
        slot = budget.take_incoming(host)
        assert budget.established(slot, pinned=False)
        strangers.append(slot)
    # Strangers fill their share. Handshakes may still start in the reserve (their key
    # is not known yet), two at a time (half the reserve)...
    tentative = []
    for i in range(2):
        assert budget.incoming(f"10.0.2.{i}", validated=True) is Verdict.ADMIT
        tentative.append(budget.take_incoming(f"10.0.2.{i}"))
    assert budget.incoming("10.0.2.9", validated=True) is Verdict.REFUSE_FULL
    # ... and a stranger's is refused when it completes, a contact's stays.
    assert not budget.established(tentative[0], pinned=False)
    assert tentative[0].kind is SlotKind.HALF_OPEN  # until the connection is gone
    budget.release(tentative[0])
    assert budget.established(tentative[1], pinned=True)
    assert tentative[1].kind is SlotKind.PINNED
    # Our own connections find the rest of the reserve: 20 - 15 - 1 = 4 slots.
    outgoing = [budget.take_outgoing(f"10.0.3.{i}") for i in range(4)]
    assert all(s is not None for s in outgoing)
    assert budget.total == 20
    assert budget.take_outgoing("10.0.3.9") is None  # every slot taken
    assert budget.incoming("10.0.2.8", validated=True) is Verdict.REFUSE_FULL
    # A stranger leaving frees a place in the strangers' share.
    budget.release(strangers.pop())
    assert budget.incoming("10.0.4.1", validated=True) is Verdict.ADMIT
    assert budget.statistics()["slots_pinned"] == 1


def test_spoofed_handshakes_cannot_hold_the_reserve() -> None:
    # Unvalidated sources hold at most retry_after_half_open handshakes; with that below
    # half the reserve, a validated client (a contact) still starts its handshake
    # while strangers fill their share.
    config = QuicConfig(max_connections=100, reserved_share=0.2, retry_after_half_open=4)
    budget = SlotBudget(config)
    for i in range(80):
        budget.established(budget.take_incoming(f"10.1.0.{i}"), pinned=False)
    spoofed = 0
    for i in range(1000):
        verdict = budget.incoming(f"10.2.{i // 250}.{i % 250}", validated=False)
        if verdict is Verdict.ADMIT:
            budget.take_incoming(f"10.2.{i // 250}.{i % 250}")
            spoofed += 1
        else:
            assert verdict is Verdict.RETRY
    assert spoofed == 4
    assert budget.incoming("10.3.0.1", validated=True) is Verdict.ADMIT


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
            slot = live[n % len(live)]
            was_half_open = slot.kind is SlotKind.HALF_OPEN
            kept = budget.established(slot, pinned=op == "pin")
            assert kept or (was_half_open and op == "establish")
        elif live:
            budget.release(live.pop(n % len(live)))
        kinds = [s.kind for s in live]
        assert budget.total == len(live) <= SMALL.max_connections
        assert kinds.count(SlotKind.STRANGER) <= budget.strangers_share
        # Half the reserve is never strangers or handshakes: room for our own.
        assert kinds.count(SlotKind.HALF_OPEN) + kinds.count(SlotKind.STRANGER) <= (
            budget.strangers_share + budget.reserve_handshakes
        )
        for h in {s.host for s in live if s.kind is not SlotKind.OUTGOING}:
            mine = [s for s in live if s.host == h and s.kind is not SlotKind.OUTGOING]
            assert len(mine) <= SMALL.max_connections_per_address
            half = [s for s in mine if s.kind is SlotKind.HALF_OPEN]
            assert len(half) <= SMALL.max_half_open_per_address


def test_retry_tokens_hold_for_one_address_one_connection_id_and_10_seconds() -> None:
    tokens = RetryTokens()
    here, odcid, retry_cid = ("192.0.2.7", 4747), b"\x01" * 8, b"\x02" * 8
    token = tokens.create(here, odcid, retry_cid, now=100.0)
    assert len(token) == 8 + 1 + 8 + 16
    assert tokens.validate(here, retry_cid, token, now=100.0 + 9.9) == odcid
    assert TOKEN_LIFETIME == 10.0
    assert tokens.validate(here, retry_cid, token, now=110.1) is None  # expired
    assert tokens.validate(("192.0.2.8", 4747), retry_cid, token, now=100.0) is None
    assert tokens.validate(("192.0.2.7", 4748), retry_cid, token, now=100.0) is None
    assert tokens.validate(here, b"\x03" * 8, token, now=100.0) is None  # another CID
    assert tokens.validate(here, retry_cid, b"short", now=100.0) is None
    # Another endpoint (another key, drawn at start) does not take it.
    assert RetryTokens().validate(here, retry_cid, token, now=100.0) is None


@given(st.binary(max_size=80), st.integers(0, 79), st.integers(0, 7))
def test_any_change_to_a_token_voids_it(junk: bytes, position: int, bit: int) -> None:
    tokens = RetryTokens(key=b"k" * 32)
    here, retry_cid = ("2001:db8::1", 443), b"\x02" * 8
    token = tokens.create(here, b"\x01" * 20, retry_cid, now=5.0)
    assert tokens.validate(here, retry_cid, token, now=5.0) == b"\x01" * 20
    flipped = bytearray(token)
    flipped[position % len(token)] ^= 1 << bit
    assert tokens.validate(here, retry_cid, bytes(flipped), now=5.0) is None
    if junk != token:
        assert tokens.validate(here, retry_cid, junk, now=5.0) is None


def test_an_ipv6_64_counts_as_one_address() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:ffff::9")
    assert source_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("fe80::1%eth0") == "fe80::/64"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1" == source_key("192.0.2.1")
    assert source_key("192.0.2.2") != source_key("192.0.2.1")
