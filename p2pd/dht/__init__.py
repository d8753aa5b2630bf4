"""The DHT: a sans-I/O Kademlia core (:mod:`p2pd.dht.core`) driven by trio
(:mod:`p2pd.dht.driver`).

Nothing outside this package imports kademlia. Callers use :func:`open_dht` and the
:class:`DHT` it yields: ``bootstrap``, ``publish``, ``resolve``, ``mailbox_*``,
``statistics``. docs/ARCHITECTURE.md, "The DHT", draws the parts.
"""

from __future__ import annotations

from kademlia.utils import digest

from .core import DHTCore
from .driver import DHT, DatagramTransport, create_dht, open_dht
from .lookup import Lookup, LookupResult

__all__ = [
    "DHT",
    "DHTCore",
    "DatagramTransport",
    "Lookup",
    "LookupResult",
    "create_dht",
    "node_id_for",
    "open_dht",
]


def node_id_for(public_key: bytes) -> bytes:
    """A node's 160-bit id, derived from its identity key so that it is stable."""
    node_id: bytes = digest(b"p2pd node id v1\x00" + public_key)
    return node_id
