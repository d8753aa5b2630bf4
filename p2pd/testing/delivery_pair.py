"""Two delivery cores (p2pd/delivery/core.py) with real sessions on in-memory SQLite,
bytes and time moved by hand: the pair the delivery core's tests drive, in the way
h11's ``ConnectionPair`` does."""

from __future__ import annotations

from dataclasses import dataclass

from .. import wire
from ..delivery.core import (
    DeliveryCore,
    Exchange,
)
from ..delivery.events import (
    Event,
    ExchangeEnded,
    StreamResult,
)
from ..delivery.ledger import SqliteLedger
from ..identity import Identity
from ..messaging import Contacts, Message, MessageStore
from ..session import SessionManager
from ..store import open_database

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


def frames_of(data: bytes) -> list[bytes]:
    """A stream's bytes, frame by frame (each frame re-encoded whole)."""
    return [wire.encode_stream_frame(kind, payload) for kind, payload in frames(data)]
