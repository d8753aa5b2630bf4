"""The ``p2pd`` commands, by area: node.py (init, daemon, status, whois, peers),
messages.py (send, inbox, contacts, verify, mailbox), calls.py (call, answer, hangup, calls),
devices.py (devices), files.py (send-file, files, accept, reject, cancel).

cli/main.py imports a module when one of its commands runs, so at module level each
imports only what all of its commands need (click, the control client, the renderers);
a command imports what only it needs (trio, the keystore, segno) in its body.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from p2pd.identity import HandleRef


def home_of(ctx: click.Context) -> Path:
    """The home the group resolved (``--home``, P2PD_HOME or the platform default)."""
    home: Path = ctx.obj["home"]
    return home


def parse_handle(text: str) -> HandleRef:
    """A handle as typed (``alice`` or ``alice#<fingerprint prefix>``), checked before we
    bother the daemon: a malformed one is a usage error even when no daemon runs."""
    from p2pd.identity import HandleRef  # hashlib and friends: not for `status`

    return HandleRef.parse(text)
