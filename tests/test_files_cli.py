"""What `send-file`, `files` and `inbox` print about files (cli/render.py): pure
functions of the control API's transfer objects."""

from __future__ import annotations

from typing import Any

from p2pd_cli import render
from p2pd_cli.commands.files import _with_average_rate


def transfer(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": "3fa2c1d0" + "0" * 24,
        "direction": "in",
        "handle": "alice",
        "verified": True,
        "peer": "alice#abc",
        "name": "photo.jpg",
        "size": 2_100_000,
        "media_type": "image/jpeg",
        "state": "done",
        "bytes_done": 2_100_000,
        "progress": 1.0,
        "rate": 0.0,
        "eta": None,
        "path": "/home/bob/Downloads/photo.jpg",
        "directory": "/home/bob/Downloads",
        "resent": 0,
        "refused": 0,
        "error": "",
        "created": 0.0,
        "updated": 0.0,
    }
    row.update(changes)
    return row


def test_sizes_and_etas_for_people() -> None:
    assert render.size_text(0) == "0 B"
    assert render.size_text(999) == "999 B"
    assert render.size_text(2_100_000) == "2.1 MB"
    assert render.size_text(4_300_000_000) == "4.3 GB"
    assert render.eta_text(None) == "-"
    assert render.eta_text(75) == "1:15"
    assert render.eta_text(3 * 3600 + 120) == "3h02m"


def test_inbox_line_per_received_file() -> None:
    assert render.inbox_file_line(transfer()) == (
        "alice sent photo.jpg, 2.1 MB: saved to /home/bob/Downloads/photo.jpg"
    )
    pending = render.inbox_file_line(transfer(state="pending", path=""))
    assert (
        pending
        == "alice sent photo.jpg, 2.1 MB: waiting (p2pd accept 3fa2c1d0, or p2pd reject 3fa2c1d0)"
    )


def test_a_stranger_claiming_a_handle_is_shown_unverified() -> None:
    row = transfer(verified=False, peer="alice#u6cmphjezpfbq3xa", state="pending")
    assert render.inbox_file_line(row).startswith(
        "alice#u6cmphjezpfbq3xa (unverified) sent photo.jpg"
    )


def test_files_lines_show_state_progress_rate_and_where() -> None:
    line = render.file_line(
        transfer(
            direction="out",
            state="sending",
            bytes_done=1_050_000,
            progress=0.5,
            rate=3_000_000.0,
            eta=0.35,
            path="/src",
        )
    )
    assert line.startswith(
        "3fa2c1d0  sending   to alice  photo.jpg  2.1 MB  50%  3.0 MB/s  eta 0:00"
    )
    assert "saved to" in render.file_line(transfer())
    assert "(p2pd accept 3fa2c1d0)" in render.file_line(transfer(state="pending"))
    assert "[refused 8 times" in render.file_line(
        transfer(state="failed", error="refused 8 times: x")
    )
    assert render.files_text([]) == "no file transfers"


def test_progress_line_and_bar() -> None:
    row = transfer(state="sending", bytes_done=525_000, progress=0.25, rate=1_000_000.0, eta=1.6)
    assert render.progress_line(row) == (
        "photo.jpg:  25.0%  525.0 kB of 2.1 MB  1.0 MB/s  eta 0:01  [sending]"
    )
    bar = render.progress_bar(row, width=20)
    assert "[#####---------------]" in bar and "25.0%" in bar


def test_a_finished_transfer_shows_its_average_rate_not_zero() -> None:
    """`send-file --wait`: the daemon's rate is 0 once a transfer is done; the line
    printed after the end shows the average over the time the command watched."""
    seen: dict[str, tuple[float, int]] = {}
    running = transfer(state="sending", bytes_done=0, progress=0.0, rate=0.0)
    assert _with_average_rate(running, 100.0, seen)["rate"] == 0.0  # first look
    done = _with_average_rate(transfer(), 103.0, seen)  # 2.1 MB in 3 s
    assert done["rate"] == 700_000.0
    assert "700.0 kB/s" in render.progress_line(done) and "[done]" in render.progress_line(done)
    moving = transfer(state="sending", bytes_done=1_000_000, rate=123.0)
    assert _with_average_rate(moving, 104.0, seen)["rate"] == 123.0  # the daemon's, as it is
