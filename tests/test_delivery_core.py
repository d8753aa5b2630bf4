"""Delivery's sans-I/O core, the way h11's ``ConnectionPair`` and aioquic's
``test_connection.py`` test theirs: two cores, bytes moved by hand (or dropped,
duplicated, reordered, cut anywhere), time advanced by hand. No socket, no clock, no
event loop; the sessions are real (X3DH and the Double Ratchet on in-memory SQLite).

Every transition of a pending (outgoing) message, and the test that makes it:

    queued -> queued, attempt counted     no session and no bundle; a bad bundle; too
                                          large for a mailbox; a failed mailbox put;
                                          a broken attempt (delivery_failed)
    queued -> sent (direct)               test_a_batch_is_delivered_in_order_and_acked
    queued -> sent (mailbox)              test_no_connection_puts_the_batch_in_the_mailbox
    sent -> sent, sent again              test_a_lost_batch_is_retried_after_the_backoff
      (RetryDue at the backoff / RTO)     test_a_slow_peer_is_not_retried_before_...
    sent -> sent, given up (deadline)     test_a_batch_being_answered_gets_the_whole_...
                                          test_a_silent_batch_closes_the_connection_...
    sent -> delivered                     ack on the batch's stream, on a stream of its
                                          own, by mailbox (only from the recipient)
    sent -> due now, envelope forgotten   test_a_nack_resets_the_session_...
    pending -> due now (peer heard from)  test_a_message_makes_what_we_owe_its_sender_...
    delivered -> delivered                test_a_delivered_message_stays_delivered
    (restart) -> scheduled from the rows  test_a_restart_rebuilds_the_schedule_from_the_rows
"""

from __future__ import annotations

import os

import pytest

from p2pd import wire
from p2pd.delivery.core import (
    PREPARE,
    PREPARE_GATHER,
    RESET_INTERVAL,
    SEND,
    SEND_GATHER,
    WAIT,
    DeliveryCore,
)
from p2pd.delivery.events import (
    AckOwed,
    AckReceived,
    DeliveryDue,
    ExchangeEnded,
    MessageReceived,
    MessageSent,
    NackReceived,
    PendingMadeDue,
    PrepareDue,
    RetryDue,
    ScheduleAttempt,
    SendDue,
    SenderUnverified,
    SessionReset,
    SignalReceived,
)
from p2pd.identity import Identity
from p2pd.messaging import DELIVERED, QUEUED, SENT
from p2pd.testing.delivery_pair import ACK_TIMEOUT, Pair, Side, frames, frames_of, of

# ---------------------------------------------------------------------------- sending


def test_a_batch_is_delivered_in_order_and_acked() -> None:
    pair = Pair()
    queued = pair.queue("one", "two", "three")
    exchange, written = pair.send()
    assert written == [MessageSent(m.id, "direct") for m in queued]
    assert [pair.state(m).state for m in queued] == [SENT] * 3
    assert frames(exchange.data) == [
        (wire.FRAME_MESSAGE, m.id + (pair.state(m).envelope or b"")) for m in queued
    ]

    at_bob = pair.to_bob(exchange.data)
    assert frames(at_bob.replies) == [(wire.FRAME_ACK, m.id) for m in queued]
    received = of(MessageReceived, at_bob.events)
    assert [e.message.text for e in received if isinstance(e, MessageReceived) and e.message] == [
        "one",
        "two",
        "three",
    ]
    # bob has no contact for alice: her claimed handle is to be checked in the DHT
    assert SenderUnverified("alice", pair.alice.key, via="direct") in at_bob.events
    assert pair.inbox() == ["one", "two", "three"]

    at_alice = pair.to_alice(exchange, at_bob.replies)
    assert at_alice.events == [AckReceived(pair.bob.key, m.id, True) for m in queued]
    assert exchange.answered and exchange.acked == {m.id for m in queued}
    assert [pair.state(m).state for m in queued] == [DELIVERED] * 3
    assert pair.end(exchange) == ExchangeEnded(pair.bob.key, True, False)
    assert pair.alice.core.end_exchange(exchange, pair.now) == []  # once only
    assert pair.due() == [] and pair.alice.messages.next_due() is None


