"""The home: the directory of one identity, its daemon's state and its control socket.

Apart from p2pd/config.py so that the CLI finds the home without importing the codecs
that the configuration's types come from.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def default_home() -> Path:
    """``$P2PD_HOME``, else the platform's user data dir (``~/.local/share/p2pd``)."""
    env = os.environ.get("P2PD_HOME")
    if env:
        return Path(env)
    return Path(platformdirs.user_data_dir("p2pd", appauthor=False))
