"""c-toxcore as a peer in scripts/bench_messages.py: the same three figures for Tox.

Two Tox instances of Debian's ``libtoxcore2`` (driven through ctypes: the benchmark only,
p2pd never loads it), on 127.0.0.1 only: IPv6, LAN discovery (broadcasts that would leave
loopback) and hole punching are switched off, and each bootstraps from the other, so
nothing is sent anywhere else. Each instance runs in a thread of its own that does what a
Tox client does: ``tox_iterate``, then sleeps ``tox_iteration_interval`` (about 50 ms
idle); sends are handed to that thread, because a Tox is not thread-safe, and wake it (a
client sends at once, not at its next iteration).

What is measured, against p2pd's rows of the same run:

- first contact: ``tox_friend_add`` on alice until alice sees bob connected (bob accepts
  the friend request at once), with a fresh pair each time;
- latency: one message at a time, from ``tox_friend_send_message`` until bob's echo of it
  reaches alice (bob's client sends it back from its message callback: a round trip, as
  the issue measured it), and until alice's read receipt (Tox's acknowledgement that
  bob's client got it; net_crypto sends those acknowledgements on its own schedule, so
  they come later; neither is durable);
- throughput: a burst of messages handed to Tox as fast as it takes them, until bob has
  received them all or the deadline passes; a message bob never receives counts as lost
  (a send that Tox refused outright is counted apart). Tox keeps its queue in memory: a
  crash loses it, so this figure is not durable, unlike p2pd's.

``load()`` returns None where the library is not installed (``apt install libtoxcore2``);
the benchmark then prints that and goes on. Every loop is bounded in count and time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LIBRARY_NAMES = ("libtoxcore.so.2", "toxcore")
ADDRESS_SIZE = 38
PUBLIC_KEY_SIZE = 32
MESSAGE_NORMAL = 0
CONNECTION_NONE = 0
#: tox_friend_send_message's error for "the send queue is full" (TOX_ERR_FRIEND_SEND_MESSAGE_SENDQ).
ERR_SENDQ = 4
#: A loop thread runs at most this long.
MAX_THREAD_SECONDS = 900.0
#: Commands a loop thread takes per iteration, at most.
MAX_COMMANDS_PER_ITERATION = 10_000

_REQUEST_CB = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p
)
_CONNECTION_CB = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p
)
_MESSAGE_CB = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p,
    ctypes.c_uint32,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
)
_RECEIPT_CB = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p
)


def load() -> ctypes.CDLL | None:
    """The toxcore library, or None where it is not installed."""
    for name in LIBRARY_NAMES:
        path = ctypes.util.find_library(name) if "." not in name else name
        if not path:
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        _declare(lib)
        return lib
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p, u8p, err = ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "tox_options_new": (p, [err]),
        "tox_options_free": (None, [p]),
        "tox_options_set_ipv6_enabled": (None, [p, ctypes.c_bool]),
        "tox_options_set_udp_enabled": (None, [p, ctypes.c_bool]),
        "tox_options_set_local_discovery_enabled": (None, [p, ctypes.c_bool]),
        "tox_options_set_hole_punching_enabled": (None, [p, ctypes.c_bool]),
        "tox_new": (p, [p, err]),
        "tox_kill": (None, [p]),
        "tox_self_get_address": (None, [p, u8p]),
        "tox_self_get_public_key": (None, [p, u8p]),
        "tox_self_get_dht_id": (None, [p, u8p]),
        "tox_self_get_udp_port": (ctypes.c_uint16, [p, err]),
        "tox_bootstrap": (ctypes.c_bool, [p, ctypes.c_char_p, ctypes.c_uint16, u8p, err]),
        "tox_friend_add": (ctypes.c_uint32, [p, u8p, u8p, ctypes.c_size_t, err]),
        "tox_friend_add_norequest": (ctypes.c_uint32, [p, u8p, err]),
        "tox_friend_send_message": (
            ctypes.c_uint32,
            [p, ctypes.c_uint32, ctypes.c_int, u8p, ctypes.c_size_t, err],
        ),
        "tox_iterate": (None, [p, p]),
        "tox_iteration_interval": (ctypes.c_uint32, [p]),
        "tox_callback_friend_request": (None, [p, _REQUEST_CB]),
        "tox_callback_friend_connection_status": (None, [p, _CONNECTION_CB]),
        "tox_callback_friend_message": (None, [p, _MESSAGE_CB]),
        "tox_callback_friend_read_receipt": (None, [p, _RECEIPT_CB]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


@dataclass
class ToxPeer:
    """One Tox instance and the thread that iterates it."""

    lib: ctypes.CDLL
    name: str
    accept_requests: bool = True
    echo: bool = False
    tox: int = 0
    commands: queue.SimpleQueue[Callable[[], None]] = field(default_factory=queue.SimpleQueue)
    connected_at: float | None = None
    received: int = 0
    last_received_at: float | None = None
    receipts: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _callbacks: list[Any] = field(default_factory=list)

    def start(self) -> None:
        lib, error = self.lib, ctypes.c_int(0)
        options = lib.tox_options_new(ctypes.byref(error))
        if not options:
            raise RuntimeError(f"tox_options_new failed ({error.value})")
        try:
            lib.tox_options_set_ipv6_enabled(options, False)
            lib.tox_options_set_udp_enabled(options, True)
            lib.tox_options_set_local_discovery_enabled(options, False)
            lib.tox_options_set_hole_punching_enabled(options, False)
            self.tox = lib.tox_new(options, ctypes.byref(error))
        finally:
            lib.tox_options_free(options)
        if not self.tox:
            raise RuntimeError(f"tox_new failed ({error.value})")
        self._callbacks = [
            _REQUEST_CB(self._on_request),
            _CONNECTION_CB(self._on_connection),
            _MESSAGE_CB(self._on_message),
            _RECEIPT_CB(self._on_receipt),
        ]
        lib.tox_callback_friend_request(self.tox, self._callbacks[0])
        lib.tox_callback_friend_connection_status(self.tox, self._callbacks[1])
        lib.tox_callback_friend_message(self.tox, self._callbacks[2])
        lib.tox_callback_friend_read_receipt(self.tox, self._callbacks[3])
        self._thread = threading.Thread(target=self._loop, name=f"tox-{self.name}", daemon=True)
        self._thread.start()

    # Identity (read before the loop has run, or through a command).

    def address(self) -> bytes:
        buf = ctypes.create_string_buffer(ADDRESS_SIZE)
        self.lib.tox_self_get_address(self.tox, buf)
        return buf.raw

    def dht_id(self) -> bytes:
        buf = ctypes.create_string_buffer(PUBLIC_KEY_SIZE)
        self.lib.tox_self_get_dht_id(self.tox, buf)
        return buf.raw

    def udp_port(self) -> int:
        error = ctypes.c_int(0)
        port = int(self.lib.tox_self_get_udp_port(self.tox, ctypes.byref(error)))
        if error.value:
            raise RuntimeError(f"tox_self_get_udp_port failed ({error.value})")
        return port

    # Commands, run in the loop thread.

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` in the loop thread; its result."""
        done = threading.Event()
        box: list[Any] = []

        def command() -> None:
            try:
                box.append(("ok", fn()))
            except Exception as exc:  # handed back to the caller
                box.append(("error", exc))
            done.set()

        self.commands.put(command)
        self._wake.set()  # a client sends at once, not at its next iteration
        if not done.wait(timeout):
            raise TimeoutError(f"tox {self.name}: a command took over {timeout} s")
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def bootstrap(self, port: int, dht_id: bytes) -> None:
        error = ctypes.c_int(0)
        ok = self.lib.tox_bootstrap(self.tox, b"127.0.0.1", port, dht_id, ctypes.byref(error))
        if not ok:
            raise RuntimeError(f"tox_bootstrap failed ({error.value})")

    def add_friend(self, address: bytes) -> int:
        error, hello = ctypes.c_int(0), b"hello from the benchmark"
        number = self.lib.tox_friend_add(self.tox, address, hello, len(hello), ctypes.byref(error))
        if error.value:
            raise RuntimeError(f"tox_friend_add failed ({error.value})")
        return int(number)

    def send(self, friend: int, text: bytes) -> int | None:
        """A message id, or None when Tox refused the message (its queue is full)."""
        error = ctypes.c_int(0)
        mid = self.lib.tox_friend_send_message(
            self.tox, friend, MESSAGE_NORMAL, text, len(text), ctypes.byref(error)
        )
        if error.value == ERR_SENDQ:
            return None
        if error.value:
            raise RuntimeError(f"tox_friend_send_message failed ({error.value})")
        return int(mid)

    # Callbacks (called by tox_iterate, in the loop thread).

    def _on_request(self, _tox: Any, public_key: Any, _msg: Any, _len: int, _ud: Any) -> None:
        if self.accept_requests:
            error = ctypes.c_int(0)
            key = ctypes.string_at(public_key, PUBLIC_KEY_SIZE)
            self.lib.tox_friend_add_norequest(self.tox, key, ctypes.byref(error))

    def _on_connection(self, _tox: Any, _friend: int, status: int, _ud: Any) -> None:
        if status != CONNECTION_NONE and self.connected_at is None:
            self.connected_at = time.monotonic()

    def _on_message(
        self, _tox: Any, friend: int, _kind: int, message: Any, length: int, _ud: Any
    ) -> None:
        self.received += 1
        self.last_received_at = time.monotonic()
        if self.echo:
            self.send(friend, ctypes.string_at(message, length))

    def _on_receipt(self, _tox: Any, _friend: int, message_id: int, _ud: Any) -> None:
        self.receipts[int(message_id)] = time.monotonic()

    def _loop(self) -> None:
        ends = time.monotonic() + MAX_THREAD_SECONDS
        while not self._stop.is_set() and time.monotonic() < ends:
            for _ in range(MAX_COMMANDS_PER_ITERATION):
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    break
                command()
            self.lib.tox_iterate(self.tox, None)
            self._wake.wait(self.lib.tox_iteration_interval(self.tox) / 1000)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.tox and (self._thread is None or not self._thread.is_alive()):
            self.lib.tox_kill(self.tox)
            self.tox = 0


