"""The delivery service's own trio code (p2pd/delivery/service.py: its workers, the one
timer, ``_dispatch``'s wake-ups, the readers of each batch) under trio's MockClock,
against a fake QUIC peer and DHT: issue 9's lost wake-up, looked for where the
hypothesis test over the core (test_delivery_core_fuzz) cannot see it, since that test
models the service's wake-ups as they should work.

bob is a :class:`~p2pd.testing.delivery_pair.Side` (a real core, real sessions) behind
a seeded fake network: each stream's bytes and its answers are delayed, sometimes
lost; a batch larger than the send buffer waits to be written; bob is killed (his
connection goes silent until alice closes it or it idles out) and restarted, at times
without his sessions (NACK, a new session, a fresh record lookup); the record lookup,
connect and mailbox puts take time, and what was left in bob's mailbox is acked on a
stream of his own; call signals go on streams of their own (their ends wake the
conversation's worker for nothing); bob writes to alice (what she owes him becomes
due). trio's own scheduling order is seeded too (keys and message ids are not).

What each run checks, besides everything delivered once and in order:

- (a) never two workers for one conversation at once (a worker that ends while a new
  one starts would leave one waiting on a wake event nobody sets);
- (b)/(c) no wake-up lost: ``wakeups_lost`` stays 0, i.e. a worker that waited
  ``WAIT_RECHECK`` without being woken never found work (whether the event was set on
  a wake object that was replaced, or the core's next deadline missed a state), and
  whenever every task is blocked, a worker in WAIT has its event set or the core a
  deadline.
"""

from __future__ import annotations

import random
import sqlite3
import types
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from p2pd import wire
from p2pd.config import NodeConfig
from p2pd.delivery import mailbox as mailbox_module
from p2pd.delivery import service
from p2pd.delivery.events import AckOwed, Event, SendDue
from p2pd.delivery.service import Delivery, EventBus
from p2pd.errors import ConnectionLost, NotFound
from p2pd.identity import HandleRef, Identity
from p2pd.messaging import DELIVERED, Contacts
from p2pd.records import HandleRecord
from p2pd.session import SessionManager
from p2pd.store import open_database
from p2pd.testing.delivery_pair import Side
from p2pd.transport.quic import QuicPeer
from p2pd.wire import Address

WALL = 1_800_000_000.0
ACK_TIMEOUT = 2.0
CONNECT_TIMEOUT = 1.0


class Broken(ConnectionLost, trio.BrokenResourceError):
    """As p2pd/transport/quic/stream.py's StreamBroken."""


class FakeStream(trio.abc.HalfCloseableStream):
    """alice's end of one stream: what she writes goes to the network, answers come back
    through :meth:`feed`."""

    def __init__(self, conn: FakePeer) -> None:
        self.conn = conn
        self._recv = bytearray()
        self._eof = False
        self._error: ConnectionLost | None = None
        self._closed = False
        self._changed = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview, *, eof: bool = False) -> None:
        net = self.conn.net
        if len(data) > 16_000:  # more than the send buffer: wait for its acks first
            await trio.sleep(net.rng.uniform(1.0, 3.0) * net.latency)
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._error is not None:
            raise Broken(str(self._error))
        net.carry(self, bytes(data))
        # (QuicStream.send_all flushes the packet, then yields: an answer may come back
        # before the writer runs again)
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        for _ in range(10_000):
            if self._closed:
                raise trio.ClosedResourceError("stream closed")
            if self._recv:
                data = bytes(self._recv)
                self._recv.clear()
                return data
            if self._eof:
                return b""
            if self._error is not None:
                raise Broken(str(self._error))
            self._changed = trio.Event()
            await self._changed.wait()
        raise AssertionError("receive_some looped 10,000 times")

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._recv

    def feed(self, data: bytes, eof: bool) -> None:
        self._recv += data
        self._eof = self._eof or eof
        self._changed.set()

    def broken(self, error: ConnectionLost) -> None:
        if not self._eof:
            self._error = error
        self._changed.set()

    def reset(self) -> None:
        self._closed = True
        self._changed.set()

    async def aclose(self) -> None:
        self._closed = True
        self._changed.set()
        await trio.lowlevel.checkpoint()


