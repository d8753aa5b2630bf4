"""Delivery's sans-I/O core under random interleavings (hypothesis), driven the way the
trio service drives it (p2pd/delivery/service.py), awaits included: the worker's record
lookup, connect, write and mailbox put each take time, during which the timer fires,
answers arrive and messages are queued; a write can fail (the exchange ends unwritten
and the connection is closed); an unreachable peer gets the mailbox. bob is killed and
restarted at random (a kill leaves alice's connection open and silent until she closes
it), and a restart may lose his sessions (his NACK resets alice's).

The invariant (issue 9, a burst that stopped moving): at every step, a conversation
with messages pending has something that will move it (a worker that runs or will be
woken, or the timer); and once bob stays up, everything is delivered, each message once
and in order (unless a restart lost bob's store). Bounded: at most 30,000 steps a case.
"""

from __future__ import annotations

import random
from collections.abc import Generator
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pd.delivery.core import PREPARE, WAIT, DeliveryCore, Exchange
from p2pd.delivery.events import (
    DeliveryDue,
    Event,
    ExchangeEnded,
    PrepareDue,
    RetryDue,
    SendDue,
)
from p2pd.delivery.mailbox import MAILBOX_PHASE
from p2pd.messaging import DELIVERED
from p2pd.testing.delivery_pair import ACK_TIMEOUT, Pair, Side, frames_of

#: What a worker coroutine yields: ("sleep", seconds), ("wait",) for a wake-up, or
#: ("drain",) once it returned and waits for the readers of its exchanges.
Await = tuple[object, ...]


@dataclass
class Reader:
    exchange: Exchange
    conn: int
    done: bool = False


@dataclass
class Net:
    bob_up: bool = True
    #: alice's connection: its number, whether she still takes it for open, and whether
    #: it really carries anything (a killed bob's does not; alice finds out later).
    conn: int = 0
    conn_open: bool = False
    conn_works: bool = False
    readers: list[Reader] = field(default_factory=list)