def _wait_for(check: Callable[[], bool], deadline: float, step: float = 0.005) -> bool:
    for _ in range(int(600 / step)):  # bounded by count as well as by the deadline
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return False


def _pair(lib: ctypes.CDLL) -> tuple[ToxPeer, ToxPeer, int, float]:
    """A fresh alice and bob, friends: (alice, bob, bob's friend number at alice,
    seconds from friend request to alice seeing bob connected, or -1 if never in 60 s)."""
    alice, bob = ToxPeer(lib, "alice", accept_requests=False), ToxPeer(lib, "bob")
    alice.start()
    bob.start()
    bob_port, bob_dht = bob.call(bob.udp_port), bob.call(bob.dht_id)
    alice_port, alice_dht = alice.call(alice.udp_port), alice.call(alice.dht_id)
    alice.call(lambda: alice.bootstrap(bob_port, bob_dht))
    bob.call(lambda: bob.bootstrap(alice_port, alice_dht))
    bob_address = bob.call(bob.address)
    t0 = time.monotonic()
    friend = alice.call(lambda: alice.add_friend(bob_address))
    ok = _wait_for(lambda: alice.connected_at is not None, t0 + 60, 0.01)
    seconds = (alice.connected_at or t0) - t0 if ok else -1.0
    return alice, bob, friend, seconds


