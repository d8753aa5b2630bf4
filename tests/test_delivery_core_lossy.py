"""Delivery's sans-I/O core through a lossy network: two cores, streams dropped, cut,
delayed and reordered by a seeded network, and alice's side driven the way the trio
service runs it (p2pd/delivery/service.py). Every message is delivered once and in
order, nothing stuck (the pair: p2pd/testing/delivery_pair.py)."""

from __future__ import annotations

import random

import pytest

from p2pd.delivery.core import (
    PREPARE,
    SEND,
    SEND_GATHER,
    WAIT,
    DeliveryCore,
    Exchange,
)
from p2pd.delivery.events import (
    DeliveryDue,
    Event,
    ExchangeEnded,
    PrepareDue,
    RetryDue,
    SendDue,
)
from p2pd.messaging import DELIVERED
from p2pd.testing.delivery_pair import ACK_TIMEOUT, Pair, frames_of


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_loss_and_reordering_all_delivered_once_in_order(seed: int) -> None:
    """A seeded network drops 30 % of the streams and of their answers and delays the
    rest by 10-400 ms (so that a retry may overtake the stream it repeats), while alice
    queues 40 messages in bursts. A service-like driver runs alice's worker and her
    timer, time moved by hand to the next deadline or arrival: every message reaches
    bob once, in order, and is delivered, by timer-driven retries alone."""
    rng = random.Random(seed)
    pair = Pair()
    pair.alice.core = DeliveryCore(
        pair.alice.ledger, handle="alice", public_key=pair.alice.key,
        ack_timeout=ACK_TIMEOUT, rng=random.Random(seed),
    )  # fmt: skip
    core, bob = pair.alice.core, pair.bob.key
    texts = [f"message {i}" for i in range(40)]
    start = pair.now
    bursts = [(start + i * 0.3, texts[i * 8 : i * 8 + 8]) for i in range(5)]
    in_flight: list[tuple[float, int, str, Exchange, bytes]] = []  # (arrival, n, to, ...)
    held = False
    exchanges = dropped = 0

    def net(to: str, exchange: Exchange, data: bytes) -> None:
        nonlocal dropped
        if rng.random() < 0.3:
            dropped += 1
        else:
            arrival = pair.now + rng.uniform(0.01, 0.4)
            in_flight.append((arrival, len(in_flight), to, exchange, data))

    def dispatch(events: list[Event]) -> None:
        nonlocal held
        for event in events:
            if isinstance(event, DeliveryDue):
                assert not held  # one worker per conversation
                held = True

    def run_worker() -> None:
        nonlocal held, exchanges
        while held:
            step = core.worker_step(bob, pair.now)
            if step == WAIT:
                return
            if step == PREPARE:
                pair.prepare()
                continue
            if not pair.due():
                core.conversation_idle(bob)
                held = False
                return
            exchange, _ = pair.send()
            exchanges += 1
            net("bob", exchange, exchange.data)

    for _ in range(5000):
        while bursts and bursts[0][0] <= pair.now:
            pair.queue(*bursts.pop(0)[1])
            dispatch(core.messages_queued(bob, pair.now))
        for item in sorted(i for i in in_flight if i[0] <= pair.now):
            in_flight.remove(item)
            _, _, to, exchange, data = item
            if to == "bob":
                net("alice", exchange, pair.to_bob(data).replies)
            elif not exchange.ended:  # the service stops reading an ended exchange
                pair.to_alice(exchange, data)
                if exchange.answered:
                    pair.alice.core.end_exchange(exchange, pair.now)
        dispatch(pair.fire_due())
        run_worker()
        pending = pair.alice.messages.pending_for(bob)
        if not pending and not bursts:
            break
        times = [t for t, *_ in in_flight]
        times += [when for when in (pair.timer(),) if when is not None]
        times += [bursts[0][0]] if bursts else []
        assert times, "nothing left to wake up for, with messages pending"
        pair.now = max(pair.now, min(times))
    else:
        raise AssertionError("not all delivered within 5,000 steps")
    assert pair.now - start < 300.0
    assert pair.inbox() == texts  # each once, in the sender's order
    assert len(pair.bob.messages.inbox()) == 40
    assert pair.alice.messages.next_due() is None
    # the loss made retries happen, and each of those was counted
    attempts = [m.attempts for m in pair.alice.messages.outbox()]
    assert dropped > 0 and max(attempts) > 1 and core.stats["sent_direct"] == sum(attempts)


