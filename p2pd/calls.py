"""Calls: signalling as encrypted messages, media on the authenticated QUIC connection.

One call at a time per daemon. The signals are call-kind message payloads (a small
JSON object, docs/PROTOCOL.md "Call signalling"), encrypted in the ordinary session
and sent directly, each acknowledged; they are never stored and never go to a mailbox.

Caller                                 Callee
  offer {call, audio, video}  ──────>  (busy: answers busy; else ringing)
                              <──────  ringing
                              <──────  accept | reject
  media both ways (p2pd.media.CallMedia on DATAGRAM frames) until
  hangup (either side), the duration ends, or the connection dies.

A call that is not answered within ``ring_timeout`` (30 s) ends as ``no-answer`` and
the caller sends a hangup. States: ``calling``, ``ringing`` (incoming, not answered),
``active``, then one of ``ended``, ``rejected``, ``busy``, ``no-answer``, ``failed``.

The media stack (p2pd.media: PyAV, numpy, about 40 MB of a 100 MB daemon) is imported
when this daemon places or answers its first call, not when it starts: most daemons
never call. A ringing call or a stray media datagram does not load it either.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import trio

from .errors import ConnectionLost, LocalError, NotFound, P2PDError, UsageError
from .identity import DISPLAY_PREFIX, HandleRef, fingerprint
from .relay.client import is_virtual
from .transport.quic import QuicPeer

if TYPE_CHECKING:
    from .delivery import Delivery, EventBus
    from .media.call import CallMedia

log = logging.getLogger(__name__)

#: Calls remembered for `p2pd calls` after they end.
HISTORY = 20
MAX_SIGNAL = 1024
SIGNAL_TYPES = ("offer", "ringing", "accept", "reject", "busy", "hangup")
ENDED = ("ended", "rejected", "busy", "no-answer", "failed")


class CallError(LocalError):
    """A call could not be placed, answered or continued."""


class CallSummary(TypedDict):
    """A call as ``calls``, ``call``, ``answer``, ``hangup`` and the ``call`` event show
    it (docs/CONTROL_API.md)."""

    id: str
    direction: str
    handle: str
    fingerprint: str
    verified: bool
    display: str
    video: bool
    state: str
    reason: str
    created: float
    duration_s: float
    media: dict[str, Any]


@dataclass
class Call:
    id: str
    direction: str  # "out" or "in"
    handle: str
    peer_key: bytes
    video: bool  # video offered by the caller
    state: str
    created: float = field(default_factory=time.time)
    reason: str = ""
    peer: QuicPeer | None = None
    media: CallMedia | None = None
    changed: trio.Event = field(default_factory=trio.Event)
    #: The media task's, while it runs.
    scope: trio.CancelScope | None = None
    connected_at: float | None = None
    ended_at: float | None = None
    final_stats: dict[str, Any] | None = None
    #: An end while the media task runs (``scope`` set) is told (the ``call`` event)
    #: once the task has closed its sources and its recording (``_run_media``).
    end_untold: bool = False
    #: The peer's key is the pinned key of ``handle`` (always, for calls we place).
    verified: bool = True

    def set_state(self, state: str, reason: str = "") -> None:
        self.state = state
        self.reason = reason
        if state in ENDED and self.ended_at is None:
            self.ended_at = time.time()
        self.changed.set()
        self.changed = trio.Event()

    def summary(self) -> CallSummary:
        stats = self.media.statistics() if self.media is not None else self.final_stats
        end = self.ended_at or time.time()
        return {
            "id": self.id,
            "direction": self.direction,
            "handle": self.handle,
            "fingerprint": fingerprint(self.peer_key),
            "verified": self.verified,
            "display": caller_id(self.handle, self.peer_key, self.verified),
            "video": self.video,
            "state": self.state,
            "reason": self.reason,
            "created": self.created,
            "duration_s": round(end - self.connected_at, 3) if self.connected_at else 0.0,
            "media": stats or {},
        }


def caller_id(handle: str, key: bytes, verified: bool) -> str:
    """Who is calling, as `calls`, `answer` and events show it: the handle when the
    key is its pinned key, else ``claimed#<fingerprint prefix> (unverified)``, like an
    unverified message (a caller can claim any handle; only its key is proven)."""
    if verified:
        return handle
    return f"{handle}#{fingerprint(key)[:DISPLAY_PREFIX]} (unverified)"


#: Why a callee refused a call without ringing (the ``reason`` of a ``reject``).
REJECT_REASONS = {"not-a-contact": "takes calls from contacts only"}


def encode_signal(kind: str, call_id: str, **fields: Any) -> str:
    return json.dumps({"type": kind, "call": call_id, **fields}, separators=(",", ":"))


def decode_signal(text: str) -> dict[str, Any]:
    """A signal's fields; UsageError-free: raises ValueError for anything malformed."""
    if len(text) > MAX_SIGNAL:
        raise ValueError("call signal too long")
    try:
        doc = json.loads(text)
    except RecursionError:  # "[[[[..." under MAX_SIGNAL nests deeper than json can
        raise ValueError("call signal nested too deeply") from None
    if not isinstance(doc, dict) or doc.get("type") not in SIGNAL_TYPES:
        raise ValueError("not a call signal")
    call_id = doc.get("call")
    if not isinstance(call_id, str) or len(call_id) != 32 or not _is_hex(call_id):
        raise ValueError("bad call id")
    for name in ("audio", "video"):
        if name in doc and not isinstance(doc[name], bool):
            raise ValueError(f"bad {name} flag")
    reason = doc.get("reason")
    if "reason" in doc and not (isinstance(reason, str) and reason in REJECT_REASONS):
        # a reason we do not know is not shown (nor its text); not a str: a list or an
        # object (unhashable: `in` a dict raised TypeError, tests/test_fuzz_decoders.py)
        doc.pop("reason")
    return doc


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