def test_a_batch_is_encrypted_with_one_session_write_and_read_in_order() -> None:
    pair = Pair()
    pair.queue("start")  # the first message starts the session (X3DH)
    exchange, _ = pair.send()
    pair.to_alice(exchange, pair.to_bob(exchange.data).replies)
    pair.end(exchange)
    texts = [f"message {i}" for i in range(10)]
    queued = pair.queue(*texts)
    statements: list[str] = []
    pair.alice.ledger.conn.set_trace_callback(statements.append)
    exchange, _ = pair.send()
    pair.alice.ledger.conn.set_trace_callback(None)
    session_writes = [s for s in statements if s.lstrip().upper().startswith("UPDATE SESSIONS")]
    assert len(session_writes) == 1  # one per message before
    envelopes = [pair.state(m).envelope for m in queued]
    assert all(envelopes) and len(set(envelopes)) == len(texts)  # ten ratchet steps
    at_bob = pair.to_bob(exchange.data)
    assert frames(at_bob.replies) == [(wire.FRAME_ACK, m.id) for m in queued]
    assert pair.inbox() == ["start", *texts]


def test_frames_cut_anywhere_are_put_back_together() -> None:
    pair = Pair()
    pair.queue("split", "across", "reads")
    exchange, _ = pair.send()
    data = exchange.data
    at_bob = pair.to_bob(*(data[i : i + 7] for i in range(0, len(data), 7)))
    assert pair.inbox() == ["split", "across", "reads"]
    assert len(frames(at_bob.replies)) == 3


def test_a_lost_batch_is_retried_after_the_backoff_with_the_same_envelope() -> None:
    """The backoff schedule: retries 0.5 s, then 1 s (each ±20 %) after each attempt,
    by the core's timer alone; not after ack_timeout (5 s)."""
    pair = Pair()
    (message,) = pair.queue("lost once")
    core = pair.alice.core
    sent_at = pair.now
    exchange, _ = pair.send()  # ... and the packets are lost
    envelope = pair.state(message).envelope
    retry_at = pair.next_attempt(message)
    assert sent_at + 0.4 <= retry_at <= sent_at + 0.6  # 0.5 s ± 20 %, in the row
    # sent again then, not after ack_timeout; its stream is read until its deadline
    assert exchange.retry_at == retry_at and exchange.deadline == sent_at + ACK_TIMEOUT
    assert pair.timer() == retry_at
    assert core.worker_step(pair.bob.key, pair.now) == WAIT
    pair.advance(retry_at - pair.now - 0.01)
    assert pair.fire_due() == [] and pair.due() == []
    assert pair.fire() == [RetryDue(pair.bob.key)]
    assert pair.now == retry_at and [m.id for m in pair.due()] == [message.id]
    assert core.worker_step(pair.bob.key, pair.now) == SEND

    again, _ = pair.send()
    assert again.data == exchange.data  # the same envelope, not a new ratchet step
    assert pair.state(message).envelope == envelope
    second = pair.next_attempt(message)
    assert pair.now + 0.8 <= second <= pair.now + 1.2  # doubled
    assert pair.fire() == [RetryDue(pair.bob.key)]  # lost again
    assert pair.now == second

    third, _ = pair.send()
    pair.to_alice(third, pair.to_bob(third.data).replies)
    assert pair.state(message).state == DELIVERED and pair.state(message).attempts == 3
    assert pair.inbox() == ["lost once"]
    assert pair.alice.messages.next_due() is None
    assert pair.end(third).answered
    # the lost streams are given up at their deadlines; bob answered since: the
    # connection is not suspect
    assert pair.fire() == [ExchangeEnded(pair.bob.key, False, False)]
    assert pair.now == sent_at + ACK_TIMEOUT
    assert pair.fire() == [ExchangeEnded(pair.bob.key, False, False)]
    assert pair.timer() is None  # nothing left to wake up for (the worker ends, idle)
    core.conversation_idle(pair.bob.key)
    assert pair.timer() is None


