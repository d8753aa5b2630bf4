"""What a DHT node shows of itself: ``statistics`` (``DHT.statistics``, the control
API's ``status``: docs/CONTROL_API.md) and ``contacts``. Methods of
:class:`~p2pd.dht.core.DHTCore`, bound there as class attributes, that read the core
and change nothing; they see it as :class:`Introspected`, so this room imports nothing
of core.py (which would close a circle of imports)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .budget import RequestBudget
    from .mailbox import MailboxStorage
    from .proofs import Proofs
    from .routing import RoutingTable
    from .storage import RecordStorage


class Introspected(Protocol):
    """What of the core the figures come from."""

    node_id: bytes
    table: RoutingTable
    storage: RecordStorage
    mailboxes: MailboxStorage | None
    proofs: Proofs
    budget: RequestBudget
    stats: Counter[str]


def statistics(core: Introspected) -> dict[str, Any]:
    return {
        "node_id": core.node_id.hex(),
        "routing_table_size": len(core.table),
        "records_stored": len(core.storage),
        "mailbox_entries_held": core.mailboxes.count() if core.mailboxes else 0,
        "refused_records": dict(core.storage.refused),
        "rotated_claims": core.storage.rotated,
        "verified_contacts": len(core.proofs),
        "counters": counters(core),
    }


def counters(core: Introspected) -> dict[str, int]:
    """The core's own counters and those its table, budget and storages keep."""
    counters = dict(core.stats)
    if core.table.refused:
        counters["address_limited"] = core.table.refused
    counters.update(core.budget.dropped)
    counters.update({f"record_refused_{k}": v for k, v in core.storage.refused.items()})
    boxes = core.mailboxes.refused.items() if core.mailboxes is not None else ()
    counters.update({f"mailbox_refused_{k}": v for k, v in boxes})
    return counters


def contacts(core: Introspected) -> list[tuple[bytes, str, int]]:
    return [(n.id, n.ip, n.port) for n in core.table]
