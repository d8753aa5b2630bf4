"""Delivery's decisions, sans I/O: what to write, what to store, what to tell the service.

No sockets, no event loop, no clock: every entry point takes ``now`` (Unix seconds; the
trio service reads the clock once per entry point and passes it down), and what is at
rest goes through the :class:`Ledger` the core is handed (SQLite and the sessions, in
:mod:`p2pd.delivery.ledger`; the core never commits: the service commits once per
entry point, so one read's acks and messages are one transaction). The service does
the rest: QUIC streams, the DHT mailbox, sealing, the record cache, the event bus.

::

    core.prepare(peer_key, due, bundle, now) -> ready    # envelopes, in order
    ex = core.start_exchange(peer_key, ready, now)       # a batch for one stream
    ex.data; core.exchange_written(ex, now)              # write it, then say so
    ex.data_received(answers, now) -> StreamResult       # ACK / NACK frames back
    ex.answered, ex.deadline; core.end_exchange(ex, now) # all answered, or timed out
    s = core.accept_stream(peer_key)                     # a stream the peer opened
    s.data_received(data, now) -> StreamResult           # replies, events, reset?
    core.plan_mailbox(peer_key, ready, now) -> [MailboxPut]   # could not connect
    core.mailbox_put_done(put, copies, now)
    core.mailbox_entry_opened(plaintext, now) -> [Event]      # from our own mailbox
    core.delivery_failed(batch, now)

What happens is reported as past-tense events (:data:`Event`); the service reacts to
each in one place (``Delivery._dispatch``). Every ack, whether it came on the batch's
stream, on a stream of its own or through the mailbox, goes through one method
(``_ack_received``) and is reported as :class:`AckReceived`.

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
- A batch with not one answer by its deadline asks the service to close the
  connection: a peer killed without closing it is then found out on the next attempt,
  not after the idle timeout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import nacl.bindings

from .. import wire
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
from ..messaging import Message

log = logging.getLogger(__name__)

#: At most one session reset per peer in this many seconds (a NACK storm is refused).
RESET_INTERVAL = 10.0
#: Messages sent in one batch on one stream.
BATCH = 256
#: A sealed box is its plaintext plus an ephemeral key and a MAC.
_SEAL_OVERHEAD = nacl.bindings.crypto_box_SEALBYTES


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

    def mark_delivered(self, msg_id: bytes, peer_key: bytes, now: float) -> bool:
        """An ack from ``peer_key``: True if it changed the message's state."""

    def has_pending(self, peer_key: bytes) -> bool: ...

    def retry_now(self, peer_key: bytes) -> None: ...

    def reset_session(self, peer_key: bytes, now: float) -> None:
        """Archive the session and forget the unacknowledged envelopes to that peer."""

    def encrypt(self, peer_key: bytes, plaintext: bytes, bundle: bytes | None, now: float) -> bytes:
        """Raises NoSession (no session and no bundle), WireError or SessionError."""

    def set_envelope(self, msg_id: bytes, envelope: bytes) -> None: ...

    def mark_attempt(self, msg_id: bytes, now: float, via: str | None) -> None: ...

    def mark_sent(self, messages: list[Message], now: float, via: str) -> None: ...


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A text message was stored (``message`` None: another read stored it first)."""

    message: Message | None
    via: str


@dataclass(frozen=True, slots=True)
class SignalReceived:
    """A call signal arrived (acked, not stored)."""

    sender_key: bytes
    claimed: str
    text: str
    via: str


@dataclass(frozen=True, slots=True)
class SenderUnverified:
    """A message (``source`` "message") or call signal ("call") from a key no contact
    holds claims ``handle``: evidence if the handle is pinned, else checked in the DHT."""

    handle: str
    sender_key: bytes
    source: str = "message"
    via: str = ""


@dataclass(frozen=True, slots=True)
class RotationReceived:
    """A key rotation notice arrived from ``sender_key`` (acked, not stored; the
    service verifies it and moves the pin if it is signed by the pinned key)."""

    sender_key: bytes
    claimed: str
    text: str
    via: str


@dataclass(frozen=True, slots=True)
class FileOfferReceived:
    """A file offer arrived from ``sender_key`` (acked, not stored: the files service
    takes it, p2pd/files/)."""

    sender_key: bytes
    claimed: str
    text: str
    via: str


@dataclass(frozen=True, slots=True)
class AckOwed:
    """A message from the mailbox was stored: ``msg_id`` is to be acked to its sender."""

    sender_key: bytes
    msg_id: bytes


@dataclass(frozen=True, slots=True)
class PendingMadeDue:
    """A peer we owe messages to was heard from: they are due now."""

    peer_key: bytes


@dataclass(frozen=True, slots=True)
class AckReceived:
    """``peer_key`` acknowledged ``msg_id`` (on a stream or by mailbox)."""

    peer_key: bytes
    msg_id: bytes
    #: True if this ack changed the message to delivered (not a repeat, nor a signal's).
    delivered: bool


@dataclass(frozen=True, slots=True)
class NackReceived:
    """``peer_key`` cannot decrypt ``msg_id``."""

    peer_key: bytes
    msg_id: bytes


@dataclass(frozen=True, slots=True)
class SessionReset:
    """A NACK archived the session with ``peer_key``; its messages await a new one."""

    peer_key: bytes
    handle: str


@dataclass(frozen=True, slots=True)
class MessageSent:
    """Outgoing ``msg_id`` was written on a stream or left in a mailbox."""

    msg_id: bytes
    via: str


@dataclass(frozen=True, slots=True)
class ExchangeEnded:
    """A batch's stream is done with: every message answered, or its deadline passed."""

    peer_key: bytes
    answered: bool
    #: Not one answer: the peer may have died without closing; drop the connection.
    close_connection: bool


