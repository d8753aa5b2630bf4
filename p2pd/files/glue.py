"""How the files service reaches the rest of the node, built once in ``open_node``:
the outbox for the offer, the pinned contacts, and a QUIC connection to a peer found
where delivery would find it (LAN discovery, then the peer's DHT record)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ConnectionLost, Contested, LocalError, NotFound, PeerKeyMismatch
from ..identity import HandleRef, fingerprint
from ..transport.quic import QuicEndpoint, QuicPeer
from ..wire import KIND_FILE, Address

if TYPE_CHECKING:
    from ..delivery import Delivery
    from ..dht import DHT

log = logging.getLogger(__name__)

#: How long finding a peer's record may take.
RESOLVE_TIMEOUT = 10.0


def files_hooks(
    delivery: Delivery,
    dht: DHT,
    quic: QuicEndpoint,
    lan_addresses: Callable[[bytes], list[Address]],
) -> dict[str, Any]:
    """The keyword arguments of :class:`~p2pd.files.service.FilesService` that are
    the node's other services."""

    async def connect_to(peer_key: bytes, handle: str) -> QuicPeer | None:
        for peer in quic.peers():
            if peer.public_key == peer_key and not peer.is_closing:
                return peer
        addresses = list(lan_addresses(peer_key))
        try:
            with trio.fail_after(RESOLVE_TIMEOUT):
                record = await dht.resolve(HandleRef(handle, fingerprint(peer_key)))
        except (NotFound, Contested, trio.TooSlowError):
            record = None
        if record is not None and record.public_key == peer_key:
            if record.relays:  # delivery's way: addresses raced against the relays
                return await delivery.connect_peer(peer_key, record)
            addresses += [a for a in record.addresses if a not in addresses]
        return await connect_peer(quic, peer_key, addresses)

    def enqueue_offer(handle: str, peer_key: bytes, text: str) -> None:
        # Through the outbox like a message: durable, retried, left in the mailbox of a
        # recipient that is offline.
        delivery.queue_payload(handle, peer_key, text, KIND_FILE)

    async def contact_key(ref: HandleRef) -> tuple[str, bytes]:
        contact = await delivery.contact_for(ref)
        return contact.handle, contact.public_key

    def pinned_handle(peer_key: bytes) -> str | None:
        contact = delivery.contacts.by_key(peer_key)
        return contact.handle if contact is not None else None

    return {
        "connect_to": connect_to,
        "enqueue_offer": enqueue_offer,
        "contact_key": contact_key,
        "pinned_handle": pinned_handle,
    }


async def connect_peer(
    quic: QuicEndpoint,
    peer_key: bytes,
    addresses: list[Address],
    timeout: float = 5.0,
) -> QuicPeer | None:
    """An open connection to ``peer_key``, or a new one to the first address that answers
    with that key; None if none does."""
    for peer in quic.peers():
        if peer.public_key == peer_key and not peer.is_closing:
            return peer
    for address in addresses:
        try:
            with trio.fail_after(timeout):
                return await quic.connect(address, peer_key)
        except PeerKeyMismatch:
            log.warning("%s answered with another key", address)
        except (ConnectionLost, trio.TooSlowError):
            continue
        except LocalError:
            return None
    return None
