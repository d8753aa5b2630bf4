"""The one place that turns bytes from the network into values, and back.

Everything here is pure: no sockets, no clocks. Every decoder bounds every length before
it trusts it and raises only :class:`~p2pd.errors.WireError` on bad input (the property
tests in tests/test_wire.py hold it to that). Formats are specified in docs/PROTOCOL.md.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import InvalidAddress, OldFrameVersion, WireError
from .identity import HANDLE_MAX as MAX_HANDLE_LEN
from .identity import is_valid_handle

# --------------------------------------------------------------------------- primitives


class Reader:
    """A cursor over bytes whose every read is bounds-checked."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise WireError("truncated input")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    @property
    def position(self) -> int:
        return self._pos

    def end(self) -> None:
        if self._pos != len(self._data):
            raise WireError("trailing bytes")


# --------------------------------------------------------------------------- addresses


@functools.lru_cache(maxsize=4096)
def _canonical_ip(host: str) -> str | None:
    """The one spelling of an IP literal, or None. Cached: contacts repeat constantly."""
    if not isinstance(host, str) or len(host) > 64 or "%" in host:
        # Zone ids ("fe80::1%eth0") carry arbitrary text and name a local interface:
        # meaningless on another machine, so never accepted from the wire.
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """An IP literal and a UDP port. Hostnames are never put on the wire."""

    host: str
    port: int

    def __post_init__(self) -> None:
        canonical = _canonical_ip(self.host)
        if canonical is None:
            raise InvalidAddress(f"not an IP address: {self.host[:64]!r}")
        if canonical != self.host:  # one spelling per address
            object.__setattr__(self, "host", canonical)
        if not (0 <= self.port <= 65535):
            raise InvalidAddress(f"port out of range: {self.port}")

    @property
    def version(self) -> int:
        return 6 if ":" in self.host else 4

    @classmethod
    def parse(cls, text: str, *, default_port: int | None = None) -> Address:
        """``HOST:PORT`` or ``[V6]:PORT`` (HOST an IP literal)."""
        text = text.strip()
        host, port_text = text, ""
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise InvalidAddress(f"invalid address {text[:80]!r}: missing ']'")
            host, rest = text[1:close], text[close + 1 :]
            if rest and not rest.startswith(":"):
                raise InvalidAddress(f"invalid address {text[:80]!r}")
            port_text = rest[1:]
        elif text.count(":") == 1:
            host, port_text = text.split(":")
        if not port_text:
            if default_port is None:
                raise InvalidAddress(f"invalid address {text[:80]!r}: expected HOST:PORT")
            port = default_port
        else:
            if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
                raise InvalidAddress(f"invalid port in {text[:80]!r}")
            port = int(port_text)
        addr = cls(host, port)
        if port_text and not (0 <= port <= 65535):
            raise InvalidAddress(f"port out of range in {text[:80]!r}")
        return addr

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def encode(self) -> bytes:
        """family (4 or 6) || raw IP (4 or 16 bytes) || port (u16 BE)."""
        ip = ipaddress.ip_address(self.host)
        return bytes([ip.version]) + ip.packed + struct.pack(">H", self.port)

    @classmethod
    def decode_from(cls, reader: Reader) -> Address:
        family = reader.u8()
        if family == 4:
            raw = reader.take(4)
        elif family == 6:
            raw = reader.take(16)
        else:
            raise WireError(f"unknown address family {family}")
        port = reader.u16()
        if port == 0:
            raise WireError("address with port 0")
        return cls(str(ipaddress.ip_address(raw)), port)

    def as_tuple(self) -> tuple[str, int]:
        return (self.host, self.port)


# --------------------------------------------------------------------------- DHT frames
#
# Frame version 2 (docs/PROTOCOL.md, "DHT frames"), demultiplexed on the first byte:
#   0x02 request | 0x03 response, then a 20-byte message id, then one msgpack value.
# Version 1 (rpcudp's 0x00 request | 0x01 response, ids declared by the sender) is
# recognised only to be refused: split_frame raises OldFrameVersion.