class CallManager:
    def __init__(self, delivery: Delivery, events: EventBus) -> None:
        self.delivery = delivery
        self.events = events
        self.current: Call | None = None
        self.history: list[Call] = []
        self._nursery: trio.Nursery | None = None
        #: Set (and replaced) when a call begins: `answer` waits for one that rings.
        self._call_began = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # ---- datagrams and signals in

    def connection_opened(self, peer: QuicPeer) -> None:
        """A new connection (either way): if it is a direct one to the peer of the call
        under way over a relay, the call's media moves to it (issue 13, item 4)."""
        call = self.current
        if (
            call is None
            or call.media is None
            or call.peer is None
            or peer.public_key != call.peer_key
            or is_virtual(peer.address[0])
            or not is_virtual(call.peer.address[0])
        ):
            return  # (media not started yet: _start_media takes the best connection)
        log.info("call %s: media moves to the direct connection %s", call.id[:8], peer)
        call.peer = peer
        call.media.switch_peer(peer)

    def _best_peer(self, call: Call) -> QuicPeer | None:
        """The connection a call's media starts on: a direct one to its key if one is
        open (hole punching may have opened it while the call rang), else the call's."""
        if call.peer is not None and is_virtual(call.peer.address[0]):
            for peer in self.delivery.quic.peers():
                if peer.public_key == call.peer_key and not is_virtual(peer.address[0]):
                    return peer
        return call.peer

    def datagram_received(self, peer: QuicPeer, data: bytes) -> None:
        call = self.current
        if call is not None and call.media is not None and peer.public_key == call.peer_key:
            call.media.datagram_received(data)

    def on_signal(self, sender_key: bytes, claimed: str, peer: QuicPeer | None, text: str) -> None:
        try:
            signal = decode_signal(text)
        except ValueError as exc:
            log.info(
                "ignored a malformed call signal from %s: %s", fingerprint(sender_key)[:12], exc
            )
            return
        kind, call_id = signal["type"], signal["call"]
        call = self.current
        if kind == "offer":
            self._on_offer(sender_key, claimed, peer, call_id, signal)
            return
        if call is None or call.id != call_id or call.peer_key != sender_key:
            log.info("ignored a %s for a call that is not ours", kind)
            return
        if kind == "ringing" and call.state == "calling":
            call.set_state("calling", "ringing")
            self._emit(call)
        elif kind == "accept" and call.direction == "out" and call.state == "calling":
            call.peer = peer or call.peer
            call.set_state("accepted")
        elif kind == "reject" and call.state == "calling":
            why = REJECT_REASONS.get(signal.get("reason", ""), "rejected the call")
            self._finish(call, "rejected", f"{call.handle} {why}")
        elif kind == "busy" and call.state == "calling":
            self._finish(call, "busy", f"{call.handle} is in another call")
        elif kind == "hangup" and call.state == "ringing":
            self._finish(call, "no-answer", f"missed: {call.handle} gave up")
        elif kind == "hangup":
            self._finish(call, "ended", f"{call.handle} hung up")

    def _on_offer(
        self,
        sender_key: bytes,
        claimed: str,
        peer: QuicPeer | None,
        call_id: str,
        signal: dict[str, Any],
    ) -> None:
        contact = self.delivery.contacts.by_key(sender_key)
        # A pinned contact's handle (verified: the key is its pin), else the claimed one,
        # unverified (delivery checks it against the DHT and pins it in the background
        # as for a first message, or keeps it as evidence if the handle is pinned).
        handle = contact.handle if contact else (claimed or "unknown")
        verified = contact is not None
        if not verified and self.delivery.config.calls.allow_from == "contacts":
            # Refused without ringing; the caller is told why. Logged without secrets.
            log.info("refused a call from %s: calls from contacts only",
                     caller_id(handle, sender_key, False))  # fmt: skip
            refused = Call(call_id, "in", handle, sender_key, bool(signal.get("video")),
                           "rejected", reason="not a contact", verified=False)  # fmt: skip
            refused.ended_at = refused.created
            self.history.append(refused)
            del self.history[:-HISTORY]
            self._emit(refused)
            reject = encode_signal("reject", call_id, reason="not-a-contact")
            self._spawn(self._signal_quietly, handle, sender_key, reject)
            return
        if self.current is not None and self.current.state not in ENDED:
            self._spawn(self._signal_quietly, handle, sender_key, encode_signal("busy", call_id))
            log.info("busy: refused a call from %s", handle)
            return
        call = Call(
            call_id, "in", handle, sender_key, bool(signal.get("video")), "ringing", peer=peer,
            verified=verified,
        )  # fmt: skip
        self._begin(call)
        self._spawn(self._signal_quietly, handle, sender_key, encode_signal("ringing", call_id))
        self._spawn(self._ring_timeout, call)

    # ---- placing and answering

    async def call(
        self,
        target: str,
        *,
        audio_in: str | None,
        video_in: str | None,
        record: str | None,
        duration: float | None,
        audio_out: str | None = None,
    ) -> Call:
        """Ring ``target``; returns once the call is answered, refused or given up."""
        ref = HandleRef.parse(target)
        if self.current is not None and self.current.state not in ENDED:
            raise CallError("a call is already in progress: `p2pd hangup` first")
        await load_media()
        _check_media(audio_in, video_in, record, duration, audio_out)
        await _check_devices(audio_in, audio_out)
        contact = await self.delivery.contact_for(ref)  # the pinned key, always
        call = Call(os.urandom(16).hex(), "out", ref.handle, contact.public_key,
                    video_in is not None, "calling")  # fmt: skip
        self._begin(call)
        try:
            call.peer = await self.delivery.send_signal(
                call.handle,
                call.peer_key,
                encode_signal("offer", call.id, audio=audio_in is not None, video=call.video),
            )
        except (ConnectionLost, NotFound) as exc:
            self._finish(call, "failed", exc.message)
            return call
        ring = self.delivery.config.ring_timeout
        with trio.move_on_after(ring):
            while call.state == "calling":
                await call.changed.wait()
        if call.state == "calling":
            self._spawn(self._signal_quietly, call.handle, call.peer_key,
                        encode_signal("hangup", call.id))  # fmt: skip
            self._finish(call, "no-answer", f"{call.handle} did not answer in {ring:g} s")
        elif call.state == "accepted":
            self._start_media(call, audio_in, video_in, record, duration, audio_out)
        return call

    async def answer(
        self,
        *,
        wait: float,
        audio_in: str | None,
        video_in: str | None,
        record: str | None,
        duration: float | None,
        audio_out: str | None = None,
    ) -> Call:
        """Answer the ringing call, or wait up to ``wait`` seconds for one."""
        await load_media()
        _check_media(audio_in, video_in, record, duration, audio_out)
        await _check_devices(audio_in, audio_out)
        with trio.move_on_after(wait):
            while self.current is None or self.current.state != "ringing":
                await self._call_began.wait()
        call = self.current
        if call is None or call.state != "ringing":
            raise CallError(f"no incoming call within {wait:g} s")
        try:
            call.peer = await self.delivery.send_signal(
                call.handle, call.peer_key, encode_signal("accept", call.id)
            )
        except (ConnectionLost, NotFound) as exc:
            self._finish(call, "failed", exc.message)
            return call
        self._start_media(call, audio_in, video_in, record, duration, audio_out)
        return call

    async def hangup(self) -> Call:
        call = self.current
        if call is None or call.state in ENDED:
            raise CallError("there is no call to hang up")
        if call.state == "ringing":
            kind, state, reason = "reject", "rejected", "you rejected it"
        else:
            kind, state, reason = "hangup", "ended", "you hung up"
        self._finish(call, state, reason)
        await self._signal_quietly(call.handle, call.peer_key, encode_signal(kind, call.id))
        return call

    def calls(self) -> list[CallSummary]:
        """The current call and recent ones, newest first."""
        return [c.summary() for c in reversed(self.history)]

    # ---- internals

    def _begin(self, call: Call) -> None:
        self.current = call
        self.history.append(call)
        del self.history[:-HISTORY]
        self._emit(call)
        self._call_began.set()
        self._call_began = trio.Event()

    def _start_media(
        self,
        call: Call,
        audio_in: str | None,
        video_in: str | None,
        record: str | None,
        duration: float | None,
        audio_out: str | None = None,
    ) -> None:
        from .media.call import CallMedia  # loaded by load_media() before the call began

        call.peer = self._best_peer(call)
        assert call.peer is not None
        call.media = CallMedia(
            call.peer,
            audio_in=audio_in,
            video_in=video_in,
            record=Path(record) if record else None,
            duration=duration,
            audio_out=audio_out,
        )
        call.connected_at = time.time()
        call.set_state("active")
        self._emit(call)
        self._spawn(self._run_media, call)

    async def _run_media(self, call: Call) -> None:
        assert call.media is not None
        with trio.CancelScope() as scope:
            call.scope = scope
            try:
                await call.media.run()
            except P2PDError as exc:
                self._finish(call, "failed", exc.message)
            except Exception:
                log.exception("call media failed")
                self._finish(call, "failed", "media failure (see the daemon's log)")
            finally:
                call.scope = None
        if call.end_untold:
            # Ended (a hangup, an error) while the media ran: told now that the media
            # closed its recording. Told at once, `p2pd answer --record x.mkv` returned
            # before the file was finished, and reading it failed (a clean-clone CI run).
            call.end_untold = False
            self._emit(call)
        if call.state == "active":
            reason = call.media.statistics().get("end_reason", "")
            self._finish(call, "ended", "duration reached" if reason == "duration" else reason)
            await self._signal_quietly(call.handle, call.peer_key, encode_signal("hangup", call.id))

    async def _ring_timeout(self, call: Call) -> None:
        await trio.sleep(self.delivery.config.ring_timeout + 2)  # the caller gives up first
        if call.state == "ringing":
            self._finish(call, "no-answer", "not answered in time")

    def _finish(self, call: Call, state: str, reason: str) -> None:
        if call.state in ENDED:
            return
        if call.media is not None:
            call.final_stats = call.media.statistics()
        running = call.scope is not None
        if call.scope is not None:
            call.scope.cancel()
        call.set_state(state, reason)
        if running:
            call.end_untold = True  # _run_media tells it once the media has closed
        else:
            self._emit(call)
        log.info("call %s with %s: %s (%s)", call.id[:8], call.handle, state, reason)

    def _emit(self, call: Call) -> None:
        self.events.emit("call", **call.summary())

    async def _signal_quietly(self, handle: str, key: bytes, text: str) -> None:
        try:
            await self.delivery.send_signal(handle, key, text)
        except P2PDError as exc:
            log.info("call signal to %s not delivered: %s", handle, exc.message)

    def _spawn(self, func: Any, *args: Any) -> None:
        if self._nursery is None:
            return
        with contextlib.suppress(RuntimeError):  # the nursery is closed: shutting down
            self._nursery.start_soon(func, *args)


