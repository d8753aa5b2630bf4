"""What a DHT request costs its sender, and what a reply may cost the address it goes to.

Pure, like the core: no clock but the ``now`` passed in, no I/O. Three budgets
(docs/SECURITY.md, "DHT budgets", has the defaults and their config keys):

- :class:`RequestBudget`: token buckets per request kind, per source address and per
  source /24 (IPv4) or /48 (IPv6). A request over either budget is dropped before it is
  decoded (the method is read from its first bytes) and counted in ``dropped``. The table
  of buckets is an LRU of at most ``rate_table_max`` entries, so that a flood from spoofed
  sources cannot grow it: a forgotten source starts again with a full bucket, which the
  /24 bucket (and the table's size) still bound.
  All sources whose address is not validated yet share one more bucket
  (``unvalidated_rate``), checked before decoding too, so that a flood from many sources
  cannot take the work validated contacts need.
- :class:`SourceQuota`: how many stored items (records, mailbox entries) each source
  address and /24|/48 has here, as running counters (charged on a new item, released
  when the item goes); a source past its quota is refused.
- :func:`fit_reply`: no amplification (BEP 5's token, QUIC's RFC 9000 section 8.1 rule):
  a reply to a source whose address is not validated (it has not echoed our address
  cookie, nor answered a proving request of ours, from that address) is never larger
  than the request. A contact list is cut to fit, then a find_value's value, then a
  mailbox page's entries (``more`` set, so the owner asks on); what cannot fit is not
  sent. Honest requesters pad their requests while they are not validated
  (:func:`request_padding`), so that the full reply fits; the cookie in that reply lets
  them prove their address, and later requests go unpadded.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
from collections import Counter, OrderedDict
from collections.abc import Hashable
from typing import Any

import msgpack

from ..config import DHTConfig
from ..wire import COOKIE_LEN, OBSERVED_LEN

log = logging.getLogger(__name__)

Address = tuple[str, int]

#: Tokens a request of each kind takes from its buckets: the kinds that check a signature
#: or write to SQLite cost more than a ping. An unknown or malformed method costs 1 and is
#: bucketed as "other" (it is dropped anyway once decoded).
REQUEST_COST: dict[str, float] = {
    "ping": 1.0,
    "find_node": 1.0,
    "find_value": 2.0,
    "proof": 2.0,
    "store": 4.0,
    "mailbox_put": 4.0,
    "mailbox_fetch": 4.0,
    "mailbox_delete": 4.0,
    # a put relayed for someone (p2pd/dht/mailbox_relay.py, which has its own limits)
    "mailbox_relay": 4.0,
    # a lookup run for someone (p2pd/dht/mailbox_find.py, which has its own limits)
    "mailbox_find": 4.0,
    # an owner's pin revoking a pass (p2pd/dht/mailbox_revoke.py): a signature check
    "mailbox_revoke": 4.0,
    # NAT address discovery (p2pd/dht/reachability.py, which has its own limits too): a
    # dial-back request makes us send from a second socket; a nonce that came back
    # makes us decide.
    "dialback": 4.0,
    "dialed": 1.0,
}
#: What a request is padded to while its sender is not validated at the node it asks:
#: room for the whole reply, a signature and an address cookie included. A find_node reply
#: with 20 IPv4 contacts (about 48 bytes each) is about 1,100 bytes; 1,200 is also what
#: every path carries (RFC 9000 section 14). A find_value reply holds a record too (a
#: daemon's, with its prekey bundle, is up to about 1,700 bytes; the largest 2,601), and
#: a mailbox page one entry of up to 2,048 bytes (the owner asks for the next page,
#: proven by then). What does not fit is cut: IPv6 contacts, the far end of a list, a
#: record larger than the usual, until the sender proves its address.
REQUEST_PAD: dict[str, int] = {
    "find_node": 1200,
    "mailbox_find": 1200,  # answered as a find_node
    "find_value": 2900,
    "mailbox_fetch": 2300,
}
#: The other kinds: a signed reply with a cookie and the observed address (ping: 160
#: bytes) fits in this.
REQUEST_PAD_MIN = 160
#: What some kinds are padded to even once validated: a node that forgot us (a restart,
#: its table of proven addresses full) must still find room in them for a signed reply
#: (and a cookie), not leave them unanswered. A find_node to such a node gets a cut reply
#: with a cookie; the rest (store, mailbox put and delete) are larger than their replies.
VALIDATED_PAD: dict[str, int] = {
    "ping": 160,
    "find_value": 1200,
    "mailbox_fetch": 2300,
    "mailbox_find": 1200,  # a relay refuses a smaller one (p2pd/dht/mailbox_find.py)
}
#: Signed replies a second to sources that have not proved their address, all together
#: (and the bucket's depth): beyond, such a request asking for a signed reply is dropped
#: (``unvalidated_limited_signature``). Honest strangers (a join, a first contact) ask
#: a few a second; a many-source flood drew 1,500 a second within the unvalidated budget.
UNVALIDATED_SIGN_RATE = 250.0
UNVALIDATED_SIGN_BURST = 1000.0
#: Bytes of a response frame around its result: kind, message id, array header.
_RESPONSE_HEAD = 1 + 20 + 1
#: A signature (bin 8 header + 64 bytes) or nil; a cookie with its header.
_SIGNATURE_TAIL, _NIL_TAIL, _COOKIE_TAIL = 66, 1, 18
_OBSERVED_TAIL = 2 + OBSERVED_LEN
#: A full store (records or mailboxes) culls what expired at most this often (seconds of
#: its wall clock): a cull walks everything held.
FULL_CULL_INTERVAL = 60.0
#: A source logs "speaks frame v1" at most once per this many seconds, and at most this
#: many sources are logged per such interval (then only counted).
OLD_VERSION_LOG_INTERVAL = 3600.0
OLD_VERSION_LOG_MAX = 256


def subnet_of(host: str) -> str:
    """The /24 (IPv4) or /48 (IPv6) of a source address, as a cheap key (no exemption for
    private addresses: a budget is not a Sybil limit). A string the stdlib cannot parse
    is its own subnet."""
    if ":" not in host:
        return host.rpartition(".")[0]
    try:
        return ipaddress.IPv6Address(host.partition("%")[0]).packed[:6].hex()
    except ValueError:
        return host


_METHOD_NAMES = {name.encode(): name for name in REQUEST_COST}
#: The counter a request dropped over budget goes to, by method.
_RATE_LIMITED = {name: "rate_limited_" + name for name in [*REQUEST_COST, "other"]}
_UNVALIDATED_LIMITED = {name: "unvalidated_limited_" + name for name in _RATE_LIMITED}


def method_of(payload: bytes) -> str:
    """The method of a request payload (``[method, args, prove(, pad)]`` in msgpack),
    read from its first bytes without decoding it: a fixarray header, then a fixstr."""
    if len(payload) < 2 or payload[0] not in (0x93, 0x94) or not 0xA1 <= payload[1] <= 0xAF:
        return "other"
    return _METHOD_NAMES.get(payload[2 : 2 + (payload[1] & 0x1F)], "other")


class TokenBuckets:
    """Token buckets by key (``rate`` tokens a second, at most ``burst``), at most
    ``max_entries`` of them: the least recently used is forgotten first."""

    def __init__(self, rate: float, burst: float, max_entries: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_entries = max_entries
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def time_to(self, key: Hashable, cost: float) -> float:
        """Seconds until ``key``'s bucket (as last seen) holds ``cost`` tokens."""
        bucket = self._buckets.get(key)
        if bucket is None or bucket[0] >= cost or self.rate <= 0:
            return 0.0
        return (cost - bucket[0]) / self.rate

    def take(self, key: Hashable, cost: float, now: float) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket if it holds them."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_entries:
                buckets.popitem(last=False)
            bucket = buckets[key] = [self.burst, now]
        else:
            buckets.move_to_end(key)
            if now > bucket[1]:  # (a clock that steps back refills nothing, takes nothing)
                bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
                bucket[1] = now
        if bucket[0] < cost:
            return False
        bucket[0] -= cost
        return True


