"""Test groups that need something from the machine, and what CI makes of their absence.

Some tests need more than Python: the namespace tests need root, ``ip`` and ``nft``
(tests/netns_fixtures.py); the Avahi interop needs Avahi and D-Bus
(tests/test_lan_avahi.py); the only proof of Opus in-band FEC needs a loadable libopus
(tests/test_media_units.py); calls through sound devices need PulseAudio, PortAudio and
sounddevice (tests/test_audio_devices.py, scripts/_system_deps.sh audio). Where one is
missing, such a test calls :func:`skip_or_fail` with the reason instead of
``pytest.skip``.

On a developer's machine that is a skip, listed with its reason at the end of the run
(``-ra``). Under ``CI=true`` (.ci/run sets it; so do most CI services) it is a failure:
CI installs everything these groups need (scripts/_system_deps.sh), so a group that
cannot run there is a broken set-up, and a green run must not hide that whole groups,
all our real mDNS and NAT coverage among them, never ran.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True under ``CI=true`` (or ``CI=1``), as CI services and .ci/run set it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def skip_or_fail(reason: str) -> NoReturn:
    """This test needs what the machine lacks: skip, saying why; under CI=true, fail."""
    if in_ci():
        pytest.fail(f"required under CI=true, but {reason}", pytrace=False)
    pytest.skip(reason)
