"""One bidirectional QUIC stream as a trio ``HalfCloseableStream``.

A :class:`QuicStream` writes through the aioquic connection
(:class:`~p2pd.transport.quic._aioquic.Connection`) and asks its connection's driver for
no more than :class:`StreamOwner` declares. The driver feeds it what arrives through the
``feed_*`` methods, as asyncio's ``StreamReader.feed_data`` is fed by its protocol.
"""

from __future__ import annotations

from typing import Protocol

import trio

from ...config import QuicConfig
from ...errors import ConnectionLost, P2PDError
from ._aioquic import Connection
from .codes import AppError

#: ``receive_some()`` without a size hands out at most this much at once.
DEFAULT_RECEIVE_SIZE = 1 << 20


class StreamBroken(ConnectionLost, trio.BrokenResourceError):
    """The peer reset this stream, or the connection under it was lost."""


class StreamOwner(Protocol):
    """What a :class:`QuicStream` needs of its connection
    (:class:`~p2pd.transport.quic.peer.QuicPeer` implements it)."""

    @property
    def config(self) -> QuicConfig: ...

    @property
    def is_closing(self) -> bool: ...

    def note_activity(self) -> None:
        """The application used the connection (keeps it from idling out)."""

    def wake(self) -> None:
        """Run a step soon: there is something to send. Never blocks, never switches."""

    def flush(self) -> None:
        """Run a step now, in the caller's task. Never blocks, never switches."""

    def writer_blocked(self, stream: QuicStream) -> None:
        """``stream``'s writer is parked until its backlog falls (:meth:`wake_writer`)."""

    def stream_closed(self, stream: QuicStream) -> None:
        """``stream`` is closed on our side: forget it."""