FRAME_REQUEST = 0x02
FRAME_RESPONSE = 0x03
FRAME_V1_REQUEST = 0x00
FRAME_V1_RESPONSE = 0x01
#: Every first byte the node's UDP socket hands to the DHT.
DHT_FIRST_BYTES = range(0x00, 0x04)
MSG_ID_LEN = 20
NODE_ID_LEN = 20
KEY_LEN = 20
#: Largest DHT frame we send or accept: a find_value reply with a full record and contacts.
MAX_FRAME = 8192
MAX_VALUE = 4096
MAX_CONTACTS = 32
#: A sealed mailbox entry (docs/PROTOCOL.md, "Mailboxes").
MAX_MAILBOX_ENTRY = 2048
#: A mailbox put: an entry, or a contact's pass and an entry (p2pd/dht/mailbox_pass.py).
MAX_MAILBOX_PUT = MAX_MAILBOX_ENTRY + 256
MAILBOX_ID_LEN = 16
#: Entries per fetch reply: three of the largest still fit in one frame.
MAILBOX_PAGE = 3
MAILBOX_DELETE_MAX = 16
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64
#: What a reply to a request with ``prove`` set is signed under (with the message id and
#: the reply's msgpack bytes): a node key's signature over this is no other statement.
REPLY_CONTEXT = b"p2pd dht reply v2\x00"
#: What a ``proof`` request's signature is made under (with the node key of the node it
#: is sent to and the cookie that node handed out): a statement of no other kind.
PROOF_CONTEXT = b"p2pd dht proof v2\x00"
#: A responder's address cookie (docs/PROTOCOL.md, "Earned contacts").
COOKIE_LEN = 16
NODE_ID_CONTEXT = b"p2pd node id v2\x00"
MAX_U63 = (1 << 63) - 1
DHT_METHODS = (
    "ping",
    "store",
    "find_node",
    "find_value",
    "mailbox_put",
    "mailbox_fetch",
    "mailbox_delete",
    "proof",
    "dialback",
    "dialed",
    "mailbox_relay",
    "mailbox_find",
    "mailbox_revoke",
)
_ARITY = {
    "ping": 1,
    "store": 3,
    "find_node": 2,
    "find_value": 2,
    "mailbox_put": 3,
    "mailbox_fetch": 5,
    "mailbox_delete": 5,
    "proof": 3,
    "dialback": 3,
    "dialed": 2,
    "mailbox_relay": 6,
    "mailbox_find": 2,
    "mailbox_revoke": 6,
}
#: A dial-back nonce (docs/PROTOCOL.md, "Address discovery and dial-back").
NONCE_LEN = 16
#: A ``dialback`` request carries this many zero bytes, so that it is never smaller than
#: the ack and the ``dialed`` datagram it makes a helper send (no amplification).
DIALBACK_PAD = 160
#: An ``observed`` field: the address as 16 bytes (IPv4 as ::ffff:a.b.c.d) and the port.
OBSERVED_LEN = 18


@functools.lru_cache(maxsize=8192)  # every contact of every reply (issue 11: CPU per RPC)
def node_id_for(public_key: bytes) -> bytes:
    """The 160-bit DHT node id of a node public key (never of an identity key)."""
    return hashlib.sha256(NODE_ID_CONTEXT + public_key).digest()[:NODE_ID_LEN]


@dataclass(frozen=True, slots=True)
class Contact:
    """A DHT node as a peer described it: its node public key and where it said it is.
    The id is derived from the key, never taken from the wire; that the node holds the
    key and answers from that address is for the receiver to check."""

    node_key: bytes
    address: Address

    @property
    def node_id(self) -> bytes:
        return node_id_for(self.node_key)