class FakePeer:
    """alice's connection to bob: ``works`` is False once bob was killed (alice does not
    know; her streams on it go silent until she closes it)."""

    def __init__(self, net: Net, number: int) -> None:
        self.net = net
        self.number = number
        self.public_key = net.bob.key
        self.address = ("127.0.0.1", 4000 + number)
        self.is_closing = False
        self.works = True
        self.streams: list[FakeStream] = []

    async def open_stream(self) -> FakeStream:
        await trio.lowlevel.checkpoint()
        if self.is_closing:
            raise Broken("connection closed")
        stream = FakeStream(self)
        self.streams.append(stream)
        return stream

    def close(self, reason: str = "") -> None:
        if self.is_closing:
            return
        self.is_closing = True
        self.net.log.append(f"{trio.current_time():.3f} alice closes #{self.number}: {reason}")
        for stream in self.streams:
            stream.broken(ConnectionLost(f"closed by us: {reason}"))


class Net:
    """The seeded network between alice's service and bob's core, in virtual time."""

    def __init__(
        self, rng: random.Random, nursery: trio.Nursery, bob: Side, loss: float, latency: float
    ) -> None:
        self.rng = rng
        self.nursery = nursery
        self.bob = bob
        self.loss = loss
        #: one way, on average (loopback under load: about a millisecond)
        self.latency = latency
        self.bob_up = True
        self.conn: FakePeer | None = None
        self.conns = 0
        self.store_lost = False
        self.log: list[str] = []

    def carry(self, stream: FakeStream, data: bytes) -> None:
        """alice wrote ``data`` (a whole batch, with FIN) on ``stream``."""
        if not stream.conn.works or self.rng.random() < self.loss:
            return
        delay = self.rng.uniform(0.1, 1.9) * self.latency
        self.nursery.start_soon(self._to_bob, stream, data, delay)

    async def _to_bob(self, stream: FakeStream, data: bytes, delay: float) -> None:
        await trio.sleep(delay)
        if not stream.conn.works:
            return
        now = WALL + trio.current_time()
        reader = self.bob.core.accept_stream(stream.conn.net.alice_key)
        result = reader.data_received(data, now)
        self.bob.commit()
        if not result.replies or self.rng.random() < self.loss:
            return
        # bob answers frame by frame at times, in one write at others
        parts = [result.replies]
        if self.rng.random() < 0.5:
            parts = wire_frames(result.replies)
        for n, part in enumerate(parts):
            await trio.sleep(self.rng.uniform(0.1, 1.9) * self.latency / len(parts))
            if not stream.conn.works:
                return
            stream.feed(part, eof=n == len(parts) - 1)

    alice_key: bytes = b""

    async def connect(self, peer_key: bytes, record: HandleRecord | None) -> FakePeer | None:
        """As Paths.connect: the open connection, else a new one if bob is up."""
        if self.conn is not None and not self.conn.is_closing:
            return self.conn
        if not self.bob_up:
            await trio.sleep(CONNECT_TIMEOUT)
            return None
        await trio.sleep(self.rng.uniform(0.001, 0.03))
        if self.conn is not None and not self.conn.is_closing:
            return self.conn
        if not self.bob_up:
            return None
        self.conns += 1
        self.conn = FakePeer(self, self.conns)
        return self.conn

    def kill_bob(self) -> None:
        self.log.append(f"{trio.current_time():.3f} kill bob")
        self.bob_up = False
        if self.conn is not None:
            self.conn.works = False
            self.nursery.start_soon(self._idle_timeout, self.conn, self.rng.uniform(0.5, 5.0))

    async def _idle_timeout(self, conn: FakePeer, after: float) -> None:
        await trio.sleep(after)
        if not conn.works:
            conn.close("idle timeout")

    def restart_bob(self, lose_connection: bool, lose_store: bool) -> None:
        self.log.append(f"{trio.current_time():.3f} restart bob")
        self.bob_up = True
        if lose_store:  # a new bob: alice's session is unknown to him (NACK, reset)
            self.bob = Side.new(self.bob.identity, WALL + trio.current_time())
            self.store_lost = True
        if self.conn is not None and lose_connection:
            self.conn.close("peer restarted")


def wire_frames(data: bytes) -> list[bytes]:
    return [wire.encode_stream_frame(k, p) for k, p in wire.StreamFrameDecoder().feed(data)]