class Model:
    """alice's service around her core, bob's core as the peer; time moved by hand."""

    def __init__(self, seed: int, *, loss: float, lag: float, lose_sessions: bool) -> None:
        self.rng = random.Random(seed)
        self.pair = pair = Pair()
        pair.alice.core = DeliveryCore(
            pair.alice.ledger, handle="alice", public_key=pair.alice.key,
            ack_timeout=ACK_TIMEOUT, rng=random.Random(seed),
        )  # fmt: skip
        self.core, self.bob = pair.alice.core, pair.bob.key
        self.loss, self.lag, self.lose_sessions = loss, lag, lose_sessions
        self.net = Net()
        self.agenda: list[tuple[float, int, str, object]] = []
        self._order = 0
        self.worker: Generator[Await, None, None] | None = None
        self.worker_state = "none"  # none | scheduled | sleep | wait | drain
        self.mine: list[Exchange] = []
        self.store_lost = False
        self.log: list[str] = []

    # ---- plumbing

    def later(self, delay: float, what: str, item: object = None) -> None:
        self._order += 1
        self.agenda.append((self.pair.now + delay, self._order, what, item))

    def commit(self) -> None:
        self.pair.alice.commit()

    def dispatch(self, events: list[Event]) -> None:
        """As Delivery._dispatch: start the worker, wake it, close a silent connection."""
        for event in events:
            if isinstance(event, DeliveryDue):
                assert self.worker_state == "none", "a second worker for one conversation"
                self.worker = self.worker_body()
                self.worker_state = "scheduled"
                self.mine = []
                self.later(self.rng.uniform(0, self.lag), "worker")
            elif self.worker_state == "wait" and isinstance(
                event, PrepareDue | RetryDue | SendDue | ExchangeEnded
            ):
                self.worker_state = "scheduled"
                self.later(self.rng.uniform(0, self.lag), "worker")
            if isinstance(event, ExchangeEnded):
                for reader in self.net.readers:  # the timer ended it: stop reading
                    if reader.exchange is event.exchange:
                        reader.done = True
                if event.close_connection and self.net.conn_open:
                    self.close_connection("no answer")
                if self.worker_state == "drain" and all(ex.ended for ex in self.mine):
                    self.release()

    def release(self) -> None:
        """The worker's nursery is drained: its finally (conversation_idle)."""
        self.worker_state = "none"
        self.worker = None
        self.core.conversation_idle(self.bob)
        self.commit()

    def close_connection(self, why: str) -> None:
        """alice closes (or loses) her connection: every stream on it breaks, and each
        reader ends its exchange (its finally: end_exchange)."""
        self.log.append(f"{self.pair.now:.3f} close {why}")
        self.net.conn_open = self.net.conn_works = False
        for reader in self.net.readers:
            if reader.conn == self.net.conn and not reader.done:
                reader.done = True
                self.later(self.rng.uniform(0, self.lag), "reader_end", reader)

    # ---- the worker, as Delivery._worker and _deliver (each yield is an await)

    def worker_body(self) -> Generator[Await, None, None]:
        pair, core, bob = self.pair, self.core, self.bob
        for _ in range(10_000):
            step = core.worker_step(bob, pair.now)
            if step == WAIT:
                yield ("wait",)
                continue
            if step == PREPARE:
                if self.rng.random() < 0.2:
                    yield ("sleep", self.rng.uniform(0, 0.05))  # a record lookup
                due = pair.alice.messages.due_for(bob, pair.now)
                todo = [m for m in due if m.envelope is None]
                if todo:
                    core.prepare(bob, todo, pair.bob.sessions.prekey_bundle(), pair.now)
                    self.commit()
                continue
            batch = pair.alice.messages.due_for(bob, pair.now, limit=256)
            if not batch:
                yield ("drain",)
                return
            if self.rng.random() < 0.2:
                yield ("sleep", self.rng.uniform(0, 0.05))  # a record lookup
            ready = core.prepare(bob, batch, pair.bob.sessions.prekey_bundle(), pair.now)
            self.commit()
            if not ready:
                continue
            yield from self.deliver(ready)

    def deliver(self, ready: list) -> Generator[Await, None, None]:  # type: ignore[type-arg]
        pair, core, bob, net = self.pair, self.core, self.bob, self.net
        if not net.conn_open:  # paths.connect: a new connection
            if net.bob_up:
                yield ("sleep", self.rng.uniform(0.001, 0.05))
                connected = net.bob_up
            else:
                yield ("sleep", 0.5)  # connect_timeout
                connected = False
            if connected and not net.conn_open:
                net.conn += 1
                net.conn_open = net.conn_works = True
        if net.conn_open:
            exchange = core.start_exchange(bob, ready, pair.now)
            yield ("sleep", self.rng.uniform(0, 0.002))  # the write
            if not net.conn_open or self.rng.random() < 0.03:  # the write broke
                events = core.end_exchange(exchange, pair.now)
                self.commit()
                self.dispatch(events)
            else:
                events = core.exchange_written(exchange, pair.now)
                self.commit()
                self.dispatch(events)
                self.mine.append(exchange)
                reader = Reader(exchange, net.conn)
                net.readers.append(reader)
                self.transmit(reader, "to bob", exchange.data)
                return
        # the mailbox for MAILBOX_PHASE at most, as MailboxCourier.put (bob is not up:
        # nothing fetches it here; only the attempt counts)
        puts = core.plan_mailbox(bob, ready, pair.now)
        self.commit()
        until = pair.now + MAILBOX_PHASE
        for n, put in enumerate(puts):
            if n and pair.now >= until:  # the rest stay due: connect again first
                return
            yield ("sleep", self.rng.uniform(0.01, 1.0))
            self.dispatch(core.mailbox_put_done(put, self.rng.choice([0, 1]), pair.now))
            self.commit()

    def run_worker(self) -> None:
        assert self.worker is not None
        self.worker_state = "running"
        try:
            what = next(self.worker)
        except StopIteration:  # (it returns only after "drain")
            raise AssertionError("the worker ended without draining") from None
        if what[0] == "wait":
            self.worker_state = "wait"
        elif what[0] == "sleep":
            self.worker_state = "sleep"
            self.later(float(what[1]), "worker")  # type: ignore[arg-type]
        else:
            self.worker_state = "drain"
            if all(ex.ended for ex in self.mine):
                self.release()

    # ---- the network and bob

    def transmit(self, reader: Reader, what: str, data: bytes) -> None:
        if not self.net.conn_works or reader.conn != self.net.conn:
            return
        if self.rng.random() < self.loss:
            return
        delay = self.rng.uniform(0.001, 0.05)
        for part in frames_of(data):
            delay += self.rng.uniform(0, 0.001)
            self.later(delay, what, (reader, part))

    def arrive(self, what: str, reader: Reader, data: bytes) -> None:
        pair = self.pair
        if reader.conn != self.net.conn or not self.net.conn_works:
            return  # the connection died meanwhile
        if what == "to bob":
            if self.net.bob_up:
                self.transmit(reader, "to alice", pair.to_bob(data).replies)
        elif not reader.done and not reader.exchange.ended:
            exchange = reader.exchange
            result = exchange.data_received(data, pair.now)
            self.commit()
            self.dispatch(result.events)
            if exchange.answered and not reader.done:  # the reader stops; closes later
                reader.done = True
                self.later(self.rng.uniform(0, 0.005), "reader_end", reader)

    def reader_end(self, reader: Reader) -> None:
        self.dispatch(self.core.end_exchange(reader.exchange, self.pair.now))
        self.commit()

    def bob_says(self, n: int) -> None:
        """bob writes to alice on a stream of his own: a message from a peer alice owes
        messages to makes them due now (MakeDue), whatever her worker is doing."""
        pair = self.pair
        if not self.net.bob_up:
            return
        (message,) = pair.bob.messages.enqueue_many(
            "alice", pair.alice.key, [f"from bob {n}"], pair.now
        )
        ready = pair.bob.core.prepare(
            pair.alice.key, [message], pair.alice.sessions.prekey_bundle(), pair.now
        )
        pair.bob.commit()
        exchange = pair.bob.core.start_exchange(pair.alice.key, ready, pair.now)
        result = self.core.accept_stream(self.bob).data_received(exchange.data, pair.now)
        self.commit()
        self.dispatch(result.events)

    def kill_bob(self) -> None:
        self.log.append(f"{self.pair.now:.3f} kill bob")
        self.net.bob_up = False
        self.net.conn_works = False  # alice still takes it for open

    def restart_bob(self) -> None:
        self.log.append(f"{self.pair.now:.3f} restart bob")
        self.net.bob_up = True
        if self.lose_sessions and self.rng.random() < 0.5:
            self.pair.bob = Side.new(self.pair.bob.identity, self.pair.now)
            self.store_lost = True
        if self.net.conn_open and self.rng.random() < 0.5:
            self.close_connection("peer restarted")  # its new instance rejects the old

    # ---- the run

    def run(self, texts: list[str], gap: float, outages: int) -> None:
        pair, core = self.pair, self.core
        todo = list(texts)
        next_queue = pair.now
        ends = pair.now + 5.0 + len(texts) * gap
        for n in range(self.rng.choice([0, 0, 3])):
            self.later(self.rng.uniform(0, ends - pair.now), "bob_says", n)
        for _ in range(outages):
            down = pair.now + self.rng.uniform(0, ends - pair.now)
            self.later(down - pair.now, "kill")
            self.later(down - pair.now + self.rng.uniform(0.1, 8.0), "restart")
        for _ in range(30_000):
            if todo and next_queue <= pair.now:
                for _ in range(self.rng.choice([1, 1, 1, 2, 5])):
                    if todo:
                        pair.queue(todo.pop(0))
                self.dispatch(core.messages_queued(self.bob, pair.now))
                self.commit()
                next_queue = pair.now + self.rng.expovariate(1 / gap)
            for item in sorted(i for i in self.agenda if i[0] <= pair.now):
                self.agenda.remove(item)
                _, _, what, payload = item
                if what == "worker":
                    self.run_worker()
                elif what == "kill":
                    if self.net.bob_up:
                        self.kill_bob()
                elif what == "restart":
                    if not self.net.bob_up:
                        self.restart_bob()
                elif what == "bob_says":
                    assert isinstance(payload, int)
                    self.bob_says(payload)
                elif what == "reader_end":
                    assert isinstance(payload, Reader)
                    self.reader_end(payload)
                else:
                    reader, data = payload  # type: ignore[misc]
                    self.arrive(what, reader, data)
            if not self.net.bob_up and not any(i[2] == "restart" for i in self.agenda):
                self.restart_bob()  # (a kill whose restart came first)
            self.dispatch(core.handle_timer(pair.now))
            self.commit()
            pending = pair.alice.messages.pending_for(self.bob)
            if not todo and not pending and not self.agenda:
                return
            times = [when for when, *_ in self.agenda]
            times += [when for when in (core.get_timer(),) if when is not None]
            times += [next_queue] if todo else []
            if pending and not times:
                raise AssertionError(
                    f"stuck at {pair.now - 1_700_000_000:.3f}: {len(pending)} pending, "
                    f"worker {self.worker_state}, nothing to wake up for; "
                    f"{core.debug_state(pair.now)}; {self.log[-10:]}"
                )
            pair.now = max(pair.now, min(times)) if times else pair.now
        raise AssertionError(f"not all delivered within 30,000 steps ({self.worker_state})")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    count=st.integers(1, 80),
    gap=st.sampled_from([0.0005, 0.003, 0.02, 0.2]),
    loss=st.sampled_from([0.0, 0.05, 0.3]),
    lag=st.sampled_from([0.0, 0.01, 0.1]),
    outages=st.integers(0, 3),
    lose_sessions=st.booleans(),
)
def test_every_message_is_delivered_whatever_the_interleaving(
    seed: int, count: int, gap: float, loss: float, lag: float, outages: int,
    lose_sessions: bool,
) -> None:  # fmt: skip
    """Random sends (one call or a few at a time), a lossy network, a late worker,
    kills and restarts of bob (some losing his sessions): nothing stuck, all delivered;
    each once and in order while bob kept his store."""
    model = Model(seed, loss=loss, lag=lag, lose_sessions=lose_sessions)
    texts = [f"m{i:03d}" for i in range(count)]
    model.run(texts, gap, outages)
    pair = model.pair
    assert all(m.state == DELIVERED for m in pair.alice.messages.outbox())
    if not model.store_lost:
        assert pair.inbox() == texts
