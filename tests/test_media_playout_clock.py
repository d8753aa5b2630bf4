"""The audio playout clock (p2pd/media/playout.py) on trio's MockClock: frames decoded
and recorded one per 20 ms tick, and after a stall of the playout task the recording
keeps the call's length (the skipped ticks recorded as silence) instead of coming out
short. A fake decoder; no codec, no network."""

from __future__ import annotations

from typing import Any

import numpy as np
import trio
import trio.testing

from p2pd.media.call import MediaConfig
from p2pd.media.codecs import FRAME_SAMPLES
from p2pd.media.jitter import JitterBuffer
from p2pd.media.playout import FRAME_DURATION, AudioPlayout

CALL = 3.0  # seconds of frames sent
STALL = 0.3  # how long the playout task is stalled once, after 1 s


class LoudDecoder:
    """Every frame a loud square wave (never quiet: the clock is not rephased)."""

    name = "fake"

    def decode(self, packet: bytes) -> Any:
        return np.where(np.arange(FRAME_SAMPLES) % 40 < 20, 8000, -8000).astype(np.int16)

    def decode_fec(self, next_packet: bytes) -> tuple[Any, bool]:
        return self.conceal(), False

    def conceal(self) -> Any:
        return np.zeros(FRAME_SAMPLES, np.int16)


class StallingRecorder:
    """Notes every frame written; once, after 1 s of playout, stalls the clock."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self.clock = clock
        self.writes: list[tuple[float, bool]] = []
        self.stalled = False

    def write_audio(self, pcm: Any, *, concealed: bool, now: float) -> None:
        self.writes.append((now, concealed))
        if not self.stalled and len(self.writes) == 50:
            self.stalled = True
            self.clock.jump(STALL)  # the task was starved of CPU: it wakes this late


async def play_a_call(recorder_for: Any) -> tuple[AudioPlayout, Any]:
    config = MediaConfig()
    jitter = JitterBuffer(config.jitter)
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    recorder = recorder_for(clock)
    playout = AudioPlayout(
        config, jitter, LoudDecoder(),  # type: ignore[arg-type]
        recorder=recorder, speaker=None, device_failed=lambda message: None,
    )  # fmt: skip
    start = trio.current_time()

    async def send() -> None:
        for seq in range(int(CALL / FRAME_DURATION)):  # one frame 1 ms after capture
            await trio.sleep_until(start + seq * FRAME_DURATION + 0.001)
            jitter.push(seq, seq * FRAME_SAMPLES, b"x", trio.current_time(), start=seq == 0)

    with trio.move_on_after(CALL + 0.5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(playout.run, start)
    return playout, recorder


def test_a_stalled_playout_records_the_skipped_ticks_as_silence() -> None:
    async def main() -> None:
        playout, recorder = await play_a_call(StallingRecorder)
        assert recorder.stalled
        skipped = playout.counters.skipped
        # 300 ms of stall, of which 200 ms is the threshold's own: 14 ticks behind.
        assert 13 <= skipped <= 15
        # Those ticks are in the recording as concealed silence, written at once ...
        at_stall = [c for t, c in recorder.writes[50 : 50 + skipped]]
        assert at_stall == [True] * skipped
        # ... so it holds one frame per 20 ms of the call, from the first frame played.
        first = recorder.writes[0][0]
        elapsed = recorder.writes[-1][0] - first
        assert abs(len(recorder.writes) - (elapsed / FRAME_DURATION + 1)) <= 2
        assert playout.counters.frames_played == len(recorder.writes) - skipped

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
