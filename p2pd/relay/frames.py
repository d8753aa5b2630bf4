"""Relay frames (docs/PROTOCOL.md, "Relays"): pure codecs, every length fixed or bounded.

A relay frame is one UDP datagram on the node's one port whose first byte is in
``0x04``..``0x3e`` (p2pd/transport/udp.py demultiplexes on it; ``0x3f`` is the hole-punch
probe of p2pd/transport/punch.py). The first byte is the
frame type; the rest has a fixed layout per type, except ``DATA``, whose payload (an
opaque QUIC packet of the two peers' end-to-end connection) is bounded by
:data:`MAX_PAYLOAD`.

Client -> relay: :class:`Hello`, :class:`Register`, :class:`Connect`, :class:`Accept`,
:class:`Data` (``DATA_TO_RELAY``), :class:`Keepalive`. Relay -> client:
:class:`Challenge`, :class:`Registered`, :class:`Incoming`, :class:`Connected`,
:class:`Refused`, :class:`Data` (``DATA_FROM_RELAY``), :class:`Alive`, :class:`Seen`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .. import wire
from ..errors import WireError
from ..wire import Address


class RelayFrameError(WireError):
    """A relay frame that does not decode (unknown type, wrong length)."""


#: The first bytes p2pd/transport/udp.py hands to the relay.
FIRST_BYTE_MIN = 0x04
FIRST_BYTE_MAX = 0x3E  # 0x3f: hole-punch probes (p2pd/transport/punch.py)
NONCE = 8
COOKIE = 16
KEY = 32
SIGNATURE = 64
CIRCUIT = 8
#: Largest relayed QUIC packet: our QUIC sends at most 1,200-byte datagrams
#: (QuicConfig.max_datagram_size); 1,452 is what a 1,500-byte IPv6 path carries
#: (1,500 - 40 - 8) and leaves room for a larger configured size on a known path.
MAX_PAYLOAD = 1452
#: The header a relay puts before a payload: type and circuit id. A relayed frame out is
#: exactly as long as the frame that came in (docs/SECURITY.md, "Relays").
DATA_HEADER = 1 + CIRCUIT
#: A Hello is padded to this size, larger than the Challenge that answers it.
HELLO_SIZE = 32

REGISTER_CONTEXT = b"p2pd relay register v1\x00"
CONNECT_CONTEXT = b"p2pd relay connect v1\x00"


class FrameType(enum.IntEnum):
    HELLO = 0x04
    CHALLENGE = 0x05
    REGISTER = 0x06
    REGISTERED = 0x07
    CONNECT = 0x08
    INCOMING = 0x09
    ACCEPT = 0x0A
    CONNECTED = 0x0B
    REFUSED = 0x0C
    DATA_TO_RELAY = 0x0D
    DATA_FROM_RELAY = 0x0E
    KEEPALIVE = 0x0F
    ALIVE = 0x10
    SEEN = 0x11


#: The frames a relay (server) takes; the others are for its clients.
TO_RELAY = frozenset(
    {
        FrameType.HELLO,
        FrameType.REGISTER,
        FrameType.CONNECT,
        FrameType.ACCEPT,
        FrameType.DATA_TO_RELAY,
        FrameType.KEEPALIVE,
    }
)


class RefusalReason(enum.IntEnum):
    #: a cookie that is not ours, for another address, or too old: ask again
    BAD_COOKIE = 1
    BAD_SIGNATURE = 2
    #: the relay holds no registration for the key asked for
    UNKNOWN_TARGET = 3
    #: a cap: registrations, circuits, per peer
    BUSY = 4
    #: this node does not relay (turned off, or behind a NAT itself)
    NOT_A_RELAY = 5


@dataclass(frozen=True, slots=True)
class Hello:
    nonce: bytes

    def encode(self) -> bytes:
        return bytes([FrameType.HELLO]) + self.nonce + bytes(HELLO_SIZE - 1 - NONCE)


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes
    cookie: bytes

    def encode(self) -> bytes:
        return bytes([FrameType.CHALLENGE]) + self.nonce + self.cookie


@dataclass(frozen=True, slots=True)
class Register:
    """Keep ``key`` reachable through this relay at the address this came from."""

    key: bytes
    cookie: bytes
    signature: bytes

    @staticmethod
    def signed_part(cookie: bytes) -> bytes:
        return REGISTER_CONTEXT + cookie

    def encode(self) -> bytes:
        return bytes([FrameType.REGISTER]) + self.key + self.cookie + self.signature


@dataclass(frozen=True, slots=True)
class Registered:
    cookie: bytes
    #: seconds the registration holds unless refreshed
    lifetime: int

    def encode(self) -> bytes:
        return bytes([FrameType.REGISTERED]) + self.cookie + struct.pack(">H", self.lifetime)


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a circuit from ``key`` (at the address this came from) to ``target``."""

    key: bytes
    target: bytes
    cookie: bytes
    signature: bytes

    @staticmethod
    def signed_part(cookie: bytes, target: bytes) -> bytes:
        return CONNECT_CONTEXT + cookie + target

    def encode(self) -> bytes:
        return bytes([FrameType.CONNECT]) + self.key + self.target + self.cookie + self.signature


