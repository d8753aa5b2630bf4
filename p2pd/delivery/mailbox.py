"""Delivery's DHT mailbox, both ways: what a worker that could not connect leaves in the
peer's mailbox (:meth:`MailboxCourier.put`), and what waits in ours (fetched at start,
every ``mailbox_poll_interval`` and on request: :meth:`MailboxCourier.poll_forever`,
:meth:`MailboxCourier.check`).

The decisions stay the core's (:meth:`~p2pd.delivery.core.DeliveryCore.plan_mailbox`,
``mailbox_put_done``, ``mailbox_entry_opened``, ``ack_plaintext``); this module does the
I/O around them, with the service's own ``committed`` (apply the core's rows, commit,
move the timer) and ``dispatch`` (react to the core's events) around each entry point.
Entries are sealed to the recipient's key (sealed sender: the storing nodes see neither
text nor sender); the DHT pads, stamps and stores them (p2pd/dht/mailbox_entry.py).
Wire formats: docs/PROTOCOL.md, "Mailboxes".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager

import nacl.public
import nacl.signing
import trio

from .. import wire
from ..dht import DHT
from ..dht.mailbox_entry import MailboxEntryError, open_entry
from ..errors import ConnectionLost
from ..identity import Identity
from ..messaging import Message
from ..transport.quic import QuicPeer
from .core import DeliveryCore
from .events import AckOwed, Event

__all__ = ["MAILBOX_PHASE", "MailboxCourier"]

log = logging.getLogger(__name__)

#: How long a worker that could not connect leaves messages in the peer's mailbox (at
#: least one) before it tries to connect again; the rest stay due (issue 9). Each put
#: is a DHT lookup, postage and puts: 0.3-2.5 s measured on a quiet machine, more on a
#: loaded one. A whole batch (256) put one by one held the conversation for minutes,
#: and a peer back meanwhile got nothing directly until it was done.
MAILBOX_PHASE = 2.0


class MailboxCourier:
    """Our side of the DHT mailboxes, for the delivery service (see the module
    docstring). ``committed()`` and ``dispatch(events)`` are the service's, around every
    entry point of ``core``; ``spawn(func, *args)`` starts a task in the service's
    nursery; ``connect(peer_key)`` is the service's way to a peer (None: unreachable),
    for acks of what came through our mailbox."""

    def __init__(
        self,
        identity: Identity,
        dht: DHT,
        core: DeliveryCore,
        *,
        poll_interval: float,
        committed: Callable[[], AbstractContextManager[None]],
        dispatch: Callable[[Sequence[Event]], None],
        spawn: Callable[..., None],
        connect: Callable[[bytes], Awaitable[QuicPeer | None]],
    ) -> None:
        self.identity = identity
        self.dht = dht
        self.core = core
        self.poll_interval = poll_interval
        self._committed = committed
        self._dispatch = dispatch
        self._spawn = spawn
        self._connect = connect
        self._unseal = nacl.public.SealedBox(
            nacl.signing.SigningKey(identity.seed).to_curve25519_private_key()
        )
        self._kick = trio.Event()

    # ------------------------------------------------------------------ ours

    async def poll_forever(self) -> None:
        """Check our mailbox now, then every ``poll_interval`` or when :meth:`poll_now`
        asks, until cancelled. A failed check is logged and the next one comes."""
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("mailbox check failed")
            with trio.move_on_after(self.poll_interval):
                await self._kick.wait()
            self._kick = trio.Event()

    def poll_now(self) -> None:
        """Have :meth:`poll_forever` check at once instead of at its next interval."""
        self._kick.set()

    async def check(self) -> int:
        """Fetch, store, ack and delete what waits in our mailbox. Returns new messages."""
        stats = self.core.stats
        stats["mailbox_polls"] += 1
        entries = await self.dht.mailbox_fetch(self.identity)
        if not entries:
            return 0
        before = stats["received_mailbox"]
        events: list[Event] = []
        with self._committed():  # the whole fetch in one transaction
            now = time.time()
            for _, sealed in entries:
                try:
                    plain = open_entry(self._unseal, sealed)  # p2pd/dht/mailbox_entry.py
                except MailboxEntryError:
                    log.info("ignored a mailbox entry that does not open")
                    continue
                events += self.core.mailbox_entry_opened(plain, now)
        self._dispatch(events)
        new = stats["received_mailbox"] - before
        await self.dht.mailbox_delete(self.identity, [entry_id for entry_id, _ in entries])
        acks: dict[bytes, list[bytes]] = {}
        for event in events:
            if isinstance(event, AckOwed):
                acks.setdefault(event.sender_key, []).append(event.msg_id)
        for sender, ids in acks.items():
            self._spawn(self._send_acks, sender, ids)
        if new:
            log.info("%d message(s) from the mailbox", new)
        return new

    async def _send_acks(self, peer_key: bytes, ids: list[bytes]) -> None:
        """Ack messages that came through the mailbox: directly if we can, else by mailbox."""
        peer = await self._connect(peer_key)
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
        for msg_id in ids:
            await self.dht.mailbox_put(peer_key, self.core.ack_plaintext(msg_id))

    # ------------------------------------------------------------------ theirs

    async def put(self, peer_key: bytes, ready: list[Message]) -> None:
        """Leave what the core picks of ``ready`` in the peer's mailbox, for
        ``MAILBOX_PHASE`` at most (one put at least): the messages not put yet are not
        counted as attempted and stay due, so the worker tries a connection again
        before it puts more (the peer may be back), instead of putting a whole batch
        first."""
        with self._committed():
            puts = self.core.plan_mailbox(peer_key, ready, time.time())
        until = trio.current_time() + MAILBOX_PHASE
        for n, put in enumerate(puts):  # padded, sealed to the peer and stamped by the DHT
            if n and trio.current_time() >= until:
                log.info("%d message(s) not left in a mailbox yet: connecting again first",
                         len(puts) - n)  # fmt: skip
                return
            copies = await self.dht.mailbox_put(peer_key, put.plaintext)
            with self._committed():
                events = self.core.mailbox_put_done(put, copies, time.time())
            self._dispatch(events)