class SourceQuota:
    """Items stored here for each source address and /24|/48, as running counters."""

    def __init__(self, per_address: int, per_subnet: int) -> None:
        self.per_address = per_address
        self.per_subnet = per_subnet
        self._source: dict[Hashable, tuple[str, str]] = {}
        self._held: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._source)

    def held(self, host: str) -> int:
        return self._held[host]

    def admits(self, host: str) -> bool:
        """Whether ``host`` may store one more item here."""
        held = self._held
        return held[host] < self.per_address and held["/" + subnet_of(host)] < self.per_subnet

    def charge(self, item: Hashable, host: str) -> None:
        """``item`` is now held here for ``host`` (once: an item already charged stays
        with its first source)."""
        if item in self._source:
            return
        pair = (host, "/" + subnet_of(host))
        self._source[item] = pair
        for name in pair:
            self._held[name] += 1

    def release(self, item: Hashable) -> None:
        """``item`` is gone (expired, deleted, replaced by a cull): its source may store
        another. Nothing for an item never charged (ours, or loaded from disk)."""
        pair = self._source.pop(item, None)
        if pair is None:
            return
        for name in pair:
            self._held[name] -= 1
            if self._held[name] <= 0:
                del self._held[name]


class RequestBudget:
    """Every budget of one node: request rates, storage quotas, and which nodes we
    proved our own address to (so that our requests to them need no padding)."""

    def __init__(self, config: DHTConfig) -> None:
        size = config.rate_table_max
        self.by_address = TokenBuckets(config.request_rate, config.request_burst, size)
        self.by_subnet = TokenBuckets(
            config.request_rate * config.subnet_rate_factor,
            config.request_burst * config.subnet_rate_factor,
            size,
        )
        #: All sources not validated, together: a flood from many (spoofed) sources gets
        #: a fresh bucket per source, and must not take what validated contacts need.
        self.unvalidated = TokenBuckets(config.unvalidated_rate, config.unvalidated_burst, 1)
        #: Signed replies to such sources, together: an Ed25519 signature is most of
        #: what answering one costs (scripts/bench_flood.py, many sources).
        self.unvalidated_signatures = TokenBuckets(UNVALIDATED_SIGN_RATE, UNVALIDATED_SIGN_BURST, 1)
        self.records = SourceQuota(config.records_per_address, config.records_per_subnet)
        self.mailbox = SourceQuota(config.mailbox_per_address, config.mailbox_per_subnet)
        #: Requests dropped over budget, by kind, and replies that could not be cut to
        #: the size of their request.
        self.dropped: Counter[str] = Counter()
        #: (method, source address) -> until when its bucket is surely empty: a flood
        #: from one source is dropped on one dict lookup (cleared when it grows past
        #: ``rate_table_max``).
        self._empty_until: dict[tuple[str, str], float] = {}
        self._validated: OrderedDict[Address, float] = OrderedDict()
        #: Addresses that proved they receive (checked before decoding: a flood from
        #: many sources is held to the unvalidated budget at the cost of a dict lookup).
        self._proven: OrderedDict[Address, float] = OrderedDict()
        self._proven_for = config.verified_lifetime
        #: (Without the Sybil defences, a benchmark's switch, nothing is ever proven.)
        self._defended = config.defences
        self._validated_for = config.verified_lifetime / 2
        self._validated_max = size
        #: source IP -> when we last logged that it speaks frame version 1.
        self._old_logged: OrderedDict[str, float] = OrderedDict()

    def allow(self, payload: bytes, address: Address, now: float) -> bool:
        """Whether a request (its payload, as :func:`p2pd.wire.split_frame` cut it) from
        ``address`` is within budget; if not, it is counted and must be dropped. A source
        whose address did not prove itself (:meth:`note_proven`) also takes from the
        budget all such sources share."""
        host = address[0]
        method = method_of(payload)
        key = (method, host)
        empty = self._empty_until
        until = empty.get(key)
        if until is not None and now < until:
            self.dropped[_RATE_LIMITED[method]] += 1
            return False
        cost = REQUEST_COST.get(method, 1.0)
        by_address = self.by_address
        if by_address.take(key, cost, now):
            if self.by_subnet.take((method, subnet_of(host)), cost, now):
                proven = self._proven.get(address)
                if not self._defended or (proven is not None and now - proven < self._proven_for):
                    return True
                if self.unvalidated.take(None, cost, now):
                    return True
                self.dropped[_UNVALIDATED_LIMITED[method]] += 1
                return False
        else:
            if len(empty) >= by_address.max_entries:
                empty.clear()
            empty[key] = now + by_address.time_to(key, cost)
        self.dropped[_RATE_LIMITED[method]] += 1
        return False

    def note_proven(self, address: Address, now: float) -> None:
        """A node proved it receives at ``address`` (a ``proof`` with our cookie, or a
        proving reply to us): its requests no longer take from the unvalidated budget."""
        proven = self._proven
        proven.pop(address, None)
        proven[address] = now
        while len(proven) > self._validated_max:
            proven.popitem(last=False)

    # ------------------------------------------------------------------ our own address

    def validated_at(self, address: Address, now: float) -> bool:
        """Whether the node at ``address`` has (as far as we know) validated our address:
        it answered us without a cookie, or we sent it the proof its cookie asked for."""
        when = self._validated.get(address)
        return when is not None and now - when < self._validated_for

    def note_reply(self, address: Address, now: float) -> None:
        """A reply from ``address`` carried no cookie, or we proved ourselves to it."""
        validated = self._validated
        validated.pop(address, None)
        validated[address] = now
        while len(validated) > self._validated_max:
            validated.popitem(last=False)

    def forget(self, address: Address) -> None:
        """A request there went unanswered: perhaps its reply did not fit our unpadded
        request (the node forgot us, or restarted); pad the next one."""
        self._validated.pop(address, None)

    def padding(self, method: str, address: Address, now: float, *, anonymous: bool) -> int:
        """The size to pad a request to (0: none): see REQUEST_PAD and VALIDATED_PAD."""
        if anonymous or not self.validated_at(address, now):
            return REQUEST_PAD.get(method, REQUEST_PAD_MIN)
        return VALIDATED_PAD.get(method, 0)

    # ------------------------------------------------------------------ logging

    def log_old_version(self, host: str, now: float) -> None:
        """A frame of version 1: logged once per source per interval, for at most
        OLD_VERSION_LOG_MAX sources per interval (a flood of spoofed sources is only
        counted, by the core)."""
        logged = self._old_logged
        last = logged.get(host)
        if last is not None and now - last < OLD_VERSION_LOG_INTERVAL:
            return
        while logged and now - next(iter(logged.values())) >= OLD_VERSION_LOG_INTERVAL:
            logged.popitem(last=False)
        if len(logged) >= OLD_VERSION_LOG_MAX:
            return
        logged.pop(host, None)
        logged[host] = now
        log.warning("peer %s speaks DHT frame v1 (an older p2pd); ignored", host)