Event = (
    MessageReceived | SignalReceived | RotationReceived | FileOfferReceived | SenderUnverified
    | AckOwed
    | PendingMadeDue
    | AckReceived | NackReceived | SessionReset | MessageSent | ExchangeEnded
)  # fmt: skip


@dataclass(slots=True)
class StreamResult:
    """What one read of a stream produced."""

    #: Frames to write back on the same stream.
    replies: bytes = b""
    events: list[Event] = field(default_factory=list)
    #: The peer broke the framing: reset the stream (the connection goes on).
    reset: bool = False


@dataclass(frozen=True, slots=True)
class MailboxPut:
    """Seal ``plaintext`` to the peer's key and leave it in its mailbox."""

    peer_key: bytes
    msg_id: bytes
    plaintext: bytes


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
        self._observe(result.events)
        return result

    def _observe(self, events: list[Event]) -> None:
        pass


class IncomingStream(_FrameStream):
    """A stream the peer opened: its MESSAGE frames are answered with ACK or NACK."""


class Exchange(_FrameStream):
    """A batch of messages written on one stream we opened, and the answers to it.

    ``data`` is what to write (with FIN); ``waiting`` the ids not answered yet. A NACK
    answers them all: the session is reset and every one is encrypted again."""

    def __init__(
        self,
        core: DeliveryCore,
        peer_key: bytes,
        batch: Sequence[tuple[bytes, bytes]],
        deadline: float,
        *,
        outbox: Sequence[Message] = (),
    ) -> None:
        super().__init__(core, peer_key)
        self.ids = [msg_id for msg_id, _ in batch]
        self.waiting = set(self.ids)
        self.acked: set[bytes] = set()
        self.nacked: set[bytes] = set()
        self.deadline = deadline
        self.written = False
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

    def _observe(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, AckReceived) and event.peer_key == self.peer_key:
                self.waiting.discard(event.msg_id)
                self.acked.add(event.msg_id)
            elif isinstance(event, NackReceived) and event.peer_key == self.peer_key:
                self.nacked.add(event.msg_id)
                self.waiting.clear()  # everything is encrypted again and resent


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
    ) -> None:
        self.ledger = ledger
        self.handle = handle
        self.public_key = public_key
        self.ack_timeout = ack_timeout
        self.reset_interval = reset_interval
        self._last_reset: dict[bytes, float] = {}
        self.stats: dict[str, int] = {
            "sent_direct": 0,
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
        }

    # ------------------------------------------------------------------ sending

    def prepare(
        self, peer_key: bytes, batch: Sequence[Message], bundle: bytes | None, now: float
    ) -> list[Message]:
        """Give each message its envelope, in order; return those that have one. A
        message that cannot be encrypted (no session and no bundle yet, a bad bundle)
        stops the batch there, and it and the rest wait for their next attempt."""
        ready: list[Message] = []
        for message in batch:
            if message.envelope is not None:
                ready.append(message)
                continue
            payload = wire.MessagePayload(
                message.id, message.seq, message.sent_at_ms, message.text, message.kind,
                sender=self.handle,
            ).encode()  # fmt: skip
            try:
                envelope = self.ledger.encrypt(peer_key, payload, bundle, now)
            except NoSession:  # a failed encrypt changed nothing (its own savepoint)
                log.info("no session with %s and no prekey bundle yet: waiting", message.handle)
            except (WireError, SessionError) as exc:  # a bad bundle in the record
                log.warning("cannot start a session with %s: %s", message.handle, exc)
            else:
                self.ledger.set_envelope(message.id, envelope)
                ready.append(_with_envelope(message, envelope))
                continue
            for m in batch[len(ready) :]:
                self.ledger.mark_attempt(m.id, now, None)
            break
        return ready

    def start_exchange(self, peer_key: bytes, ready: Sequence[Message], now: float) -> Exchange:
        """A batch of messages with envelopes, to be written on a new stream."""
        batch = [(m.id, m.envelope) for m in ready if m.envelope is not None]
        return Exchange(self, peer_key, batch, now + self.ack_timeout, outbox=ready)

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
        """The batch is on the wire: its messages are sent, and due again after backoff."""
        exchange.written = True
        exchange.deadline = now + self.ack_timeout
        if not exchange.outbox:
            return []
        self.ledger.mark_sent(exchange.outbox, now, "direct")
        self.stats["sent_direct"] += len(exchange.outbox)
        return [MessageSent(m.id, "direct") for m in exchange.outbox if m.id in exchange.waiting]

    def end_exchange(self, exchange: Exchange, now: float) -> list[Event]:
        """Every answer came, or the deadline passed (or the stream broke)."""
        if exchange.ended:
            return []
        exchange.ended = True
        # Not one answer (nor a NACK, which empties ``waiting``), even if the write
        # broke: the connection is suspect.
        silent = len(exchange.waiting) == len(exchange.ids)
        return [
            ExchangeEnded(exchange.peer_key, exchange.answered, silent and bool(exchange.outbox))
        ]

    def delivery_failed(self, batch: Sequence[Message], now: float) -> None:
        """An attempt broke before it could be counted: try again after backoff."""
        for m in batch:
            self.ledger.mark_attempt(m.id, now, None)

    def plan_mailbox(
        self, peer_key: bytes, ready: Sequence[Message], now: float
    ) -> list[MailboxPut]:
        """No connection could be made: which messages go to the peer's mailbox. A
        message is left there once (later retries try the direct path); one too large
        for a mailbox entry is delivered directly only."""
        puts: list[MailboxPut] = []
        for m in ready:
            if m.via == "mailbox" or m.envelope is None:
                self.ledger.mark_attempt(m.id, now, None)  # already there; retry direct
                continue
            plain = wire.encode_mailbox_plaintext(
                wire.MAILBOX_MESSAGE, self.public_key, m.id, m.envelope
            )
            if len(plain) + _SEAL_OVERHEAD > wire.MAX_MAILBOX_ENTRY:
                log.warning("message %s is too large for a mailbox: direct only", m.id.hex())
                self.ledger.mark_attempt(m.id, now, None)
                continue
            puts.append(MailboxPut(peer_key, m.id, plain))
        return puts

    def mailbox_put_done(self, put: MailboxPut, copies: int, now: float) -> list[Event]:
        """``copies`` nodes took the entry (0: none; it is retried after backoff)."""
        self.ledger.mark_attempt(put.msg_id, now, "mailbox" if copies else None)
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
        delivered = self.ledger.mark_delivered(msg_id, peer_key, now)
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
            self.ledger.retry_now(sender_key)
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
