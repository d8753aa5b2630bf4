"""Delivery's sans-I/O core, the way h11's ``ConnectionPair`` and aioquic's
``test_connection.py`` test theirs: two cores, bytes moved by hand (or dropped,
duplicated, reordered, cut anywhere), time advanced by hand. No socket, no clock, no
event loop; the sessions are real (X3DH and the Double Ratchet on in-memory SQLite)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from p2pd import wire
from p2pd.delivery.core import (
    RESET_INTERVAL,
    AckOwed,
    AckReceived,
    DeliveryCore,
    Event,
    Exchange,
    ExchangeEnded,
    MessageReceived,
    MessageSent,
    NackReceived,
    PendingMadeDue,
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
        self.alice.ledger.commit()
        return ready

    def send(self) -> tuple[Exchange, list[Event]]:
        """The worker's step: the due batch encrypted, framed and written."""
        ready = self.prepare()
        assert ready
        exchange = self.alice.core.start_exchange(self.bob.key, ready, self.now)
        events = self.alice.core.exchange_written(exchange, self.now)
        self.alice.ledger.commit()
        return exchange, events

    def to_bob(self, *chunks: bytes) -> StreamResult:
        """Bytes arriving on one stream bob accepts; all of the replies, all events."""
        stream = self.bob.core.accept_stream(self.alice.key)
        total = StreamResult()
        replies = b""
        for chunk in chunks:
            result = stream.data_received(chunk, self.now)
            self.bob.ledger.commit()
            replies += result.replies
            total.events += result.events
            total.reset = total.reset or result.reset
        total.replies = replies
        return total

    def to_alice(self, exchange: Exchange, data: bytes) -> StreamResult:
        result = exchange.data_received(data, self.now)
        self.alice.ledger.commit()
        return result

    def end(self, exchange: Exchange) -> ExchangeEnded:
        (ended,) = self.alice.core.end_exchange(exchange, self.now)
        assert isinstance(ended, ExchangeEnded)
        return ended

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


def test_frames_cut_anywhere_are_put_back_together() -> None:
    pair = Pair()
    pair.queue("split", "across", "reads")
    exchange, _ = pair.send()
    data = exchange.data
    at_bob = pair.to_bob(*(data[i : i + 7] for i in range(0, len(data), 7)))
    assert pair.inbox() == ["split", "across", "reads"]
    assert len(frames(at_bob.replies)) == 3


def test_a_lost_batch_is_retried_after_the_backoff_with_the_same_envelope() -> None:
    pair = Pair()
    (message,) = pair.queue("lost once")
    sent_at = pair.now
    exchange, _ = pair.send()  # ... and the packets are lost
    envelope = pair.state(message).envelope
    assert exchange.deadline == sent_at + ACK_TIMEOUT
    retry_at = pair.alice.messages.next_due()
    assert retry_at is not None and sent_at + 0.4 <= retry_at <= sent_at + 0.6  # 0.5 s ± 20 %
    pair.advance(0.39)
    assert pair.due() == []
    # Due again after the backoff, but the service runs one exchange per conversation
    # at a time: the retry waits for this one's deadline (ack_timeout > first backoff).
    pair.advance(ACK_TIMEOUT - 0.39)
    assert [m.id for m in pair.due()] == [message.id]
    # not one answer: the service is told to drop the connection
    assert pair.end(exchange) == ExchangeEnded(pair.bob.key, False, True)

    again, _ = pair.send()
    assert again.data == exchange.data  # the same envelope, not a new ratchet step
    assert pair.state(message).envelope == envelope
    second = pair.alice.messages.next_due()
    assert second is not None and pair.now + 0.8 <= second <= pair.now + 1.2  # doubled
    pair.advance(ACK_TIMEOUT)
    pair.end(again)  # lost again

    third, _ = pair.send()
    pair.to_alice(third, pair.to_bob(third.data).replies)
    assert pair.state(message).state == DELIVERED and pair.state(message).attempts == 3
    assert pair.inbox() == ["lost once"]
    assert pair.alice.messages.next_due() is None


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
    pair.alice.ledger.commit()
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
    assert [p.msg_id for p in puts] == [small.id]  # the big one goes directly only
    assert pair.state(big).attempts == 1 and pair.state(big).state == QUEUED
    (put,) = puts
    assert pair.alice.core.mailbox_put_done(put, 3, pair.now) == [MessageSent(small.id, "mailbox")]
    pair.alice.ledger.commit()
    assert pair.state(small).via == "mailbox" and pair.state(small).state == SENT

    # later retries try the direct path only: the mailbox holds it already
    pair.now = pair.alice.messages.next_due() or 0.0
    assert pair.alice.core.plan_mailbox(pair.bob.key, pair.prepare(), pair.now) == []

    events = pair.bob.core.mailbox_entry_opened(put.plaintext, pair.now)
    pair.bob.ledger.commit()
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
    pair.alice.ledger.commit()
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
    pair.alice.ledger.commit()
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


def test_a_message_makes_what_we_owe_its_sender_due_now() -> None:
    pair = Pair()
    # bob owes alice a message, waiting for its backoff
    (owed,) = pair.bob.messages.enqueue_many("alice", pair.alice.key, ["owed"], pair.now)
    pair.bob.messages.mark_attempt(owed.id, pair.now, via=None)
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
    pair.alice.ledger.commit()
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
    pair.alice.ledger.commit()
    stream = pair.alice.core.accept_stream(pair.bob.key)
    result = stream.data_received(wire.encode_stream_frame(wire.FRAME_ACK, message.id), pair.now)
    pair.alice.ledger.commit()
    assert result.replies == b"" and result.events == [AckReceived(pair.bob.key, message.id, True)]
    assert pair.state(message).state == DELIVERED


def test_a_bad_bundle_stops_the_batch_and_a_broken_attempt_is_counted() -> None:
    pair = Pair()
    first, second = pair.queue("one", "two")
    assert pair.alice.core.prepare(pair.bob.key, pair.due(), b"not a bundle", pair.now) == []
    pair.alice.ledger.commit()
    assert [pair.state(m).attempts for m in (first, second)] == [1, 1]
    pair.advance(1.0)
    batch = pair.due()
    pair.alice.core.delivery_failed(batch, pair.now)
    pair.alice.ledger.commit()
    assert [pair.state(m).attempts for m in (first, second)] == [2, 2]
    assert all(pair.state(m).state == QUEUED for m in (first, second))