@dataclass(frozen=True, slots=True)
class DHTRequest:
    msg_id: bytes
    method: str
    #: The sender's node public key (its id is derived from it).
    sender_key: bytes
    #: The sender asks for a signed reply (proof that we hold our node key).
    prove: bool = False
    key: bytes | None = None  # store, find_node, find_value, mailbox_put, mailbox_find
    value: bytes | None = None  # store, mailbox_put
    owner_key: bytes | None = None  # mailbox_fetch, mailbox_delete
    timestamp: int | None = None  # mailbox_fetch, mailbox_delete
    after: bytes | None = None  # mailbox_fetch: page cursor (an entry id, or b"")
    ids: tuple[bytes, ...] | None = None  # mailbox_delete
    signature: bytes | None = None  # mailbox_fetch, mailbox_delete, proof
    cookie: bytes | None = None  # proof
    nonce: bytes | None = None  # dialback, dialed
    target: Contact | None = None  # mailbox_relay: the node to put at
    expires: int | None = None  # mailbox_revoke: the pin holds for passes expiring by then
    pass_key: bytes | None = None  # mailbox_revoke: the one pass key still good

    @property
    def sender_id(self) -> bytes:
        return node_id_for(self.sender_key)


@dataclass(frozen=True, slots=True)
class FindValueReply:
    value: bytes | None
    contacts: tuple[Contact, ...]
    #: The replica's first-seen time of the claim in ``value`` (Unix seconds), its receipt.
    seen: int | None = None


@dataclass(frozen=True, slots=True)
class MailboxPage:
    entries: tuple[tuple[bytes, bytes], ...]  # (entry id, sealed entry)
    more: bool


DHTResult = bytes | bool | int | tuple[Contact, ...] | FindValueReply | MailboxPage


def _unpack(payload: bytes) -> Any:
    # msgpack's own limits bound every length field before it allocates; every failure
    # it reports is a ValueError subclass (FormatError, StackError, ExtraData, ...).
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_VALUE,
            max_str_len=256,
            max_array_len=MAX_CONTACTS + 4,
            max_map_len=4,
            max_ext_len=0,
        )
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise WireError(f"undecodable msgpack: {type(exc).__name__}") from None


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def split_frame(datagram: bytes) -> tuple[int, bytes, bytes]:
    """(kind, msg_id, payload) of a DHT datagram."""
    if len(datagram) > MAX_FRAME:
        raise WireError("DHT frame too large")
    if len(datagram) < 1 + MSG_ID_LEN + 1:
        raise WireError("DHT frame too short")
    kind = datagram[0]
    if kind in (FRAME_V1_REQUEST, FRAME_V1_RESPONSE):
        raise OldFrameVersion("DHT frame version 1")
    if kind not in (FRAME_REQUEST, FRAME_RESPONSE):
        raise WireError("not a DHT frame")
    return kind, datagram[1 : 1 + MSG_ID_LEN], datagram[1 + MSG_ID_LEN :]


def _bytes(value: Any, length: int | None = None, *, maximum: int = MAX_VALUE) -> bytes:
    if not isinstance(value, bytes):
        raise WireError("expected bytes")
    if length is not None and len(value) != length:
        raise WireError(f"expected {length} bytes, got {len(value)}")
    if len(value) > maximum:
        raise WireError("byte string too long")
    return value


