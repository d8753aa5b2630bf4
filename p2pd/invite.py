"""Invites (issue 13, item 7, first step): one line that holds a self-certifying handle
and where its daemon is now, to start from when there is no bootstrap node::

    p2pd-invite:bob#u6cmphjezpfbnuijhw3hnzhzi6qadegr@198.18.10.1:4747,10.1.0.11:4747

- ``bob#<32 base32 characters>``: the handle and the *whole* fingerprint of its key
  (160 bits), so the invite names exactly one key: a record that resolves for ``bob``
  under another key is refused wherever the handle is used as ``bob#<fingerprint>``.
- ``@`` and 1 to :data:`MAX_INVITE_ADDRESSES` addresses, ``HOST:PORT`` or
  ``[V6]:PORT``, comma-separated: the daemon's DHT (and QUIC: one port) addresses, its
  public mapped one first when it has one (docs/PROTOCOL.md, "Address discovery and
  dial-back"). They are hints, not signed: the worst a forged address does is waste a
  bootstrap attempt, since DHT contacts prove their node keys.

``p2pd invite`` prints one; ``p2pd daemon --bootstrap INVITE`` (or an invite in the
``[node] bootstrap`` list of config.toml) joins through its addresses.

``p2pd contacts add INVITE`` (:func:`add_contact`) pins the invite's handle to its key.
The invite names the key only by its fingerprint (a hash), so the key itself is fetched:
from the DHT, as the record filed under ``handle#<whole fingerprint>`` (through the
invite's own addresses when this daemon knows no other node). That record is signed by
the key it carries, over the handle, and the lookup refuses any record whose key does
not hash to the invite's 160-bit fingerprint: a forger would need a second preimage.
Asking the invite's address directly would prove the key as well (the QUIC handshake),
but needs a new "who are you" exchange, fails when the address has moved or sits behind
a NAT, and says nothing signed about the handle; the DHT path has none of these faults
and reuses the lookup every send already trusts.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .errors import InvalidAddress, KeyChanged, NotFound, UsageError
from .identity import FINGERPRINT_LEN, HandleRef, fingerprint
from .wire import Address

if TYPE_CHECKING:
    from .address_hints import AddressHints
    from .messaging import Contact, Contacts
    from .records import HandleRecord

__all__ = [
    "INVITE_PREFIX",
    "MAX_INVITE",
    "MAX_INVITE_ADDRESSES",
    "InvalidInvite",
    "Invite",
    "add_contact",
]

INVITE_PREFIX = "p2pd-invite:"
#: Longest invite accepted: prefix, handle, fingerprint and 8 IPv6 addresses fit.
MAX_INVITE = 512
#: As many addresses as a handle record holds.
MAX_INVITE_ADDRESSES = 8


class InvalidInvite(UsageError):
    """That is not a valid invite."""


@dataclass(frozen=True, slots=True)
class Invite:
    handle: str
    fingerprint: str
    addresses: tuple[Address, ...]

    def __post_init__(self) -> None:
        ref = HandleRef.parse(f"{self.handle}#{self.fingerprint}")  # InvalidHandle if not
        if ref.fingerprint_prefix is None or len(ref.fingerprint_prefix) != FINGERPRINT_LEN:
            raise InvalidInvite(f"an invite holds the whole fingerprint ({FINGERPRINT_LEN} chars)")
        if not 1 <= len(self.addresses) <= MAX_INVITE_ADDRESSES:
            raise InvalidInvite(f"an invite holds 1 to {MAX_INVITE_ADDRESSES} addresses")
        if any(a.port == 0 or a.host in ("0.0.0.0", "::") for a in self.addresses):
            raise InvalidInvite("an invite's addresses need a host and a port")

    @property
    def ref(self) -> HandleRef:
        """The handle as ``bob#<whole fingerprint>``: only that key resolves."""
        return HandleRef(self.handle, self.fingerprint)

    def __str__(self) -> str:
        where = ",".join(str(a) for a in self.addresses)
        return f"{INVITE_PREFIX}{self.handle}#{self.fingerprint}@{where}"

    @classmethod
    def parse(cls, text: str) -> Invite:
        text = text.strip()
        if len(text) > MAX_INVITE:
            raise InvalidInvite(f"an invite is at most {MAX_INVITE} characters")
        if not text.startswith(INVITE_PREFIX):
            raise InvalidInvite(f"an invite starts with {INVITE_PREFIX!r}")
        who, at, where = text[len(INVITE_PREFIX) :].partition("@")
        handle, sharp, fp = who.partition("#")
        if not at or not sharp:
            raise InvalidInvite("an invite reads p2pd-invite:HANDLE#FINGERPRINT@HOST:PORT,...")
        parts = where.split(",")
        if len(parts) > MAX_INVITE_ADDRESSES:
            raise InvalidInvite(f"an invite holds 1 to {MAX_INVITE_ADDRESSES} addresses")
        try:
            addresses = tuple(Address.parse(p) for p in parts)
        except InvalidAddress as exc:
            raise InvalidInvite(f"bad address in invite: {exc.message}") from None
        return cls(handle, fp.lower(), addresses)


