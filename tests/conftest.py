"""Shared pytest fixtures. The network-namespace ones live in netns_fixtures.py."""

from netns_fixtures import netns_ready, testbed  # noqa: F401