@dataclass(frozen=True, slots=True)
class Incoming:
    """To a registered client: ``key`` asks for a circuit to you."""

    circuit: bytes
    key: bytes

    def encode(self) -> bytes:
        return bytes([FrameType.INCOMING]) + self.circuit + self.key


@dataclass(frozen=True, slots=True)
class Accept:
    """The registered client asks for the circuit too."""

    circuit: bytes

    def encode(self) -> bytes:
        return bytes([FrameType.ACCEPT]) + self.circuit


@dataclass(frozen=True, slots=True)
class Connected:
    cookie: bytes
    circuit: bytes

    def encode(self) -> bytes:
        return bytes([FrameType.CONNECTED]) + self.cookie + self.circuit


@dataclass(frozen=True, slots=True)
class Refused:
    """The request of type ``refused`` (REGISTER or CONNECT) with ``cookie`` is refused."""

    cookie: bytes
    refused: int
    reason: int

    def encode(self) -> bytes:
        return bytes([FrameType.REFUSED]) + self.cookie + bytes([self.refused, self.reason])


@dataclass(frozen=True, slots=True)
class Data:
    """One opaque packet on a circuit; ``to_relay`` picks the type byte."""

    to_relay: bool
    circuit: bytes
    payload: bytes

    def encode(self) -> bytes:
        kind = FrameType.DATA_TO_RELAY if self.to_relay else FrameType.DATA_FROM_RELAY
        return bytes([kind]) + self.circuit + self.payload


@dataclass(frozen=True, slots=True)
class Keepalive:
    """From a registered client every few seconds: is ``key`` registered at the address
    this came from? Keeps the NAT mapping towards the relay and finds out, within one
    round trip, that it moved (a router's reboot or flush) or that the relay is gone."""

    nonce: bytes
    key: bytes

    def encode(self) -> bytes:
        return bytes([FrameType.KEEPALIVE]) + self.nonce + self.key


@dataclass(frozen=True, slots=True)
class Alive:
    """The relay's answer to a :class:`Keepalive` (its nonce): ``here`` is True when a
    registration of that key is held at exactly the address the keepalive came from."""

    nonce: bytes
    here: bool

    def encode(self) -> bytes:
        return bytes([FrameType.ALIVE]) + self.nonce + bytes([1 if self.here else 0])


@dataclass(frozen=True, slots=True)
class Seen:
    """When a circuit opens, to each end: the relay sees the *other* end of ``circuit``
    at ``address`` (issue 13: a hole-punching candidate, the peer's mapping towards the
    relay, as STUN would have told it)."""

    circuit: bytes
    address: Address

    def encode(self) -> bytes:
        return (
            bytes([FrameType.SEEN]) + self.circuit + wire.encode_observed(self.address.as_tuple())
        )