def _u63(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_U63:
        raise WireError("expected an integer in 0..2^63-1")
    return value


def decode_request(msg_id: bytes, payload: bytes) -> DHTRequest:
    data = _unpack(payload)
    if not isinstance(data, list | tuple) or len(data) not in (3, 4):
        raise WireError("request is not [method, args, prove] or [method, args, prove, pad]")
    if len(data) == 4 and not isinstance(data[3], bytes):
        raise WireError("request padding is not a byte string")
    method, args, prove = data[:3]
    if method not in DHT_METHODS or not isinstance(args, list | tuple):
        raise WireError("unknown method or malformed arguments")
    if not isinstance(prove, bool):
        raise WireError("prove is not a boolean")
    want = _ARITY[method]
    if len(args) != want:
        raise WireError(f"{method}: expected {want} arguments, got {len(args)}")
    sender = _bytes(args[0], PUBLIC_KEY_LEN)
    if method == "ping":
        return DHTRequest(msg_id, method, sender, prove)
    if method in ("dialback", "dialed"):
        nonce = _bytes(args[1], NONCE_LEN)
        if method == "dialback" and _bytes(args[2], DIALBACK_PAD) != bytes(DIALBACK_PAD):
            raise WireError("dialback padding is not zeros")
        return DHTRequest(msg_id, method, sender, prove, nonce=nonce)
    if method == "proof":
        cookie = _bytes(args[1], COOKIE_LEN)
        return DHTRequest(
            msg_id, method, sender, prove, cookie=cookie, signature=_bytes(args[2], SIGNATURE_LEN)
        )
    if method == "mailbox_revoke":  # [sender, owner, timestamp, expires, pass key, sig]
        return DHTRequest(
            msg_id,
            method,
            sender,
            prove,
            owner_key=_bytes(args[1], PUBLIC_KEY_LEN),
            timestamp=_u63(args[2]),
            expires=_u63(args[3]),
            pass_key=_bytes(args[4], PUBLIC_KEY_LEN),
            signature=_bytes(args[5], SIGNATURE_LEN),
        )
    if method in ("mailbox_fetch", "mailbox_delete"):
        owner = _bytes(args[1], PUBLIC_KEY_LEN)
        timestamp = _u63(args[2])
        signature = _bytes(args[4], SIGNATURE_LEN)
        if method == "mailbox_fetch":
            after = _bytes(args[3], maximum=MAILBOX_ID_LEN)
            if len(after) not in (0, MAILBOX_ID_LEN):
                raise WireError("mailbox cursor must be empty or an entry id")
            return DHTRequest(
                msg_id,
                method,
                sender,
                prove,
                owner_key=owner,
                timestamp=timestamp,
                after=after,
                signature=signature,
            )
        raw_ids = args[3]
        if not isinstance(raw_ids, list | tuple) or not 0 < len(raw_ids) <= MAILBOX_DELETE_MAX:
            raise WireError(f"mailbox_delete takes 1..{MAILBOX_DELETE_MAX} ids")
        ids = tuple(_bytes(i, MAILBOX_ID_LEN) for i in raw_ids)
        return DHTRequest(
            msg_id,
            method,
            sender,
            prove,
            owner_key=owner,
            timestamp=timestamp,
            ids=ids,
            signature=signature,
        )
    if method == "mailbox_relay":  # [sender, node key, host, port, mailbox key, put]
        (target,) = _contacts([args[1:4]])
        put = _bytes(args[5], maximum=MAX_MAILBOX_PUT)
        if not put:
            raise WireError("empty mailbox entry")
        return DHTRequest(
            msg_id, method, sender, prove, _bytes(args[4], KEY_LEN), put, target=target
        )
    key = _bytes(args[1], KEY_LEN)
    if method == "store":
        return DHTRequest(msg_id, method, sender, prove, key, _bytes(args[2]))
    if method == "mailbox_put":
        entry = _bytes(args[2], maximum=MAX_MAILBOX_PUT)
        if not entry:
            raise WireError("empty mailbox entry")
        return DHTRequest(msg_id, method, sender, prove, key, entry)
    return DHTRequest(msg_id, method, sender, prove, key)


def encode_request(
    msg_id: bytes, method: str, args: list[Any], prove: bool = False, pad_to: int = 0
) -> bytes:
    """``args[0]`` is the sender's node public key. ``pad_to``: a zero-filled 4th element
    makes the frame that long (room for a reply to an unvalidated sender, p2pd.dht.budget)."""
    body = [method, args, prove]
    frame: bytes = bytes([FRAME_REQUEST]) + msg_id + _pack(body)
    need = pad_to - len(frame) - 2  # bin 8 header
    if need >= 0:
        padding = bytes(need if need < 256 else need - 1)  # bin 16 header: one more byte
        frame = bytes([FRAME_REQUEST]) + msg_id + _pack([*body, padding])
    if len(frame) > MAX_FRAME:
        raise WireError("DHT request too large")
    return frame


def _contacts(value: Any) -> tuple[Contact, ...]:
    if not isinstance(value, list | tuple) or len(value) > MAX_CONTACTS:
        raise WireError("contact list malformed or too long")
    out = []
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 3:
            raise WireError("contact is not [node key, host, port]")
        node_key, host, port = item
        if type(node_key) is bytes and type(host) is str and type(port) is int:
            out.append(_contact(node_key, host, port))
        else:
            out.append(_check_contact(node_key, host, port))  # raises WireError
    return tuple(out)


def _check_contact(node_key: Any, host: Any, port: Any) -> Contact:
    """One contact, checked."""
    node_key = _bytes(node_key, PUBLIC_KEY_LEN)
    if not isinstance(host, str) or len(host) > 64:
        raise WireError("contact host malformed")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise WireError("contact port out of range")
    try:
        address = Address(host, port)
    except InvalidAddress:
        raise WireError("contact host is not an IP address") from None
    return Contact(node_key, address)


#: Contacts checked before, by their exact types (bytes, str, int: never a bool, which
#: hashes as 1): the same contacts come back in reply after reply, and building each was
#: about a sixth of an attacked lookup's CPU (cProfile, bench_adversary N=300). A sender
#: naming new contacts only misses the cache.
_contact = functools.lru_cache(maxsize=4096)(_check_contact)


def encode_contacts(contacts: list[Contact]) -> list[list[Any]]:
    return [[c.node_key, c.address.host, c.address.port] for c in contacts[:MAX_CONTACTS]]


#: msgpack's array-of-2, -3 and -4 headers, nil, and the bin 8 headers of a 64-byte
#: signature, of a cookie and of an observed address.
_PAIR, _TRIPLE, _QUAD, _NIL = 0x92, 0x93, 0x94, b"\xc0"
_SIG_HEADER, _COOKIE_HEADER = b"\xc4\x40", bytes([0xC4, COOKIE_LEN])
_OBSERVED_HEADER = bytes([0xC4, OBSERVED_LEN])
#: In a reply with ``observed``, the cookie slot is always there; zeros mean no cookie.
_NO_COOKIE = bytes(COOKIE_LEN)


@functools.lru_cache(maxsize=4096)
def _packed_ip(host: str) -> bytes:
    # Cached: parsing with ipaddress is about a third of the cost of answering a ping
    # (scripts/bench_flood.py, the many-sources flood), and replies go to few hosts.
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv4Address):
        ip = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
    return ip.packed


