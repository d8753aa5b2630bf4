"""Sessions with peers: X3DH to start one, the Double Ratchet for every message.

Sans-I/O and synchronous: the only state is SQLite (the connection you pass) and the only
clock is the ``now`` you pass. The messaging layer calls::

    sessions = SessionManager.open(conn, identity, now=now)
    extension = sessions.prekey_bundle()       # into our HandleRecord; again whenever
                                               # sessions.bundle_changed
    envelope = sessions.encrypt(peer_key, plaintext, now=now,
                                peer_bundle=record.extension)  # needed for the first only
    peer_key, plaintext = sessions.decrypt(envelope, now=now,
                                           sender_key=quic_peer_key)  # None from a mailbox
    sessions.maintain(now)                     # periodically: rotation, clean-up

Every call that changes state writes it in one SQLite transaction before it returns, or
changes nothing and raises (``commit=False`` leaves the transaction open so that the
caller can commit the session together with its own rows, e.g. the message).

A peer's sessions
-----------------
Sessions are keyed by their 16-byte session id (p2pd.session.envelope.session_id) and
belong to a peer, the peer's Ed25519 identity key. Per peer:

- at most one **active** session: the one ``encrypt`` uses;
- **archived** sessions: replaced by a newer one, they still decrypt what was already in
  flight, and never encrypt. At most ``max_archived_sessions`` per peer, each for at most
  ``archived_session_lifetime`` since last used; then closed;
- **closed** sessions that we answered (responder) leave a tombstone: their id and the
  signed prekey their X3DH used. A replay of such a session's initial message is then
  refused (DuplicateMessage) instead of starting the session over. The one-time prekey
  guards that on its own, but X3DH may run without one (X3DH section 4.2). A tombstone is
  forgotten once its signed prekey is, when no replay can be opened anyway.

The initiator sends *initial* envelopes (with the X3DH header) until it has decrypted a
message in that session: any of its first messages may be the first to arrive (Signal
does the same with its PreKeySignalMessage).

Which session is active: the rank
---------------------------------
Every session has a **rank**: ``(initiated_at, initiator key)``, where ``initiated_at``
is the initiator's clock (Unix seconds) when it ran X3DH, carried in the authenticated
X3DH header; a later start ranks higher, and on a tie the *lower* initiator key ranks
higher. When the first message of a new session arrives, the new session becomes active
if it outranks the active one, else it is archived (its messages still decrypt). A node
starting a session on purpose (first contact, or after :meth:`SessionManager.reset_session`)
dates it ``max(now, 1 + initiated_at of every session it knows with that peer)``, so it
outranks all of them, on both sides.

*Both sides starting at once.* Alice and Bob each send a first message before either has
received one. Each compares the same two sessions by the same rank, so both make the
same one active (the later start; on the same second, the lower key's), whatever order
their messages arrive in, and nothing sent in the other session is lost: it decrypts
from the archive. An earlier rule, "lower key wins while unconfirmed, newest wins after",
depended on arrival order: a delayed first message of the losing session, arriving after
the winner was confirmed (likely with mailboxes, which page in random order), would have
switched one side only, for good.

*A peer that lost its state* starts a new session dated by its clock, which normally
outranks the old one. If its clock is far behind, our messages go to a session it no
longer has; the messaging layer must then tell us (UnknownSession at its end), and we
call ``reset_session``, as for any refused first message (PrekeyUnavailable).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ..at_rest import CLEAR, AtRest
from ..errors import (
    BundleError,
    DecryptError,
    DuplicateMessage,
    NoSession,
    SenderKeyMismatch,
    SessionStateCorrupt,
    StoredDataCorrupt,
    TooManySkipped,
    UnknownSession,
    UsageError,
)
from ..identity import Identity, fingerprint
from .bundle import PrekeyBundle
from .config import SUITE, SessionConfig
from .envelope import (
    KEY_LEN,
    MAX_PLAINTEXT,
    MAX_U64,
    Envelope,
    InitialHeader,
    initial_prefix,
    normal_prefix,
    session_id,
)
from .public_prekeys import PublicPrekeys

# The X3DH and Double Ratchet libraries (x3dh, doubleratchet, and the pydantic they both
# import: about 8 MB resident) are imported by the methods that use them, not here: an
# idle daemon publishes its bundle and runs its upkeep from PublicPrekeys alone, and
# loads them at its first agreement, rotation, top-up or session (issue 9;
# tests/test_prekeys_lazy.py checks it).
if TYPE_CHECKING:
    from .crypto import Ratchet
    from .prekeys import OwnPrekeys

_log = logging.getLogger(__name__)

INITIATOR, RESPONDER = "initiator", "responder"
ACTIVE, ARCHIVED, CLOSED = "active", "archived", "closed"
STATE_FORMAT = 1
#: Live session objects kept between messages (SessionManager._from_row): a few KiB each.
MAX_CACHED_SESSIONS = 256
#: Our X3DH state lives in the ``meta`` table under this key (p2pd/store.py).
PREKEYS_META_KEY = "session.prekeys"


class Decrypted(NamedTuple):
    peer_key: bytes
    plaintext: bytes


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What may be shown about a session (no key material)."""

    peer_key: bytes
    session_id: bytes
    role: str
    confirmed: bool
    created: float
    updated: float