def address_cookie(secret: bytes, sender_key: bytes, address: Address, period: int) -> bytes:
    """Our address cookie for ``sender_key`` at ``address`` in a time period: a keyed
    BLAKE2b of the three, so that it holds no state here and only the node that
    receives at that address learns it (docs/PROTOCOL.md, "Earned contacts")."""
    host = address[0].encode()
    data = b"%b%b\x00%b%b" % (
        sender_key,
        host,
        address[1].to_bytes(2, "big"),
        period.to_bytes(8, "big", signed=True),
    )
    return hashlib.blake2b(data, key=secret, digest_size=COOKIE_LEN).digest()


def _packed_len(value: Any) -> int:
    return len(msgpack.packb(value, use_bin_type=True))


@functools.lru_cache(maxsize=16384)
def _packed_contact_len(node_key: bytes, host: str, port: int) -> int:
    return _packed_len([node_key, host, port])


def _item_len(item: Any) -> int:
    """``_packed_len(item)``; a contact ([node key, host, port], a list or the tuple
    DHTCore._neighbors sends: the items of most lists cut here) by a cache: packing
    each of 32 contacts per reply to an unvalidated sender was 3 % of the CPU of
    building a 200-core network."""
    if (type(item) is list or type(item) is tuple) and len(item) == 3:
        node_key, host, port = item
        if type(node_key) is bytes and type(host) is str and type(port) is int:
            return _packed_contact_len(node_key, host, port)
    return _packed_len(item)


