"""A direct path after a relayed one (issue 13, item 4, in part): connection reversal and
simultaneous open, coordinated over the relayed connection.

When delivery connects to a peer through a relay, :meth:`Puncher.relayed` starts, at
most once per peer per :data:`PUNCH_INTERVAL`:

1. punch: :data:`PUNCHES` small datagrams (relay frame ``PUNCH``, 9 bytes, dropped by
   whoever gets them) to each address the peer's record lists, which opens our own
   NAT's filter to them (RFC 4787 section 5: a filter lets in what answers what went
   out);
2. tell the peer where we are, inside the session (a signal, like address hints:
   ``{"type": "punch", "addresses": [...]}``, at most 8), over the relayed connection;
3. try QUIC handshakes to the peer's addresses for :data:`DIRECT_WINDOW` seconds.

The peer, on that signal (:meth:`Puncher.received`, only from a key with a session,
at most once per :data:`PUNCH_INTERVAL`), punches our addresses and tries handshakes to
them. Where one side is public, the NATed side's handshake simply goes out (connection
reversal); where both are behind endpoint-independent NATs, each side's punch opens its
own filter to the other's mapped address and a handshake gets through (simultaneous
open, as in RFC 5128 section 3.3). Behind an endpoint-dependent NAT on both sides the
mapped port towards a new destination is unknown: nothing here guesses it (the
birthday approach of p2pd/transport/punch.py, whose offers could travel in this round's
signal, is not wired here yet), the relay stays the path.

Once a direct connection exists, delivery prefers it (p2pd/delivery/paths.py): new
exchanges go direct; a call in progress stays on the connection it started on.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable

import trio

from ..errors import InvalidAddress
from ..identity import fingerprint
from ..wire import Address
from .frames import Punch

log = logging.getLogger(__name__)

PUNCH_TYPE = "punch"
#: Addresses one punch signal carries at most (as a record).
MAX_PUNCH_ADDRESSES = 8
MAX_PUNCH_TEXT = 1024
#: One punch round per peer this often at most, each way.
PUNCH_INTERVAL = 60.0
#: Datagrams sent to each address, this far apart (one may be lost).
PUNCHES = 2
PUNCH_GAP = 0.05
#: How long handshakes to the peer's addresses are tried.
DIRECT_WINDOW = 3.0
#: How long the signal may take to be acknowledged.
SIGNAL_TIMEOUT = 10.0
#: Rounds queued at most (beyond: dropped, the next relayed connection tries again);
#: peers remembered for the rate limit.
MAX_QUEUED = 32
MAX_REMEMBERED = 1024
#: Punch signals answered a minute, from all peers together: an answer sends up to
#: 8 x 2 punches of 9 bytes and QUIC Initials (1,200 bytes, retransmitted) for 3 s to
#: addresses a peer named, so strangers with fresh keys get a bounded share.
ANSWERS_PER_MINUTE = 30


def encode_punch(addresses: list[Address]) -> str:
    return json.dumps(
        {"type": PUNCH_TYPE, "addresses": [str(a) for a in addresses[:MAX_PUNCH_ADDRESSES]]}
    )


def is_punch(text: str) -> bool:
    if len(text) > MAX_PUNCH_TEXT:
        return False
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("type") == PUNCH_TYPE


def decode_punch(text: str) -> list[Address]:
    """A punch signal's addresses; ValueError for anything malformed."""
    if len(text) > MAX_PUNCH_TEXT:
        raise ValueError("punch signal too long")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError("punch signal is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"type", "addresses"}:
        raise ValueError("not a punch signal")
    raw = doc["addresses"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_PUNCH_ADDRESSES:
        raise ValueError(f"a punch signal holds 1 to {MAX_PUNCH_ADDRESSES} addresses")
    out: list[Address] = []
    for item in raw:
        if not isinstance(item, str):
            raise ValueError("a punch signal holds HOST:PORT strings")
        try:
            address = Address.parse(item)
        except InvalidAddress as exc:
            raise ValueError(f"bad address in punch signal: {exc.message}") from None
        if address.port == 0 or address.host in ("0.0.0.0", "::"):
            raise ValueError("a punch address needs a host and a port")
        if address not in out:
            out.append(address)
    return out


class Puncher:
    """Punch rounds, run by :meth:`run` (``await nursery.start(puncher.run)``).

    ``our_addresses()``: what we tell the peer (our advertised addresses, the mapped one
    first); ``peer_addresses(key)``: where the peer's record says it is; ``handle_of``:
    the handle we hold for a key (a session peer); ``send_signal(handle, key, text)``:
    delivery's signal path; ``connect(address, key)``: a QUIC handshake that must prove
    ``key``; ``punch(data, addr)``: send one datagram from our socket; ``direct(key)``:
    whether a direct connection to the key is open."""

    def __init__(
        self,
        *,
        our_addresses: Callable[[], list[Address]],
        peer_addresses: Callable[[bytes], list[Address]],
        handle_of: Callable[[bytes], str | None],
        send_signal: Callable[[str, bytes, str], Awaitable[object]],
        connect: Callable[[Address, bytes], Awaitable[object]],
        punch: Callable[[bytes, Address], None],
        direct: Callable[[bytes], bool],
    ) -> None:
        self._our_addresses = our_addresses
        self._peer_addresses = peer_addresses
        self._handle_of = handle_of
        self._send_signal = send_signal
        self._connect = connect
        self._punch = punch
        self._direct = direct
        self.stats: Counter[str] = Counter()
        self._last: OrderedDict[tuple[bytes, bool], float] = OrderedDict()
        self._answered: deque[float] = deque()
        self._in, self._out = trio.open_memory_channel[tuple[bytes, list[Address] | None]](
            MAX_QUEUED
        )

    # ------------------------------------------------------------------ triggers

    def relayed(self, key: bytes) -> None:
        """Delivery holds a connection to ``key`` through a relay: try for a direct one."""
        if self._direct(key) or not self._may(key, initiator=True):
            return
        self._queue(key, None)

    def received(self, key: bytes, text: str, *, relayed: bool) -> None:
        """A punch signal from ``key`` (authenticated by the session it came in),
        ``relayed`` if it came over a connection through a relay. Answered only then,
        once per key per :data:`PUNCH_INTERVAL` and :data:`ANSWERS_PER_MINUTE` times a
        minute in all: each answer sends handshakes to addresses the peer named."""
        if not relayed:
            self.stats["punch_refused"] += 1
            return
        try:
            addresses = decode_punch(text)
        except ValueError as exc:
            self.stats["punch_refused"] += 1
            log.info("refused a punch signal from %s: %s", fingerprint(key)[:12], exc)
            return
        self.stats["punch_received"] += 1
        if self._direct(key) or not self._may(key, initiator=False):
            return
        now = trio.current_time()
        while self._answered and self._answered[0] <= now - 60.0:
            self._answered.popleft()
        if len(self._answered) >= ANSWERS_PER_MINUTE:
            self.stats["punch_over_budget"] += 1
            return
        self._answered.append(now)
        self._queue(key, addresses)

    def _may(self, key: bytes, *, initiator: bool) -> bool:
        now = trio.current_time()
        last = self._last.get((key, initiator))
        if last is not None and now - last < PUNCH_INTERVAL:
            return False
        self._last[(key, initiator)] = now
        self._last.move_to_end((key, initiator))
        while len(self._last) > MAX_REMEMBERED:
            self._last.popitem(last=False)
        return True

    def _queue(self, key: bytes, addresses: list[Address] | None) -> None:
        try:
            self._in.send_nowait((key, addresses))
        except trio.WouldBlock:
            self.stats["punch_dropped"] += 1

    # ------------------------------------------------------------------ rounds

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for key, addresses in self._out:
                nursery.start_soon(self._round, key, addresses)

    async def _round(self, key: bytes, addresses: list[Address] | None) -> None:
        initiator = addresses is None
        targets = self._peer_addresses(key) if initiator else (addresses or [])
        targets = targets[:MAX_PUNCH_ADDRESSES]
        self.stats["punch_rounds_initiated" if initiator else "punch_rounds_answered"] += 1
        await self._send_punches(targets)
        if initiator:
            handle, ours = self._handle_of(key), self._our_addresses()
            if handle is None or not ours:
                return
            try:
                with trio.fail_after(SIGNAL_TIMEOUT):
                    await self._send_signal(handle, key, encode_punch(ours))
            except Exception as exc:  # the relayed connection broke: nothing to do
                log.info("punch signal to %s not delivered: %s", handle, exc)
                return
        if not targets:
            return
        with trio.move_on_after(DIRECT_WINDOW):
            async with trio.open_nursery() as nursery:
                for target in targets:
                    nursery.start_soon(self._try, key, target, nursery.cancel_scope)
        if self._direct(key):
            self.stats["punch_direct"] += 1
            log.info("a direct connection to %s is open", fingerprint(key)[:12])

    async def _send_punches(self, targets: list[Address]) -> None:
        for i in range(PUNCHES):
            for target in targets:
                self._punch(punch_datagram(), target)
            if i + 1 < PUNCHES:
                await trio.sleep(PUNCH_GAP)

    async def _try(self, key: bytes, target: Address, done: trio.CancelScope) -> None:
        try:
            await self._connect(target, key)
        except Exception as exc:  # ConnectionLost, PeerKeyMismatch, LocalError: next one
            log.debug("no direct connection to %s at %s: %s", fingerprint(key)[:12], target, exc)
            return
        done.cancel()

    def statistics(self) -> dict[str, int]:
        return dict(self.stats)


def punch_datagram() -> bytes:
    """A relay frame PUNCH (docs/PROTOCOL.md, "Relays"): the type and 8 random bytes."""
    return Punch(os.urandom(8)).encode()
