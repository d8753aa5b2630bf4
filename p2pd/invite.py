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
``[node] bootstrap`` list of config.toml) joins through its addresses. Pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidAddress, UsageError
from .identity import FINGERPRINT_LEN, HandleRef
from .wire import Address

__all__ = ["INVITE_PREFIX", "MAX_INVITE", "MAX_INVITE_ADDRESSES", "InvalidInvite", "Invite"]

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
