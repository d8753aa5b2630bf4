"""Files: the trio service that sends and receives files (issue 14).

The decisions about bytes are :mod:`p2pd.files.protocol`'s (sans I/O); this module does
the I/O around them: the offer through delivery's outbox (message kind KIND_FILE, so it
is end-to-end encrypted, retried, and left in the mailbox of an offline recipient),
QUIC streams, the partial file, the database rows, the control API's views.

Who does what:

- The **sender** owns a loop per outgoing transfer (:meth:`FilesService._sender`): it
  connects, opens a stream, writes OPEN, and the receiver answers: REQUEST (from which
  group; with the hash list or not), WAIT (no offer yet, or not accepted: the sender
  sleeps until NUDGEd or its backoff ends), REFUSE or DONE. It keeps at most
  ``[files] window_groups`` groups unacknowledged, so a receiver killed mid-way
  costs at most that many groups sent twice; it retries with backoff after anything
  breaks, and resumes at daemon start.
- The **receiver** records every verified group (``next_group``) before acking it,
  writes only to a partial file in the target directory, checks the whole file against
  the root once more, and only then links it into place under a free name. It NUDGEs
  the sender when it accepts and when it starts with transfers unfinished.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ..at_rest import CLEAR, AtRest
from ..config import FilesConfig
from ..errors import (
    ConnectionLost,
    LocalError,
    NotFound,
    UsageError,
)
from ..identity import HandleRef, Identity, fingerprint, self_certifying
from ..transport.quic import QuicEndpoint, QuicPeer, QuicStream
from .disk import FileSummary, default_download_dir, partial_path, remove_quietly
from .protocol import (
    F_CANCEL,
    F_DONE,
    F_NUDGE,
    F_REFUSE,
    F_REQUEST,
    F_WAIT,
    MAX_FILE_SIZE,
    REASON_CANCELLED,
    REASON_CANNOT_SAVE,
    REASON_CORRUPT,
    REASON_REJECTED,
    REASON_UNKNOWN,
    REASON_UNREADABLE,
    REASONS,
    STREAM_MAGIC,
    FileProtocolError,
    FrameDecoder,
    Layout,
    Offer,
    ReceiverStream,
    SenderStream,
    control_frames,
    encode_frame,
    hash_file,
    parse_opening,
    place_file,
    root_of,
    safe_name,
    verify_file,
)
from .sending import SourceChanged, StreamOutcome, stream_file
from .store import FINAL, FileStore, Transfer

log = logging.getLogger(__name__)

#: A transfer whose chunks are refused this many times in a row fails.
MAX_REFUSED = 8
#: Backoff of the sender's loop after a failure or a WAIT (a NUDGE ends it early).
BACKOFF_MIN, BACKOFF_MAX = 0.5, 60.0
#: Attempts that find the source shorter than offered (being rewritten?) before the
#: transfer fails.
MAX_SOURCE_CHANGES = 3
#: How long one connection attempt and one answer may take.
CONNECT_TIMEOUT = 5.0
ANSWER_TIMEOUT = 30.0
#: Progress events at most this often per transfer.
PROGRESS_INTERVAL = 0.25
#: Attempts of one sender loop before it gives up for this run of the daemon (at
#: BACKOFF_MAX apart: about a week). It starts again at the next daemon start.
MAX_ATTEMPTS = 10_000
#: How the errors of an incoming transfer that failed on our disk begin (``_receive``,
#: ``_finish``): the sender is then told REASON_CANNOT_SAVE, not REASON_CORRUPT.
_SAVE_ERRORS = ("cannot write to ", "cannot save: ")
#: What breaks one attempt of a sender loop and is worth another (after a backoff).
_RETRYABLE = (
    ConnectionLost,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    FileProtocolError,
    trio.TooSlowError,
)


class FilesService:
    """Sends and receives files; see the module docstring. ``connect_to(peer_key,
    handle)`` gives a QUIC connection to a peer or None (delivery's way of finding it);
    ``enqueue_offer(handle, peer_key, text)`` queues the offer in the outbox;
    ``contact_key(ref)`` resolves a handle the user typed to the pinned key;
    ``pinned_handle(key)`` is the contact's handle for a key, if pinned."""

    def __init__(
        self,
        config: FilesConfig,
        identity: Identity,
        conn: sqlite3.Connection,
        emit: Callable[..., None],
        *,
        quic: QuicEndpoint,
        connect_to: Callable[[bytes, str], Awaitable[QuicPeer | None]],
        enqueue_offer: Callable[[str, bytes, str], None],
        contact_key: Callable[[HandleRef], Awaitable[tuple[str, bytes]]],
        pinned_handle: Callable[[bytes], str | None],
        at_rest: AtRest = CLEAR,
    ) -> None:
        self.config = config
        self.identity = identity
        self.store = FileStore(conn, at_rest=at_rest)
        self.emit = emit
        self.quic = quic
        self.connect_to = connect_to
        self.enqueue_offer = enqueue_offer
        self.contact_key = contact_key
        self.pinned_handle = pinned_handle
        self._nursery: trio.Nursery | None = None
        self._senders: set[bytes] = set()
        self._nudges: dict[bytes, trio.Event] = {}
        self._scopes: dict[bytes, trio.CancelScope] = {}
        self._rates: dict[bytes, tuple[float, int]] = {}
        #: Outgoing: how far this run of the daemon has written each transfer.
        self._sent_until: dict[bytes, int] = {}
        #: Outgoing: the connection each running attempt writes on, and the attempts to
        #: start again at once (a NUDGE came over another connection).
        self._sending_over: dict[bytes, QuicPeer] = {}
        self._restarts: set[bytes] = set()
        #: Incoming: refusals since the last verified group.
        self._refusals: dict[bytes, int] = {}
        #: Incoming: whole files that verified group by group but not once on disk.
        self._mismatches: dict[bytes, int] = {}
        self._last_progress: dict[bytes, float] = {}
        self.stats: dict[str, int] = {
            "offers_in": 0,
            "offers_refused": 0,
            "offers_over_limit": 0,
            "offers_over_quota": 0,
            "chunks_refused": 0,
            "streams_refused": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "resent_in": 0,
            "resent_out": 0,
            "groups_verified": 0,
        }

    @property
    def directory(self) -> Path:
        return Path(self.config.dir).expanduser() if self.config.dir else default_download_dir()

    # ------------------------------------------------------------------ service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resume what was under way (senders' loops; nudges to senders of accepted
        files), then serve until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for t in self.store.active("out"):
                self._start_sender(t.id)
            for t in self.store.active("in"):
                nursery.start_soon(self._send_control, t, F_NUDGE, 0)
            task_status.started()
            await trio.sleep_forever()  # the nursery stays open for senders to come

    def _spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is None:
            return
        with contextlib.suppress(RuntimeError):  # the daemon is stopping
            self._nursery.start_soon(func, *args)

    def _start_sender(self, transfer_id: bytes) -> None:
        if transfer_id in self._senders or self._nursery is None:
            return
        self._senders.add(transfer_id)
        self._spawn(self._sender, transfer_id)

    # ------------------------------------------------------------------ views

    def summary(self, t: Transfer, now: float | None = None) -> FileSummary:
        now = time.time() if now is None else now
        size = t.offer.size
        rate = 0.0
        if t.id in self._rates and t.state in ("sending", "accepted"):
            since, start = self._rates[t.id]
            if now - since > 0.2:
                rate = max(0.0, (t.bytes_done - start) / (now - since))
        eta = (size - t.bytes_done) / rate if rate > 0 else None
        return {
            "id": t.id.hex(),
            "direction": t.direction,
            "handle": t.handle,
            "verified": self.pinned_handle(t.peer_key) == t.handle,
            "peer": self_certifying(t.handle, t.peer_key),
            "name": safe_name(t.offer.name) if t.direction == "in" else t.offer.name,
            "size": size,
            "media_type": t.offer.media_type,
            "state": t.state,
            "bytes_done": t.bytes_done,
            "progress": 1.0
            if size == 0 and t.state == "done"
            else t.bytes_done / size
            if size
            else 0.0,
            "rate": rate,
            "eta": eta,
            "path": t.path,
            "directory": t.directory,
            "resent": t.resent,
            "refused": t.refused,
            "error": t.error,
            "created": t.created,
            "updated": t.updated,
        }

    def transfers(self) -> list[FileSummary]:
        now = time.time()
        return [self.summary(t, now) for t in self.store.all()]

    def find(self, transfer_id: str) -> Transfer:
        """A transfer by its id or a unique prefix of it (at least 4 hex digits)."""
        tid = transfer_id.strip().lower()
        if len(tid) < 4 or any(c not in "0123456789abcdef" for c in tid):
            raise UsageError("a transfer id is 4 to 32 hex digits (see `p2pd files`)")
        found = self.store.by_prefix(tid)
        if not found:
            raise NotFound(f"no transfer {transfer_id!r} (see `p2pd files`)")
        if len(found) > 1:
            raise UsageError(f"{transfer_id!r} names more than one transfer: give more digits")
        return found[0]

    def _changed(self, transfer_id: bytes) -> None:
        t = self.store.get(transfer_id)
        if t is not None:
            self.emit("file", **self.summary(t))

    def _progress(self, transfer_id: bytes, bytes_done: int, now: float) -> None:
        if now - self._last_progress.get(transfer_id, 0.0) < PROGRESS_INTERVAL:
            return
        self._last_progress[transfer_id] = now
        t = self.store.get(transfer_id)
        if t is not None:
            s = self.summary(t, now)
            self.emit(
                "file_progress",
                id=s["id"],
                direction=s["direction"],
                bytes_done=s["bytes_done"],
                size=s["size"],
                rate=s["rate"],
            )

    # ------------------------------------------------------------------ sending

    async def send_file(self, target: str, path: str) -> FileSummary:
        """Offer the file at ``path`` to ``target`` (a handle or ``handle#prefix``).
        Durable on return: the offer is in the outbox, and the bytes flow once the
        recipient accepts. Raises UsageError (not found, not a regular file, too big,
        our own handle) or what resolving the handle raises."""
        source = Path(path).expanduser()
        if not source.is_absolute():
            raise UsageError(f"{path!r}: give an absolute path (the daemon has another cwd)")
        try:
            st = source.stat()
        except FileNotFoundError:
            raise UsageError(f"{path}: no such file") from None
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path}: not a regular file")
        if st.st_size > MAX_FILE_SIZE:
            raise UsageError(f"{path}: too big ({st.st_size} bytes; at most {MAX_FILE_SIZE})")
        if not os.access(source, os.R_OK):
            raise UsageError(f"{path}: not readable")
        ref = HandleRef.parse(target)
        if ref.handle == self.identity.handle:
            raise UsageError("that is your own handle: files to yourself are not supported")
        handle, peer_key = await self.contact_key(ref)
        layout = Layout.for_size(st.st_size)
        try:
            # BLAKE3 of the whole file, off the trio thread: gigabytes take seconds.
            hashes = await trio.to_thread.run_sync(hash_file, source, layout)
        except OSError as exc:
            raise UsageError(f"{path}: {exc}") from None
        media = mimetypes.guess_type(source.name)[0] or "application/octet-stream"
        offer = Offer(os.urandom(16), os.urandom(32), layout, root_of(hashes), source.name, media)
        now = time.time()
        self.store.add(
            direction="out",
            peer_key=peer_key,
            handle=handle,
            offer=offer,
            state="offered",
            now=now,
            path=str(source),
            hashes=hashes,
        )
        self.enqueue_offer(handle, peer_key, offer.to_text())
        self._changed(offer.transfer_id)
        self._start_sender(offer.transfer_id)
        t = self.store.get(offer.transfer_id)
        assert t is not None
        return self.summary(t)

    async def _wait_nudge(self, transfer_id: bytes, delay: float) -> None:
        event = self._nudges.setdefault(transfer_id, trio.Event())
        with trio.move_on_after(delay):
            await event.wait()
        self._nudges[transfer_id] = trio.Event()

    def _nudge(self, transfer_id: bytes) -> None:
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
                t = self.store.get(transfer_id)
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
            self._senders.discard(transfer_id)
            self._scopes.pop(transfer_id, None)
            self._sending_over.pop(transfer_id, None)
            self._nudges.pop(transfer_id, None)

    def _cannot_read(self, t: Transfer, exc: OSError) -> None:
        """The source is gone or keeps changing: the transfer fails here, and the
        receiver is told (it would otherwise wait for a sender that stopped)."""
        error = f"cannot read the file: {exc.strerror or exc}"
        log.warning("file %s to %s: %s", t.id.hex()[:8], t.handle, error)
        self.store.update(t.id, time.time(), state="failed", error=error)
        self._changed(t.id)
        self._spawn(self._send_control, t, F_CANCEL, REASON_UNREADABLE)

    async def _send_once(self, t: Transfer) -> str:
        """One connection's worth: "final" (done, refused), "progress" (some groups
        were acked before it broke: retry soon) or "retry"."""
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
                self._sender_final(t, event.kind, event.reason)
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

    def _sender_final(self, t: Transfer, kind: int, reason: int) -> None:
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
        self._rates.pop(t.id, None)
        self._changed(t.id)

    async def _stream_file(
        self, t: Transfer, tx: SenderStream, stream: QuicStream, group: int, hashes: bool
    ) -> str:
        layout = t.offer.layout
        now = time.time()
        start = min(layout.size, group * layout.group_size)
        self.store.update(t.id, now, state="sending", bytes_done=start)
        self._rates[t.id] = (now, start)
        self._changed(t.id)

        def on_ack(acked: int) -> None:
            now = time.time()
            done = min(layout.size, acked * layout.group_size)
            self.stats["bytes_out"] = self.stats["bytes_out"] + done - self._acked_bytes(t.id)
            self.store.update(t.id, now, bytes_done=done)
            self._progress(t.id, done, now)

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
            self._sender_final(t, F_DONE if outcome.done else F_REFUSE, outcome.refused)
            return "final"
        return "progress" if outcome.acked > group else "retry"

    def _acked_bytes(self, transfer_id: bytes) -> int:
        t = self.store.get(transfer_id)
        return 0 if t is None else t.bytes_done

    # ------------------------------------------------------------------ receiving

    def offer_received(self, sender_key: bytes, claimed: str, text: str, via: str) -> None:
        """Delivery's hook: a KIND_FILE message arrived (already acked, not stored as a
        message). From a pinned contact and small enough: accepted at once into the
        files dir; otherwise it waits for `accept`."""
        try:
            offer = Offer.from_text(text)
        except FileProtocolError as exc:
            self.stats["offers_refused"] += 1
            log.warning("ignored a bad file offer from %s: %s", fingerprint(sender_key)[:12], exc)
            return
        if offer.size == 0 and offer.root != root_of([]):
            self.stats["offers_refused"] += 1
            log.warning("ignored an empty file offer with a wrong root")
            return
        self.stats["offers_in"] += 1
        pinned = self.pinned_handle(sender_key)
        handle = pinned or claimed or "unknown"
        directory = self.directory
        accept = (
            pinned is not None
            and offer.size <= self.config.auto_accept_max
            and self._room_for(directory, offer.size)
            and self.store.get(offer.transfer_id) is None  # not the same offer again
            and self._within_quota(sender_key, offer.size)
        )
        if (
            not accept
            and self.store.get(offer.transfer_id) is None
            and (
                self.store.count_pending(sender_key) >= self.config.max_pending_per_peer
                or self.store.count_pending() >= self.config.max_pending
            )
        ):
            self.stats["offers_over_limit"] += 1
            who = fingerprint(sender_key)[:12]
            log.warning("dropped a file offer from %s: too many wait for accept", who)
            return
        now = time.time()
        if not self.store.add(
            direction="in",
            peer_key=sender_key,
            handle=handle,
            offer=offer,
            state="accepted" if accept else "pending",
            now=now,
            directory=str(directory) if accept else "",
            hashes=None,
        ):
            return  # the same offer again
        log.info(
            "file offer %s from %s: %s, %d bytes (%s)",
            offer.transfer_id.hex()[:8],
            handle,
            safe_name(offer.name),
            offer.size,
            "accepted" if accept else "waits for accept",
        )
        self._changed(offer.transfer_id)
        if accept:
            t = self.store.get(offer.transfer_id)
            if t is not None:
                self._spawn(self._send_control, t, F_NUDGE, 0)

    def _within_quota(self, sender_key: bytes, size: int) -> bool:
        """Accepting ``size`` more bytes keeps the last 24 hours within the daily
        quotas, the sender's and everyone's; else counted (the offer waits)."""
        since = time.time() - 86400
        cfg = self.config
        from_peer, from_all = self.store.accepted_bytes_since(since, sender_key)
        if (
            from_peer + size <= cfg.auto_accept_daily_per_peer
            and from_all + size <= cfg.auto_accept_daily
        ):
            return True
        self.stats["offers_over_quota"] += 1
        log.warning("a file offer from %s waits for accept: over today's quota",
                    fingerprint(sender_key)[:12])  # fmt: skip
        return False

    def _room_for(self, directory: Path, size: int) -> bool:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return shutil.disk_usage(directory).free > size + (64 << 20)
        except OSError:
            return False

    async def route_stream(
        self,
        peer: QuicPeer,
        stream: QuicStream,
        delivery: Callable[[QuicPeer, QuicStream, bytes], Awaitable[None]],
    ) -> None:
        """The QUIC endpoint's stream handler: a stream whose first byte is STREAM_MAGIC is
        a file stream; anything else goes to delivery with the bytes already read."""
        try:
            first = await stream.receive_some(65536)
        except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if first[:1] == bytes([STREAM_MAGIC]):
            await self.handle_stream(peer, stream, first)
        else:
            await delivery(peer, stream, first)

    async def handle_stream(self, peer: QuicPeer, stream: QuicStream, first: bytes) -> None:
        key = peer.public_key
        if key is None:
            return
        decoder = FrameDecoder(header=True)
        try:
            async with stream:
                data = first
                for _ in range(16):  # the first frame is 23 bytes at most
                    frames = decoder.feed(data)
                    if frames:
                        break
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                else:
                    raise FileProtocolError("no opening frame")
                if len(frames) != 1 or decoder.pending:
                    raise FileProtocolError("more than the opening frame before an answer")
                kind, tid, reason = parse_opening(*frames[0])
                t = self.store.get(tid)
                if t is not None and t.peer_key != key:
                    t = None  # another peer's transfer: as if unknown
                if kind == F_NUDGE:
                    if t is not None and t.direction == "out":
                        self._start_sender(tid)
                        self._nudge(tid)
                        if self._sending_over.get(tid, peer) is not peer:
                            # A receiver that restarted nudges us from a new connection
                            # while our stream still writes into the old one.
                            self._restarts.add(tid)
                            if (scope := self._scopes.get(tid)) is not None:
                                scope.cancel()
                elif kind == F_CANCEL:
                    if t is not None and t.state not in FINAL:
                        self._cancelled_by_peer(t, reason)
                else:
                    await self._receive(stream, tid, t)
        except FileProtocolError as exc:
            self.stats["streams_refused"] += 1
            log.warning("file stream from %s refused: %s", fingerprint(key)[:12], exc)
            stream.reset()
        except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("file stream from %s broke: %s", fingerprint(key)[:12], exc)

    def _cancelled_by_peer(self, t: Transfer, reason: int) -> None:
        if reason == REASON_UNREADABLE and t.direction == "in":
            log.warning("file %s from %s: the sender cannot read it any more: failed",
                        t.id.hex()[:8], t.handle)  # fmt: skip
            self.store.update(t.id, time.time(), state="failed", error=REASONS[reason])
        else:
            state = "rejected" if reason == REASON_REJECTED else "cancelled"
            # say who: `p2pd files` would show the same "cancelled" whichever side did it
            note = f"cancelled by {t.handle}" if state == "cancelled" else ""
            self.store.update(t.id, time.time(), state=state, error=note)
        scope = self._scopes.get(t.id)
        if scope is not None:
            scope.cancel()
        if t.direction == "in":
            remove_quietly(partial_path(t.directory, t.id))
        self._changed(t.id)

    async def _receive(self, stream: QuicStream, tid: bytes, t: Transfer | None) -> None:
        if t is None or t.direction != "in" or t.state == "pending":
            await stream.send_all(encode_frame(F_WAIT), eof=True)
            return
        if t.state == "done":
            await stream.send_all(encode_frame(F_DONE), eof=True)
            return
        if t.state != "accepted":
            reason = {"rejected": REASON_REJECTED, "cancelled": REASON_CANCELLED}.get(
                t.state, REASON_CORRUPT if t.state == "failed" else REASON_UNKNOWN
            )
            if t.state == "failed" and t.error.startswith(_SAVE_ERRORS):
                reason = REASON_CANNOT_SAVE  # our disk, not their data (was "corrupt")
            await stream.send_all(encode_frame(F_REFUSE, bytes([reason])), eof=True)
            return
        old = self._scopes.pop(tid, None)
        if old is not None:
            old.cancel()  # the sender reconnected: the old stream is dead
        with trio.CancelScope() as scope:
            self._scopes[tid] = scope
            try:
                await self._receive_into(stream, t)
            except OSError as exc:  # our disk: full, over a quota, gone
                error = f"cannot write to {t.directory}: {exc.strerror or exc}"
                log.warning("file %s from %s: %s", t.id.hex()[:8], t.handle, error)
                self.store.update(t.id, time.time(), state="failed", error=error)
                remove_quietly(partial_path(t.directory, t.id))
                self._changed(t.id)
                stream.reset()
            finally:
                if self._scopes.get(tid) is scope:
                    del self._scopes[tid]

    async def _receive_into(self, stream: QuicStream, t: Transfer) -> None:
        partial = partial_path(t.directory, t.id)
        Path(t.directory).mkdir(parents=True, exist_ok=True)
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            written = os.fstat(fd).st_size
            rx = ReceiverStream(t.offer, t.hashes, t.next_group, written_until=written)
            layout = t.offer.layout
            now = time.time()
            self._rates[t.id] = (now, t.bytes_done)
            if not rx.complete:
                await stream.send_all(rx.start())
            while not rx.complete:
                data = await stream.receive_some(1 << 20)
                if not data:
                    return  # the sender stopped: it asks again
                try:
                    result = rx.data_received(data)
                except FileProtocolError as exc:
                    self._refused(t, exc, rx.next_group)
                    stream.reset()
                    return
                for offset, plain in result.writes:
                    os.pwrite(fd, plain, offset)
                    self.stats["bytes_in"] += len(plain)
                if result.hashes is not None:
                    self.store.set_hashes(t.id, result.hashes)
                if result.resent:
                    self.stats["resent_in"] += result.resent
                    self.store.add_counts(t.id, resent=result.resent)
                if result.verified:
                    now = time.time()
                    done = min(layout.size, rx.next_group * layout.group_size)
                    # Recorded (committed) before the ack goes out: what we ack survives.
                    self.store.update(t.id, now, next_group=rx.next_group, bytes_done=done)
                    self._refusals.pop(t.id, None)
                    self.stats["groups_verified"] += len(result.verified)
                    self._progress(t.id, done, now)
                if result.replies:
                    await stream.send_all(result.replies)
        finally:
            os.close(fd)
        await self._finish(stream, t, partial)

    def _refused(self, t: Transfer, exc: FileProtocolError, next_group: int) -> None:
        self.stats["chunks_refused"] += 1
        self.store.add_counts(t.id, refused=1)
        self._refusals[t.id] = refusals = self._refusals.get(t.id, 0) + 1
        log.warning(
            "file %s from %s: refused (%s); asking again from group %d",
            t.id.hex()[:8],
            t.handle,
            exc,
            next_group,
        )
        if refusals >= MAX_REFUSED:
            self.store.update(
                t.id, time.time(), state="failed", error=f"refused {MAX_REFUSED} times: {exc}"
            )
            remove_quietly(partial_path(t.directory, t.id))
            self._changed(t.id)

    async def _finish(self, stream: QuicStream, t: Transfer, partial: Path) -> None:
        """Every group verified: check the whole partial file against the root once
        more (what is on disk, not what went through memory), then link it into place."""
        layout = t.offer.layout
        os.truncate(partial, layout.size)
        ok = await trio.to_thread.run_sync(verify_file, partial, layout, t.offer.root)
        now = time.time()
        if not ok:
            # Something changed the partial file under us (every group matched as it
            # came): start over, MAX_REFUSED times at most. Unbounded, a disk that
            # corrupts what it stores made the file come again and again, forever.
            self._mismatches[t.id] = mismatches = self._mismatches.get(t.id, 0) + 1
            self.store.add_counts(t.id, refused=1)
            remove_quietly(partial)
            if mismatches >= MAX_REFUSED:
                error = f"cannot save: the file on disk did not match {mismatches} times"
                log.warning("file %s from %s: %s", t.id.hex()[:8], t.handle, error)
                self.store.update(t.id, now, state="failed", error=error)
                self._mismatches.pop(t.id, None)
                self._changed(t.id)
            else:
                again = "the file on disk did not match: fetching it again"
                self.store.update(t.id, now, next_group=0, bytes_done=0, error=again)
            stream.reset()
            return
        self._mismatches.pop(t.id, None)
        try:
            final = place_file(partial, Path(t.directory), safe_name(t.offer.name))
        except OSError as exc:
            self.store.update(t.id, now, state="failed", error=f"cannot save: {exc}")
            self._changed(t.id)
            return
        self.store.update(
            t.id, now, state="done", path=str(final), bytes_done=layout.size, error=""
        )
        self._rates.pop(t.id, None)
        log.info("file %s from %s saved to %s", t.id.hex()[:8], t.handle, final)
        self._changed(t.id)
        # Not delivered: it asks again, and is told DONE.
        with contextlib.suppress(
            ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            await stream.send_all(encode_frame(F_DONE), eof=True)

    # ------------------------------------------------------------------ user actions

    async def accept(self, transfer_id: str, directory: str | None = None) -> FileSummary:
        t = self.find(transfer_id)
        if t.direction != "in" or t.state != "pending":
            raise UsageError(
                f"transfer {t.id.hex()[:8]} is {t.direction}going and {t.state}: "
                "only a pending incoming file can be accepted"
            )
        target = Path(directory).expanduser() if directory else self.directory
        if not target.is_absolute():
            raise UsageError(f"{directory!r}: give an absolute directory")
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalError(f"cannot create {target}: {exc.strerror}") from None
        if not os.access(target, os.W_OK):
            raise LocalError(f"{target} is not writable")
        if not self._room_for(target, t.offer.size):
            raise LocalError(f"not enough free space in {target} for {t.offer.size} bytes")
        self.store.update(t.id, time.time(), state="accepted", directory=str(target))
        self._changed(t.id)
        t = self.store.get(t.id) or t
        self._spawn(self._send_control, t, F_NUDGE, 0)
        return self.summary(t)

    async def reject(self, transfer_id: str) -> FileSummary:
        t = self.find(transfer_id)
        if t.direction != "in" or t.state in FINAL:
            raise UsageError(
                f"transfer {t.id.hex()[:8]} cannot be rejected ({t.direction}, {t.state})"
            )
        return await self._give_up(t, "rejected", REASON_REJECTED)

    async def cancel(self, transfer_id: str) -> FileSummary:
        t = self.find(transfer_id)
        if t.state in FINAL:
            raise UsageError(f"transfer {t.id.hex()[:8]} is already {t.state}")
        return await self._give_up(t, "cancelled", REASON_CANCELLED)

    async def _give_up(self, t: Transfer, state: str, reason: int) -> FileSummary:
        self.store.update(t.id, time.time(), state=state)
        scope = self._scopes.get(t.id)
        if scope is not None:
            scope.cancel()
        if t.direction == "out":
            self._nudge(t.id)  # a sender loop waiting out its backoff sees the state now
        if t.direction == "in" and t.directory:
            remove_quietly(partial_path(t.directory, t.id))
        self._changed(t.id)
        self._spawn(self._send_control, t, F_CANCEL, reason)
        t = self.store.get(t.id) or t
        return self.summary(t)

    async def _send_control(self, t: Transfer, kind: int, reason: int) -> None:
        """Best effort: NUDGE (accepted, or back online) or CANCEL on a stream of its
        own. Not delivered, nothing is lost: the sender asks again on its own."""
        try:
            with trio.fail_after(CONNECT_TIMEOUT * 2):
                peer = await self.connect_to(t.peer_key, t.handle)
                if peer is None:
                    return
                stream = await peer.open_stream()
                async with stream:
                    await stream.send_all(control_frames(kind, t.id, reason), eof=True)
        except (
            ConnectionLost,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            LocalError,
            NotFound,
        ) as exc:
            log.info("could not tell %s about file %s: %s", t.handle, t.id.hex()[:8], exc)

    def statistics(self) -> dict[str, int]:
        return {**self.stats, "unreadable_rows": self.store.unreadable_rows}


__all__ = ["FileSummary", "FilesService", "default_download_dir"]
