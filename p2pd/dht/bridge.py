"""The bridge between trio (which owns the process) and one asyncio loop in a thread.

bmuller's kademlia is asyncio-only. It runs in one event loop on a thread of its own;
trio code reaches it only through :meth:`AsyncioThread.run_coro` and
:meth:`AsyncioThread.call_soon`. Nothing on the asyncio side touches trio state.

We do not use trio-asyncio: its latest release fails to import on Python 3.14
(python-trio/trio-asyncio#160).

Waiting: instead of parking a worker thread on ``future.result()`` (what
``trio.to_thread.run_sync`` would do, one thread per concurrent call), the asyncio future's
done-callback wakes the trio task through its ``TrioToken``. When trio cancels the waiting
task, the asyncio future is cancelled too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncioThread:
    """One asyncio event loop running in a daemon thread until :meth:`close`."""

    def __init__(self, name: str = "p2pd-asyncio") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Cancel whatever is left so that nothing logs "Task was destroyed but pending".
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the loop; safe from any thread."""
        with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
            self.loop.call_soon_threadsafe(fn, *args)

    async def run_coro(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the asyncio loop and await its result from trio."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a plain function on the loop's thread (to read its state safely)."""

        async def call() -> T:
            return fn(*args)

        return await self.run_coro(call())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> AsyncioThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