def test_a_slow_peer_is_not_retried_before_it_usually_answers() -> None:
    """A busy receiver is slow, not lost: the time from a write to the first answer is
    smoothed per peer (RFC 6298), and a batch is retried no sooner than that RTO."""
    pair = Pair()
    pair.queue("one")
    exchange, _ = pair.send()
    pair.advance(0.3)  # bob answers after 0.3 s
    pair.to_alice(exchange, pair.to_bob(exchange.data).replies)
    pair.end(exchange)
    pair.queue("two")
    slow, _ = pair.send()
    # smoothed 0.3 s, deviation 0.15 s: RTO 0.9 s, later than the backoff (0.5 s)
    retry_at = slow.retry_at
    assert retry_at == pytest.approx(pair.now + 0.9)
    assert pair.fire() == [RetryDue(pair.bob.key)] and pair.now == retry_at
    # a peer never measured is retried after the backoff alone
    other = Side.new(Identity.generate("carol"), pair.now)
    (first,) = pair.alice.messages.enqueue_many("carol", other.key, ["hi"], pair.now)
    ready = pair.alice.core.prepare(other.key, [first], other.sessions.prekey_bundle(), pair.now)
    fresh = pair.alice.core.start_exchange(other.key, ready, pair.now)
    pair.alice.core.exchange_written(fresh, pair.now)
    pair.alice.commit()
    assert fresh.retry_at == pair.next_attempt(first) <= pair.now + 0.6


def test_a_silent_batch_closes_the_connection_at_its_deadline() -> None:
    """The peer was killed: its batch and the retries get no answer at all."""
    pair = Pair()
    (message,) = pair.queue("to a dead peer")
    sent_at = pair.now
    pair.send()
    for _ in range(3):  # 0.5 s, 1 s, 2 s: retried by the timer, never answered
        assert pair.fire() == [RetryDue(pair.bob.key)]
        pair.send()
    # the first stream's deadline: not one answer from bob since it was written
    assert pair.fire() == [ExchangeEnded(pair.bob.key, False, True)]
    assert pair.now == sent_at + ACK_TIMEOUT
    assert pair.state(message).attempts == 4


def test_a_lost_ack_makes_a_duplicate_that_is_acked_again_and_stored_once() -> None:
    pair = Pair()
    (message,) = pair.queue("once")
    exchange, _ = pair.send()
    first = pair.to_bob(exchange.data)  # stored; the ack is lost
    assert of(MessageReceived, first.events)
    pair.advance(ACK_TIMEOUT)
    pair.end(exchange)
    again, _ = pair.send()
    second = pair.to_bob(again.data)
    assert frames(second.replies) == [(wire.FRAME_ACK, message.id)]
    assert of(MessageReceived, second.events) == []  # not shown twice
    assert pair.bob.core.stats["duplicates"] == 1
    pair.to_alice(again, second.replies)
    assert pair.state(message).state == DELIVERED
    assert pair.inbox() == ["once"]

    # the same frame twice in one read: acked twice, stored once
    pair.queue("twice")
    exchange, _ = pair.send()
    doubled = pair.to_bob(exchange.data + exchange.data)
    assert len(frames(doubled.replies)) == 2
    assert pair.inbox() == ["once", "twice"]


def test_reordered_batches_keep_the_conversation_order() -> None:
    pair = Pair()
    (first,) = pair.queue("first")
    lost, _ = pair.send()  # held up in the network
    pair.advance(0.1)
    (second,) = pair.queue("second")  # first waits for its backoff: second goes alone
    alone, _ = pair.send()
    assert frames(alone.data) == [
        (wire.FRAME_MESSAGE, second.id + (second_env := pair.state(second).envelope or b""))
    ]
    assert second_env
    pair.to_alice(alone, pair.to_bob(alone.data).replies)
    pair.to_alice(lost, pair.to_bob(lost.data).replies)  # arrives after all
    assert pair.inbox() == ["first", "second"]  # in the sender's order, not arrival's
    assert [m.seq for _, m in pair.bob.messages.inbox()] == [1, 2]
    assert pair.state(first).state == pair.state(second).state == DELIVERED


