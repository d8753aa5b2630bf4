"""Delivery's decisions, sans I/O: what to write, what to store, what to tell the service.

No sockets, no event loop, no clock: every entry point takes ``now`` (Unix seconds; the
trio service reads the clock once per entry point and passes it down). What is at rest
is read through the :class:`Ledger` the core is handed (SQLite and the sessions, in
:mod:`p2pd.delivery.ledger`); the outbox's changes come back as rows to write, while
session steps, received messages and session resets go through the ledger directly.
The core never commits: the service has the rows applied and commits once per entry
point, so one read's acks and messages are one transaction. The service does the rest:
QUIC streams, the DHT mailbox, sealing, the record cache, the event bus.

::

    core.load_schedule()                                 # at start: what is pending
    core.messages_queued(peer_key, now) -> [Event]       # DeliveryDue / PrepareDue
    core.get_timer() -> when; core.handle_timer(now)     # the one timer: retries,
                                                         # answer deadlines, gathering
    core.worker_step(peer_key, now) -> SEND | PREPARE | WAIT
    core.prepare(peer_key, due, bundle, now) -> ready    # envelopes, in order
    ex = core.start_exchange(peer_key, ready, now)       # a batch for one stream
    ex.data; core.exchange_written(ex, now)              # write it, then say so
    ex.data_received(answers, now) -> StreamResult       # ACK / NACK frames back
    ex.answered; core.end_exchange(ex, now)              # all answered (or the timer)
    core.conversation_idle(peer_key)                     # the worker found nothing due
    s = core.accept_stream(peer_key)                     # a stream the peer opened
    s.data_received(data, now) -> StreamResult           # replies, events, reset?
    core.plan_mailbox(peer_key, ready, now) -> [MailboxPut]   # could not connect
    core.mailbox_put_done(put, copies, now)
    core.mailbox_entry_opened(plaintext, now) -> [Event]      # from our own mailbox
    core.delivery_failed(batch, now)

What happens is reported as past-tense events (:data:`Event`); the service reacts to
each in one place (``Delivery._dispatch``). What is to be written at rest is returned
as typed rows (:data:`Write`, from :meth:`DeliveryCore.writes_to_commit`), which the
service has the ledger apply and commit in one transaction after each entry point.
Every ack, whether it came on the batch's stream, on a stream of its own or through the
mailbox, goes through one method (``_ack_received``) and is reported as
:class:`AckReceived`.

Decisions and why (wire formats: docs/PROTOCOL.md, "Messages"):

- A MESSAGE whose id we hold is acked again (the sender may have missed our ack) and
  not stored twice; from another key than the one that sent it, it is dropped.
- Decrypt and decode happen in a savepoint of the open transaction: a message refused
  after decryption undoes its ratchet step and nothing else.
- A message that cannot be decrypted because the session is unknown here (or its
  one-time prekey is gone) is answered with NACK; anything else refused, without an
  answer (a replay under a new id fails to decrypt: silence tells an attacker nothing).
- A NACK for one of our messages to that peer resets the session (archive it, forget
  the unacknowledged envelopes, encrypt them again in a new one), at most once per peer
  per :data:`RESET_INTERVAL`: a NACK storm cannot make us start sessions in a loop.
- A call signal (payload kind 2) is acked and reported, never stored; so is a key
  rotation notice (kind 3), which the service verifies and acts on.
- A message from a peer we owe messages to makes those due now: it is alive.
- A batch with not one answer by its deadline (``ack_timeout``), while the peer
  answered nothing else since it was written, asks the service to close the
  connection: a peer killed without closing it is then found out on the next attempt,
  not after the idle timeout.

The schedule (what the one timer of :meth:`get_timer` covers):

- Every attempt gives each message its next attempt, ``backoff(attempts)`` later (0.5 s,
  doubling to 60 s, ±20 %), written with the attempt (``next_attempt``): a restart
  rebuilds the schedule from the rows (:meth:`load_schedule`).
- A written batch's answers are read until ``ack_timeout`` after the write. One with
  no answer yet when the earliest of its messages' next attempts comes is retried then
  (:class:`RetryDue`: the same envelopes on a new stream), while its own stream is
  still read: the retry comes after the backoff, and a late answer (QUIC recovering
  from loss takes about a second) still counts. Not before the peer usually answers,
  though: the time from a write to its first answer is smoothed per peer as RFC 6298
  does round trips, and a batch is retried no sooner than that RTO (a busy receiver is
  slow, not lost). Once an answer comes, the peer is alive and working through the
  batch: it is not retried before its deadline.
- One new batch in flight per conversation (several on parallel streams arrive
  interleaved, since aioquic serves streams round-robin per packet, and every message
  out of order leaves a skipped key in the session state written with every message,
  up to 58 KB). A conversation is held by one worker from :class:`DeliveryDue` to
  :meth:`conversation_idle`; while its batch waits, what is queued meanwhile is
  encrypted (:data:`PREPARE`) once :data:`PREPARE_GATHER` has let a few gather, and
  sent as the next batch no sooner than :data:`SEND_GATHER` after the first of them
  (:class:`SendDue`), even if the batch is answered sooner: one ``send`` call per
  message then costs one batch per few messages, not one per answer. A message queued
  to an idle conversation, or once its batch is answered, goes at once.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Protocol

from .. import wire
from ..dht.mailbox_entry import MAX_PLAINTEXT
from ..errors import (
    DuplicateMessage,
    NoSession,
    P2PDError,
    PrekeyUnavailable,
    SessionError,
    UnknownSession,
    WireError,
)
from ..identity import fingerprint
from ..messaging import DELIVERED, Message, backoff
from .events import (
    AckOwed,
    AckReceived,
    DeliveryDue,
    Event,
    ExchangeEnded,
    FileOfferReceived,
    MailboxPut,
    MakeDue,
    MarkDelivered,
    MessageReceived,
    MessageSent,
    NackReceived,
    PendingMadeDue,
    PrepareDue,
    RetryDue,
    RotationReceived,
    ScheduleAttempt,
    SendDue,
    SenderUnverified,
    SessionReset,
    SetEnvelope,
    SignalReceived,
    StreamResult,
    Write,
)

log = logging.getLogger(__name__)

#: At most one session reset per peer in this many seconds (a NACK storm is refused).
RESET_INTERVAL = 10.0
#: Messages sent in one batch on one stream.
BATCH = 256
#: While a batch waits for its answers, how long messages queued one by one may gather
#: before the worker encrypts them (one transaction for all).
PREPARE_GATHER = 0.002
#: While a batch waits for its answers, messages queued behind it one by one (one
#: ``send`` call each) go out together in the next batch, no sooner than this long after
#: the first of them was queued: fewer, larger batches cost less per message on both
#: sides (a stream, its packets and acks, the transactions). A message to an idle
#: conversation, or one queued when its batch has been answered, goes at once.
SEND_GATHER = 0.025
#: A sealed box is its plaintext plus an ephemeral key and a MAC.
#: What :meth:`DeliveryCore.worker_step` tells a conversation's worker to do next.
SEND, PREPARE, WAIT = "send", "prepare", "wait"


class Ledger(Protocol):
    """What the core reads and writes at rest. Nothing here commits: the service does,
    once per entry point of the core."""

    def message(self, msg_id: bytes) -> Message | None:
        """The message with that id, in either direction."""

    def open_envelope(
        self,
        transport_key: bytes | None,
        envelope: bytes,
        decode: Callable[[bytes], wire.MessagePayload],
        now: float,
    ) -> tuple[bytes, wire.MessagePayload]:
        """Decrypt and ``decode``: the sender's key and the payload. The ratchet step is
        left uncommitted, and undone (nothing else of the transaction) if decryption or
        ``decode`` raises: SessionError or WireError."""

    def trusted_handle(self, peer_key: bytes) -> str | None:
        """The pinned contact's handle for that key, if any."""

    def store_incoming(
        self, sender_key: bytes, handle: str, payload: wire.MessagePayload, now: float, via: str
    ) -> Message | None:
        """Store a received message; None if its id is already there."""

    def outgoing_state(self, msg_id: bytes) -> tuple[bytes, str] | None:
        """Our message ``msg_id``'s recipient and state (None: not one of ours). Reads
        no sealed column: an ack costs no decryption at rest."""

    def has_pending(self, peer_key: bytes) -> bool: ...

    def next_attempts(self) -> dict[bytes, float]:
        """Each conversation with messages pending: its earliest next attempt."""

    def next_attempt(self, peer_key: bytes) -> float | None:
        """The earliest next attempt of the messages pending to ``peer_key``."""

    def reset_session(self, peer_key: bytes, now: float) -> None:
        """Archive the session and forget the unacknowledged envelopes to that peer (due
        again at once)."""

    def encrypt(self, peer_key: bytes, plaintext: bytes, bundle: bytes | None, now: float) -> bytes:
        """Raises NoSession (no session and no bundle), WireError or SessionError."""

    def encrypt_many(
        self, peer_key: bytes, plaintexts: Sequence[bytes], bundle: bytes | None, now: float
    ) -> list[bytes]:
        """:meth:`encrypt` each, in order: every envelope, or (raising as encrypt does)
        no ratchet step at all."""

    def apply(self, writes: Sequence[Write]) -> None:
        """Write the rows the core decided on, in the open transaction."""


