"""One QUIC connection: :class:`QuicPeer`, the trio driver of an aioquic connection.

A *step* fires aioquic's timer if due, consumes every pending event (stream data goes to
the stream, DATAGRAM frames to the endpoint), asks the :class:`ConnectionPolicy` what is
due (a PING, a close), drains ``datagrams_to_send()`` straight into the socket, and
re-arms the connection's deadline. Steps run in the UDP task after a burst of received
datagrams (:meth:`QuicPeer.step_received`, called by the endpoint) and in the
connection's own task (:meth:`QuicPeer.run`) when its deadline comes or the application
wakes it. The peer reads the clock (``trio.current_time()``) and passes ``now`` down.

What the peer needs of its endpoint is :class:`PeerHost`; what a stream needs of the
peer is :class:`~p2pd.transport.quic.stream.StreamOwner`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any, Protocol

import trio

from ...config import QuicConfig
from ...errors import (
    ConnectionLost,
    DatagramReserved,
    DatagramTooLarge,
    P2PDError,
    WireError,
)
from ...identity import fingerprint
from ...wire import Address
from ._aioquic import (
    PACKET_NUMBER_SEND_SIZE,
    Connection,
    QuicErrorCode,
    QuicFrameType,
    events,
    size_uint_var,
)
from .codes import (
    AppError,
    describe_close,
    stream_is_client_initiated,
    stream_is_unidirectional,
)
from .observed import TRANSPORT_KIND_LIMIT, AddressReports, is_transport_datagram
from .policy import PING, Close, ConnectionPolicy
from .stream import QuicStream, StreamBroken

log = logging.getLogger("p2pd.transport.quic")

NetworkAddress = tuple[str, int]

#: RFC 9000 section 17.2: connection IDs are at most 20 bytes (QUIC version 1).
MAX_CID_LENGTH = 20
#: AEAD expansion of every cipher suite QUIC v1 uses (RFC 9001 section 5.3).
AEAD_TAG_SIZE = 16
#: A 1-RTT packet's header as aioquic writes it: first byte, the peer's connection ID (at
#: most 20 bytes, and the peer may switch us to a longer one at any time), packet number.
SHORT_HEADER_MAX = 1 + MAX_CID_LENGTH + PACKET_NUMBER_SEND_SIZE
#: A step repeats while aioquic's timer is already due after sending (pacing), at most
#: this many times, so one connection cannot hold the UDP task for long.
STEP_PASSES = 16


def largest_datagram_payload(frame_limit: int) -> int:
    """The largest payload whose DATAGRAM frame (type byte, varint length, payload; RFC
    9221 section 4) is at most ``frame_limit`` bytes."""
    size = frame_limit - 2
    while size > 0 and 1 + size_uint_var(size) + size > frame_limit:
        size -= 1
    return max(size, 0)


class PeerHost(Protocol):
    """What a :class:`QuicPeer` needs of its endpoint
    (:class:`~p2pd.transport.quic.endpoint.QuicEndpoint` implements it)."""

    @property
    def config(self) -> QuicConfig: ...

    @property
    def stats(self) -> Counter[str]: ...

    @property
    def accepts_streams(self) -> bool:
        """A stream handler is set: streams the peer opens are taken."""

    def sendto(self, data: bytes, addr: NetworkAddress) -> None:
        """Send one UDP datagram, without blocking (a full socket buffer drops it)."""

    def send_many(self, datagrams: list[bytes], addr: NetworkAddress) -> None:
        """Send UDP datagrams to one address, in order, as :meth:`sendto` each would."""

    def register_cid(self, cid: bytes, peer: QuicPeer) -> None:
        """Datagrams for connection ID ``cid`` are ``peer``'s."""

    def unregister_cid(self, cid: bytes, peer: QuicPeer) -> None:
        """``peer`` retired ``cid``."""

    def peer_established(self, peer: QuicPeer) -> None:
        """``peer`` passed the key check: offer it for reuse, report it."""

    def peer_closing(self, peer: QuicPeer) -> None:
        """``peer`` is closing: no longer offer it for reuse."""

    def peer_closed(self, peer: QuicPeer) -> None:
        """``peer`` is gone: forget it and its connection IDs, report it."""

    def deliver_datagram(self, peer: QuicPeer, data: bytes) -> None:
        """A DATAGRAM frame arrived on ``peer``."""

    def start_stream_handler(self, peer: QuicPeer, stream: QuicStream) -> None:
        """``peer`` opened ``stream``: run the stream handler on it."""

    def observes_path(self, addr: NetworkAddress) -> bool:
        """Whether ``addr`` is reached from the node's own socket, directly: not a relay
        circuit's virtual address, not a path on a hole-punching side socket. Observed-
        address reports are sent and taken on such paths only (.observed)."""

    def address_observed(self, peer: QuicPeer, seen: Address) -> None:
        """``peer`` reported the address it sees us at (at most one a second)."""