# ------------------------------------------- the worker as the service runs it (issue 9)


class _ServiceLike:
    """alice's side as ``Delivery`` runs it (p2pd/delivery/service.py), with time and
    the network moved by hand: a worker runs only when started (DeliveryDue) or woken
    (PrepareDue, RetryDue, SendDue, ExchangeEnded) and, on a loaded machine, some while
    after; it releases the conversation (``conversation_idle``) only once the readers
    of the exchanges it wrote have ended (its nursery); a reader stops at its batch's
    last answer and ends the exchange once its stream is closed, a little later.

    The network loses whole streams, cuts others short (a connection lost midway),
    delays the rest (a retry may overtake what it repeats), and blacks out for a while.
    """

    def __init__(
        self, seed: int, *, lag: float, latency: float, blackout: tuple[float, float]
    ) -> None:
        self.rng = random.Random(f"network {seed}")  # not the core's jitter stream
        self.pair = pair = Pair()
        pair.alice.core = DeliveryCore(
            pair.alice.ledger, handle="alice", public_key=pair.alice.key,
            ack_timeout=ACK_TIMEOUT, rng=random.Random(seed),
        )  # fmt: skip
        self.core, self.bob = pair.alice.core, pair.bob.key
        self.lag = lag  # longest wait from a wake-up to the worker's next step
        self.latency = latency  # longest one-way delay of a stream
        self.blackout = (pair.now + blackout[0], pair.now + blackout[1])
        #: (when, order, what, exchange, data): arrivals, stream closes, worker runs
        self.agenda: list[tuple[float, int, str, Exchange | None, bytes]] = []
        self.worker = "none"  # none | run (scheduled) | wait | drain (its readers)
        self.mine: list[Exchange] = []  # the exchanges the running worker wrote
        self.batches: list[int] = []
        self._order = 0  # ties in the agenda, broken in the order they were made

    def later(self, delay: float, what: str, exchange: Exchange | None, data: bytes = b"") -> None:
        self._order += 1
        self.agenda.append((self.pair.now + delay, self._order, what, exchange, data))

    def lost(self) -> bool:
        return self.blackout[0] <= self.pair.now < self.blackout[1] or self.rng.random() < 0.1

    def transmit(self, what: str, exchange: Exchange, data: bytes) -> None:
        """A stream's bytes: lost, cut after some frames, or whole; then delayed."""
        if self.lost():
            return
        parts = frames_of(data)
        cut = self.rng.random() < 0.05
        if cut:
            parts = parts[: self.rng.randrange(len(parts) + 1)]
        delay = self.rng.uniform(0.001, self.latency)
        for part in parts:  # in order, as a stream is
            delay += self.rng.uniform(0.0, 0.001)
            self.later(delay, what, exchange, part)
        if cut:  # the connection is lost: the reader's stream ends
            self.later(delay + 0.01, "closed", exchange)

    def dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DeliveryDue):
                assert self.worker == "none", "a second worker for one conversation"
                self.worker = "run"
                self.mine = []
                self.later(self.rng.uniform(0, self.lag), "worker", None)
            elif self.worker == "wait" and isinstance(
                event, PrepareDue | RetryDue | SendDue | ExchangeEnded
            ):
                self.worker = "run"
                self.later(self.rng.uniform(0, self.lag), "worker", None)
            if isinstance(event, ExchangeEnded):
                self.release_if_drained()

    def release_if_drained(self) -> None:
        if self.worker == "drain" and all(ex.ended for ex in self.mine):
            self.worker = "none"
            self.core.conversation_idle(self.bob)

    def run_worker(self) -> None:
        pair = self.pair
        for _ in range(1000):
            step = self.core.worker_step(self.bob, pair.now)
            if step == WAIT:
                self.worker = "wait"
                return
            if step == PREPARE:
                pair.prepare()
                continue
            if not pair.due():
                self.worker = "drain"
                self.release_if_drained()
                return
            exchange, _ = pair.send()
            self.mine.append(exchange)
            self.batches.append(len(exchange.ids))
            self.transmit("to bob", exchange, exchange.data)
        raise AssertionError("the worker never waited")

    def arrive(self, what: str, exchange: Exchange, data: bytes) -> None:
        pair = self.pair
        if what == "to bob":
            self.transmit("to alice", exchange, pair.to_bob(data).replies)
        elif what == "to alice" and not exchange.ended and not exchange.answered:
            pair.to_alice(exchange, data)  # (the reader stops at the last answer)
            if exchange.answered:  # its stream is closed a little later
                self.later(self.rng.uniform(0.0, 0.005), "closed", exchange)
        elif what == "closed":
            self.dispatch(self.core.end_exchange(exchange, pair.now))
            pair.alice.commit()

    def run(self, texts: list[str], gap: float) -> float:
        """Queue ``texts`` one ``send`` call each, ``gap`` apart on average; run until
        all are delivered. Returns how long that took."""
        pair, core = self.pair, self.core
        start = pair.now
        todo = list(texts)
        next_queue = pair.now
        for _ in range(20_000):
            if todo and next_queue <= pair.now:
                pair.queue(todo.pop(0))
                self.dispatch(core.messages_queued(self.bob, pair.now))
                next_queue = pair.now + self.rng.expovariate(1 / gap)
            for item in sorted(i for i in self.agenda if i[0] <= pair.now):
                self.agenda.remove(item)
                _, _, what, exchange, data = item
                if what == "worker":
                    self.run_worker()
                else:
                    assert exchange is not None
                    self.arrive(what, exchange, data)
            self.dispatch(pair.fire_due())
            if not todo and not pair.alice.messages.pending_for(self.bob):
                return pair.now - start
            times = [when for when, *_ in self.agenda]
            times += [when for when in (pair.timer(),) if when is not None]
            times += [next_queue] if todo else []
            assert times, f"stuck: messages pending, nothing to wake up for ({self.worker})"
            pair.now = max(pair.now, min(times))
        raise AssertionError("not all delivered within 20,000 steps")


