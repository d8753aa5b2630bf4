"""Address hints (issue 13, items 7 and 8): where a pinned contact can be reached, as its
invite or the contact itself said, tried by delivery before the DHT record's addresses.

Two sources fill them:

- ``p2pd contacts add INVITE`` stores the invite's addresses (source ``invite``);
- a daemon whose public record hides its direct addresses (``[privacy] addresses =
  "contacts"``) tells each pinned contact where it is, inside the end-to-end encrypted
  session, once per contact and per change of its addresses (source ``contact``). The
  hint travels as a session signal (message kind 2, like call signals: acked, never
  stored, never left in a mailbox) whose text is ``{"type": "addresses", "addresses":
  ["HOST:PORT", ...]}``; docs/PROTOCOL.md, "Address hints".

A hint is accepted only from a key that is pinned here, and only as 1 to
:data:`MAX_HINT_ADDRESSES` literal addresses with a port; anything else is dropped and
counted. A hint is where to try a QUIC handshake that must prove the pinned key: a wrong
one wastes a connection attempt and nothing else.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from .contact_news import ContactNews
from .errors import InvalidAddress
from .identity import fingerprint
from .records import MAX_ADDRESSES
from .wire import Address

if TYPE_CHECKING:
    from .records import HandleRecord

__all__ = [
    "MAX_HINT_ADDRESSES",
    "MAX_HINT_TEXT",
    "AddressHints",
    "HintAnnouncer",
    "decode_hint",
    "encode_hint",
    "hints_first",
    "is_hint",
]

log = logging.getLogger(__name__)

#: As many as a handle record holds.
MAX_HINT_ADDRESSES = MAX_ADDRESSES
#: 8 bracketed IPv6 addresses with ports and the JSON around them fit in 512 bytes.
MAX_HINT_TEXT = 1024
HINT_TYPE = "addresses"
HINT_SOURCES = ("invite", "contact")
#: Contacts whose hint waits to be sent; beyond this, a hint is dropped and sent on the
#: next connection to that contact instead.
MAX_QUEUED_HINTS = 64
#: How long one hint may take to be acknowledged.
HINT_SEND_TIMEOUT = 15.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS address_hints (
    public_key BLOB PRIMARY KEY,
    addresses TEXT NOT NULL,
    source TEXT NOT NULL,
    updated REAL NOT NULL
);
"""


def encode_hint(addresses: list[Address]) -> str:
    return json.dumps({"type": HINT_TYPE, "addresses": [str(a) for a in addresses]})


def is_hint(text: str) -> bool:
    """Whether a session signal is an address hint rather than a call signal (which
    p2pd/calls.py decodes). Anything longer than a hint can be is not one."""
    if len(text) > MAX_HINT_TEXT:
        return False
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("type") == HINT_TYPE


def decode_hint(text: str) -> list[Address]:
    """A hint's addresses; ValueError for anything malformed."""
    if len(text) > MAX_HINT_TEXT:
        raise ValueError("address hint too long")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError("address hint is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"type", "addresses"} or doc["type"] != HINT_TYPE:
        raise ValueError("not an address hint")
    raw = doc["addresses"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_HINT_ADDRESSES:
        raise ValueError(f"an address hint holds 1 to {MAX_HINT_ADDRESSES} addresses")
    if not all(isinstance(a, str) for a in raw):
        raise ValueError("an address hint holds HOST:PORT strings")
    return _checked([_parse(a) for a in raw])


def _parse(text: str) -> Address:
    try:
        return Address.parse(text)
    except InvalidAddress as exc:
        raise ValueError(f"bad address in hint: {exc.message}") from None


def _checked(addresses: list[Address]) -> list[Address]:
    if any(a.port == 0 or a.host in ("0.0.0.0", "::") for a in addresses):
        raise ValueError("a hinted address needs a host and a port")
    out: list[Address] = []
    for a in addresses:
        if a not in out:
            out.append(a)
    return out


def hints_first(
    hinted: list[Address], hinted_at: float, record: HandleRecord | None
) -> list[Address]:
    """The hints delivery tries before the record's addresses: all of them, unless the
    contact's record (signed, looked up lately) lists addresses and was issued after
    the hints were stored: an invite's addresses go stale when their daemon moves,
    and each stale one would cost a connect timeout before every delivery."""
    if record is not None and record.addresses and record.issued > hinted_at:
        return []
    return hinted


class AddressHints:
    """The hints kept per pinned key (SQLite table ``address_hints``), newest wins."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        conn.executescript(_SCHEMA)
        conn.commit()
        #: Hints refused (not from a pinned key, malformed): ``status`` shows them.
        self.stats = {"hints_received": 0, "hints_refused": 0, "hints_sent": 0}

    def get(self, public_key: bytes) -> list[Address]:
        return self.get_dated(public_key)[0]

    def get_dated(self, public_key: bytes) -> tuple[list[Address], float]:
        """The hints for a key, and when they were stored (0: none)."""
        row = self._conn.execute(
            "SELECT addresses, updated FROM address_hints WHERE public_key=?", (public_key,)
        ).fetchone()
        if row is None:
            return [], 0.0
        try:
            addresses = _checked([Address.parse(a) for a in str(row[0]).split(",") if a])
            return addresses, float(row[1])
        except (InvalidAddress, ValueError):
            log.warning("ignoring a corrupt address hint row")
            return [], 0.0

    def set(self, public_key: bytes, addresses: list[Address], now: float, source: str) -> None:
        if source not in HINT_SOURCES:
            raise ValueError(f"unknown hint source {source!r}")
        kept = _checked(addresses)[:MAX_HINT_ADDRESSES]
        # No await between this and the commit: another task's transaction is never
        # open on the shared connection here (delivery commits before it awaits).
        with self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO address_hints(public_key, addresses, source, updated) "
                "VALUES (?,?,?,?)",
                (public_key, ",".join(str(a) for a in kept), source, now),
            )

    def received(self, sender_key: bytes, pinned: bool, text: str, now: float) -> bool:
        """A hint came in a session signal from ``sender_key``: kept if that key is
        pinned (``pinned``) and the hint is well formed; else dropped and counted."""
        self.stats["hints_received"] += 1
        if not pinned:
            self.stats["hints_refused"] += 1
            log.info("ignored an address hint from %s: not a contact", fingerprint(sender_key)[:12])
            return False
        try:
            addresses = decode_hint(text)
        except ValueError as exc:
            self.stats["hints_refused"] += 1
            log.info("ignored an address hint from %s: %s", fingerprint(sender_key)[:12], exc)
            return False
        self.set(sender_key, addresses, now, "contact")
        return True


class HintAnnouncer(ContactNews):
    """Tells pinned contacts our direct addresses when the public record does not
    (``enabled()``), once per change of them (p2pd/contact_news.py)."""

    def __init__(
        self,
        hints: AddressHints,
        *,
        enabled: Callable[[], bool],
        addresses: Callable[[], list[Address]],
        handle_of: Callable[[bytes], str | None],
        send: Callable[[str, bytes, str], Awaitable[object]],
    ) -> None:
        def current(key: bytes) -> tuple[Address, ...] | None:
            return tuple(addresses()[:MAX_HINT_ADDRESSES]) or None if enabled() else None

        super().__init__(
            what="our addresses",
            current=current,
            text=lambda version: encode_hint(list(cast(tuple[Address, ...], version))),
            handle_of=handle_of,
            send=send,
            stats=hints.stats,
            sent_stat="hints_sent",
            timeout=HINT_SEND_TIMEOUT,
            max_queued=MAX_QUEUED_HINTS,
        )