def encode_observed(address: tuple[str, int]) -> bytes:
    """An ``observed`` field's 18 bytes: the IP as 16 bytes (IPv4-mapped), the port."""
    return _packed_ip(address[0]) + struct.pack(">H", address[1])


def decode_observed(raw: bytes) -> Address:
    """The address an ``observed`` field holds; WireError for port 0 or a bad address."""
    if len(raw) != OBSERVED_LEN:
        raise WireError("observed address malformed")
    ip6 = ipaddress.IPv6Address(raw[:16])
    port = struct.unpack(">H", raw[16:])[0]
    # The IPv4 address itself for a mapped one: as IPv6, ::ffff:0.0.0.0 is not
    # unspecified and ::ffff:224.0.0.1 not multicast.
    ip = ip6.ipv4_mapped or ip6
    if port == 0 or ip.is_unspecified or ip.is_multicast:
        raise WireError("observed address out of range")
    host = str(ip)
    try:
        return Address(host, port)
    except InvalidAddress:
        raise WireError("observed address malformed") from None


def split_response(payload: bytes) -> tuple[bytes, bytes | None, bytes | None]:
    """(the result's msgpack bytes, the signature or None, the cookie or None) of a
    response payload; :func:`split_response_observed` also returns the observed address."""
    raw, signature, cookie, _ = split_response_observed(payload)
    return raw, signature, cookie