#: The module whose import brings in the whole media stack (PyAV, numpy, the codecs).
MEDIA_MODULE = "p2pd.media.call"


async def load_media() -> None:
    """Import the media stack, once, in a worker thread.

    The first import takes a few hundred milliseconds of CPU (PyAV's and numpy's shared
    libraries); in the trio thread that would stall every other task of the daemon (DHT
    answers, QUIC timers, other peers' messages) for as long. A thread is not cancellable,
    but the import ends by itself: it reads local files only. A media stack that does not
    load (a broken PyAV install: before, the daemon did not start) is a CallError.
    """
    if MEDIA_MODULE in sys.modules:
        return
    try:
        await trio.to_thread.run_sync(importlib.import_module, MEDIA_MODULE)
    except ImportError as exc:
        log.error("the media stack does not load: %r", exc)
        raise CallError(f"calls need PyAV and numpy, which do not load here: {exc}") from exc


def _check_media(
    audio_in: str | None,
    video_in: str | None,
    record: str | None,
    duration: float | None,
    audio_out: str | None = None,
) -> None:
    """Refuse bad media arguments before ringing anyone (CallMedia checks them again)."""
    from .media.call import check_media_args  # loaded by load_media()

    if record is not None and not Path(record).is_absolute():
        raise UsageError("the recording path must be absolute (the CLI makes it so)")
    if duration is not None and not 0 < duration <= 24 * 3600:
        raise UsageError("a call's duration must be between 0 and 24 hours")
    path = None if record is None else Path(record)
    check_media_args(audio_in, video_in, path, duration, audio_out)


async def _check_devices(audio_in: str | None, audio_out: str | None) -> None:
    """The microphone and speaker named exist (LocalError saying what to use instead).
    PortAudio lists them in a worker thread: it may take tens of milliseconds."""
    from .media.devices import check_devices  # loaded by load_media()

    await trio.to_thread.run_sync(check_devices, audio_in, audio_out)
