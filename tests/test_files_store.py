"""The file_transfers table (p2pd/files/store.py) as the receiver answers from it: a
failed incoming transfer refuses its sender with the reason recorded when it failed
(not one guessed from the error's wording); a table from before that column gets it,
once, from the error text; a damaged reason is a clear error, not a crash. The
receiver is driven with the sender's opening frame on an in-memory stream; no network."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from p2pd.config import FilesConfig
from p2pd.errors import StoredDataCorrupt
from p2pd.files.protocol import (
    F_OPEN,
    F_REFUSE,
    REASON_CANNOT_SAVE,
    REASON_CORRUPT,
    REASON_UNKNOWN,
    STREAM_HEADER,
    Layout,
    Offer,
    encode_frame,
    root_of,
)
from p2pd.files.service import FilesService
from p2pd.files.store import FileStore
from p2pd.identity import HandleRef, Identity

ALICE = Identity.generate("alice")

#: file_transfers as versions before ``refuse_reason`` created it.
OLD_SCHEMA = """
CREATE TABLE file_transfers (
    id BLOB PRIMARY KEY,
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    peer_key BLOB NOT NULL, handle TEXT NOT NULL, offer BLOB NOT NULL,
    state TEXT NOT NULL, path TEXT NOT NULL DEFAULT '',
    directory TEXT NOT NULL DEFAULT '', next_group INTEGER NOT NULL DEFAULT 0,
    hashes BLOB, bytes_done INTEGER NOT NULL DEFAULT 0,
    resent INTEGER NOT NULL DEFAULT 0, refused INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '', created REAL NOT NULL, updated REAL NOT NULL);
"""


def new_offer(name: str = "f.bin") -> Offer:
    return Offer(os.urandom(16), os.urandom(32), Layout.for_size(0), root_of([]), name)


class Peer:
    """What handle_stream reads of a QUIC connection."""

    def __init__(self, key: bytes) -> None:
        self.public_key = key


class Stream:
    """A QUIC stream as handle_stream uses it: the sender's bytes in, our answer out."""

    def __init__(self, incoming: bytes) -> None:
        self.incoming = [incoming]
        self.sent = b""
        self.eof = False
        self.was_reset = False

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        return self.incoming.pop(0) if self.incoming else b""

    async def send_all(self, data: bytes, eof: bool = False) -> None:
        self.sent += data
        self.eof = self.eof or eof

    def reset(self, code: int = 0) -> None:
        self.was_reset = True


def service(tmp_path: Path, conn: sqlite3.Connection) -> FilesService:
    async def contact_key(ref: HandleRef) -> tuple[str, bytes]:
        raise AssertionError("not used")

    async def connect_to(key: bytes, handle: str) -> None:
        return None  # alice is not reachable: nothing is sent but the answers

    return FilesService(
        FilesConfig(dir=str(tmp_path / "downloads")),
        Identity.generate("bob"),
        conn,
        lambda *args, **kwargs: None,
        quic=cast(Any, None),
        connect_to=connect_to,
        enqueue_offer=lambda handle, key, text: None,
        contact_key=contact_key,
        pinned_handle=lambda key: "alice" if key == ALICE.public_key else None,
    )


def failed_from_alice(store: FileStore, error: str, reason: int | None) -> Offer:
    offer = new_offer()
    now = time.time()
    store.add(direction="in", peer_key=ALICE.public_key, handle="alice", offer=offer,
              state="accepted", now=now, directory="/nowhere")  # fmt: skip
    store.update(offer.transfer_id, now, state="failed", error=error, refuse_reason=reason)
    return offer


async def answer_to_open(files: FilesService, transfer_id: bytes) -> Stream:
    """What bob writes back when alice opens a data stream for ``transfer_id``."""
    stream = Stream(STREAM_HEADER + encode_frame(F_OPEN, transfer_id))
    with trio.fail_after(5):
        await files.handle_stream(cast(Any, Peer(ALICE.public_key)), cast(Any, stream), b"")
    return stream


