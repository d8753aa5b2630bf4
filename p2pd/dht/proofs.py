"""Earned ids: a node's id is taken only after it proves the key (docs/ARCHITECTURE.md,
"Earned ids"; the bytes in docs/PROTOCOL.md, "Earned contacts"). Sans-I/O, as the core
that owns it (:class:`~p2pd.dht.core.DHTCore`, ``core.proofs``): it takes ``now``, and
the one datagram it makes, our own ``proof``, it returns for the core to send.

An id is the hash of a node key, and a contact enters the routing table or a lookup's
answers only after it proved that key from the address it claims, in one of two ways:

- it answered a ``prove`` request of ours, signing the reply with that key
  (:meth:`Proofs.check_reply`);
- it sent back, from that address, the address cookie our reply to its request carried
  (a keyed hash of its key, its address and the time: no state here), in a ``proof``
  signed by its key (:meth:`Proofs.cookie_for`, then :meth:`Proofs.on_proof`): one
  datagram, instead of a proving ping.

Proven (id, address) pairs are remembered for ``verified_lifetime`` and asked without
proof (:meth:`Proofs.is_verified`). Until a source is proven no reply to it is larger
than its request (:mod:`.budget`). The other way round, a node we asked may hand us its
cookie: :meth:`Proofs.proof` answers it, once reachability allows (the core asks
p2pd/dht/reachability.py ``may_prove``: client mode withholds it).

What the core keeps: what a proven sender changes in its table (it may enter it, and any
word from it clears its failures), and when to ask for a proof (``DHTCore.request``).
"""

from __future__ import annotations

import hmac
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Protocol

from .. import wire
from ..config import DHTConfig
from ..identity import verify_signature
from .budget import RequestBudget, address_cookie
from .nodekey import NodeKey
from .routing import Node

Address = tuple[str, int]
#: Most proven (node id, address) pairs remembered.
VERIFIED_MAX = 10_000
#: An address cookie is made with the time in periods of this many seconds and is taken
#: back during its period and the next: it is good for 60 to 120 s. A proof follows its
#: cookie within a round trip; a longer life would only help a replay.
COOKIE_PERIOD = 60.0
#: Cookies whose proof failed, remembered so that each costs at most one signature check
#: (a valid cookie with a bad signature, sent again and again, would cost one each).
SPENT_COOKIES_MAX = 4096


class Asked(Protocol):
    """The request a proving reply answers (the core's pending request)."""

    node: Node
    method: str
    #: Sent to an address whose id we do not know yet (bootstrap), or to prove a sender.
    probe: bool


