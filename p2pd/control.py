"""The local control API: JSON-RPC 2.0 over a Unix socket, one JSON object per line.

The socket is ``<home>/control.sock``, mode 0600 inside a 0700 home: only the daemon's
user can talk to it. docs/CONTROL_API.md is the reference. A malformed request gets a
JSON-RPC error and the connection (and the daemon) keeps serving.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .errors import (
    ControlError,
    DaemonAlreadyRunning,
    DaemonNotRunning,
    LocalError,
    NotFound,
    P2PDError,
    UsageError,
)

if TYPE_CHECKING:
    from .daemon import Node

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
MAX_CONNECTIONS = 64
#: sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107

# JSON-RPC 2.0 error codes (section 5.1), and ours in the server-error range.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
NOT_FOUND = -32001
FAILED = -32000


def _params(params: Any, names: tuple[str, ...]) -> dict[str, Any]:
    if params is None:
        params = {}
    if isinstance(params, list):
        if len(params) > len(names):
            raise UsageError("too many parameters")
        params = dict(zip(names, params, strict=False))
    if not isinstance(params, dict) or set(params) - set(names):
        raise UsageError(f"parameters must be an object with keys {list(names)}")
    return params


def _methods(node: Node) -> dict[str, Callable[[Any], Awaitable[Any]]]:
    async def status(params: Any) -> Any:
        _params(params, ())
        return await node.status()

    async def whois(params: Any) -> Any:
        handle = _params(params, ("handle",)).get("handle")
        if not isinstance(handle, str):
            raise UsageError("whois needs a 'handle' string")
        return await node.whois(handle)

    return {"status": status, "whois": whois}


def _error(req_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": req_id, "error": {"code": code, "message": message}}


async def handle_request(
    line: bytes, methods: dict[str, Callable[[Any], Awaitable[Any]]]
) -> dict[str, Any] | None:
    """One request line in, one response object out (None for a notification)."""
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return _error(None, PARSE_ERROR, "parse error: not a JSON object")
    if not isinstance(request, dict):
        return _error(None, INVALID_REQUEST, "invalid request: expected a JSON object")
    req_id = request.get("id")
    if not isinstance(req_id, str | int | type(None)) or isinstance(req_id, bool):
        return _error(None, INVALID_REQUEST, "invalid request: bad id")
    method = request.get("method")
    if request.get("jsonrpc") != "2.0" or not isinstance(method, str):
        return _error(req_id, INVALID_REQUEST, "invalid request: need jsonrpc 2.0 and method")
    func = methods.get(method)
    if func is None:
        return _error(req_id, METHOD_NOT_FOUND, f"method not found: {method[:64]}")
    try:
        result = await func(request.get("params"))
    except UsageError as exc:
        return _error(req_id, INVALID_PARAMS, exc.message)
    except NotFound as exc:
        return _error(req_id, NOT_FOUND, exc.message)
    except P2PDError as exc:
        return _error(req_id, FAILED, exc.message)
    except Exception:
        log.exception("control method %s failed", method)
        return _error(req_id, INTERNAL_ERROR, "internal error (see the daemon's log)")
    if "id" not in request:
        return None
    return {"jsonrpc": "2.0", "id": req_id, "result": result}


async def _serve_connection(stream: trio.SocketStream, methods: dict[str, Any]) -> None:
    buffer = b""
    async with stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not line.strip():
                    continue
                response = await handle_request(line, methods)
                if response is not None:
                    try:
                        await stream.send_all(json.dumps(response).encode() + b"\n")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
            if len(buffer) > MAX_LINE:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    error = _error(None, INVALID_REQUEST, "request line too long")
                    await stream.send_all(json.dumps(error).encode() + b"\n")
                return


def check_stale_socket(path: Path) -> None:
    """Refuse if a daemon answers on ``path``; remove a socket file nobody listens on."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise DaemonAlreadyRunning(f"another p2pd daemon is already running for {path.parent}")


async def serve_control_api(
    path: Path, node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on ``path`` (mode 0600) and serve JSON-RPC requests until cancelled."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise LocalError(
            f"the control socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
            "use a shorter --home"
        )
    check_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is created 0600: no window with looser modes
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(MAX_CONNECTIONS)
    listener = trio.SocketListener(sock)
    methods = _methods(node)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, _connection_handler(methods), [listener])
            task_status.started()
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _connection_handler(methods: dict[str, Any]) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handler(stream: trio.SocketStream) -> None:
        await _serve_connection(stream, methods)

    return handler


class ControlClient:
    """A blocking client for the CLI: one request at a time over the daemon's socket."""

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
        self._file = self._sock.makefile("rb")
        self._next_id = 1

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        req_id = self._next_id
        self._next_id += 1
        request = {"jsonrpc": "2.0", "id": req_id, "method": method, "params": params or {}}
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            line = self._file.readline(MAX_LINE * 16)
        except TimeoutError:
            raise ControlError("the daemon did not answer in time", FAILED) from None
        except OSError as exc:
            raise DaemonNotRunning(f"lost the connection to the daemon: {exc}") from None
        if not line:
            raise DaemonNotRunning("the daemon closed the connection")
        try:
            response = json.loads(line)
        except ValueError:
            raise ControlError("the daemon sent a malformed response", FAILED) from None
        if not isinstance(response, dict):
            raise ControlError("the daemon sent a malformed response", FAILED)
        if "error" in response:
            error = response["error"] if isinstance(response["error"], dict) else {}
            code = error.get("code", FAILED)
            message = str(error.get("message", "unknown error"))
            if code == NOT_FOUND:
                raise NotFound(message)
            if code in (INVALID_PARAMS, INVALID_REQUEST):
                raise UsageError(message)
            raise ControlError(message, code if isinstance(code, int) else FAILED)
        return response.get("result")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
