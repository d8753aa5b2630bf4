"""Who gets a connection slot: :class:`SlotBudget`, a pure class fed connection events.

A spoofed Initial packet costs its sender 1,200 bytes and, without a budget, costs us a
connection slot and a TLS handshake until it times out; 1,024 global slots were filled
by about 1.2 MB every 10 s. The budget (docs/SECURITY.md, "QUIC budgets"; the
``QuicConfig`` fields in parentheses):

- **Address validation** (RFC 9000 section 8.1.2): once ``retry_after_half_open``
  incoming handshakes are in progress, an Initial without a valid Retry token is
  answered with a stateless Retry and takes nothing. A spoofed source never receives
  the token, so it never gets past this point.
- **Per address**: at most ``max_connections_per_address`` incoming connections and
  ``max_half_open_per_address`` incoming handshakes from one IP address, an IPv6 /64
  counting as one address (:func:`source_key`).
- **Reserve**: established connections from strangers (keys no contact pins) take at
  most ``max_connections`` minus the reserved share (``reserved_share``); the reserve
  is for our outgoing connections and for incoming connections from pinned contacts.
  A handshake's key is known only once it completes, so a handshake starts in the
  strangers' share while it has room (handshakes and strangers together), else in the
  reserve while fewer than half the reserve's slots are handshakes; one that proves a
  key no contact pins while strangers fill their share is then refused (closed with
  ``AppError.BUSY``). Spoofed sources hold at most ``retry_after_half_open``
  handshakes, so the reserve's handshakes stay open to validated clients; the other
  half of the reserve is never handshakes, so our outgoing connections always find a
  slot unless our own and our contacts' connections fill it.
- **Total**: ``max_connections`` slots in all, whatever their kind.

Each connection holds a :class:`Slot` from :meth:`SlotBudget.take_incoming` or
:meth:`SlotBudget.take_outgoing` until :meth:`SlotBudget.release`. The class does no
I/O and reads no clock (the half-open timeout is the connection policy's).
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter
from dataclasses import dataclass

from ...config import QuicConfig


def source_key(host: str) -> str:
    """What the per-address limits count as one source: the IPv4 address, or the /64 of
    an IPv6 address (a subscriber gets a /64 or more, RFC 6177, and picks any address in
    it at will; an IPv4-mapped IPv6 address is its IPv4 address)."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    prefix = ipaddress.IPv6Network((int(address) >> 64 << 64, 64))
    return str(prefix)


class SlotKind(enum.Enum):
    OUTGOING = "outgoing"
    #: An incoming handshake in progress.
    HALF_OPEN = "half_open"
    #: An established incoming connection whose key no contact pins.
    STRANGER = "stranger"
    #: An established incoming connection from a pinned contact.
    PINNED = "pinned"


@dataclass(slots=True)
class Slot:
    """The slot one connection holds; ``host`` is the peer's :func:`source_key`."""

    kind: SlotKind
    host: str
    released: bool = False


class Verdict(enum.Enum):
    """What to do with an Initial packet that would start an incoming connection."""

    ADMIT = "admit"
    #: Answer with a Retry (the address is not validated and handshakes are many).
    RETRY = "retry"
    #: Refuse: that address holds its share of connections or handshakes.
    REFUSE_ADDRESS = "refused_per_address"
    #: Refuse: the strangers' share (or every slot) is taken.
    REFUSE_FULL = "refused_full"


class SlotBudget:
    """The connection slots of one endpoint (module docstring)."""

    def __init__(self, config: QuicConfig) -> None:
        self.config = config
        reserved = int(config.max_connections * config.reserved_share)
        #: Slots established strangers may hold (and handshakes, while they have room).
        self.strangers_share = config.max_connections - reserved
        #: Handshakes may start beyond the strangers' share while fewer are in progress.
        self.reserve_handshakes = reserved // 2
        self._kinds: Counter[SlotKind] = Counter()
        self._incoming_by_host: Counter[str] = Counter()
        self._half_open_by_host: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self._kinds.values())

    @property
    def half_open(self) -> int:
        return self._kinds[SlotKind.HALF_OPEN]

    def incoming(self, host: str, *, validated: bool) -> Verdict:
        """The verdict on an Initial from ``host``; ``validated``: it carried a valid
        Retry token (the sender receives at that address)."""
        config = self.config
        if not validated and self.half_open >= config.retry_after_half_open:
            return Verdict.RETRY
        if (
            self._incoming_by_host[host] >= config.max_connections_per_address
            or self._half_open_by_host[host] >= config.max_half_open_per_address
        ):
            return Verdict.REFUSE_ADDRESS
        if self.total >= config.max_connections:
            return Verdict.REFUSE_FULL
        half_open = self.half_open
        if half_open + self._kinds[SlotKind.STRANGER] < self.strangers_share:
            return Verdict.ADMIT
        if half_open < self.reserve_handshakes:
            return Verdict.ADMIT  # in the reserve: it stays only if its key is pinned
        return Verdict.REFUSE_FULL

    def take_incoming(self, host: str) -> Slot:
        """A half-open slot for an Initial :meth:`incoming` admitted."""
        self._kinds[SlotKind.HALF_OPEN] += 1
        self._incoming_by_host[host] += 1
        self._half_open_by_host[host] += 1
        return Slot(SlotKind.HALF_OPEN, host)

    def take_outgoing(self, host: str) -> Slot | None:
        """A slot for a connection we make; None if every slot is taken (the reserve
        keeps room for it unless pinned contacts and our own connections fill it)."""
        if self.total >= self.config.max_connections:
            return None
        self._kinds[SlotKind.OUTGOING] += 1
        return Slot(SlotKind.OUTGOING, host)

    def established(self, slot: Slot, *, pinned: bool) -> bool:
        """An incoming handshake completed; ``pinned``: a contact pins the peer's key.
        False if the connection must be refused (a stranger, and strangers fill their
        share): its slot stays a handshake until :meth:`release`."""
        if slot.released or slot.kind is not SlotKind.HALF_OPEN:
            return True
        if not pinned and self._kinds[SlotKind.STRANGER] >= self.strangers_share:
            return False
        self._half_open_by_host[slot.host] -= 1
        self._forget_zero(self._half_open_by_host, slot.host)
        self._kinds[SlotKind.HALF_OPEN] -= 1
        slot.kind = SlotKind.PINNED if pinned else SlotKind.STRANGER
        self._kinds[slot.kind] += 1
        return True

    def release(self, slot: Slot) -> None:
        """The connection is gone (or no longer counts: closing); idempotent."""
        if slot.released:
            return
        slot.released = True
        self._kinds[slot.kind] -= 1
        if slot.kind is SlotKind.OUTGOING:
            return
        self._incoming_by_host[slot.host] -= 1
        self._forget_zero(self._incoming_by_host, slot.host)
        if slot.kind is SlotKind.HALF_OPEN:
            self._half_open_by_host[slot.host] -= 1
            self._forget_zero(self._half_open_by_host, slot.host)

    @staticmethod
    def _forget_zero(counter: Counter[str], host: str) -> None:
        # Keep the per-host maps as large as the connections, not as every host seen.
        if counter[host] <= 0:
            del counter[host]

    def statistics(self) -> dict[str, int]:
        return {
            "slots_total": self.total,
            "slots_max": self.config.max_connections,
            "strangers_share": self.strangers_share,
            "reserve_handshakes": self.reserve_handshakes,
            **{f"slots_{kind.value}": self._kinds[kind] for kind in SlotKind},
            "addresses": len(self._incoming_by_host),
        }
