"""What the mailbox tests share: opening sealed entries as their owner."""

from __future__ import annotations

import contextlib

import nacl.public
import nacl.signing

from p2pd.dht.mailbox_entry import MailboxEntryError, open_entry
from p2pd.identity import Identity


def unseal(who: Identity) -> nacl.public.SealedBox[nacl.public.PrivateKey]:
    """The sealed box only ``who`` can open (its identity key as X25519)."""
    return nacl.public.SealedBox(nacl.signing.SigningKey(who.seed).to_curve25519_private_key())


def readable(owner: Identity, entries: list[tuple[bytes, bytes]]) -> list[bytes]:
    """What ``owner`` can open among ``entries`` (junk does not open)."""
    out = []
    for _, sealed in entries:
        with contextlib.suppress(MailboxEntryError):
            out.append(open_entry(unseal(owner), sealed))
    return out