class QuicPeer:
    """One QUIC connection to a peer whose identity key is known.

    For a connection we made, :attr:`public_key` is the key we expected and the server
    proved. For one we accepted, it is the key the client proved; the layer above decides
    whether it wants that peer (and calls :meth:`close` if not).

    Methods below "for the endpoint and streams" are not for applications.
    """

    def __init__(
        self,
        endpoint: PeerHost,
        quic: Connection,
        address: NetworkAddress,
        expected_key: bytes | None,
    ) -> None:
        self.endpoint = endpoint
        self.config = endpoint.config
        self.quic = quic
        self.address = address
        self.is_client = expected_key is not None
        self.expected_key = expected_key
        self._streams: dict[int, QuicStream] = {}
        self._closed_stream_ids: set[int] = set()
        self._blocked_writers: set[QuicStream] = set()
        self._cids: set[bytes] = set()
        self._lot = trio.lowlevel.ParkingLot()
        self._kicked = False
        #: Received datagrams are waiting for a step (the endpoint's flush runs it).
        self._dirty = False
        #: A step outside the task ended the connection; the task must finish it.
        self._stop = False
        #: The task's waiting scope, whose deadline is the connection's next deadline.
        self._wait: trio.CancelScope | None = None
        self._timer_at: float | None = None
        self._ready = trio.Event()
        self._done = trio.Event()
        self._closing = False
        self._terminated = False
        self._error: P2PDError | None = None
        now = trio.current_time()
        #: When this connection was made (trio's clock).
        self.started = now
        #: The time of the last step or application use.
        self._now = now
        self.policy = ConnectionPolicy(
            self.config, now, where=self._where(), expected_key=expected_key
        )
        self._ping_uid = 0
        #: Observed-address reports, both ways (.observed), and the path aioquic sends
        #: on now (it moves to a peer's new address when the peer's NAT rebinds).
        self.reports = AddressReports()
        self._path: NetworkAddress = address
        #: When the last datagram of this connection came in (trio's clock).
        self.last_received = now

    def __repr__(self) -> str:
        key = self.public_key or self.expected_key
        who = fingerprint(key)[:12] if key else "?"
        return f"<QuicPeer {who} at {self.address[0]}:{self.address[1]}>"

    # ---- public API

    @property
    def public_key(self) -> bytes | None:
        """The peer's verified Ed25519 key; None until the handshake completed."""
        return self.policy.public_key

    @property
    def is_established(self) -> bool:
        """The handshake completed and the peer passed the key check."""
        return self.policy.public_key is not None

    @property
    def is_closing(self) -> bool:
        """True once the connection is closing or closed: it takes no new streams."""
        return self._closing or self._terminated

    @property
    def error(self) -> P2PDError | None:
        """Why the connection ended (None while it is open)."""
        return self._error

    async def wait_closed(self) -> None:
        """Return once the connection is gone (after the closing period, RFC 9000
        section 10.2)."""
        await self._done.wait()

    async def open_stream(self) -> QuicStream:
        """A new bidirectional stream. The peer sees it with its first byte (or FIN). If
        the peer's stream limit is reached, the stream's data waits until it rises."""
        # A cancellation point but no scheduling round: the caller writes next, and that
        # write yields (a round here cost a message about 0.05 ms, bench_messages.py).
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        quic = self.quic
        stream_id = quic.get_next_available_stream_id()
        # aioquic allocates the id only on the first write; an empty write does that
        # without sending anything, so the next open_stream gets the next id.
        quic.send_stream_data(stream_id, b"")
        stream = QuicStream(self, quic, stream_id)
        self._streams[stream_id] = stream
        quic.track_consumption(stream_id)
        self.note_activity()
        return stream

    @property
    def path(self) -> NetworkAddress:
        """Where the peer is now: :attr:`address`, or where aioquic moved the connection
        when the peer's address changed (a NAT rebinding, RFC 9000 section 9)."""
        return self._path

    @property
    def max_datagram_size(self) -> int:
        """The largest payload :meth:`send_datagram` accepts now; 0 if the peer takes no
        DATAGRAM frames.

        The peer's max_datagram_frame_size bounds the whole frame (RFC 9221 section 3),
        and the frame must fit in one packet (section 5: DATAGRAM frames are never split)
        whatever connection ID the peer switches us to.
        """
        remote = self.quic.remote_max_datagram_frame_size
        if not self.is_established or remote is None:
            return 0
        packet_room = self.quic.configuration.max_datagram_size - SHORT_HEADER_MAX
        return largest_datagram_payload(min(remote, packet_room - AEAD_TAG_SIZE))

    @property
    def queued_datagrams(self) -> int:
        """DATAGRAM frames waiting for congestion window now (a call's rate control
        reads it: p2pd/media/ratecontrol.py)."""
        return self.quic.pending_datagrams

    def ping(self) -> None:
        """Send an ack-eliciting PING now (RFC 9000 section 19.2). It does not count as
        use: a connection nobody uses still closes after ``idle_close``. A NATed node
        pings its direct connections often, to hold (and, after its NAT forgot them, to
        restore) their mappings (p2pd/relay/upgrade.py)."""
        self._check_open()
        self._ping_uid += 1
        self.quic.send_ping(self._ping_uid)
        self.wake()

    def send_datagram(self, data: bytes, *, urgent: bool = False) -> bool:
        """Queue one unreliable DATAGRAM frame (RFC 9221).

        Raises :class:`~p2pd.errors.DatagramTooLarge` if ``data`` exceeds
        :attr:`max_datagram_size` (it would never be sent: in aioquic 1.7.2 such a frame
        stays at the head of the queue and blocks every later datagram),
        :class:`~p2pd.errors.DatagramReserved` if it is empty or its first byte is below
        ``0x10`` (the transport's own kinds, p2pd/transport/quic/observed.py: the peer
        would take it for one, count it as malformed and never hand it on), and
        :class:`~p2pd.errors.ConnectionLost` on a closed connection. Returns False, and
        drops the datagram, when ``QuicConfig.max_pending_datagrams`` are already
        waiting for congestion window: old audio is worth less than new.

        ``urgent`` (a small message the peer's control loop needs, not payload: a call's
        receiver reports, NACKs, keyframe requests) goes ahead of the datagrams waiting
        and is refused only when ``urgent_datagram_reserve`` more than
        ``max_pending_datagrams`` wait: a queue full of video no longer drops the report
        that would tell the sender to slow down. Several urgent ones queued between two
        packets go out newest first.
        """
        self._check_open()
        if is_transport_datagram(data):
            raise DatagramReserved(
                f"datagram of {len(data)} bytes refused for {self!r}: an empty one, or one "
                f"whose first byte is below {TRANSPORT_KIND_LIMIT:#04x}, is the transport's"
            )
        limit = self.max_datagram_size
        # aioquic 1.7.2 checks neither bound: it queues any size, and a frame that fits
        # in no packet then stays at the head of _datagrams_pending for ever, so no
        # later datagram is sent either (test_aioquic_itself_gets_stuck_on_...).
        if len(data) > limit:
            raise DatagramTooLarge(
                f"datagram of {len(data)} bytes refused: {self!r} accepts at most {limit}"
            )
        quic = self.quic
        room = self.config.max_pending_datagrams
        if urgent:
            room += self.config.urgent_datagram_reserve
        if quic.pending_datagrams >= room:
            self.endpoint.stats["quic_datagrams_dropped"] += 1
            return False
        if urgent:
            quic.send_datagram_frame_first(bytes(data))
        else:
            quic.send_datagram_frame(bytes(data))
        self.note_activity()
        self.wake()
        return True

    def close(self, reason: str = "", error_code: AppError = AppError.NO_ERROR) -> None:
        """Close gracefully (CONNECTION_CLOSE, ``error_code``). Streams break at once."""
        self._close(
            Close(
                ConnectionLost(f"connection to {self._where()} closed by us"),
                error_code,
                reason,
                transport=False,
            )
        )

    async def aclose(self) -> None:
        """:meth:`close`, then wait until the connection is gone."""
        self.close()
        await self.wait_closed()

    def statistics(self) -> dict[str, Any]:
        return {
            "address": f"{self.address[0]}:{self.address[1]}",
            "fingerprint": fingerprint(self.public_key) if self.public_key else None,
            "initiator": self.is_client,
            "established": self.is_established,
            "closing": self.is_closing,
            "streams": len(self._streams),
        }

    # ---- for the endpoint and streams

    @property
    def connection_ids(self) -> frozenset[bytes]:
        """The connection IDs that lead to this connection."""
        return frozenset(self._cids)

    def add_connection_id(self, cid: bytes) -> None:
        """Datagrams with Destination Connection ID ``cid`` are for this connection."""
        self._cids.add(cid)
        self.endpoint.register_cid(cid, self)

    async def wait_established(self) -> None:
        """Return once the key check passed; raise why the connection failed if not."""
        await self._ready.wait()
        if not self.is_established or self._error is not None:
            error = self._error or ConnectionLost(f"connection to {self._where()} failed")
            raise type(error)(error.message)

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> bool:
        """Feed one datagram to aioquic; True if the connection has now to be stepped
        (:meth:`step_received`) and was not waiting for that already."""
        self.last_received = now
        try:
            self.quic.receive_datagram(data, addr, now)
        except Exception:
            # As in run(): a bug must not take the UDP receive loop down with it.
            log.exception("internal error receiving on %r; dropping the connection", self)
            self._close(
                Close(
                    ConnectionLost(f"connection to {self._where()} failed (internal error)"),
                    QuicErrorCode.INTERNAL_ERROR,
                    "internal error",
                    transport=True,
                )
            )
            return False
        if self._dirty:
            return False
        self._dirty = True
        return True

    def note_activity(self) -> None:
        self._now = now = trio.current_time()
        self.policy.activity(now)

    def wake(self) -> None:
        """Have the connection task run a step soon (never blocks, never switches)."""
        self._kicked = True
        if self._lot:
            self._lot.unpark_all()

    def writer_blocked(self, stream: QuicStream) -> None:
        self._blocked_writers.add(stream)

    def stream_closed(self, stream: QuicStream) -> None:
        sid = stream.stream_id
        if self._streams.pop(sid, None) is not None:
            self.quic.untrack_consumption(sid)
            self._blocked_writers.discard(stream)
            # Late frames for it may still arrive while aioquic holds its state.
            if self.quic.knows_stream(sid):
                self._closed_stream_ids.add(sid)
            self.note_activity()

    # ---- helpers

    def _where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def _check_open(self) -> None:
        if self._error is not None:
            raise ConnectionLost(self._error.message) from self._error
        if self.is_closing:
            raise ConnectionLost(f"connection to {self._where()} is closing")
        if not self.is_established:
            raise ConnectionLost(f"connection to {self._where()} is not established yet")

    def _close(self, close: Close) -> None:
        """Close the connection (once) and break everything that waits on it."""
        if self._closing or self._terminated:
            return
        self._closing = True
        if self._error is None:
            self._error = close.error
        if close.silent:
            # A half-open connection we accepted timed out: nothing is sent (its source
            # may be spoofed) and its slot is freed now, not after a closing period.
            self.endpoint.stats["quic_half_open_dropped"] += 1
            self._finish()
            self._lot.unpark_all()
            return
        self.quic.close(
            error_code=close.error_code,
            frame_type=QuicFrameType.CRYPTO if close.transport else None,
            reason_phrase=close.reason,
        )
        self._break_all(self._error)
        self.endpoint.peer_closing(self)
        self._ready.set()
        self.wake()

    def _break_all(self, error: P2PDError) -> None:
        for stream in list(self._streams.values()):
            stream.feed_connection_lost(error)
        self._blocked_writers.clear()

    # ---- the connection task

    async def run(self) -> None:
        """The connection's task (the endpoint starts it): steps when the deadline comes
        or the connection is woken, until the connection is gone. Cancelled, it tells
        the peer (CONNECTION_CLOSE) before returning."""
        try:
            while not self._terminated:
                # One cancel scope serves many waits: its deadline is moved, not a new
                # scope made, each time the connection's next deadline changes (here or
                # after a step in the receive path). Only when the deadline is reached
                # (a timer fires) does a new one start.
                with trio.CancelScope() as wait:
                    self._wait = wait
                    while True:
                        if self._stop or self._terminated:
                            return  # a step in the receive path ended the connection
                        self._kicked = False
                        if not self._safe_step():
                            return
                        if self._kicked:
                            # Woken during the step (a callback wrote something): go
                            # again, but let other tasks run first.
                            await trio.lowlevel.checkpoint()
                            continue
                        wait.deadline = self._next_deadline()
                        await self._lot.park()
        finally:
            self._wait = None
            if not self._terminated:
                # Cancelled: the endpoint is shutting down. Tell the peer now, in one
                # synchronous send, rather than let it wait for its idle timeout.
                self._close(
                    Close(
                        ConnectionLost("the QUIC endpoint shut down"),
                        AppError.SHUTDOWN,
                        "shutdown",
                        transport=False,
                    )
                )
                try:
                    self._transmit(trio.current_time())
                except Exception:
                    log.exception("could not send CONNECTION_CLOSE on %r", self)
                finally:
                    self._finish()

    def step_received(self) -> None:
        """The step for datagrams received in the UDP task's last burst, run by the
        endpoint's flush in that task (as aioquic's asyncio protocol transmits from
        ``datagram_received``): no wake-up of our task, which only has its deadline
        moved. Once the connection is over, the task is woken to finish it."""
        self._dirty = False
        self._step_here()

    def flush(self) -> None:
        """Send what the application wrote, now, in the caller's task (never blocks,
        never switches), as :meth:`step_received` does for what arrived: a stream's
        last write leaves before its writer goes on with its own work, not a scheduling
        round later in the connection's task."""
        self._step_here()

    def _step_here(self) -> None:
        """A step outside the connection's task; the task only has its deadline moved,
        or is woken to finish the connection once it is over."""
        if self._stop or self._terminated:
            return
        if not self._safe_step():
            self._stop = True
            self._lot.unpark_all()
            return
        wait = self._wait
        if wait is not None:  # else the task has not started yet; it steps first
            deadline = self._next_deadline()
            if deadline != wait.deadline:
                wait.deadline = deadline

    def _safe_step(self) -> bool:
        """One step; False once the connection is over."""
        try:
            self._step()
        except Exception:
            # aioquic turns a peer's protocol errors into a close and an event; anything
            # raised here is a bug (ours or aioquic's). It costs this connection, never
            # the endpoint.
            log.exception("internal error on %r; dropping the connection", self)
            if self._error is None:
                self._error = ConnectionLost(
                    f"connection to {self._where()} failed (internal error)"
                )
            return False
        return not self._terminated

    def _step(self) -> None:
        """Timer, events, the policy's verdict, then everything there is to send; again
        while the timer is already due by the time the datagrams are out."""
        quic = self.quic
        now = self._now = trio.current_time()
        for _ in range(STEP_PASSES):
            if self._timer_at is not None and now >= self._timer_at:
                # The deadline was computed before what arrived since (this step may be
                # the receive path's): aioquic's handle_timer acts on the loss deadline
                # of the last get_timer() call, so an ACK read late, after the PTO
                # deadline but before the timer ran, still fired the PTO it cancels (a
                # PING probe and a backed-off PTO, whenever a starved process read an
                # ACK before its connection task woke). Ask again first.
                self._timer_at = quic.get_timer()
                if self._timer_at is not None and now >= self._timer_at:
                    self._timer_at = None
                    quic.handle_timer(now)
            self._process_events()
            if self._terminated:
                return
            self._apply_policy(now)
            if self._terminated:
                return  # discarded silently
            self._report_address(now)
            sent = self._transmit(now)
            # get_timer() is safe only after connect() or the first receive_datagram()
            # (it compares with _close_at, which is None before); both happen before
            # any step.
            timer_at = self._timer_at = quic.get_timer()
            if not sent or timer_at is None:
                break
            # aioquic's pacer (recovery.QuicPacketPacer) sees one `now` per call, so its
            # token bucket never refills while a call builds and encrypts packets. With
            # a large window it lets out two or three packets and asks to be called
            # again a microsecond later: packet_time is floored at 1 us and the bucket
            # holds 16 packets' worth of time at cwnd/srtt, under 3 us once cwnd is a few
            # MB (it is on loopback, where nothing is lost and srtt is floored at 1 ms).
            # That deadline has passed by the time the packets are out; going through
            # the scheduler for it costs a scheduling round and a Cancelled per two
            # packets. Pass the real time instead, as often as the timer is due.
            now = self._now = trio.current_time()
            if now < timer_at:
                break
        if self._blocked_writers:
            self._wake_writers()

    def _transmit(self, now: float) -> bool:
        """Send what aioquic has to send; True if anything went out."""
        datagrams = self.quic.datagrams_to_send(now)
        if not datagrams:
            return False
        self.policy.sent(now)
        send_many = self.endpoint.send_many
        # One batch per destination (aioquic hands out one path's datagrams in a row):
        # the UDP endpoint gives the kernel each batch in as few calls as it can.
        batch: list[bytes] = []
        path = datagrams[0][1]
        for data, addr in datagrams:
            if addr != path:
                send_many(batch, path)
                batch, path = [], addr
            batch.append(data)
        send_many(batch, path)
        self._path = path
        return True

    def _report_address(self, now: float) -> None:
        """Tell the peer where we see it, when that changed or a resend is due."""
        if not self._reports_path():
            return
        report = self.reports.due(now, self._path)
        if report is not None:
            # Straight to aioquic, not send_datagram: a report is not use of the
            # connection (it must not keep an idle one open) and is 23 bytes.
            self.quic.send_datagram_frame(report)
            self.endpoint.stats["quic_observed_sent"] += 1

    def _reports_path(self) -> bool:
        """Whether we send reports on this connection now: established, a direct path
        of our main socket, and a peer that takes DATAGRAM frames."""
        return (
            self.is_established
            and not self._closing
            and bool(self.quic.remote_max_datagram_frame_size)
            and self.endpoint.observes_path(self._path)
        )

    def _on_transport_datagram(self, data: bytes) -> None:
        stats = self.endpoint.stats
        if not self.endpoint.observes_path(self._path):
            stats["quic_observed_ignored"] += 1  # a relayed or side-socket path
            return
        try:
            seen = self.reports.received(data, self._now)
        except WireError:
            stats["quic_transport_datagrams_malformed"] += 1
            return
        if seen is None:
            stats["quic_observed_ignored"] += 1  # stale, or too soon after the last
            return
        stats["quic_observed_received"] += 1
        self.endpoint.address_observed(self, seen)

    def _wake_writers(self) -> None:
        for stream in list(self._blocked_writers):
            if stream.wake_writer():
                self._blocked_writers.discard(stream)

    def _next_deadline(self) -> float:
        deadline = self._timer_at if self._timer_at is not None else math.inf
        if self._closing:
            return deadline
        if self._reports_path():
            deadline = min(deadline, self.reports.deadline())
        return min(deadline, self.policy.deadline(self._now, busy=bool(self._streams)))

    def _apply_policy(self, now: float) -> None:
        if self._closing:
            return
        verdict = self.policy.poll(now, busy=bool(self._streams))
        if isinstance(verdict, Close):
            log.debug("closing %r: %s", self, verdict.reason)
            self._close(verdict)
        elif verdict == PING:
            # Keep-alive (RFC 9000 section 10.1.2): an ack-eliciting PING.
            self._ping_uid += 1
            self.quic.send_ping(self._ping_uid)
            # Queued: the keep-alive is done for this interval even if aioquic cannot
            # send now (draining after the peer's CONNECTION_CLOSE, for 3 PTOs, while a
            # stream of ours is still open). Left due, it made every step "due" again at
            # once: a busy loop until the drain ended (forever under a mock clock:
            # tests/test_upgrade_fakenet.py, a relayed connection closed by the peer).
            self.policy.sent(now)

    def _process_events(self) -> None:
        quic = self.quic
        endpoint = self.endpoint
        while (event := quic.next_event()) is not None:
            # Most frequent first: this runs once per event in bulk transfers.
            if isinstance(event, events.StreamDataReceived):
                self._on_stream_data(event)
            elif isinstance(event, events.DatagramFrameReceived):
                if not self.is_established or self._closing:
                    pass
                elif is_transport_datagram(event.data):
                    self._on_transport_datagram(event.data)  # not activity: no use
                else:
                    self.policy.activity(self._now)
                    endpoint.deliver_datagram(self, event.data)
            elif isinstance(event, events.StreamReset):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.feed_reset(
                        StreamBroken(
                            f"stream {event.stream_id} reset by the peer "
                            f"(code {event.error_code:#x})"
                        )
                    )
            elif isinstance(event, events.StopSendingReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.feed_stop_sending(
                        StreamBroken(
                            f"the peer stopped reading stream {event.stream_id} "
                            f"(code {event.error_code:#x})"
                        )
                    )
            elif isinstance(event, events.HandshakeCompleted):
                self._on_handshake(event)
            elif isinstance(event, events.ConnectionIdIssued):
                self.add_connection_id(event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                self._cids.discard(event.connection_id)
                endpoint.unregister_cid(event.connection_id, self)
            elif isinstance(event, events.ConnectionTerminated):
                self._on_terminated(event)
                return

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        if not self.is_established or self._closing:
            return  # nothing is delivered before the peer's key is checked
        sid = event.stream_id
        stream = self._streams.get(sid)
        if stream is None:
            if sid in self._closed_stream_ids:
                if not self.quic.knows_stream(sid):
                    self._closed_stream_ids.discard(sid)
                return
            if stream_is_client_initiated(sid) == self.is_client:
                return  # one of ours, already closed and forgotten
            stream = QuicStream(self, self.quic, sid)
            if stream_is_unidirectional(sid) or not self.endpoint.accepts_streams:
                # We speak bidirectional streams only (docs/PROTOCOL.md).
                self.endpoint.stats["quic_streams_refused"] += 1
                self.quic.stop_stream(sid, AppError.STREAM_REFUSED)
                if not stream_is_unidirectional(sid):
                    self.quic.reset_stream(sid, AppError.STREAM_REFUSED)
                self._closed_stream_ids.add(sid)
                return
            self._streams[sid] = stream
            self.quic.track_consumption(sid)
            self.endpoint.start_stream_handler(self, stream)
        self.policy.activity(self._now)
        stream.feed_data(event.data, event.end_stream)

    def _on_handshake(self, event: events.HandshakeCompleted) -> None:
        if self._closing:
            return
        refusal = self.policy.handshake_completed(
            self._now, alpn=event.alpn_protocol, key=self.quic.peer_certificate_key()
        )
        if refusal is not None:
            self._close(refusal)
            return
        self.endpoint.peer_established(self)
        self._ready.set()

    def _on_terminated(self, event: events.ConnectionTerminated) -> None:
        if self._error is None:
            self._error = ConnectionLost(f"connection to {self._where()} {describe_close(event)}")
        log.debug("%r terminated: %s", self, describe_close(event))
        self._closing = True
        self._finish()

    def _finish(self) -> None:
        if self._terminated:
            return
        self._terminated = True
        error = self._error or ConnectionLost(f"connection to {self._where()} closed")
        self._break_all(error)
        self.endpoint.peer_closed(self)
        self._ready.set()
        self._done.set()
