"""The files service's view of the disk and its summaries: where files go, the partial
file's name, and the transfer as the control API shows it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TypedDict

log = logging.getLogger("p2pd.files.service")


class FileSummary(TypedDict):
    id: str
    direction: str
    handle: str
    #: The peer's key is ``handle``'s pinned key (else ``handle`` is only claimed).
    verified: bool
    peer: str
    name: str
    size: int
    media_type: str
    state: str
    bytes_done: int
    progress: float
    rate: float
    eta: float | None
    path: str
    directory: str
    resent: int
    refused: int
    error: str
    created: float
    updated: float


def default_download_dir() -> Path:
    try:
        import platformdirs

        return Path(platformdirs.user_downloads_dir())
    except Exception:  # platformdirs missing or no answer on this platform
        return Path.home() / "Downloads"


def partial_path(directory: str, transfer_id: bytes) -> Path:
    return Path(directory) / f".p2pd-{transfer_id.hex()}.partial"


def remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