class QuicStream(trio.abc.HalfCloseableStream):
    """One bidirectional QUIC stream, as a trio stream.

    ``receive_some`` returns ``b""`` once the peer has finished sending. ``send_all`` waits
    while more than ``QuicConfig.send_buffer`` bytes are unacknowledged. Errors follow
    trio: ``trio.ClosedResourceError`` after our own ``aclose``, :class:`StreamBroken`
    (a ``trio.BrokenResourceError`` and a :class:`~p2pd.errors.ConnectionLost`) when the
    peer reset the stream or the connection was lost, ``trio.BusyResourceError`` for two
    concurrent senders or receivers.
    """

    def __init__(self, peer: StreamOwner, quic: Connection, stream_id: int) -> None:
        self.peer = peer
        self.stream_id = stream_id
        self._quic = quic
        self._config = peer.config
        self._recv = bytearray()
        self._recv_eof = False
        self._recv_error: P2PDError | None = None
        self._send_eof = False
        self._send_error: P2PDError | None = None
        self._closed = False
        self._receiving = False
        self._sending = False
        self._recv_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._consumed = 0
        self._credit_mark = 0
        #: A lower cap than ``QuicConfig.send_buffer`` on what this stream may have
        #: written and not yet acknowledged (a file transfer sets it as it goes:
        #: p2pd/files/scavenger.py); None: the config's.
        self.send_limit: int | None = None

    def __repr__(self) -> str:
        return f"<QuicStream {self.stream_id} with {self.peer!r}>"

    # ---- sending

    async def send_all(self, data: bytes | bytearray | memoryview, *, eof: bool = False) -> None:
        """Write ``data``; with ``eof``, finish our direction too, as :meth:`send_eof` would,
        but before yielding: the FIN rides in the packet with the last data instead of
        one of its own (a message and its answer are one packet each way), and that
        packet is sent before this returns (:meth:`QuicPeer.flush`), with the ACK the
        connection owes (``ack_with_data``), not after a scheduling round and an
        ACK-only packet of its own."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            peer = self.peer
            quic = self._quic
            view = memoryview(data).cast("B")
            offset, total = 0, len(view)
            wrote = False
            while True:
                self._check_send()
                if offset >= total:
                    break
                room = self.send_high - quic.send_backlog(self.stream_id)
                if room <= 0:
                    if wrote:
                        peer.wake()  # what was written goes out while we wait
                        wrote = False
                    await self._wait_writable()
                    continue
                chunk = view[offset : offset + room]
                if quic.sender_stopped(self.stream_id):
                    raise StreamBroken("the peer stopped reading this stream")
                quic.send_stream_data(self.stream_id, bytes(chunk))
                offset += len(chunk)
                peer.note_activity()
                wrote = True
            if eof and not self._send_eof and not peer.is_closing:
                self._send_eof = True
                if not quic.sender_stopped(self.stream_id):
                    quic.send_stream_data(self.stream_id, b"", end_stream=True)
                wrote = True
            if wrote:
                quic.ack_with_data()
                if eof:
                    peer.flush()
                else:
                    peer.wake()
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    @property
    def send_high(self) -> int:
        """The backlog above which :meth:`send_all` waits."""
        high = self._config.send_buffer
        return high if self.send_limit is None else max(1, min(self.send_limit, high))

    def latest_rtt(self) -> float | None:
        """The connection's latest round-trip sample in seconds (None before the first)."""
        return self._quic.latest_rtt()

    @property
    def at_eof(self) -> bool:
        """The peer finished its direction and everything it sent has been read."""
        return self._recv_eof and not self._recv

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._check_send()
        if self._quic.send_backlog(self.stream_id) >= self.send_high:
            await self._wait_writable()
        else:
            await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Finish our direction (FIN, RFC 9000 section 3.1); reading goes on. Idempotent."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if not self._send_eof and self._send_error is None and not self.peer.is_closing:
            self._send_eof = True
            if not self._quic.sender_stopped(self.stream_id):
                self._quic.send_stream_data(self.stream_id, b"", end_stream=True)
            self.peer.wake()
        await trio.lowlevel.checkpoint()

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._send_error is not None:
            raise StreamBroken(self._send_error.message) from self._send_error
        if self._send_eof:
            raise trio.ClosedResourceError("send_eof() was called on this stream")

    async def _wait_writable(self) -> None:
        self.peer.writer_blocked(self)
        await self._send_lot.park()

    # ---- receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            # trio wants every call to be a checkpoint; parking is one, so a call that
            # parked does not yield a second time (a reader woken for new data would
            # otherwise cost two scheduling rounds per wake-up).
            parked = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed")
                buf = self._recv
                if buf:
                    size = min(len(buf), max_bytes or DEFAULT_RECEIVE_SIZE)
                    if size == len(buf):
                        data = bytes(buf)
                        buf.clear()
                    else:
                        data = bytes(buf[:size])
                        del buf[:size]
                    self._consumed_bytes(size)
                    # No scheduling round when the data was already here: a handler for a
                    # new stream finds its first bytes waiting, and a round before
                    # reading them delayed every message's answer. (A reader cannot
                    # starve the others: new data comes only when the UDP task runs.)
                    return data
                if self._recv_eof:
                    if not parked:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                if self._recv_error is not None:
                    raise StreamBroken(self._recv_error.message) from self._recv_error
                await self._recv_lot.park()
                parked = True
        finally:
            self._receiving = False

    def _consumed_bytes(self, size: int) -> None:
        self._consumed += size
        self._quic.stream_consumed(self.stream_id, self._consumed)
        # Wake the connection so MAX_STREAM_DATA goes out once the window moved by half
        # (the same threshold Connection._write_stream_limits uses).
        if self._consumed - self._credit_mark >= self._config.stream_window // 2:
            self._credit_mark = self._consumed
            self.peer.wake()
        self.peer.note_activity()

    # ---- closing

    async def aclose(self) -> None:
        """Close both directions: our FIN after what is buffered (graceful), and
        STOP_SENDING if the peer has not finished (RFC 9000 section 3.5)."""
        self.close_nowait()
        await trio.lowlevel.checkpoint()

    def close_nowait(self) -> None:
        """:meth:`aclose` without its checkpoint, for synchronous code."""
        self._close_now(AppError.STREAM_CLOSED, graceful=True)

    def reset(self, error_code: int = AppError.STREAM_RESET) -> None:
        """Abandon the stream in both directions now (RESET_STREAM and STOP_SENDING)."""
        self._close_now(error_code, graceful=False)

    def _close_now(self, error_code: int, *, graceful: bool) -> None:
        if self._closed:
            return
        self._closed = True
        peer = self.peer
        quic = self._quic
        if not peer.is_closing and quic.knows_stream(self.stream_id):
            stopped = quic.sender_stopped(self.stream_id)
            if self._send_error is None and not stopped and not (graceful and self._send_eof):
                if graceful:
                    quic.send_stream_data(self.stream_id, b"", end_stream=True)
                else:
                    quic.reset_stream(self.stream_id, error_code)
            if not self._recv_eof and self._recv_error is None:
                quic.stop_stream(self.stream_id, error_code)
            peer.wake()
        self._send_eof = True
        self._recv.clear()
        peer.stream_closed(self)
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()

    # ---- fed by the connection (QuicPeer), in its step

    def feed_data(self, data: bytes, end_stream: bool) -> None:
        """Data (and maybe the end) arrived."""
        if data:
            self._recv += data
        if end_stream:
            self._recv_eof = True
        if self._recv_lot:
            self._recv_lot.unpark_all()

    def feed_reset(self, error: P2PDError) -> None:
        """The peer reset its direction (RESET_STREAM)."""
        if self._recv_error is None and not self._recv_eof:
            self._recv_error = error
        self._recv_lot.unpark_all()

    def feed_stop_sending(self, error: P2PDError) -> None:
        """The peer will read no more (STOP_SENDING)."""
        if self._send_error is None:
            self._send_error = error
        self._send_lot.unpark_all()

    def feed_connection_lost(self, error: P2PDError) -> None:
        """The connection is gone: both directions break unless already finished."""
        if self._recv_error is None and not self._recv_eof:
            self._recv_error = error
        if self._send_error is None and not self._send_eof:
            self._send_error = error
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()

    def wake_writer(self) -> bool:
        """Wake a writer parked in :meth:`send_all` if the backlog fell to half of
        :attr:`send_high` (hysteresis: it refills in large writes instead of one packet's
        worth per acknowledgement) or the send side broke; True if it was woken."""
        low_water = self.send_high // 2
        if self._send_error is not None or self._quic.send_backlog(self.stream_id) <= low_water:
            self._send_lot.unpark_all()
            return True
        return False
