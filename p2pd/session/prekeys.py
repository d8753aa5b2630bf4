"""Our own X3DH state: signed prekeys (rotated), one-time prekeys (replenished).

Kept as the x3dh library's own JSON (its versioned pydantic model, ``BaseStateModel``
version "1.0.0" as written by x3dh 1.3.0), wrapped in a small document of ours::

    {"format": 1, "suite": ..., "x3dh_version": "1.3.0",
     "identity_public_key": hex,
     "x3dh": <BaseState.json without "identity_key">,
     "signed_prekey_created": t, "old_signed_prekey_retired": t | null,
     "retired_signed_prekeys": [{"signed_pre_key": <SignedPreKeyPairModel>, "retired": t}],
     "public": {"bundle": hex, "held_signed_prekeys": [hex, ...]}}

``"public"`` (public keys only: the encoded bundle we publish, and the sorted public keys
of the signed prekeys that still open initial messages) is what an idle daemon reads
instead of all the rest, without importing x3dh: p2pd/session/public_prekeys.py. Every
save writes it from the state; :meth:`OwnPrekeys.load` checks that it matches.

What the library leaves to us is done here:

- **The identity seed is never written.** x3dh's state embeds the identity key's secret
  (the Ed25519 seed), while p2pd keeps that seed only in ``identity.json``, sealed under
  the user's passphrase. Storing x3dh's JSON as is would leave the seed in clear in
  p2pd.db. So ``identity_key`` is cut out on save and put back from the unlocked
  :class:`~p2pd.identity.Identity` on load, and a state made for another identity is
  refused.
- **Time comes from the caller.** x3dh stamps signed prekeys with ``time.time()`` and its
  ``State`` rotates by the wall clock; we keep our own times, taken from ``now``.
- **More than one retired signed prekey.** x3dh keeps exactly one old signed prekey,
  dropped at the next rotation; an initial message may wait in a mailbox for a week, so a
  retired key must be kept for the grace period whatever the rotation period. Older
  retired keys live in our list and are lent to a throwaway copy of the state for the one
  agreement that needs them.

This module does no I/O: the session manager loads and stores the document. It imports
x3dh (and with it pydantic), so it is itself imported only where the full state is needed
(PublicPrekeys.full, and the session manager's creation of a first state).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import x3dh
import xeddsa
from x3dh.identity_key_pair import IdentityKeyPairSeed
from x3dh.migrations import parse_signed_pre_key_pair_model

from ..errors import BundleError, DecryptError, PrekeyUnavailable, SessionStateCorrupt
from ..identity import Identity
from .bundle import PrekeyBundle
from .config import SUITE, SessionConfig
from .crypto import IDENTITY_KEY_FORMAT, X3DH_HASH, X3DH_INFO, X3DHState
from .envelope import InitialHeader
from .public_prekeys import FORMAT, PublicPrekeys


@dataclass(slots=True)
class _Retired:
    key: x3dh.SignedPreKeyPairModel
    retired: float
    #: Worked out once, when the retired key is loaded or made.
    public_key: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.public_key = xeddsa.priv_to_curve25519_pub(self.key.priv)


class OwnPrekeys:
    """The node's X3DH state and the bookkeeping that rotates and refills it."""

    __slots__ = ("_identity_key", "_old_retired", "_retired", "_signed_prekey_created", "_state")

    def __init__(
        self,
        state: X3DHState,
        identity_key: bytes,
        signed_prekey_created: float,
        old_retired: float | None,
        retired: list[_Retired],
    ) -> None:
        self._state = state
        self._identity_key = identity_key
        self._signed_prekey_created = signed_prekey_created
        self._old_retired = old_retired
        self._retired = retired

    @classmethod
    def create(cls, identity: Identity, *, now: float, config: SessionConfig) -> OwnPrekeys:
        state = X3DHState.create(
            IDENTITY_KEY_FORMAT, X3DH_HASH, X3DH_INFO, IdentityKeyPairSeed(identity.seed)
        )
        state.generate_pre_keys(config.one_time_prekeys)
        return cls(state, identity.public_key, now, None, [])

    # ------------------------------------------------------------------ persistence

    def dump(self) -> str:
        serialized = dict(self._state.json)
        del serialized["identity_key"]  # the seed stays in the keystore (see above)
        document = {
            "format": FORMAT,
            "suite": SUITE,
            "x3dh_version": x3dh.__version__,
            "identity_public_key": self._identity_key.hex(),
            "x3dh": serialized,
            "signed_prekey_created": self._signed_prekey_created,
            "old_signed_prekey_retired": self._old_retired,
            "retired_signed_prekeys": [
                {"signed_pre_key": r.key.model_dump(mode="json"), "retired": r.retired}
                for r in self._retired
            ],
            "public": self._public(),
        }
        return json.dumps(document, separators=(",", ":"))

    def _public(self) -> dict[str, Any]:
        """The document's ``"public"``: what PublicPrekeys reads without x3dh."""
        return {
            "bundle": self.bundle.encode().hex(),
            "held_signed_prekeys": sorted(k.hex() for k in self.held_signed_prekeys()),
        }

    @classmethod
    def load(cls, public: PublicPrekeys, identity: Identity) -> OwnPrekeys:
        """The full state of a stored document that PublicPrekeys.parse has checked
        (format, suite, our identity key, the times, the public fields): here the secret
        state is parsed, and must give exactly the public fields stored beside it."""
        document = public.document
        try:
            serialized = dict(document["x3dh"])
            # Not the library's IdentityKeyPair.json: in x3dh 1.3.0 it calls pydantic's
            # deprecated .json() and warns. model_dump(mode="json") is the same data.
            seed = IdentityKeyPairSeed(identity.seed)
            serialized["identity_key"] = seed.model.model_dump(mode="json")
            state, _ = X3DHState.from_json(serialized, IDENTITY_KEY_FORMAT, X3DH_HASH, X3DH_INFO)
            retired = [
                _Retired(parse_signed_pre_key_pair_model(r["signed_pre_key"]), when)
                for r, when in zip(document["retired_signed_prekeys"], public.retired, strict=True)
            ]
            prekeys = cls(
                state,
                identity.public_key,
                public.signed_prekey_created,
                public.old_retired,
                retired,
            )
            # What an idle daemon published and kept (PublicPrekeys) must be what these
            # keys give: a document whose public fields disagree with its keys is corrupt.
            if public.bundle is not None and prekeys._public() != document["public"]:
                raise SessionStateCorrupt("the stored prekey state does not match its keys")
        except SessionStateCorrupt:
            raise
        except Exception:  # the parse boundary of stored data; never echo it (secrets)
            raise SessionStateCorrupt("the stored prekey state does not load") from None
        return prekeys

    # ------------------------------------------------------------------ publishing

    @property
    def bundle(self) -> PrekeyBundle:
        return PrekeyBundle.from_x3dh(self._state.bundle)

    def held_signed_prekeys(self) -> set[bytes]:
        """Public keys of every signed prekey that still opens initial messages."""
        held = {self._state.bundle.signed_pre_key}
        old = self._state.old_signed_pre_key
        if old is not None:
            held.add(old)
        held.update(r.public_key for r in self._retired)
        return held

    def maintain(self, now: float, config: SessionConfig) -> bool:
        """Rotate the signed prekey when due, forget retired ones past their grace,
        top up one-time prekeys. True if the published bundle changed."""
        changed = False
        if now - self._signed_prekey_created >= config.signed_prekey_rotation:
            old = self._state.model.old_signed_pre_key
            if old is not None:
                since = self._old_retired
                self._retired.append(
                    _Retired(old, self._signed_prekey_created if since is None else since)
                )
            self._state.rotate_signed_pre_key()  # BaseState: no clock involved
            self._old_retired = now
            self._signed_prekey_created = now
            changed = True
        grace = config.signed_prekey_grace
        self._retired = [r for r in self._retired if now - r.retired < grace]
        if self._old_retired is not None and now - self._old_retired >= grace:
            self._replace_old_signed_prekey(None)
            self._old_retired = None
        missing = config.one_time_prekeys - self._state.get_num_visible_pre_keys()
        if missing > 0:
            self._state.generate_pre_keys(missing)
            changed = True
        return changed

    def _replace_old_signed_prekey(self, key: x3dh.SignedPreKeyPairModel | None) -> None:
        model = self._state.model.model_copy(update={"old_signed_pre_key": key})
        self._state = X3DHState.from_model(model, IDENTITY_KEY_FORMAT, X3DH_HASH, X3DH_INFO)

    # ------------------------------------------------------------------ agreements

    async def agree_active(
        self, peer_key: bytes, bundle: PrekeyBundle
    ) -> tuple[bytes, bytes, x3dh.Header]:
        """X3DH as the initiator: (shared secret, IK_self || IK_peer, header)."""
        try:
            # require_pre_key=False: a bundle whose one-time prekeys ran out still works,
            # as X3DH section 3.3 allows (without the one-time prekey's extra protection
            # against replay, which sessions.py provides by remembering session ids).
            return await self._state.get_shared_secret_active(
                bundle.to_x3dh(peer_key), require_pre_key=False
            )
        except (x3dh.KeyAgreementException, xeddsa.XEdDSAException, ValueError):
            raise BundleError("the prekey bundle is not valid for this peer's key") from None

    async def agree_passive(self, header: InitialHeader) -> tuple[bytes, bytes, bytes]:
        """X3DH as the responder: (shared secret, IK_peer || IK_self, signed prekey's
        private key, which is the responder's first ratchet key). Changes nothing: the
        caller consumes the one-time prekey once the first message has decrypted."""
        otpk = header.one_time_prekey
        state = self._state
        # x3dh's ``bundle`` derives every public key from its private key each time it is
        # read (1.7 ms of CPU with 40 one-time prekeys): once here, for a message that
        # anyone can send us (get_shared_secret_passive reads it once more).
        bundle = state.bundle
        if otpk is not None and otpk not in bundle.pre_keys:
            # Used before (and deleted, X3DH section 3.4), or never ours.
            raise PrekeyUnavailable("the message uses a one-time prekey that is used up")
        current = {bundle.signed_pre_key, state.old_signed_pre_key}
        if header.signed_prekey not in current:
            match = next((r for r in self._retired if r.public_key == header.signed_prekey), None)
            if match is None:
                raise PrekeyUnavailable("the message uses a signed prekey that has expired")
            model = state.model.model_copy(update={"old_signed_pre_key": match.key})
            state = X3DHState.from_model(model, IDENTITY_KEY_FORMAT, X3DH_HASH, X3DH_INFO)
        x3dh_header = x3dh.Header(
            identity_key=header.identity_key,
            ephemeral_key=header.ephemeral_key,
            signed_pre_key=header.signed_prekey,
            pre_key=otpk,
        )
        try:
            shared, associated_data, signed_prekey = await state.get_shared_secret_passive(
                x3dh_header, require_pre_key=False
            )
        except x3dh.KeyAgreementException:
            raise PrekeyUnavailable("the message uses a prekey that is not available") from None
        except (xeddsa.XEdDSAException, ValueError):
            # An identity or ephemeral key that is not a usable curve point.
            raise DecryptError("the session's first message does not authenticate") from None
        return shared, associated_data, signed_prekey.priv

    def consume(self, one_time_prekey: bytes, config: SessionConfig) -> None:
        """Delete a used one-time prekey (X3DH section 3.4) and replace it."""
        self._state.delete_pre_key(one_time_prekey)
        missing = config.one_time_prekeys - self._state.get_num_visible_pre_keys()
        if missing > 0:
            self._state.generate_pre_keys(missing)
