"""p2pd: a peer-to-peer messenger daemon.

The library under ``p2pd`` never prints and never imports click; the command line lives in
``cli/`` (installed as ``p2pd_cli``) and talks to a running daemon through the control API.
"""

__version__ = "0.1.0"
