"""LAN announcements: the sans-I/O core of LAN discovery (no zeroconf, no trio, no clock).

Service type ``_p2pd._udp.local.`` (RFC 6763). Each node registers one service instance
whose SRV record carries its UDP port, whose A/AAAA records carry its LAN addresses and
whose TXT record carries a signed announcement. The format is in docs/PROTOCOL.md, "LAN
discovery"; in short:

- ``everyone`` mode: handle, public key and an Ed25519 signature, in the clear.
- ``contacts`` mode: a random nonce and a *tag*, HMAC(key derived from the public key,
  nonce || day), so that only someone who already knows the key (a contact) can tell
  whose announcement it is; the signature then proves it. A stranger sees a fresh random
  nonce and tag every announcement period and cannot link them.
- ``off``: nothing is announced and nothing is browsed.

mDNS has no authentication: anyone on the link can answer anything. So everything learnt
from it is checked like a DHT record before it is shown: the signature, the pinned keys,
the age of the announcement (replays of old ones are refused), the size and shape of the
TXT record.

What is here: :func:`build_txt` / :func:`encode_txt` to announce, :func:`decode_txt` /
:func:`decode_announcement` / :func:`verify_announcement` (or all three at once,
:func:`parse_txt`) to check what others announce, :func:`lan_tag` /
:func:`recognise_tag` and :class:`TagScanBudget` for contacts mode, and
:class:`LanPeerTable`, the list of peers with their expiry. Pure functions of their
arguments, with ``now`` (Unix seconds) passed in. Every decoder raises only
:class:`LanAnnouncementError` (a :class:`~p2pd.errors.WireError`).

The trio service that drives python-zeroconf is :class:`p2pd.discovery.LanDiscovery`;
this module imports neither (``tests/test_lan_announcement.py`` checks that).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import ipaddress
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, TypedDict

from .errors import WireError
from .identity import Identity, fingerprint, is_valid_handle, verify_signature
from .wire import Address

__all__ = [
    "MAX_CONTACTS_SCANNED",
    "MAX_LAN_ADDRESSES",
    "MAX_TXT_KEYS",
    "MAX_TXT_SIZE",
    "NONCE_LEN",
    "SERVICE_TYPE",
    "Announcement",
    "LanAnnouncementError",
    "LanNotAContact",
    "LanPeer",
    "LanPeerTable",
    "LanPinConflict",
    "Mode",
    "TagScanBudget",
    "TagScanSkipped",
    "build_txt",
    "decode_announcement",
    "decode_txt",
    "encode_txt",
    "epoch_day",
    "lan_tag",
    "parse_txt",
    "recognise_tag",
    "verify_announcement",
]

SERVICE_TYPE: Final = "_p2pd._udp.local."
VERSION: Final = b"1"
#: Domain separation: nothing else p2pd signs starts with these bytes.
SIGNATURE_CONTEXT: Final = b"p2pd lan v1\x00"
TAG_KEY_CONTEXT: Final = b"p2pd lan tag v1\x00"

#: Bounds on a TXT record we accept (RFC 6763 section 6.2 suggests keeping TXT records
#: under 1,300 bytes so that a whole answer fits an Ethernet frame; ours are ~400).
MAX_TXT_SIZE: Final = 1024
MAX_TXT_KEYS: Final = 16
#: One TXT string is at most 255 bytes: its length is one byte (RFC 1035 section 3.3.14).
MAX_TXT_STRING: Final = 255
#: Addresses one announcement may sign (the same bound as a handle record).
MAX_LAN_ADDRESSES: Final = 8
NONCE_LEN: Final = 16
TAG_LEN: Final = 16
PUBLIC_KEY_LEN: Final = 32
SIGNATURE_LEN: Final = 64
MAX_ISSUED: Final = (1 << 63) - 1
#: How many pinned keys one contacts-mode announcement is tried against: 10,000 HMACs
#: cost about 20 ms of CPU here (see LanConfig.max_tag_scans_per_minute).
MAX_CONTACTS_SCANNED: Final = 10_000

Mode = Literal["everyone", "contacts"]
_MODE_CODES: Final[dict[str, bytes]] = {"everyone": b"e", "contacts": b"c"}
_MODE_NAMES: Final[dict[bytes, Mode]] = {b"e": "everyone", b"c": "contacts"}
_DECIMAL = re.compile(rb"0|[1-9][0-9]{0,19}")
_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")
_KEYS_EVERYONE: Final = frozenset({b"h", b"k"})
_KEYS_CONTACTS: Final = frozenset({b"n", b"g"})


# --------------------------------------------------------------------------- errors


class LanAnnouncementError(WireError):
    """An mDNS announcement that is malformed, oversize, stale or does not verify."""


class LanPinConflict(LanAnnouncementError):
    """An announcement claims a pinned handle with another key."""

    def __init__(self, message: str, *, handle: str = "", key: bytes = b"") -> None:
        super().__init__(message)
        #: The handle claimed and the key that signed the claim (evidence, not a pin).
        self.handle = handle
        self.key = key


class LanNotAContact(LanAnnouncementError):
    """A contacts-mode announcement that none of our pinned keys recognises."""


# --------------------------------------------------------------------------- TXT strings


def encode_txt(properties: Mapping[bytes, bytes]) -> bytes:
    """The TXT RDATA: one length-prefixed ``key=value`` string per property, in order."""
    out = bytearray()
    for key, value in properties.items():
        item = key + b"=" + value
        if len(item) > MAX_TXT_STRING:
            raise ValueError(f"TXT string {key!r} is longer than {MAX_TXT_STRING} bytes")
        out += bytes([len(item)]) + item
    return bytes(out)


def decode_txt(text: bytes) -> dict[bytes, bytes]:
    """Split TXT RDATA into ``{key: value}``, refusing anything we would not send.

    RFC 6763 section 6: a sequence of length-prefixed strings ``key=value``; keys are
    printable US-ASCII without ``=`` and compared case-insensitively (section 6.4), so
    they are returned in lower case. We refuse what the RFC tolerates and zeroconf's own
    ``ServiceInfo.properties`` silently papers over (it keeps the first of two equal
    keys): duplicate keys, empty strings, attributes without ``=``, and records over
    :data:`MAX_TXT_SIZE` bytes or :data:`MAX_TXT_KEYS` keys.
    """
    if not isinstance(text, bytes):
        raise LanAnnouncementError("TXT record is not bytes")
    if len(text) > MAX_TXT_SIZE:
        raise LanAnnouncementError(f"TXT record of {len(text)} bytes (at most {MAX_TXT_SIZE})")
    if not text:
        raise LanAnnouncementError("empty TXT record")
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(text):
        length = text[pos]
        item = text[pos + 1 : pos + 1 + length]
        if len(item) != length:
            raise LanAnnouncementError("truncated TXT string")
        pos += 1 + length
        if not item:
            raise LanAnnouncementError("empty TXT string")
        key, sep, value = item.partition(b"=")
        if not sep:
            raise LanAnnouncementError("TXT attribute without a value")
        if not key or any(c < 0x20 or c > 0x7E for c in key):
            raise LanAnnouncementError("TXT key is empty or not printable ASCII")
        key = key.lower()
        if key in out:
            raise LanAnnouncementError(f"duplicate TXT key {key.decode('ascii')!r}")
        if len(out) == MAX_TXT_KEYS:
            raise LanAnnouncementError(f"more than {MAX_TXT_KEYS} TXT keys")
        out[key] = value
    return out


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(value: bytes, what: str, length: int | None = None) -> bytes:
    """Canonical unpadded base64url (RFC 4648 section 5): one spelling per value."""
    if len(value) > MAX_TXT_STRING or not _BASE64URL.fullmatch(value) or len(value) % 4 == 1:
        raise LanAnnouncementError(f"{what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(value + b"=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise LanAnnouncementError(f"{what} is not base64url") from None
    if _b64(raw) != value:
        raise LanAnnouncementError(f"{what} is not canonical base64url")
    if length is not None and len(raw) != length:
        raise LanAnnouncementError(f"{what} must be {length} bytes")
    return raw


def _decimal(value: bytes, what: str, low: int, high: int) -> int:
    if not _DECIMAL.fullmatch(value):
        raise LanAnnouncementError(f"{what} is not a canonical decimal number")
    number = int(value)
    if not low <= number <= high:
        raise LanAnnouncementError(f"{what} out of range")
    return number


def _pack_hosts(hosts: Sequence[str]) -> bytes:
    """family (4|6) || raw IP, per address: wire.Address.encode without the port."""
    out = bytearray()
    for host in hosts:
        ip = ipaddress.ip_address(host)
        out += bytes([ip.version]) + ip.packed
    return bytes(out)


def _unpack_hosts(raw: bytes) -> tuple[str, ...]:
    hosts: list[str] = []
    pos = 0
    while pos < len(raw):
        family = raw[pos]
        size = {4: 4, 6: 16}.get(family)
        if size is None or pos + 1 + size > len(raw):
            raise LanAnnouncementError("malformed address list")
        host = str(ipaddress.ip_address(raw[pos + 1 : pos + 1 + size]))
        if host in hosts:
            raise LanAnnouncementError("duplicate address")
        hosts.append(host)
        pos += 1 + size
    if not 1 <= len(hosts) <= MAX_LAN_ADDRESSES:
        raise LanAnnouncementError(f"an announcement signs 1 to {MAX_LAN_ADDRESSES} addresses")
    return tuple(hosts)


# --------------------------------------------------------------------------- tags


def epoch_day(unix_seconds: float) -> int:
    """Days since 1970-01-01 UTC."""
    return int(unix_seconds // 86400)


def lan_tag(public_key: bytes, nonce: bytes, day: int) -> bytes:
    """The contacts-mode tag: HMAC-SHA-256(SHA-256(context || key), nonce || day)[:16].

    Computable only by whoever knows ``public_key``. ``nonce`` is fresh for every
    announcement period, so tags of one node are unlinkable without the key.
    """
    tag_key = hashlib.sha256(TAG_KEY_CONTEXT + public_key).digest()
    return hmac.digest(tag_key, nonce + struct.pack(">I", day & 0xFFFFFFFF), "sha256")[:TAG_LEN]


def recognise_tag(
    nonce: bytes, tag: bytes, day: int, keys: Iterable[bytes], *, limit: int = MAX_CONTACTS_SCANNED
) -> bytes | None:
    """The first of ``keys`` (at most ``limit`` of them) whose tag this is, or None."""
    message = nonce + struct.pack(">I", day & 0xFFFFFFFF)
    for count, key in enumerate(keys):
        if count >= limit:
            break
        tag_key = hashlib.sha256(TAG_KEY_CONTEXT + key).digest()
        if hmac.compare_digest(hmac.digest(tag_key, message, "sha256")[:TAG_LEN], tag):
            return key
    return None


#: New contacts-mode tags one source address may have scanned per minute. A contact
#: announces a fresh nonce every ``announce_interval`` (100 s by default): one scan per
#: 100 s per node, so ten a minute leave room for several daemons behind one address.
TAG_SCANS_PER_SOURCE: Final = 10
#: Keys recognised on the LAN lately (see TagScanBudget.recognise): tried first, free.
RECENT_CONTACTS: Final = 64
#: Source addresses whose scans are counted (least recently seen forgotten first).
MAX_SOURCES: Final = 1024


class TagScanSkipped(LanAnnouncementError):
    """Over a budget of contacts-mode tag scans: not judged this time (what was known
    of that announcer stays as it was)."""

    def __init__(self, message: str, *, reason: Literal["total", "source"]) -> None:
        super().__init__(message)
        #: Which budget: ``total`` (``per_minute``) or ``source`` (``per_source``).
        self.reason = reason


class TagScanBudget:
    """Contacts-mode recognition costs one HMAC per pinned key (a *scan*). Sans-I/O:
    the caller passes ``now`` and the announcement's source address.

    Contacts first: a tag is tried first against the keys recognised on the LAN lately
    (at most ``recent`` HMACs, free of any budget), so a contact seen before is
    recognised again whatever a flood does, each time it announces a new nonce. Only a
    tag none of them made is scanned against every pinned key, and those scans are
    budgeted: at most ``per_minute`` a minute in all, and at most ``per_source`` of them
    for one source address, so that a flood from one address leaves the rest of the
    budget to others (a contact not yet seen on the LAN). What each (nonce, tag) turned
    out to be is remembered, so a repeated announcement costs nothing.

    The source is the address the announcement claims (its A/AAAA records that it also
    signs): zeroconf does not tell the packet's source, and on a LAN anyone can answer
    for any address. A flood that claims many addresses is held by ``per_minute`` alone
    (docs/SECURITY.md, "LAN").
    """

    def __init__(
        self,
        per_minute: int,
        *,
        per_source: int = TAG_SCANS_PER_SOURCE,
        size: int = 1024,
        recent: int = RECENT_CONTACTS,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        self._per_minute = per_minute
        self._per_source = per_source
        self._size = size
        self._recent_size = recent
        self._max_sources = max_sources
        self._known: collections.OrderedDict[tuple[bytes, bytes], bytes | None] = (
            collections.OrderedDict()
        )
        self._scans: collections.deque[float] = collections.deque()
        self._by_source: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )
        #: Recognised keys, most recent last.
        self._recent: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        #: ``tag_scans`` (full scans), ``tag_recent_hits`` (recognised among the recent
        #: keys, no scan), ``tag_scans_skipped`` / ``tag_scans_skipped_source`` (over the
        #: total / a source's budget).
        self.stats: collections.Counter[str] = collections.Counter()

    def recognise(
        self,
        nonce: bytes,
        tag: bytes,
        day: int,
        contacts: Mapping[bytes, str],
        *,
        source: str,
        now: float,
        limit: int = MAX_CONTACTS_SCANNED,
    ) -> bytes | None:
        """The pinned key (of ``contacts``) whose tag this is, or None. Raises
        TagScanSkipped when a full scan is needed and over budget."""
        known, key = self.lookup(nonce, tag)
        if known:
            return key
        recent = [k for k in reversed(self._recent) if k in contacts]
        key = recognise_tag(nonce, tag, day, recent, limit=self._recent_size)
        if key is not None:
            self.stats["tag_recent_hits"] += 1
        else:
            spent = self._take(now, source)
            if spent is not None:
                raise TagScanSkipped(
                    f"too many new contacts-mode announcements this minute ({spent})",
                    reason=spent,
                )
            self.stats["tag_scans"] += 1
            key = recognise_tag(nonce, tag, day, contacts.keys(), limit=limit)
        self.remember(nonce, tag, key)
        return key

    def lookup(self, nonce: bytes, tag: bytes) -> tuple[bool, bytes | None]:
        key = (nonce, tag)
        if key in self._known:
            self._known.move_to_end(key)
            return True, self._known[key]
        return False, None

    def may_scan(self, now: float, source: str | None = None) -> bool:
        """Take one scan from the budgets (the total, and ``source``'s); False, and
        nothing taken, if either is spent."""
        return self._take(now, source) is None

    def _take(self, now: float, source: str | None) -> Literal["total", "source"] | None:
        """Take one scan; or say which budget is spent (and take nothing)."""
        while self._scans and self._scans[0] <= now - 60:
            self._scans.popleft()
        scans = None
        if source is not None:
            scans = self._by_source.pop(source, None) or collections.deque()
            while scans and scans[0] <= now - 60:
                scans.popleft()
            self._by_source[source] = scans  # most recently seen last
            while len(self._by_source) > self._max_sources:
                self._by_source.popitem(last=False)
            if len(scans) >= self._per_source:
                self.stats["tag_scans_skipped_source"] += 1
                return "source"
        if len(self._scans) >= self._per_minute:
            self.stats["tag_scans_skipped"] += 1
            return "total"
        self._scans.append(now)
        if scans is not None:
            scans.append(now)
        return None

    def remember(self, nonce: bytes, tag: bytes, key: bytes | None) -> None:
        self._known[(nonce, tag)] = key
        while len(self._known) > self._size:
            self._known.popitem(last=False)
        if key is not None:
            self._recent.pop(key, None)
            self._recent[key] = None
            while len(self._recent) > self._recent_size:
                self._recent.popitem(last=False)


# --------------------------------------------------------------------------- announcements


@dataclass(frozen=True, slots=True)
class Announcement:
    """A decoded TXT record: well formed and current, signature not yet checked."""

    mode: Mode
    port: int
    issued: int
    #: The addresses the announcer signed (IP literals, canonical spelling).
    hosts: tuple[str, ...]
    signature: bytes = field(repr=False)
    #: everyone mode
    handle: str | None = None
    public_key: bytes | None = None
    #: contacts mode
    nonce: bytes | None = None
    tag: bytes | None = None

    def signed_bytes(self) -> bytes:
        """What the signature covers (docs/PROTOCOL.md, "LAN discovery")."""
        tail = (
            struct.pack(">HQ", self.port, self.issued)
            + bytes([len(self.hosts)])
            + _pack_hosts(self.hosts)
        )
        if self.mode == "everyone":
            assert self.handle is not None and self.public_key is not None
            handle = self.handle.encode("ascii")
            return SIGNATURE_CONTEXT + b"e" + bytes([len(handle)]) + handle + self.public_key + tail
        assert self.nonce is not None and self.tag is not None
        return SIGNATURE_CONTEXT + b"c" + self.nonce + self.tag + tail


def build_txt(
    identity: Identity,
    *,
    port: int,
    addresses: Sequence[str],
    mode: Mode,
    now: int,
    nonce: bytes | None = None,
) -> dict[bytes, bytes]:
    """Our signed announcement, as TXT properties in the order they are sent.

    ``addresses`` are the IP literals we also publish as A/AAAA records; ``nonce`` (16
    random bytes, new each announcement period) is required in contacts mode and refused
    otherwise.
    """
    if mode not in _MODE_CODES:
        raise ValueError(f"unknown LAN announcement mode {mode!r}")
    if not 1 <= port <= 65535:
        raise ValueError("port out of range")
    if not 0 <= now <= MAX_ISSUED:
        raise ValueError("issued out of range")
    hosts = tuple(dict.fromkeys(str(ipaddress.ip_address(h)) for h in addresses))
    if not 1 <= len(hosts) <= MAX_LAN_ADDRESSES:
        raise ValueError(f"announce 1 to {MAX_LAN_ADDRESSES} addresses")
    if mode == "everyone":
        if nonce is not None:
            raise ValueError("everyone mode takes no nonce")
        announcement = Announcement(
            mode, port, now, hosts, b"", handle=identity.handle, public_key=identity.public_key
        )
    else:
        if nonce is None or len(nonce) != NONCE_LEN:
            raise ValueError(f"contacts mode needs a {NONCE_LEN}-byte nonce")
        tag = lan_tag(identity.public_key, nonce, epoch_day(now))
        announcement = Announcement(mode, port, now, hosts, b"", nonce=nonce, tag=tag)
    signature = identity.sign(announcement.signed_bytes())
    # "v" first: RFC 6763 section 6.7.
    props: dict[bytes, bytes] = {
        b"v": VERSION,
        b"m": _MODE_CODES[mode],
        b"p": str(port).encode(),
        b"t": str(now).encode(),
    }
    if mode == "everyone":
        props[b"h"] = identity.handle.encode("ascii")
        props[b"k"] = _b64(identity.public_key)
    else:
        assert announcement.nonce is not None and announcement.tag is not None
        props[b"n"] = _b64(announcement.nonce)
        props[b"g"] = _b64(announcement.tag)
    props[b"a"] = _b64(_pack_hosts(hosts))
    props[b"s"] = _b64(signature)
    return props


def decode_announcement(
    properties: Mapping[bytes, bytes], *, now: float, max_clock_skew: float = 600
) -> Announcement:
    """Check the shape, bounds and age of decoded TXT properties (not the signature).

    ``issued`` must lie within ``max_clock_skew`` seconds of ``now`` either way: an
    announcement is refreshed well within that window, so an older one is a replay.
    Unknown keys are ignored (they are not signed, so they cannot change the meaning).
    """

    def need(key: bytes) -> bytes:
        value = properties.get(key)
        if value is None:
            raise LanAnnouncementError(f"TXT key {key.decode()!r} missing")
        return value

    if need(b"v") != VERSION:
        raise LanAnnouncementError("unsupported announcement version")
    mode = _MODE_NAMES.get(need(b"m"))
    if mode is None:
        raise LanAnnouncementError("unknown announcement mode")
    port = _decimal(need(b"p"), "port", 1, 65535)
    issued = _decimal(need(b"t"), "issued", 0, MAX_ISSUED)
    if abs(issued - now) > max_clock_skew:
        raise LanAnnouncementError("announcement is stale or from the future")
    hosts = _unpack_hosts(_unb64(need(b"a"), "address list"))
    signature = _unb64(need(b"s"), "signature", SIGNATURE_LEN)
    if mode == "everyone":
        if _KEYS_CONTACTS & properties.keys():
            raise LanAnnouncementError("everyone-mode announcement with a tag")
        try:
            handle = need(b"h").decode("ascii")
        except UnicodeDecodeError:
            raise LanAnnouncementError("handle is not ASCII") from None
        if not is_valid_handle(handle):
            raise LanAnnouncementError("invalid handle")
        public_key = _unb64(need(b"k"), "public key", PUBLIC_KEY_LEN)
        return Announcement(
            mode, port, issued, hosts, signature, handle=handle, public_key=public_key
        )
    if _KEYS_EVERYONE & properties.keys():
        raise LanAnnouncementError("contacts-mode announcement names its key")
    nonce = _unb64(need(b"n"), "nonce", NONCE_LEN)
    tag = _unb64(need(b"g"), "tag", TAG_LEN)
    return Announcement(mode, port, issued, hosts, signature, nonce=nonce, tag=tag)


class PeerSummary(TypedDict):
    """A peer as the control API's ``peers`` and ``peer`` event show it."""

    handle: str
    fingerprint: str
    addresses: list[str]
    via: str
    last_seen: float | None
    pinned: bool
    verified: bool
    mode: str | None


@dataclass(frozen=True, slots=True)
class LanPeer:
    """A nearby node, as verified from its mDNS announcement."""

    handle: str
    public_key: bytes
    #: The A/AAAA addresses it announced that its signature also covers, with its port.
    addresses: tuple[Address, ...]
    mode: Mode
    #: The announcer's clock when it signed (Unix seconds).
    issued: int
    #: Our clock when we last verified an announcement of it (Unix seconds).
    last_seen: float
    #: The handle's pinned key is this key. Otherwise the handle is only claimed (the
    #: signature proves the key, nothing proves the handle until the DHT or the user does).
    pinned: bool

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def summary(self) -> PeerSummary:
        """A JSON-ready view for the control API."""
        return {
            "handle": self.handle,
            "fingerprint": self.fingerprint,
            "addresses": [str(a) for a in self.addresses],
            "via": "lan",
            "last_seen": self.last_seen,
            "pinned": self.pinned,
            # Today the only proof of a handle is a pin; kept apart from "pinned" so a
            # later DHT confirmation can set it without pinning.
            "verified": self.pinned,
            "mode": self.mode,
        }


def verify_announcement(
    announcement: Announcement,
    *,
    source_addresses: Sequence[Address],
    now: float,
    contacts: Mapping[bytes, str],
    pins: Callable[[str], bytes | None],
    max_contacts: int = MAX_CONTACTS_SCANNED,
) -> LanPeer:
    """Check the signature and the pins; return the peer.

    ``source_addresses`` are the A/AAAA records of the announcing instance with its SRV
    port. The port must be the signed one; the peer's addresses are those that are also
    signed (addresses only in A/AAAA records, e.g. stale cache entries or ones an attacker
    injected, are dropped; addresses only in the TXT record are never used). ``contacts``
    maps pinned keys to handles (for contacts mode), ``pins`` a handle to its pinned key.
    """
    signed = set(announcement.hosts)
    usable: dict[Address, None] = {}
    for source in source_addresses:
        if source.port != announcement.port:
            raise LanAnnouncementError("SRV port differs from the signed port")
        if source.host in signed:
            usable[source] = None
    if not usable:
        raise LanAnnouncementError("none of the announced addresses is signed")
    message = announcement.signed_bytes()
    if announcement.mode == "everyone":
        assert announcement.handle is not None and announcement.public_key is not None
        handle, key = announcement.handle, announcement.public_key
        if not verify_signature(key, message, announcement.signature):
            raise LanAnnouncementError("announcement signature does not verify")
        pinned_key = pins(handle)
        if pinned_key is not None and not hmac.compare_digest(pinned_key, key):
            raise LanPinConflict(
                f"an mDNS announcement claims {handle!r} with key {fingerprint(key)[:12]}, "
                f"but {handle!r} is pinned to {fingerprint(pinned_key)[:12]}: ignored",
                handle=handle,
                key=key,
            )
        pinned = pinned_key is not None
    else:
        assert announcement.nonce is not None and announcement.tag is not None
        day = epoch_day(announcement.issued)
        found = recognise_tag(
            announcement.nonce, announcement.tag, day, contacts.keys(), limit=max_contacts
        )
        if found is None:
            raise LanNotAContact("contacts-mode announcement from no contact of ours")
        if not verify_signature(found, message, announcement.signature):
            raise LanAnnouncementError("announcement signature does not verify")
        handle, key, pinned = contacts[found], found, True
        # ``contacts`` may be a slightly older snapshot than ``pins``: the pin decides.
        pinned_key = pins(handle)
        if pinned_key is None:
            raise LanNotAContact(f"{handle!r} is no longer a contact")
        if not hmac.compare_digest(pinned_key, key):
            raise LanPinConflict(f"{handle!r} is now pinned to another key: ignored")
    return LanPeer(
        handle=handle,
        public_key=key,
        addresses=tuple(usable),
        mode=announcement.mode,
        issued=announcement.issued,
        last_seen=now,
        pinned=pinned,
    )


def parse_txt(
    text: bytes,
    *,
    source_addresses: Sequence[Address],
    now: float,
    contacts: Mapping[bytes, str],
    pins: Callable[[str], bytes | None],
    max_clock_skew: float = 600,
    max_contacts: int = MAX_CONTACTS_SCANNED,
) -> LanPeer:
    """Decode and verify a peer's TXT RDATA; raise :class:`LanAnnouncementError` (a
    WireError) for anything that is not a current, correctly signed announcement that
    agrees with our pins."""
    announcement = decode_announcement(decode_txt(text), now=now, max_clock_skew=max_clock_skew)
    return verify_announcement(
        announcement,
        source_addresses=source_addresses,
        now=now,
        contacts=contacts,
        pins=pins,
        max_contacts=max_contacts,
    )


# --------------------------------------------------------------------------- peer table


class LanPeerTable:
    """The nearby peers: by public key, each reachable under one or more instance names.

    Sans-I/O: the service feeds it verified peers, removals (goodbye or TTL, from the
    browser) and the time; it answers what changed.
    """

    def __init__(self, own_key: bytes, *, max_peers: int, stale_after: float) -> None:
        self._own_key = own_key
        self._max_peers = max_peers
        self._stale_after = stale_after
        self._peers: dict[bytes, LanPeer] = {}
        self._names: dict[str, bytes] = {}

    def update(self, name: str, peer: LanPeer) -> Literal["added", "updated"] | None:
        """Record a verified announcement under instance ``name``; None if ignored."""
        if peer.public_key == self._own_key:
            return None  # ourselves, or someone replaying us
        previous_key = self._names.get(name)
        if previous_key is not None and previous_key != peer.public_key:
            self.remove(name)  # the instance now speaks for another key
        if peer.public_key not in self._peers and len(self._peers) >= self._max_peers:
            return None
        self._names[name] = peer.public_key
        known = peer.public_key in self._peers
        self._peers[peer.public_key] = peer
        return "updated" if known else "added"

    def remove(self, name: str) -> LanPeer | None:
        """Forget an instance; return its peer if no other instance speaks for it."""
        key = self._names.pop(name, None)
        if key is None or key in self._names.values():
            return None
        return self._peers.pop(key, None)

    def expire(self, now: float) -> list[LanPeer]:
        """Drop peers not verified for ``stale_after`` seconds; return them."""
        gone = [p for p in self._peers.values() if p.last_seen < now - self._stale_after]
        for peer in gone:
            del self._peers[peer.public_key]
            for name in [n for n, k in self._names.items() if k == peer.public_key]:
                del self._names[name]
        return gone

    def names_silent_since(self, cutoff: float) -> list[str]:
        """Instance names whose peer has not been verified since ``cutoff``."""
        return [n for n, k in self._names.items() if self._peers[k].last_seen < cutoff]

    def name_of(self, name: str) -> bytes | None:
        return self._names.get(name)

    def peers(self) -> list[LanPeer]:
        return sorted(self._peers.values(), key=lambda p: (p.handle, p.public_key))

    def __len__(self) -> int:
        return len(self._peers)
