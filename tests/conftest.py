"""Shared pytest fixtures. The network-namespace ones live in netns_fixtures.py."""

from netns_fixtures import netns_ready, testbed  # noqa: F401

# pytester: tests/test_required_groups.py runs pytest on a small suite to check the exit code.
pytest_plugins = ["pytester"]
