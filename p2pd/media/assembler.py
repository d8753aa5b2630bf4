"""Video frames from datagram fragments, and when to ask for a keyframe (sans-I/O).

Each encoded VP8 frame travels as 1..:data:`~p2pd.media.wire.MAX_FRAGMENTS` datagrams
(:func:`p2pd.media.wire.fragment`). :class:`FrameAssembler` collects them and hands out
complete frames *in frame id order and without gaps*: a VP8 delta frame is only
decodable after the frame before it (RFC 6386 section 9.7: every inter frame references
the previous one, at least through the "last frame" buffer), so after a loss nothing but a
keyframe may follow. Then it asks for one: :meth:`FrameAssembler.keyframe_request` returns
a request number to send (as :class:`~p2pd.media.wire.KeyframeRequest`, RTCP's PLI) at
once and again every ``request_interval`` until a keyframe arrives complete.

A frame id counts as lost when a later frame has been complete for ``reorder_tolerance``
while it still is not (datagrams may be reordered, not much), or when memory bounds evict
it. Frame ids are 32-bit and not extended: at 30 fps they wrap after 4.5 years.

With NACKs on (:attr:`FrameAssembler.nack_enabled`: the peer said it resends fragments),
:meth:`FrameAssembler.nack_request` names the fragments missing from frames that can still
be decoded (and whole frame ids skipped over), through a
:class:`~p2pd.media.nack.NackScheduler`, and a missing frame holds the later ones for the
NACK deadline instead of ``reorder_tolerance``: time for the retransmissions to arrive
(:meth:`~p2pd.media.nack.NackScheduler.deadline`, 100-400 ms with the RTT).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from .nack import NackConfig, NackScheduler
from .wire import NACK_WHOLE_FRAME, VideoFragment, VideoNack

__all__ = ["AssembledFrame", "AssemblerConfig", "FrameAssembler"]


@dataclass(frozen=True, slots=True)
class AssembledFrame:
    """One complete encoded frame, ready for the decoder."""

    frame_id: int
    timestamp: int
    keyframe: bool
    data: bytes


@dataclass(frozen=True)
class AssemblerConfig:
    """Tuning of :class:`FrameAssembler`; times in seconds."""

    #: How long a complete later frame waits for a missing earlier one.
    reorder_tolerance: float = 0.03
    #: Keyframe requests repeat at most this often while no keyframe arrives.
    request_interval: float = 0.1
    #: Frames (partial or complete) held at most, and their bytes at most.
    max_frames: int = 32
    max_bytes: int = 4 << 20
    #: NACK timing, used once the peer says it answers NACKs.
    nack: NackConfig = field(default_factory=NackConfig)

    def __post_init__(self) -> None:
        if self.reorder_tolerance < 0 or self.request_interval <= 0:
            raise UsageError("reorder_tolerance must be >= 0 and request_interval > 0")
        if self.max_frames < 2 or self.max_bytes < 1:
            raise UsageError("max_frames must be >= 2 and max_bytes positive")


@dataclass
class _Partial:
    count: int
    timestamp: int
    keyframe: bool
    pieces: list[bytes | None]
    have: int = 0
    size: int = 0
    #: The highest fragment index received: the missing ones under it are noticed.
    top: int = 0


@dataclass
class _Counters:
    fragments: int = 0
    duplicates: int = 0
    late: int = 0
    inconsistent: int = 0
    completed: int = 0
    delivered: int = 0
    discarded: int = 0
    evicted: int = 0
    losses: int = 0
    requests: int = 0


@dataclass
class FrameAssembler:
    """Fragments in, decodable frames out. See the module docstring."""

    config: AssemblerConfig = field(default_factory=AssemblerConfig)

    def __post_init__(self) -> None:
        self._partial: dict[int, _Partial] = {}
        #: frame id -> (frame, when it completed)
        self._complete: dict[int, tuple[AssembledFrame, float]] = {}
        self._bytes = 0
        #: The next frame id the decoder can take; None before the first keyframe.
        self._next: int | None = None
        self._waiting = True
        self._wait_since: float | None = None
        self._request = 0
        self._last_request: float | None = None
        self._c = _Counters()
        #: The highest frame id a fragment was accepted for.
        self._highest: int | None = None
        self._nack = NackScheduler(self.config.nack)
        #: Ask for retransmissions (and wait for them): set once the peer answers NACKs.
        self.nack_enabled = False
        self._rtt: float | None = None

    @property
    def waiting_for_keyframe(self) -> bool:
        """True while only a keyframe can be decoded (at the start, after a loss)."""
        return self._waiting

    def push(self, fragment: VideoFragment, now: float) -> list[AssembledFrame]:
        """Take one fragment; returns the frames that became decodable, in order."""
        c = self._c
        c.fragments += 1
        fid = fragment.frame_id
        if self._next is not None and fid < self._next:
            c.late += 1
            return self._deliver(now)
        if fid in self._complete:
            c.duplicates += 1
            return []
        partial = self._partial.get(fid)
        if partial is None:
            partial = _Partial(
                fragment.count, fragment.timestamp, fragment.keyframe, [None] * fragment.count
            )
            self._partial[fid] = partial
        elif (partial.count, partial.timestamp, partial.keyframe) != (
            fragment.count,
            fragment.timestamp,
            fragment.keyframe,
        ):
            c.inconsistent += 1
            return []
        if partial.pieces[fragment.index] is not None:
            c.duplicates += 1
            return []
        partial.pieces[fragment.index] = fragment.payload
        partial.have += 1
        partial.top = max(partial.top, fragment.index)
        if self._highest is None or fid > self._highest:
            self._highest = fid
        self._nack.arrived(fid, fragment.index)
        partial.size += len(fragment.payload)
        self._bytes += len(fragment.payload)
        if partial.have == partial.count:
            del self._partial[fid]
            data = b"".join(p for p in partial.pieces if p is not None)
            frame = AssembledFrame(fid, partial.timestamp, partial.keyframe, data)
            self._complete[fid] = (frame, now)
            c.completed += 1
        self._enforce_bounds(now)
        return self._deliver(now)

    def poll(self, now: float) -> list[AssembledFrame]:
        """Let time pass: a missing frame may now count as lost (and a keyframe held
        behind it become decodable)."""
        return self._deliver(now)

    def decode_failed(self, now: float) -> None:
        """The decoder refused a frame we handed out: treat it as a loss."""
        self._lose(now)

    def keyframe_request(self, now: float) -> int | None:
        """A request number to send now (a new one each time), or None: not waiting for a
        keyframe, or the last request went out less than ``request_interval`` ago."""
        if not self._waiting or self._c.fragments == 0:
            return None  # not waiting, or no video at all (an audio-only call)
        if (
            self._last_request is not None
            and now - self._last_request < self.config.request_interval
        ):
            return None
        self._last_request = now
        self._request += 1
        self._c.requests += 1
        return self._request

    def nack_request(self, now: float, rtt: float | None = None) -> VideoNack | None:
        """A NACK to send now for the fragments still missing, or None (NACKs off,
        nothing missing, or all asked for recently enough). ``rtt``: the smoothed RTT,
        if known, spaces repeated NACKs."""
        if rtt is not None:
            self._rtt = rtt  # kept for the loss deadline (see _loss_wait)
        if not self.nack_enabled or self._highest is None:
            return None
        highest = self._highest
        # At most this many: the scan runs after every fragment, and a hostile peer's
        # partial frames may claim 1024 fragments each.
        limit = self.config.nack.max_tracked
        missing: list[tuple[int, int]] = []
        for fid in sorted(self._partial):
            partial = self._partial[fid]
            if self._waiting and not partial.keyframe:
                continue  # only a keyframe helps now
            if self._next is not None and not self._waiting and fid < self._next:
                continue
            # Fragments after the highest one received are missing only once a later
            # frame has begun (the rest of this one may still be on its way).
            top = partial.count - 1 if fid < highest else partial.top
            missing.extend((fid, i) for i, p in enumerate(partial.pieces[: top + 1]) if p is None)
            if len(missing) >= limit:
                del missing[limit:]
                break
        if not self._waiting and self._next is not None:
            # Frame ids with no fragment at all, up to the highest seen (bounded).
            end = min(highest, self._next + self.config.max_frames)
            missing.extend(
                (fid, NACK_WHOLE_FRAME)
                for fid in range(self._next, end)
                if fid not in self._partial and fid not in self._complete
            )
        return self._nack.due(missing, now, rtt)

    # ---- internals

    def _loss_wait(self) -> float:
        """How long a complete later frame waits for a missing earlier one."""
        if self.nack_enabled:
            return max(self.config.reorder_tolerance, self._nack.deadline(self._rtt))
        return self.config.reorder_tolerance

    def _lose(self, now: float) -> None:
        if not self._waiting:
            self._c.losses += 1
            self._waiting = True
            self._wait_since = now
            self._last_request = None  # ask at once

    def _deliver(self, now: float) -> list[AssembledFrame]:
        out: list[AssembledFrame] = []
        while True:
            if self._waiting:
                keys = [fid for fid, (f, _) in self._complete.items() if f.keyframe]
                if not keys:
                    # Delta frames cannot be decoded before a keyframe. Keep them only
                    # for as long as a reordered keyframe before them may still come.
                    tolerance = self.config.reorder_tolerance
                    for fid, (_, at) in list(self._complete.items()):
                        if now - at > tolerance:
                            self._drop_complete(fid)
                    break
                key = max(keys)
                self._next = key
                self._waiting = False
                self._wait_since = None
                self._prune_below(key)
            assert self._next is not None
            held = self._complete.get(self._next)
            if held is not None:
                self._bytes -= len(held[0].data)
                del self._complete[self._next]
                out.append(held[0])
                self._c.delivered += 1
                self._next += 1
                continue
            tolerance = self._loss_wait()
            if any(
                fid > self._next and now - at >= tolerance
                for fid, (_, at) in self._complete.items()
            ):
                self._lose(now)
                continue
            break
        if self._next is not None:
            self._prune_below(self._next)
        return out

    def _drop_complete(self, fid: int) -> None:
        frame, _ = self._complete.pop(fid)
        self._bytes -= len(frame.data)
        self._c.discarded += 1

    def _prune_below(self, fid: int) -> None:
        for old in [f for f in self._complete if f < fid]:
            self._drop_complete(old)
        for old in [f for f in self._partial if f < fid]:
            self._bytes -= self._partial.pop(old).size
            self._c.discarded += 1

    def _enforce_bounds(self, now: float) -> None:
        c = self.config
        while self._partial or self._complete:
            if (
                len(self._partial) + len(self._complete) <= c.max_frames
                and self._bytes <= c.max_bytes
            ):
                return
            oldest = min([*self._partial, *self._complete])
            if oldest in self._partial:
                self._bytes -= self._partial.pop(oldest).size
            else:
                frame, _ = self._complete.pop(oldest)
                self._bytes -= len(frame.data)
            self._c.evicted += 1
            if self._next is None or oldest >= self._next:
                self._lose(now)

    def statistics(self) -> dict[str, Any]:
        c = self._c
        return {
            "fragments": c.fragments,
            "duplicates": c.duplicates,
            "late": c.late,
            "inconsistent": c.inconsistent,
            "completed": c.completed,
            "delivered": c.delivered,
            "discarded": c.discarded,
            "evicted": c.evicted,
            "losses": c.losses,
            "keyframe_requests": c.requests,
            "waiting_for_keyframe": self._waiting,
            **self._nack.statistics(),
        }
