"""Files: the trio service that sends and receives files (issue 14).

The decisions about bytes are :mod:`p2pd.files.protocol`'s (sans I/O); the service does
the I/O around them and wires the parts:

- offers: :meth:`FilesService.send_file` queues one through delivery's outbox (message
  kind KIND_FILE, so it is end-to-end encrypted, retried, and left in the mailbox of an
  offline recipient); :meth:`FilesService.offer_received` takes one in, within the
  limits (pending offers, daily quotas, free space), accepted at once or waiting;
- accept, reject, cancel, and the NUDGE and CANCEL control streams;
- the routing of file streams: OPEN to :class:`~p2pd.files.incoming.IncomingTransfers`
  (the receiver), NUDGE to :class:`~p2pd.files.outgoing.OutgoingTransfers` (the sender
  loops), CANCEL to the transfer's row;
- the control API's views (:class:`~p2pd.files.views.TransferViews`).

The receiver NUDGEs the sender when it accepts and when it starts with transfers
unfinished.
"""

from __future__ import annotations

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
    StoredDataCorrupt,
    UsageError,
)
from ..identity import HandleRef, Identity, fingerprint
from ..transport.quic import QuicEndpoint, QuicPeer, QuicStream
from .disk import FileSummary, default_download_dir, partial_path, remove_quietly
from .incoming import IncomingTransfers
from .outgoing import CONNECT_TIMEOUT, OutgoingTransfers
from .protocol import (
    F_CANCEL,
    F_NUDGE,
    F_REFUSE,
    MAX_FILE_SIZE,
    REASON_CANCELLED,
    REASON_REJECTED,
    REASON_UNKNOWN,
    REASON_UNREADABLE,
    REASONS,
    STREAM_MAGIC,
    FileProtocolError,
    FrameDecoder,
    Layout,
    Offer,
    control_frames,
    encode_frame,
    hash_file,
    parse_opening,
    root_of,
    safe_name,
)
from .store import FINAL, FileStore, Transfer
from .views import TransferViews

