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
GOALS = {
    "m2e_p95_ms_at_0": 60.0,  # <=
    "pesq_at_0": 4.0,  # >=
    "pesq_at_5": 3.5,  # >=
    "av_cpu_pct_per_side": 50.0,  # <
}
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