def test_a_nack_resets_the_session_and_the_messages_are_sent_again() -> None:
    pair = Pair()
    pair.queue("before")
    exchange, _ = pair.send()
    pair.to_alice(exchange, pair.to_bob(exchange.data).replies)
    # bob loses every state but his key: he cannot decrypt alice's session any more
    pair.bob = Side.new(pair.bob.identity, pair.now)
    pair.advance(1.0)
    (message,) = pair.queue("after the crash")
    exchange, _ = pair.send()
    at_bob = pair.to_bob(exchange.data)
    assert frames(at_bob.replies) == [(wire.FRAME_NACK, message.id)]
    assert pair.bob.core.stats["nacks_out"] == 1 and pair.inbox() == []

    at_alice = pair.to_alice(exchange, at_bob.replies)
    assert at_alice.events == [
        NackReceived(pair.bob.key, message.id),
        SessionReset(pair.bob.key, "bob"),
    ]
    assert exchange.answered and exchange.nacked == {message.id}
    assert pair.end(exchange).close_connection is False
    stored = pair.state(message)
    assert stored.envelope is None and [m.id for m in pair.due()] == [message.id]

    # encrypted again in a new session, from bob's new bundle
    again, _ = pair.send()
    pair.to_alice(again, pair.to_bob(again.data).replies)
    assert pair.inbox() == ["after the crash"]
    assert pair.state(message).state == DELIVERED


def test_nacks_reset_a_session_at_most_once_per_interval() -> None:
    pair = Pair()
    (message,) = pair.queue("hello")
    exchange, _ = pair.send()
    nack = wire.encode_stream_frame(wire.FRAME_NACK, message.id)
    assert of(SessionReset, pair.to_alice(exchange, nack).events)
    pair.send()  # a new session's envelope
    pair.advance(RESET_INTERVAL - 1)
    assert of(SessionReset, pair.to_alice(exchange, nack).events) == []  # a storm: refused
    assert pair.state(message).envelope is not None
    pair.advance(1)
    assert of(SessionReset, pair.to_alice(exchange, nack).events)
    # a NACK for an id that is not ours to that peer resets nothing
    pair.advance(RESET_INTERVAL)
    stranger = wire.encode_stream_frame(wire.FRAME_NACK, os.urandom(16))
    assert of(SessionReset, pair.to_alice(exchange, stranger).events) == []


def test_no_session_and_no_bundle_waits_for_the_next_attempt() -> None:
    pair = Pair()
    (message,) = pair.queue("hello")
    ready = pair.alice.core.prepare(pair.bob.key, pair.due(), None, pair.now)
    pair.alice.commit()
    assert ready == []
    stored = pair.state(message)
    assert stored.state == QUEUED and stored.attempts == 1 and stored.envelope is None
    assert pair.due() == []


# ---------------------------------------------------------------------------- mailbox


def test_no_connection_puts_the_batch_in_the_mailbox_and_the_ack_comes_back_by_mailbox() -> None:
    pair = Pair()
    small, big = pair.queue("by mailbox", "x" * 3000)
    ready = pair.prepare()
    puts = pair.alice.core.plan_mailbox(pair.bob.key, ready, pair.now)
    pair.alice.commit()
    assert [p.msg_id for p in puts] == [small.id]  # the big one goes directly only
    assert pair.state(big).attempts == 1 and pair.state(big).state == QUEUED
    (put,) = puts
    assert pair.alice.core.mailbox_put_done(put, 3, pair.now) == [MessageSent(small.id, "mailbox")]
    pair.alice.commit()
    assert pair.state(small).via == "mailbox" and pair.state(small).state == SENT

    # later retries try the direct path only: the mailbox holds it already
    pair.now = pair.alice.messages.next_due() or 0.0
    assert pair.alice.core.plan_mailbox(pair.bob.key, pair.prepare(), pair.now) == []

    events = pair.bob.core.mailbox_entry_opened(put.plaintext, pair.now)
    pair.bob.commit()
    assert AckOwed(pair.alice.key, small.id) in events
    assert pair.inbox() == ["by mailbox"]
    assert pair.bob.messages.get(small.id).via == "mailbox"  # type: ignore[union-attr]
    # the same entry again (fetched twice): acked again, stored once
    assert AckOwed(pair.alice.key, small.id) in pair.bob.core.mailbox_entry_opened(
        put.plaintext, pair.now
    )
    assert pair.inbox() == ["by mailbox"]

    ack = pair.bob.core.ack_plaintext(small.id)
    assert pair.alice.core.mailbox_entry_opened(ack, pair.now) == [
        AckReceived(pair.bob.key, small.id, True)
    ]
    pair.alice.commit()
    assert pair.state(small).state == DELIVERED


