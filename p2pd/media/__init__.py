"""Calls: audio and video between two peers over their authenticated QUIC connection.

The parts, sans-I/O first (each testable with no socket and no clock but ``now``):

- :mod:`p2pd.media.wire` — the media datagram format (audio, video fragments, receiver
  reports with an RTT echo, keyframe requests) and video fragmentation;
- :mod:`p2pd.media.jitter` — the adaptive jitter buffer (95th percentile target, as
  WebRTC's NetEq), deciding per 20 ms tick: play, rebuild from FEC, or conceal;
- :mod:`p2pd.media.assembler` — video frames from fragments, keyframe requests on loss;
- :mod:`p2pd.media.stats` — RFC 3550 loss and jitter, RTT from report echoes;

then the codec and file glue (PyAV):

- :mod:`p2pd.media.codecs` — Opus (PyAV encoder; libopus decoder via ctypes for FEC and
  PLC) and VP8;
- :mod:`p2pd.media.sources` — ``tone:FREQ``, ``testsrc``, files, capture devices;
- :mod:`p2pd.media.sinks` — WAV and Matroska/WebM recordings;

and the trio part, :class:`~p2pd.media.call.CallMedia`, one side of a call: it sends,
and wires :mod:`p2pd.media.playout` (what is received, played on a clock of its own).
docs/_media.md describes the format and the measurements behind the choices.
"""

from .call import CallMedia, MediaConfig, MediaPeer
from .wire import MediaWireError

__all__ = ["CallMedia", "MediaConfig", "MediaPeer", "MediaWireError"]
