"""What the delivery core reports and decides, as data: the rows it asks the ledger to
write (:data:`Write`), the past-tense events it reports (:data:`Event`), what one read
of a stream produced (:class:`StreamResult`) and a mailbox entry to leave
(:class:`MailboxPut`). The decisions are :mod:`p2pd.delivery.core`'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..messaging import Message

if TYPE_CHECKING:
    from .core import Exchange


# ---------------------------------------------------------------------------- writes


@dataclass(frozen=True, slots=True)
class SetEnvelope:
    """Keep a message's ciphertext: every retry sends the same bytes."""

    msg_id: bytes
    envelope: bytes


@dataclass(frozen=True, slots=True)
class ScheduleAttempt:
    """An attempt was made (``via`` direct/mailbox: the message is ``sent``) or failed
    (None: its state stays): count it, and retry at ``next_attempt`` unless acked."""

    msg_id: bytes
    attempts: int
    next_attempt: float
    now: float
    via: str | None


@dataclass(frozen=True, slots=True)
class MarkDelivered:
    """``peer_key`` acknowledged our message ``msg_id``."""

    msg_id: bytes
    peer_key: bytes
    now: float


@dataclass(frozen=True, slots=True)
class MakeDue:
    """What is pending to ``peer_key`` is due at ``when`` (the peer is alive)."""

    peer_key: bytes
    when: float


Write = SetEnvelope | ScheduleAttempt | MarkDelivered | MakeDue


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
    #: Which exchange (the service stops reading its stream).
    exchange: Exchange | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class DeliveryDue:
    """Messages to ``peer_key`` are due and no worker holds the conversation: start one.
    The core counts the conversation held until :meth:`DeliveryCore.conversation_idle`."""

    peer_key: bytes


@dataclass(frozen=True, slots=True)
class RetryDue:
    """The conversation's batch had no answer by its messages' next attempt: its worker
    sends them again (:meth:`DeliveryCore.worker_step` says SEND); the batch's stream is
    still read until its deadline."""

    peer_key: bytes


@dataclass(frozen=True, slots=True)
class PrepareDue:
    """Messages were queued while the conversation's batch awaits its answers: its worker
    is to encrypt them now (:meth:`DeliveryCore.worker_step` says PREPARE)."""

    peer_key: bytes


@dataclass(frozen=True, slots=True)
class SendDue:
    """What was queued behind the conversation's answered batch has gathered
    (:data:`~p2pd.delivery.core.SEND_GATHER`): its worker sends it now."""

    peer_key: bytes


Event = (
    MessageReceived | SignalReceived | RotationReceived | FileOfferReceived
    | SenderUnverified | AckOwed
    | PendingMadeDue | DeliveryDue | RetryDue | PrepareDue | SendDue
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
    #: The message's attempts so far (this put is one more).
    attempts: int = 0