# ---------------------------------------------------------------------------- streams


class _FrameStream:
    """One QUIC stream's frames, in either role."""

    def __init__(self, core: DeliveryCore, peer_key: bytes) -> None:
        self.core = core
        self.peer_key = peer_key
        self._decoder = wire.StreamFrameDecoder()

    def data_received(self, data: bytes, now: float) -> StreamResult:
        """Bytes read from the stream. A framing error asks for a reset; every complete
        frame is handled, in order."""
        result = StreamResult()
        try:
            frames = self._decoder.feed(data)
        except WireError as exc:
            self.core.stats["malformed_frames"] += 1
            who = fingerprint(self.peer_key)[:12]
            log.warning("malformed frame from %s (%s): closing the stream", who, exc)
            result.reset = True
            return result
        replies = bytearray()
        for kind, payload in frames:
            self.core._frame_received(self.peer_key, kind, payload, replies, result.events, now)
        result.replies = bytes(replies)
        self._observe(result.events, now)
        return result

    def _observe(self, events: list[Event], now: float) -> None:
        pass


class IncomingStream(_FrameStream):
    """A stream the peer opened: its MESSAGE frames are answered with ACK or NACK."""


class Exchange(_FrameStream):
    """A batch of messages written on one stream we opened, and the answers to it.

    ``data`` is what to write (with FIN); ``waiting`` the ids not answered yet. A NACK
    answers them all: the session is reset and every one is encrypted again. Once
    written, ``deadline`` is when the core's timer stops waiting for the answers still
    missing, and ``retry_at`` (None once an answer came) when it sends them again
    (see the module docstring)."""

    def __init__(
        self,
        core: DeliveryCore,
        peer_key: bytes,
        batch: Sequence[tuple[bytes, bytes]],
        deadline: float,
        *,
        outbox: Sequence[Message] = (),
        via: str = "direct",
    ) -> None:
        super().__init__(core, peer_key)
        #: "direct", or "relay" for a connection through a relay (p2pd/relay/)
        self.via = via
        self.ids = [msg_id for msg_id, _ in batch]
        self.waiting = set(self.ids)
        self.acked: set[bytes] = set()
        self.nacked: set[bytes] = set()
        self.deadline = deadline
        self.written = False
        self.written_at = 0.0
        self.retry_at: float | None = None
        self.first_answer: float | None = None
        #: Silent at ``retry_at``: its messages went again; no longer the batch in flight.
        self.overdue = False
        self.ended = False
        #: The outbox messages this batch carries (empty for a call signal).
        self.outbox = list(outbox)
        self.data = b"".join(
            wire.encode_stream_frame(wire.FRAME_MESSAGE, msg_id + envelope)
            for msg_id, envelope in batch
        )

    @property
    def answered(self) -> bool:
        """Every message of the batch got its answer: nothing more to wait for."""
        return not self.waiting

    def _observe(self, events: list[Event], now: float) -> None:
        answered = False
        for event in events:
            if isinstance(event, AckReceived) and event.peer_key == self.peer_key:
                self.waiting.discard(event.msg_id)
                self.acked.add(event.msg_id)
                answered = True
            elif isinstance(event, NackReceived) and event.peer_key == self.peer_key:
                self.nacked.add(event.msg_id)
                self.waiting.clear()  # everything is encrypted again and resent
                answered = True
        if answered and self.written:
            # The peer is alive and working through the batch: not retried before its
            # deadline. (It answered: a silent batch of its need not close the connection.)
            self.retry_at = None
            self.core._answered[self.peer_key] = now
            if self.first_answer is None:
                self.first_answer = now
                self.core._answer_timed(self.peer_key, now - self.written_at)


