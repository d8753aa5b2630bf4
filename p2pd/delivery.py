"""Delivery: the trio service that moves encrypted messages between daemons.

Everything at rest lives in :mod:`p2pd.messaging` (outbox, inbox, pins) and
:mod:`p2pd.session` (X3DH and the Double Ratchet); this module does the network part.

Sending. ``send`` resolves the handle, checks the key against the pin, and stores the
message (state ``queued``) before it returns. One worker per conversation then, in the
conversation's order: encrypts each message once (the envelope is committed in the same
SQLite transaction as the ratchet step, so a crash never leaves the two apart), tries a
direct QUIC connection to the addresses in the recipient's record, writes the messages
as frames on one stream and waits for acks. If the recipient cannot be reached, each
message is sealed to the recipient's key (sealed sender: the storing nodes see neither
text nor sender) and left in its DHT mailbox. Until its ack arrives a message is retried
with exponential backoff (0.5 s .. 60 s); retries send the same envelope, and the
receiver deduplicates by message id.

Receiving. A message frame is decrypted and stored in one transaction, then acked. A
frame that does not decrypt because the session is unknown there (the receiver lost it,
or a one-time prekey was used up) is answered with a NACK: the sender archives the
session, encrypts the unacknowledged messages again in a new one, and resends. Messages
found in the mailbox (at start and every ``mailbox_poll_interval``) are stored the same
way, acked directly if the sender is reachable and through the sender's mailbox if not,
then deleted from the storing nodes.

Wire formats: docs/PROTOCOL.md, "Messages".
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing
import trio

from . import wire
from .config import NodeConfig
from .dht import DHT
from .errors import (
    ConnectionLost,
    DuplicateMessage,
    KeyChanged,
    NoSession,
    NotFound,
    P2PDError,
    PeerKeyMismatch,
    PrekeyUnavailable,
    SessionError,
    UnknownSession,
    UsageError,
    WireError,
)
from .identity import HandleRef, Identity, fingerprint, format_fingerprint, self_certifying
from .messaging import Contacts, Message, MessageStore
from .records import HandleRecord
from .session import SessionManager, safety_number
from .session.manager import Decrypted
from .transport.quic import QuicEndpoint, QuicPeer, QuicStream
from .wire import Address

log = logging.getLogger(__name__)

ACK, NACK, DROP = "ack", "nack", "drop"
#: How long a resolved record is used before it is looked up again.
RECORD_CACHE_SECONDS = 60.0
#: At most one session reset per peer in this many seconds (a NACK storm is refused).
RESET_INTERVAL = 10.0
#: Messages sent in one batch on one stream.
BATCH = 256
#: While an exchange waits, how long messages queued one by one may gather before the
#: worker encrypts them (Delivery._worker).
PREPARE_GATHER = 0.002
#: Messages one ``send`` call may queue at once (the control API's ``texts``).
MAX_SEND_BATCH = 1000
#: Events buffered per subscriber before new ones are dropped for it.
EVENT_BUFFER = 1024
#: How long a lookup made for delivery may take.
RESOLVE_TIMEOUT = 10.0


def _curve_public(ed25519_public: bytes) -> nacl.public.PublicKey:
    return nacl.public.PublicKey(nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(ed25519_public))


class EventBus:
    """Fan-out of daemon events to control API subscribers; a slow one loses events."""

    def __init__(self) -> None:
        self._subscribers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self.dropped = 0

    def emit(self, kind: str, **fields: Any) -> None:
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
    def __init__(
        self,
        config: NodeConfig,
        identity: Identity,
        conn: sqlite3.Connection,
        dht: DHT,
        events: EventBus,
    ) -> None:
        self.config = config
        self.identity = identity
        self.dht = dht
        self.events = events
        self._conn = conn
        self.messages = MessageStore(conn)
        self.contacts = Contacts(conn)
        self.sessions = SessionManager.open(conn, identity, now=time.time())
        self.quic: QuicEndpoint | None = None
        #: Where LAN discovery saw a key (set by the daemon); tried before the record's.
        self.lan_addresses: Callable[[bytes], list[Address]] = lambda key: []
        #: Receives call signals (sender key, claimed handle, the QUIC peer or None, JSON
        #: text); set by the daemon's call manager.
        self.on_signal: Callable[[bytes, str, QuicPeer | None, str], None] | None = None
        self._unseal = nacl.public.SealedBox(
            nacl.signing.SigningKey(identity.seed).to_curve25519_private_key()
        )
        self._records: dict[bytes, tuple[HandleRecord, float]] = {}
        self._workers: set[bytes] = set()
        #: Set to wake a peer's worker that waits: its exchange ended, or a message was
        #: queued.
        self._worker_wake: dict[bytes, trio.Event] = {}
        self._exchange_ended: dict[bytes, trio.Event] = {}
        self._last_reset: dict[bytes, float] = {}
        self._kick = trio.Event()
        self._mailbox_kick = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._current_peer: QuicPeer | None = None  # whose frames _accept is handling
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

    # ------------------------------------------------------------------ service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver due messages and poll the mailbox until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._mailbox_loop)
            task_status.started()
            while True:
                now = time.time()
                for peer_key in self.messages.due_peers(now):
                    if peer_key not in self._workers:
                        self._workers.add(peer_key)
                        nursery.start_soon(self._worker, peer_key)
                next_due = self.messages.next_due()
                wait = 30.0 if next_due is None else min(30.0, max(0.05, next_due - now))
                with trio.move_on_after(wait):
                    await self._kick.wait()
                self._kick = trio.Event()

    def _spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start background work in the service's nursery, unless it is shutting down
        (a stream handler may still run then: the QUIC endpoint has its own nursery)."""
        if self._nursery is None:
            return
        try:
            self._nursery.start_soon(func, *args)
        except RuntimeError:  # the nursery is closed: the daemon is stopping
            log.debug("not starting %s: shutting down", getattr(func, "__name__", func))

    def kick(self) -> None:
        """Look for due messages now (something was queued, or a peer came online)."""
        self._kick.set()

    def poll_mailbox_now(self) -> None:
        self._mailbox_kick.set()

    # ------------------------------------------------------------------ sending

    async def send(self, target: str, text: str) -> Message:
        """Queue ``text`` for ``target`` (a handle or ``handle#prefix``). Durable on return.

        Raises NotFound if the handle is neither a contact nor in the DHT, KeyChanged if
        its key differs from the pinned one.
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
        contact = self.contacts.get(ref.handle)
        record: HandleRecord | None = None
        cached = self._records.get(contact.public_key) if contact is not None else None
        try:
            if cached is not None and time.monotonic() - cached[1] < RECORD_CACHE_SECONDS:
                record = cached[0]  # looked up a moment ago: no lookup per message
            else:
                with trio.fail_after(RESOLVE_TIMEOUT):
                    record = await self.dht.resolve(ref)
        except (NotFound, trio.TooSlowError):
            if contact is None:
                raise NotFound(
                    f"no record for {ref.handle!r} in the DHT and no pinned key: cannot "
                    "queue a message for a handle never seen"
                ) from None
        now = time.time()
        if record is not None:
            if contact is None or contact.public_key != record.public_key:
                contact = self.contacts.check(ref.handle, record.public_key, now)  # pin/refuse
            if cached is None or record is not cached[0]:
                self._records[record.public_key] = (record, time.monotonic())
        assert contact is not None
        if contact.pending_key is not None:
            raise KeyChanged(
                f"the key of {ref.handle!r} has changed: nothing was sent. Compare safety "
                f"numbers with `p2pd verify {ref.handle}` and accept with "
                f"`p2pd verify {ref.handle} --accept`"
            )
        if not ref.matches(contact.public_key):
            raise KeyChanged(f"the pinned key of {ref.handle!r} does not match {target!r}")
        messages = self.messages.enqueue_many(ref.handle, contact.public_key, texts, now)
        for message in messages:
            self.events.emit("message_status", **message.summary())
        self._start_worker(contact.public_key)
        return messages

    def _start_worker(self, peer_key: bytes) -> None:
        """Deliver to ``peer_key`` now: start its worker unless one runs (it will find the
        new message when it next looks). Starting it here, not from the service loop,
        saves a task switch and two queries on every message's way out."""
        if peer_key in self._workers:
            wake = self._worker_wake.get(peer_key)
            if wake is not None:
                wake.set()  # it waits for an exchange: encrypt the new message meanwhile
            return
        if self._nursery is None:
            self.kick()
            return
        self._workers.add(peer_key)
        try:
            self._nursery.start_soon(self._worker, peer_key)
        except RuntimeError:  # the nursery is closed: the daemon is stopping
            self._workers.discard(peer_key)

    async def _worker(self, peer_key: bytes) -> None:
        """Deliver one conversation's due messages, in batches, until none is due.

        One exchange (a batch written, its acks awaited) at a time; while it waits, the
        messages queued meanwhile are encrypted, so that we encrypt the next batch while
        the receiver decrypts this one. Stop-and-wait alone had the two daemons take
        turns, each idle half the time; several exchanges at once overlapped them too,
        but aioquic serves streams round-robin, packet by packet, so the receiver got
        the batches interleaved, and every message out of order leaves a skipped key in
        the session state written with each message (58 KB states, measured).
        """
        try:
            async with trio.open_nursery() as exchanges:
                for _ in range(10_000):  # bounded: batches and waits, then rescheduled
                    self._worker_wake[peer_key] = wake = trio.Event()
                    ended = self._exchange_ended[peer_key] = trio.Event()
                    if exchanges.child_tasks:  # an exchange waits for its acks
                        await self._prepare(peer_key)
                        await wake.wait()  # it ended, or a message was queued
                        if exchanges.child_tasks:
                            # Queued one by one: let a few gather before encrypting (one
                            # transaction for all), unless the exchange ends first.
                            with trio.move_on_after(PREPARE_GATHER):
                                await ended.wait()
                        continue
                    batch = self.messages.due_for(peer_key, time.time(), limit=BATCH)
                    if not batch:
                        return
                    try:
                        await self._deliver(peer_key, batch, exchanges)
                    except Exception:
                        log.exception("delivery to %s failed", fingerprint(peer_key)[:12])
                        for m in batch:
                            self.messages.mark_attempt(m.id, time.time(), via=None)
        finally:
            self._worker_wake.pop(peer_key, None)
            self._exchange_ended.pop(peer_key, None)
            self._workers.discard(peer_key)
            self.kick()

    async def _prepare(self, peer_key: bytes) -> None:
        """Encrypt the due messages that have no envelope yet (the next batch; those of
        the open exchange have theirs, and are not due again before their backoff)."""
        due = self.messages.due_for(peer_key, time.time(), limit=BATCH)
        todo = [m for m in due if m.envelope is None]
        if todo:
            try:
                record = await self._record_for(peer_key, todo[0].handle)
                self._encrypt(peer_key, todo, record)
            except Exception:  # it is tried again when the batch is delivered
                log.exception("encrypting for %s failed", fingerprint(peer_key)[:12])

    async def _deliver(
        self,
        peer_key: bytes,
        batch: list[Message],
        exchanges: trio.Nursery,
    ) -> None:
        handle = batch[0].handle
        record = await self._record_for(peer_key, handle)
        ready = self._encrypt(peer_key, batch, record)
        if not ready:
            return
        peer = await self._connect(peer_key, record)
        if peer is not None:
            try:
                await self._send_direct(peer, ready, exchanges)
                return
            except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("direct delivery to %s broke: %s", handle, exc)
        await self._send_mailbox(peer_key, ready)

    def _encrypt(
        self, peer_key: bytes, batch: list[Message], record: HandleRecord | None
    ) -> list[Message]:
        """Give each message its envelope, in order; the messages that have one."""
        ready: list[Message] = []
        for message in batch:
            if message.envelope is not None:
                ready.append(message)
                continue
            payload = wire.MessagePayload(
                message.id,
                message.seq,
                message.sent_at_ms,
                message.text,
                sender=self.identity.handle,
            ).encode()
            now = time.time()
            try:
                envelope = self.sessions.encrypt(
                    peer_key,
                    payload,
                    now=now,
                    peer_bundle=record.extension if record and record.extension else None,
                    commit=False,
                )
            except NoSession:  # a failed encrypt changed nothing (its own savepoint)
                log.info("no session with %s and no prekey bundle yet: waiting", message.handle)
                for m in batch[len(ready) :]:
                    self.messages.mark_attempt(m.id, now, via=None, commit=False)
                break
            except (WireError, SessionError) as exc:  # a bad bundle in the record
                log.warning("cannot start a session with %s: %s", message.handle, exc)
                for m in batch[len(ready) :]:
                    self.messages.mark_attempt(m.id, now, via=None, commit=False)
                break
            self.messages.set_envelope(message.id, envelope, commit=False)
            ready.append(_with_envelope(message, envelope))
        if self._conn.in_transaction:
            # Each envelope with its ratchet step, the batch in one transaction; before
            # anything is sent and before any await (the connection is shared).
            self._conn.commit()
        return ready

    async def _record_for(
        self, peer_key: bytes, handle: str, *, fresh: bool = False
    ) -> HandleRecord | None:
        cached = self._records.get(peer_key)
        if cached is not None and not fresh:
            record, when = cached
            if time.monotonic() - when < RECORD_CACHE_SECONDS and record.expires > time.time():
                return record
        try:
            with trio.fail_after(RESOLVE_TIMEOUT):
                record = await self.dht.resolve(HandleRef(handle))
        except (NotFound, trio.TooSlowError):
            return cached[0] if cached and cached[0].expires > time.time() else None
        if record.public_key != peer_key:
            try:
                self.contacts.check(handle, record.public_key, time.time())
            except KeyChanged as exc:
                log.warning("%s", exc)
            return None  # never deliver to another key than the one the message is for
        self._records[peer_key] = (record, time.monotonic())
        return record

    async def _connect(self, peer_key: bytes, record: HandleRecord | None) -> QuicPeer | None:
        assert self.quic is not None
        for peer in self.quic.peers():
            if peer.public_key == peer_key and not peer.is_closing:
                return peer
        addresses = list(self.lan_addresses(peer_key))
        addresses += [a for a in (record.addresses if record else ()) if a not in addresses]
        for address in addresses:
            try:
                with trio.fail_after(self.config.connect_timeout):
                    return await self.quic.connect(address, peer_key)
            except PeerKeyMismatch:
                log.warning("%s answered with another key than %s", address, _who(peer_key))
            except (ConnectionLost, trio.TooSlowError):
                log.debug("no QUIC connection to %s at %s", _who(peer_key), address)
        return None

    async def _exchange(
        self,
        peer: QuicPeer,
        frames: bytes,
        waiting: set[bytes],
        *,
        nacks: set[bytes] | None = None,
        sent: Callable[[], None] | None = None,
        background: trio.Nursery | None = None,
        done: Callable[[], None] | None = None,
    ) -> None:
        """Write MESSAGE ``frames`` on a new stream and read the answers until every id
        in ``waiting`` is answered (removed from it) or ``ack_timeout`` passes.
        ``sent`` runs once the frames are written; NACKed ids are added to ``nacks``;
        ``done`` runs at the end. With ``background``, return once the frames are
        written and read the answers in a task of that nursery."""
        stream = await peer.open_stream()
        try:
            await stream.send_all(frames, eof=True)  # the FIN in the same packet
            if sent is not None:
                sent()
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            if done is not None:
                done()
            raise
        if background is None:
            await self._answers(peer, stream, waiting, nacks, done)
        else:
            background.start_soon(self._answers, peer, stream, waiting, nacks, done)

    async def _answers(
        self,
        peer: QuicPeer,
        stream: QuicStream,
        waiting: set[bytes],
        nacks: set[bytes] | None,
        done: Callable[[], None] | None,
    ) -> None:
        """The other half of :meth:`_exchange`: answers until all came, or ack_timeout."""
        assert peer.public_key is not None  # a connection we made: checked in handshake
        answered = trio.Event()

        def on_answer() -> None:
            if not waiting:
                answered.set()

        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(
                    self._read_frames, peer.public_key, stream, waiting, on_answer, peer, nacks
                )
                with trio.move_on_after(self.config.ack_timeout):
                    await answered.wait()
                nursery.cancel_scope.cancel()
        except Exception:  # in a worker's nursery: it must not end the worker
            log.exception("reading answers from %s failed", _who(peer.public_key))
        finally:
            if done is not None:
                done()

    async def _send_direct(
        self,
        peer: QuicPeer,
        batch: list[Message],
        exchanges: trio.Nursery,
    ) -> None:
        waiting = {m.id for m in batch}
        out = bytearray()
        for m in batch:
            assert m.envelope is not None
            out += wire.encode_stream_frame(wire.FRAME_MESSAGE, m.id + m.envelope)

        def sent() -> None:
            self.messages.mark_sent(batch, time.time(), via="direct")  # one transaction
            self.stats["sent_direct"] += len(batch)
            for m in batch:
                if m.id in waiting:
                    self.events.emit("message_status", id=m.id.hex(), state="sent", via="direct")

        def done() -> None:
            for events in (self._worker_wake, self._exchange_ended):
                event = events.get(peer.public_key or b"")
                if event is not None:
                    event.set()
            if len(waiting) == len(batch) and not peer.is_closing:
                # Not one answer: the peer may have died without closing (kill -9, a lost
                # network). Drop the connection so that the next attempt finds out afresh
                # instead of writing into it until the idle timeout.
                log.info("no answer from %s: closing the connection", batch[0].handle)
                peer.close("no answer")

        await self._exchange(peer, bytes(out), waiting, sent=sent, background=exchanges, done=done)

    async def _send_mailbox(self, peer_key: bytes, batch: list[Message]) -> None:
        box = nacl.public.SealedBox(_curve_public(peer_key))
        for m in batch:
            now = time.time()
            if m.via == "mailbox":
                self.messages.mark_attempt(m.id, now, via=None)  # already there; retry direct
                continue
            assert m.envelope is not None
            plain = wire.encode_mailbox_plaintext(
                wire.MAILBOX_MESSAGE, self.identity.public_key, m.id, m.envelope
            )
            sealed = box.encrypt(plain)
            if len(sealed) > wire.MAX_MAILBOX_ENTRY:
                log.warning("message %s is too large for a mailbox: direct only", m.id.hex())
                self.messages.mark_attempt(m.id, now, via=None)
                continue
            copies = await self.dht.mailbox_put(peer_key, sealed)
            self.messages.mark_attempt(m.id, time.time(), via="mailbox" if copies else None)
            if copies:
                self.stats["sent_mailbox"] += 1
                self.events.emit("message_status", id=m.id.hex(), state="sent", via="mailbox")
            log.info("message %s left in %d mailbox(es)", m.id.hex()[:8], copies)

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
        payload = wire.MessagePayload(
            msg_id, 0, int(time.time() * 1000), text, kind=wire.KIND_CALL,
            sender=self.identity.handle,
        ).encode()  # fmt: skip
        bundle = record.extension if record and record.extension else None
        try:
            envelope = self.sessions.encrypt(peer_key, payload, now=time.time(), peer_bundle=bundle)
        except NoSession:
            raise ConnectionLost(f"{handle} has published no prekeys: cannot reach it") from None
        peer = await self._connect(peer_key, record)
        if peer is None:
            raise ConnectionLost(f"{handle} is not reachable (offline?)")
        waiting, nacks = {msg_id}, set[bytes]()
        frame = wire.encode_stream_frame(wire.FRAME_MESSAGE, msg_id + envelope)
        await self._exchange(peer, frame, waiting, nacks=nacks)
        if waiting:
            raise ConnectionLost(f"{handle} did not acknowledge the call signal")
        return peer, msg_id in nacks

    # ------------------------------------------------------------------ receiving

    async def handle_stream(self, peer: QuicPeer, stream: QuicStream) -> None:
        """A stream a peer opened: message, ack and nack frames; answers on the stream."""
        if peer.public_key is not None:  # always set once the handshake is done
            await self._read_frames(peer.public_key, stream, None, None, peer)

    async def _read_frames(
        self,
        peer_key: bytes,
        stream: QuicStream,
        waiting: set[bytes] | None,
        on_answer: Callable[[], Any] | None,
        peer: QuicPeer | None = None,
        nacks: set[bytes] | None = None,
    ) -> None:
        decoder = wire.StreamFrameDecoder()
        while True:
            try:
                data = await stream.receive_some(65536)
            except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                frames = decoder.feed(data)
            except WireError as exc:
                self.stats["malformed_frames"] += 1
                who = fingerprint(peer_key)[:12]
                log.warning("malformed frame from %s (%s): closing the stream", who, exc)
                stream.reset()
                return
            replies = bytearray()
            try:
                self._frames(peer_key, frames, replies, waiting, peer, nacks)
            finally:
                if self._conn.in_transaction:
                    self._conn.commit()  # the acks of this read, in one transaction
            if replies:
                # Answering a stream the peer has finished (it sends its frames and FIN in
                # one go): our FIN goes with the answers, not in a packet of its own.
                last = waiting is None and stream.at_eof
                try:
                    await stream.send_all(bytes(replies), eof=last)
                except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if on_answer is not None:
                on_answer()

    def _frames(
        self,
        peer_key: bytes,
        frames: list[tuple[int, bytes]],
        replies: bytearray,
        waiting: set[bytes] | None,
        peer: QuicPeer | None,
        nacks: set[bytes] | None,
    ) -> None:
        """Handle one read's frames; answers go into ``replies``."""
        for kind, payload in frames:
            if kind == wire.FRAME_MESSAGE:
                if len(payload) <= wire.MESSAGE_ID_LEN:
                    self.stats["malformed_frames"] += 1
                    continue
                msg_id = payload[: wire.MESSAGE_ID_LEN]
                self._current_peer = peer
                try:
                    verdict, _ = self._accept(
                        peer_key, msg_id, payload[16:], via="direct", commit=False
                    )
                finally:
                    self._current_peer = None
                if verdict == ACK:
                    replies += wire.encode_stream_frame(wire.FRAME_ACK, msg_id)
                elif verdict == NACK:
                    self.stats["nacks_out"] += 1
                    replies += wire.encode_stream_frame(wire.FRAME_NACK, msg_id)
            elif len(payload) != wire.MESSAGE_ID_LEN:
                self.stats["malformed_frames"] += 1
            elif kind == wire.FRAME_ACK:
                self._on_ack(peer_key, payload, commit=False)  # committed below
                if waiting is not None:
                    waiting.discard(payload)
            else:
                self._on_nack(peer_key, payload)
                if nacks is not None:
                    nacks.add(payload)
                if waiting is not None:
                    waiting.clear()  # everything is re-encrypted and resent

    def _open_envelope(
        self, transport_key: bytes | None, msg_id: bytes, envelope: bytes, now: float
    ) -> tuple[Decrypted, wire.MessagePayload]:
        """Decrypt (the ratchet step left uncommitted) and decode one message."""
        # A savepoint: a message refused after decryption undoes its ratchet step and
        # nothing else of the transaction (acks and messages of the same read). Inside a
        # transaction always: releasing an outermost savepoint would commit the ratchet
        # step before the message is stored, and a crash between would lose the message.
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN")
        self._conn.execute("SAVEPOINT p2pd_accept")
        try:
            decrypted = self.sessions.decrypt(
                envelope, now=now, sender_key=transport_key, commit=False
            )
            payload = wire.MessagePayload.decode(decrypted.plaintext)
            if payload.msg_id != msg_id:
                raise WireError("the message id inside differs from the frame's")
        except BaseException:
            self._conn.execute("ROLLBACK TO p2pd_accept")
            self._conn.execute("RELEASE p2pd_accept")
            raise
        self._conn.execute("RELEASE p2pd_accept")
        return decrypted, payload

    def _refused(self, transport_key: bytes | None, exc: P2PDError) -> tuple[str, None]:
        if isinstance(exc, DuplicateMessage):
            self.stats["duplicates"] += 1
            log.info("refused a replayed message from %s", _who(transport_key))
            return DROP, None
        if isinstance(exc, UnknownSession | PrekeyUnavailable):
            log.info("cannot decrypt a message from %s (%s): asking for a new session",
                     _who(transport_key), type(exc).__name__)  # fmt: skip
            return NACK, None
        self.stats["refused"] += 1
        log.warning("refused a message from %s: %s", _who(transport_key), exc.message)
        return DROP, None

    def _accept(
        self,
        transport_key: bytes | None,
        msg_id: bytes,
        envelope: bytes,
        *,
        via: str,
        commit: bool = True,
    ) -> tuple[str, bytes | None]:
        """Decrypt and store one message. Returns the verdict and the sender's key.

        With ``commit=False`` the transaction is left open for the caller, who must
        commit before it acks (a stream read commits once for all its frames)."""
        known = self.messages.get(msg_id)
        if known is not None and known.direction == "in":
            self.stats["duplicates"] += 1
            if transport_key is not None and known.peer_key != transport_key:
                return DROP, None
            return ACK, known.peer_key
        now = time.time()
        try:
            decrypted, payload = self._open_envelope(transport_key, msg_id, envelope, now)
        except (SessionError, WireError) as exc:
            if commit and self._conn.in_transaction:
                self._conn.commit()  # what came before; this message's step is undone
            return self._refused(transport_key, exc)
        sender_key = decrypted.peer_key
        if payload.kind == wire.KIND_CALL:
            self._conn.commit()  # the ratchet step; a signal itself is never stored
            if self.on_signal is not None and via == "direct":
                self.on_signal(sender_key, payload.sender, self._current_peer, payload.text)
            if payload.sender and self.contacts.by_key(sender_key) is None:
                self._spawn(self._verify_sender, payload.sender, sender_key)
            return ACK, sender_key
        trusted = self.contacts.by_key(sender_key)
        handle = trusted.handle if trusted else (payload.sender or "unknown")
        stored = self.messages.record_incoming(
            msg_id,
            handle,
            sender_key,
            payload.seq,
            payload.text,
            payload.sent_at_ms,
            now,
            via=via,
            commit=commit,  # the ratchet step and the message in one transaction
        )
        self.stats["received_direct" if via == "direct" else "received_mailbox"] += 1
        if stored is not None:
            self.events.emit("message", **self.incoming_summary(stored))
        if trusted is None and payload.sender:
            self._spawn(self._verify_sender, payload.sender, sender_key)
        # the peer is alive: anything we owe it may go now
        if self.messages.has_pending(sender_key):
            self.messages.retry_now(sender_key)
            self.kick()
        return ACK, sender_key

    async def _verify_sender(self, handle: str, key: bytes) -> None:
        """Pin a first-contact sender's handle only if the DHT binds it to that key."""
        try:
            with trio.fail_after(RESOLVE_TIMEOUT):
                record = await self.dht.resolve(HandleRef(handle))
        except (NotFound, trio.TooSlowError):
            log.warning("a message claims to be from %r, whose record cannot be found", handle)
            return
        if record.public_key != key:
            log.warning("a message claims to be from %r but holds another key: unverified", handle)
            return
        try:
            self.contacts.check(handle, key, time.time())
            self._records[key] = (record, time.monotonic())
        except KeyChanged as exc:
            log.warning("%s", exc)

    def _on_ack(self, peer_key: bytes, msg_id: bytes, *, commit: bool = True) -> None:
        self.stats["acks_in"] += 1
        if self.messages.mark_delivered(msg_id, peer_key, time.time(), commit=commit):
            self.events.emit("message_status", id=msg_id.hex(), state="delivered")

    def _on_nack(self, peer_key: bytes, msg_id: bytes) -> None:
        self.stats["nacks_in"] += 1
        message = self.messages.get(msg_id)
        if message is None or message.direction != "out" or message.peer_key != peer_key:
            return
        now = time.monotonic()
        if now - self._last_reset.get(peer_key, -math.inf) < RESET_INTERVAL:
            return
        self._last_reset[peer_key] = now
        log.info("%s cannot decrypt our messages: starting a new session", message.handle)
        self.sessions.reset_session(peer_key, now=time.time())
        self.messages.clear_envelopes(peer_key)
        self._records.pop(peer_key, None)  # its bundle may have changed too
        self.kick()

    # ------------------------------------------------------------------ mailbox

    async def _mailbox_loop(self) -> None:
        while True:
            try:
                await self.check_mailbox()
            except Exception:
                log.exception("mailbox check failed")
            with trio.move_on_after(self.config.mailbox_poll_interval):
                await self._mailbox_kick.wait()
            self._mailbox_kick = trio.Event()

    async def check_mailbox(self) -> int:
        """Fetch, store, ack and delete what waits in our mailbox. Returns new messages."""
        self.stats["mailbox_polls"] += 1
        entries = await self.dht.mailbox_fetch(self.identity)
        if not entries:
            return 0
        new = 0
        acks: dict[bytes, list[bytes]] = {}
        for _, sealed in entries:
            try:
                plain = self._unseal.decrypt(sealed)
                kind, _claimed, msg_id, envelope = wire.decode_mailbox_plaintext(plain)
            except (nacl.exceptions.CryptoError, WireError):
                log.info("ignored a mailbox entry that does not open or decode")
                continue
            if kind == wire.MAILBOX_ACK:
                # The claimed sender is who the ack is from: only the peer we sent msg_id
                # to knows it, and mark_delivered checks that the two match.
                self._on_ack(_claimed, msg_id)
                continue
            before = self.stats["received_mailbox"]
            verdict, sender = self._accept(None, msg_id, envelope, via="mailbox")
            new += self.stats["received_mailbox"] - before
            if verdict == ACK and sender is not None:
                acks.setdefault(sender, []).append(msg_id)
        await self.dht.mailbox_delete(self.identity, [entry_id for entry_id, _ in entries])
        for sender, ids in acks.items():
            self._spawn(self._send_acks, sender, ids)
        if new:
            log.info("%d message(s) from the mailbox", new)
        return new

    async def _send_acks(self, peer_key: bytes, ids: list[bytes]) -> None:
        """Ack messages that came through the mailbox: directly if we can, else by mailbox."""
        contact = self.contacts.by_key(peer_key)
        record = await self._record_for(peer_key, contact.handle) if contact else None
        peer = await self._connect(peer_key, record)
        if peer is not None:
            try:
                stream = await peer.open_stream()
                async with stream:
                    frames = b"".join(wire.encode_stream_frame(wire.FRAME_ACK, i) for i in ids)
                    await stream.send_all(frames)
                    await stream.send_eof()
                return
            except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        box = nacl.public.SealedBox(_curve_public(peer_key))
        for msg_id in ids:
            plain = wire.encode_mailbox_plaintext(
                wire.MAILBOX_ACK, self.identity.public_key, msg_id, b""
            )
            await self.dht.mailbox_put(peer_key, box.encrypt(plain))

    # ------------------------------------------------------------------ views

    def incoming_summary(self, message: Message) -> dict[str, Any]:
        contact = self.contacts.by_key(message.peer_key)
        summary = message.summary()
        summary["sender_verified"] = contact is not None and contact.handle == message.handle
        summary["from"] = self_certifying(message.handle, message.peer_key)
        return summary

    def inbox(self, *, sender: str | None, after: int, limit: int) -> dict[str, Any]:
        peer_key = None
        if sender is not None:
            contact = self.contacts.get(HandleRef.parse(sender).handle)
            if contact is None:
                return {"messages": [], "cursor": after}
            peer_key = contact.public_key
        rows = self.messages.inbox(peer_key=peer_key, after_rowid=after, limit=limit)
        cursor = max([after, *(rowid for rowid, _ in rows)])
        out = []
        for rowid, message in rows:
            summary = self.incoming_summary(message)
            summary["cursor"] = rowid
            out.append(summary)
        return {"messages": out, "cursor": cursor}

    def message(self, msg_id_hex: str) -> dict[str, Any]:
        try:
            msg_id = bytes.fromhex(msg_id_hex)
        except ValueError:
            raise UsageError("a message id is 32 hex digits") from None
        message = self.messages.get(msg_id) if len(msg_id) == wire.MESSAGE_ID_LEN else None
        if message is None:
            raise NotFound(f"no message {msg_id_hex[:40]!r}")
        return message.summary()

    def contact_list(self) -> list[dict[str, Any]]:
        out = []
        for contact in self.contacts.all():
            summary = contact.summary()
            summary["session"] = self.sessions.has_session(contact.public_key)
            summary["pending"] = len(self.messages.pending_for(contact.public_key))
            out.append(summary)
        return out

    async def verify(self, target: str, *, accept: bool) -> dict[str, Any]:
        ref = HandleRef.parse(target)
        contact = self.contacts.get(ref.handle)
        if contact is None:
            try:
                with trio.fail_after(RESOLVE_TIMEOUT):
                    record = await self.dht.resolve(ref)
            except trio.TooSlowError:
                raise NotFound(f"no record for {ref.handle!r} in time") from None
            contact = self.contacts.check(ref.handle, record.public_key, time.time())
        if accept:
            had_new_key = contact.pending_key is not None
            contact = self.contacts.accept(ref.handle)
            if had_new_key:
                self.sessions.reset_session(contact.public_key, now=time.time())
        key = contact.pending_key or contact.public_key
        number = await trio.to_thread.run_sync(safety_number, self.identity.public_key, key)
        return {
            "handle": contact.handle,
            "fingerprint": fingerprint(contact.public_key),
            "fingerprint_display": format_fingerprint(fingerprint(contact.public_key)),
            "verified": contact.verified,
            "key_changed": contact.pending_key is not None,
            "new_fingerprint": None if contact.pending_key is None else fingerprint(key),
            "safety_number": number,
            "own_fingerprint": self.identity.fingerprint,
        }

    def statistics(self) -> dict[str, Any]:
        return {
            **self.stats,
            "outbox_pending": self._conn.execute(
                "SELECT COUNT(*) FROM messages "
                "WHERE direction='out' AND state IN ('queued', 'sent')"
            ).fetchone()[0],
            "events_dropped": self.events.dropped,
        }


def _with_envelope(message: Message, envelope: bytes) -> Message:
    return dataclasses.replace(message, envelope=envelope)


def _who(key: bytes | None) -> str:
    return "a mailbox sender" if key is None else fingerprint(key)[:12]
