"""Relays for NATed daemons (issue 13, item 3): frames, the relay's and the client's
sans-I/O cores, and their trio glue. docs/PROTOCOL.md, "Relays"."""

from .client import RelayClient, is_virtual, virtual_address
from .frames import RelayFrameError
from .server import RelayServer
from .service import Relays

__all__ = [
    "RelayClient",
    "RelayFrameError",
    "RelayServer",
    "Relays",
    "is_virtual",
    "virtual_address",
]