async def test_a_failed_transfer_refuses_its_sender_with_the_reason_it_failed_for(
    tmp_path: Path,
) -> None:
    """The sender is told "the receiver cannot save it" (6) or "corrupt" (4) as recorded
    when the transfer failed, whatever its error says (the error is for people: a
    reworded one told a sender whose data was fine that it was corrupt)."""
    files = service(tmp_path, sqlite3.connect(":memory:"))
    disk = failed_from_alice(files.store, "no room left on the device", REASON_CANNOT_SAVE)
    data = failed_from_alice(files.store, "cannot save: group 3 was forged", REASON_CORRUPT)
    for offer, reason in ((disk, REASON_CANNOT_SAVE), (data, REASON_CORRUPT)):
        stream = await answer_to_open(files, offer.transfer_id)
        assert stream.sent == encode_frame(F_REFUSE, bytes([reason])) and stream.eof


def test_an_older_table_gets_the_reason_from_its_errors_once(tmp_path: Path) -> None:
    """A database from before the column: failed incoming rows get the reason the
    daemon chose then from their error's start; other rows none; opening it again
    changes nothing."""
    path = tmp_path / "p2pd.db"
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA)
    rows = {
        ("in", "failed", "cannot write to /media/usb: No space left on device"): 6,
        ("in", "failed", "cannot save: [Errno 13] Permission denied"): 6,
        ("in", "failed", "refused 8 times: the group does not match its hash"): 4,
        ("in", "done", ""): None,
        ("out", "failed", "cannot save: not ours"): None,
    }
    ids = {}
    for direction, state, error in rows:
        offer = new_offer()
        ids[(direction, state, error)] = offer.transfer_id
        conn.execute(
            "INSERT INTO file_transfers (id, direction, peer_key, handle, offer, state, "
            "error, created, updated) VALUES (?,?,?,?,?,?,?,?,?)",
            (offer.transfer_id, direction, ALICE.public_key, "alice", offer.encode(), state,
             error, 1.0, 1.0),
        )  # fmt: skip
    conn.commit()
    for _ in range(2):  # the daemon started on it twice
        store = FileStore(sqlite3.connect(path))
        for row, reason in rows.items():
            got = store.get(ids[row])
            assert got is not None and got.refuse_reason == reason, (row, got)
        assert store.unreadable_rows == 0 and len(store.all()) == len(rows)


async def test_a_damaged_reason_is_a_clear_error_and_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A value in the column that no version writes (a number no reason has, text, a
    float): the row is skipped by listings, counted and logged with what is wrong;
    `p2pd file ID` says so; the sender's OPEN is refused as unknown (its loop ends),
    and the row is left as it is."""
    conn = sqlite3.connect(":memory:")
    files = service(tmp_path, conn)
    good = failed_from_alice(files.store, "cannot write to /x: No space", REASON_CANNOT_SAVE)
    damaged = {}
    for value in (99, "six", 6.5):
        offer = failed_from_alice(files.store, "cannot write to /x: No space", None)
        conn.execute(
            "UPDATE file_transfers SET refuse_reason=? WHERE id=?", (value, offer.transfer_id)
        )
        damaged[offer.transfer_id] = value
    conn.commit()
    with caplog.at_level(logging.WARNING, logger="p2pd.files"):
        listed = files.transfers()
    listing_log = caplog.text
    assert [f["id"] for f in listed] == [good.transfer_id.hex()]
    assert files.statistics()["unreadable_rows"] == 3
    for tid, value in damaged.items():
        assert f"refuse_reason {value!r} is not a reason this version knows" in listing_log
        with pytest.raises(StoredDataCorrupt, match="not a reason this version knows"):
            files.find(tid.hex())
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="p2pd.files"):
            stream = await answer_to_open(files, tid)
        assert stream.sent == encode_frame(F_REFUSE, bytes([REASON_UNKNOWN]))
        assert "its row does not read" in caplog.text and tid.hex()[:8] in caplog.text
        (stored,) = conn.execute(
            "SELECT refuse_reason FROM file_transfers WHERE id=?", (tid,)
        ).fetchone()
        assert stored == value
