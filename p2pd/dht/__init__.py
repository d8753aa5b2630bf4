"""The DHT: a sans-I/O Kademlia core (:mod:`p2pd.dht.core`) driven by trio
(:mod:`p2pd.dht.driver`).

Nothing outside this package imports kademlia. Callers use :func:`open_dht` and the
:class:`DHT` it yields: ``bootstrap``, ``publish``, ``resolve``, ``mailbox_*``,
``statistics``. docs/ARCHITECTURE.md, "The DHT", draws the parts.
"""

from __future__ import annotations

from ..wire import node_id_for
from .core import DHTCore
from .disjoint import DisjointLookup
from .driver import DHT, DatagramTransport, create_dht, open_dht
from .lookup import Lookup
from .nodekey import NodeKey, load_or_create_node_key
from .result import LookupResult

__all__ = [
    "DHT",
    "DHTCore",
    "DatagramTransport",
    "DisjointLookup",
    "Lookup",
    "LookupResult",
    "NodeKey",
    "create_dht",
    "load_or_create_node_key",
    "node_id_for",
    "open_dht",
]