log = logging.getLogger(__name__)


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
        self.quic = quic
        self.connect_to = connect_to
        self.enqueue_offer = enqueue_offer
        self.contact_key = contact_key
        self.pinned_handle = pinned_handle
        self._nursery: trio.Nursery | None = None
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
        self.views = TransferViews(self.store, emit, pinned_handle)
        self.outgoing = OutgoingTransfers(
            config,
            self.store,
            self.views,
            self.stats,
            connect_to=connect_to,
            spawn=self._spawn,
            tell=self._tell,
        )
        self.incoming = IncomingTransfers(self.store, self.views, self.stats)

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
                self.outgoing.start(t.id)
            for t in self.store.active("in"):
                nursery.start_soon(self._send_control, t, F_NUDGE, 0)
            task_status.started()
            await trio.sleep_forever()  # the nursery stays open for senders to come

    def _spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Start ``func(*args)`` in the service's nursery; False if there is none (not
        running yet) or it no longer takes tasks (the daemon is stopping)."""
        if self._nursery is None:
            return False
        try:
            self._nursery.start_soon(func, *args)
        except RuntimeError:  # the daemon is stopping
            return False
        return True

    # ------------------------------------------------------------------ views

    def summary(self, t: Transfer, now: float | None = None) -> FileSummary:
        return self.views.summary(t, now)

    def transfers(self) -> list[FileSummary]:
        now = time.time()
        return [self.views.summary(t, now) for t in self.store.all()]

    def find(self, transfer_id: str) -> Transfer:
        """A transfer by its id or a unique prefix of it (at least 4 hex digits)."""
        tid = transfer_id.strip().lower()
        if len(tid) < 4 or any(c not in "0123456789abcdef" for c in tid):
            raise UsageError("a transfer id is 4 to 32 hex digits (see `p2pd files`)")
        try:
            found = self.store.by_prefix(tid)
        except StoredDataCorrupt as exc:
            raise StoredDataCorrupt(
                f"transfer {transfer_id}: its row does not read ({exc}); it is left as it is"
            ) from None
        if not found:
            raise NotFound(f"no transfer {transfer_id!r} (see `p2pd files`)")
        if len(found) > 1:
            raise UsageError(f"{transfer_id!r} names more than one transfer: give more digits")
        return found[0]

    # ------------------------------------------------------------------ offers

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
        return self.offer(handle, peer_key, offer, str(source), hashes)

    def offer(
        self, handle: str, peer_key: bytes, offer: Offer, path: str, hashes: list[bytes]
    ) -> FileSummary:
        """What :meth:`send_file` does once the file at ``path`` is hashed: the transfer's
        row, the offer queued in the outbox, the sender's loop started."""
        self.store.add(
            direction="out",
            peer_key=peer_key,
            handle=handle,
            offer=offer,
            state="offered",
            now=time.time(),
            path=path,
            hashes=hashes,
        )
        self.enqueue_offer(handle, peer_key, offer.to_text())
        self.views.changed(offer.transfer_id)
        self.outgoing.start(offer.transfer_id)
        t = self.store.get(offer.transfer_id)
        assert t is not None
        return self.summary(t)

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
            and not self.store.exists(offer.transfer_id)  # not the same offer again
            and self._within_quota(sender_key, offer.size)
        )
        if (
            not accept
            and not self.store.exists(offer.transfer_id)
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
            "file offer %s from %s (%s): %s, %d bytes (%s)",
            offer.transfer_id.hex()[:8],
            handle,
            via,
            safe_name(offer.name),
            offer.size,
            "accepted" if accept else "waits for accept",
        )
        self.views.changed(offer.transfer_id)
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
                try:
                    t = self.store.get(tid)
                except StoredDataCorrupt as exc:
                    await self._damaged(stream, kind, tid, exc)
                    return
                if t is not None and t.peer_key != key:
                    t = None  # another peer's transfer: as if unknown
                if kind == F_NUDGE:
                    if t is not None and t.direction == "out":
                        self.outgoing.nudged(tid, peer)
                elif kind == F_CANCEL:
                    if t is not None and t.state not in FINAL:
                        self._cancelled_by_peer(t, reason)
                else:
                    await self.incoming.receive(stream, tid, t)
        except FileProtocolError as exc:
            self.stats["streams_refused"] += 1
            log.warning("file stream from %s refused: %s", fingerprint(key)[:12], exc)
            stream.reset()
        except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("file stream from %s broke: %s", fingerprint(key)[:12], exc)

    async def _damaged(
        self, stream: QuicStream, kind: int, tid: bytes, exc: StoredDataCorrupt
    ) -> None:
        """The row of ``tid`` does not read: it is left as it is (listings skip it and
        count it), and an OPEN is refused as unknown, so that the sender's loop ends
        instead of asking again for a week."""
        log.warning("file %s: its row does not read (%s): left as it is%s", tid.hex()[:8],
                    exc, "" if kind in (F_NUDGE, F_CANCEL) else "; refused as unknown")  # fmt: skip
        if kind not in (F_NUDGE, F_CANCEL):
            await stream.send_all(encode_frame(F_REFUSE, bytes([REASON_UNKNOWN])), eof=True)

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
        self._stop(t)
        if t.direction == "in":
            remove_quietly(partial_path(t.directory, t.id))
        self.views.changed(t.id)

    def _stop(self, t: Transfer) -> None:
        """``t``'s row just became final: its stream, or its sender's loop, stops."""
        if t.direction == "out":
            self.outgoing.stop(t.id)
        else:
            self.incoming.stop(t.id)

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
        self.views.changed(t.id)
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
        self._stop(t)
        if t.direction == "in" and t.directory:
            remove_quietly(partial_path(t.directory, t.id))
        self.views.changed(t.id)
        self._spawn(self._send_control, t, F_CANCEL, reason)
        t = self.store.get(t.id) or t
        return self.summary(t)

    def _tell(self, t: Transfer, kind: int, reason: int) -> None:
        self._spawn(self._send_control, t, kind, reason)

    async def _send_control(self, t: Transfer, kind: int, reason: int) -> None:
        """Best effort: NUDGE (accepted, or back online) or CANCEL on a stream of its
        own. Not delivered, nothing is lost: the sender asks again on its own."""
        try:
            with trio.fail_after(CONNECT_TIMEOUT * 2):
                peer = await self.connect_to(t.peer_key, t.handle)
                if peer is None:
                    log.info("could not tell %s about file %s: not reachable now",
                             t.handle, t.id.hex()[:8])  # fmt: skip
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
        held = self.outgoing.held() + self.incoming.held() + self.views.held()
        return {
            **self.stats,
            "unreadable_rows": self.store.unreadable_rows,
            "transfers_in_memory": held,
        }


__all__ = ["FileSummary", "FilesService", "default_download_dir"]