# ---------------------------------------------------------------------------- the core


class DeliveryCore:
    """Delivery's decisions for every conversation of one node; see the module docstring."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        handle: str,
        public_key: bytes,
        ack_timeout: float,
        reset_interval: float = RESET_INTERVAL,
        rng: random.Random | None = None,
    ) -> None:
        self.ledger = ledger
        self.handle = handle
        self.public_key = public_key
        self.ack_timeout = ack_timeout
        self.reset_interval = reset_interval
        self._rng = rng or random.Random()
        self._last_reset: dict[bytes, float] = {}
        #: When each peer last answered one of our batches.
        self._answered: dict[bytes, float] = {}
        #: Each peer's time from a write to its batch's first answer: smoothed, and its
        #: mean deviation (RFC 6298, section 2, applied to batches).
        self._answer_time: dict[bytes, tuple[float, float]] = {}
        self._writes: list[Write] = []
        #: Acks counted in ``_writes`` (not in the ledger yet): a second is a repeat.
        self._delivering: set[bytes] = set()
        #: Conversations no worker holds, with messages pending: their earliest attempt.
        self._due: dict[bytes, float] = {}
        #: Conversations a worker holds (DeliveryDue .. conversation_idle).
        self._held: set[bytes] = set()
        #: Written exchanges not ended: their deadlines are timers.
        self._open: set[Exchange] = set()
        #: Held conversations whose waiting batch has messages queued behind it: when
        #: to encrypt those; then (the time came) the worker's next step is PREPARE.
        self._prepare_at: dict[bytes, float] = {}
        self._prepare_ready: set[bytes] = set()
        #: Held conversations with messages queued since their worker took its batch.
        self._queued_since: set[bytes] = set()
        #: Held conversations: when the first message was queued behind their batch in
        #: flight; and, once it is answered, when the next batch goes (SEND_GATHER).
        self._behind_since: dict[bytes, float] = {}
        self._send_at: dict[bytes, float] = {}
        self.stats: dict[str, int] = {
            "sent_direct": 0,
            "batches_direct": 0,
            "sent_relay": 0,
            "batches_relay": 0,
            "sent_mailbox": 0,
            "received_direct": 0,
            "received_mailbox": 0,
            "acks_in": 0,
            "nacks_in": 0,
            "nacks_out": 0,
            "refused": 0,
            "duplicates": 0,
            "malformed_frames": 0,
            "mailbox_polls": 0,
            "wakeups_lost": 0,
        }

    def writes_to_commit(self) -> list[Write]:
        """The rows decided since the last call, for the ledger to apply and commit
        together (after every entry point, before any other task runs)."""
        writes, self._writes = self._writes, []
        self._delivering.clear()
        return writes

    # ------------------------------------------------------------------ schedule

    def load_schedule(self) -> None:
        """At start: every conversation with messages pending is due at its earliest
        next attempt, as the ledger holds it (a restart retries what was pending)."""
        for peer_key, when in self.ledger.next_attempts().items():
            if peer_key not in self._held:
                self._due[peer_key] = when

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next to be called (None: nothing scheduled)."""
        times = [ex.deadline for ex in self._open]
        times += [ex.retry_at for ex in self._open if ex.retry_at is not None]
        times += self._due.values()
        times += self._prepare_at.values()
        times += self._send_at.values()
        return min(times, default=None)

    def handle_timer(self, now: float) -> list[Event]:
        """End the exchanges whose deadline passed, have silent batches sent again after
        their backoff, hand due conversations to workers, wake the workers that have
        messages to encrypt ahead."""
        events: list[Event] = []
        for exchange in [ex for ex in self._open if ex.deadline <= now]:
            events += self.end_exchange(exchange, now)
        for exchange in self._open:
            if exchange.retry_at is not None and exchange.retry_at <= now:
                exchange.retry_at = None
                exchange.overdue = True
                events.append(RetryDue(exchange.peer_key))
        for peer_key in [p for p, when in self._due.items() if when <= now]:
            del self._due[peer_key]
            self._hold(peer_key, events)
        for peer_key in [p for p, when in self._prepare_at.items() if when <= now]:
            del self._prepare_at[peer_key]
            self._prepare_ready.add(peer_key)
            events.append(PrepareDue(peer_key))
        for peer_key in [p for p, when in self._send_at.items() if when <= now]:
            del self._send_at[peer_key]
            events.append(SendDue(peer_key))
        return events

    def messages_queued(self, peer_key: bytes, now: float) -> list[Event]:
        """New messages to ``peer_key`` (or moved to it): due now. A worker is started
        if none holds the conversation; one whose batch waits encrypts them after
        :data:`PREPARE_GATHER` and sends them after :data:`SEND_GATHER`."""
        events: list[Event] = []
        if peer_key not in self._held:
            self._due.pop(peer_key, None)
            self._hold(peer_key, events)
            return events
        waiting = self._waiting_exchange(peer_key)
        if waiting is None:
            self._queued_since.add(peer_key)  # encrypted while the batch taken waits
            return events
        if not waiting.answered:  # (answered: only its stream is still to be closed)
            self._behind_since.setdefault(peer_key, now)
        if peer_key not in self._prepare_ready:
            self._prepare_at.setdefault(peer_key, now + PREPARE_GATHER)
        return events

    def worker_step(self, peer_key: bytes, now: float) -> str:
        """What the worker holding ``peer_key`` does next: SEND the next due batch (none
        waits for answers, or it is overdue: RetryDue), PREPARE (encrypt what was queued
        behind the waiting batch), or WAIT (for ExchangeEnded, RetryDue, PrepareDue or
        SendDue: what was queued behind the answered batch gathers until SEND_GATHER)."""
        if self._waiting_exchange(peer_key) is None:
            since = self._behind_since.get(peer_key)
            if since is not None and now < since + SEND_GATHER:
                self._send_at[peer_key] = since + SEND_GATHER
                return WAIT
            self._behind_since.pop(peer_key, None)
            self._send_at.pop(peer_key, None)
            self._queued_since.discard(peer_key)  # the next batch takes them
            return SEND
        if peer_key in self._prepare_ready:
            self._prepare_ready.discard(peer_key)
            return PREPARE
        return WAIT

    def conversation_idle(self, peer_key: bytes) -> None:
        """The worker holding ``peer_key`` found nothing due and stopped: the timer now
        covers the conversation's next attempt, if anything is pending."""
        self._held.discard(peer_key)
        self._prepare_at.pop(peer_key, None)
        self._prepare_ready.discard(peer_key)
        self._queued_since.discard(peer_key)
        self._behind_since.pop(peer_key, None)
        self._send_at.pop(peer_key, None)
        when = self.ledger.next_attempt(peer_key)
        if when is not None:
            self._due[peer_key] = when

    def debug_state(self, now: float) -> dict[bytes, dict[str, object]]:
        """Each conversation the core schedules or holds, as the control API's status
        shows it for diagnosis (``messages.conversations``), by peer key: the peer's
        fingerprint prefix and the schedule, in seconds from ``now``; never a message."""
        peers = set(self._held) | set(self._due) | {ex.peer_key for ex in self._open}
        rows: dict[bytes, dict[str, object]] = {}

        def rel(when: float | None) -> float | None:
            return None if when is None else round(when - now, 3)

        for peer_key in sorted(peers):
            exchanges = [ex for ex in self._open if ex.peer_key == peer_key]
            rows[peer_key] = {
                "peer": fingerprint(peer_key)[:12],
                "held": peer_key in self._held,
                "due_in": rel(self._due.get(peer_key)),
                "prepare_in": rel(self._prepare_at.get(peer_key)),
                "prepare_ready": peer_key in self._prepare_ready,
                "queued_since_taken": peer_key in self._queued_since,
                "behind_for": rel(self._behind_since.get(peer_key)),
                "send_in": rel(self._send_at.get(peer_key)),
                "waiting_exchange": self._waiting_exchange(peer_key) is not None,
                "exchanges": [
                    {
                        "messages": len(ex.ids),
                        "waiting": len(ex.waiting),
                        "written": ex.written,
                        "overdue": ex.overdue,
                        "deadline_in": rel(ex.deadline),
                        "retry_in": rel(ex.retry_at),
                    }
                    for ex in exchanges
                ],
            }
        return rows

    def _hold(self, peer_key: bytes, events: list[Event]) -> None:
        self._held.add(peer_key)
        events.append(DeliveryDue(peer_key))

    def _make_due(self, peer_key: bytes, now: float) -> None:
        """What is pending to ``peer_key`` is due now (a held conversation's worker
        finds it after its batch)."""
        if peer_key not in self._held:
            self._due[peer_key] = now

    def _answer_timed(self, peer_key: bytes, seconds: float) -> None:
        """A batch to ``peer_key`` got its first answer ``seconds`` after its write."""
        known = self._answer_time.get(peer_key)
        if known is None:
            self._answer_time[peer_key] = (seconds, seconds / 2)
        else:  # RFC 6298, 2.3: beta 1/4, alpha 1/8
            smooth, deviation = known
            deviation = 0.75 * deviation + 0.25 * abs(smooth - seconds)
            self._answer_time[peer_key] = (0.875 * smooth + 0.125 * seconds, deviation)

    def _retry_floor(self, peer_key: bytes) -> float:
        """How long a batch to ``peer_key`` may go unanswered before it looks lost: RFC
        6298's RTO (smoothed + 4 deviations), 0 while nothing was measured."""
        smooth, deviation = self._answer_time.get(peer_key, (0.0, 0.0))
        return smooth + 4 * deviation

    def _waiting_exchange(self, peer_key: bytes) -> Exchange | None:
        for exchange in self._open:
            if exchange.peer_key == peer_key and exchange.outbox and not exchange.overdue:
                return exchange
        return None

    def _schedule(self, messages: Iterable[Message], now: float, via: str | None) -> list[float]:
        """Count an attempt of each message; retry after its backoff unless acked."""
        times = []
        for m in messages:
            when = now + backoff(m.attempts, self._rng)
            self._writes.append(ScheduleAttempt(m.id, m.attempts + 1, when, now, via))
            times.append(when)
        return times

    # ------------------------------------------------------------------ sending

    def prepare(
        self, peer_key: bytes, batch: Sequence[Message], bundle: bytes | None, now: float
    ) -> list[Message]:
        """Give each message its envelope, in order; return those that have one. A
        message that cannot be encrypted (no session and no bundle yet, a bad bundle)
        stops the batch there, and it and the rest wait for their next attempt. The
        messages between two that have their envelope are encrypted together (one
        session write): all of them, or none."""
        ready: list[Message] = []
        while len(ready) < len(batch):
            start = len(ready)
            if batch[start].envelope is not None:
                ready.append(batch[start])
                continue
            end = start + 1
            while end < len(batch) and batch[end].envelope is None:
                end += 1
            run = batch[start:end]
            payloads = [
                wire.MessagePayload(
                    m.id, m.seq, m.sent_at_ms, m.text, m.kind, sender=self.handle
                ).encode()
                for m in run
            ]
            try:
                envelopes = self.ledger.encrypt_many(peer_key, payloads, bundle, now)
            except NoSession:  # a failed encrypt changed nothing (its own savepoint)
                log.info("no session with %s and no prekey bundle yet: waiting", run[0].handle)
            except (WireError, SessionError) as exc:  # a bad bundle in the record
                log.warning("cannot start a session with %s: %s", run[0].handle, exc)
            else:
                for message, envelope in zip(run, envelopes, strict=True):
                    self._writes.append(SetEnvelope(message.id, envelope))
                    ready.append(_with_envelope(message, envelope))
                continue
            self._schedule(batch[start:], now, None)
            break
        return ready

    def start_exchange(
        self, peer_key: bytes, ready: Sequence[Message], now: float, *, via: str = "direct"
    ) -> Exchange:
        """A batch of messages with envelopes, to be written on a new stream (``via``
        "relay" when the connection goes through a relay)."""
        batch = [(m.id, m.envelope) for m in ready if m.envelope is not None]
        return Exchange(self, peer_key, batch, now + self.ack_timeout, outbox=ready, via=via)

    def signal_exchange(
        self, peer_key: bytes, msg_id: bytes, envelope: bytes, now: float
    ) -> Exchange:
        """One call signal on a stream of its own (not in the outbox: never retried)."""
        return Exchange(self, peer_key, [(msg_id, envelope)], now + self.ack_timeout)

    def signal_payload(self, msg_id: bytes, text: str, now: float) -> bytes:
        return wire.MessagePayload(
            msg_id, 0, int(now * 1000), text, kind=wire.KIND_CALL, sender=self.handle
        ).encode()

    def exchange_written(self, exchange: Exchange, now: float) -> list[Event]:
        """The batch is on the wire: its messages are sent, each due again after its
        backoff; the answers are awaited until the earliest of those (the timer)."""
        exchange.written = True
        exchange.written_at = now
        exchange.deadline = now + self.ack_timeout
        if exchange.ended:
            return []
        self._open.add(exchange)
        if not exchange.outbox:
            return []
        retries = self._schedule(exchange.outbox, now, exchange.via)
        # Sent again after the backoff, but not before the peer usually starts answering
        # (a busy receiver is slow, not lost: a retry would only double its work).
        retry_at = max(min(retries), now + self._retry_floor(exchange.peer_key))
        if exchange.waiting and retry_at < exchange.deadline:  # not answered yet
            exchange.retry_at = retry_at
        if exchange.peer_key in self._queued_since:  # queued while it was taken, written
            self._queued_since.discard(exchange.peer_key)
            self._prepare_ready.add(exchange.peer_key)  # encrypted while it waits
        self.stats[f"sent_{exchange.via}"] += len(exchange.outbox)
        self.stats[f"batches_{exchange.via}"] += 1
        waiting = exchange.waiting
        return [MessageSent(m.id, exchange.via) for m in exchange.outbox if m.id in waiting]

    def end_exchange(self, exchange: Exchange, now: float) -> list[Event]:
        """Every answer came, or the deadline passed (or the stream broke)."""
        if exchange.ended:
            return []
        exchange.ended = True
        self._open.discard(exchange)
        if exchange.outbox and self._waiting_exchange(exchange.peer_key) is None:
            self._prepare_at.pop(exchange.peer_key, None)  # the next batch encrypts them
            self._prepare_ready.discard(exchange.peer_key)
        # Not one answer (nor a NACK, which empties ``waiting``), even if the write
        # broke, and nothing else answered since: the connection is suspect.
        silent = len(exchange.waiting) == len(exchange.ids) and (
            self._answered.get(exchange.peer_key, -math.inf) < exchange.written_at
            or not exchange.written
        )
        ended = ExchangeEnded(
            exchange.peer_key, exchange.answered, silent and bool(exchange.outbox), exchange
        )
        return [ended]

    def delivery_failed(self, batch: Sequence[Message], now: float) -> None:
        """An attempt broke before it could be counted: try again after backoff."""
        self._schedule(batch, now, None)

    def plan_mailbox(
        self, peer_key: bytes, ready: Sequence[Message], now: float
    ) -> list[MailboxPut]:
        """No connection could be made: which messages go to the peer's mailbox. A
        message is left there once (later retries try the direct path); one too large
        for a mailbox entry is delivered directly only."""
        puts: list[MailboxPut] = []
        for m in ready:
            if m.via == "mailbox" or m.envelope is None:
                self._schedule([m], now, None)  # already there; retry direct
                continue
            plain = wire.encode_mailbox_plaintext(
                wire.MAILBOX_MESSAGE, self.public_key, m.id, m.envelope
            )
            if len(plain) > MAX_PLAINTEXT:  # padded and sealed, it would not fit
                log.warning("message %s is too large for a mailbox: direct only", m.id.hex())
                self._schedule([m], now, None)
                continue
            puts.append(MailboxPut(peer_key, m.id, plain, m.attempts))
        return puts

    def mailbox_put_done(self, put: MailboxPut, copies: int, now: float) -> list[Event]:
        """``copies`` nodes took the entry (0: none; it is retried after backoff)."""
        when = now + backoff(put.attempts, self._rng)
        via = "mailbox" if copies else None
        self._writes.append(ScheduleAttempt(put.msg_id, put.attempts + 1, when, now, via))
        log.info("message %s left in %d mailbox(es)", put.msg_id.hex()[:8], copies)
        if not copies:
            return []
        self.stats["sent_mailbox"] += 1
        return [MessageSent(put.msg_id, "mailbox")]

    def ack_plaintext(self, msg_id: bytes) -> bytes:
        """A mailbox entry that acks ``msg_id`` (to be sealed to its sender)."""
        return wire.encode_mailbox_plaintext(wire.MAILBOX_ACK, self.public_key, msg_id, b"")

    # ------------------------------------------------------------------ receiving

    def accept_stream(self, peer_key: bytes) -> IncomingStream:
        return IncomingStream(self, peer_key)

    def mailbox_entry_opened(self, plaintext: bytes, now: float) -> list[Event]:
        """An entry of our mailbox, unsealed: a message (stored; its ack is owed) or an
        ack. One that does not decode is ignored."""
        events: list[Event] = []
        try:
            kind, claimed, msg_id, envelope = wire.decode_mailbox_plaintext(plaintext)
        except WireError:
            log.info("ignored a mailbox entry that does not decode")
            return events
        if kind == wire.MAILBOX_ACK:
            # The claimed sender is who the ack is from: only the peer we sent msg_id to
            # knows it, and mark_delivered checks that the two match.
            self._ack_received(claimed, msg_id, events, now)
            return events
        verdict, sender = self._accept(None, msg_id, envelope, "mailbox", events, now)
        if verdict == _ACK and sender is not None:
            events.append(AckOwed(sender, msg_id))
        return events

    def _frame_received(
        self,
        peer_key: bytes,
        kind: int,
        payload: bytes,
        replies: bytearray,
        events: list[Event],
        now: float,
    ) -> None:
        if kind == wire.FRAME_MESSAGE:
            if len(payload) <= wire.MESSAGE_ID_LEN:
                self.stats["malformed_frames"] += 1
                return
            msg_id = payload[: wire.MESSAGE_ID_LEN]
            envelope = payload[wire.MESSAGE_ID_LEN :]
            verdict, _ = self._accept(peer_key, msg_id, envelope, "direct", events, now)
            if verdict == _ACK:
                replies += wire.encode_stream_frame(wire.FRAME_ACK, msg_id)
            elif verdict == _NACK:
                self.stats["nacks_out"] += 1
                replies += wire.encode_stream_frame(wire.FRAME_NACK, msg_id)
        elif len(payload) != wire.MESSAGE_ID_LEN:
            self.stats["malformed_frames"] += 1
        elif kind == wire.FRAME_ACK:
            self._ack_received(peer_key, payload, events, now)
        else:
            self._nack_received(peer_key, payload, events, now)

    def _ack_received(
        self, peer_key: bytes, msg_id: bytes, events: list[Event], now: float
    ) -> None:
        """Every ack comes through here, whichever way it came."""
        self.stats["acks_in"] += 1
        # Only the recipient's ack counts, once (a repeat, or a signal's, changes nothing).
        recipient, state = self.ledger.outgoing_state(msg_id) or (None, None)
        delivered = recipient == peer_key and state != DELIVERED and msg_id not in self._delivering
        if delivered:
            self._delivering.add(msg_id)
            self._writes.append(MarkDelivered(msg_id, peer_key, now))
        events.append(AckReceived(peer_key, msg_id, delivered))

    def _nack_received(
        self, peer_key: bytes, msg_id: bytes, events: list[Event], now: float
    ) -> None:
        self.stats["nacks_in"] += 1
        events.append(NackReceived(peer_key, msg_id))
        message = self.ledger.message(msg_id)
        if message is None or message.direction != "out" or message.peer_key != peer_key:
            return
        if now - self._last_reset.get(peer_key, -math.inf) < self.reset_interval:
            return
        self._last_reset[peer_key] = now
        log.info("%s cannot decrypt our messages: starting a new session", message.handle)
        self.ledger.reset_session(peer_key, now)
        self._make_due(peer_key, now)
        events.append(SessionReset(peer_key, message.handle))

    def _accept(
        self,
        transport_key: bytes | None,
        msg_id: bytes,
        envelope: bytes,
        via: str,
        events: list[Event],
        now: float,
    ) -> tuple[str, bytes | None]:
        """Decrypt and store one message: the verdict and the sender's key."""
        known = self.ledger.message(msg_id)
        if known is not None and known.direction == "in":
            self.stats["duplicates"] += 1
            if transport_key is not None and known.peer_key != transport_key:
                return _DROP, None
            return _ACK, known.peer_key

        def decode(plaintext: bytes) -> wire.MessagePayload:
            payload = wire.MessagePayload.decode(plaintext)
            if payload.msg_id != msg_id:
                raise WireError("the message id inside differs from the frame's")
            return payload

        try:
            sender_key, payload = self.ledger.open_envelope(transport_key, envelope, decode, now)
        except (SessionError, WireError) as exc:
            return self._refused(transport_key, exc), None
        if payload.kind == wire.KIND_CALL:
            events.append(SignalReceived(sender_key, payload.sender, payload.text, via))
            if payload.sender and self.ledger.trusted_handle(sender_key) is None:
                events.append(SenderUnverified(payload.sender, sender_key, "call", via))
            return _ACK, sender_key
        if payload.kind == wire.KIND_ROTATION:
            events.append(RotationReceived(sender_key, payload.sender, payload.text, via))
            return _ACK, sender_key
        if payload.kind == wire.KIND_FILE:
            events.append(FileOfferReceived(sender_key, payload.sender, payload.text, via))
            return _ACK, sender_key
        trusted = self.ledger.trusted_handle(sender_key)
        handle = trusted or payload.sender or "unknown"
        stored = self.ledger.store_incoming(sender_key, handle, payload, now, via)
        self.stats["received_direct" if via == "direct" else "received_mailbox"] += 1
        events.append(MessageReceived(stored, via))
        if trusted is None and payload.sender:
            events.append(SenderUnverified(payload.sender, sender_key, "message", via))
        if self.ledger.has_pending(sender_key):  # the peer is alive: what we owe may go
            self._writes.append(MakeDue(sender_key, now))
            self._make_due(sender_key, now)
            events.append(PendingMadeDue(sender_key))
        return _ACK, sender_key

    def _refused(self, transport_key: bytes | None, exc: P2PDError) -> str:
        if isinstance(exc, DuplicateMessage):
            self.stats["duplicates"] += 1
            log.info("refused a replayed message from %s", _who(transport_key))
            return _DROP
        if isinstance(exc, UnknownSession | PrekeyUnavailable):
            log.info("cannot decrypt a message from %s (%s): asking for a new session",
                     _who(transport_key), type(exc).__name__)  # fmt: skip
            return _NACK
        self.stats["refused"] += 1
        log.warning("refused a message from %s: %s", _who(transport_key), exc.message)
        return _DROP


_ACK, _NACK, _DROP = "ack", "nack", "drop"


def _with_envelope(message: Message, envelope: bytes) -> Message:
    return replace(message, envelope=envelope)


def _who(key: bytes | None) -> str:
    return "a mailbox sender" if key is None else fingerprint(key)[:12]