def _fit_list(items: list[Any], room: int) -> int:
    """How many of ``items`` (from the front) fit in ``room`` bytes as a msgpack array."""
    used, count = 1 + (2 if len(items) > 15 else 0), 0
    for item in items:
        used += _item_len(item)
        if used > room:
            break
        count += 1
    return count


def fit_reply(
    method: str, result: Any, request_size: int, *, signed: bool, cookie: bool
) -> tuple[Any, bool]:
    """(the result, cut so that its response frame is at most ``request_size`` bytes;
    whether it fits at all). Contacts are dropped from the far end of the list (they
    come nearest first); a find_value keeps its value if it fits with no contacts."""
    room = request_size - _RESPONSE_HEAD - (_SIGNATURE_TAIL if signed else _NIL_TAIL)
    room -= _COOKIE_TAIL if cookie else 0
    room -= _OBSERVED_TAIL  # every reply tells the asker its address (reachability.py)
    if room < 0:
        return result, False
    if _packed_len(result) <= room:
        return result, True
    if method in ("find_node", "mailbox_find"):
        return result[: _fit_list(result, room)], True
    if method == "find_value":
        nodes = result["nodes"]
        cut: dict[str, Any] = {k: v for k, v in result.items() if k != "nodes"}
        base = _packed_len({**cut, "nodes": []})
        if base > room:  # the value does not fit: the contacts alone may
            cut, base = {}, _packed_len({"nodes": []})
        cut["nodes"] = nodes[: _fit_list(nodes, room - base + 1)]
        return cut, base <= room
    if method == "mailbox_fetch":
        entries = result["entries"]
        base = _packed_len({"entries": [], "more": True})
        kept = entries[: _fit_list(entries, room - base + 1)]
        return {"entries": kept, "more": result["more"] or len(kept) < len(entries)}, base <= room
    return result, False
