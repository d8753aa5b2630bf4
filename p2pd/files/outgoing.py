"""Outgoing transfers: one loop per transfer that connects, opens a stream and writes
OPEN, and goes by what the receiver answers (p2pd/files/protocol.py; docs/PROTOCOL.md,
"Files"): REQUEST (from which group; with the hash list or not: the chunks go out
through :func:`p2pd.files.sending.stream_file`), WAIT (no offer yet, or not accepted:
the loop sleeps until NUDGEd or its backoff ends), REFUSE or DONE.

At most ``[files] window_groups`` groups are unacknowledged, so a receiver killed
mid-way costs at most that many groups sent twice; after anything breaks the loop
tries again with backoff, and the service resumes every loop at daemon start.

(``sending.py`` is one data stream's chunks and acks; this module is the loop around
the streams of each transfer.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..config import FilesConfig
from ..errors import ConnectionLost, StoredDataCorrupt
from ..transport.quic import QuicPeer, QuicStream
from .protocol import (
    F_CANCEL,
    F_DONE,
    F_REFUSE,
    F_REQUEST,
    F_WAIT,
    REASON_CANCELLED,
    REASON_REJECTED,
    REASON_UNREADABLE,
    REASONS,
    FileProtocolError,
    SenderStream,
)
from .sending import SourceChanged, StreamOutcome, stream_file
from .store import FileStore, Transfer
from .views import TransferViews

log = logging.getLogger(__name__)

#: Backoff of the sender's loop after a failure or a WAIT (a NUDGE ends it early).
BACKOFF_MIN, BACKOFF_MAX = 0.5, 60.0
#: Attempts that find the source shorter than offered (being rewritten?) before the
#: transfer fails.
MAX_SOURCE_CHANGES = 3
#: How long one connection attempt and one answer may take.
CONNECT_TIMEOUT = 5.0
ANSWER_TIMEOUT = 30.0
#: Attempts of one sender loop before it gives up for this run of the daemon (at
#: BACKOFF_MAX apart: about a week). It starts again at the next daemon start.
MAX_ATTEMPTS = 10_000
#: What breaks one attempt of a sender loop and is worth another (after a backoff).
_RETRYABLE = (
    ConnectionLost,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    FileProtocolError,
    trio.TooSlowError,
)


class OutgoingTransfers:
    """The sender loops. ``connect_to(peer_key, handle)`` gives a QUIC connection to the
    peer or None; ``spawn(func, *args)`` starts a task in the service's nursery (False
    if none runs: before the service runs, or once the daemon stops); ``tell(t, kind,
    reason)`` sends the peer a control frame
    (CANCEL) on a stream of its own, best effort."""

    def __init__(
        self,
        config: FilesConfig,
        store: FileStore,
        views: TransferViews,
        stats: dict[str, int],
        *,
        connect_to: Callable[[bytes, str], Awaitable[QuicPeer | None]],
        spawn: Callable[..., bool],
        tell: Callable[[Transfer, int, int], None],
    ) -> None:
        self.config = config
        self.store = store
        self.views = views
        self.stats = stats
        self.connect_to = connect_to
        self.spawn = spawn
        self.tell = tell
        #: Transfers whose loop runs.
        self._senders: set[bytes] = set()
        self._nudges: dict[bytes, trio.Event] = {}
        #: The cancel scope of each running attempt.
        self._scopes: dict[bytes, trio.CancelScope] = {}
        #: How far this run of the transfer's loop has written it.
        self._sent_until: dict[bytes, int] = {}
        #: The connection each running attempt writes on, and the attempts to start
        #: again at once (a NUDGE came over another connection).
        self._sending_over: dict[bytes, QuicPeer] = {}
        self._restarts: set[bytes] = set()
        #: The connection the last NUDGE came over: the next attempt writes on it. Any
        #: connection to the peer would do but after the receiver restarted: then the
        #: old one still looks open until its idle timeout (30 s), the endpoint's
        #: connections are a set, and connect_to took whichever came first: half the
        #: time the old one, and the transfer stalled for the idle timeout (seen as
        #: test_kill_9_mid_transfer_resumes...[bob] taking 40 s instead of 13 s).
        self._nudged_over: dict[bytes, QuicPeer] = {}

    # ------------------------------------------------------------------ the service's

    def start(self, transfer_id: bytes) -> None:
        """Run the transfer's loop, unless it runs already."""
        if transfer_id in self._senders:
            return
        self._senders.add(transfer_id)
        if not self.spawn(self._sender, transfer_id):
            self._senders.discard(transfer_id)

    def nudged(self, transfer_id: bytes, peer: QuicPeer) -> None:
        """The receiver NUDGEd us over ``peer``: try now (a loop waiting out its backoff
        wakes up; a stream still writing into another connection is given up)."""
        self.start(transfer_id)
        if transfer_id not in self._senders:
            return  # no loop can run (the daemon is stopping)
        self._nudged_over[transfer_id] = peer
        self._wake(transfer_id)
        if self._sending_over.get(transfer_id, peer) is not peer:
            # A receiver that restarted nudges us from a new connection while our
            # stream still writes into the old one.
            log.info("file %s: the receiver nudged us over another connection: "
                     "starting again on that one", transfer_id.hex()[:8])  # fmt: skip
            self._restarts.add(transfer_id)
            if (scope := self._scopes.get(transfer_id)) is not None:
                scope.cancel()

    def stop(self, transfer_id: bytes) -> None:
        """The transfer's row is final (cancelled here or by the peer): the stream under
        way stops, a loop waiting out its backoff sees the state now."""
        scope = self._scopes.get(transfer_id)
        if scope is not None:
            scope.cancel()
        self._wake(transfer_id)

    def held(self) -> int:
        """Entries held in memory for transfers (0 once no loop runs)."""
        return (
            len(self._senders)
            + len(self._nudges)
            + len(self._scopes)
            + len(self._sent_until)
            + len(self._sending_over)
            + len(self._restarts)
            + len(self._nudged_over)
        )

    # ------------------------------------------------------------------ the loop

    async def _wait_nudge(self, transfer_id: bytes, delay: float) -> None:
        event = self._nudges.setdefault(transfer_id, trio.Event())
        with trio.move_on_after(delay):
            await event.wait()
        self._nudges[transfer_id] = trio.Event()

    def _wake(self, transfer_id: bytes) -> None:
        if transfer_id not in self._senders:
            return  # no loop to wake (an entry made here would stay forever)
        event = self._nudges.get(transfer_id)
        if event is not None:
            event.set()
        else:
            self._nudges[transfer_id] = trio.Event()
            self._nudges[transfer_id].set()

    async def _sender(self, transfer_id: bytes) -> None:
        """One outgoing transfer, until it is done, refused, cancelled or failed."""
        backoff = BACKOFF_MIN
        source_changes = 0
        try:
            for _ in range(MAX_ATTEMPTS):
                try:
                    t = self.store.get(transfer_id)
                except StoredDataCorrupt as exc:  # listed nowhere, counted: left as it is
                    log.warning("file %s: its row does not read (%s): sender stopped",
                                transfer_id.hex()[:8], exc)  # fmt: skip
                    return
                if t is None or t.state not in ("offered", "sending"):
                    return
                with trio.CancelScope() as scope:
                    self._scopes[transfer_id] = scope
                    try:
                        outcome = await self._send_once(t)
                    except _RETRYABLE as exc:
                        log.info(
                            "file %s to %s: %s; retrying",
                            transfer_id.hex()[:8],
                            t.handle,
                            exc or type(exc).__name__,
                        )
                        outcome = "retry"
                    except SourceChanged as exc:
                        source_changes += 1
                        if source_changes >= MAX_SOURCE_CHANGES:
                            self._cannot_read(t, exc)
                            return
                        log.warning("file %s to %s: %s; trying again",
                                    transfer_id.hex()[:8], t.handle, exc)  # fmt: skip
                        outcome = "retry"
                    except OSError as exc:
                        self._cannot_read(t, exc)
                        return
                    except StoredDataCorrupt as exc:  # its row, damaged under us
                        log.warning("file %s: its row does not read (%s): sender stopped",
                                    transfer_id.hex()[:8], exc)  # fmt: skip
                        return
                if scope.cancelled_caught and transfer_id not in self._restarts:
                    log.info("file %s: sender stopped (cancelled)", transfer_id.hex()[:8])
                    return  # cancelled by the user
                if transfer_id in self._restarts:  # the receiver came back: at once
                    self._restarts.discard(transfer_id)
                    continue
                if outcome == "final":
                    return
                if outcome == "progress":
                    backoff = BACKOFF_MIN
                await self._wait_nudge(transfer_id, backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
        finally:
            # Whatever ended the loop (done, refused, cancelled, failed, the daemon
            # stopping): nothing of the transfer stays in memory, or a daemon that runs
            # for months holds an entry per file it ever sent.
            self._senders.discard(transfer_id)
            self._scopes.pop(transfer_id, None)
            self._sending_over.pop(transfer_id, None)
            self._nudges.pop(transfer_id, None)
            self._sent_until.pop(transfer_id, None)
            self._restarts.discard(transfer_id)
            self._nudged_over.pop(transfer_id, None)
            self.views.forget(transfer_id)

    def _cannot_read(self, t: Transfer, exc: OSError) -> None:
        """The source is gone or keeps changing: the transfer fails here, and the
        receiver is told (it would otherwise wait for a sender that stopped)."""
        error = f"cannot read the file: {exc.strerror or exc}"
        log.warning("file %s to %s: %s", t.id.hex()[:8], t.handle, error)
        self.store.update(t.id, time.time(), state="failed", error=error)
        self.views.changed(t.id)
        self.tell(t, F_CANCEL, REASON_UNREADABLE)

    async def _send_once(self, t: Transfer) -> str:
        """One connection's worth: "final" (done, refused), "progress" (some groups
        were acked before it broke: retry soon) or "retry"."""
        peer = self._nudged_over.pop(t.id, None)
        if peer is None or peer.is_closing:
            peer = await self.connect_to(t.peer_key, t.handle)
        if peer is None:
            log.info("file %s to %s: not reachable now", t.id.hex()[:8], t.handle)
            return "retry"
        assert t.hashes is not None
        tx = SenderStream(t.offer, t.hashes)
        self._sending_over[t.id] = peer
        stream = await peer.open_stream()
        async with stream:
            # Bounded, the opening write too: a stream's data waits while the peer's stream
            # limit is reached (QuicPeer.open_stream), and once a whole run of the e2e tests
            # saw a sender wait there, silent, after a refused group. A connection that
            # cannot carry one opening frame in this long is closed, and the next attempt
            # makes a new one.
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    await stream.send_all(tx.open_frames())
            except trio.TooSlowError:
                log.info("file %s to %s: the connection takes no new stream: closing it",
                         t.id.hex()[:8], t.handle)  # fmt: skip
                peer.close("no new stream")
                return "retry"
            with trio.fail_after(ANSWER_TIMEOUT):
                first = await self._next_events(stream, tx)
            event = first[0]
            if event.kind == F_WAIT:
                log.info("file %s to %s: the receiver says wait", t.id.hex()[:8], t.handle)
                return "retry"
            if event.kind in (F_REFUSE, F_DONE):
                self._final(t, event.kind, event.reason)
                return "final"
            if event.kind != F_REQUEST:
                raise FileProtocolError("the receiver did not answer OPEN with REQUEST")
            return await self._stream_file(t, tx, stream, event.group, event.hashes)

    async def _next_events(self, stream: QuicStream, tx: SenderStream) -> list[Any]:
        for _ in range(1000):
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionLost("the receiver ended the stream")
            events = tx.data_received(data)
            if events:
                return events
        raise FileProtocolError("no answer in 1000 reads")

    def _final(self, t: Transfer, kind: int, reason: int) -> None:
        """The receiver answered DONE or REFUSE: the transfer's row is final."""
        if kind == F_DONE:
            self.store.update(t.id, time.time(), state="done", bytes_done=t.offer.size)
        else:
            state = {REASON_REJECTED: "rejected", REASON_CANCELLED: "cancelled"}.get(
                reason, "failed"
            )
            self.store.update(
                t.id,
                time.time(),
                state=state,
                error={"failed": REASONS.get(reason, "refused"), "rejected": ""}.get(
                    state, f"cancelled by {t.handle}"
                ),
            )
        self.views.forget(t.id)
        self.views.changed(t.id)

    async def _stream_file(
        self, t: Transfer, tx: SenderStream, stream: QuicStream, group: int, hashes: bool
    ) -> str:
        layout = t.offer.layout
        now = time.time()
        start = min(layout.size, group * layout.group_size)
        self.store.update(t.id, now, state="sending", bytes_done=start)
        self.views.stream_started(t.id, now, start)
        self.views.changed(t.id)

        def on_ack(acked: int) -> None:
            now = time.time()
            done = min(layout.size, acked * layout.group_size)
            self.stats["bytes_out"] = self.stats["bytes_out"] + done - self._acked_bytes(t.id)
            self.store.update(t.id, now, bytes_done=done)
            self.views.progress(t.id, now)

        outcome = StreamOutcome(acked=group, sent_until=self._sent_until.get(t.id, 0))
        try:
            await stream_file(
                stream,
                tx,
                t.path,
                group,
                hashes,
                window=self.config.window_groups,
                on_ack=on_ack,
                outcome=outcome,
                max_rate=self.config.max_rate,
                queue_target=self.config.queue_target_ms / 1000,
            )
        except _RETRYABLE as exc:
            if outcome.acked <= group:
                raise
            # Groups were acked before the stream broke (reset after a refused chunk,
            # a lost connection): "progress", the backoff starts again from its least.
            # Raised, this was a plain retry and the backoff doubled however much got
            # through: from the eighth break of a long transfer on, a minute each.
            why = str(exc) or type(exc).__name__
            log.info("file %s to %s: %s after group %d; retrying",
                     t.id.hex()[:8], t.handle, why, outcome.acked)  # fmt: skip
            return "progress"
        finally:
            self._sent_until[t.id] = outcome.sent_until
            if outcome.resent:
                self.stats["resent_out"] += outcome.resent
                self.store.add_counts(t.id, resent=outcome.resent)
        if outcome.done or outcome.refused:
            self._final(t, F_DONE if outcome.done else F_REFUSE, outcome.refused)
            return "final"
        return "progress" if outcome.acked > group else "retry"

    def _acked_bytes(self, transfer_id: bytes) -> int:
        t = self.store.get(transfer_id)
        return 0 if t is None else t.bytes_done
