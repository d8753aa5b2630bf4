"""Our prekeys' public side, read without the X3DH library (issue 9: an idle daemon).

The stored prekey document (p2pd/session/prekeys.py) also carries, under ``"public"``,
what the idle paths read: the encoded bundle we publish, and the public keys of every
signed prekey that still opens initial messages. With the document's own times
(``signed_prekey_created``, ``old_signed_prekey_retired``, each retired key's
``retired``) that is enough to publish the bundle and to tell that maintenance has
nothing to do, without parsing the secret state through x3dh's pydantic models: that
imports x3dh and pydantic (about 8 MB resident) into a daemon that may never start or
accept a session. The full state (:class:`~p2pd.session.prekeys.OwnPrekeys`) is parsed
when an agreement, a rotation or a top-up needs it, and every save writes the public
fields from it, so they cannot drift from the keys.

Nothing here is secret: public keys and times only.

What :meth:`PublicPrekeys.parse` checks (the session manager's start, and every read):
the format and suite, that the state is ours (identity public key), the times (finite
numbers), the retired-key list's shape, the bundle's canonical encoding and its
signature under our identity key, and the held signed prekeys (32 bytes each, sorted,
distinct, the published one among them, at most one more than the retired ones and the
old one). What is checked only when the full state is first parsed
(:meth:`OwnPrekeys.load`): that the secret state parses, and that it gives exactly
these public fields. A failure at either point is the same
:class:`~p2pd.errors.SessionStateCorrupt`.

A document written before these fields (no ``"public"``) is parsed fully at the start
and stored again with them (:meth:`SessionManager.open`).
"""

from __future__ import annotations

import itertools
import json
import math
from typing import TYPE_CHECKING, Any

from ..errors import SessionStateCorrupt
from .bundle import KEY_LEN, PrekeyBundle
from .config import SUITE, SessionConfig

if TYPE_CHECKING:
    from ..identity import Identity
    from .prekeys import OwnPrekeys

FORMAT = 1


def _time(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("a time is a finite number")
    return float(value)


class PublicPrekeys:
    """The stored prekey document, its public fields checked; the secret part unparsed."""

    __slots__ = (
        "_one_time_prekeys", "bundle", "document", "held", "old_retired", "retired",
        "signed_prekey_created",
    )  # fmt: skip

    def __init__(self, document: dict[str, Any], identity_key: bytes) -> None:
        if not isinstance(document, dict):
            raise ValueError("not a prekey document")
        if document["format"] != FORMAT or document["suite"] != SUITE:
            raise SessionStateCorrupt("prekey state has an unknown format")
        if bytes.fromhex(document["identity_public_key"]) != identity_key:
            raise SessionStateCorrupt("the stored prekeys belong to another identity")
        if not isinstance(document["x3dh"], dict):
            raise ValueError("the X3DH state is not an object")
        #: The whole document, for OwnPrekeys.load.
        self.document = document
        self.signed_prekey_created = _time(document["signed_prekey_created"])
        old = document["old_signed_prekey_retired"]
        self.old_retired = None if old is None else _time(old)
        retired = document["retired_signed_prekeys"]
        if not isinstance(retired, list):
            raise ValueError("the retired signed prekeys are not a list")
        #: When each retired signed prekey was retired.
        self.retired = [_time(r["retired"]) for r in retired]
        public = document.get("public")
        #: The encoded bundle we publish; None in a document written before it was stored.
        self.bundle: bytes | None = None
        #: Public keys of the signed prekeys that still open initial messages (None: as
        #: ``bundle``).
        self.held: frozenset[bytes] | None = None
        self._one_time_prekeys = 0
        if public is None:
            return
        bundle = bytes.fromhex(public["bundle"])
        decoded = PrekeyBundle.decode(bundle)  # canonical: one bundle, one encoding
        if not decoded.verify(identity_key):
            raise ValueError("the stored bundle is not signed by our key")
        held = [bytes.fromhex(k) for k in public["held_signed_prekeys"]]
        if any(len(k) != KEY_LEN for k in held) or any(a >= b for a, b in itertools.pairwise(held)):
            raise ValueError("held signed prekeys are 32 bytes each, sorted and distinct")
        if decoded.signed_prekey not in held or len(held) > 2 + len(self.retired):
            raise ValueError("the held signed prekeys do not fit the document")
        self.bundle = bundle
        self.held = frozenset(held)
        self._one_time_prekeys = len(decoded.one_time_prekeys)

    @classmethod
    def parse(cls, text: str, identity_key: bytes) -> PublicPrekeys:
        """Read a stored document; SessionStateCorrupt if it is not ours or not sound."""
        try:
            return cls(json.loads(text), identity_key)
        except SessionStateCorrupt:
            raise
        except Exception:  # the parse boundary of stored data; never echo it (secrets)
            raise SessionStateCorrupt("the stored prekey state does not load") from None

    def maintenance_due(self, now: float, config: SessionConfig) -> bool:
        """Whether :meth:`OwnPrekeys.maintain` would change anything: a rotation, a
        retired key past its grace, the old signed prekey past its grace, one-time
        prekeys to top up (the same tests, on the same stored values). Always true for a
        document without the public fields (the full parse and save add them)."""
        if self.bundle is None:
            return True
        grace = config.signed_prekey_grace
        return (
            now - self.signed_prekey_created >= config.signed_prekey_rotation
            or any(now - retired >= grace for retired in self.retired)
            or (self.old_retired is not None and now - self.old_retired >= grace)
            or config.one_time_prekeys > self._one_time_prekeys
        )

    def full(self, identity: Identity) -> OwnPrekeys:
        """The whole state, secrets and all: imports x3dh (and pydantic) the first time."""
        from .prekeys import OwnPrekeys  # here, not at module level: see the docstring

        return OwnPrekeys.load(self, identity)
