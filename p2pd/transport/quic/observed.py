"""Address discovery on QUIC connections (issue 13, item 1): each side of an established
connection tells the other the address it sees it from, the idea of
draft-ietf-quic-address-discovery's OBSERVED_ADDRESS frame. Sans-I/O: one
:class:`AddressReports` per connection, fed ``now`` and bytes by
:class:`~p2pd.transport.quic.peer.QuicPeer`.

**Why a DATAGRAM frame and not a new QUIC frame type.** aioquic 1.7.2 has no hook for
extension frames: its frame handlers are a name-mangled private table in
``QuicConnection`` and an unknown frame type closes the connection with
FRAME_ENCODING_ERROR, so a new frame would need a copy of its packet parser and builder
and would break every older p2pd peer; the draft's transport parameter cannot be sent
either. A DATAGRAM frame (RFC 9221) is already negotiated by every p2pd node, is
encrypted and authenticated like the rest of the connection, and an older peer drops it
as media of an unknown version. It is unreliable, so a report is sent again every
:data:`RESEND_INTERVAL` and at once when the address changes (a NAT rebinding seen by
aioquic as a new path). The sequence number plays the draft's role: a report older than
the newest one taken is ignored.

Wire format (docs/PROTOCOL.md, "Observed address"): exactly :data:`REPORT_LEN` bytes,
``0x01``, a 4-byte sequence number (big endian, from 1), then the address as in a DHT
reply's ``observed`` field (16-byte IP, IPv4-mapped, and a 2-byte port). Every DATAGRAM
whose first byte is below ``0x10`` belongs to the transport (media's first byte is
``0x1_`` and up: its high nibble is the media format version, 1); the transport drops
and counts the kinds it does not know.

What a report is worth is the receiver's business: it counts as one observer group's
view, like a DHT reply's (p2pd/dht/reachability.py); at most one report per connection
is taken per :data:`MIN_REPORT_GAP`.
"""

from __future__ import annotations

import math
import struct

from ... import wire
from ...errors import WireError
from ...wire import Address

#: A DATAGRAM whose first byte is below this is the transport's, not media's.
TRANSPORT_KIND_LIMIT = 0x10
#: The kind byte of an observed-address report.
OBSERVED_ADDRESS = 0x01
#: kind (1) + sequence number (4) + address (18).
REPORT_LEN = 1 + 4 + wire.OBSERVED_LEN
#: A report goes out again this often while the address stays the same (it may be lost).
RESEND_INTERVAL = 30.0
#: Reports of one connection taken at most this often (more are dropped and counted).
MIN_REPORT_GAP = 1.0
_SEQ_MAX = 2**32 - 1


def is_transport_datagram(data: bytes) -> bool:
    """Whether a DATAGRAM frame's payload is the transport's (an empty one is too: it is
    nobody's, and dropped as malformed)."""
    return not data or data[0] < TRANSPORT_KIND_LIMIT


def encode_report(seq: int, address: tuple[str, int]) -> bytes:
    if not 0 < seq <= _SEQ_MAX:
        raise ValueError(f"sequence number out of range: {seq}")
    return bytes([OBSERVED_ADDRESS]) + struct.pack(">I", seq) + wire.encode_observed(address)


def decode_report(data: bytes) -> tuple[int, Address]:
    """(sequence number, address) of a report; WireError for anything else."""
    if len(data) != REPORT_LEN or data[0] != OBSERVED_ADDRESS:
        raise WireError("observed-address report malformed")
    seq = struct.unpack(">I", data[1:5])[0]
    if seq == 0:
        raise WireError("observed-address report with sequence number 0")
    return seq, wire.decode_observed(data[5:])


class AddressReports:
    """The reports of one connection, both ways.

    Sending: :meth:`due` returns the report to send now (the address we see the peer at
    changed, or :data:`RESEND_INTERVAL` passed), else None; :meth:`deadline` says when
    the next one is due. Receiving: :meth:`received` returns the address the peer says
    it sees us at, or None for a stale or too early report; WireError if malformed.
    """

    def __init__(self) -> None:
        self._seq = 0
        self._sent: tuple[str, int] | None = None
        self._next_send = -math.inf
        self._taken_seq = 0
        self._taken_at = -math.inf

    def due(self, now: float, peer_address: tuple[str, int]) -> bytes | None:
        if peer_address == self._sent and now < self._next_send:
            return None
        if self._seq >= _SEQ_MAX:
            return None  # 2**32 reports: at one per 30 s, never in practice
        self._seq += 1
        self._sent = peer_address
        self._next_send = now + RESEND_INTERVAL
        return encode_report(self._seq, peer_address)

    def deadline(self) -> float:
        return self._next_send

    def received(self, data: bytes, now: float) -> Address | None:
        seq, address = decode_report(data)
        if seq <= self._taken_seq or now - self._taken_at < MIN_REPORT_GAP:
            return None
        self._taken_seq = seq
        self._taken_at = now
        return address
