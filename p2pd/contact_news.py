"""Telling each pinned contact something once per version, over delivery's signal path
(encrypted in the session, acked): our direct addresses when the record hides them
(p2pd/address_hints.py, HintAnnouncer), this week's pass into our mailbox
(p2pd/dht/mailbox_pass_share.py, PassAnnouncer).

``peer_seen(key)`` is called when delivery holds a direct connection to ``key`` (or a
message from it arrives on one). If ``key`` is pinned (``handle_of``) and the version
``current(key)`` says is due differs from the one it was last given, ``key`` is queued
(at most ``max_queued``; beyond, a later connection sends it) and :meth:`run` sends
``text(version)``. A send that fails forgets the version, so the next connection
tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable, MutableMapping

import trio

log = logging.getLogger(__name__)


class ContactNews:
    def __init__(
        self,
        *,
        what: str,
        current: Callable[[bytes], Hashable | None],
        text: Callable[[Hashable], str],
        handle_of: Callable[[bytes], str | None],
        send: Callable[[str, bytes, str], Awaitable[object]],
        stats: MutableMapping[str, int],
        sent_stat: str,
        timeout: float,
        max_queued: int,
    ) -> None:
        self._what = what
        self._current = current
        self._text = text
        self._handle_of = handle_of
        self._send = send
        self._stats = stats
        self._sent_stat = sent_stat
        self._timeout = timeout
        #: The version each contact was last given (or is being given).
        self._sent: dict[bytes, Hashable] = {}
        self._queue_in, self._queue_out = trio.open_memory_channel[bytes](max_queued)

    def peer_seen(self, public_key: bytes) -> None:
        # Called for every message that arrives directly: the cheap answer first (this
        # version was given already), the contact's row only when it was not.
        version = self._current(public_key)
        if version is None or self._sent.get(public_key) == version:
            return
        if self._handle_of(public_key) is None:
            return
        try:
            self._queue_in.send_nowait(public_key)
        except trio.WouldBlock:
            return  # sent on a later connection
        self._sent[public_key] = version  # before sending: its own connection comes here

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for key in self._queue_out:
            handle, version = self._handle_of(key), self._sent.get(key)
            if handle is None or version is None:
                continue
            try:
                with trio.fail_after(self._timeout):
                    await self._send(handle, key, self._text(version))
                self._stats[self._sent_stat] = self._stats.get(self._sent_stat, 0) + 1
            except Exception as exc:  # not reachable after all: the next connection retries
                log.info("could not give %s %s: %s", handle, self._what, exc)
                self._sent.pop(key, None)
