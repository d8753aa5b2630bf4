"""Delivery: moving encrypted messages between daemons.

- :mod:`p2pd.delivery.core`: the decisions, sans I/O (``now`` in; frames, rows to write
  and past-tense events out; one timer: retries, answer deadlines).
- :mod:`p2pd.delivery.events`: those rows and events, as dataclasses.
- :mod:`p2pd.delivery.ledger`: the core's view of SQLite (messages, contacts, sessions).
- :mod:`p2pd.delivery.service`: the trio service (QUIC streams, the workers, the
  control API's views), which builds the two below.
- :mod:`p2pd.delivery.mailbox`: the DHT mailbox both ways (puts for a worker that cannot
  connect, the poll of ours).
- :mod:`p2pd.delivery.paths`: connecting to a peer (open connection, addresses, relays).
- :mod:`p2pd.delivery.verify`: pinning the handle an unknown sender claims, if the DHT
  agrees.
"""

from .core import DeliveryCore
from .service import Delivery, EventBus

__all__ = ["Delivery", "DeliveryCore", "EventBus"]
