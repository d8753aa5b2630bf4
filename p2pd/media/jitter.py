"""The adaptive jitter buffer for audio: sans-I/O, every method takes the ``now`` you pass.

Packets go in with :meth:`JitterBuffer.push` as they arrive; once per 20 ms tick
:meth:`JitterBuffer.pop` says what to play: a packet (``FRAME``), the in-band FEC carried
by the *next* packet for a missing one (``FEC``), or nothing (``CONCEAL``: ask the decoder
for packet loss concealment).

Target delay, as WebRTC's NetEq aims at it: each packet's *relative delay* is how much
later than the fastest packet of the recent window it arrived, measured against its
timestamp (``transit = arrival - timestamp / rate``, ``delay = transit - min(transit)``).
The target is the 95th percentile of that delay over a sliding window (250 packets,
5 s), at least ``min_delay`` (and ``start_delay`` for the first ``warmup`` packets),
plus one frame while packets are being lost (so that the next packet, which carries the
lost one's FEC or copy, is usually there in time), at most ``max_delay``.

Playout is driven by time, not by how full the buffer is: a frame with timestamp ``ts`` is
*due* once ``now >= ts / rate + min(transit) + target``. Playout starts at the first tick
at which a frame is due; if that is two frames or more after the first frame fell due,
with the newest frame due then: frames that fell due while nobody asked (a speaker whose
device starts late) go unplayed, counted as ``start_skipped``, rather than being played
late and caught up on later. Each tick:

- if the next frame is not due yet, the tick is filled by concealment and the playout
  point does not move (NetEq's "expand": the delay grows by one frame);
- if it is two frames or more overdue (the target fell, or a burst arrived) and the
  frame after it is here too, it is dropped unplayed (NetEq's "accelerate", done
  crudely: the delay shrinks by one frame);
- both of these shift the timeline, which in speech is a hitch, so they wait (at most
  ``max_defer`` ticks) for the caller to say the last frame played was quiet, as NetEq
  prefers low-energy frames for them; meanwhile a frame that is here is played;
  overdue by more than ``max_delay`` plus a second (a blackout), playout jumps straight
  to the oldest packet it holds;
- otherwise the next frame is played if it is here, rebuilt from the next packet's FEC if
  that one is here, else concealed; a frame that is due with nothing newer in the buffer
  is, in a pause, concealed *without* moving on, so a late packet is still played when
  it comes (unless packets are being lost and the next one is overdue too: then it is
  taken as lost, rather than stretching the timeline for every two losses in a row); in
  speech it is concealed as lost and playout moves on (``late_in_speech_lost``): a
  frame inserted into speech is a hitch that costs more than a lost frame concealed.

Redundant copies (RFC 2198's idea: a datagram also carries the previous frame's Opus
packet) go in with :meth:`JitterBuffer.push_redundant`. A copy fills the hole of a frame
whose own packet has not arrived and is played as ``REDUNDANT``, decoded like the frame
itself; its arrival time says nothing about the network's delay (it rides a frame
later by design) and is left out of the statistics. A frame played from a copy counts as
lost for the FEC headroom: the copy needs that extra frame of delay as much as FEC does.

When to tick: :meth:`JitterBuffer.next_due` says when the next frame becomes due, and
:func:`align_tick` moves a receiver's 20 ms playout clock to just after that moment
rather than leaving it wherever the sender's capture clock happens to be, which would
add a wait of up to a frame (half a frame on average) on top of the target delay.

Sequence numbers and timestamps are 32-bit on the wire and extended here as in RFC 3550
appendix A.1, so wrapping is invisible to the rest of the code.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError

__all__ = ["JitterBuffer", "JitterConfig", "Playout", "PlayoutKind", "align_tick", "extend"]

_HALF = 1 << 31
_MOD = 1 << 32


def extend(value: int, reference: int | None) -> int:
    """``value`` (mod 2**32) as the integer nearest to ``reference`` (an extended value),
    the RFC 3550 appendix A.1 rule."""
    if reference is None:
        return value
    delta = (value - reference) % _MOD
    if delta >= _HALF:
        delta -= _MOD
    return reference + delta


@dataclass(frozen=True)
class JitterConfig:
    """Tuning of :class:`JitterBuffer`. Times in seconds."""

    #: Samples per frame and per second: 20 ms of 48 kHz audio.
    frame_samples: int = 960
    clock_rate: int = 48000
    #: The target delay is clamped to this range.
    min_delay: float = 0.020
    max_delay: float = 0.200
    #: Which percentile of the relative delay to aim at (NetEq: 0.95).
    quantile: float = 0.95
    #: Packets whose delays make up the sliding window (250 = 5 s of 20 ms frames).
    window: int = 250
    #: While a frame was lost among the last ``window`` played, hold one frame more.
    fec_headroom: bool = True
    #: Until ``warmup`` packets have arrived the target is at least ``start_delay``: a
    #: percentile of a handful of delays is a guess, and a target that grows later
    #: means a stretch (a frame inserted), one that shrinks only a catch-up in a pause.
    start_delay: float = 0.0
    warmup: int = 0
    #: Packets held at most; beyond that the oldest go.
    capacity: int = 64
    #: Stretching (a frame of concealment inserted) and accelerating (a frame dropped)
    #: wait for a quiet frame (``pop(quiet=True)``) at most this many ticks (50 = 1 s).
    max_defer: int = 50
    #: A frame that is due and not here, with nothing newer (late, not known lost), in
    #: speech (``pop(quiet=False)``): conceal it and move on, as if lost, rather than
    #: wait for it, which inserts a frame into the timeline. Measured with wideband
    #: PESQ on 11 s of espeak-ng speech through Opus alone (48 kbit/s), the same 4 frames
    #: in speech either inserted or lost and concealed, 6 draws: inserted 3.12 / 3.35,
    #: lost 3.45 / 3.98 (two voices; none 3.97 / 4.28); and in 0 %-loss calls of
    #: scripts/bench_call.py, taking the frames underruns had inserted back out of the
    #: recordings raised their PESQ by 0.2-0.6. In a pause the buffer still waits:
    #: there, an inserted frame is silence.
    late_in_speech_lost: bool = True
    #: Delay peaks that recur are worth a frame of delay (NetEq's peak detector): once
    #: ``peak_repeats`` late frames (those within ``peak_merge`` s of each other count
    #: as one) came within ``peak_hold`` s, the target holds one frame more for
    #: ``peak_hold`` s after the last. The buffer grows by it in a pause (a stretch
    #: there is silence), and the next peak of up to a frame finds it there. One peak
    #: alone is not worth it: a frame held for seconds doubles a clean path's delay.
    peak_repeats: int = 2
    peak_merge: float = 0.5
    peak_hold: float = 10.0
    #: Hold the peak's height (how late its frames came, plus ``peak_margin``, at most a
    #: frame) rather than a whole frame: with the playout clock aligned to due frames
    #: (``align_tick``) a target can be any fraction of a frame, and a frame held for
    #: a 3 ms peak is 17 ms of delay for nothing for ``peak_hold`` seconds.
    peak_height: bool = False
    peak_margin: float = 0.002

    def __post_init__(self) -> None:
        if self.frame_samples <= 0 or self.clock_rate <= 0:
            raise UsageError("frame_samples and clock_rate must be positive")
        if not 0 <= self.min_delay <= self.max_delay:
            raise UsageError("need 0 <= min_delay <= max_delay")
        if not 0 < self.quantile <= 1:
            raise UsageError("quantile must be in (0, 1]")
        if self.window < 1 or self.capacity < 2:
            raise UsageError("window must be >= 1 and capacity >= 2")
        if self.max_defer < 0:
            raise UsageError("max_defer must be >= 0")
        if self.start_delay < 0 or self.warmup < 0:
            raise UsageError("start_delay and warmup must be >= 0")

    @property
    def frame_duration(self) -> float:
        return self.frame_samples / self.clock_rate


class PlayoutKind(enum.Enum):
    """What one tick plays."""

    #: Decode ``payload``, the packet for this frame.
    FRAME = "frame"
    #: This frame is missing; decode the in-band FEC of ``payload``, the *next* packet.
    FEC = "fec"
    #: Nothing to decode: ask the decoder for packet loss concealment.
    CONCEAL = "conceal"
    #: This frame's packet is missing; decode ``payload``, its redundant copy from a
    #: later datagram (the same bytes the lost packet carried).
    REDUNDANT = "redundant"


@dataclass(frozen=True, slots=True)
class Playout:
    """One tick's decision. ``seq`` is the (extended) frame it stands for; ``None`` for a
    concealed tick that stands for no frame (an underrun or a stretch: the timeline
    grows by one frame)."""

    kind: PlayoutKind
    seq: int | None
    payload: bytes | None = None
    #: A concealed tick for a frame that is due and not here, with nothing newer: it
    #: may still come (not: a stretch because the target grew).
    underrun: bool = False


@dataclass
class _Stats:
    received: int = 0
    late: int = 0
    duplicates: int = 0
    overflow: int = 0
    played: int = 0
    fec: int = 0
    concealed: int = 0
    expanded: int = 0
    dropped: int = 0
    resyncs: int = 0
    resets: int = 0
    redundant_filled: int = 0
    redundant: int = 0
    deferred: int = 0
    late_concealed: int = 0
    peaks_held: int = 0
    start_skipped: int = 0


@dataclass
class JitterBuffer:
    """Audio packets in, one playout decision per tick out. See the module docstring."""

    config: JitterConfig = field(default_factory=JitterConfig)

    def __post_init__(self) -> None:
        self._stats = _Stats()
        self._reset()

    def _reset(self) -> None:
        #: extended seq -> (extended timestamp, payload, from a redundant copy)
        self._packets: dict[int, tuple[int, bytes, bool]] = {}
        self._highest_seq: int | None = None
        self._highest_ts: int | None = None
        self._transits: deque[float] = deque(maxlen=self.config.window)
        self._min_transit = 0.0
        self._quantile_delay = 0.0
        self._losses: deque[bool] = deque(maxlen=self.config.window)
        self._next_seq: int | None = None
        self._next_ts = 0
        self._started = False
        self._deferred = 0
        #: When late frames (peaks) were seen, merged; until when the target holds one
        #: frame more for them; the ``now`` of the last pop.
        self._peaks: deque[float] = deque(maxlen=max(1, self.config.peak_repeats))
        self._last_late = -1e18
        self._peak_until = -1e18
        #: (time, how late) of the late frames of the last ``peak_hold`` seconds.
        self._lateness: deque[tuple[float, float]] = deque()
        self._now = -1e18
        #: The frame the last underrun waited for.
        self._waiting_for: int | None = None

    # ---- input

    def push(
        self, seq: int, timestamp: int, payload: bytes, now: float, *, start: bool = False
    ) -> None:
        """One packet arrived at ``now``. ``seq`` and ``timestamp`` as on the wire (32-bit);
        ``start`` (the sender's first packet) resets the buffer if it holds another stream."""
        if (
            start
            and self._highest_seq is not None
            and abs(extend(seq, self._highest_seq) - self._highest_seq) > self.config.capacity
        ):
            # A new stream (the peer restarted its media), not a reordered first packet.
            self._stats.resets += 1
            self._reset()
        stats = self._stats
        ext_seq = extend(seq, self._highest_seq)
        ext_ts = extend(timestamp, self._highest_ts)
        held = self._packets.get(ext_seq)
        if held is not None and not held[2]:
            stats.duplicates += 1
            return
        # Late packets count for the delay statistics too: they are what the target
        # must grow for (NetEq updates its delay histogram on every arrival).
        self._observe(now - ext_ts / self.config.clock_rate)
        if self._started and self._next_seq is not None and ext_seq < self._next_seq:
            stats.late += 1
            self._late_frame(now, ext_ts)
            return
        if ext_seq == self._waiting_for:
            self._late_frame(now, ext_ts)  # the frame an underrun waited for
            self._waiting_for = None
        stats.received += 1
        if held is not None:
            # Its redundant copy came first (reordering): same bytes, now the packet's own.
            stats.redundant_filled -= 1
        if self._highest_seq is None or ext_seq > self._highest_seq:
            self._highest_seq = ext_seq
            self._highest_ts = ext_ts
        self._insert(ext_seq, ext_ts, payload, redundant=False)

    def push_redundant(self, seq: int, timestamp: int, payload: bytes) -> None:
        """A redundant copy of frame ``seq`` (32-bit, as on the wire) arrived, inside a
        later packet that was pushed first. It fills that frame's hole if the frame is
        neither here nor played yet; otherwise it is not needed and goes."""
        if self._highest_seq is None:
            return
        ext_seq = extend(seq, self._highest_seq)
        ext_ts = extend(timestamp, self._highest_ts)
        if ext_seq in self._packets or ext_seq > self._highest_seq:
            return
        if self._next_seq is not None and self._started and ext_seq < self._next_seq:
            return  # played (concealed) already
        if self._highest_seq - ext_seq >= self.config.capacity:
            return  # further back than the buffer holds
        self._stats.redundant_filled += 1
        self._insert(ext_seq, ext_ts, payload, redundant=True)

    def _insert(self, ext_seq: int, ext_ts: int, payload: bytes, *, redundant: bool) -> None:
        stats = self._stats
        self._packets[ext_seq] = (ext_ts, payload, redundant)
        if self._next_seq is None or (not self._started and ext_seq < self._next_seq):
            self._next_seq, self._next_ts = ext_seq, ext_ts
        while len(self._packets) > self.config.capacity:
            oldest = min(self._packets)
            del self._packets[oldest]
            stats.overflow += 1
            if self._next_seq is not None and self._next_seq <= oldest:
                skipped = oldest + 1 - self._next_seq
                self._next_seq = oldest + 1
                self._next_ts += skipped * self.config.frame_samples

    def _observe(self, transit: float) -> None:
        transits = self._transits
        transits.append(transit)
        ordered = sorted(transits)
        self._min_transit = ordered[0]
        rank = min(len(ordered) - 1, int(self.config.quantile * len(ordered)))
        self._quantile_delay = ordered[rank] - ordered[0]

    # ---- output

    @property
    def target_delay(self) -> float:
        """The delay playout aims at now, in seconds."""
        c = self.config
        target = max(self._quantile_delay, c.min_delay)
        if c.fec_headroom and any(self._losses):
            target += c.frame_duration
        if self._now < self._peak_until:
            target += self._peak_extra()
        if len(self._transits) < c.warmup:
            # A floor on the whole: losses that start while warming up find the delay
            # their headroom needs already there, and nothing is stretched for it.
            target = max(target, c.start_delay)
        return min(target, c.max_delay)

    @property
    def started(self) -> bool:
        """True once the first frame was played."""
        return self._started

    def next_due(self) -> float | None:
        """When (on the clock of ``now``) the next frame to play becomes due, with the
        target delay as it is now; None before the first packet."""
        if self._next_seq is None:
            return None
        held = self._packets.get(self._next_seq)
        ts = held[0] if held is not None else self._next_ts
        # + 1 µs: pop() compares in samples, and a float rounding must not make the
        # frame not quite due at the moment this returns.
        return ts / self.config.clock_rate + self._min_transit + self.target_delay + 1e-6

    def pop(self, now: float, *, quiet: bool = True) -> Playout | None:
        """What to play for the tick at ``now``; ``None`` until the first frame is due
        (nothing was received yet, or the first packet waits for the target delay).

        ``quiet``: the frame played last was quiet (a pause in speech). Only then does
        the buffer stretch (while the next frame is here, only not due yet) or drop a
        frame to catch up; otherwise it plays on and waits for a pause, at most
        ``max_defer`` ticks. Either one shifts the timeline by a frame: in a pause that
        goes unheard, in speech it is a hitch (codec-only trials with the PESQ of
        scripts/bench_call.py: a frame dropped in a pause cost nothing, one inserted in
        speech 0.1-0.5). A frame that is due and not here is concealed whatever
        ``quiet`` says: there is nothing else to play."""
        next_seq = self._next_seq
        if next_seq is None:
            return None
        self._now = now
        c = self.config
        frame = c.frame_samples
        due_ts = (now - self._min_transit - self.target_delay) * c.clock_rate
        held = self._packets.get(next_seq)
        ts = held[0] if held is not None else self._next_ts
        if not self._started:
            if ts > due_ts:
                return None
            self._started = True
            started_at = self._start_late(due_ts)
            if started_at is not None:
                next_seq = started_at
                held = self._packets.get(next_seq)
                ts = self._next_ts
        stats = self._stats
        may_shift = quiet or self._deferred >= c.max_defer
        if ts > due_ts:
            playable = held is not None or (
                self._highest_seq is not None and self._highest_seq > next_seq
            )
            if not playable or may_shift:
                self._deferred = 0
                stats.expanded += 1
                return Playout(PlayoutKind.CONCEAL, None)
            # Not due (the target grew), but here, or known lost with newer packets here
            # (a copy, FEC or concealment can stand for it now): play on, stretch in a
            # pause.
            self._deferred += 1
            stats.deferred += 1
        resynced = self._resync() if due_ts - ts > (c.max_delay + 1.0) * c.clock_rate else None
        overdue = due_ts - ts >= 2 * frame and next_seq + 1 in self._packets
        if overdue and not may_shift:
            self._deferred += 1
            stats.deferred += 1
        elif ts <= due_ts and not overdue:
            self._deferred = 0
        if resynced is not None:
            next_seq = resynced
            held = self._packets.get(next_seq)
            ts = self._next_ts
        elif overdue and may_shift:
            self._deferred = 0
            # Accelerate: one frame goes unplayed, but only when the one after it is here
            # (dropping the last frame held would only make an underrun). The decoder
            # never sees it; Opus copes as with a loss it was not told about.
            self._packets.pop(next_seq, None)
            stats.dropped += 1
            next_seq = self._advance(next_seq, ts)
            held = self._packets.get(next_seq)
            ts = held[0] if held is not None else self._next_ts
        if held is not None:
            del self._packets[next_seq]
            self._advance(next_seq, ts)
            if held[2]:
                self._losses.append(True)  # its own packet was lost: keep the headroom
                stats.redundant += 1
                return Playout(PlayoutKind.REDUNDANT, next_seq, held[1])
            self._losses.append(False)
            stats.played += 1
            return Playout(PlayoutKind.FRAME, next_seq, held[1])
        following = self._packets.get(next_seq + 1)
        if following is not None:
            self._advance(next_seq, ts)
            self._losses.append(True)
            stats.fec += 1
            return Playout(PlayoutKind.FEC, next_seq, following[1])
        newer = self._highest_seq is not None and self._highest_seq > next_seq
        if not newer and not quiet and c.late_in_speech_lost:
            # Late in speech: conceal it as lost and keep the timeline (the config's
            # comment says why). It is dropped as late if it comes; its delay still
            # counts (push), so a lasting rise of the delay raises the target, and the
            # buffer then grows in a pause.
            self._advance(next_seq, ts)
            stats.late_concealed += 1
            return Playout(PlayoutKind.CONCEAL, next_seq)
        # While packets are being lost, the next one is given its own 95th percentile
        # delay to show up; when it has not either, both are more likely lost than
        # late (the loss rate is well over 5%), so this frame counts as lost: conceal and
        # move on, the next tick gets the one after from a copy or FEC. Waiting instead
        # would stretch the timeline by a frame for every two losses in a row.
        next_overdue = (now - self._min_transit - self._quantile_delay) * c.clock_rate >= ts + frame
        if newer or (c.fec_headroom and any(self._losses) and next_overdue):
            # Newer packets are here, this one is not: lost (or too late to wait for).
            self._advance(next_seq, ts)
            self._losses.append(True)
            stats.concealed += 1
            return Playout(PlayoutKind.CONCEAL, next_seq)
        # Nothing newer either: an underrun. Conceal, but wait for this frame.
        stats.expanded += 1
        self._waiting_for = next_seq
        return Playout(PlayoutKind.CONCEAL, None, underrun=True)

    def _peak_extra(self) -> float:
        c = self.config
        if not c.peak_height:
            return c.frame_duration
        height = max((late for _, late in self._lateness), default=c.frame_duration)
        return min(c.frame_duration, height + c.peak_margin)

    def _late_frame(self, now: float, ext_ts: int) -> None:
        """A packet came after its frame was due (played late after an underrun, or
        concealed already): note the peak (see ``peak_repeats``). A lost packet never
        comes, so loss alone holds no frame here (the FEC headroom is for loss)."""
        c = self.config
        # How late it came: after the moment it was due with the target as it is now
        # (without the hold it may already have), at least 0, at most a frame.
        held = self._peak_extra() if self._now < self._peak_until else 0.0
        due = ext_ts / c.clock_rate + self._min_transit + self.target_delay - held
        late = min(c.frame_duration, max(0.0, now - due))
        while self._lateness and (
            self._lateness[0][0] < now - c.peak_hold or len(self._lateness) >= c.capacity
        ):
            self._lateness.popleft()
        self._lateness.append((now, late))
        if now - self._last_late > c.peak_merge:
            self._peaks.append(now)
        self._last_late = now
        if (
            len(self._peaks) >= c.peak_repeats > 0
            and self._peaks[-1] - self._peaks[0] < c.peak_hold
        ):
            if self._peak_until < now:
                self._stats.peaks_held += 1
            self._peak_until = now + c.peak_hold

    def _start_late(self, due_ts: float) -> int | None:
        """Playout starts (its first pop) two frames or more behind, with frames that fell
        due while nobody asked: start with the newest of them and let the older ones go,
        unplayed. Nothing was
        played yet, so this is the same as a later start, not a hitch; played, and
        caught up on later by dropping frames, they would cost a frame of the timeline
        each, in speech's quiet frames too. A speaker whose device starts late does
        this: measured through PulseAudio 16 (ALSA's pulse plugin, a null sink), the
        first write to a fresh stream blocked 0.7 s while 26-36 packets came in, and
        the accelerate step dropped them one by one over the next 3 s. Returns the
        frame playout now starts with, or None if it did not move."""
        if due_ts - self._next_ts < 2 * self.config.frame_samples:
            return None  # no later than the accelerate step allows mid-call
        newest = max(
            (seq for seq, held in self._packets.items() if held[0] <= due_ts), default=None
        )
        if newest is None or self._next_seq is None or newest <= self._next_seq:
            return None
        for seq in [s for s in self._packets if s < newest]:
            del self._packets[seq]
        self._stats.start_skipped += newest - self._next_seq
        self._next_seq = newest
        self._next_ts = self._packets[newest][0]
        return newest

    def _advance(self, seq: int, ts: int) -> int:
        """Move playout past frame ``seq`` (timestamp ``ts``); returns the next seq."""
        self._next_seq = seq + 1
        self._next_ts = ts + self.config.frame_samples
        return seq + 1

    def _resync(self) -> int | None:
        """Jump to the oldest packet held, after a blackout; returns its seq, or None if
        none is newer than the playout point."""
        current = self._next_seq
        newer = [s for s in self._packets if current is not None and s > current]
        if not newer:
            return None
        self._stats.resyncs += 1
        oldest = min(newer)
        for seq in [s for s in self._packets if s < oldest]:
            del self._packets[seq]
        self._next_seq = oldest
        self._next_ts = self._packets[oldest][0]
        return oldest

    # ---- statistics

    def statistics(self) -> dict[str, Any]:
        """Counters since creation, and the current target delay (ms) and buffer size."""
        s = self._stats
        return {
            "received": s.received,
            "played": s.played,
            "fec": s.fec,
            "concealed": s.concealed,
            "expanded": s.expanded,
            "dropped": s.dropped,
            "late": s.late,
            "duplicates": s.duplicates,
            "overflow": s.overflow,
            "resyncs": s.resyncs,
            "resets": s.resets,
            "redundant_filled": s.redundant_filled,
            "redundant": s.redundant,
            "deferred": s.deferred,
            "late_concealed": s.late_concealed,
            "peaks_held": s.peaks_held,
            "start_skipped": s.start_skipped,
            "target_ms": round(self.target_delay * 1000, 1),
            "buffered": len(self._packets),
        }


def align_tick(
    nominal: float,
    due: float | None,
    frame: float,
    *,
    margin: float,
    tolerance: float,
    catch_up: bool = True,
) -> float:
    """The time of a playout tick that would come at ``nominal`` (the last tick plus one
    frame), moved so that it lands ``margin`` after the next frame falls due (``due``,
    from :meth:`JitterBuffer.next_due`). ``due`` None: ``nominal``.

    - That frame overdue (the target fell, or playout lags) and ``catch_up``: the tick
      comes earlier, by at most half a frame, so playout catches up in a few ticks. (The
      jitter buffer's own catching up, dropping a frame, starts only two frames behind.)
      The caller says no after an underrun: the frame of delay an underrun added is what
      keeps the next delay spike from being one too, so it stays for a while (the idea
      of NetEq's delay peak detector).
    - Otherwise only the phase counts (frames fall due one ``frame`` apart): a tick
      within ``tolerance`` after a due moment stays put, so jitter in the target does
      not move the clock every tick; else it moves the shorter way round to just after
      one, at most half a frame.

    Why: a frame is due at its timestamp plus the smallest transit plus the target delay,
    but it plays on the receiver's next tick, and that clock's phase against the sender's
    is arbitrary: up to a whole frame of wait (10 ms on average) on top of the target.
    The first frame sets the phase for free (playout starts then); moving it later is a
    change of timeline, so the caller does it only in a pause, where it amounts to
    adding or cutting up to half a frame of silence."""
    if due is None:
        return nominal
    wanted = due + margin
    if catch_up and wanted < nominal - tolerance:
        return max(wanted, nominal - frame / 2)
    late = (nominal - wanted) % frame  # how far after a wanted moment, 0..frame
    if late <= tolerance:
        return nominal
    return nominal - late if late <= frame / 2 else nominal + (frame - late)
