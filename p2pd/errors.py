"""The one error tree of p2pd.

Every error p2pd raises on purpose derives from :class:`P2PDError`. Its message is written
for the person at the keyboard: the CLI prints ``ERROR: <message>`` and picks the exit code
from the class, so messages never carry secrets or tracebacks.

::

    P2PDError
    ├── UsageError               you asked for something malformed (exit 2)
    │   ├── InvalidHandle        handle syntax
    │   ├── InvalidAddress       HOST:PORT syntax
    │   └── DatagramReserved     a QUIC datagram whose first byte is the transport's (< 0x10)
    ├── LocalError               this machine's state is not what the request needs (exit 1)
    │   ├── IdentityExists       `init` would overwrite an identity
    │   ├── NoIdentity           no identity in this home
    │   ├── BadPassphrase        the key file does not open with that passphrase
    │   ├── PassphraseRequired   the key is encrypted and no passphrase was given
    │   ├── KeystoreCorrupt      the key file is damaged or of an unknown format
    │   ├── DaemonNotRunning     nothing listens on this home's control socket
    │   ├── DaemonAlreadyRunning another daemon serves this home
    │   ├── DatagramTooLarge     a QUIC datagram larger than the peer and the path accept
    │   ├── NoSession            no session with that peer yet, and no prekey bundle given
    │   ├── SessionStateCorrupt  stored session or prekey state does not load
    │   ├── StoredDataCorrupt    an encrypted value in p2pd.db does not open (p2pd/at_rest.py)
    │   └── DatabaseLocked       p2pd.db is encrypted under another key than this identity's
    ├── RemoteError              a peer or the network misbehaved (exit 1)
    │   ├── WireError            bytes that do not decode (malformed, oversize)
    │   │   ├── OldFrameVersion  a DHT frame of an older version (refused, counted)
    │   │   ├── RecordError      a handle record that does not verify or is out of bounds
    │   │   ├── BundleError      a prekey bundle that does not decode or verify
    │   │   ├── EnvelopeError    a session envelope that does not decode
    │   │   ├── LanAnnouncementError  an mDNS announcement refused (lan_announcement.py;
    │   │   │                    LanPinConflict: a pinned handle with another key)
    │   │   └── MediaWireError   a call media datagram that does not decode (p2pd/media)
    │   ├── NotFound             the network holds no valid record for that handle
    │   ├── Contested            valid claims by different keys, none with 2/3 of the
    │   │                        replicas (p2pd/claims.py); not a NotFound
    │   ├── KeyChanged           a contact's key differs from the pinned one
    │   ├── PeerKeyMismatch      a QUIC peer's certificate holds another key than expected
    │   ├── ConnectionLost       a QUIC connection or stream failed or was closed by the peer
    │   │                        (quic.StreamBroken is also a trio.BrokenResourceError)
    │   ├── NotDelivered         `send --wait`: not acknowledged in time (it stays queued)
    │   ├── CallFailed           `call`/`answer`: the call never took place (rejected, busy...)
    │   └── SessionError         a session message refused; the session state is unchanged
    │       ├── DecryptError     does not authenticate: forged, tampered, wrong session
    │       ├── DuplicateMessage a replay: that message was already decrypted
    │       ├── TooManySkipped   it skips more messages than the bound allows
    │       ├── UnknownSession   no session matches the envelope
    │       ├── PrekeyUnavailable  it starts a session with a prekey no longer held
    │       └── SenderKeyMismatch  its sender is not the peer the transport authenticated
    └── ControlError             the daemon answered a control request with an error
                                 (carries the JSON-RPC code)
"""

from __future__ import annotations


class P2PDError(Exception):
    """Something went wrong in p2pd."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or type(self).__name__).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(P2PDError):
    """The request is malformed."""

    exit_code = 2


class InvalidHandle(UsageError):
    """That is not a valid handle."""


class InvalidAddress(UsageError):
    """That is not a valid HOST:PORT address."""


class DatagramReserved(UsageError):
    """That datagram is empty or starts with a byte below 0x10, which the transport keeps
    for itself: the peer would take it as its own and never hand it on."""


class LocalError(P2PDError):
    """This machine's p2pd state does not allow that."""


class IdentityExists(LocalError):
    """An identity already exists in this home; refusing to overwrite it."""


class NoIdentity(LocalError):
    """No identity in this home: run `p2pd init HANDLE` first."""


class BadPassphrase(LocalError):
    """The passphrase does not open this identity's key."""


class PassphraseRequired(LocalError):
    """This identity's key is encrypted: give --passphrase-file or set P2PD_PASSPHRASE."""


class KeystoreCorrupt(LocalError):
    """The identity key file is damaged or of an unknown format."""


class DaemonNotRunning(LocalError):
    """No p2pd daemon is running for this home (start one with `p2pd daemon`)."""


class DaemonAlreadyRunning(LocalError):
    """Another p2pd daemon is already running for this home."""


class DatagramTooLarge(LocalError):
    """That datagram is larger than the peer accepts or one packet can carry."""


class NoSession(LocalError):
    """No session with this peer yet: its prekey bundle is needed to start one."""


class SessionStateCorrupt(LocalError):
    """The stored session or prekey state is damaged or of an unknown format."""


class StoredDataCorrupt(LocalError):
    """A value stored encrypted in p2pd.db does not open: damaged, or moved from another
    row. It is left as it is."""


class DatabaseLocked(LocalError):
    """p2pd.db is encrypted at rest under another key than this identity's."""


class RemoteError(P2PDError):
    """A peer or the network misbehaved."""


class WireError(RemoteError):
    """Malformed bytes from the network."""


class OldFrameVersion(WireError):
    """A DHT frame of an older protocol version (an older p2pd): refused."""


class RecordError(WireError):
    """A handle record that does not verify."""


class BundleError(WireError):
    """A prekey bundle that does not decode or is not signed by its owner's key."""


class EnvelopeError(WireError):
    """A session envelope that does not decode."""


class NotFound(RemoteError):
    """No valid record for that handle was found."""


class Contested(RemoteError):
    """Different keys claim that handle and the network cannot tell which came first:
    name the one you mean in its self-certifying form, handle#<fingerprint>."""

    def __init__(self, message: str, claims: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        #: Per key: fingerprint, self_certifying, votes, replicas, seen (p2pd/claims.py).
        self.claims = claims or []


class KeyChanged(RemoteError):
    """This contact's key has changed: check it with `p2pd verify HANDLE` before sending."""


class PeerKeyMismatch(RemoteError):
    """The peer answered with a different key than the one expected; the connection was closed."""


class ConnectionLost(RemoteError):
    """The connection to the peer failed or was closed."""


class NotDelivered(RemoteError):
    """Not acknowledged by the recipient's daemon in time; it stays queued and is retried."""


class CallFailed(RemoteError):
    """The call did not take place: rejected, busy, not answered, failed, or hung up first."""


class SessionError(RemoteError):
    """A session message was refused; the session is unchanged."""


class DecryptError(SessionError):
    """A message did not authenticate: forged, tampered with, or for another session."""


class DuplicateMessage(SessionError):
    """A replayed message: this one was already decrypted."""


class TooManySkipped(SessionError):
    """A message skips more earlier messages than the session allows."""


class UnknownSession(SessionError):
    """No session matches this message (it may have been closed or lost)."""


class PrekeyUnavailable(SessionError):
    """The message starts a session with a prekey this node no longer holds."""


class SenderKeyMismatch(SessionError):
    """The message's sender is not the peer the connection authenticated."""


class ControlError(P2PDError):
    """The daemon refused a control request."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