def run(
    lib: ctypes.CDLL,
    *,
    samples: int,
    messages: int,
    first_contact: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Tox's figures: first contact, one-at-a-time latency, a burst's throughput."""
    result: dict[str, Any] = {"library": "libtoxcore.so.2"}
    firsts: list[float] = []
    for i in range(max(first_contact, 1)):
        progress(f"tox: first contact {i + 1}/{max(first_contact, 1)}")
        alice, bob, friend, seconds = _pair(lib)
        if seconds >= 0:
            firsts.append(seconds)
        if i + 1 < max(first_contact, 1) or seconds < 0:
            alice.stop()
            bob.stop()
    result["first_contact_s"] = sorted(firsts)
    result["first_contact_failed"] = max(first_contact, 1) - len(firsts)
    if not firsts:
        return result

    progress(f"tox: {samples} messages one at a time, each echoed by bob")
    latencies: list[float] = []
    receipts: list[float] = []
    lost = 0
    bob.echo = True
    for i in range(samples):
        text = f"bench message {i:06d}: the quick brown fox jumps over the lazy dog".encode()
        before = alice.received
        t0 = time.monotonic()
        mid = alice.call(lambda text=text: alice.send(friend, text))
        if mid is None or not _wait_for(lambda before=before: alice.received > before, t0 + 30):
            lost += 1
            continue
        latencies.append((alice.last_received_at or t0) - t0)
        if _wait_for(lambda mid=mid: mid in alice.receipts, t0 + 5):
            receipts.append(alice.receipts[mid] - t0)
    bob.echo = False
    result["round_trip_ms"] = sorted(round(x * 1000, 3) for x in latencies)
    result["receipt_ms"] = sorted(round(x * 1000, 3) for x in receipts)
    result["latency_lost"] = lost

    progress(f"tox: a burst of {messages} messages")
    received_before, refused = bob.received, 0
    t0 = time.monotonic()

    def burst() -> int:
        nonlocal refused
        for i in range(messages):
            text = f"bench message {i:06d}: the quick brown fox jumps over the lazy dog"
            if alice.send(friend, text.encode()) is None:
                refused += 1
        return messages - refused

    accepted = alice.call(burst, timeout=120)
    handed = time.monotonic() - t0
    _wait_for(lambda: bob.received - received_before >= accepted, t0 + 60 + messages * 0.01)
    got = bob.received - received_before
    seconds = (bob.last_received_at or t0) - t0
    result["burst"] = {
        "messages": messages,
        "accepted": accepted,
        "refused_by_tox": refused,
        "received": got,
        "lost": accepted - got,
        "seconds": round(seconds, 3),
        "handed_over_s": round(handed, 3),
        "msgs_per_s": round(got / seconds, 1) if seconds > 0 else None,
    }
    alice.stop()
    bob.stop()
    return result