@pytest.mark.parametrize(
    ("seed", "gap", "lag", "latency"),
    [
        (seed, gap, lag, latency)
        for seed in (1, 2, 3)
        for gap, lag, latency in ((0.004, 0.0, 0.005), (0.01, 0.02, 0.02), (0.02, 0.08, 0.4))
    ],
)
def test_single_calls_behind_a_batch_on_a_lossy_network_as_the_service_runs_it(
    seed: int, gap: float, lag: float, latency: float
) -> None:
    """60 messages queued one ``send`` call each (SEND_GATHER gathers them behind the
    batch in flight) over a network that loses, cuts short and delays streams and
    blacks out for 3 s, the worker woken as the service wakes it (late, on a loaded
    machine): SendDue, RetryDue and ExchangeEnded in every order, batches answered
    before their streams close, conversations released with exchanges still open.
    Every message reaches bob once, in order, and is delivered; nothing is stuck."""
    driver = _ServiceLike(seed, lag=lag, latency=latency, blackout=(0.5, 3.5))
    texts = [f"alice-{i:03d}" for i in range(60)]
    took = driver.run(texts, gap)
    pair = driver.pair
    assert pair.inbox() == texts  # each once, in the sender's order
    assert len(pair.bob.messages.inbox()) == len(texts)
    assert all(m.state == DELIVERED for m in pair.alice.messages.outbox())
    assert took < 300.0  # (the backoff doubles up to 60 s: the slowest case here ~80 s)
    # gathered (a batch of several from single calls), and the loss made retries happen
    attempts = [m.attempts for m in pair.alice.messages.outbox()]
    assert max(driver.batches) > 1 and max(attempts) > 1


