"""End-to-end encrypted sessions: X3DH against a published prekey bundle, then the Double
Ratchet for every message (Syndace's ``x3dh`` and ``doubleratchet``), persisted in SQLite.

Modules, one per concept:

- :mod:`.bundle`   the prekey bundle and its canonical encoding (the record extension)
- :mod:`.envelope` the envelope on the wire, session ids, what the AEAD authenticates
- :mod:`.crypto`   our parameters for both libraries, and the driver for their coroutines
- :mod:`.prekeys`  our own X3DH state: rotation, replenishment, persistence
- :mod:`.manager`  :class:`SessionManager`: sessions with peers, encrypt and decrypt
- :mod:`.safety`   safety numbers
- :mod:`.config`   :class:`SessionConfig`

Formats: docs/_session.md (to be merged into docs/PROTOCOL.md, "Sessions").
"""

from __future__ import annotations

from .bundle import MAX_BUNDLE_SIZE, MAX_ONE_TIME_PREKEYS, PrekeyBundle
from .config import SessionConfig
from .envelope import MAX_ENVELOPE, MAX_OVERHEAD, MAX_PLAINTEXT, Envelope
from .manager import Decrypted, SessionInfo, SessionManager
from .safety import safety_number

__all__ = [
    "MAX_BUNDLE_SIZE",
    "MAX_ENVELOPE",
    "MAX_ONE_TIME_PREKEYS",
    "MAX_OVERHEAD",
    "MAX_PLAINTEXT",
    "Decrypted",
    "Envelope",
    "PrekeyBundle",
    "SessionConfig",
    "SessionInfo",
    "SessionManager",
    "safety_number",
]
