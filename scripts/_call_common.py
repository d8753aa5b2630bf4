"""What scripts/bench_call.py and its parts share: settings, goals, the progress printer."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import progress_printer

from p2pd.media.codecs import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
)
from p2pd.media.wire import Kind

try:
    from pesq import PesqError, pesq
except ImportError:  # reported in main(): the bench extra is not installed
    pesq = None
    PesqError = RuntimeError  # (never raised then: nothing is scored without pesq)

LOCALHOST = "127.0.0.1"
FRAME = FRAME_SAMPLES / SAMPLE_RATE  # 20 ms
PESQ_RATE = 16000
#: PESQ wants samples of several seconds with pauses (P.862.3 section 7.1; application
#: guides say 8-30 s): a recording is scored in chunks of at most this many seconds.
PESQ_CHUNK = 12.0
#: The alignment of a chunk is searched this far either side of where the sequence
#: numbers put it (seconds).
ALIGN_SEARCH = 0.5
#: Connecting, opening sources and closing may take this long on top of a call.
CALL_SLACK = 30.0
ESPEAK_TIMEOUT = 60.0
LOSSES = (0.0, 0.05, 0.10)
#: Audio datagrams: plain, and with a redundant copy of the previous packet.
AUDIO_KINDS = (Kind.AUDIO, Kind.AUDIO_RED)
#: Issue 15's goals, each graded on the workload it names: (comparison, limit).
GOALS = {
    # Speech at 0 % loss: the call within 0.1 PESQ of the same chunks through the codec
    # alone (mean of the per-chunk differences), and every chunk >= 3.9.
    "pesq_gap_at_0": ("<=", 0.1),
    "pesq_min_chunk_at_0": (">=", 3.9),
    "pesq_at_5": (">=", 3.9),
    "pesq_at_10": (">=", 3.5),
    # Mouth-to-ear on the clean path (0 % loss, loopback).
    "m2e_p95_ms_at_0": ("<=", 45.0),
    # One side of an audio + video call, measured in a process of its own.
    "av_cpu_pct_per_side": ("<", 50.0),
    # Video frames that play through loss.
    "video_played_pct_at_5": (">=", 95.0),
    "video_played_pct_at_10": (">=", 85.0),
}


def grade(name: str, value: float | None) -> dict[str, object]:
    """``{"value", "goal", "ok"}`` for goal ``name`` (no value: not met)."""
    op, limit = GOALS[name]
    if value is None:
        ok = False
    elif op == "<=":
        ok = value <= limit
    elif op == "<":
        ok = value < limit
    else:
        ok = value >= limit
    return {"value": value, "goal": f"{op} {limit:g}", "ok": ok}


#: IEEE Recommended Practice for Speech Quality Measurements (1969), list 1.
HARVARD = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
)
VOICES = {"alice": "en-us", "bob": "en-us+f3"}

log = logging.getLogger("bench_call")

progress = progress_printer("bench_call")


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"