class FakeDHT:
    """What delivery asks of the DHT: bob's record (a fresh bundle), slow mailbox puts,
    an empty mailbox of ours."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.net: Net | None = None
        self.puts = 0
        #: What waits in bob's mailbox (plaintexts: the sealing is the DHT's).
        self.held: list[bytes] = []

    async def resolve(self, ref: HandleRef) -> HandleRecord:
        await trio.sleep(self.rng.uniform(0.0, 0.02))
        if ref.handle != "bob" or self.net is None:
            raise NotFound("no such handle")
        bob = self.net.bob  # the bob of now (a restart may have lost his prekeys)
        return HandleRecord.create(
            bob.identity, [Address("127.0.0.1", 4000)], seq=1,
            now=int(WALL + trio.current_time()), lifetime=86400,
            extension=bob.sessions.prekey_bundle(),
        )  # fmt: skip

    async def mailbox_put(self, owner: bytes, plaintext: bytes) -> int:
        await trio.sleep(self.rng.uniform(0.05, 0.8))
        self.puts += 1
        copies = self.rng.choice([0, 2])
        if copies:
            self.held.append(plaintext)
        return copies

    async def mailbox_fetch(self, identity: Identity) -> list[tuple[bytes, bytes]]:
        await trio.lowlevel.checkpoint()
        return []

    async def mailbox_delete(self, identity: Identity, ids: list[bytes]) -> None:
        await trio.lowlevel.checkpoint()


class Probe(Delivery):
    """The service as it is, counting its workers per conversation (hypothesis a)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.running: dict[bytes, int] = {}
        self.most_at_once = 0
        self.workers_started = 0
        self.seen: Counter[str] = Counter()

    def _dispatch(self, events: Sequence[Event], peer: QuicPeer | None = None) -> None:
        self.seen.update(type(event).__name__ for event in events)
        super()._dispatch(events, peer)

    async def _worker(self, peer_key: bytes) -> None:
        self.running[peer_key] = self.running.get(peer_key, 0) + 1
        self.workers_started += 1
        self.most_at_once = max(self.most_at_once, self.running[peer_key])
        try:
            await super()._worker(peer_key)
        finally:
            self.running[peer_key] -= 1


