"""The trio <-> asyncio bridge, and configuration loading."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import trio

from p2pd.config import DHTConfig, load_config
from p2pd.dht.bridge import AsyncioThread
from p2pd.errors import InvalidAddress, UsageError
from p2pd.wire import Address


async def test_run_coro_returns_results_and_raises_errors() -> None:
    with AsyncioThread() as bridge, trio.fail_after(10):

        async def double(x: int) -> int:
            await asyncio.sleep(0)
            return 2 * x

        assert await bridge.run_coro(double(21)) == 42
        assert await bridge.run_sync(lambda: asyncio.get_running_loop() is bridge.loop)

        async def boom() -> None:
            raise ValueError("from asyncio")

        with pytest.raises(ValueError, match="from asyncio"):
            await bridge.run_coro(boom())


async def test_trio_cancellation_cancels_the_asyncio_side() -> None:
    with AsyncioThread() as bridge, trio.fail_after(10):
        cancelled = asyncio.Event()
        started = trio.Event()
        token = trio.lowlevel.current_trio_token()

        async def forever() -> None:
            token.run_sync_soon(started.set)
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with trio.move_on_after(5) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bridge.run_coro, forever())
                await started.wait()
                nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught
        # the asyncio task saw the cancellation (checked on its own loop)
        for _ in range(100):
            if await bridge.run_sync(cancelled.is_set):
                break
            await trio.sleep(0.01)
        assert await bridge.run_sync(cancelled.is_set)


def test_config_file_overrides_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path).dht == DHTConfig()
    (tmp_path / "config.toml").write_text(
        '[node]\nlisten = "127.0.0.1:5000"\nbootstrap = ["127.0.0.2:4747"]\n'
        "republish_interval = 600\n[dht]\nalpha = 5\nrpc_timeout = 3\n"
    )
    config = load_config(tmp_path)
    assert config.listen == Address("127.0.0.1", 5000)
    assert config.bootstrap == (Address("127.0.0.2", 4747),)
    assert config.republish_interval == 600.0
    assert config.dht.alpha == 5 and config.dht.rpc_timeout == 3.0


@pytest.mark.parametrize(
    "text",
    [
        "[node]\nlisten = 5\n",
        "[node]\nnonsense = 1\n",
        "[dht]\nalpha = 'three'\n",
        "[other]\n",
        "not toml at all [",
    ],
)
def test_bad_config_is_a_clear_usage_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises((UsageError, InvalidAddress)):
        load_config(tmp_path)


def test_lan_section_of_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        '[lan]\nmode = "contacts"\ninterfaces = ["198.51.100.11"]\nttl = 150\n'
    )
    config = load_config(tmp_path)
    assert config.lan.mode == "contacts"
    assert config.lan.interfaces == ("198.51.100.11",)
    assert config.lan.ttl == 150
    for bad in ('mode = "loud"', 'interfaces = "198.51.100.11"', "ttl = 5", "volume = 3"):
        (tmp_path / "config.toml").write_text(f"[lan]\n{bad}\n")
        with pytest.raises(UsageError):
            load_config(tmp_path)