def test_a_mailbox_ack_counts_only_from_the_recipient() -> None:
    pair = Pair()
    (message,) = pair.queue("hello")
    pair.send()
    mallory = Side.new(Identity.generate("mallory"), pair.now)
    forged = mallory.core.ack_plaintext(message.id)
    assert pair.alice.core.mailbox_entry_opened(forged, pair.now) == [
        AckReceived(mallory.key, message.id, False)
    ]
    assert pair.state(message).state == SENT
    assert pair.alice.core.mailbox_entry_opened(b"\x07garbage", pair.now) == []


def test_a_failed_mailbox_put_is_retried() -> None:
    pair = Pair()
    (message,) = pair.queue("hello")
    (put,) = pair.alice.core.plan_mailbox(pair.bob.key, pair.prepare(), pair.now)
    assert pair.alice.core.mailbox_put_done(put, 0, pair.now) == []
    pair.alice.commit()
    stored = pair.state(message)
    assert stored.state == QUEUED and stored.via is None and stored.attempts == 1


# ---------------------------------------------------------------------------- receiving


def test_malformed_frames() -> None:
    pair = Pair()
    # an unknown frame type: the stream is reset, nothing else happens
    result = pair.to_bob(b"\x09" + b"\xff" * 64)
    assert result.reset and result.replies == b"" and result.events == []
    assert pair.bob.core.stats["malformed_frames"] == 1
    # a MESSAGE with nothing after its id, an ACK of the wrong length: counted, skipped
    short = wire.encode_stream_frame(wire.FRAME_MESSAGE, os.urandom(16))
    bad_ack = wire.encode_stream_frame(wire.FRAME_ACK, b"short")
    result = pair.to_bob(short + bad_ack)
    assert not result.reset and result.replies == b"" and result.events == []
    assert pair.bob.core.stats["malformed_frames"] == 3
    # an envelope that does not decrypt: refused without an answer
    junk = wire.encode_stream_frame(wire.FRAME_MESSAGE, os.urandom(16) + b"junk")
    assert pair.to_bob(junk).replies == b""
    assert pair.bob.core.stats["refused"] == 1
    # and a real message still goes through
    pair.queue("still here")
    exchange, _ = pair.send()
    pair.to_bob(exchange.data)
    assert pair.inbox() == ["still here"]


def test_a_replayed_envelope_under_a_new_id_gets_no_answer() -> None:
    pair = Pair()
    (message,) = pair.queue("only once")
    exchange, _ = pair.send()
    pair.to_bob(exchange.data)
    envelope = pair.state(message).envelope or b""
    replay = wire.encode_stream_frame(wire.FRAME_MESSAGE, os.urandom(16) + envelope)
    assert pair.to_bob(replay).replies == b""
    # a known id sent by another key than its sender: dropped too
    mallory = Identity.generate("mallory")
    stream = pair.bob.core.accept_stream(mallory.public_key)
    known = wire.encode_stream_frame(wire.FRAME_MESSAGE, message.id + envelope)
    assert stream.data_received(known, pair.now).replies == b""
    assert pair.inbox() == ["only once"]


def fail_once(side: Side, msg_id: bytes, now: float) -> None:
    """A first attempt that failed (no transport): the message waits 0.5 s, as the core
    schedules it."""
    side.ledger.apply([ScheduleAttempt(msg_id, 1, now + 0.5, now, None)])
    side.ledger.commit()


def test_a_message_makes_what_we_owe_its_sender_due_now() -> None:
    pair = Pair()
    # bob owes alice a message, waiting for its backoff
    (owed,) = pair.bob.messages.enqueue_many("alice", pair.alice.key, ["owed"], pair.now)
    fail_once(pair.bob, owed.id, pair.now)
    assert pair.bob.messages.due_for(pair.alice.key, pair.now) == []
    pair.queue("hello")
    exchange, _ = pair.send()
    assert PendingMadeDue(pair.alice.key) in pair.to_bob(exchange.data).events
    assert [m.id for m in pair.bob.messages.due_for(pair.alice.key, pair.now)] == [owed.id]


