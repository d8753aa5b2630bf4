"""The QUIC connection policy (p2pd.transport.quic.policy): key check, handshake timeout,
keep-alive and idle close, with no socket and no clock but the ``now`` passed in."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from p2pd.config import QuicConfig
from p2pd.errors import ConnectionLost, PeerKeyMismatch
from p2pd.transport.quic import ALPN, AppError
from p2pd.transport.quic._aioquic import AlertDescription, QuicErrorCode
from p2pd.transport.quic.policy import PING, Close, ConnectionPolicy

CONFIG = QuicConfig(handshake_timeout=10.0, keepalive_interval=10.0, idle_close=60.0)
ALICE = bytes(range(32))
MALLORY = bytes(range(1, 33))
T0 = 1000.0


def alert(code: AlertDescription) -> int:
    return int(QuicErrorCode.CRYPTO_ERROR) + int(code)


def established(*, expected_key: bytes | None = ALICE, at: float = T0) -> ConnectionPolicy:
    policy = ConnectionPolicy(CONFIG, at, where="192.0.2.1:4433", expected_key=expected_key)
    assert policy.handshake_completed(at, alpn=ALPN, key=ALICE) is None
    return policy


# ---- handshake


def test_handshake_times_out_at_its_deadline() -> None:
    policy = ConnectionPolicy(CONFIG, T0, where="192.0.2.1:4433", expected_key=ALICE)
    assert not policy.established
    assert policy.deadline(T0, busy=False) == T0 + 10.0
    assert policy.poll(T0 + 9.999, busy=False) is None
    verdict = policy.poll(T0 + 10.0, busy=False)
    assert isinstance(verdict, Close)
    assert isinstance(verdict.error, ConnectionLost)
    assert verdict.error.message == "QUIC handshake with 192.0.2.1:4433 timed out"
    assert (verdict.error_code, verdict.reason, verdict.transport) == (
        AppError.NO_ERROR,
        "handshake timeout",
        False,
    )


def test_no_keep_alive_before_the_handshake() -> None:
    policy = ConnectionPolicy(CONFIG, T0, where="x", expected_key=ALICE)
    # Nothing was sent for longer than keepalive_interval: still no PING (no 1-RTT keys).
    assert policy.poll(T0 + 9.9, busy=True) is None


def test_an_incoming_handshake_is_discarded_silently_after_half_open_timeout() -> None:
    # A connection we accepted (expected_key None) holds a slot of the budget: it gets
    # half_open_timeout (3 s), not handshake_timeout, and is dropped without a close.
    policy = ConnectionPolicy(CONFIG, T0, where="192.0.2.9:1", expected_key=None)
    assert CONFIG.half_open_timeout == 3.0
    assert policy.deadline(T0, busy=False) == T0 + 3.0
    assert policy.poll(T0 + 2.999, busy=False) is None
    verdict = policy.poll(T0 + 3.0, busy=False)
    assert isinstance(verdict, Close)
    assert verdict.silent
    assert verdict.error.message == "QUIC handshake with 192.0.2.9:1 timed out"
    # One we make still says goodbye (its peer is the one we chose).
    client = ConnectionPolicy(CONFIG, T0, where="x", expected_key=ALICE)
    verdict = client.poll(T0 + 10.0, busy=False)
    assert isinstance(verdict, Close) and not verdict.silent


def test_an_established_incoming_connection_has_no_half_open_deadline() -> None:
    policy = established(expected_key=None)
    assert policy.poll(T0 + 3.0, busy=True) is None


# ---- the key check


def test_the_expected_key_is_accepted() -> None:
    policy = ConnectionPolicy(CONFIG, T0, where="x", expected_key=ALICE)
    assert policy.handshake_completed(T0 + 1, alpn=ALPN, key=ALICE) is None
    assert policy.established and policy.public_key == ALICE
    assert policy.last_activity == T0 + 1
    assert policy.poll(T0 + 10.0, busy=False) == PING  # not the handshake timeout


def test_a_server_accepts_any_proven_key() -> None:
    policy = ConnectionPolicy(CONFIG, T0, where="x", expected_key=None)
    assert policy.handshake_completed(T0, alpn=ALPN, key=MALLORY) is None
    assert policy.public_key == MALLORY


def test_another_key_is_refused_with_bad_certificate() -> None:
    policy = ConnectionPolicy(CONFIG, T0, where="192.0.2.1:4433", expected_key=ALICE)
    verdict = policy.handshake_completed(T0, alpn=ALPN, key=MALLORY)
    assert isinstance(verdict, Close) and isinstance(verdict.error, PeerKeyMismatch)
    assert verdict.error_code == alert(AlertDescription.bad_certificate)
    assert verdict.transport and verdict.reason == "unexpected identity key"
    assert "192.0.2.1:4433" in verdict.error.message
    assert not policy.established and policy.public_key is None


def test_no_certificate_is_refused_by_either_side() -> None:
    client = ConnectionPolicy(CONFIG, T0, where="x", expected_key=ALICE)
    server = ConnectionPolicy(CONFIG, T0, where="x", expected_key=None)
    from_client = client.handshake_completed(T0, alpn=ALPN, key=None)
    from_server = server.handshake_completed(T0, alpn=ALPN, key=None)
    assert isinstance(from_client, Close) and isinstance(from_server, Close)
    assert from_client.error_code == alert(AlertDescription.bad_certificate)
    # RFC 8446 section 4.4.2.4
    assert from_server.error_code == alert(AlertDescription.certificate_required)
    assert not client.established and not server.established


def test_a_foreign_alpn_is_refused() -> None:
    policy = ConnectionPolicy(CONFIG, T0, where="x", expected_key=ALICE)
    for alpn in ("h3", None):
        verdict = policy.handshake_completed(T0, alpn=alpn, key=ALICE)
        assert isinstance(verdict, Close)
        assert verdict.error_code == alert(AlertDescription.no_application_protocol)
    assert not policy.established


# ---- keep-alive and idle close


def test_a_busy_connection_pings_and_never_idles() -> None:
    policy = established()
    now = T0
    for _ in range(20):  # 200 s, far past idle_close, with a stream open throughout
        assert policy.deadline(now, busy=True) == now + 10.0
        assert policy.poll(now + 9.0, busy=True) is None
        now += 10.0
        assert policy.poll(now, busy=True) == PING
        policy.sent(now)
        assert policy.poll(now, busy=True) is None


def test_sending_postpones_the_ping() -> None:
    policy = established()
    policy.sent(T0 + 5)
    assert policy.poll(T0 + 10, busy=True) is None
    assert policy.deadline(T0 + 10, busy=True) == T0 + 15
    assert policy.poll(T0 + 15, busy=True) == PING


def test_an_unused_connection_pings_until_it_closes_for_idleness() -> None:
    policy = established()
    now = T0
    pings = 0
    while True:
        deadline = policy.deadline(now, busy=False)
        verdict = policy.poll(deadline, busy=False)
        now = deadline
        if verdict == PING:
            pings += 1
            policy.sent(now)  # our own PINGs are not activity
            continue
        assert isinstance(verdict, Close)
        break
    assert now == T0 + 60.0
    assert pings == 5  # at 10, 20, ..., 50 s; the 60 s one would be the close
    assert isinstance(verdict.error, ConnectionLost)
    assert verdict.error.message == "connection to 192.0.2.1:4433 closed: idle"
    assert (verdict.error_code, verdict.reason, verdict.transport) == (
        AppError.NO_ERROR,
        "idle",
        False,
    )


def test_activity_postpones_the_idle_close() -> None:
    policy = established()
    policy.activity(T0 + 50)
    policy.sent(T0 + 50)
    assert policy.poll(T0 + 60, busy=False) == PING
    policy.sent(T0 + 60)
    assert policy.deadline(T0 + 60, busy=False) == T0 + 70
    policy.sent(T0 + 100)
    assert isinstance(policy.poll(T0 + 110, busy=False), Close)


def test_after_the_last_stream_closes_the_idle_clock_runs_from_the_last_activity() -> None:
    policy = established()
    policy.sent(T0 + 100)
    # A stream was open until now (busy) but nothing moved for 100 s: idle at once.
    assert policy.poll(T0 + 100, busy=True) is None
    assert isinstance(policy.poll(T0 + 100, busy=False), Close)


# ---- the deadline is exactly when poll() next has something to say

events = st.lists(
    st.tuples(
        st.sampled_from(["activity", "sent", "wait"]),
        st.floats(min_value=0.0, max_value=40.0, allow_nan=False),
        st.booleans(),
    ),
    max_size=30,
)


@given(events, st.booleans())
def test_poll_says_nothing_before_the_deadline_and_something_at_it(
    steps: list[tuple[str, float, bool]], is_client: bool
) -> None:
    policy = established(expected_key=ALICE if is_client else None)
    now = T0
    for kind, delay, busy in steps:
        deadline = policy.deadline(now, busy=busy)
        assert deadline >= now or policy.poll(now, busy=busy) is not None
        later = now + delay
        if later < deadline:
            assert policy.poll(later, busy=busy) is None
        elif math.isfinite(deadline) and deadline >= now:
            assert policy.poll(deadline, busy=busy) is not None
            later = deadline
        verdict = policy.poll(later, busy=busy)
        if isinstance(verdict, Close):
            return  # the driver would close; nothing follows
        if verdict == PING:
            policy.sent(later)
        if kind == "activity":
            policy.activity(later)
        elif kind == "sent":
            policy.sent(later)
        now = later