class Proofs:
    """Which (node id, address) pairs proved their key, and our address cookies."""

    def __init__(
        self,
        node_key: NodeKey,
        config: DHTConfig,
        budget: RequestBudget,
        stats: Counter[str],
        randbytes: Callable[[int], bytes],
    ) -> None:
        self._node_key = node_key
        self._config = config
        #: The Sybil defences, off only in benchmarks: every sender counts as proven.
        self._defended = config.defences
        self._budget = budget  # a proven address leaves the unvalidated budget
        self._stats = stats  # the core's counters
        self._randbytes = randbytes
        #: (node id, address) -> when it last proved its key from that address.
        self._verified: OrderedDict[tuple[bytes, Address], float] = OrderedDict()
        #: The key of our address cookies; never leaves this process.
        self._cookie_secret = randbytes(32)
        self._spent_cookies: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        """How many proven pairs are remembered."""
        return len(self._verified)

    def is_verified(self, node_id: bytes, address: Address, now: float) -> bool:
        """Whether ``node_id`` proved its key from ``address`` within verified_lifetime."""
        when = self._verified.get((node_id, address))
        return when is not None and now - when < self._config.verified_lifetime

    def _mark_verified(self, node_id: bytes, address: Address, now: float) -> None:
        pair = (node_id, address)
        self._budget.note_proven(address, now)
        self._verified.pop(pair, None)
        self._verified[pair] = now
        while len(self._verified) > VERIFIED_MAX:
            self._verified.popitem(last=False)

    # ------------------------------------------------------------------ a proving reply

    def check_reply(
        self,
        asked: Asked,
        msg_id: bytes,
        raw: bytes,
        signature: bytes | None,
        result: wire.DHTResult,
        address: Address,
        now: float,
    ) -> bytes | None:
        """The node key that signed this reply to a ``prove`` request, if the proof holds
        (the pair is then proven), else None (counted as ``bad_proofs``)."""
        key = self._proven_key(asked, msg_id, raw, signature, result)
        if key is None:
            self._stats["bad_proofs"] += 1
        else:
            self._mark_verified(wire.node_id_for(key), address, now)
        return key

    def _proven_key(
        self,
        asked: Asked,
        msg_id: bytes,
        raw: bytes,
        signature: bytes | None,
        result: wire.DHTResult,
    ) -> bytes | None:
        """The node key that signed this reply, if the proof holds: a signature over the
        message id and the result bytes, by the key of the node we asked (a ping's
        result is the key itself; a bootstrap ping learns the key from it)."""
        key = asked.node.key
        if asked.method == "ping":
            if not isinstance(result, bytes) or (key is not None and result != key):
                return None
            key = result
        if key is None or signature is None:
            return None
        if not asked.probe and wire.node_id_for(key) != asked.node.id:
            return None
        self._stats["proofs_checked"] += 1
        if not verify_signature(key, wire.reply_message(msg_id, raw), signature):
            return None
        return key

    # ------------------------------------------------------------------ cookies out, proofs in

    def cookie_for(self, sender: Node, now: float) -> bytes | None:
        """The cookie our reply to an unproven ``sender`` carries (its key as its request
        named it, the datagram's source as its address): it proves itself by sending it
        back from that address, signed by that key. None if the request named no key."""
        if sender.key is None:
            return None
        self._stats["cookies_sent"] += 1
        address = (sender.ip, sender.port)
        return address_cookie(self._cookie_secret, sender.key, address, int(now // COOKIE_PERIOD))

    def on_proof(self, req: wire.DHTRequest, sender: Node, now: float) -> bool:
        """A ``proof``: our cookie back from the address we sent it to (so the sender
        receives there: an off-path spoofer never sees it), signed by the key the cookie
        was made for (so it holds the key its id is the hash of). True: the pair is now
        proven, and the sender may enter the table, as after a proving reply (the core's
        part). Never answered."""
        address = (sender.ip, sender.port)
        if not self._defended or self.is_verified(sender.id, address, now):
            self._stats["proofs_unneeded"] += 1  # a duplicate, or a replay: nothing to do
            return False
        assert req.cookie is not None and req.signature is not None
        period = int(now // COOKIE_PERIOD)
        if not any(
            hmac.compare_digest(
                req.cookie, address_cookie(self._cookie_secret, req.sender_key, address, p)
            )
            for p in (period, period - 1)
        ):
            self._stats["bad_cookies"] += 1
            return False
        spent = self._spent_cookies
        if req.cookie in spent:
            self._stats["bad_proofs"] += 1
            return False
        self._stats["proofs_checked"] += 1
        message = wire.proof_message(self._node_key.public_key, req.cookie)
        if not verify_signature(req.sender_key, message, req.signature):
            self._stats["bad_proofs"] += 1
            spent[req.cookie] = None
            if len(spent) > SPENT_COOKIES_MAX:
                spent.popitem(last=False)
            return False
        self._mark_verified(sender.id, address, now)
        return True

    # ------------------------------------------------------------------ our own proof

    def proof(self, responder_key: bytes, cookie: bytes) -> bytes:
        """A node we asked wants us to prove our id: the ``proof`` frame to send it, its
        cookie back, signed. Never answered, and sent once per cookie: if it is lost, our
        next request there brings a new cookie. (Returned, not sent: the core sends it
        through its ``_send``, which tests/test_dht_core.py's CoreNet wraps per instance;
        a ``send`` bound here at construction missed the wrapper and changed the
        simulation's order of events.)"""
        self._stats["proofs_sent"] += 1
        self._stats["proofs_signed"] += 1
        signature = self._node_key.sign(wire.proof_message(responder_key, cookie))
        args = [self._node_key.public_key, cookie, signature]
        return wire.encode_request(self._randbytes(wire.MSG_ID_LEN), "proof", args)