@pytest.fixture()
def virtual_wall(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The service reads wall time (time.time) for the core and trio's clock for its
    timer; under MockClock both must move together."""
    fake = types.SimpleNamespace(time=lambda: WALL + trio.current_time())
    monkeypatch.setattr(service, "time", fake)
    monkeypatch.setattr(mailbox_module, "time", fake)
    yield


@asynccontextmanager
async def alice_and_bob(
    seed: int, tmp: Path, *, loss: float, latency: float, probe: type[Probe] = Probe
) -> AsyncIterator[tuple[Probe, Net, Side, FakeDHT]]:
    rng = random.Random(seed)
    alice_id, bob_id = Identity.generate("alice"), Identity.generate("bob")
    bob = Side.new(bob_id, WALL)
    conn: sqlite3.Connection = open_database(None)
    contacts = Contacts(conn)
    contacts.pin("bob", bob.key, WALL)
    sessions = SessionManager.open(conn, alice_id, now=WALL)
    dht = FakeDHT(rng)
    config = NodeConfig(
        home=tmp, ack_timeout=ACK_TIMEOUT, connect_timeout=CONNECT_TIMEOUT,
        mailbox_poll_interval=30.0,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        net = Net(rng, nursery, bob, loss, latency)
        net.alice_key = alice_id.public_key
        dht.net = net
        delivery = probe(
            config, alice_id, conn, dht, EventBus(),  # type: ignore[arg-type]
            quic=None, sessions=sessions, contacts=contacts,  # type: ignore[arg-type]
            lan_addresses=lambda key: [], on_signal=lambda *signal: None,
        )  # fmt: skip
        delivery.paths = net  # type: ignore[assignment]
        await nursery.start(delivery.run)
        yield delivery, net, bob, dht
        nursery.cancel_scope.cancel()


def quiet_check(delivery: Probe) -> str | None:
    """With every task blocked: a worker in WAIT has its wake event set, or the core
    something scheduled that will set it, as ``p2pd status --json`` shows it
    (``messages.schedule``). None if so, else the schedule."""
    schedule = delivery.debug_state()
    for row in schedule["conversations"]:
        if row["worker"] == "wait" and not row["wake_set"] and schedule["core_next_in"] is None:
            return f"a worker waits with nothing to wake it: {schedule}"
    return None


async def burst(
    seed: int, tmp: Path, *, count: int, gap: float, loss: float, latency: float,
    outages: int, signals: int, from_bob: int, lose_sessions: bool, down_for: float,
    probe: type[Probe] = Probe,
) -> tuple[Probe, Net]:  # fmt: skip
    """One run: ``count`` messages queued one ``send`` at a time (or a few together)
    ``gap`` apart on average; returns once all are delivered (bounded in virtual time)."""
    async with alice_and_bob(seed, tmp, loss=loss, latency=latency, probe=probe) as (
        delivery,
        net,
        _,
        dht,
    ):
        rng = random.Random(seed * 7 + 1)
        texts = [f"m{i:03d}" for i in range(count)]
        span = count * gap / 1.5  # about how long the sends take (1.5 a call)

        async def sends() -> None:
            todo = list(texts)
            while todo:
                take = [todo.pop(0) for _ in range(min(len(todo), rng.choice([1, 1, 1, 3])))]
                await delivery.send_many("bob", take)
                await trio.sleep(rng.expovariate(1 / gap))

        async def outage() -> None:
            await trio.sleep(rng.uniform(0, span * 0.8))  # with messages still to come
            if net.bob_up:
                net.kill_bob()
                # down long enough (down_for) for the batch in flight to time out and a
                # connect to fail: what follows goes to his mailbox meanwhile
                await trio.sleep(down_for or rng.uniform(0.1, 6.0))
                net.restart_bob(
                    lose_connection=rng.random() < 0.5,
                    lose_store=lose_sessions,
                )

        async def signal() -> None:
            await trio.sleep(rng.uniform(0, span))
            with suppress(ConnectionLost):
                await delivery.send_signal("bob", net.bob.key, "call signal")

        async def bob_writes(n: int) -> None:
            await trio.sleep(rng.uniform(0, span))
            if not net.bob_up:
                return
            now, bob = WALL + trio.current_time(), net.bob
            (message,) = bob.messages.enqueue_many("alice", net.alice_key, [f"b{n}"], now)
            ready = bob.core.prepare(
                net.alice_key, [message], delivery.sessions.prekey_bundle(), now
            )
            bob.commit()
            exchange = bob.core.start_exchange(net.alice_key, ready, now)
            peer = FakePeer(net, 1000 + n)
            stream = FakeStream(peer)
            stream.feed(exchange.data, eof=True)
            await delivery.handle_stream(peer, stream)  # type: ignore[arg-type]

        async def bob_polls() -> None:
            """bob's mailbox poll: what alice left there is stored, and acked directly,
            on a stream of his own (MailboxCourier._send_acks), as bob's daemon does."""
            for n in range(10_000):
                await trio.sleep(rng.uniform(0.5, 3.0))
                if not net.bob_up or not dht.held:
                    continue
                now, bob = WALL + trio.current_time(), net.bob
                owed = []
                for plain in dht.held:
                    owed += bob.core.mailbox_entry_opened(plain, now)
                bob.commit()
                dht.held.clear()
                acks = b"".join(
                    wire.encode_stream_frame(wire.FRAME_ACK, e.msg_id)
                    for e in owed
                    if isinstance(e, AckOwed)
                )
                if acks:
                    peer = FakePeer(net, 2000 + n)
                    stream = FakeStream(peer)
                    stream.feed(acks, eof=True)
                    runs.start_soon(delivery.handle_stream, peer, stream)

        async def watch() -> None:
            for _ in range(1_000_000):
                await trio.testing.wait_all_tasks_blocked()
                problem = quiet_check(delivery)
                assert problem is None, f"{problem}; {net.log[-8:]}"
                await trio.sleep(0.25)  # a lost wake-up lasts WAIT_RECHECK (2 s)

        def all_delivered() -> bool:
            out = delivery.messages.outbox()
            return len(out) == count and all(m.state == DELIVERED for m in out)

        async with trio.open_nursery() as runs:
            runs.start_soon(sends)
            runs.start_soon(watch)
            runs.start_soon(bob_polls)
            for _ in range(outages):
                runs.start_soon(outage)
            for _ in range(signals):
                runs.start_soon(signal)
            for n in range(from_bob):
                runs.start_soon(bob_writes, n)
            with trio.move_on_after(600.0):  # virtual seconds
                while not all_delivered():
                    await trio.sleep(0.25)
            runs.cancel_scope.cancel()
        delivered = all_delivered()
        assert delivered, (
            f"not all delivered in 600 virtual seconds: {delivery.debug_state()}; {net.log[-8:]}"
        )
        if not net.store_lost:  # each once, in order
            assert [m.text for _, m in net.bob.messages.inbox()] == texts
        return delivery, net


#: (seed, parameters, what the case must have made happen: events alice's service
#: dispatched, or its counters). Each case also runs with trio's scheduling seeded.
CASES = [
    # one send call per message on a fast link: batches gather behind the one in flight
    # and go at SendDue (the wait the stall's dump showed)
    (1, dict(count=200, gap=0.002, loss=0.0, latency=0.0005), ["SendDue"]),
    # a lossy link, call signals (their ends wake the worker for nothing), bob writing
    (2, dict(count=60, gap=0.003, loss=0.2, latency=0.003, signals=3, from_bob=2),
     ["MessageReceived", "PendingMadeDue"]),
    # bob killed twice: a silent connection closed, connects that fail, mailbox puts
    # acked later on a stream of bob's
    (3, dict(count=120, gap=0.003, loss=0.0, latency=0.003, outages=1, down_for=5.0),
     ["sent_mailbox", "ExchangeEnded"]),
    # bob restarted without his sessions: NACK, a new session, a fresh record lookup
    (4, dict(count=60, gap=0.003, loss=0.05, latency=0.003, outages=1, lose_sessions=True,
             down_for=1.0), ["SessionReset"]),
    # a slow link and bursts: batches larger than the send buffer wait to be written
    (5, dict(count=300, gap=0.0002, loss=0.2, latency=0.03, signals=3), []),
    # everything at once
    (6, dict(count=200, gap=0.002, loss=0.05, latency=0.0005, outages=2, signals=3,
             from_bob=2, lose_sessions=True), []),
    (7, dict(count=60, gap=0.02, loss=0.2, latency=0.03, outages=1, signals=3, from_bob=2),
     []),
]  # fmt: skip


@pytest.mark.parametrize(("seed", "params", "happened"), CASES)
def test_the_service_loses_no_wake_up_and_runs_one_worker_per_conversation(
    seed: int, params: dict[str, Any], happened: list[str], tmp_path: Path, virtual_wall: None
) -> None:
    """The service's own workers, timer and wake-ups through each case (see CASES): all
    delivered (once and in order while bob kept his store), never two workers for one
    conversation, no wake-up lost (``wakeups_lost`` 0, and never a waiting worker with
    nothing to wake it: checked whenever every task is blocked)."""
    trio._core._run._r.seed(seed)  # trio's own shuffling of each batch of tasks
    full = dict(outages=0, signals=0, from_bob=0, lose_sessions=False, down_for=0.0) | params

    async def main() -> tuple[Probe, Net]:
        return await burst(seed, tmp_path, **full)

    delivery, net = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert delivery.most_at_once == 1, "two workers for one conversation at once"
    assert delivery.stats["wakeups_lost"] == 0, net.log[-8:]
    for what in happened:  # the case did what it is there for
        assert delivery.seen[what] or delivery.stats.get(what), (what, delivery.seen)


class LosesSendDue(Probe):
    """The service with one wake-up taken away: SendDue reaches no worker."""

    def _dispatch(self, events: Sequence[Event], peer: QuicPeer | None = None) -> None:
        super()._dispatch([e for e in events if not isinstance(e, SendDue)], peer)


def test_a_lost_wake_up_is_caught_with_the_schedule_the_stall_showed(
    tmp_path: Path, virtual_wall: None
) -> None:
    """The checks above can fail: with SendDue lost, the first case's worker waits with
    nothing to wake it, and the schedule is the one issue 9's stall left (held, no
    exchange open, the gathering start and the queued-while-taken flag set)."""
    seed, params, _ = CASES[0]
    trio._core._run._r.seed(seed)
    full = dict(outages=0, signals=0, from_bob=0, lose_sessions=False, down_for=0.0) | params

    async def main() -> tuple[Probe, Net]:
        return await burst(seed, tmp_path, **full, probe=LosesSendDue)

    with pytest.raises(BaseExceptionGroup) as caught:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert caught.group_contains(AssertionError, match="nothing to wake it", depth=None)
    assert caught.group_contains(AssertionError, match="'queued_since_taken': True", depth=None)
    assert caught.group_contains(AssertionError, match="'exchanges': \\[\\]", depth=None)