def split_response_observed(
    payload: bytes,
) -> tuple[bytes, bytes | None, bytes | None, Address | None]:
    """(result bytes, signature or None, cookie or None, observed address or None).

    The payload is the msgpack array ``[result, signature-or-nil]``; ``[result,
    signature-or-nil, cookie]`` when the responder asks the requester to prove its own
    id; or ``[result, signature-or-nil, cookie-or-zeros, observed]`` when it also says
    where it saw the request come from (replies of p2pd before issue 13 have no
    ``observed`` and are still taken). It is cut up by its layout rather than decoded and
    encoded again, so that the signed bytes are exactly the bytes that were sent (no
    reliance on a canonical msgpack encoding)."""
    if len(payload) < 2 or payload[0] not in (_PAIR, _TRIPLE, _QUAD):
        raise WireError("response is not [result, signature, (cookie, (observed))]")
    end = len(payload)
    cookie = observed = None
    if payload[0] == _QUAD:
        end -= len(_OBSERVED_HEADER) + OBSERVED_LEN
        if end < 2 or payload[end : end + len(_OBSERVED_HEADER)] != _OBSERVED_HEADER:
            raise WireError("response observed address malformed")
        observed = decode_observed(payload[end + len(_OBSERVED_HEADER) :])
    if payload[0] != _PAIR:
        # the cookie slot: fixed length, so that every cut is at a known place
        end -= len(_COOKIE_HEADER) + COOKIE_LEN
        if end < 2 or payload[end : end + len(_COOKIE_HEADER)] != _COOKIE_HEADER:
            raise WireError("response cookie malformed")
        cookie = payload[end + len(_COOKIE_HEADER) : end + len(_COOKIE_HEADER) + COOKIE_LEN]
        if cookie == _NO_COOKIE and observed is not None:
            cookie = None
    if end >= 2 and payload[end - 1 : end] == _NIL:
        return payload[1 : end - 1], None, cookie, observed
    cut = end - len(_SIG_HEADER) - SIGNATURE_LEN
    if cut < 2 or payload[cut : cut + len(_SIG_HEADER)] != _SIG_HEADER:
        raise WireError("response signature malformed")
    return payload[1:cut], payload[cut + len(_SIG_HEADER) : end], cookie, observed


def reply_message(msg_id: bytes, result: bytes) -> bytes:
    """What a proving reply's signature covers: the context, message id, result bytes."""
    return REPLY_CONTEXT + msg_id + result


def proof_message(responder_key: bytes, cookie: bytes) -> bytes:
    """What a ``proof`` request's signature covers: the context, the node key of the
    node the proof is sent to (so that a node cannot pass a proof made for it on to
    another), and the cookie that node handed out."""
    return PROOF_CONTEXT + responder_key + cookie


def decode_response(method: str, result: bytes) -> DHTResult:
    """Decode the result (the msgpack bytes :func:`split_response` cut out) of a reply to
    a request we sent with ``method``."""
    data = _unpack(result)
    if method == "ping":
        return _bytes(data, PUBLIC_KEY_LEN)
    if method == "store":
        if not isinstance(data, bool):
            raise WireError("store reply is not a boolean")
        return data
    if method in ("find_node", "mailbox_find"):
        return _contacts(data)
    if method == "find_value":
        if not isinstance(data, dict) or set(data) - {"value", "nodes", "seen"}:
            raise WireError("find_value reply malformed")
        value, seen = data.get("value"), data.get("seen")
        return FindValueReply(
            None if value is None else _bytes(value),
            _contacts(data.get("nodes", [])),
            None if seen is None else _u63(seen),
        )
    if method in ("mailbox_put", "dialback", "mailbox_relay", "mailbox_revoke"):
        if not isinstance(data, bool):
            raise WireError(f"{method} reply is not a boolean")
        return data
    if method == "mailbox_fetch":
        if not isinstance(data, dict) or set(data) != {"entries", "more"}:
            raise WireError("mailbox_fetch reply malformed")
        raw, more = data["entries"], data["more"]
        if (
            not isinstance(raw, list | tuple)
            or len(raw) > MAILBOX_PAGE
            or not isinstance(more, bool)
        ):
            raise WireError("mailbox_fetch reply malformed")
        entries = []
        for item in raw:
            if not isinstance(item, list | tuple) or len(item) != 2:
                raise WireError("mailbox entry is not [id, entry]")
            entries.append(
                (_bytes(item[0], MAILBOX_ID_LEN), _bytes(item[1], maximum=MAX_MAILBOX_ENTRY))
            )
        return MailboxPage(tuple(entries), more)
    if method == "mailbox_delete":
        count = _u63(data)
        if count > MAILBOX_DELETE_MAX:
            raise WireError("mailbox_delete reply out of range")
        return count
    raise WireError(f"no such method {method!r}")