@dataclass(slots=True)
class _Session:
    session_id: bytes
    peer_key: bytes
    status: str
    role: str
    created: float
    updated: float
    confirmed: bool = False
    #: IK_initiator || IK_responder, from X3DH
    associated_data: bytes = b""
    #: initiator only, until confirmed: the X3DH header every envelope repeats
    x3dh_header: InitialHeader | None = None
    #: responder only: the signed prekey its X3DH used (kept in the tombstone)
    signed_prekey: bytes | None = None
    #: the initiator's clock at X3DH time (Unix seconds); see "the rank" above
    initiated_at: int = 0
    ratchet: Ratchet | None = None
    #: The status its row holds, once loaded or stored (None: no row yet); see _store.
    stored_status: str | None = None

    def document(self) -> dict[str, Any]:
        spk = None if self.signed_prekey is None else self.signed_prekey.hex()
        if self.status == CLOSED:
            return {
                "format": STATE_FORMAT,
                "suite": SUITE,
                "role": self.role,
                "signed_prekey": spk,
                "initiated_at": self.initiated_at,
            }
        assert self.ratchet is not None
        return {**self._head(), "ratchet": self.ratchet.json}

    def _head(self) -> dict[str, Any]:
        """Everything of an open session's document but the ratchet."""
        import doubleratchet  # loaded already: an open session has a ratchet

        spk = None if self.signed_prekey is None else self.signed_prekey.hex()
        header = self.x3dh_header
        return {
            "format": STATE_FORMAT,
            "suite": SUITE,
            "doubleratchet_version": doubleratchet.__version__,
            "role": self.role,
            "initiated_at": self.initiated_at,
            "confirmed": self.confirmed,
            "associated_data": self.associated_data.hex(),
            "x3dh_header": None
            if header is None
            else {
                "identity_key": header.identity_key.hex(),
                "ephemeral_key": header.ephemeral_key.hex(),
                "signed_prekey": header.signed_prekey.hex(),
                "initiated_at": header.initiated_at,
                "one_time_prekey": None
                if header.one_time_prekey is None
                else header.one_time_prekey.hex(),
            },
            "signed_prekey": spk,
            # then "ratchet": the library's versioned model (DoubleRatchetModel "1.0.0"
            # in 1.3.0)
        }

    def state_text(self) -> str:
        """:meth:`document` as stored: compact JSON, the ratchet read off its objects
        (crypto.ratchet_state) instead of through the library's pydantic models."""
        if self.status == CLOSED:
            return json.dumps(self.document(), separators=(",", ":"))
        assert self.ratchet is not None
        from . import crypto  # loaded already: an open session has a ratchet

        document = {**self._head(), "ratchet": crypto.ratchet_state(self.ratchet)}
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False)

    def info(self) -> SessionInfo:
        return SessionInfo(
            self.peer_key, self.session_id, self.role, self.confirmed, self.created, self.updated
        )


