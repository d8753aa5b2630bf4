"""When a call's end is told (p2pd/calls.py ``CallManager``): the ``call`` event of its
end comes once its media task has stopped and closed its recording. A hangup from the
peer cancels the media; told at once, `p2pd answer --wait --record x.mkv` returned
before the file was finished, and reading it failed in a clean-clone CI run
(tests/test_calls_e2e.py's video recording test)."""

from __future__ import annotations

from typing import Any

import trio

from p2pd.calls import Call, CallManager


class SlowToCloseMedia:
    """A call's media whose recording takes a moment to close once cancelled."""

    def __init__(self) -> None:
        self.closed = False

    async def run(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.05)  # the muxer writing its index, say
            self.closed = True

    def statistics(self) -> dict[str, Any]:
        return {"end_reason": "cancelled"}


class Events:
    def __init__(self, media: SlowToCloseMedia) -> None:
        self.media = media
        #: (state, whether the recording was closed when the event was told)
        self.told: list[tuple[str, bool]] = []

    def emit(self, kind: str, **fields: Any) -> None:
        if kind == "call":
            self.told.append((fields["state"], self.media.closed))


async def test_the_end_of_a_call_is_told_once_its_recording_is_closed() -> None:
    media = SlowToCloseMedia()
    events = Events(media)
    manager = CallManager(None, events)  # type: ignore[arg-type]
    call = Call("c" * 32, "in", "alice", b"k" * 32, False, "active")
    call.media = media  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager._run_media, call)
        await trio.sleep(0.01)  # the media runs
        manager._finish(call, "ended", "alice hung up")  # what a hangup signal does
        assert call.state == "ended"  # the state at once (`calls` shows it)...
        assert events.told == []  # ...the event once the media has closed
    assert events.told == [("ended", True)]
