"""The one error tree of p2pd.

Every error p2pd raises on purpose derives from :class:`P2PDError`. Its message is written
for the person at the keyboard: the CLI prints ``ERROR: <message>`` and picks the exit code
from the class, so messages never carry secrets or tracebacks.

::

    P2PDError
    ├── UsageError               you asked for something malformed (exit 2)
    │   ├── InvalidHandle        handle syntax
    │   └── InvalidAddress       HOST:PORT syntax
    ├── LocalError               this machine's state is not what the request needs (exit 1)
    │   ├── IdentityExists       `init` would overwrite an identity
    │   ├── NoIdentity           no identity in this home
    │   ├── BadPassphrase        the key file does not open with that passphrase
    │   ├── PassphraseRequired   the key is encrypted and no passphrase was given
    │   ├── KeystoreCorrupt      the key file is damaged or of an unknown format
    │   ├── DaemonNotRunning     nothing listens on this home's control socket
    │   └── DaemonAlreadyRunning another daemon serves this home
    ├── RemoteError              a peer or the network misbehaved (exit 1)
    │   ├── WireError            bytes that do not decode (malformed, oversize)
    │   │   └── RecordError      a handle record that does not verify or is out of bounds
    │   ├── NotFound             the network holds no valid record for that handle
    │   └── KeyChanged           a contact's key differs from the pinned one
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


class RemoteError(P2PDError):
    """A peer or the network misbehaved."""


class WireError(RemoteError):
    """Malformed bytes from the network."""


class RecordError(WireError):
    """A handle record that does not verify."""


class NotFound(RemoteError):
    """No valid record for that handle was found."""


class KeyChanged(RemoteError):
    """This contact's key has changed: check it with `p2pd verify HANDLE` before sending."""


class ControlError(P2PDError):
    """The daemon refused a control request."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
