"""The iterative Kademlia lookup as a state machine: replies and timeouts in, next
requests out. No sockets, no clock but the ``now`` it is given.

Stock kademlia crawls in rounds: it sends alpha requests and waits for *all* of them, so
one dead contact holds every round for the full RPC timeout. Here each request has its
own soft deadline (the contact's adaptive RTO, kept by the caller). When the caller
reports it passed (:meth:`Lookup.slow`), the lookup stops counting that contact as in
flight and asks the next candidate; a late reply is still used while the lookup runs.
The lookup ends when the k closest contacts that are not known dead or slow have all
answered, when nothing is left to ask, or at its deadline.

For values it does not stop at the first one: it collects every value the k closest
nodes hold, so the caller can pick the *newest* valid record (stock kademlia returns the
most common value; upstream issue #107). Once a value has turned up the lookup is near
the key, and it asks the rest of the k closest at once.

Against Sybils (docs/ARCHITECTURE.md, "Earned ids"):

- Address limits: the contacts a lookup asks, and its result, are chosen nearest first
  keeping at most ``max_per_ip`` per IP address and ``max_per_subnet`` per /24 or /48
  (:class:`~p2pd.dht.routing.AddressLimit`). A contact over the limit is kept aside, not
  dropped: if the nearer ones of its address fail (a liar can name made-up ids at an
  honest node's address), it becomes eligible again.
- Disjoint paths (S/Kademlia, Baumgart and Mies 2007, section 4.4): one lookup here is
  one path; :class:`~p2pd.dht.disjoint.DisjointLookup` deals the seeds round-robin to
  ``d`` of them that share one set of asked nodes (``taken``), so no node is asked by
  two paths, and merges their answers. A path whose contacts all lie (answer with
  hostile contacts only) cannot stop the others from reaching the honest nodes near
  the target.
- Which replies count (a proof of the node key from the address asked) is the core's
  business: a reply without a valid proof reaches the lookup as :meth:`Lookup.failed`.

Driving it (a ``DisjointLookup`` is driven the same way)::

    lookup = Lookup(target, find_value=True, k=20, alpha=3, max_rpcs=300,
                    deadline=now + 10, own_id=me, seeds=table.closest(target, 20))
    for node in lookup.next_requests(now): send find_value to node
    ... lookup.replied(node_id, reply, now) / lookup.slow(node_id) / lookup.failed(node_id)
    ... after each, send lookup.next_requests(now); stop when lookup.done
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator

from .. import wire
from .density import SpreadLimit
from .result import LookupResult
from .routing import AddressLimit, Node

#: A node's state in a lookup (:meth:`Lookup.known` names it). TAKEN: another path of
#: the same disjoint lookup (p2pd/dht/disjoint.py) asked it first.
NEW, INFLIGHT, SLOW, OK, FAILED, TAKEN = range(6)
#: How long a patient node lookup (a size sample) waits past a contact's soft deadline
#: for its reply, at most (then it ends without it, as any node lookup does). A busy
#: host's replies come 0.05-0.5 s past an RTO of 10 ms; a dead contact is never heard
#: from, and a resolve that waited for a sample waited the hard timeout for it (2 s:
#: tests/test_dht_sim.py's churn, one resolve of 20 took 2.04 s).
SAMPLE_PATIENCE = 0.5
_DEAD = (SLOW, FAILED, TAKEN)
#: A value lookup's early end needs its quorum to reach as far as this many honest nodes
#: per member of the quorum are expected (the density rule's lambda, p2pd/dht/density.py).
EARLY_END_SPAN = 2 / 3


def closest(nodes: Iterable[Node], target: int, k: int, limit: AddressLimit | None) -> list[Node]:
    """The ``k`` of ``nodes`` nearest ``target``, within the limits (a lookup's result)."""
    ordered = sorted(nodes, key=lambda n: n.long_id ^ target)
    return ordered[:k] if limit is None else limit.select(ordered, k)


class Lookup:
    """One iterative lookup for ``target`` (find_node, or find_value)."""

    def __init__(
        self,
        target: bytes,
        *,
        find_value: bool,
        k: int,
        alpha: int,
        max_rpcs: int,
        quorum: int | None = None,
        started: float,
        deadline: float,
        own_id: bytes,
        seeds: Iterable[Node],
        skip: Callable[[bytes], bool] = lambda _: False,
        limit: AddressLimit | None = None,
        taken: set[bytes] | None = None,
        claim_of: Callable[[bytes], bytes | None] = bytes,
        max_width: int = 0,
        probe_from: int = 0,
        prior: dict[bytes, tuple[Node, wire.FindValueReply]] | None = None,
        patient: bool = False,
    ) -> None:
        self.target = target
        self.find_value = find_value
        self.method = "find_value" if find_value else "find_node"
        self._target = int.from_bytes(target, "big")
        #: A value lookup that waits for its slow contacts (an answer or the hard
        #: timeout) before it ends, as a node lookup short of k does; a node lookup
        #: that waits for those that would rank among its k closest (a size sample).
        self._patient = patient
        #: Slow contacts a patient node lookup no longer waits for (SAMPLE_PATIENCE).
        self._unwaited: set[bytes] = set()
        self._k = k
        self._alpha = alpha
        #: Most requests in flight once the lookup asks widely: k, at most ``max_width``.
        #: A burst of 60 (3k, a handle record's replicas then) on a busy host made soft
        #: timeouts fire on most of them, and the lookup ended with the few that beat
        #: them (seen: 3 of 60).
        self._width = min(k, max_width) if max_width else k
        self._max_rpcs = max_rpcs
        self._quorum = k if quorum is None else min(max(quorum, 1), k)
        self._own = own_id
        self._skip = skip
        self._limit = limit
        #: What a value claims (a handle record's key): the early end needs the quorum
        #: closest to agree on it. By default the value's bytes themselves.
        self._claim_of = claim_of
        self._claims: dict[bytes, bytes | None] = {}
        #: Shared by the paths of a disjoint lookup: every node one of them asked.
        self._taken = taken
        #: A node lookup for more than the k nodes one reply names (a handle record's 4k
        #: replicas) asks the candidates ranked ``probe_from`` and beyond for their *own*
        #: neighbours (find_node of their own id) instead of the target's: every reply
        #: names the (up to 32) contacts nearest the target it knows, the same few near
        #: the key in every table, so ranks 40-60 of 60 were found only by chance (a
        #: store missed 9 % of its true replicas at N=160; an honest replica without the
        #: record takes a squatter's rival claim). A node's own neighbourhood is the part
        #: of its table it knows best. 0: never. A node lookup asks a third of them for
        #: the point nearest the target of their own subtree or of the next one out
        #: instead (``target_for``): own ids alone left whole subtrees unnamed.
        #: A value lookup for more than k (a resolve's second round: all 4k replicas
        #: vote) probes too, with two requests to such a node: find_node of its own id
        #: first, then, once that answered, find_value of the target. Without it the
        #: round asked 35-58 of the key's true 80 closest at N=1000 and its voters
        #: reached true ranks 95-177, honest nodes there holding nothing or a
        #: squatter's rival: "contested", once the wrong key (issue 11;
        #: tests/test_dht_wide_round.py).
        self._probe_from = probe_from
        #: Nodes whose next (or current) request is the probe of their own id.
        self._probed: set[bytes] = set()
        #: A value lookup's nodes whose probe answered: asked find_value next, by this
        #: path (a disjoint lookup's other paths see them taken).
        self._reprobed: set[bytes] = set()
        #: Value replies heard already by an earlier lookup of the same target (a
        #: resolve's first round), by node id: such a node is not asked again, its reply
        #: is taken as if it had just come (shared by the paths of a disjoint lookup,
        #: and used up: one path takes each). Every node still counts as asked.
        self._prior = prior if prior is not None and find_value else {}
        self.started = started
        self.deadline = deadline
        self._nodes: dict[bytes, Node] = {}
        self._state: dict[bytes, int] = {}
        self._depth: dict[bytes, int] = {}
        #: Every node heard of as (distance to the target, id), nearest first, kept
        #: sorted as nodes come (bisect), and the ones still NEW. ``_live`` ran a sort
        #: of every node and the density rule's selection on each reply: with a resolve's
        #: second round probing (each probe's reply adds up to 32 candidates, most of
        #: them far) that was 17-18 % of the CPU of bench_adversary's attacked rows
        #: (cProfile, N=300); now a change past the last live node costs no selection.
        self._order: list[tuple[int, bytes]] = []
        self._new: set[bytes] = set()
        #: ``_live``'s last answer (None: to be worked out again), and the distance of
        #: its last node: a change farther than that, with k live nodes, changes nothing
        #: (the address limits and the density rule walk nearest first and stop there).
        self._live_cache: list[Node] | None = None
        self._edge = -1
        #: How many nodes ``taken`` held when ``_live`` last looked (it only grows).
        self._taken_seen = -1
        self._inflight = 0
        #: The nearest distance heard of so far, and whether the last reply failed to
        #: beat it: then every one of the k closest not yet asked is asked at once
        #: (Kademlia section 2.3: "if a round of FIND_NODEs fails to return a node any
        #: closer than the closest already seen, the initiator resends the FIND_NODE to
        #: all of the k closest nodes it has not already queried").
        self._nearest: int | None = None
        self._wide = False
        #: Nodes the density rule passed over in the last _live (asked all the same, so
        #: that a resolver knows how many answering nodes it set aside).
        self._passed: list[Node] = []
        #: Contacts ``late`` (p2pd/dht/pacing.py): silent past the lookup's own pace, so
        #: the next candidate is asked already, but not given up on until their soft
        #: deadline (``slow``) or a reply: until then the lookup does not end.
        self._held: set[bytes] = set()
        self.result = LookupResult(closest=[])
        self.done = False
        for node in seeds:
            self._add(node, 0)
        for node, _ in list(self._prior.values()):
            self._add(node, 0)

    def _add(self, node: Node, depth: int) -> bool:
        """Take a candidate; True if it is nearer than anything heard of before."""
        if node.id == self._own or node.id in self._nodes or self._skip(node.id):
            return False
        if self._taken is not None and node.id in self._taken and node.id not in self._prior:
            return False
        self._nodes[node.id] = node
        self._state[node.id] = NEW
        self._new.add(node.id)
        self._depth[node.id] = depth
        distance = node.long_id ^ self._target
        bisect.insort(self._order, (distance, node.id))
        self._moved(distance)
        if self._nearest is None or distance < self._nearest:
            self._nearest = distance
            return True
        return False

    def _set(self, node_id: bytes, state: int) -> None:
        """A node's new state (every change goes through here: ``_live`` keeps its last
        answer until one could change it)."""
        old = self._state[node_id]
        self._state[node_id] = state
        if old == NEW:
            self._new.discard(node_id)
        if state == NEW:
            self._new.add(node_id)
        if (old in _DEAD) != (state in _DEAD):
            self._moved(self._order_key(node_id))

    def _order_key(self, node_id: bytes) -> int:
        return int(self._nodes[node_id].long_id ^ self._target)

    def _moved(self, distance: int) -> None:
        """A node at ``distance`` came or left the live candidates."""
        cache = self._live_cache
        if cache is not None and (len(cache) < self._k or distance <= self._edge):
            self._live_cache = None

    def _live(self) -> list[Node]:
        """The k nearest candidates not dead, within the limits (and ``_passed``: those
        the density rule set aside on the way)."""
        state, taken = self._state, self._taken
        if taken is not None and len(taken) != self._taken_seen:
            self._taken_seen = len(taken)
            for node_id in self._new & taken:
                if node_id not in self._prior and node_id not in self._reprobed:
                    self._set(node_id, TAKEN)
        live = self._live_cache
        if live is not None:
            return live
        nodes = self._nodes
        ordered = (nodes[i] for _, i in self._order if state[i] not in _DEAD)
        if self._limit is not None:
            live = self._limit.select(ordered, self._k)
            if isinstance(self._limit, SpreadLimit):
                self._passed = self._limit.passed
        else:
            live = list(itertools.islice(ordered, self._k))
        self._live_cache = live
        self._edge = self._order_key(live[-1].id) if live else -1
        return live

    def next_requests(self, now: float) -> list[Node]:
        """Contacts to ask now; each is then in flight until replied/slow/failed. When
        this returns nothing and nothing is in flight, the lookup is done."""
        if self.done:
            return []
        if now >= self.deadline:
            self._finish(now)
            return []
        live = self._replay_prior()
        if not self._holds(live, self._quorum) and self._enough_values(live):
            self._finish(now)
            return []
        width = self._width if self._wide or self.result.values else self._alpha
        out: list[Node] = []
        for rank, node in enumerate(live + self._passed):
            if self._inflight >= width or self.result.rpcs >= self._max_rpcs:
                break
            if self._state[node.id] == NEW:
                if self._probe_from and rank >= self._probe_from and node.id not in self._reprobed:
                    self._probed.add(node.id)
                self._set(node.id, INFLIGHT)
                if self._taken is not None:
                    self._taken.add(node.id)
                self._inflight += 1
                self.result.rpcs += 1
                self.result.asked.add(node.id)
                out.append(node)
        # A node lookup (where to store) short of k nodes waits for the slow ones to
        # answer or time out: on a busy host the contacts past their soft deadline are
        # mostly alive, and a store at the few that beat it loses replicas (a 25-node
        # swarm stored a record at 17 of 25). A value lookup waits only if ``patient``
        # (a resolve short of votes: p2pd/dht/resolve.py), for every slow contact.
        # A ``patient`` node lookup (a size sample) waits too for the slow ones that
        # would rank among its k closest: a sample is (k - 1) / d_k, and one that gave up
        # on near contacts read d_k too far. On a busy host (tests/test_adversary.py's
        # targeted attacker, two CPU hogs) samples of 7-8 and 20-22 for a network of 61
        # set alice's own replicas aside: "contested" with 14-30 votes for her and 1
        # for the rival, at 1-3 resolvers of 40 in 3 runs of 16.
        if self.find_value:
            waits = self._patient and self._slow_pending()
        else:
            waits = len(live) < self._k and self._slow_pending()
            if self._patient and not waits:
                waited = self._unwaited
                slow = (i for i, st in self._state.items() if st == SLOW and i not in waited)
                waits = self._ranks_among(slow, live, self._k)
        quiet = self._inflight == 0 or all(self._state[n.id] == OK for n in live + self._passed)
        if not out and quiet and not waits and not self._holds(live, self._k):
            self._finish(now)
        return out

    def _holds(self, live: list[Node], count: int) -> bool:
        """Whether a ``late`` contact would rank among the first ``count`` live ones, were
        it still in flight: the end that needs those answered waits for it."""
        return self._ranks_among(self._held, live, count)

    def _ranks_among(self, ids: Iterable[bytes], live: list[Node], count: int) -> bool:
        """Whether one of ``ids`` would rank among the first ``count`` live ones, were it
        to answer (any, while fewer than ``count`` are live)."""
        if len(live) < count:
            return any(True for _ in ids)
        edge = self._order_key(live[count - 1].id)
        return any(self._order_key(node_id) < edge for node_id in ids)

    def _replay_prior(self) -> list[Node]:
        """The live candidates, after taking every reply an earlier lookup heard from
        this path's share of its nodes (all added as candidates at the start; each
        taken once, whatever its rank: an answer costs nothing to count)."""
        heard = [i for i in self._prior if i in self._nodes and self._state[i] == NEW]
        for node_id in heard:
            self._set(node_id, INFLIGHT)
            self._inflight += 1
            if self._taken is not None:
                self._taken.add(node_id)
            self.replied(node_id, self._prior.pop(node_id)[1])
        return self._live()

    def _slow_pending(self) -> bool:
        return any(state == SLOW for state in self._state.values())

    @property
    def waits_for_slow(self) -> bool:
        """A patient node lookup: it waits for its slow near contacts (SAMPLE_PATIENCE)."""
        return self._patient and not self.find_value

    def stop_waiting(self, node_id: bytes) -> bool:
        """SAMPLE_PATIENCE has passed since the contact's soft deadline: a patient node
        lookup waits for it no longer (its reply still counts if the lookup runs). True
        if that changed anything."""
        if self._state.get(node_id) != SLOW or node_id in self._unwaited:
            return False
        self._unwaited.add(node_id)
        return True

    def _enough_values(self, live: list[Node]) -> bool:
        """A value lookup may end before the k closest answered only when the ``quorum``
        closest live nodes have all answered with a value and agree on what it claims.
        Any disagreement (a liar among them, a stale replica of another key) makes it
        go on to the k closest: unanimity is cheap to reach in an honest network, and a
        liar near the key buys only a longer lookup, not an early stop on its value."""
        quorum = self._quorum
        if not self.find_value or quorum >= self._k or len(self.result.values) < quorum:
            return False
        nearest = live[:quorum]
        if len(nearest) < quorum or any(self._state[n.id] != OK for n in nearest):
            return False
        if self._passed:  # a packed cluster near the key: every node is heard
            return False
        if isinstance(self._limit, SpreadLimit):
            # The quorum must span where 2/3 of its number of honest nodes are expected:
            # ids placed next to the key, as many as chance allows at each distance,
            # could otherwise be the whole quorum wherever honest nodes happen to leave
            # a gap (with a quorum of 12: a gap of 8 expected nodes, e^-8 of the keys).
            lam = self._limit.expected(nearest[-1])
            if lam is not None and lam < EARLY_END_SPAN * quorum:
                return False
        claims = {self._claims.get(n.id) for n in nearest}
        return len(claims) == 1 and None not in claims

    def _finish(self, now: float) -> None:
        self.done = True
        self.result.voters = {n.id for n in self._live() if self._state[n.id] == OK}
        self.result.packed = {n.id for n in self._passed if self._state[n.id] == OK}
        self.result.given_up = [n for n in self._nodes.values() if self._state[n.id] == SLOW]
        self.result.timed_out = [n for n in self._nodes.values() if self._state[n.id] == FAILED]
        self.result.closest = closest(
            (n for n in self._nodes.values() if self._state[n.id] == OK),
            self._target,
            self._k,
            self._limit,
        )
        self.result.elapsed = now - self.started

    def late(self, node_id: bytes) -> bool:
        """The contact is silent past the lookup's own pace (p2pd/dht/pacing.py): ask the
        next candidate as if it were slow, but hold the lookup's end (early or not) until
        its soft deadline passes (:meth:`slow`) or it answers, if it ranks where that end
        needs answers, as it would in flight. So the lookup ends no sooner than with the
        contact in flight until its soft deadline, and may hear more (the next
        candidate, and whom it names), never less. True if that changed anything."""
        if self._state.get(node_id) != INFLIGHT:
            return False
        self._set(node_id, SLOW)
        self._inflight -= 1
        self._held.add(node_id)
        return True

    def slow(self, node_id: bytes) -> bool:
        """The contact's soft deadline passed: stop counting it as in flight. True if
        that changed anything (the caller may then mark it suspect)."""
        if node_id in self._held:  # late already: given up on now
            self._held.discard(node_id)
            self.result.slow += 1
            return True
        if self._state.get(node_id) != INFLIGHT:
            return False
        self._set(node_id, SLOW)
        self._inflight -= 1
        self.result.slow += 1
        return True

    def failed(self, node_id: bytes) -> None:
        """No reply came before the hard timeout (or it was malformed)."""
        state = self._state.get(node_id)
        self._held.discard(node_id)
        if state == INFLIGHT:
            self._inflight -= 1
        if state in (INFLIGHT, SLOW):
            self._set(node_id, FAILED)
            self.result.failed += 1

    def replied(self, node_id: bytes, reply: wire.DHTResult) -> bool:
        """A reply from a contact we asked. Returns whether it was a slow one (the caller
        clears the suspicion it set)."""
        state = self._state.get(node_id)
        if state not in (INFLIGHT, SLOW) or self.done:
            return False
        self._held.discard(node_id)
        if state == INFLIGHT:
            self._inflight -= 1
        node = self._nodes[node_id]
        if self.find_value and node_id in self._probed:
            # The probe of its own neighbourhood (find_node): its contacts, then the
            # node is asked for the value as any other.
            self._probed.discard(node_id)
            if not isinstance(reply, tuple):
                self._set(node_id, FAILED)
                return state == SLOW
            self._reprobed.add(node_id)
            self._set(node_id, NEW)
            depth = self._depth[node_id] = self._depth[node_id] + 1
            self._add_contacts(reply, depth)
            self._wide = True
            return state == SLOW
        if isinstance(reply, wire.FindValueReply) and self.find_value:
            self.result.replies[node_id] = (node, reply)
            if reply.value is not None:
                self.result.values.append((node, reply.value))
                self._claims[node_id] = self._claim_of(reply.value)
                if reply.seen is not None:
                    self.result.seen[node.id] = reply.seen
            else:
                self.result.without_value.append(node)
            contacts = reply.contacts
        elif isinstance(reply, tuple) and not self.find_value:
            contacts = reply
        else:  # a reply of the wrong shape counts as no reply
            self._set(node_id, FAILED)
            return state == SLOW
        self._set(node_id, OK)
        depth = self._depth[node_id] + 1
        self.result.hops = max(self.result.hops, depth)
        if not self._add_contacts(contacts, depth):
            self._wide = True
        return state == SLOW

    def replied_after(self, node_id: bytes, reply: wire.DHTResult) -> bool:
        """A value reply to a request still in flight when this lookup ended (it ends
        once its k closest answered, whatever else is under way): kept with the
        replies, and nothing else, so that a resolve's next round, if it starts later
        (it waits for a size sample at times), takes it instead of asking the node
        again. Whether it was kept."""
        if (
            not self.done
            or not self.find_value
            or self._state.get(node_id) not in (INFLIGHT, SLOW)
            or node_id in self._probed
            or not isinstance(reply, wire.FindValueReply)
        ):
            return False
        self._state[node_id] = OK  # once (the lookup is over: nothing else reads it)
        self.result.replies[node_id] = (self._nodes[node_id], reply)
        return True

    def _add_contacts(self, contacts: Iterable[wire.Contact], depth: int) -> bool:
        """Take the contacts a reply named; True if one is nearer than any heard before."""
        closer = False
        known = self._nodes
        for contact in contacts:
            node_id = contact.node_id
            if node_id in known:  # what _add would say first (most contacts, late on)
                continue
            address = contact.address
            node = Node(node_id, address.host, address.port, contact.node_key)
            closer = self._add(node, depth) or closer
        return closer

    def target_for(self, node_id: bytes) -> bytes:
        """The key to ask ``node_id`` about: the target, or for a probe (``probe_from``)
        its own id; in a node lookup a third of the probes each (by the node's id mod
        3) ask instead for the point nearest the target of the node's own subtree
        ("near": the target with the first bit where the node's id differs from it
        flipped) or of the subtree one out ("outward": the bit above it flipped)."""
        if node_id not in self._probed:
            return self.target
        own = int.from_bytes(node_id, "big")
        level = (own ^ self._target).bit_length()  # the node's subtree: bit level - 1
        kind = own % 3
        if self.find_value or kind == 0 or level >= 8 * len(self.target):
            return node_id
        # Asked for its own id, every probed node named its own neighbours, and a
        # subtree of the key's 4k closest where the lookup knew no one was named by
        # no one: nearer nodes answer with their own side (a reply is full before it
        # reaches the next subtree out), farther ones with theirs. Stores then missed
        # true replicas ranked 43-79 (CoreNet, k=20: 14 of 80 stores at N=1000 reached
        # 53-78 of the 80; bench_adversary's contested lookups at N=1000: ranks 51-79,
        # where the squatter's rival held). A node shares every bit above ``level``
        # with the target, so its bucket at ``level`` is exactly the key's subtree one
        # out from its own ("outward": how the lookup enters a subtree where it knows
        # no one); its own subtree's nodes nearest the key it knows best ("near").
        # Tables keep their oldest contacts, so the outward buckets of all nodes name
        # the same few early nodes of that subtree, and the late ones near the key are
        # found from inside: outward alone missed 1-8 in 42 of 60 stores at N=300,
        # with near 1-5 in 55 of 150; own and outward, 2 of 150; all three, 0 of 150
        # (figures: docs/SECURITY.md, "Finding all the replicas";
        # tests/test_dht_replicas.py).
        point = self._target ^ (1 << (level - 1 if kind == 1 else level))
        return point.to_bytes(len(self.target), "big")

    def method_for(self, node_id: bytes) -> str:
        """What to ask ``node_id``: the lookup's method, or find_node for a probe."""
        return "find_node" if node_id in self._probed else self.method

    def known(self) -> Iterator[tuple[Node, int]]:
        """Every node this lookup heard of, with its state here."""
        for node_id, node in self._nodes.items():
            yield node, self._state[node_id]

    @property
    def in_flight(self) -> int:
        return self._inflight
