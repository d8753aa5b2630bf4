"""Incoming transfers: the receiver's side of a data stream (docs/PROTOCOL.md, "Files").

An OPEN is answered from the transfer's row: WAIT (no offer yet, or not accepted),
DONE, REFUSE with the reason the row holds, or REQUEST from the first group not yet
verified. Every verified group is recorded (``next_group``, committed) before it is
acked; bytes go only to a partial file in the target directory; once every group is
verified the whole partial file is checked against the root once more, and only then
linked into place under a free name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import trio

from ..errors import ConnectionLost
from ..transport.quic import QuicStream
from .disk import partial_path, remove_quietly
from .protocol import (
    F_DONE,
    F_REFUSE,
    F_WAIT,
    REASON_CANCELLED,
    REASON_CANNOT_SAVE,
    REASON_CORRUPT,
    REASON_REJECTED,
    REASON_UNKNOWN,
    FileProtocolError,
    ReceiverStream,
    encode_frame,
    place_file,
    safe_name,
    verify_file,
)
from .store import FileStore, Transfer
from .views import TransferViews

log = logging.getLogger(__name__)

#: A transfer whose chunks are refused this many times in a row fails.
MAX_REFUSED = 8


class IncomingTransfers:
    """The receiver's streams, one per accepted transfer at a time."""

    def __init__(self, store: FileStore, views: TransferViews, stats: dict[str, int]) -> None:
        self.store = store
        self.views = views
        self.stats = stats
        #: The cancel scope of the stream each transfer is received on.
        self._scopes: dict[bytes, trio.CancelScope] = {}
        #: Refusals since the last verified group.
        self._refusals: dict[bytes, int] = {}
        #: Whole files that verified group by group but not once on disk.
        self._mismatches: dict[bytes, int] = {}

    def stop(self, transfer_id: bytes) -> None:
        """The transfer's row is final (rejected or cancelled, here or by the sender):
        the stream under way stops."""
        scope = self._scopes.get(transfer_id)
        if scope is not None:
            scope.cancel()
        self._forget(transfer_id)

    def _forget(self, transfer_id: bytes) -> None:
        """The transfer ended (done, failed, rejected, cancelled): nothing of it stays in
        memory (its stream's scope goes as the stream ends)."""
        self._refusals.pop(transfer_id, None)
        self._mismatches.pop(transfer_id, None)
        self.views.forget(transfer_id)

    def held(self) -> int:
        """Entries held in memory for transfers (0 once none is received)."""
        return len(self._scopes) + len(self._refusals) + len(self._mismatches)

    async def receive(self, stream: QuicStream, tid: bytes, t: Transfer | None) -> None:
        """Answer the OPEN of ``tid`` (``t`` its row, if the peer that opened the stream
        is its sender) and receive what the sender writes."""
        if t is None or t.direction != "in" or t.state == "pending":
            await stream.send_all(encode_frame(F_WAIT), eof=True)
            return
        if t.state == "done":
            await stream.send_all(encode_frame(F_DONE), eof=True)
            return
        if t.state != "accepted":
            reason = {"rejected": REASON_REJECTED, "cancelled": REASON_CANCELLED}.get(
                t.state, REASON_UNKNOWN
            )
            if t.state == "failed":
                # Recorded when it failed: REASON_CANNOT_SAVE is our disk, not their data.
                # (Chosen from the error's text before, which a reworded message broke.)
                reason = t.refuse_reason or REASON_CORRUPT
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
                self._fail(t, error, REASON_CANNOT_SAVE)
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
            self.views.stream_started(t.id, time.time(), t.bytes_done)
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
                    self.views.progress(t.id, now)
                if result.replies:
                    await stream.send_all(result.replies)
        finally:
            os.close(fd)
        await self._finish(stream, t, partial)

    def _fail(self, t: Transfer, error: str, reason: int) -> None:
        """The transfer fails here: ``reason`` is what the sender's next OPEN is told
        (REASON_CORRUPT: their data; REASON_CANNOT_SAVE: our disk)."""
        self.store.update(t.id, time.time(), state="failed", error=error, refuse_reason=reason)
        remove_quietly(partial_path(t.directory, t.id))
        self._forget(t.id)
        self.views.changed(t.id)

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
            self._fail(t, f"refused {MAX_REFUSED} times: {exc}", REASON_CORRUPT)

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
            if mismatches >= MAX_REFUSED:
                error = f"cannot save: the file on disk did not match {mismatches} times"
                log.warning("file %s from %s: %s", t.id.hex()[:8], t.handle, error)
                self._fail(t, error, REASON_CANNOT_SAVE)
            else:
                remove_quietly(partial)
                again = "the file on disk did not match: fetching it again"
                self.store.update(t.id, now, next_group=0, bytes_done=0, error=again)
            stream.reset()
            return
        try:
            final = place_file(partial, Path(t.directory), safe_name(t.offer.name))
        except OSError as exc:
            self._fail(t, f"cannot save: {exc}", REASON_CANNOT_SAVE)
            return
        self.store.update(
            t.id, now, state="done", path=str(final), bytes_done=layout.size, error=""
        )
        self._forget(t.id)
        log.info("file %s from %s saved to %s", t.id.hex()[:8], t.handle, final)
        self.views.changed(t.id)
        # Not delivered: it asks again, and is told DONE.
        with contextlib.suppress(
            ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            await stream.send_all(encode_frame(F_DONE), eof=True)
