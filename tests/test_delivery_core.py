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
import random
from dataclasses import dataclass

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
    Exchange,
)
from p2pd.delivery.events import (
    AckOwed,
    AckReceived,
    DeliveryDue,
    Event,
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
    StreamResult,
)
from p2pd.delivery.ledger import SqliteLedger
from p2pd.identity import Identity
from p2pd.messaging import DELIVERED, QUEUED, SENT, Contacts, Message, MessageStore
from p2pd.session import SessionManager
from p2pd.store import open_database

WALL = 1_700_000_000.0
ACK_TIMEOUT = 5.0


@dataclass
class Side:
    identity: Identity
    messages: MessageStore
    contacts: Contacts
    sessions: SessionManager
    ledger: SqliteLedger
    core: DeliveryCore

    @classmethod
    def new(cls, identity: Identity, now: float) -> Side:
        conn = open_database(None)
        messages, contacts = MessageStore(conn), Contacts(conn)
        sessions = SessionManager.open(conn, identity, now=now)
        ledger = SqliteLedger(conn, messages, contacts, sessions)
        core = DeliveryCore(
            ledger, handle=identity.handle, public_key=identity.public_key, ack_timeout=ACK_TIMEOUT
        )
        return cls(identity, messages, contacts, sessions, ledger, core)

    @property
    def key(self) -> bytes:
        return self.identity.public_key

    def commit(self) -> None:
        """What the service does after each entry point of the core."""
        self.ledger.apply(self.core.writes_to_commit())
        self.ledger.commit()


