"""Pytest fixtures for tests in network namespaces (p2pd.testing.netns).

``testbed`` gives each test a fresh :class:`~p2pd.testing.netns.Testbed` and removes it
afterwards, whatever the test did. A test that uses it is skipped, with the reason, only
where this machine cannot make network namespaces (not root, no ``ip``, EPERM in a
container); everywhere else, CI included, it runs. Mark such tests ``netns``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from p2pd.testing.netns import Testbed, cleanup_stale, netns_available


@pytest.fixture(scope="session")
def netns_ready() -> None:
    """Skip when namespaces cannot be made; else clear leftovers of crashed runs once."""
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    cleanup_stale()


@pytest.fixture
def testbed(netns_ready: None) -> Iterator[Testbed]:
    """A fresh, empty testbed; all its namespaces and processes are gone after the test."""
    with Testbed() as tb:
        yield tb
