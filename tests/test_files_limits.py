"""What a receiver lets in before a byte flows (p2pd/files/service.py, ``offer_received``
and ``accept``): the limits that hold across all senders (offers waiting for `accept`,
bytes accepted in a day) and the free-space check against the real file system. The
service is driven directly with offers as delivery would hand them over; no network."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any, cast

import pytest

from p2pd.config import FilesConfig
from p2pd.errors import LocalError
from p2pd.files.protocol import MAX_FILE_SIZE, Layout, Offer, root_of
from p2pd.files.service import FilesService
from p2pd.identity import HandleRef, Identity


def offer(size: int, name: str = "f.bin") -> str:
    """An offer's text; its root is never checked before bytes flow (none do here)."""
    root = root_of([]) if size == 0 else os.urandom(32)
    return Offer(os.urandom(16), os.urandom(32), Layout.for_size(size), root, name).to_text()


def service(tmp_path: Path, pinned: dict[bytes, str], **config: Any) -> FilesService:
    async def contact_key(ref: HandleRef) -> tuple[str, bytes]:
        raise AssertionError("not used")

    async def connect_to(key: bytes, handle: str) -> None:
        raise AssertionError("not used")

    downloads = tmp_path / "downloads"
    return FilesService(
        FilesConfig(dir=str(downloads), **config),
        Identity.generate("bob"),
        sqlite3.connect(":memory:"),
        lambda *args, **kwargs: None,
        quic=cast(Any, None),  # no stream is opened: offers only
        connect_to=connect_to,
        enqueue_offer=lambda handle, key, text: None,
        contact_key=contact_key,
        pinned_handle=pinned.get,
    )


def states(files: FilesService) -> list[tuple[str, str]]:
    return sorted((f["handle"], f["state"]) for f in files.transfers())


def test_offers_waiting_for_accept_are_bounded_in_all_not_only_per_sender(
    tmp_path: Path,
) -> None:
    """max_pending (here 4) holds across strangers each under max_pending_per_peer (3):
    the fifth stranger's offer is dropped and counted; a contact's file under
    auto_accept_max is still accepted (it waits for nobody)."""
    strangers = [os.urandom(32) for _ in range(5)]
    alice = os.urandom(32)
    files = service(tmp_path, {alice: "alice"}, max_pending_per_peer=3, max_pending=4)
    for n, key in enumerate(strangers):
        files.offer_received(key, f"s{n}", offer(10), "direct")
    assert states(files) == [(f"s{n}", "pending") for n in range(4)]
    assert files.stats["offers_over_limit"] == 1
    # per sender too: a second offer from s0 is still under 3, but the total is full
    files.offer_received(strangers[0], "s0", offer(10), "direct")
    assert files.stats["offers_over_limit"] == 2 and len(states(files)) == 4
    files.offer_received(alice, "alice", offer(10), "direct")
    assert ("alice", "accepted") in states(files) and files.stats["offers_over_limit"] == 2


def test_the_daily_quota_of_all_contacts_together_holds(tmp_path: Path) -> None:
    """Two contacts, each well under its own daily quota (10 kB), together over
    everyone's (12 kB): the offer that would pass the total waits for `accept`
    (counted), and the next contact's small one that still fits is accepted."""
    alice, carol = os.urandom(32), os.urandom(32)
    files = service(
        tmp_path,
        {alice: "alice", carol: "carol"},
        auto_accept_daily_per_peer=10_000,
        auto_accept_daily=12_000,
    )
    files.offer_received(alice, "alice", offer(5_000), "direct")
    files.offer_received(carol, "carol", offer(5_000), "direct")
    files.offer_received(alice, "alice", offer(4_000), "direct")  # alice 9 kB, all 14 kB
    assert states(files) == [("alice", "accepted"), ("alice", "pending"), ("carol", "accepted")]
    assert files.stats["offers_over_quota"] == 1
    files.offer_received(carol, "carol", offer(2_000), "direct")  # all 12 kB: fits
    assert states(files).count(("carol", "accepted")) == 2


async def test_a_file_larger_than_the_free_space_is_not_accepted(tmp_path: Path) -> None:
    """The real free space of the downloads directory's file system, not a stub: a
    contact's offer larger than it waits for `accept` even under auto_accept_max, and
    `accept` refuses it with the reason; a small one from the same contact is
    accepted at once."""
    alice = os.urandom(32)
    files = service(tmp_path, {alice: "alice"}, auto_accept_max=MAX_FILE_SIZE,
                    auto_accept_daily_per_peer=MAX_FILE_SIZE,
                    auto_accept_daily=MAX_FILE_SIZE)  # fmt: skip
    free = shutil.disk_usage(tmp_path).free
    too_big = min(MAX_FILE_SIZE, free + (1 << 30))
    assert too_big > free, f"{free} bytes free here: an offer cannot be larger (1 TiB)"
    files.offer_received(alice, "alice", offer(too_big, "huge.img"), "direct")
    files.offer_received(alice, "alice", offer(1000, "small.txt"), "direct")
    rows = {f["name"]: f for f in files.transfers()}
    assert rows["huge.img"]["state"] == "pending" and rows["small.txt"]["state"] == "accepted"
    with pytest.raises(LocalError, match="not enough free space"):
        await files.accept(rows["huge.img"]["id"])
    assert {f["name"]: f["state"] for f in files.transfers()}["huge.img"] == "pending"
    assert list((tmp_path / "downloads").iterdir()) == []  # nothing written for either