def encode_response(
    msg_id: bytes,
    result: Any,
    sign: Callable[[bytes], bytes] | None = None,
    cookie: bytes | None = None,
    observed: tuple[str, int] | None = None,
) -> bytes:
    """A response frame; with ``sign`` (a node key's), a proving one; with ``cookie``,
    one that asks the requester to prove its id (a ``proof`` request); with
    ``observed``, one that tells the requester where its request came from."""
    packed = _pack(result)
    if sign is None:
        tail = _NIL
    else:
        signature = sign(reply_message(msg_id, packed))
        if len(signature) != SIGNATURE_LEN:
            raise WireError("a reply signature is 64 bytes")
        tail = _SIG_HEADER + signature
    header = _PAIR
    if cookie is not None or observed is not None:
        if cookie is not None and len(cookie) != COOKIE_LEN:
            raise WireError(f"a cookie is {COOKIE_LEN} bytes")
        if cookie == _NO_COOKIE and observed is not None:  # (2^-128 for a real one)
            raise WireError("beside an observed address, an all-zero cookie means none")
        header = _TRIPLE
        tail += _COOKIE_HEADER + (_NO_COOKIE if cookie is None else cookie)
    if observed is not None:
        header = _QUAD
        tail += _OBSERVED_HEADER + encode_observed(observed)
    frame: bytes = bytes([FRAME_RESPONSE]) + msg_id + bytes([header]) + packed + tail
    if len(frame) > MAX_FRAME:
        raise WireError("DHT response too large")
    return frame


# --------------------------------------------------------------------------- messages
#
# What travels inside a session's encryption (the plaintext of a Double Ratchet message),
# the frames on a QUIC message stream, and the sealed mailbox entry. docs/PROTOCOL.md,
# "Messages", has the layouts.

MESSAGE_VERSION = 1
KIND_TEXT = 1
#: A call signal (p2pd/calls.py): ``text`` is a small JSON object; never stored.
KIND_CALL = 2
#: A key rotation notice (p2pd/rotation.py): ``text`` is the notice's bytes in hex, at
#: most MAX_ROTATION_TEXT characters; acked, acted on, never stored as a message.
KIND_ROTATION = 3
MAX_ROTATION_TEXT = 2 * 256
#: A file offer (p2pd/files/): ``text`` is the offer's bytes in hex, at most
#: MAX_FILE_OFFER_TEXT characters; acked, handed to the files service, never stored as a
#: message (docs/PROTOCOL.md, "Files").
KIND_FILE = 4
MAX_FILE_OFFER_TEXT = 4096
MESSAGE_ID_LEN = 16
MAX_TEXT = 64 * 1024
FRAME_MESSAGE = 1
FRAME_ACK = 2
#: "I could not decrypt that message": the sender starts a new session and sends again.
FRAME_NACK = 3
_STREAM_KINDS = (FRAME_MESSAGE, FRAME_ACK, FRAME_NACK)
#: A message frame: an id and a session envelope around at most MAX_TEXT of text.
MAX_STREAM_FRAME = MAX_TEXT + 4096
MAILBOX_MESSAGE = 1
MAILBOX_ACK = 2


