"""Pytest fixtures for tests in network namespaces (p2pd.testing.netns).

``testbed`` gives each test a fresh :class:`~p2pd.testing.netns.Testbed` and removes it
afterwards, whatever the test did. A test that uses it is skipped, with the reason, only
where this machine cannot make network namespaces (not root, no ``ip`` or ``nft``, EPERM
in a container); under CI=true that is a failure instead (tests/required_groups.py).
Mark such tests ``netns``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from required_groups import skip_or_fail

from p2pd.testing.netns import Testbed, cleanup_stale, netns_available


@pytest.fixture(scope="session")
def netns_ready() -> None:
    """Skip (or fail under CI=true) when namespaces cannot be made; else clear leftovers
    of crashed runs once."""
    reason = netns_available()
    # The testbed's NAT routers need nft too; without it those tests would stop halfway
    # with a TestbedError rather than say up front what this machine lacks.
    if reason is None and shutil.which("nft") is None:
        reason = "the nft command (nftables) is not installed (scripts/test installs it as root)"
    if reason is not None:
        skip_or_fail(reason)
    cleanup_stale()


@pytest.fixture
def testbed(netns_ready: None) -> Iterator[Testbed]:
    """A fresh, empty testbed; all its namespaces and processes are gone after the test."""
    with Testbed() as tb:
        yield tb