class Pair:
    """alice sends to bob. Each step is one entry point of a core, committed after it as
    the service does; what goes over the wire is returned for the test to move."""

    def __init__(self) -> None:
        self.now = WALL
        self.alice = Side.new(Identity.generate("alice"), self.now)
        self.bob = Side.new(Identity.generate("bob"), self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def queue(self, *texts: str) -> list[Message]:
        return self.alice.messages.enqueue_many("bob", self.bob.key, texts, self.now)

    def due(self) -> list[Message]:
        return self.alice.messages.due_for(self.bob.key, self.now)

    def prepare(self) -> list[Message]:
        ready = self.alice.core.prepare(
            self.bob.key, self.due(), self.bob.sessions.prekey_bundle(), self.now
        )
        self.alice.commit()
        return ready

    def send(self) -> tuple[Exchange, list[Event]]:
        """The worker's step: the due batch encrypted, framed and written."""
        ready = self.prepare()
        assert ready
        exchange = self.alice.core.start_exchange(self.bob.key, ready, self.now)
        events = self.alice.core.exchange_written(exchange, self.now)
        self.alice.commit()
        return exchange, events

    def to_bob(self, *chunks: bytes) -> StreamResult:
        """Bytes arriving on one stream bob accepts; all of the replies, all events."""
        stream = self.bob.core.accept_stream(self.alice.key)
        total = StreamResult()
        replies = b""
        for chunk in chunks:
            result = stream.data_received(chunk, self.now)
            self.bob.commit()
            replies += result.replies
            total.events += result.events
            total.reset = total.reset or result.reset
        total.replies = replies
        return total

    def to_alice(self, exchange: Exchange, data: bytes) -> StreamResult:
        result = exchange.data_received(data, self.now)
        self.alice.commit()
        return result

    def end(self, exchange: Exchange) -> ExchangeEnded:
        (ended,) = self.alice.core.end_exchange(exchange, self.now)
        assert isinstance(ended, ExchangeEnded)
        return ended

    def next_attempt(self, message: Message) -> float:
        """When the row says the message is to be tried again."""
        (when,) = self.alice.ledger.conn.execute(
            "SELECT next_attempt FROM messages WHERE id=?", (message.id,)
        ).fetchone()
        return float(when)

    def timer(self) -> float | None:
        return self.alice.core.get_timer()

    def fire_due(self) -> list[Event]:
        """alice's timer handled at the current time."""
        events = self.alice.core.handle_timer(self.now)
        self.alice.commit()
        return events

    def fire(self) -> list[Event]:
        """Time moves to alice's next deadline, and her timer is handled."""
        when = self.timer()
        assert when is not None and when >= self.now
        self.now = when
        return self.fire_due()

    def state(self, message: Message) -> Message:
        stored = self.alice.messages.get(message.id)
        assert stored is not None
        return stored

    def inbox(self) -> list[str]:
        return [m.text for _, m in self.bob.messages.inbox()]


def frames(data: bytes) -> list[tuple[int, bytes]]:
    return wire.StreamFrameDecoder().feed(data)


def of(kind: type, events: list[Event]) -> list[Event]:
    return [e for e in events if isinstance(e, kind)]


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
    (one, _two, _three) = _frames_of(exchange.data)
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
    assert _frames_of(nxt.data) == [
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


# ---------------------------------------------------------------------------- a lossy network


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_loss_and_reordering_all_delivered_once_in_order(seed: int) -> None:
    """A seeded network drops 30 % of the streams and of their answers and delays the
    rest by 10-400 ms (so that a retry may overtake the stream it repeats), while alice
    queues 40 messages in bursts. A service-like driver runs alice's worker and her
    timer, time moved by hand to the next deadline or arrival: every message reaches
    bob once, in order, and is delivered, by timer-driven retries alone."""
    rng = random.Random(seed)
    pair = Pair()
    pair.alice.core = DeliveryCore(
        pair.alice.ledger, handle="alice", public_key=pair.alice.key,
        ack_timeout=ACK_TIMEOUT, rng=random.Random(seed),
    )  # fmt: skip
    core, bob = pair.alice.core, pair.bob.key
    texts = [f"message {i}" for i in range(40)]
    start = pair.now
    bursts = [(start + i * 0.3, texts[i * 8 : i * 8 + 8]) for i in range(5)]
    in_flight: list[tuple[float, int, str, Exchange, bytes]] = []  # (arrival, n, to, ...)
    held = False
    exchanges = dropped = 0

    def net(to: str, exchange: Exchange, data: bytes) -> None:
        nonlocal dropped
        if rng.random() < 0.3:
            dropped += 1
        else:
            arrival = pair.now + rng.uniform(0.01, 0.4)
            in_flight.append((arrival, len(in_flight), to, exchange, data))

    def dispatch(events: list[Event]) -> None:
        nonlocal held
        for event in events:
            if isinstance(event, DeliveryDue):
                assert not held  # one worker per conversation
                held = True

    def run_worker() -> None:
        nonlocal held, exchanges
        while held:
            step = core.worker_step(bob, pair.now)
            if step == WAIT:
                return
            if step == PREPARE:
                pair.prepare()
                continue
            if not pair.due():
                core.conversation_idle(bob)
                held = False
                return
            exchange, _ = pair.send()
            exchanges += 1
            net("bob", exchange, exchange.data)

    for _ in range(5000):
        while bursts and bursts[0][0] <= pair.now:
            pair.queue(*bursts.pop(0)[1])
            dispatch(core.messages_queued(bob, pair.now))
        for item in sorted(i for i in in_flight if i[0] <= pair.now):
            in_flight.remove(item)
            _, _, to, exchange, data = item
            if to == "bob":
                net("alice", exchange, pair.to_bob(data).replies)
            elif not exchange.ended:  # the service stops reading an ended exchange
                pair.to_alice(exchange, data)
                if exchange.answered:
                    pair.alice.core.end_exchange(exchange, pair.now)
        dispatch(pair.fire_due())
        run_worker()
        pending = pair.alice.messages.pending_for(bob)
        if not pending and not bursts:
            break
        times = [t for t, *_ in in_flight]
        times += [when for when in (pair.timer(),) if when is not None]
        times += [bursts[0][0]] if bursts else []
        assert times, "nothing left to wake up for, with messages pending"
        pair.now = max(pair.now, min(times))
    else:
        raise AssertionError("not all delivered within 5,000 steps")
    assert pair.now - start < 300.0
    assert pair.inbox() == texts  # each once, in the sender's order
    assert len(pair.bob.messages.inbox()) == 40
    assert pair.alice.messages.next_due() is None
    # the loss made retries happen, and each of those was counted
    attempts = [m.attempts for m in pair.alice.messages.outbox()]
    assert dropped > 0 and max(attempts) > 1 and core.stats["sent_direct"] == sum(attempts)


def _frames_of(data: bytes) -> list[bytes]:
    """A stream's bytes, frame by frame (each frame re-encoded whole)."""
    return [wire.encode_stream_frame(kind, payload) for kind, payload in frames(data)]


# ------------------------------------------- the worker as the service runs it (issue 9)


class _ServiceLike:
    """alice's side as ``Delivery`` runs it (p2pd/delivery/service.py), with time and
    the network moved by hand: a worker runs only when started (DeliveryDue) or woken
    (PrepareDue, RetryDue, SendDue, ExchangeEnded) and, on a loaded machine, some while
    after; it releases the conversation (``conversation_idle``) only once the readers
    of the exchanges it wrote have ended (its nursery); a reader stops at its batch's
    last answer and ends the exchange once its stream is closed, a little later.

    The network loses whole streams, cuts others short (a connection lost midway),
    delays the rest (a retry may overtake what it repeats), and blacks out for a while.
    """

    def __init__(
        self, seed: int, *, lag: float, latency: float, blackout: tuple[float, float]
    ) -> None:
        self.rng = random.Random(f"network {seed}")  # not the core's jitter stream
        self.pair = pair = Pair()
        pair.alice.core = DeliveryCore(
            pair.alice.ledger, handle="alice", public_key=pair.alice.key,
            ack_timeout=ACK_TIMEOUT, rng=random.Random(seed),
        )  # fmt: skip
        self.core, self.bob = pair.alice.core, pair.bob.key
        self.lag = lag  # longest wait from a wake-up to the worker's next step
        self.latency = latency  # longest one-way delay of a stream
        self.blackout = (pair.now + blackout[0], pair.now + blackout[1])
        #: (when, order, what, exchange, data): arrivals, stream closes, worker runs
        self.agenda: list[tuple[float, int, str, Exchange | None, bytes]] = []
        self.worker = "none"  # none | run (scheduled) | wait | drain (its readers)
        self.mine: list[Exchange] = []  # the exchanges the running worker wrote
        self.batches: list[int] = []
        self._order = 0  # ties in the agenda, broken in the order they were made

    def later(self, delay: float, what: str, exchange: Exchange | None, data: bytes = b"") -> None:
        self._order += 1
        self.agenda.append((self.pair.now + delay, self._order, what, exchange, data))

    def lost(self) -> bool:
        return self.blackout[0] <= self.pair.now < self.blackout[1] or self.rng.random() < 0.1

    def transmit(self, what: str, exchange: Exchange, data: bytes) -> None:
        """A stream's bytes: lost, cut after some frames, or whole; then delayed."""
        if self.lost():
            return
        parts = _frames_of(data)
        cut = self.rng.random() < 0.05
        if cut:
            parts = parts[: self.rng.randrange(len(parts) + 1)]
        delay = self.rng.uniform(0.001, self.latency)
        for part in parts:  # in order, as a stream is
            delay += self.rng.uniform(0.0, 0.001)
            self.later(delay, what, exchange, part)
        if cut:  # the connection is lost: the reader's stream ends
            self.later(delay + 0.01, "closed", exchange)

    def dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DeliveryDue):
                assert self.worker == "none", "a second worker for one conversation"
                self.worker = "run"
                self.mine = []
                self.later(self.rng.uniform(0, self.lag), "worker", None)
            elif self.worker == "wait" and isinstance(
                event, PrepareDue | RetryDue | SendDue | ExchangeEnded
            ):
                self.worker = "run"
                self.later(self.rng.uniform(0, self.lag), "worker", None)
            if isinstance(event, ExchangeEnded):
                self.release_if_drained()

    def release_if_drained(self) -> None:
        if self.worker == "drain" and all(ex.ended for ex in self.mine):
            self.worker = "none"
            self.core.conversation_idle(self.bob)

    def run_worker(self) -> None:
        pair = self.pair
        for _ in range(1000):
            step = self.core.worker_step(self.bob, pair.now)
            if step == WAIT:
                self.worker = "wait"
                return
            if step == PREPARE:
                pair.prepare()
                continue
            if not pair.due():
                self.worker = "drain"
                self.release_if_drained()
                return
            exchange, _ = pair.send()
            self.mine.append(exchange)
            self.batches.append(len(exchange.ids))
            self.transmit("to bob", exchange, exchange.data)
        raise AssertionError("the worker never waited")

    def arrive(self, what: str, exchange: Exchange, data: bytes) -> None:
        pair = self.pair
        if what == "to bob":
            self.transmit("to alice", exchange, pair.to_bob(data).replies)
        elif what == "to alice" and not exchange.ended and not exchange.answered:
            pair.to_alice(exchange, data)  # (the reader stops at the last answer)
            if exchange.answered:  # its stream is closed a little later
                self.later(self.rng.uniform(0.0, 0.005), "closed", exchange)
        elif what == "closed":
            self.dispatch(self.core.end_exchange(exchange, pair.now))
            pair.alice.commit()

    def run(self, texts: list[str], gap: float) -> float:
        """Queue ``texts`` one ``send`` call each, ``gap`` apart on average; run until
        all are delivered. Returns how long that took."""
        pair, core = self.pair, self.core
        start = pair.now
        todo = list(texts)
        next_queue = pair.now
        for _ in range(20_000):
            if todo and next_queue <= pair.now:
                pair.queue(todo.pop(0))
                self.dispatch(core.messages_queued(self.bob, pair.now))
                next_queue = pair.now + self.rng.expovariate(1 / gap)
            for item in sorted(i for i in self.agenda if i[0] <= pair.now):
                self.agenda.remove(item)
                _, _, what, exchange, data = item
                if what == "worker":
                    self.run_worker()
                else:
                    assert exchange is not None
                    self.arrive(what, exchange, data)
            self.dispatch(pair.fire_due())
            if not todo and not pair.alice.messages.pending_for(self.bob):
                return pair.now - start
            times = [when for when, *_ in self.agenda]
            times += [when for when in (pair.timer(),) if when is not None]
            times += [next_queue] if todo else []
            assert times, f"stuck: messages pending, nothing to wake up for ({self.worker})"
            pair.now = max(pair.now, min(times))
        raise AssertionError("not all delivered within 20,000 steps")


@pytest.mark.parametrize(
    ("seed", "gap", "lag", "latency"),
    [
        (seed, gap, lag, latency)
        for seed in (1, 2, 3)
        for gap, lag, latency in ((0.004, 0.0, 0.005), (0.01, 0.02, 0.02), (0.02, 0.08, 0.4))
    ],
)
def test_single_calls_behind_a_batch_on_a_lossy_network_as_the_service_runs_it(
    seed: int, gap: float, lag: float, latency: float
) -> None:
    """60 messages queued one ``send`` call each (SEND_GATHER gathers them behind the
    batch in flight) over a network that loses, cuts short and delays streams and
    blacks out for 3 s, the worker woken as the service wakes it (late, on a loaded
    machine): SendDue, RetryDue and ExchangeEnded in every order, batches answered
    before their streams close, conversations released with exchanges still open.
    Every message reaches bob once, in order, and is delivered; nothing is stuck."""
    driver = _ServiceLike(seed, lag=lag, latency=latency, blackout=(0.5, 3.5))
    texts = [f"alice-{i:03d}" for i in range(60)]
    took = driver.run(texts, gap)
    pair = driver.pair
    assert pair.inbox() == texts  # each once, in the sender's order
    assert len(pair.bob.messages.inbox()) == len(texts)
    assert all(m.state == DELIVERED for m in pair.alice.messages.outbox())
    assert took < 300.0  # (the backoff doubles up to 60 s: the slowest case here ~80 s)
    # gathered (a batch of several from single calls), and the loss made retries happen
    attempts = [m.attempts for m in pair.alice.messages.outbox()]
    assert max(driver.batches) > 1 and max(attempts) > 1


def test_gathering_behind_a_retried_batch_and_a_released_conversation() -> None:
    """The interleavings of SEND_GATHER with the rest, one by one: a message queued
    behind a batch that goes silent is sent with its retry; a late answer on the silent
    stream and the next batch's answer end exchanges while the worker gathers (their
    ExchangeEnded wakes it early, and it waits on for SendDue); a conversation released
    while a message gathers (the worker stopped) leaves nothing behind: the message is
    handed to the next worker at once, not after a SendDue that no one waits for."""
    pair = Pair()
    core, bob = pair.alice.core, pair.bob.key
    (first,) = pair.queue("first")
    assert core.messages_queued(bob, pair.now) == [DeliveryDue(bob)]
    assert core.worker_step(bob, pair.now) == SEND
    silent, _ = pair.send()  # ... lost
    pair.advance(0.001)
    (second,) = pair.queue("second")
    assert core.messages_queued(bob, pair.now) == []
    assert pair.fire() == [PrepareDue(bob)]  # encrypted while the batch waits
    assert core.worker_step(bob, pair.now) == PREPARE
    pair.prepare()
    assert core.worker_step(bob, pair.now) == WAIT
    # the silent batch is retried at its backoff, the message behind it with it
    assert pair.fire() == [RetryDue(bob)]
    assert core.worker_step(bob, pair.now) == SEND
    assert [m.id for m in pair.due()] == [first.id, second.id]
    retry, _ = pair.send()
    # the silent stream's answer comes late: "first" delivered there, not yet by retry
    late = pair.to_bob(silent.data).replies
    pair.to_alice(silent, late)
    assert pair.state(first).state == DELIVERED and silent.answered
    # "third" queued behind the retry, which is then answered
    pair.advance(0.001)
    behind = pair.now
    (third,) = pair.queue("third")
    assert core.messages_queued(bob, pair.now) == []
    pair.to_alice(retry, pair.to_bob(retry.data).replies)
    assert pair.end(retry).answered
    assert core.worker_step(bob, pair.now) == WAIT and pair.timer() == behind + SEND_GATHER
    # the silent stream is closed meanwhile: its ExchangeEnded wakes the worker early
    pair.advance(0.005)
    assert pair.end(silent).answered
    assert core.worker_step(bob, pair.now) == WAIT and pair.timer() == behind + SEND_GATHER
    assert pair.fire() == [SendDue(bob)]
    assert core.worker_step(bob, pair.now) == SEND
    last, _ = pair.send()
    assert last.ids == [third.id]
    # "fourth", queued behind "third", gathers once that is answered when the worker is
    # stopped (the daemon's nursery, an error): released, the conversation is due at once
    (fourth,) = pair.queue("fourth")
    assert core.messages_queued(bob, pair.now) == []
    pair.to_alice(last, pair.to_bob(last.data).replies)
    pair.end(last)
    assert core.worker_step(bob, pair.now) == WAIT and pair.timer() == pair.now + SEND_GATHER
    core.conversation_idle(bob)
    when = pair.timer()
    assert when is not None and when <= pair.now  # due at once
    assert pair.fire_due() == [DeliveryDue(bob)]
    assert core.worker_step(bob, pair.now) == SEND
    final, _ = pair.send()
    pair.to_alice(final, pair.to_bob(final.data).replies)
    assert final.ids == [fourth.id]
    pair.end(final)
    assert core.worker_step(bob, pair.now) == SEND and pair.due() == []
    core.conversation_idle(bob)
    assert pair.timer() is None
    assert pair.inbox() == ["first", "second", "third", "fourth"]
    assert all(m.state == DELIVERED for m in pair.alice.messages.outbox())