@dataclass(frozen=True, slots=True)
class MessagePayload:
    """The plaintext a session encrypts: one text message of a conversation."""

    msg_id: bytes
    seq: int
    sent_at_ms: int
    text: str
    kind: int = KIND_TEXT
    #: The handle the sender claims. The session proves only its key; the receiver
    #: checks the claim against the DHT before it pins it (p2pd/delivery/).
    sender: str = ""

    def encode(self) -> bytes:
        body = self.text.encode("utf-8")
        if len(body) > MAX_TEXT:
            raise WireError(f"message text over {MAX_TEXT} bytes")
        if len(self.msg_id) != MESSAGE_ID_LEN:
            raise WireError("message id must be 16 bytes")
        if self.sender and not is_valid_handle(self.sender):
            raise WireError("invalid sender handle")
        sender = self.sender.encode("ascii")
        return (
            bytes([MESSAGE_VERSION, self.kind, len(sender)])
            + sender
            + self.msg_id
            + struct.pack(">QQI", self.seq, self.sent_at_ms, len(body))
            + body
        )

    @classmethod
    def decode(cls, data: bytes) -> MessagePayload:
        r = Reader(data)
        if r.u8() != MESSAGE_VERSION:
            raise WireError("unknown message version")
        kind = r.u8()
        if kind not in (KIND_TEXT, KIND_CALL, KIND_ROTATION, KIND_FILE):
            raise WireError(f"unknown message kind {kind}")
        sender_len = r.u8()
        if sender_len > MAX_HANDLE_LEN:
            raise WireError("sender handle too long")
        try:
            sender = r.take(sender_len).decode("ascii")
        except UnicodeDecodeError:
            raise WireError("sender handle is not ASCII") from None
        if sender and not is_valid_handle(sender):
            raise WireError("invalid sender handle")
        msg_id = r.take(MESSAGE_ID_LEN)
        seq, sent_at = r.u64(), r.u64()
        (length,) = struct.unpack(">I", r.take(4))
        bound = {KIND_ROTATION: MAX_ROTATION_TEXT, KIND_FILE: MAX_FILE_OFFER_TEXT}.get(
            kind, MAX_TEXT
        )
        if length > bound:
            raise WireError("message text too long")
        try:
            text = r.take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("message text is not UTF-8") from None
        r.end()
        return cls(msg_id, seq, sent_at, text, kind, sender)


def encode_stream_frame(kind: int, payload: bytes) -> bytes:
    if kind not in _STREAM_KINDS or len(payload) > MAX_STREAM_FRAME:
        raise WireError("bad stream frame")
    return struct.pack(">BI", kind, len(payload)) + payload


class StreamFrameDecoder:
    """Incremental decoder for ``type u8 | length u32 | payload`` frames on a stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= 5:
            kind, length = struct.unpack_from(">BI", self._buffer)
            if kind not in _STREAM_KINDS or length > MAX_STREAM_FRAME:
                raise WireError("bad stream frame header")
            if len(self._buffer) < 5 + length:
                break
            frames.append((kind, bytes(self._buffer[5 : 5 + length])))
            del self._buffer[: 5 + length]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)


def encode_mailbox_plaintext(kind: int, sender_key: bytes, msg_id: bytes, envelope: bytes) -> bytes:
    if len(sender_key) != PUBLIC_KEY_LEN or len(msg_id) != MESSAGE_ID_LEN:
        raise WireError("bad mailbox entry fields")
    return bytes([MESSAGE_VERSION, kind]) + sender_key + msg_id + envelope


def decode_mailbox_plaintext(data: bytes) -> tuple[int, bytes, bytes, bytes]:
    """(kind, sender key, message id, envelope) of an opened mailbox entry."""
    r = Reader(data)
    if r.u8() != MESSAGE_VERSION:
        raise WireError("unknown mailbox entry version")
    kind = r.u8()
    if kind not in (MAILBOX_MESSAGE, MAILBOX_ACK):
        raise WireError("unknown mailbox entry kind")
    sender, msg_id = r.take(PUBLIC_KEY_LEN), r.take(MESSAGE_ID_LEN)
    envelope = data[r.position :]
    if kind == MAILBOX_ACK and envelope:
        raise WireError("mailbox ack with a body")
    return kind, sender, msg_id, envelope