def is_invite(text: str) -> bool:
    return text.strip().startswith(INVITE_PREFIX)


def bootstrap_addresses(text: str) -> list[Address]:
    """A ``--bootstrap`` / ``[node] bootstrap`` entry: an invite's addresses, or one
    ``HOST:PORT``."""
    if is_invite(text):
        return list(Invite.parse(text).addresses)
    return [Address.parse(text)]


#: How long `contacts add` looks for the invite's record, and joins through the
#: invite's addresses: three of these (45 s) stay under the CLI's 60 s for an answer.
ADD_RESOLVE_TIMEOUT = 15.0


async def add_contact(
    invite: Invite,
    *,
    contacts: Contacts,
    hints: AddressHints,
    resolve: Callable[[HandleRef], Awaitable[HandleRecord]],
    bootstrap: Callable[[list[Address]], Awaitable[int]],
) -> tuple[Contact, bool]:
    """Pin ``invite``'s handle to the key its fingerprint names, and keep its addresses
    as hints for delivery. Returns the contact and whether it was pinned just now
    (False: it already was, to that key; the hints are refreshed).

    Raises KeyChanged if the handle is pinned to another key (the pin is never changed
    here: see `p2pd verify --accept-new`), NotFound if no record of that key is found,
    even through the invite's addresses."""
    ref = invite.ref
    contact = contacts.get(invite.handle)
    if contact is not None and not ref.matches(contact.public_key):
        raise KeyChanged(
            f"{invite.handle!r} is pinned to another key "
            f"({fingerprint(contact.public_key)[:12]}...) than the invite's "
            f"({invite.fingerprint[:12]}...): nothing was changed. Compare safety numbers "
            f"with `p2pd verify {invite.handle}`; to pin the invite's key instead, "
            f"`p2pd verify {invite.handle} --accept-new {invite.fingerprint}`"
        )
    added = contact is None
    if contact is None:
        record = await _find(invite, resolve, bootstrap)
        contact = contacts.pin(invite.handle, record.public_key, time.time())
        if contact.public_key != record.public_key:  # pinned meanwhile, to another key
            contacts.observe(invite.handle, record.public_key, time.time(), source="dht")
            raise KeyChanged(f"{invite.handle!r} was just pinned to another key")
    hints.set(contact.public_key, list(invite.addresses), time.time(), "invite")
    return contact, added


async def _find(
    invite: Invite,
    resolve: Callable[[HandleRef], Awaitable[HandleRecord]],
    bootstrap: Callable[[list[Address]], Awaitable[int]],
) -> HandleRecord:
    for attempt in range(2):
        if attempt:  # not found where we are: join through the invite itself, then again
            with trio.move_on_after(ADD_RESOLVE_TIMEOUT):
                await bootstrap(list(invite.addresses))
        try:
            with trio.fail_after(ADD_RESOLVE_TIMEOUT):
                record = await resolve(invite.ref)
        except (NotFound, trio.TooSlowError):
            continue
        # The lookup filters by the whole fingerprint already; checked again here, as
        # this is what the pin rests on.
        if record.handle == invite.handle and invite.ref.matches(record.public_key):
            return record
    raise NotFound(
        f"no record for {invite.handle}#{invite.fingerprint[:12]}... in the DHT, even through "
        "the invite's addresses: is its daemon running? Nothing was pinned"
    )