def test_gathering_behind_a_retried_batch_and_a_released_conversation() -> None:
    """The interleavings of SEND_GATHER with the rest, one by one: a message queued
    behind a batch that goes silent is sent with its retry; a late answer on the silent
    stream and the next batch's answer end exchanges while the worker gathers (their
    ExchangeEnded wakes it early, and it waits on for SendDue); a conversation released
    while a message gathers (the worker stopped) leaves nothing behind: the message is
    handed to the next worker at once, not after a SendDue that no one waits for."""
    pair = Pair()
    core, bob = pair.alice.core, pair.bob.key
    (first,) = pair.queue("first")
    assert core.messages_queued(bob, pair.now) == [DeliveryDue(bob)]
    assert core.worker_step(bob, pair.now) == SEND
    silent, _ = pair.send()  # ... lost
    pair.advance(0.001)
    (second,) = pair.queue("second")
    assert core.messages_queued(bob, pair.now) == []
    assert pair.fire() == [PrepareDue(bob)]  # encrypted while the batch waits
    assert core.worker_step(bob, pair.now) == PREPARE
    pair.prepare()
    assert core.worker_step(bob, pair.now) == WAIT
    # the silent batch is retried at its backoff, the message behind it with it
    assert pair.fire() == [RetryDue(bob)]
    assert core.worker_step(bob, pair.now) == SEND
    assert [m.id for m in pair.due()] == [first.id, second.id]
    retry, _ = pair.send()
    # the silent stream's answer comes late: "first" delivered there, not yet by retry
    late = pair.to_bob(silent.data).replies
    pair.to_alice(silent, late)
    assert pair.state(first).state == DELIVERED and silent.answered
    # "third" queued behind the retry, which is then answered
    pair.advance(0.001)
    behind = pair.now
    (third,) = pair.queue("third")
    assert core.messages_queued(bob, pair.now) == []
    pair.to_alice(retry, pair.to_bob(retry.data).replies)
    assert pair.end(retry).answered
    assert core.worker_step(bob, pair.now) == WAIT and pair.timer() == behind + SEND_GATHER
    # the silent stream is closed meanwhile: its ExchangeEnded wakes the worker early
    pair.advance(0.005)
    assert pair.end(silent).answered
    assert core.worker_step(bob, pair.now) == WAIT and pair.timer() == behind + SEND_GATHER
    assert pair.fire() == [SendDue(bob)]
    assert core.worker_step(bob, pair.now) == SEND
    last, _ = pair.send()
    assert last.ids == [third.id]
    # "fourth", queued behind "third", gathers once that is answered when the worker is
    # stopped (the daemon's nursery, an error): released, the conversation is due at once
    (fourth,) = pair.queue("fourth")
    assert core.messages_queued(bob, pair.now) == []
    pair.to_alice(last, pair.to_bob(last.data).replies)
    pair.end(last)
    assert core.worker_step(bob, pair.now) == WAIT and pair.timer() == pair.now + SEND_GATHER
    core.conversation_idle(bob)
    when = pair.timer()
    assert when is not None and when <= pair.now  # due at once
    assert pair.fire_due() == [DeliveryDue(bob)]
    assert core.worker_step(bob, pair.now) == SEND
    final, _ = pair.send()
    pair.to_alice(final, pair.to_bob(final.data).replies)
    assert final.ids == [fourth.id]
    pair.end(final)
    assert core.worker_step(bob, pair.now) == SEND and pair.due() == []
    core.conversation_idle(bob)
    assert pair.timer() is None
    assert pair.inbox() == ["first", "second", "third", "fourth"]
    assert all(m.state == DELIVERED for m in pair.alice.messages.outbox())
