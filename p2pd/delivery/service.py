"""Delivery: the trio service that moves encrypted messages between daemons.

The decisions are :class:`~p2pd.delivery.core.DeliveryCore`'s (sans I/O); this module
does the I/O around them: QUIC streams, one worker task per conversation, the record
cache, call signals and the control API's views. It reads the clock once per entry point
of the core, has the ledger apply the core's rows and commit once after each
(:meth:`Delivery._committed`), reacts to the core's events in one place
(:meth:`Delivery._dispatch`), and sleeps until the core's next deadline (``get_timer``:
retries, answer deadlines) in one long-lived cancel scope, never polling. Three parts
stand apart, built here and handed what they use: the DHT mailbox, both ways
(:mod:`p2pd.delivery.mailbox`), the check of the handles that unknown senders claim
(:mod:`p2pd.delivery.verify`), and key rotation notices, ours out and contacts' in
(:mod:`p2pd.delivery.rotation_notices`).

Sending. ``send`` resolves the handle, checks the key against the pin, and stores the
message (state ``queued``) before it returns. One worker per conversation then, in the
conversation's order: has the core encrypt each message once (the envelope is committed
in the same SQLite transaction as the ratchet step, so a crash never leaves the two
apart), tries a direct QUIC connection to the addresses in the recipient's record,
writes the batch the core framed on one stream and reads the answers into it. If the
recipient cannot be reached, the messages the core picks are sealed to the recipient's
key (sealed sender: the storing nodes see neither text nor sender) and left in its DHT
mailbox. Until its ack arrives a message is retried with exponential backoff
(0.5 s .. 60 s); retries send the same envelope, and the receiver deduplicates by id.

Receiving. A stream a peer opens is read into the core, which answers each MESSAGE
with ACK (stored), NACK (cannot decrypt: the sender starts a new session) or nothing.
Messages found in the mailbox (at start and every ``mailbox_poll_interval``) go through
the same core, acked directly if the sender is reachable and through the sender's
mailbox if not, then deleted from the storing nodes.

Wire formats: docs/PROTOCOL.md, "Messages".
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

from .. import wire
from ..config import NodeConfig
from ..dht import DHT
from ..errors import (
    ConnectionLost,
    Contested,
    KeyChanged,
    NoSession,
    NotFound,
    UsageError,
)
from ..identity import (
    DISPLAY_PREFIX,
    HandleRef,
    Identity,
    fingerprint,
    self_certifying,
)
from ..messaging import Contact, Contacts, IncomingSummary, Message, MessageStore
from ..records import HandleRecord
from ..relay.client import is_virtual
from ..rotation import RotationNotice
from ..session import SessionManager
from ..transport.quic import QuicEndpoint, QuicPeer, QuicStream
from ..wire import Address
from .core import (
    BATCH,
    PREPARE,
    RESET_INTERVAL,
    WAIT,
    DeliveryCore,
    Exchange,
    IncomingStream,
)
from .events import (
    AckReceived,
    DeliveryDue,
    Event,
    ExchangeEnded,
    FileOfferReceived,
    MessageReceived,
    MessageSent,
    PrepareDue,
    RetryDue,
    RotationReceived,
    SendDue,
    SenderUnverified,
    SessionReset,
    SignalReceived,
)
from .ledger import SqliteLedger
from .mailbox import MailboxCourier
from .paths import Paths, RelayConnect
from .rotation_notices import RotationNotices
from .verify import SenderVerifier

__all__ = ["BATCH", "RESET_INTERVAL", "Delivery", "EventBus"]

log = logging.getLogger(__name__)

#: How long a resolved record is used before it is looked up again.
RECORD_CACHE_SECONDS = 60.0
#: Messages one ``send`` call may queue at once (the control API's ``texts``).
MAX_SEND_BATCH = 1000
#: Events buffered per subscriber before new ones are dropped for it.
EVENT_BUFFER = 1024
#: How long a lookup made for delivery may take.
RESOLVE_TIMEOUT = 10.0
#: A worker that waits (WAIT) looks at its conversation again after this long even if
#: no event woke it, and counts it (``wakeups_lost``) and logs it if there was work.
#: A safety net, not the schedule: every WAIT has an event that ends it (an exchange's
#: end, its retry, a prepare or send deadline). Yet once, under load, a worker waited
#: for good with 497 messages queued behind it and nothing left to wake it (the
#: kill -9 burst test, issue 9; dump in ``messages.schedule``): cause not found.
#: What that dump showed (held, no exchange open, the gathering start and the
#: queued-while-taken flag set, no deadline) is what a lost SendDue leaves (or a lost
#: ExchangeEnded): tests/test_delivery_wakeups.py loses a SendDue on purpose and finds
#: that very state. Running this service's own code there (MockClock, a seeded fake
#: peer and DHT, kills, NACKs, signals, mailbox acks, trio's order seeded) found
#: neither, nor a second worker for one conversation, in hundreds of seeded runs: the
#: cause lies outside what that test models (real QUIC, the other services), or is gone.
WAIT_RECHECK = 2.0


class EventBus:
    """Fan-out of daemon events to control API subscribers; a slow one loses events."""

    def __init__(self) -> None:
        self._subscribers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self.dropped = 0

    @property
    def listening(self) -> bool:
        """Whether anyone is subscribed: an event nobody reads need not be built."""
        return bool(self._subscribers)

    def emit(self, kind: str, /, **fields: Any) -> None:
        event = {"event": kind, "time": time.time(), **fields}
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(channel)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        send, receive = trio.open_memory_channel[dict[str, Any]](EVENT_BUFFER)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()
            receive.close()


class Delivery:
    """The delivery service. ``quic`` is the node's endpoint (its streams come in through
    :meth:`handle_stream`); ``lan_addresses(key)`` says where LAN discovery saw a key
    (tried before the record's addresses); ``on_signal(sender key, claimed handle, the
    QUIC peer or None, JSON text)`` takes the session signals that arrive, and returns
    True for housekeeping (an address hint, a mailbox pass): its sender's claimed handle
    is then not looked up to pin it."""

    def __init__(
        self,
        config: NodeConfig,
        identity: Identity,
        conn: sqlite3.Connection,
        dht: DHT,
        events: EventBus,
        *,
        quic: QuicEndpoint,
        sessions: SessionManager,
        contacts: Contacts,
        lan_addresses: Callable[[bytes], list[Address]],
        on_signal: Callable[[bytes, str, QuicPeer | None, str], bool | None],
        on_file_offer: Callable[[bytes, str, str, str], None] = lambda *offer: None,
        on_direct: Callable[[bytes], None] = lambda key: None,
        on_direct_message: Callable[[bytes], None] = lambda key: None,
        relay_connect: RelayConnect | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.dht = dht
        self.events = events
        self.quic = quic
        self.lan_addresses = lan_addresses
        self.on_signal = on_signal
        #: (sender key, claimed handle, offer text, via): p2pd/files/ takes file offers.
        self.on_file_offer = on_file_offer
        #: Called with a key we hold a direct connection to (p2pd/address_hints.py).
        self.on_direct = on_direct
        #: Called with the key a message came from over a direct connection
        #: (p2pd/dht/mailbox_pass_share.py gives a contact our mailbox pass).
        self.on_direct_message = on_direct_message
        #: Opens a circuit through a relay to a key: its virtual address (p2pd/relay/).
        self.relay_connect = relay_connect
        self.paths = Paths(quic, lan_addresses, relay_connect, config.connect_timeout)
        self._conn = conn
        self.messages = MessageStore(conn, at_rest=sessions.at_rest)  # p2pd/at_rest.py
        self.contacts = contacts
        self.sessions = sessions
        self.ledger = SqliteLedger(conn, self.messages, self.contacts, self.sessions)
        self.core = DeliveryCore(
            self.ledger,
            handle=identity.handle,
            public_key=identity.public_key,
            ack_timeout=config.ack_timeout,
        )
        self._records: dict[bytes, tuple[HandleRecord, float]] = {}
        #: Our side of the DHT mailboxes: puts for workers that cannot connect, and the
        #: poll of ours (p2pd/delivery/mailbox.py).
        self.mailbox = MailboxCourier(
            identity, dht, self.core,
            poll_interval=config.mailbox_poll_interval,
            committed=self._committed, dispatch=self._dispatch, spawn=self._spawn,
            connect=self._connect_to,
        )  # fmt: skip
        #: Pins the handles that senders no contact holds claim, if the DHT agrees
        #: (p2pd/delivery/verify.py).
        self.verifier = SenderVerifier(
            dht, contacts, remember=self._remember, resolve_timeout=RESOLVE_TIMEOUT
        )
        #: Key rotation notices: ours to every contact, contacts' moving their pins
        #: (p2pd/delivery/rotation_notices.py).
        self.rotation = RotationNotices(
            conn, identity.public_key, contacts, self.messages, emit=events.emit,
            queued=self._queued, forget=self._forget_record,
        )  # fmt: skip
        #: Set to wake a worker that waits (WAIT): its exchange ended, RetryDue, PrepareDue.
        self._worker_wake: dict[bytes, trio.Event] = {}
        #: What each running worker is doing (awaiting) now, for the status view.
        self._doing: dict[bytes, str] = {}
        #: The exchanges whose answers are being read: a scope to stop reading when the
        #: core's timer ends one, and the connection it was written on.
        self._reading: dict[Exchange, tuple[trio.CancelScope, QuicPeer]] = {}
        #: The one timer: sleeps until the core's get_timer() (wall time, _armed).
        self._timer = trio.CancelScope()
        self._armed: float | None = None
        self._nursery: trio.Nursery | None = None
        #: Counters (the core's; the control API's ``statistics`` shows them).
        self.stats = self.core.stats

    # ------------------------------------------------------------------ service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver due messages and poll the mailbox until cancelled: the core's timer
        (retries, answer deadlines) fired at its deadlines, never polled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            with self._committed():
                self.core.load_schedule()  # what was pending before a restart
            nursery.start_soon(self.mailbox.poll_forever)
            task_status.started()
            while True:
                self._timer = trio.CancelScope()
                self._armed = None
                self._rearm()
                with self._timer:
                    await trio.sleep_forever()
                # (If the wall clock runs behind the monotonic one, the core finds nothing
                # due yet, and the timer is set again for the rest: no spin.)
                with self._committed():
                    events = self.core.handle_timer(time.time())
                self._dispatch(events)

    def _rearm(self) -> None:
        """Move the timer's deadline to the core's next one (if it changed: moving it
        re-sorts trio's deadlines)."""
        when = self.core.get_timer()
        if when == self._armed:
            return
        self._armed = when
        if when is None:
            self._timer.deadline = math.inf
        else:
            self._timer.deadline = trio.current_time() + max(0.0, when - time.time())

    def _spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start background work in the service's nursery, unless it is shutting down
        (a stream handler may still run then: the QUIC endpoint has its own nursery)."""
        if self._nursery is None:
            return
        try:
            self._nursery.start_soon(func, *args)
        except RuntimeError:  # the nursery is closed: the daemon is stopping
            log.debug("not starting %s: shutting down", getattr(func, "__name__", func))

    def poll_mailbox_now(self) -> None:
        """Check our mailbox at once (not at the next poll interval)."""
        self.mailbox.poll_now()

    async def check_mailbox(self) -> int:
        """Fetch, store, ack and delete what waits in our mailbox. Returns new messages."""
        return await self.mailbox.check()

    # ------------------------------------------------------------------ sending

    async def send(self, target: str, text: str) -> Message:
        """Queue ``text`` for ``target`` (a handle or ``handle#prefix``). Durable on return.

        Always to the pinned key (see :meth:`contact_for`). Raises NotFound if the handle
        is neither a contact nor in the DHT, KeyChanged if ``target`` names another key.
        """
        (message,) = await self.send_many(target, [text])
        return message

    async def send_many(self, target: str, texts: Sequence[str]) -> list[Message]:
        """Queue each of ``texts`` as a message of its own for ``target``, in order, in one
        transaction: all durable on return, or none queued (an empty or overlong text,
        more than MAX_SEND_BATCH). Raises as :meth:`send`."""
        ref = HandleRef.parse(target)
        if not 1 <= len(texts) <= MAX_SEND_BATCH:
            raise UsageError(f"send 1 to {MAX_SEND_BATCH} messages at a time")
        if not all(isinstance(text, str) and text for text in texts):
            raise UsageError("the message is empty")
        if ref.handle == self.identity.handle:
            raise UsageError("that is your own handle: messages to yourself are not supported")
        contact = await self.contact_for(ref)
        now = time.time()
        messages = self.messages.enqueue_many(ref.handle, contact.public_key, texts, now)
        if self.events.listening:  # (a summary is built for each)
            for message in messages:
                self.events.emit("message_status", **message.summary())
        self._queued(contact.public_key)
        return messages

    async def contact_for(self, ref: HandleRef) -> Contact:
        """The contact to send to or call: its pinned key, whatever a lookup would say
        now (a lookup never changes or blocks a pin). A handle never seen is looked up
        (``ref`` as typed: its prefix, if any, filters rival claims) and pinned.

        Raises NotFound (no pin and no record) or KeyChanged (``ref`` names a key
        other than the pinned one)."""
        contact = self.contacts.get(ref.handle)
        if contact is None:
            try:
                with trio.fail_after(RESOLVE_TIMEOUT):
                    record = await self.dht.resolve(ref)
            except (NotFound, trio.TooSlowError):
                raise NotFound(
                    f"no record for {ref.handle!r} in the DHT and no pinned key: cannot "
                    "reach a handle never seen"
                ) from None
            contact = self.contacts.pin(ref.handle, record.public_key, time.time())
            if contact.public_key == record.public_key:
                self._remember(record)
        if not ref.matches(contact.public_key):
            raise KeyChanged(
                f"{ref.handle!r} is pinned to {fingerprint(contact.public_key)[:DISPLAY_PREFIX]}"
                f", which {str(ref)!r} does not name: nothing was sent. See `p2pd verify "
                f"{ref.handle}`; to pin another key, `p2pd verify {ref.handle} --accept-new "
                "FINGERPRINT`"
            )
        return contact

    def queue_payload(self, handle: str, peer_key: bytes, text: str, kind: int) -> Message:
        """Queue one payload of another kind than text (a file offer) for a known
        contact, through the outbox like a message: durable, retried, left in the
        mailbox of a peer that is offline."""
        (message,) = self.messages.enqueue_many(handle, peer_key, [text], time.time(), kind=kind)
        self._queued(peer_key)
        return message

    def _queued(self, peer_key: bytes) -> None:
        """Messages to ``peer_key`` were queued (or moved to it): the core starts its
        worker (DeliveryDue) or has the one that waits encrypt them (PrepareDue)."""
        with self._committed():
            events = self.core.messages_queued(peer_key, time.time())
        self._dispatch(events)

    # ------------------------------------------------------------------ sending internals

    async def _worker(self, peer_key: bytes) -> None:
        """Deliver one conversation's due messages, in batches, until none is due; the
        core says what to do next (``worker_step``: one batch in flight at a time, and
        what is queued behind it encrypted while it waits; see its module docstring)."""
        doing = self._doing
        unwoken = False  # the last WAIT ended at WAIT_RECHECK, not by its event
        try:
            async with trio.open_nursery() as exchanges:
                for _ in range(10_000):  # bounded: batches and waits, then rescheduled
                    now = time.time()
                    # the schedule as the lost wake-up left it (worker_step changes it)
                    before = list(self.core.debug_state(now).values()) if unwoken else None
                    step = self.core.worker_step(peer_key, now)
                    if unwoken and step != WAIT:
                        self.stats["wakeups_lost"] += 1
                        log.warning("delivery to %s: work found with no wake-up (%s); "
                                    "schedule then: %s", _who(peer_key), step,
                                    before)  # fmt: skip
                    if step == WAIT:  # for ExchangeEnded, RetryDue, PrepareDue or SendDue
                        self._rearm()  # a gathering batch has a deadline (SendDue)
                        self._worker_wake[peer_key] = wake = trio.Event()
                        doing[peer_key] = "wait"
                        with trio.move_on_after(WAIT_RECHECK):
                            await wake.wait()
                        unwoken = not wake.is_set()
                        continue
                    unwoken = False
                    if step == PREPARE:
                        doing[peer_key] = "prepare"
                        await self._prepare(peer_key)
                        continue
                    batch = self.messages.due_for(peer_key, time.time(), limit=BATCH)
                    if not batch:
                        doing[peer_key] = "answers"  # the nursery waits for its readers
                        return
                    try:
                        await self._deliver(peer_key, batch, exchanges)
                    except Exception:
                        log.exception("delivery to %s failed", fingerprint(peer_key)[:12])
                        with self._committed():
                            self.core.delivery_failed(batch, time.time())
        finally:
            self._worker_wake.pop(peer_key, None)
            doing.pop(peer_key, None)
            with self._committed():
                self.core.conversation_idle(peer_key)

    async def _prepare(self, peer_key: bytes) -> None:
        """Encrypt the due messages that have no envelope yet (the next batch; those of
        the open exchange have theirs, and are not due again before their backoff)."""
        due = self.messages.due_for(peer_key, time.time(), limit=BATCH)
        todo = [m for m in due if m.envelope is None]
        if todo:
            try:
                record = await self._record_for(peer_key, todo[0].handle)
                with self._committed():
                    self.core.prepare(peer_key, todo, _bundle(record), time.time())
            except Exception:  # it is tried again when the batch is delivered
                log.exception("encrypting for %s failed", fingerprint(peer_key)[:12])

    async def _deliver(
        self, peer_key: bytes, batch: list[Message], exchanges: trio.Nursery
    ) -> None:
        """One batch: encrypted, then written on a stream (its answers read in a task of
        ``exchanges``), or left in the mailbox if no connection can be made."""
        handle = batch[0].handle
        self._doing[peer_key] = "record"
        record = await self._record_for(peer_key, handle)
        with self._committed():
            # Each envelope with its ratchet step, the batch in one transaction; before
            # anything is sent and before any await (the connection is shared).
            ready = self.core.prepare(peer_key, batch, _bundle(record), time.time())
        if not ready:
            return
        self._doing[peer_key] = "connect"
        peer = await self._connect(peer_key, record)
        if peer is not None:
            via = "relay" if is_virtual(peer.address[0]) else "direct"
            exchange = self.core.start_exchange(peer_key, ready, time.time(), via=via)
            self._doing[peer_key] = "write"
            try:
                stream = await self._write_exchange(peer, exchange)
            except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("direct delivery to %s broke: %s", handle, exc)
            else:
                exchanges.start_soon(self._await_answers, peer, stream, exchange)
                return
        self._doing[peer_key] = "mailbox"
        await self.mailbox.put(peer_key, ready)

    async def _record_for(
        self, peer_key: bytes, handle: str, *, fresh: bool = False
    ) -> HandleRecord | None:
        cached = self._records.get(peer_key)
        now = time.time()
        if cached is not None and not fresh:
            record, when = cached
            if trio.current_time() - when < RECORD_CACHE_SECONDS and record.expires > now:
                return record
        # The self-certifying form of the key the message is for: a rival claim to the
        # handle is filtered out by the lookup, and not finding it is what an offline
        # peer looks like (LAN addresses and the mailbox are tried).
        try:
            with trio.fail_after(RESOLVE_TIMEOUT):
                record = await self.dht.resolve(HandleRef(handle, fingerprint(peer_key)))
        except (NotFound, Contested, trio.TooSlowError):
            return cached[0] if cached and cached[0].expires > now else None
        if record.public_key != peer_key:  # the lookup filters these: never send to one
            return None
        self._remember(record)
        return record

    def _remember(self, record: HandleRecord) -> None:
        """Cache a record looked up for its key (RECORD_CACHE_SECONDS)."""
        self._records[record.public_key] = (record, trio.current_time())

    def _forget_record(self, peer_key: bytes) -> None:
        """Drop the record cached for a key (its bundle changed, or the key rotated)."""
        self._records.pop(peer_key, None)

    async def _connect(self, peer_key: bytes, record: HandleRecord | None) -> QuicPeer | None:
        peer = await self._connect_direct(peer_key, record)
        if peer is not None:
            self.on_direct(peer_key)  # tell a contact where we are, if our record does not
        return peer

    async def _connect_to(self, peer_key: bytes) -> QuicPeer | None:
        """A connection to a contact's key, its record looked up as delivery does (the
        mailbox's acks go this way); None if it cannot be reached."""
        contact = self.contacts.by_key(peer_key)
        record = await self._record_for(peer_key, contact.handle) if contact else None
        return await self._connect(peer_key, record)

    async def connect_peer(self, peer_key: bytes, record: HandleRecord | None) -> QuicPeer | None:
        """A connection to ``peer_key`` the way delivery makes one (files use it too)."""
        return await self._connect_direct(peer_key, record)

    async def _connect_direct(
        self, peer_key: bytes, record: HandleRecord | None
    ) -> QuicPeer | None:
        return await self.paths.connect(peer_key, record)

    async def _write_exchange(self, peer: QuicPeer, exchange: Exchange) -> QuicStream:
        """Open a stream and write the exchange's batch on it, FIN in the same packet."""
        stream = await peer.open_stream()
        try:
            await stream.send_all(exchange.data, eof=True)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            with self._committed():
                events = self.core.end_exchange(exchange, time.time())
            self._dispatch(events, peer)
            raise
        with self._committed():
            events = self.core.exchange_written(exchange, time.time())
        self._dispatch(events, peer)
        return stream

    async def _await_answers(self, peer: QuicPeer, stream: QuicStream, exchange: Exchange) -> None:
        """Read the answers to a written exchange until all came or the core's timer
        ends it (ExchangeEnded cancels the scope)."""
        reading = self._reading[exchange] = (trio.CancelScope(), peer)
        try:
            async with stream:
                if not exchange.ended:
                    with reading[0]:
                        await self._pump(peer, stream, exchange)
        except Exception:  # in a worker's nursery: it must not end the worker
            log.exception("reading answers from %s failed", _who(peer.public_key))
        finally:
            self._reading.pop(exchange, None)
            with self._committed():
                events = self.core.end_exchange(exchange, time.time())
            self._dispatch(events, peer)

    async def _pump(
        self,
        peer: QuicPeer,
        stream: QuicStream,
        reader: Exchange | IncomingStream,
        first: bytes = b"",
    ) -> None:
        """Feed what ``stream`` brings to ``reader`` (one transaction per read) and write
        its replies, until the stream ends, or an exchange has all its answers."""
        while not (isinstance(reader, Exchange) and reader.answered):
            try:
                data, first = first or await stream.receive_some(65536), b""
            except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            with self._committed():  # the acks and messages of this read, together
                result = reader.data_received(data, time.time())
            if result.reset:
                stream.reset()
                return
            self._dispatch(result.events, peer)
            if result.replies:
                # Answering a stream the peer has finished (it sends its frames and FIN in
                # one go): our FIN goes with the answers, not in a packet of its own.
                last = isinstance(reader, IncomingStream) and stream.at_eof
                try:
                    await stream.send_all(result.replies, eof=last)
                except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
                    return

    # ------------------------------------------------------------------ call signals

    async def send_signal(self, handle: str, peer_key: bytes, text: str) -> QuicPeer:
        """Send one call signal, encrypted in the session, directly; wait for its ack.

        Returns the connection it went over (the call's media uses it too). Raises
        ConnectionLost if the peer cannot be reached or does not acknowledge in time:
        a signal is worth nothing later, so it never goes to a mailbox. If the peer
        cannot decrypt it (NACK), a new session is started and it is sent once more.
        """
        for attempt in range(2):
            record = await self._record_for(peer_key, handle, fresh=attempt > 0)
            peer, nacked = await self._signal_once(handle, peer_key, record, text)
            if not nacked:
                return peer
            self.sessions.reset_session(peer_key, now=time.time())
        raise ConnectionLost(f"{handle} cannot decrypt our call signals")

    async def _signal_once(
        self, handle: str, peer_key: bytes, record: HandleRecord | None, text: str
    ) -> tuple[QuicPeer, bool]:
        msg_id = os.urandom(wire.MESSAGE_ID_LEN)
        now = time.time()
        payload = self.core.signal_payload(msg_id, text, now)
        try:
            with self._committed():
                envelope = self.ledger.encrypt(peer_key, payload, _bundle(record), now)
        except NoSession:
            raise ConnectionLost(f"{handle} has published no prekeys: cannot reach it") from None
        peer = await self._connect(peer_key, record)
        if peer is None:
            raise ConnectionLost(f"{handle} is not reachable (offline?)")
        exchange = self.core.signal_exchange(peer_key, msg_id, envelope, time.time())
        stream = await self._write_exchange(peer, exchange)
        await self._await_answers(peer, stream, exchange)
        if exchange.waiting:
            raise ConnectionLost(f"{handle} did not acknowledge the call signal")
        return peer, msg_id in exchange.nacked

    # ------------------------------------------------------------------ receiving

    async def handle_stream(self, peer: QuicPeer, stream: QuicStream, first: bytes = b"") -> None:
        """A stream a peer opened: message, ack and nack frames; answers on the stream.
        ``first``: what was read already (p2pd/files/ routes streams on their first byte)."""
        if peer.public_key is not None:  # always set once the handshake is done
            await self._pump(peer, stream, self.core.accept_stream(peer.public_key), first)

    @contextmanager
    def _committed(self) -> Iterator[None]:
        """Around each entry point of the core: apply the rows it decided on and commit
        them with what it read and decrypted, whatever happens, before any await (the
        connection is shared: another task must never see, or commit, half of it); then
        move the timer to the core's next deadline."""
        try:
            yield
        finally:
            try:
                self.ledger.apply(self.core.writes_to_commit())
            finally:
                self.ledger.commit()
                self._rearm()

    def _dispatch(self, events: Sequence[Event], peer: QuicPeer | None = None) -> None:
        """React to what the core reports; ``peer`` is the connection it came over."""
        housekeeping: set[bytes] = set()  # senders of a hint or pass in these events
        for event in events:
            if isinstance(event, MessageReceived):
                if event.message is not None:
                    if self.events.listening:  # (the summary reads the contacts)
                        self.events.emit("message", **self.incoming_summary(event.message))
                    if event.via == "direct":  # it may write again: our mailbox pass
                        self.on_direct_message(event.message.peer_key)
            elif isinstance(event, SignalReceived):
                # A signal is worth nothing late: one from the mailbox is not rung.
                if event.via == "direct" and self.on_signal(
                    event.sender_key, event.claimed, peer, event.text
                ):
                    housekeeping.add(event.sender_key)
            elif isinstance(event, RotationReceived):
                self.rotation.received(event)
            elif isinstance(event, FileOfferReceived):
                self.on_file_offer(event.sender_key, event.claimed, event.text, event.via)
            elif isinstance(event, SenderUnverified):
                # An address hint or a mailbox pass is no reason to look a stranger up
                # and pin it (a pinned contact's files are accepted without asking):
                # only messages and call signals are.
                if not (event.source == "call" and event.sender_key in housekeeping):
                    self._spawn(self.verifier.verify, event)
            elif isinstance(event, DeliveryDue):
                self._start_worker(event.peer_key)
            elif isinstance(event, AckReceived):
                if event.delivered:
                    self.events.emit("message_status", id=event.msg_id.hex(), state="delivered")
            elif isinstance(event, SessionReset):
                self._forget_record(event.peer_key)  # its bundle may have changed too
            elif isinstance(event, MessageSent):
                self.events.emit(
                    "message_status", id=event.msg_id.hex(), state="sent", via=event.via
                )
            elif isinstance(event, PrepareDue | RetryDue | SendDue | ExchangeEnded):
                wake = self._worker_wake.get(event.peer_key)
                if wake is not None:
                    wake.set()
            if isinstance(event, ExchangeEnded):
                conn = peer
                reading = self._reading.get(event.exchange) if event.exchange else None
                if reading is not None:  # the timer ended it: stop reading its stream
                    reading[0].cancel()
                    conn = reading[1]
                if event.close_connection and conn is not None and not conn.is_closing:
                    # Not one answer: the peer may have died without closing (kill -9, a
                    # lost network). Drop the connection so that the next attempt finds
                    # out afresh instead of writing into it until the idle timeout.
                    log.info("no answer from %s: closing the connection", _who(event.peer_key))
                    conn.close("no answer")
            # AckOwed: MailboxCourier.check sends those acks together; NackReceived: the core
            # has decided (SessionReset) and an exchange has taken note; PendingMadeDue:
            # the core's timer hands the conversation to a worker (DeliveryDue).

    def _start_worker(self, peer_key: bytes) -> None:
        """DeliveryDue: the core holds the conversation for this worker."""
        if self._nursery is not None:
            try:
                self._nursery.start_soon(self._worker, peer_key)
                return
            except RuntimeError:  # the nursery is closed: the daemon is stopping
                pass
        self.core.conversation_idle(peer_key)  # the timer picks it up once run() runs

    def announce_rotation(self, notice: RotationNotice) -> int:
        """Queue our rotation notice for every contact, once (:mod:`.rotation_notices`)."""
        return self.rotation.announce(notice)

    # ------------------------------------------------------------------ views

    def incoming_summary(self, message: Message) -> IncomingSummary:
        """A received message as the control API shows it: is its key the pin?"""
        contact = self.contacts.by_key(message.peer_key)
        return {
            **message.summary(),
            "sender_verified": contact is not None and contact.handle == message.handle,
            "from": self_certifying(message.handle, message.peer_key),
        }

    def resolved_records(self) -> list[HandleRecord]:
        """The records looked up for delivery that are still cached."""
        return [record for record, _ in self._records.values()]

    async def verify_pin(
        self, ref: HandleRef, *, accept: bool = False, accept_new: str | None = None
    ) -> tuple[Contact, bytes | None]:
        """``ref``'s pinned contact (pinned now if never seen), and the key it replaced.
        ``accept``: mark the pin verified. ``accept_new``: pin the suspected key that
        fingerprint names instead (verified), and send what waits for the handle to it."""
        if accept and accept_new is not None:
            raise UsageError("give either --accept or --accept-new FINGERPRINT, not both")
        if accept_new is not None:
            contact, previous = self.contacts.accept_new(ref.handle, accept_new, time.time())
            moved = self.messages.readdress(ref.handle, previous, contact.public_key)
            log.info("pinned %s to the key named (%d message(s) follow)", ref.handle, moved)
            self._queued(contact.public_key)
            return contact, previous
        contact = await self.contact_for(ref)
        if accept:
            contact = self.contacts.mark_verified(ref.handle)
        return contact, None

    def statistics(self) -> dict[str, Any]:
        return {
            **self.stats,
            "outbox_pending": self._conn.execute(
                "SELECT COUNT(*) FROM messages "
                "WHERE direction='out' AND state IN ('queued', 'sent')"
            ).fetchone()[0],
            "events_dropped": self.events.dropped,
            "unreadable_rows": self.messages.corrupt_rows,  # p2pd/at_rest.py
            "schedule": self.debug_state(),
        }

    def debug_state(self) -> dict[str, Any]:
        """Each conversation delivery schedules or works on: the core's schedule
        (:meth:`DeliveryCore.debug_state`) and this service's side of it: its worker
        (what it awaits, or None: no worker runs) and the one timer, in seconds from now.
        For diagnosing a conversation that does not move (issue 9); no message, no key."""
        now = time.time()
        timer = self._timer.deadline
        timer_in = None if math.isinf(timer) else round(timer - trio.current_time(), 3)
        armed_in = None if self._armed is None else round(self._armed - now, 3)
        core_next = self.core.get_timer()
        rows = self.core.debug_state(now)
        for key, row in rows.items():
            row["worker"] = self._doing.get(key)
            wake = self._worker_wake.get(key)
            row["wake_set"] = None if wake is None else wake.is_set()
        return {
            "timer_in": timer_in,
            "armed_in": armed_in,
            "core_next_in": None if core_next is None else round(core_next - now, 3),
            "workers": len(self._doing),
            "conversations": list(rows.values()),
        }


def _bundle(record: HandleRecord | None) -> bytes | None:
    """The prekey bundle a record carries, for a first message."""
    return record.extension if record is not None and record.extension else None


def _who(key: bytes | None) -> str:
    return "a mailbox sender" if key is None else fingerprint(key)[:12]
