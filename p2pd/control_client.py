"""The blocking client of the control API, and the protocol constants both ends share.

The server (p2pd/control.py) runs under trio inside the daemon; this side is for the CLI,
the benchmarks and the tests, one request at a time over a plain socket. It is kept apart
from the server so that every ``p2pd`` command can talk to the daemon without importing
trio: this module imports only the standard library and p2pd.errors. Keep it that way
(tests/test_cli_imports.py fails otherwise). docs/CONTROL_API.md is the reference.
"""

from __future__ import annotations

import errno
import json
import socket
import time
from pathlib import Path
from typing import Any

from .errors import Contested, ControlError, DaemonNotRunning, NotFound, UsageError

#: The longest request line: a message of wire.MAX_TEXT (64 KiB) with JSON's escapes, or
#: a ``send`` of many ``texts``.
MAX_LINE = 1024 * 1024

# JSON-RPC 2.0 error codes (section 5.1), and ours in the server-error range.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
NOT_FOUND = -32001
#: Different keys claim that handle (p2pd/claims.py); ``data.claims`` has them.
CONTESTED = -32002
FAILED = -32000


class ControlClient:
    """A blocking client: one request at a time over the daemon's socket.

    A connection either answers requests (:meth:`call`) or, after :meth:`subscribe`,
    carries events (:meth:`next_event`); open two to do both.
    """

    def __init__(self, home: Path, timeout: float = 30.0) -> None:
        self.path = home / "control.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except OSError as exc:
            self._sock.close()
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise DaemonNotRunning(
                    f"no p2pd daemon is running for {home} (start one with `p2pd daemon`)"
                ) from None
            raise DaemonNotRunning(
                f"cannot reach the daemon at {self.path}: {exc.strerror}"
            ) from None
        self._buffer = b""
        self._timeout = timeout
        self._next_id = 1

    def _readline(self, timeout: float | None) -> bytes:
        """One line (b"" at EOF). Our own buffer: a file object from makefile() may lose
        data when a read times out, and event streams wait with timeouts."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE * 16:
                raise ControlError("the daemon sent an overlong line", FAILED)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self._sock.settimeout(left)
            else:
                self._sock.settimeout(None)
            data = self._sock.recv(65536)
            if not data:
                return b""
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line + b"\n"

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """The result of ``method``; the daemon's errors raised as p2pd errors:
        :class:`NotFound`, :class:`Contested`, :class:`UsageError` (bad params), else
        :class:`ControlError`."""
        req_id = self._next_id
        self._next_id += 1
        request = {"jsonrpc": "2.0", "id": req_id, "method": method, "params": params or {}}
        try:
            self._sock.settimeout(self._timeout)
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except TimeoutError:
            raise ControlError("the daemon did not answer in time", FAILED) from None
        except OSError as exc:
            raise DaemonNotRunning(f"lost the connection to the daemon: {exc}") from None
        try:
            response = self._read_json(self._timeout, "response")
        except TimeoutError:
            raise ControlError("the daemon did not answer in time", FAILED) from None
        if not isinstance(response, dict):
            raise ControlError("the daemon sent a malformed response", FAILED)
        if "error" in response:
            error = response["error"] if isinstance(response["error"], dict) else {}
            code = error.get("code", FAILED)
            message = str(error.get("message", "unknown error"))
            if code == NOT_FOUND:
                raise NotFound(message)
            if code == CONTESTED:
                data = error.get("data")
                claims = data.get("claims") if isinstance(data, dict) else None
                raise Contested(message, claims if isinstance(claims, list) else None)
            if code in (INVALID_PARAMS, INVALID_REQUEST):
                raise UsageError(message)
            raise ControlError(message, code if isinstance(code, int) else FAILED)
        return response.get("result")

    def _read_json(self, timeout: float | None, what: str) -> Any:
        """The next line, parsed. Raises TimeoutError, DaemonNotRunning, ControlError."""
        try:
            line = self._readline(timeout)
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise DaemonNotRunning(f"lost the connection to the daemon: {exc}") from None
        if not line:
            raise DaemonNotRunning("the daemon closed the connection")
        try:
            return json.loads(line)
        except ValueError:
            raise ControlError(f"the daemon sent a malformed {what}", FAILED) from None

    def subscribe(self) -> None:
        """Turn this connection into an event stream; read it with :meth:`next_event`."""
        result = self.call("subscribe")
        if not isinstance(result, dict) or result.get("subscribed") is not True:
            raise ControlError("the daemon refused the subscription", FAILED)

    def next_event(self, timeout: float | None) -> dict[str, Any] | None:
        """The next event after :meth:`subscribe`, or None if none came within ``timeout``."""
        try:
            note = self._read_json(timeout, "event")
        except TimeoutError:
            return None
        params = note.get("params") if isinstance(note, dict) else None
        if not isinstance(params, dict):
            raise ControlError("the daemon sent a malformed event", FAILED)
        return params

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
