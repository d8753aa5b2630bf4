"""The iterative Kademlia lookup, rewritten so that it never waits on a silent node.

Stock kademlia crawls in rounds: it sends alpha requests and waits for *all* of them,
so one dead contact holds every round for the full RPC timeout. Here each request has its
own soft deadline (the contact's adaptive RTO). When it passes, the lookup stops counting
that contact as in flight and asks the next candidate; a late reply is still used if it
arrives while the lookup is running. The lookup ends when the k closest contacts that are
not known dead or slow have all answered, or when nothing is left to ask.

For values it does not stop at the first one: it collects every value the k closest
nodes hold, so the caller can pick the *newest* valid record (stock kademlia returns the
most common value; upstream issue #107).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from kademlia.node import Node

from .. import wire
from .protocol import DHTProtocol

_NEW, _INFLIGHT, _SLOW, _OK, _FAILED = "new", "inflight", "slow", "ok", "failed"


@dataclass(slots=True)
class LookupResult:
    #: The k closest nodes that answered, nearest first.
    closest: list[Node]
    #: (node, value) for every answering node that held a value.
    values: list[tuple[Node, bytes]] = field(default_factory=list)
    #: Answering nodes that held no value (candidates for a repairing store).
    without_value: list[Node] = field(default_factory=list)
    rpcs: int = 0
    elapsed: float = 0.0


def _to_node(contact: wire.Contact) -> Node:
    return Node(contact.node_id, contact.address.host, contact.address.port)


async def iterative_find(
    protocol: DHTProtocol, target: bytes, *, find_value: bool, seeds: list[Node] | None = None
) -> LookupResult:
    config = protocol.config
    k, alpha = config.ksize, config.alpha
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    deadline = started + config.lookup_deadline
    target_node = Node(target)
    own = protocol.source_node.id
    nodes: dict[bytes, Node] = {}
    state: dict[bytes, str] = {}
    events: asyncio.Queue[tuple[str, bytes, Any]] = asyncio.Queue()
    result = LookupResult(closest=[])
    timers: list[asyncio.TimerHandle] = []
    method = "find_value" if find_value else "find_node"

    def add(node: Node) -> None:
        if node.id != own and node.id not in nodes and not protocol.is_suspect(node.id):
            nodes[node.id] = node
            state[node.id] = _NEW

    def distance(node: Node) -> int:
        return int(node.long_id ^ target_node.long_id)

    def launch(node: Node) -> None:
        state[node.id] = _INFLIGHT
        result.rpcs += 1
        future = protocol.request(node, method, target)

        def done(fut: asyncio.Future[Any]) -> None:
            reply = None if fut.cancelled() else fut.result()
            protocol.note_reply(node, reply)
            events.put_nowait(("reply", node.id, reply))

        future.add_done_callback(done)
        timers.append(
            loop.call_later(protocol.soft_timeout(node), events.put_nowait, ("slow", node.id, None))
        )

    for node in seeds if seeds is not None else protocol.closest(target, k):
        add(node)

    try:
        while True:
            live = sorted(
                (n for n in nodes.values() if state[n.id] not in (_SLOW, _FAILED)), key=distance
            )[:k]
            active = sum(1 for s in state.values() if s == _INFLIGHT)
            # Once a value has turned up we are near the key: ask the rest of the k
            # closest at once, to learn whether any holds a newer record.
            width = k if result.values else alpha
            for node in live:
                if active >= width or result.rpcs >= config.lookup_max_rpcs:
                    break
                if state[node.id] == _NEW:
                    launch(node)
                    active += 1
            if all(state[n.id] == _OK for n in live):
                break  # the k closest live contacts have all answered
            remaining = deadline - time.monotonic()
            if active == 0 or remaining <= 0:
                break  # nothing in flight and nothing we may still ask, or out of time
            try:
                kind, node_id, reply = await asyncio.wait_for(events.get(), remaining)
            except TimeoutError:
                break
            if kind == "slow":
                if state.get(node_id) == _INFLIGHT:
                    state[node_id] = _SLOW
                    # Other lookups need not wait on it too; a late reply clears this.
                    protocol.mark_suspect(node_id)
                    protocol.stats["soft_timeouts"] += 1
                continue
            if reply is None:
                state[node_id] = _FAILED
                continue
            if state.get(node_id) == _SLOW:
                # Its reply was queued behind our own "slow" event, which marked it
                # suspect after note_reply had cleared that: clear it again.
                protocol.clear_suspect(node_id)
            state[node_id] = _OK
            node = nodes[node_id]
            if isinstance(reply, wire.FindValueReply):
                if reply.value is not None:
                    result.values.append((node, reply.value))
                else:
                    result.without_value.append(node)
                contacts = reply.contacts
            elif isinstance(reply, tuple):
                contacts = reply
            else:  # a reply of the wrong shape counts as no reply
                state[node_id] = _FAILED
                continue
            for contact in contacts:
                add(_to_node(contact))
    finally:
        for timer in timers:
            timer.cancel()
    result.closest = sorted((n for n in nodes.values() if state[n.id] == _OK), key=distance)[:k]
    result.elapsed = time.monotonic() - started
    return result