def test_a_call_signal_is_acked_and_reported_not_stored() -> None:
    pair = Pair()
    msg_id = os.urandom(16)
    payload = pair.alice.core.signal_payload(msg_id, '{"type": "offer"}', pair.now)
    envelope = pair.alice.ledger.encrypt(
        pair.bob.key, payload, pair.bob.sessions.prekey_bundle(), pair.now
    )
    pair.alice.commit()
    exchange = pair.alice.core.signal_exchange(pair.bob.key, msg_id, envelope, pair.now)
    assert pair.alice.core.exchange_written(exchange, pair.now) == []  # not in the outbox
    at_bob = pair.to_bob(exchange.data)
    assert SignalReceived(pair.alice.key, "alice", '{"type": "offer"}', "direct") in at_bob.events
    assert of(MessageReceived, at_bob.events) == []
    assert pair.inbox() == []
    assert pair.to_alice(exchange, at_bob.replies).events == [
        AckReceived(pair.bob.key, msg_id, False)
    ]
    assert exchange.answered
    # a signal unanswered never asks to drop the connection (the caller reports it)
    lost = pair.alice.core.signal_exchange(pair.bob.key, os.urandom(16), envelope, pair.now)
    assert pair.end(lost).close_connection is False


def test_acks_on_a_stream_of_their_own_count_like_any_other() -> None:
    """bob found alice's message in his mailbox and acks it on a stream he opens."""
    pair = Pair()
    (message,) = pair.queue("hello")
    (put,) = pair.alice.core.plan_mailbox(pair.bob.key, pair.prepare(), pair.now)
    pair.alice.core.mailbox_put_done(put, 1, pair.now)
    pair.alice.commit()
    stream = pair.alice.core.accept_stream(pair.bob.key)
    result = stream.data_received(wire.encode_stream_frame(wire.FRAME_ACK, message.id), pair.now)
    pair.alice.commit()
    assert result.replies == b"" and result.events == [AckReceived(pair.bob.key, message.id, True)]
    assert pair.state(message).state == DELIVERED


def test_a_bad_bundle_stops_the_batch_and_a_broken_attempt_is_counted() -> None:
    pair = Pair()
    first, second = pair.queue("one", "two")
    assert pair.alice.core.prepare(pair.bob.key, pair.due(), b"not a bundle", pair.now) == []
    pair.alice.commit()
    assert [pair.state(m).attempts for m in (first, second)] == [1, 1]
    pair.advance(1.0)
    batch = pair.due()
    pair.alice.core.delivery_failed(batch, pair.now)
    pair.alice.commit()
    assert [pair.state(m).attempts for m in (first, second)] == [2, 2]
    assert all(pair.state(m).state == QUEUED for m in (first, second))


# ---------------------------------------------------------------------------- the schedule


def test_the_timer_hands_a_due_conversation_to_one_worker_at_a_time() -> None:
    pair = Pair()
    core, bob = pair.alice.core, pair.bob.key
    assert pair.timer() is None
    pair.queue("one")
    assert core.messages_queued(bob, pair.now) == [DeliveryDue(bob)]
    pair.queue("two")
    assert core.messages_queued(bob, pair.now) == []  # held: its worker finds it
    assert pair.timer() is None  # a held conversation is its worker's business
    assert core.worker_step(bob, pair.now) == SEND
    # no session and no bundle: both wait for their next attempt, and the worker,
    # finding nothing due, lets the conversation go
    assert core.prepare(bob, pair.due(), None, pair.now) == []
    pair.alice.commit()
    assert pair.due() == []
    core.conversation_idle(bob)
    first = min(pair.next_attempt(m) for m in pair.alice.messages.pending_for(bob))
    assert pair.timer() == first and pair.now + 0.4 <= first <= pair.now + 0.6
    assert pair.fire() == [DeliveryDue(bob)]
    assert pair.timer() is None  # held again, not handed out twice
    assert pair.fire_due() == []


