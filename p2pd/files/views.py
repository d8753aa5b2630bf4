"""What the control API sees of file transfers: a transfer's summary (with the rate and
ETA of the stream under way), the ``file`` event at every state change and the
``file_progress`` event while bytes flow (at most every PROGRESS_INTERVAL per transfer).

Both directions feed it (:mod:`p2pd.files.outgoing`, :mod:`p2pd.files.incoming`): each
stream says where it started (:meth:`TransferViews.stream_started`), each verified or
acked group how far it got (:meth:`TransferViews.progress`), and the end of a transfer
(done, refused, cancelled, failed) :meth:`TransferViews.forget`, so that a daemon that
runs for months holds nothing for the transfers it finished."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..errors import StoredDataCorrupt
from ..identity import self_certifying
from .disk import FileSummary
from .protocol import safe_name
from .store import FileStore, Transfer

#: Progress events at most this often per transfer.
PROGRESS_INTERVAL = 0.25


class TransferViews:
    """Summaries and events of the transfers in ``store``; ``emit(event, **fields)`` is
    the control API's event bus; ``pinned_handle(key)`` the contact's handle for a key."""

    def __init__(
        self,
        store: FileStore,
        emit: Callable[..., None],
        pinned_handle: Callable[[bytes], str | None],
    ) -> None:
        self.store = store
        self.emit = emit
        self.pinned_handle = pinned_handle
        #: The stream under way: when it started and the bytes done then (its rate).
        self._rates: dict[bytes, tuple[float, int]] = {}
        #: When each transfer's last progress event went out.
        self._last_progress: dict[bytes, float] = {}

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

    def changed(self, transfer_id: bytes) -> None:
        """The transfer's row changed state: the ``file`` event."""
        t = self._get(transfer_id)
        if t is not None:
            self.emit("file", **self.summary(t))

    def stream_started(self, transfer_id: bytes, now: float, bytes_done: int) -> None:
        """A stream of the transfer starts at ``bytes_done``: its rate counts from here."""
        self._rates[transfer_id] = (now, bytes_done)

    def progress(self, transfer_id: bytes, now: float) -> None:
        """Bytes were verified (or acked): a ``file_progress`` event, unless one went out
        for this transfer less than PROGRESS_INTERVAL ago."""
        if now - self._last_progress.get(transfer_id, 0.0) < PROGRESS_INTERVAL:
            return
        self._last_progress[transfer_id] = now
        t = self._get(transfer_id)
        if t is not None:
            s = self.summary(t, now)
            self.emit(
                "file_progress",
                id=s["id"],
                direction=s["direction"],
                bytes_done=s["bytes_done"],
                size=s["size"],
                rate=s["rate"],
                eta=s["eta"],
            )

    def _get(self, transfer_id: bytes) -> Transfer | None:
        try:
            return self.store.get(transfer_id)
        except StoredDataCorrupt:  # damaged under us: nothing to show (listings log it)
            return None

    def forget(self, transfer_id: bytes) -> None:
        """The transfer ended (done, refused, cancelled, failed): nothing more to show
        but its row."""
        self._rates.pop(transfer_id, None)
        self._last_progress.pop(transfer_id, None)

    def held(self) -> int:
        """Entries held in memory for transfers (0 once every transfer ended)."""
        return len(self._rates) + len(self._last_progress)
