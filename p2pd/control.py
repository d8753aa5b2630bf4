"""The local control API: JSON-RPC 2.0 over a Unix socket, one JSON object per line.

The socket is ``<home>/control.sock``, mode 0600 inside a 0700 home: only the daemon's
user can talk to it. docs/CONTROL_API.md is the reference. A malformed request gets a
JSON-RPC error and the connection (and the daemon) keeps serving. This is the server;
the blocking client and the protocol's constants are in p2pd/control_client.py, which
the CLI imports without trio.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .api import Api, CallMedia
from .control_client import (
    CONTESTED,
    FAILED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_LINE,
    METHOD_NOT_FOUND,
    NOT_FOUND,
    PARSE_ERROR,
)
from .delivery import EventBus
from .errors import Contested, DaemonAlreadyRunning, LocalError, NotFound, P2PDError, UsageError

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
#: sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


#: A control method: parses the request's ``params`` and calls the façade.
Handler = Callable[["Api", Any], Awaitable[Any]]
#: Method name -> handler; docs/CONTROL_API.md describes each (``subscribe`` is served
#: apart: it turns the connection into an event stream).
HANDLERS: dict[str, Handler] = {}


def _method(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        HANDLERS[name] = handler
        return handler

    return register


def methods(api: Api) -> dict[str, Callable[[Any], Awaitable[Any]]]:
    """The handlers bound to ``api``: what :func:`handle_request` dispatches to."""
    return {name: functools.partial(handler, api) for name, handler in HANDLERS.items()}


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


@_method("status")
async def _status(api: Api, params: Any) -> Any:
    _params(params, ())
    return api.status()


@_method("whois")
async def _whois(api: Api, params: Any) -> Any:
    handle = _params(params, ("handle",)).get("handle")
    if not isinstance(handle, str):
        raise UsageError("whois needs a 'handle' string")
    return await api.whois(handle)


@_method("send")
async def _send(api: Api, params: Any) -> Any:
    p = _params(params, ("handle", "text", "texts"))
    handle, text, texts = p.get("handle"), p.get("text"), p.get("texts")
    if texts is not None:
        if not isinstance(handle, str) or text is not None or not isinstance(texts, list):
            raise UsageError("send needs a 'handle' string and 'text' or a 'texts' list")
        if not all(isinstance(t, str) for t in texts):
            raise UsageError("'texts' must be a list of strings")
        return await api.send_many(handle, texts)
    if not isinstance(handle, str) or not isinstance(text, str):
        raise UsageError("send needs 'handle' and 'text' strings")
    return await api.send(handle, text)


@_method("message")
async def _message(api: Api, params: Any) -> Any:
    msg_id = _params(params, ("id",)).get("id")
    if not isinstance(msg_id, str):
        raise UsageError("message needs an 'id' string")
    return api.message(msg_id)


@_method("inbox")
async def _inbox(api: Api, params: Any) -> Any:
    p = _params(params, ("from", "after", "limit"))
    sender, after, limit = p.get("from"), p.get("after", 0), p.get("limit", 1000)
    if sender is not None and not isinstance(sender, str):
        raise UsageError("'from' must be a handle")
    if not _is_int(after) or after < 0 or not _is_int(limit) or not 1 <= limit <= 10_000:
        raise UsageError("'after' must be a cursor >= 0 and 'limit' 1..10000")
    return api.inbox(sender=sender, after=after, limit=limit)


@_method("outbox")
async def _outbox(api: Api, params: Any) -> Any:
    limit = _params(params, ("limit",)).get("limit", 1000)
    if not _is_int(limit) or not 1 <= limit <= 10_000:
        raise UsageError("'limit' must be 1..10000")
    return api.outbox(limit=limit)


@_method("contacts")
async def _contacts(api: Api, params: Any) -> Any:
    _params(params, ())
    return api.contacts()


@_method("add_contact")
async def _add_contact(api: Api, params: Any) -> Any:
    invite = _params(params, ("invite",)).get("invite")
    if not isinstance(invite, str):
        raise UsageError("add_contact needs an 'invite' string (p2pd-invite:...)")
    return await api.add_contact(invite)


@_method("verify")
async def _verify(api: Api, params: Any) -> Any:
    p = _params(params, ("handle", "accept", "accept_new"))
    handle, accept, accept_new = p.get("handle"), p.get("accept", False), p.get("accept_new")
    if (
        not isinstance(handle, str)
        or not isinstance(accept, bool)
        or not isinstance(accept_new, str | None)
    ):
        raise UsageError(
            "verify needs a 'handle' string, an optional 'accept' boolean and an "
            "optional 'accept_new' fingerprint string"
        )
    return await api.verify(handle, accept=accept, accept_new=accept_new)


@_method("check_mailbox")
async def _check_mailbox(api: Api, params: Any) -> Any:
    _params(params, ())
    return await api.check_mailbox()


@_method("revoke_mailbox_pass")
async def _revoke_mailbox_pass(api: Api, params: Any) -> Any:
    _params(params, ())
    return await api.revoke_mailbox_pass()


@_method("peers")
async def _peers(api: Api, params: Any) -> Any:
    _params(params, ())
    return api.peers()


def _call_media(p: dict[str, Any]) -> CallMedia:
    out: dict[str, Any] = {}
    for name in ("audio_in", "video_in", "record", "audio_out"):
        value = p.get(name)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"'{name}' must be a string")
        out[name] = value
    duration = p.get("duration")
    if duration is not None and (
        not isinstance(duration, int | float) or isinstance(duration, bool)
    ):
        raise UsageError("'duration' must be a number of seconds")
    return CallMedia(**out, duration=None if duration is None else float(duration))


MEDIA_PARAMS = ("audio_in", "video_in", "record", "duration", "audio_out")


@_method("call")
async def _call(api: Api, params: Any) -> Any:
    p = _params(params, ("handle", *MEDIA_PARAMS))
    handle = p.get("handle")
    if not isinstance(handle, str):
        raise UsageError("call needs a 'handle' string")
    return await api.call(handle, _call_media(p))


@_method("answer")
async def _answer(api: Api, params: Any) -> Any:
    p = _params(params, ("wait", *MEDIA_PARAMS))
    wait = p.get("wait", 0)
    if not _is_number(wait) or not 0 <= wait <= 3600:
        raise UsageError("'wait' must be 0..3600 seconds")
    return await api.answer(wait=float(wait), media=_call_media(p))


@_method("hangup")
async def _hangup(api: Api, params: Any) -> Any:
    _params(params, ())
    return await api.hangup()


@_method("calls")
async def _calls(api: Api, params: Any) -> Any:
    _params(params, ())
    return api.calls()


@_method("send_file")
async def _send_file(api: Api, params: Any) -> Any:
    p = _params(params, ("handle", "path"))
    if not isinstance(p.get("handle"), str) or not isinstance(p.get("path"), str):
        raise UsageError("send_file needs 'handle' and 'path' strings")
    return await api.send_file(p["handle"], p["path"])


@_method("files")
async def _files(api: Api, params: Any) -> Any:
    _params(params, ())
    return api.files()


def _transfer_id(params: Any, names: tuple[str, ...] = ("id",)) -> tuple[str, dict[str, Any]]:
    p = _params(params, names)
    if not isinstance(p.get("id"), str):
        raise UsageError("needs an 'id' string (see `files`)")
    return p["id"], p


@_method("file")
async def _file(api: Api, params: Any) -> Any:
    return api.file(_transfer_id(params)[0])


@_method("accept_file")
async def _accept_file(api: Api, params: Any) -> Any:
    transfer_id, p = _transfer_id(params, ("id", "dir"))
    if p.get("dir") is not None and not isinstance(p["dir"], str):
        raise UsageError("'dir' must be a string")
    return await api.accept_file(transfer_id, p.get("dir"))


@_method("reject_file")
async def _reject_file(api: Api, params: Any) -> Any:
    return await api.reject_file(_transfer_id(params)[0])


@_method("cancel_file")
async def _cancel_file(api: Api, params: Any) -> Any:
    return await api.cancel_file(_transfer_id(params)[0])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _error(req_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": req_id, "error": error}


#: What :func:`_decode` returns for a line that is not JSON.
_NOT_JSON = object()


def _decode(line: bytes) -> Any:
    """A request line's JSON value (parsed once: the server looks for ``subscribe`` in
    it, then serves it), or _NOT_JSON."""
    try:
        return json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _NOT_JSON


async def handle_request(
    line: bytes, methods: dict[str, Callable[[Any], Awaitable[Any]]]
) -> dict[str, Any] | None:
    """One request line in, one response object out (None for a notification)."""
    return await _serve_request(_decode(line), methods)


async def _serve_request(
    request: Any, methods: dict[str, Callable[[Any], Awaitable[Any]]]
) -> dict[str, Any] | None:
    """:func:`handle_request` of a line already decoded by :func:`_decode`."""
    if request is _NOT_JSON:
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
    except Contested as exc:
        return _error(req_id, CONTESTED, exc.message, {"claims": exc.claims})
    except P2PDError as exc:
        return _error(req_id, FAILED, exc.message)
    except Exception:
        log.exception("control method %s failed", method)
        return _error(req_id, INTERNAL_ERROR, "internal error (see the daemon's log)")
    if "id" not in request:
        return None
    return {"jsonrpc": "2.0", "id": req_id, "result": result}


async def _stream_events(stream: trio.SocketStream, events: EventBus, req_id: Any) -> None:
    """After ``subscribe``: every daemon event as a JSON-RPC notification ``event``, until
    the client closes the connection (anything it sends from then on is ignored)."""

    async def watch_for_close(cancel: trio.CancelScope) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await stream.receive_some(4096):
                pass
        cancel.cancel()

    async with events.subscribe() as channel, trio.open_nursery() as nursery:
        nursery.start_soon(watch_for_close, nursery.cancel_scope)
        try:
            reply = {"jsonrpc": "2.0", "id": req_id, "result": {"subscribed": True}}
            await stream.send_all(json.dumps(reply).encode() + b"\n")
            async for event in channel:
                batch = [event]
                while len(batch) < 256:  # what else is waiting goes out in one write
                    try:
                        batch.append(channel.receive_nowait())
                    except trio.WouldBlock:
                        break
                lines = b"".join(
                    json.dumps({"jsonrpc": "2.0", "method": "event", "params": e}).encode() + b"\n"
                    for e in batch
                )
                await stream.send_all(lines)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        nursery.cancel_scope.cancel()


async def _serve_connection(
    stream: trio.SocketStream, methods: dict[str, Any], events: EventBus | None = None
) -> None:
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
                request = _decode(line)
                subscribe = _subscription(request)
                if subscribe is not None and events is not None:
                    await _stream_events(stream, events, subscribe)
                    return
                response = await _serve_request(request, methods)
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
    path: Path,
    api: Api,
    events: EventBus,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``path`` (mode 0600) and serve JSON-RPC requests to ``api``, and
    ``subscribe`` with ``events``, until cancelled."""
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
    handlers = methods(api)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                trio.serve_listeners, _connection_handler(handlers, events), [listener]
            )
            task_status.started()
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _subscription(request: Any) -> Any:
    """The request id if ``request`` (a decoded line) is a well-formed ``subscribe``
    request, else None."""
    if (
        isinstance(request, dict)
        and request.get("jsonrpc") == "2.0"
        and request.get("method") == "subscribe"
        and isinstance(request.get("id"), str | int)
        and not isinstance(request.get("id"), bool)
    ):
        return request["id"]
    return None


def _connection_handler(
    methods: dict[str, Any], events: EventBus | None
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handler(stream: trio.SocketStream) -> None:
        await _serve_connection(stream, methods, events)

    return handler
