"""The sender's side of one data stream: chunks out, acks in, at most ``window`` groups
beyond the last ack in flight (p2pd/files/service.py drives it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..errors import ConnectionLost
from ..transport.quic import QuicStream
from .protocol import F_ACK, F_DONE, F_END, F_REFUSE, SenderStream, encode_frame
from .scavenger import Scavenger

#: How long the sender waits for DONE once every chunk is written.
DONE_TIMEOUT = 60.0
#: The window is full and no group was acked for this long: the stream is given up
#: (trio.TooSlowError), and the sender tries again.
ACK_TIMEOUT = 30.0
#: The least backlog the scavenger leaves a stream (bytes): a transfer never stops; small
#: enough to queue under 30 ms on a 2 Mbit/s uplink.
SCAVENGER_FLOOR = 8 * 1024


class SourceChanged(OSError):
    """The source file is shorter than when it was offered: being rewritten (an editor
    or a copy truncates it first), or cut. Worth another try a little later."""


@dataclass(slots=True)
class StreamOutcome:
    """How one stream ended: ``done`` (the receiver has the file), ``refused`` (a REFUSE
    reason, 0 if none), ``acked`` (the last group acked; more than the start: progress)."""

    done: bool = False
    refused: int = 0
    acked: int = 0
    #: Chunk bytes written on this stream that an earlier stream had written already.
    resent: int = 0
    #: The end of the furthest chunk written, on this stream or before.
    sent_until: int = 0


async def stream_file(
    stream: QuicStream,
    tx: SenderStream,
    path: str,
    group: int,
    send_hashes: bool,
    *,
    window: int,
    on_ack: Callable[[int], None],
    outcome: StreamOutcome,
    max_rate: int = 0,
    queue_target: float = 0.0,
) -> None:
    """Write the hash list (if asked) and every chunk from ``group`` on, then END, and
    read ACK/DONE/REFUSE meanwhile. Raises what breaks: ConnectionLost (a trio
    BrokenResourceError too), FileProtocolError (the receiver's answers), OSError (the
    source file cannot be read; SourceChanged when it is shorter than offered),
    trio.TooSlowError (no DONE, or no ack for a full window, in time).

    ``outcome`` is filled in as it goes (also when this raises); its ``sent_until`` says
    how far earlier streams wrote (what is written again below it counts as ``resent``).
    ``max_rate``: bytes per second, 0 for no limit. ``queue_target``: seconds of queue
    the stream may build (p2pd/files/scavenger.py), 0 for no limit."""
    layout = tx.layout
    started = trio.current_time()
    written = 0
    failures: list[BaseException] = []
    acked_event = trio.Event()
    scavenger = None
    if queue_target > 0:
        ceiling = stream.send_high
        scavenger = Scavenger(floor=min(SCAVENGER_FLOOR, ceiling), ceiling=ceiling,
                              target=queue_target)  # fmt: skip

    async def read_answers(cancel: trio.CancelScope) -> None:
        nonlocal acked_event
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    raise ConnectionLost("the receiver ended the stream")
                for event in tx.data_received(data):
                    if event.kind == F_ACK and event.group > outcome.acked:
                        outcome.acked = event.group
                        on_ack(event.group)
                        acked_event.set()
                        acked_event = trio.Event()
                    elif event.kind in (F_DONE, F_REFUSE):
                        outcome.done = event.kind == F_DONE
                        outcome.refused = event.reason
                        cancel.cancel()
                        return
        except Exception as exc:  # handed to the caller, unwrapped from the nursery
            failures.append(exc)
            cancel.cancel()

    with open(path, "rb", buffering=0) as f:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_answers, nursery.cancel_scope)
            try:
                if send_hashes:
                    await stream.send_all(tx.hash_frames())
                first, _ = layout.group_span(group)
                for index in range(first, layout.chunks):
                    while index // layout.group_chunks >= outcome.acked + window:
                        with trio.fail_after(ACK_TIMEOUT):  # a silent receiver: retry
                            await acked_event.wait()
                    offset, length = layout.chunk_span(index)
                    plain = os.pread(f.fileno(), length, offset)
                    if len(plain) != length:
                        raise SourceChanged(f"{path} is shorter than when it was offered")
                    if scavenger is not None:
                        now = trio.current_time()
                        stream.send_limit = scavenger.update(now, stream.latest_rtt())
                    await stream.send_all(tx.chunk_frame(index, plain))
                    if offset < outcome.sent_until:
                        outcome.resent += min(length, outcome.sent_until - offset)
                    outcome.sent_until = max(outcome.sent_until, offset + length)
                    written += length
                    if max_rate:  # pace: never ahead of max_rate since the stream began
                        await trio.sleep_until(started + written / max_rate)
                await stream.send_all(encode_frame(F_END), eof=True)
                with trio.fail_after(DONE_TIMEOUT):
                    await trio.sleep_forever()  # until read_answers sees DONE or REFUSE
            except Exception as exc:
                failures.append(exc)
                nursery.cancel_scope.cancel()
    if failures and not (outcome.done or outcome.refused):
        raise failures[0]
