"""Delivery's sender verification: a message (or call signal) from a key no contact
holds, claiming a handle, is pinned to that handle only if the DHT binds the handle to
that key; a claim to a handle pinned to another key is kept as evidence, never the pin.

The core reports such a claim (:class:`~p2pd.delivery.events.SenderUnverified`); the
service hands it to :meth:`SenderVerifier.verify` in a task of its own. Lookups are
bounded: one per claim at a time, :data:`MAX_VERIFYING` at once, each within the
resolve timeout, tried again after :data:`VERIFY_RETRY_DELAYS` when the DHT gave no
answer (a loaded network, a record not yet spread), then left unverified.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from ..dht import DHT
from ..errors import Contested, NotFound
from ..identity import DISPLAY_PREFIX, HandleRef, fingerprint
from ..messaging import Contacts
from ..records import HandleRecord
from .events import SenderUnverified

__all__ = ["MAX_VERIFYING", "VERIFY_RETRY_DELAYS", "SenderVerifier"]

log = logging.getLogger(__name__)

#: A sender's claimed handle whose lookup timed out or found nothing is looked up again
#: after these pauses (a loaded network, a record not yet spread), then left unverified.
VERIFY_RETRY_DELAYS = (5.0, 20.0, 60.0)
#: Claims checked at once; more wait for their next message (each costs lookups).
MAX_VERIFYING = 64


class SenderVerifier:
    """Checks the handles senders claim against the DHT and pins them (see the module
    docstring). ``remember(record)`` hands a record found on the way to the delivery
    service's record cache (the first message to the sender need not look it up
    again); ``resolve_timeout`` bounds each lookup."""

    def __init__(
        self,
        dht: DHT,
        contacts: Contacts,
        *,
        remember: Callable[[HandleRecord], None],
        resolve_timeout: float,
    ) -> None:
        self.dht = dht
        self.contacts = contacts
        self.remember = remember
        self.resolve_timeout = resolve_timeout
        self._verifying: set[tuple[str, bytes]] = set()  # claims being looked up

    @property
    def checking(self) -> int:
        """How many claims are being looked up (or wait to be looked up again) now."""
        return len(self._verifying)

    async def verify(self, event: SenderUnverified) -> None:
        """A key no contact holds claims a handle. A pinned handle: that is evidence of
        a suspected key, shown by `contacts` and `verify`, never the pin. A handle not
        pinned yet is pinned only if the DHT binds it to that key. A lookup that timed
        out or found nothing is tried again (VERIFY_RETRY_DELAYS): once pinned, what the
        sender wrote shows under its handle (`inbox --from`)."""
        claim = (event.handle, event.sender_key)
        if self._pinned_elsewhere(event):  # evidence of every sign, never deduplicated
            return
        if claim in self._verifying or len(self._verifying) >= MAX_VERIFYING:
            return  # one lookup per claim at a time, a bounded number at once
        self._verifying.add(claim)
        try:
            for delay in (0.0, *VERIFY_RETRY_DELAYS):
                if delay:
                    await trio.sleep(delay)
                if await self._check_claim(event):
                    return
            log.warning("a message claims to be from %r, whose record cannot be found: "
                        "left unverified", event.handle)  # fmt: skip
        finally:
            self._verifying.discard(claim)

    def _pinned_elsewhere(self, event: SenderUnverified) -> bool:
        """The claimed handle is pinned already: True (to another key: kept as evidence
        of a suspected key; to this one, pinned meanwhile: nothing to do)."""
        handle, key = event.handle, event.sender_key
        contact = self.contacts.get(handle)
        if contact is None:
            return False
        if contact.public_key != key:
            self.contacts.observe(handle, key, time.time(), source=event.source, place=event.via)
            log.warning(
                "a %s signed by %s claims %r, which is pinned to another key: kept as evidence",
                event.source, fingerprint(key)[:DISPLAY_PREFIX], handle,
            )  # fmt: skip
        return True

    async def _check_claim(self, event: SenderUnverified) -> bool:
        """One look at ``event``'s claim; False if the DHT gave no answer (try again)."""
        handle, key = event.handle, event.sender_key
        if self._pinned_elsewhere(event):
            return True
        try:
            with trio.fail_after(self.resolve_timeout):
                record = await self.dht.resolve(HandleRef(handle))
        except Contested:
            log.warning("a message claims to be from %r, whose handle is contested", handle)
            return True
        except (NotFound, trio.TooSlowError):
            log.info("a message claims to be from %r: no record found yet", handle)
            return False
        if record.public_key != key:
            log.warning("a message claims to be from %r but holds another key: unverified", handle)
            return True
        contact = self.contacts.pin(handle, key, time.time())
        if contact.public_key == key:
            self.remember(record)
        else:  # pinned meanwhile to another key
            self.contacts.observe(handle, key, time.time(), source=event.source, place=event.via)
        return True
