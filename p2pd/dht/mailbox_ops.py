"""The mailbox operations of a DHT node (docs/PROTOCOL.md, "Mailboxes"): where a
mailbox lives (the k closest to its key, :func:`~p2pd.dht.mailbox.mailbox_key`), and
put, fetch and delete there. Methods of :class:`~p2pd.dht.core.DHTCore` (bound there as
class attributes), kept apart so that core.py stays under the project's size limit;
sans-I/O like the core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import wire
from .mailbox import delete_message, mailbox_key
from .mailbox_find import RelayedMailboxFind, find_relays
from .mailbox_relay import RelayedMailboxPut, pick_relays
from .mailbox_revoke import PassPin
from .operations import MAILBOX_MAX_PAGES, MailboxFetch, MailboxPut
from .routing import Node

if TYPE_CHECKING:
    from .core import DHTCore


def mailbox_nodes(
    core: DHTCore, owner: bytes, now: float, then: Callable[[bytes, list[Node], bool], None]
) -> None:
    key = mailbox_key(owner)
    core.start_lookup(
        key,
        now,
        lambda result: then(key, result.closest, core.among_closest(key, result.closest)),
    )


def start_mailbox_put(
    core: DHTCore, owner: bytes, entry: bytes, now: float, on_done: Callable[[int], None]
) -> None:
    """Leave ``entry`` in ``owner``'s mailbox on the k closest nodes; reports copies."""

    def found(
        key: bytes, nodes: list[Node], local: bool, vouched: frozenset[bytes] | None = None
    ) -> None:
        # ``vouched``: after a relayed lookup, the nodes two sources named (only their
        # "stored" confirms the put: mailbox_find.targets); None, our own lookup's.
        held = local and core.mailboxes is not None and core.mailboxes.put(key, entry)
        copies = core.config.mailbox_copies  # confirmed by distinct networks
        # Through relays when we know nodes that are not replicas (mailbox_relay.py):
        # then no storing node sees our address.
        # Nor any of the nodes we know closest to the key: a replica the lookup missed
        # would see our address next to the mailbox key.
        near = core.table.closest(key, core.config.ksize)
        relays = pick_relays(core, [*nodes, *near], core.config.mailbox_relays)
        if relays and all(n.key is not None for n in nodes):
            put = RelayedMailboxPut(core, key, entry, nodes, held, copies, relays, on_done, vouched)
            put.start(core.now)
        else:
            MailboxPut(core, key, entry, nodes, held, copies, on_done, vouched).start(core.now)

    # The lookup too, when we know relays that are not near the key (mailbox_find.py):
    # else a replica would see our find_node for the mailbox key just before the puts.
    key = mailbox_key(owner)
    relays = find_relays(core, key)
    if relays:
        RelayedMailboxFind(core, key, relays, found).start(now)
    else:
        mailbox_nodes(core, owner, now, found)


def start_mailbox_fetch(
    core: DHTCore,
    owner: bytes,
    sign: Callable[[bytes], bytes],
    wall: Callable[[], float],
    now: float,
    on_done: Callable[[list[tuple[bytes, bytes]]], None],
) -> None:
    """Every entry in ``owner``'s mailbox, from every node that holds a copy."""

    def found(key: bytes, nodes: list[Node], local: bool) -> None:
        fetch = MailboxFetch(core, owner, sign, wall, nodes, on_done)
        if local and core.mailboxes is not None:
            after = b""
            for _ in range(MAILBOX_MAX_PAGES):
                ts, sig = fetch.signed(after)
                page = core.mailboxes.fetch(owner, ts, after, sig)
                if not page or not page[0]:
                    break
                fetch.found.update(page[0])
                after = page[0][-1][0]
                if not page[1]:
                    break
        fetch.start(core.now)

    mailbox_nodes(core, owner, now, found)


def start_mailbox_delete(
    core: DHTCore,
    owner: bytes,
    ids: list[bytes],
    sign: Callable[[bytes], bytes],
    wall: Callable[[], float],
    now: float,
    on_done: Callable[[int], None],
) -> None:
    """Delete entries (that the owner has safely processed) from every copy."""

    def found(key: bytes, nodes: list[Node], local: bool) -> None:
        deleted = 0
        calls: list[tuple[Node, str, list[Any]]] = []
        for start in range(0, len(ids), wire.MAILBOX_DELETE_MAX):
            chunk = tuple(ids[start : start + wire.MAILBOX_DELETE_MAX])
            ts = int(wall())
            sig = sign(delete_message(owner, ts, chunk))
            if local and core.mailboxes is not None:
                deleted += core.mailboxes.delete(owner, ts, chunk, sig) or 0
            calls += [(n, "mailbox_delete", [owner, ts, list(chunk), sig]) for n in nodes]

        def done(replies: list[wire.DHTResult | None]) -> None:
            counts = (r for r in replies if isinstance(r, int) and not isinstance(r, bool))
            on_done(deleted + sum(counts))

        core.gather(calls, core.now, done)

    mailbox_nodes(core, owner, now, found)


def start_mailbox_revoke(
    core: DHTCore, pin: PassPin, now: float, on_done: Callable[[int], None]
) -> None:
    """Send the owner's pin (:mod:`.mailbox_revoke`) to every node found for its
    mailbox (and hold it here if we are one); reports how many took it."""

    def found(key: bytes, nodes: list[Node], local: bool) -> None:
        held = int(local and core.mailboxes is not None and core.mailboxes.revoke(pin))
        calls: list[tuple[Node, str, list[Any]]] = [
            (n, "mailbox_revoke", pin.args()) for n in nodes
        ]
        core.gather(calls, core.now, lambda r: on_done(held + sum(x is True for x in r)))

    mailbox_nodes(core, pin.owner, now, found)


def on_mailbox_request(core: DHTCore, req: wire.DHTRequest, source: str) -> Any:
    """The result of a ``mailbox_put``, ``mailbox_fetch`` or ``mailbox_delete`` that came
    from ``source`` (an IP address)."""
    boxes = core.mailboxes
    if req.method == "mailbox_put":
        assert req.key is not None and req.value is not None
        if core.defended and not core.is_close_to(req.key):
            core.stats["store_refused_far"] += 1
            return False
        return boxes is not None and boxes.put(req.key, req.value, source=source)
    assert req.owner_key is not None and req.timestamp is not None
    assert req.signature is not None
    if req.method == "mailbox_revoke":
        assert req.expires is not None and req.pass_key is not None
        if core.defended and not core.is_close_to(mailbox_key(req.owner_key)):
            core.stats["store_refused_far"] += 1
            return False
        pin = PassPin(req.owner_key, req.timestamp, req.expires, req.pass_key, req.signature)
        return boxes is not None and boxes.revoke(pin)
    if req.method == "mailbox_fetch":
        assert req.after is not None
        page = (
            None
            if boxes is None
            else boxes.fetch(req.owner_key, req.timestamp, req.after, req.signature)
        )
        entries, more = page if page is not None else ([], False)
        return {"entries": [list(e) for e in entries], "more": more}
    assert req.ids is not None
    if boxes is None:
        return 0
    return boxes.delete(req.owner_key, req.timestamp, req.ids, req.signature) or 0