class SessionManager:
    """The node's end-to-end sessions: our prekeys, and sessions with every peer."""

    __slots__ = (
        "_bundle_changed", "_cache", "_config", "_conn", "_identity", "_on_bundle_changed",
        "at_rest",
    )  # fmt: skip

    def __init__(
        self,
        conn: sqlite3.Connection,
        identity: Identity,
        config: SessionConfig,
        on_bundle_changed: Callable[[], None] | None = None,
        at_rest: AtRest = CLEAR,
    ):
        self._conn = conn
        #: How session states and our prekeys are stored (p2pd/at_rest.py): sealed, bound
        #: to their row, when the identity has a passphrase. The delivery's MessageStore
        #: uses the same.
        self.at_rest = at_rest
        self._identity = identity
        self._config = config
        self._bundle_changed = False
        #: Told each time the bundle changes (the daemon republishes it soon after).
        self._on_bundle_changed = on_bundle_changed
        #: Sessions as last written, by id: (the state value written, the live object).
        #: See _from_row and _store.
        self._cache: dict[bytes, tuple[str | bytes, _Session]] = {}

    @classmethod
    def open(
        cls,
        conn: sqlite3.Connection,
        identity: Identity,
        *,
        now: float,
        config: SessionConfig | None = None,
        on_bundle_changed: Callable[[], None] | None = None,
        at_rest: AtRest = CLEAR,
    ) -> SessionManager:
        """Load the node's session state from ``conn`` (a p2pd.store database), creating
        the prekeys on first use. Raises SessionStateCorrupt if they do not load.
        ``on_bundle_changed()`` is called whenever :attr:`bundle_changed` becomes true.
        ``at_rest``: what p2pd.at_rest.open_at_rest said of this database."""
        manager = cls(conn, identity, config or SessionConfig(), on_bundle_changed, at_rest)
        with manager._transaction(commit=True):
            if manager._prekeys_value() is None:
                from .prekeys import OwnPrekeys  # the first start: x3dh makes the keys

                prekeys = OwnPrekeys.create(identity, now=now, config=manager._config)
                manager._save_prekeys(prekeys)
                manager._mark_bundle_changed()
            else:
                # Fail now, not at the first message: the checks PublicPrekeys makes
                # without x3dh (public_prekeys.py says what waits for the first full load).
                public = manager._public_prekeys()
                if public.bundle is None:  # written before the public fields: add them
                    manager._save_prekeys(public.full(identity))
        return manager

    @property
    def public_key(self) -> bytes:
        return self._identity.public_key

    @property
    def config(self) -> SessionConfig:
        return self._config

    # ------------------------------------------------------------------ our bundle

    def prekey_bundle(self) -> bytes:
        """Our encoded prekey bundle: the ``extension`` of our handle record."""
        bundle = self._public_prekeys().bundle
        return self._load_prekeys().bundle.encode() if bundle is None else bundle

    @property
    def bundle_changed(self) -> bool:
        """True when the bundle changed (a one-time prekey used, a rotation) since
        :meth:`mark_bundle_published`: time to republish our record."""
        return self._bundle_changed

    def mark_bundle_published(self) -> None:
        self._bundle_changed = False

    def _mark_bundle_changed(self) -> None:
        self._bundle_changed = True
        if self._on_bundle_changed is not None:
            self._on_bundle_changed()

    def maintain(self, now: float, *, commit: bool = True) -> bool:
        """Rotate the signed prekey when due, drop expired ones, close archived sessions
        unused for too long, forget tombstones nobody can replay. Call it periodically
        (the daemon's hourly republish will do). True if the bundle changed."""
        with self._transaction(commit):
            public = self._public_prekeys()
            if public.held is not None and not public.maintenance_due(now, self._config):
                changed, held = False, set(public.held)  # nothing to do: x3dh not needed
            else:
                prekeys = public.full(self._identity)
                changed = prekeys.maintain(now, self._config)
                self._save_prekeys(prekeys)
                held = prekeys.held_signed_prekeys()
            cutoff = now - self._config.archived_session_lifetime
            rows = self._conn.execute(
                "SELECT session_id, state FROM sessions WHERE status=? AND updated<?",
                (ARCHIVED, cutoff),
            ).fetchall()
            for sid, state in rows:
                self._close(bytes(sid), state, now)
            for sid, state in self._conn.execute(
                "SELECT session_id, state FROM sessions WHERE status=?", (CLOSED,)
            ).fetchall():
                spk = self._document(sid, state).get("signed_prekey")
                if spk is None or bytes.fromhex(spk) not in held:
                    self._conn.execute("DELETE FROM sessions WHERE session_id=?", (sid,))
        if changed:
            self._mark_bundle_changed()
        return changed

    # ------------------------------------------------------------------ encrypting

    def encrypt(
        self,
        peer_key: bytes,
        plaintext: bytes,
        *,
        now: float,
        peer_bundle: bytes | PrekeyBundle | None = None,
        commit: bool = True,
    ) -> bytes:
        """Encrypt ``plaintext`` for ``peer_key``; returns the envelope.

        With no active session, ``peer_bundle`` (the ``extension`` of the peer's handle
        record, or a decoded PrekeyBundle) starts one by X3DH; without it, NoSession.
        With an active session, the bundle is not needed and is ignored. The caller has
        already checked ``peer_key`` against the pinned key.
        """
        (envelope,) = self.encrypt_many(
            peer_key, [plaintext], now=now, peer_bundle=peer_bundle, commit=commit
        )
        return envelope

    def encrypt_many(
        self,
        peer_key: bytes,
        plaintexts: Sequence[bytes],
        *,
        now: float,
        peer_bundle: bytes | PrekeyBundle | None = None,
        commit: bool = True,
    ) -> list[bytes]:
        """:meth:`encrypt` each of ``plaintexts`` in order (one ratchet step each), with
        the session loaded and stored once for all of them: every envelope, or (an
        exception) no ratchet step stored. A delivery batch's messages cost one session
        row write instead of one each (the state's JSON and its UPDATE were about a
        third of a message's encryption)."""
        self._check_peer_key(peer_key)
        if any(len(plaintext) > MAX_PLAINTEXT for plaintext in plaintexts):
            raise UsageError(f"plaintext over {MAX_PLAINTEXT} bytes")
        if not plaintexts:
            return []
        envelopes: list[bytes] = []
        with self._transaction(commit):
            session = self._active(peer_key)
            for plaintext in plaintexts:
                if session is None:
                    if peer_bundle is None:
                        raise NoSession()
                    session, envelope = self._start(peer_key, peer_bundle, plaintext, now)
                else:
                    envelope = self._seal(session, plaintext)
                envelopes.append(envelope.encode())
            assert session is not None  # plaintexts is not empty
            session.updated = now
            self._store(session)
        return envelopes

    def _start(
        self, peer_key: bytes, peer_bundle: bytes | PrekeyBundle, plaintext: bytes, now: float
    ) -> tuple[_Session, Envelope]:
        bundle = (
            peer_bundle
            if isinstance(peer_bundle, PrekeyBundle)
            else PrekeyBundle.decode(peer_bundle)
        )
        if not bundle.verify(peer_key):
            raise BundleError("the prekey bundle is not signed by this peer's key")
        from . import crypto

        prekeys = self._load_prekeys()
        shared, associated_data, x3dh_header = crypto.run_sync(
            prekeys.agree_active(peer_key, bundle)
        )
        header = InitialHeader(
            self.public_key,
            x3dh_header.ephemeral_key,
            x3dh_header.signed_pre_key,
            self._date_new_session(peer_key, now),
            x3dh_header.pre_key,
        )
        ratchet, message = crypto.run_sync(
            crypto.start_as_initiator(
                max_skip=self._config.max_skip,
                max_skipped_keys=self._config.max_skipped_keys,
                shared_secret=shared,
                recipient_ratchet_key=bundle.signed_prekey,
                plaintext=plaintext,
                associated_data=associated_data + initial_prefix(header),
            )
        )
        sid = session_id(self.public_key, peer_key, header.ephemeral_key)
        session = _Session(
            sid,
            peer_key,
            ACTIVE,
            INITIATOR,
            now,
            now,
            confirmed=False,
            associated_data=associated_data,
            x3dh_header=header,
            initiated_at=header.initiated_at,
            ratchet=ratchet,
        )
        _log.debug("session started with %s (initiator)", fingerprint(peer_key)[:12])
        return session, Envelope(
            crypto.ratchet_header(message.header), message.ciphertext, initial=header
        )

    def _seal(self, session: _Session, plaintext: bytes) -> Envelope:
        from . import crypto

        assert session.ratchet is not None
        if session.role == INITIATOR and not session.confirmed:
            header = session.x3dh_header
            assert header is not None
            message = crypto.run_sync(
                session.ratchet.encrypt_message(
                    plaintext, session.associated_data + initial_prefix(header)
                )
            )
            return Envelope(
                crypto.ratchet_header(message.header), message.ciphertext, initial=header
            )
        message = crypto.run_sync(
            session.ratchet.encrypt_message(
                plaintext, session.associated_data + normal_prefix(session.session_id)
            )
        )
        return Envelope(
            crypto.ratchet_header(message.header), message.ciphertext, session=session.session_id
        )

    # ------------------------------------------------------------------ decrypting

    def decrypt(
        self,
        envelope: bytes,
        *,
        now: float,
        sender_key: bytes | None = None,
        commit: bool = True,
    ) -> Decrypted:
        """Decrypt an envelope; returns (peer key, plaintext).

        ``sender_key`` is the peer the transport authenticated (a QUIC connection knows
        it); a sealed mailbox entry has none and passes None: the envelope alone finds
        the session, and authenticated decryption proves who sent it. Raises
        EnvelopeError for bytes that do not decode, a SessionError subclass for a message
        refused; in both cases nothing is changed.
        """
        parsed = Envelope.decode(envelope)
        if sender_key is not None:
            self._check_peer_key(sender_key)
        with self._transaction(commit):
            if parsed.initial is not None:
                header = parsed.initial
                if sender_key is not None and header.identity_key != sender_key:
                    raise SenderKeyMismatch()
                if header.identity_key == self.public_key:
                    raise DecryptError("a message claims to come from this node's own key")
                sid = session_id(header.identity_key, self.public_key, header.ephemeral_key)
                session = self._get(sid)
                if session is None:
                    return self._accept(parsed, header, sid, now)
                if session.status == CLOSED:
                    raise DuplicateMessage("a replay of a session's first message")
                if session.peer_key != header.identity_key:  # only by a hash collision
                    raise DecryptError()
            else:
                assert parsed.session is not None
                session = self._get(parsed.session)
                if session is None or session.status == CLOSED:
                    raise UnknownSession()
                if sender_key is not None and session.peer_key != sender_key:
                    raise SenderKeyMismatch()
            plaintext = self._open(session, parsed)
            if session.role == INITIATOR and not session.confirmed:
                session.confirmed = True  # from now on, normal envelopes
                session.x3dh_header = None
            session.updated = now
            self._store(session)
        return Decrypted(session.peer_key, plaintext)

    def _open(self, session: _Session, envelope: Envelope) -> bytes:
        import doubleratchet

        from . import crypto

        ratchet = session.ratchet
        assert ratchet is not None
        header = session.x3dh_header
        if (
            ratchet.receiving_chain_length is None
            and header is not None
            and envelope.ratchet.ratchet_key == header.signed_prekey
        ):
            raise DecryptError()  # see crypto.UNAUTHENTIC
        message = doubleratchet.EncryptedMessage(
            crypto.library_header(envelope.ratchet), envelope.ciphertext
        )
        associated_data = session.associated_data + envelope.prefix
        try:
            # decrypt_message works on a copy of the ratchet and keeps it only if the
            # message authenticates (doubleratchet 1.3.0, double_ratchet.py); a refused
            # message also leaves the stored row alone: we raise before writing.
            return crypto.run_sync(
                crypto.decrypt_quietly(ratchet.decrypt_message(message, associated_data))
            )
        except doubleratchet.DuplicateMessageException:
            raise DuplicateMessage() from None
        except doubleratchet.DoSProtectionException:
            raise TooManySkipped() from None
        except crypto.UNAUTHENTIC:
            raise DecryptError() from None

    def _accept(
        self, envelope: Envelope, header: InitialHeader, sid: bytes, now: float
    ) -> Decrypted:
        """A first message of a session we do not know: X3DH as the responder."""
        import doubleratchet

        from . import crypto

        prekeys = self._load_prekeys()
        shared, associated_data, spk_priv = crypto.run_sync(prekeys.agree_passive(header))
        message = doubleratchet.EncryptedMessage(
            crypto.library_header(envelope.ratchet), envelope.ciphertext
        )
        try:
            ratchet, plaintext = crypto.run_sync(
                crypto.start_as_responder(
                    max_skip=self._config.max_skip,
                    max_skipped_keys=self._config.max_skipped_keys,
                    shared_secret=shared,
                    own_ratchet_priv=spk_priv,
                    message=message,
                    associated_data=associated_data + envelope.prefix,
                )
            )
        except doubleratchet.DoSProtectionException:
            raise TooManySkipped() from None
        except crypto.UNAUTHENTIC:
            raise DecryptError() from None
        # Authenticated: only now is the one-time prekey spent (X3DH section 3.4).
        if header.one_time_prekey is not None:
            prekeys.consume(header.one_time_prekey, self._config)
            self._save_prekeys(prekeys)
            self._mark_bundle_changed()
        peer_key = header.identity_key
        session = _Session(
            sid,
            peer_key,
            ACTIVE,
            RESPONDER,
            now,
            now,
            confirmed=True,
            associated_data=associated_data,
            signed_prekey=header.signed_prekey,
            initiated_at=header.initiated_at,
            ratchet=ratchet,
        )
        current = self._active(peer_key)
        if current is not None and self._rank(current) > self._rank(session):
            # e.g. both sides started at once and ours ranks higher (module docstring)
            session.status = ARCHIVED
            _log.info("a new session from %s ranks lower: archived", fingerprint(peer_key)[:12])
        elif current is not None:
            current.status = ARCHIVED
            current.updated = now
            self._store(current)  # before the new active one: one active per peer
        self._store(session)
        self._trim_archive(peer_key, now)
        _log.debug("session started with %s (responder)", fingerprint(peer_key)[:12])
        return Decrypted(peer_key, plaintext)

    # ------------------------------------------------------------------ management

    def has_session(self, peer_key: bytes) -> bool:
        return self._active_row(peer_key) is not None

    def session_info(self, peer_key: bytes) -> SessionInfo | None:
        session = self._active(peer_key)
        return None if session is None else session.info()

    def reset_session(self, peer_key: bytes, *, now: float, commit: bool = True) -> bool:
        """Archive the active session with ``peer_key``: the next ``encrypt`` needs a
        fresh bundle and starts a new one. For when the peer reports that it cannot
        decrypt (e.g. it lost its state, or refused our first message with
        PrekeyUnavailable). True if there was an active session."""
        with self._transaction(commit):
            session = self._active(peer_key)
            if session is None:
                return False
            session.status = ARCHIVED
            session.updated = now
            self._store(session)
            self._trim_archive(peer_key, now)
        return True

    def delete_sessions(self, peer_key: bytes, *, commit: bool = True) -> int:
        """Forget every session with ``peer_key`` (e.g. the contact was deleted)."""
        with self._transaction(commit):
            cursor = self._conn.execute("DELETE FROM sessions WHERE peer_key=?", (peer_key,))
            for sid in [sid for sid, (_, s) in self._cache.items() if s.peer_key == peer_key]:
                del self._cache[sid]
        return cursor.rowcount

    # ------------------------------------------------------------------ storage

    @contextlib.contextmanager
    def _transaction(self, commit: bool) -> Iterator[None]:
        """All of one call's writes, or none of them.

        A savepoint inside the connection's transaction (opened here if none is): on an
        exception only this call's writes are rolled back. With ``commit`` the
        transaction is committed at the end (including anything the caller had pending
        on this connection); without, it stays open for the caller to commit.
        """
        conn = self._conn
        began = not conn.in_transaction
        if began:
            conn.execute("BEGIN")
        conn.execute("SAVEPOINT p2pd_session")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK TO p2pd_session")
            conn.execute("RELEASE p2pd_session")
            if began:
                conn.rollback()
            raise
        conn.execute("RELEASE p2pd_session")
        if commit:
            conn.commit()

    def _prekeys_value(self) -> object:
        row = self._conn.execute(
            "SELECT value FROM meta WHERE key=?", (PREKEYS_META_KEY,)
        ).fetchone()
        return None if row is None else row[0]

    def _public_prekeys(self) -> PublicPrekeys:
        """Our stored prekeys, their public fields checked, their secrets not parsed."""
        stored = self._prekeys_value()
        if stored is None:
            raise SessionStateCorrupt("the prekey state is missing")
        try:
            text = self.at_rest.open_text("meta", "value", PREKEYS_META_KEY, stored)
        except StoredDataCorrupt as exc:
            raise SessionStateCorrupt(f"the prekey state does not load: {exc}") from None
        return PublicPrekeys.parse(text, self._identity.public_key)

    def _load_prekeys(self) -> OwnPrekeys:
        """Our whole X3DH state (imports x3dh the first time)."""
        return self._public_prekeys().full(self._identity)

    def _save_prekeys(self, prekeys: OwnPrekeys) -> None:
        value = self.at_rest.seal_text("meta", "value", PREKEYS_META_KEY, prekeys.dump())
        self._conn.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (PREKEYS_META_KEY, value),
        )

    _COLUMNS = "session_id, peer_key, status, state, created, updated"

    def _get(self, sid: bytes) -> _Session | None:
        row = self._conn.execute(
            f"SELECT {self._COLUMNS} FROM sessions WHERE session_id=?", (sid,)
        ).fetchone()
        return None if row is None else self._from_row(row)

    def _active_row(self, peer_key: bytes) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._conn.execute(
            f"SELECT {self._COLUMNS} FROM sessions WHERE peer_key=? AND status=?",
            (peer_key, ACTIVE),
        ).fetchone()
        return row

    def _active(self, peer_key: bytes) -> _Session | None:
        row = self._active_row(peer_key)
        return None if row is None else self._from_row(row)

    def _from_row(self, row: tuple[Any, ...]) -> _Session:
        """The session a row stores.

        Parsing a stored session (JSON, then the library's pydantic model and its
        migrations) used to be the largest cost of every message, on both sides. So the
        objects _store writes are kept, with the exact text written, and reused while
        the row still holds that text. The row stays the truth: a transaction the
        caller rolled back, another writer, or a close changes the text, and the
        session is parsed again. An object is taken *out* of the cache here and put back
        only by _store, so one changed by a call that then failed (the ratchet steps
        before the write) is never reused.
        """
        sid, peer_key, status, state, created, updated = row
        cached = self._cache.pop(bytes(sid), None)
        if cached is not None and cached[0] == state and status != CLOSED:
            session = cached[1]
            session.status, session.updated = status, float(updated)
            session.stored_status = status
            return session
        doc = self._document(sid, state)
        try:
            base = _Session(
                bytes(sid), bytes(peer_key), status, doc["role"], float(created), float(updated)
            )
            base.stored_status = status
            spk = doc.get("signed_prekey")
            base.signed_prekey = None if spk is None else bytes.fromhex(spk)
            base.initiated_at = int(doc["initiated_at"])
            if status == CLOSED:
                return base
            header = doc["x3dh_header"]
            if header is not None:
                otpk = header["one_time_prekey"]
                base.x3dh_header = InitialHeader(
                    bytes.fromhex(header["identity_key"]),
                    bytes.fromhex(header["ephemeral_key"]),
                    bytes.fromhex(header["signed_prekey"]),
                    int(header["initiated_at"]),
                    None if otpk is None else bytes.fromhex(otpk),
                )
            base.confirmed = bool(doc["confirmed"])
            base.associated_data = bytes.fromhex(doc["associated_data"])
            from . import crypto  # an open session: the libraries are needed now

            base.ratchet = crypto.load_ratchet(
                doc["ratchet"],
                max_skip=self._config.max_skip,
                max_skipped_keys=self._config.max_skipped_keys,
            )
        except Exception:  # the parse boundary of stored data; never echo it (secrets)
            raise SessionStateCorrupt("a stored session does not load") from None
        return base

    def _store(self, session: _Session) -> None:
        state = self.at_rest.seal_text(
            "sessions", "state", session.session_id, session.state_text()
        )
        updated = 0
        if session.stored_status == session.status:
            # The usual case, a ratchet step: no indexed column changes, and an UPDATE of
            # only these columns leaves the indexes alone (the upsert below rewrote both
            # index entries of the row on every message).
            updated = self._conn.execute(
                "UPDATE sessions SET state=?, updated=? WHERE session_id=?",
                (state, session.updated, session.session_id),
            ).rowcount
        if not updated:
            self._conn.execute(
                "INSERT INTO sessions(session_id, peer_key, status, state, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(session_id) DO UPDATE SET "
                "status=excluded.status, state=excluded.state, updated=excluded.updated",
                (
                    session.session_id,
                    session.peer_key,
                    session.status,
                    state,
                    session.created,
                    session.updated,
                ),
            )
        session.stored_status = session.status
        cache = self._cache
        cache.pop(session.session_id, None)  # re-inserted last: the dict is the LRU order
        if session.status == CLOSED:
            return
        cache[session.session_id] = (state, session)
        if len(cache) > MAX_CACHED_SESSIONS:
            del cache[next(iter(cache))]

    def _trim_archive(self, peer_key: bytes, now: float) -> None:
        rows = self._conn.execute(
            "SELECT session_id, state FROM sessions WHERE peer_key=? AND status=? "
            "ORDER BY updated DESC, created DESC",
            (peer_key, ARCHIVED),
        ).fetchall()
        for sid, state in rows[self._config.max_archived_sessions :]:
            self._close(bytes(sid), state, now)

    def _close(self, sid: bytes, state: object, now: float) -> None:
        """Drop a session's keys. A session we answered leaves a tombstone (see the
        module docstring); one we started has nothing anyone could replay to us."""
        self._cache.pop(sid, None)
        doc = self._document(sid, state)
        if doc.get("role") != RESPONDER:
            self._conn.execute("DELETE FROM sessions WHERE session_id=?", (sid,))
            return
        tombstone = {
            "format": STATE_FORMAT,
            "suite": SUITE,
            "role": RESPONDER,
            "signed_prekey": doc.get("signed_prekey"),
            "initiated_at": doc.get("initiated_at", 0),
        }
        text = json.dumps(tombstone, separators=(",", ":"))
        self._conn.execute(
            "UPDATE sessions SET status=?, state=?, updated=? WHERE session_id=?",
            (CLOSED, self.at_rest.seal_text("sessions", "state", sid, text), now, sid),
        )

    def _rank(self, session: _Session) -> tuple[int, bytes]:
        """Later start first; on a tie, the lower initiator key (its bytes inverted, so
        that the larger tuple wins)."""
        initiator = self.public_key if session.role == INITIATOR else session.peer_key
        return session.initiated_at, bytes(255 - b for b in initiator)

    def _date_new_session(self, peer_key: bytes, now: float) -> int:
        """``max(now, 1 + initiated_at of every session we know with the peer)``: a
        session we start outranks every one we know of, whatever the clocks say."""
        known = [
            int(self._document(sid, state).get("initiated_at", 0))
            for (sid, state) in self._conn.execute(
                "SELECT session_id, state FROM sessions WHERE peer_key=?", (peer_key,)
            )
        ]
        # clamped: a peer's far-future clock must not make our encrypt fail
        return min(MAX_U64, max([max(int(now), 0), *(t + 1 for t in known)]))

    def _document(self, sid: bytes, stored: object) -> dict[str, Any]:
        """A row's state, opened (p2pd/at_rest.py) and parsed."""
        try:
            state = self.at_rest.open_text("sessions", "state", bytes(sid), stored)
        except StoredDataCorrupt as exc:
            raise SessionStateCorrupt(f"a stored session does not load: {exc}") from None
        return _document(state)

    def _check_peer_key(self, peer_key: bytes) -> None:
        if not isinstance(peer_key, bytes) or len(peer_key) != KEY_LEN:
            raise UsageError("a peer key is a 32-byte Ed25519 public key")
        if peer_key == self.public_key:
            raise UsageError("a session needs another node's key, not our own")


def _document(state: str) -> dict[str, Any]:
    try:
        doc = json.loads(state)
        if doc["format"] != STATE_FORMAT or doc["suite"] != SUITE:
            raise ValueError("unknown session state format")
    except Exception:
        raise SessionStateCorrupt("a stored session does not load") from None
    if not isinstance(doc, dict):
        raise SessionStateCorrupt("a stored session does not load")
    return doc
