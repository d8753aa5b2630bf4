"""Stamps around named functions of a ``p2pd daemon``, for scripts/trace/summary.py.

Not imported by p2pd. Put this directory first on ``PYTHONPATH`` and set
``P2PD_TRACE_DIR``: every ``p2pd ... daemon`` process started then (bench_messages.py
starts two) records ``time.monotonic_ns()`` (one clock for all processes) at the start
and end of each function in ``TRACED``, at every event it emits, every UDP send and
receive of the QUIC endpoint, and every wait in trio's epoll, in memory; at exit it
writes them to ``P2PD_TRACE_DIR/<pid>.json``. A wrapper costs about a microsecond::

    mkdir /tmp/tr && P2PD_TRACE_DIR=/tmp/tr PYTHONPATH=scripts/trace \\
        .venv/bin/python scripts/bench_messages.py --samples 100 --messages 0 \\
        --first-contact 0 --batch 1 --tox off
    .venv/bin/python scripts/trace/summary.py /tmp/tr        # medians of each hop
    .venv/bin/python scripts/trace/summary.py /tmp/tr --show 60   # one message's trace
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import os
import sys
import time
from typing import Any

#: (module, class, method) stamped at start ("b") and end ("e").
TRACED = [
    ("p2pd.delivery.service", "Delivery", "send_many"),
    ("p2pd.delivery.service", "Delivery", "_worker"),
    ("p2pd.delivery.service", "Delivery", "_deliver"),
    ("p2pd.delivery.service", "Delivery", "handle_stream"),
    ("p2pd.delivery.service", "Delivery", "_dispatch"),
    ("p2pd.delivery.core", "DeliveryCore", "prepare"),
    ("p2pd.delivery.core", "DeliveryCore", "exchange_written"),
    ("p2pd.delivery.core", "DeliveryCore", "worker_step"),
    ("p2pd.delivery.core", "DeliveryCore", "end_exchange"),
    ("p2pd.delivery.core", "_FrameStream", "data_received"),
    ("p2pd.delivery.ledger", "SqliteLedger", "commit"),
    ("p2pd.delivery.ledger", "SqliteLedger", "apply"),
    ("p2pd.messaging", "MessageStore", "due_for"),
    ("p2pd.messaging", "MessageStore", "enqueue_many"),
    ("p2pd.messaging", "MessageStore", "record_incoming"),
    ("p2pd.session.manager", "SessionManager", "encrypt_many"),
    ("p2pd.session.manager", "SessionManager", "decrypt"),
    ("p2pd.delivery.paths", "Paths", "connect"),
    ("p2pd.transport.quic.peer", "QuicPeer", "open_stream"),
    ("p2pd.transport.quic.stream", "QuicStream", "send_all"),
    ("p2pd.transport.quic.peer", "QuicPeer", "_transmit"),
    ("p2pd.transport.quic.peer", "QuicPeer", "step_received"),
    ("p2pd.transport.quic.peer", "QuicPeer", "_step"),
]


def _install(records: list[tuple[int, str, str]]) -> None:
    import importlib

    now = time.monotonic_ns
    add = records.append

    def wrap(owner: Any, name: str) -> None:
        original = getattr(owner, name)
        label = f"{owner.__name__}.{name}"
        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                add((now(), label, "b"))
                try:
                    return await original(*args, **kwargs)
                finally:
                    add((now(), label, "e"))

        else:

            @functools.wraps(original)
            def wrapper(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
                add((now(), label, "b"))
                try:
                    return original(*args, **kwargs)
                finally:
                    add((now(), label, "e"))

        setattr(owner, name, wrapper)

    for module, cls, method in TRACED:
        wrap(getattr(importlib.import_module(module), cls), method)

    from trio._core import _io_epoll

    from p2pd.delivery.service import EventBus
    from p2pd.transport.quic.endpoint import QuicEndpoint
    from p2pd.transport.udp import UdpEndpoint

    emit, send_many = EventBus.emit, UdpEndpoint.send_many
    received, get_events = QuicEndpoint.datagram_received, _io_epoll.EpollIOManager.get_events

    def traced_emit(self: Any, kind: str, /, **fields: Any) -> None:
        add((now(), f"EMIT {kind} {fields.get('state')}", "p"))
        emit(self, kind, **fields)

    def traced_send_many(self: Any, datagrams: list[bytes], addr: Any) -> None:
        add((now(), f"UDP out {[len(d) for d in datagrams]}", "p"))
        send_many(self, datagrams, addr)

    def traced_received(self: Any, data: bytes, addr: Any) -> None:
        add((now(), f"UDP in {len(data)}", "p"))
        received(self, data, addr)

    def traced_get_events(self: Any, timeout: float) -> Any:
        add((now(), f"epoll wait {timeout:.4f}", "b"))
        try:
            return get_events(self, timeout)
        finally:
            add((now(), "epoll wait", "e"))

    EventBus.emit = traced_emit  # type: ignore[method-assign]
    UdpEndpoint.send_many = traced_send_many  # type: ignore[method-assign]
    QuicEndpoint.datagram_received = traced_received  # type: ignore[method-assign]
    _io_epoll.EpollIOManager.get_events = traced_get_events  # type: ignore[method-assign]


def _main() -> None:
    out = os.environ.get("P2PD_TRACE_DIR")
    if not out or "daemon" not in sys.argv:
        return
    records: list[tuple[int, str, str]] = []
    _install(records)

    def dump() -> None:
        with open(os.path.join(out, f"{os.getpid()}.json"), "w") as f:
            json.dump({"argv": sys.argv, "records": records}, f)

    atexit.register(dump)


_main()