def test_a_restart_rebuilds_the_schedule_from_the_rows() -> None:
    pair = Pair()
    lost = pair.queue("lost", "lost too")
    pair.send()  # written; the process dies before any answer
    (later,) = pair.queue("after")
    retry = min(pair.next_attempt(m) for m in lost)
    restarted = DeliveryCore(
        pair.alice.ledger, handle="alice", public_key=pair.alice.key, ack_timeout=ACK_TIMEOUT
    )
    assert restarted.get_timer() is None  # nothing known before the rows are read
    restarted.load_schedule()
    # "after" was never tried: due at once (its row says 0); then the retry
    assert restarted.get_timer() == 0.0 and pair.next_attempt(later) == 0.0
    assert restarted.handle_timer(pair.now) == [DeliveryDue(pair.bob.key)]
    restarted.conversation_idle(pair.bob.key)  # as if the worker sent what was due
    assert restarted.get_timer() == 0.0
    # "after" is delivered: the timer is the lost ones' retry
    pair.alice.core = restarted
    exchange, _ = pair.send()
    pair.to_alice(exchange, pair.to_bob(exchange.data).replies)
    assert pair.end(exchange).answered and pair.state(later).state == DELIVERED
    restarted.conversation_idle(pair.bob.key)
    assert restarted.get_timer() == retry
    assert restarted.handle_timer(retry) == [DeliveryDue(pair.bob.key)]


def test_a_batch_being_answered_gets_the_whole_ack_timeout() -> None:
    pair = Pair()
    first, second, third = pair.queue("one", "two", "three")
    exchange, _ = pair.send()
    written = pair.now
    assert exchange.retry_at is not None and exchange.retry_at < written + 1.0
    (one, _two, _three) = frames_of(exchange.data)
    pair.advance(0.1)
    assert pair.to_alice(exchange, pair.to_bob(one).replies).events == [
        AckReceived(pair.bob.key, first.id, True)
    ]
    # alive and working through the batch: not sent again after the backoff
    assert exchange.retry_at is None
    assert exchange.deadline == written + ACK_TIMEOUT == pair.timer()
    pair.advance(1.0)
    # their rows say due, but the batch is not given up: the worker waits for it
    assert pair.fire_due() == [] and pair.alice.core.worker_step(pair.bob.key, pair.now) == WAIT
    ended = pair.fire()
    assert ended == [ExchangeEnded(pair.bob.key, False, False)]  # answered once: no close
    assert pair.now == written + ACK_TIMEOUT
    assert [m.id for m in pair.due()] == [second.id, third.id]
    assert pair.state(first).state == DELIVERED


def test_messages_queued_behind_a_waiting_batch_are_encrypted_while_it_waits() -> None:
    pair = Pair()
    core, bob = pair.alice.core, pair.bob.key
    pair.queue("first")
    assert core.messages_queued(bob, pair.now) == [DeliveryDue(bob)]
    assert core.worker_step(bob, pair.now) == SEND
    ready = pair.prepare()
    exchange = core.start_exchange(bob, ready, pair.now)
    (during,) = pair.queue("queued during the write")
    assert core.messages_queued(bob, pair.now) == []
    core.exchange_written(exchange, pair.now)
    pair.alice.commit()
    # the worker encrypts what came meanwhile (one transaction), then waits
    assert core.worker_step(bob, pair.now) == PREPARE
    assert [m.id for m in pair.prepare()] == [during.id]
    assert core.worker_step(bob, pair.now) == WAIT
    # one queued while it waits: after PREPARE_GATHER, so that a few gather
    (later,) = pair.queue("queued while it waits")
    assert core.messages_queued(bob, pair.now) == []
    assert pair.timer() == pair.now + PREPARE_GATHER
    assert pair.fire() == [PrepareDue(bob)]
    assert core.worker_step(bob, pair.now) == PREPARE
    assert core.worker_step(bob, pair.now) == WAIT
    assert [m.id for m in pair.prepare()] == [during.id, later.id]
    # the answers come: the batch ends, the next goes with the envelopes made meanwhile
    pair.to_alice(exchange, pair.to_bob(exchange.data).replies)
    assert exchange.answered
    assert pair.end(exchange).answered
    # (queued one by one behind it: they gather until SEND_GATHER, then go)
    assert core.worker_step(bob, pair.now) == WAIT
    assert pair.fire() == [SendDue(bob)]
    assert core.worker_step(bob, pair.now) == SEND
    envelopes = {m.id: pair.state(m).envelope for m in (during, later)}
    assert all(envelopes.values())
    nxt, _ = pair.send()
    assert frames_of(nxt.data) == [
        wire.encode_stream_frame(wire.FRAME_MESSAGE, i + (e or b"")) for i, e in envelopes.items()
    ]


