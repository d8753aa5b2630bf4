"""Checking a call's media arguments before anything opens (moved out of call.py)."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import UsageError
from .devices import check_output_spec
from .sinks import check_record_path
from .sources import check_audio_spec, check_video_spec

__all__ = ["check_media_args"]


def check_media_args(
    audio_in: str | None,
    video_in: str | None,
    record: Path | None,
    duration: float | None,
    audio_out: str | None = None,
) -> None:
    """UsageError unless the sources, the output, the recording path and the duration
    would do."""
    if audio_out is not None:
        check_output_spec(audio_out)
    if audio_in is not None:
        check_audio_spec(audio_in)
    if video_in is not None:
        check_video_spec(video_in)
    if record is not None:
        check_record_path(record)
    if duration is not None and not (duration > 0 and math.isfinite(duration)):
        raise UsageError("a call's duration must be a positive number of seconds")