Frame = (
    (Hello | Challenge | Register | Registered | Connect | Incoming | Accept | Connected | Refused)
    | Data
    | Keepalive
    | Alive
    | Seen
)

_SIZES = {
    FrameType.HELLO: HELLO_SIZE,
    FrameType.CHALLENGE: 1 + NONCE + COOKIE,
    FrameType.REGISTER: 1 + KEY + COOKIE + SIGNATURE,
    FrameType.REGISTERED: 1 + COOKIE + 2,
    FrameType.CONNECT: 1 + KEY + KEY + COOKIE + SIGNATURE,
    FrameType.INCOMING: 1 + CIRCUIT + KEY,
    FrameType.ACCEPT: 1 + CIRCUIT,
    FrameType.CONNECTED: 1 + COOKIE + CIRCUIT,
    FrameType.REFUSED: 1 + COOKIE + 2,
    FrameType.KEEPALIVE: 1 + NONCE + KEY,
    FrameType.ALIVE: 1 + NONCE + 1,
    FrameType.SEEN: 1 + CIRCUIT + wire.OBSERVED_LEN,
}


def decode(data: bytes) -> Frame:
    """One relay frame; raises :class:`RelayFrameError` and nothing else."""
    if not data:
        raise RelayFrameError("empty relay frame")
    try:
        kind = FrameType(data[0])
    except ValueError:
        raise RelayFrameError(f"unknown relay frame type 0x{data[0]:02x}") from None
    if kind in (FrameType.DATA_TO_RELAY, FrameType.DATA_FROM_RELAY):
        if not DATA_HEADER < len(data) <= DATA_HEADER + MAX_PAYLOAD:
            raise RelayFrameError("relay data frame of a bad size")
        return Data(kind is FrameType.DATA_TO_RELAY, data[1:DATA_HEADER], data[DATA_HEADER:])
    if len(data) != _SIZES[kind]:
        raise RelayFrameError(f"relay frame {kind.name} of {len(data)} bytes")
    b = data[1:]
    if kind is FrameType.HELLO:
        return Hello(b[:NONCE])
    if kind is FrameType.CHALLENGE:
        return Challenge(b[:NONCE], b[NONCE:])
    if kind is FrameType.REGISTER:
        return Register(b[:KEY], b[KEY : KEY + COOKIE], b[KEY + COOKIE :])
    if kind is FrameType.REGISTERED:
        return Registered(b[:COOKIE], struct.unpack(">H", b[COOKIE:])[0])
    if kind is FrameType.CONNECT:
        return Connect(b[:KEY], b[KEY : 2 * KEY], b[2 * KEY : 2 * KEY + COOKIE], b[-SIGNATURE:])
    if kind is FrameType.INCOMING:
        return Incoming(b[:CIRCUIT], b[CIRCUIT:])
    if kind is FrameType.ACCEPT:
        return Accept(b)
    if kind is FrameType.CONNECTED:
        return Connected(b[:COOKIE], b[COOKIE:])
    if kind is FrameType.KEEPALIVE:
        return Keepalive(b[:NONCE], b[NONCE:])
    if kind is FrameType.ALIVE:
        if b[NONCE] > 1:
            raise RelayFrameError(f"relay frame ALIVE with status {b[NONCE]}")
        return Alive(b[:NONCE], b[NONCE] == 1)
    if kind is FrameType.SEEN:
        try:
            seen = wire.decode_observed(b[CIRCUIT:])
        except WireError as exc:
            raise RelayFrameError(f"relay frame SEEN: {exc}") from None
        return Seen(b[:CIRCUIT], seen)
    return Refused(b[:COOKIE], b[COOKIE], b[COOKIE + 1])