def test_messages_queued_one_by_one_behind_a_batch_gather_into_the_next() -> None:
    """One ``send`` call per message while a batch is in flight: what is queued behind
    it goes out together, SEND_GATHER after the first of them was queued, even if the
    batch is answered sooner; a message to an idle conversation goes at once."""
    pair = Pair()
    core, bob = pair.alice.core, pair.bob.key
    pair.queue("first")
    assert core.messages_queued(bob, pair.now) == [DeliveryDue(bob)]
    assert core.worker_step(bob, pair.now) == SEND  # idle conversation: at once
    exchange, _ = pair.send()
    pair.advance(0.001)
    behind = pair.now
    (second,) = pair.queue("second")
    assert core.messages_queued(bob, pair.now) == []
    pair.advance(0.001)
    pair.to_alice(exchange, pair.to_bob(exchange.data).replies)
    assert pair.end(exchange).answered
    # answered 1 ms after "second" was queued: the next batch gathers a while longer
    assert core.worker_step(bob, pair.now) == WAIT
    assert pair.timer() == behind + SEND_GATHER
    (third,) = pair.queue("third")
    assert core.messages_queued(bob, pair.now) == []
    assert pair.fire() == [SendDue(bob)] and pair.now == behind + SEND_GATHER
    assert core.worker_step(bob, pair.now) == SEND
    nxt, sent = pair.send()
    assert sent == [MessageSent(second.id, "direct"), MessageSent(third.id, "direct")]
    pair.to_alice(nxt, pair.to_bob(nxt.data).replies)
    # queued once the batch is answered (one message at a time: the "delivered" event
    # came), before its stream is closed: not behind it, and sent at once
    (fourth,) = pair.queue("fourth")
    assert core.messages_queued(bob, pair.now) == []
    pair.end(nxt)
    assert core.worker_step(bob, pair.now) == SEND
    assert [m.id for m in pair.due()] == [fourth.id]
    last, _ = pair.send()
    pair.to_alice(last, pair.to_bob(last.data).replies)
    pair.end(last)
    assert core.worker_step(bob, pair.now) == SEND and pair.due() == []
    core.conversation_idle(bob)
    assert pair.timer() is None
    assert pair.inbox() == ["first", "second", "third", "fourth"]
    assert core.stats["batches_direct"] == 3 and core.stats["sent_direct"] == 4


def test_a_delivered_message_stays_delivered() -> None:
    pair = Pair()
    (message,) = pair.queue("hello")
    exchange, _ = pair.send()
    ack = wire.encode_stream_frame(wire.FRAME_ACK, message.id)
    # the same ack twice in one read (not in the ledger yet): delivered once
    assert pair.to_alice(exchange, ack + ack).events == [
        AckReceived(pair.bob.key, message.id, True),
        AckReceived(pair.bob.key, message.id, False),
    ]
    assert pair.state(message).state == DELIVERED
    # a late ack, a late failure, a mailbox put done late: nothing changes
    stream = pair.alice.core.accept_stream(pair.bob.key)
    assert stream.data_received(ack, pair.now).events == [
        AckReceived(pair.bob.key, message.id, False)
    ]
    pair.alice.core.delivery_failed([message], pair.now)
    pair.alice.commit()
    stored = pair.state(message)
    assert stored.state == DELIVERED and stored.attempts == 1
    assert pair.alice.messages.next_due() is None


def test_a_message_from_the_peer_makes_the_conversation_due_by_the_timer() -> None:
    pair = Pair()
    (owed,) = pair.bob.messages.enqueue_many("alice", pair.alice.key, ["owed"], pair.now)
    fail_once(pair.bob, owed.id, pair.now)  # waits 0.5 s
    bob = pair.bob.core
    bob.load_schedule()
    assert bob.get_timer() is not None and bob.get_timer() > pair.now  # type: ignore[operator]
    pair.queue("hello")
    exchange, _ = pair.send()
    assert PendingMadeDue(pair.alice.key) in pair.to_bob(exchange.data).events
    assert bob.get_timer() == pair.now
    assert bob.handle_timer(pair.now) == [DeliveryDue(pair.alice.key)]
