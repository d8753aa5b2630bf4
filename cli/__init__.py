"""The p2pd command line (installed as ``p2pd_cli``; console script ``p2pd``).

Every command but ``init`` and ``daemon`` is a thin client of the daemon's control API.
"""
