"""A DHT node's own Ed25519 key: what its node id is earned with.

The node key is NOT the identity (handle) key. A node id taken on trust lets one socket
answer as any number of ids next to a handle's key; an id derived from the identity key
would make every DHT datagram name the handle it serves. So each node has a key of its
own, the id is ``SHA-256(b"p2pd node id v2\\x00" || node public key)[:20]`` (computed by
:func:`p2pd.wire.node_id_for`, since the receiver of a contact derives it), and a node
proves it holds the key by signing replies (docs/PROTOCOL.md, "DHT frames").

There is no S/Kademlia crypto puzzle on ids. One key and its id cost about 60 µs in
Python (``NodeKey.generate`` then ``node_id``; measured in docs/ARCHITECTURE.md): any
puzzle a Python node can afford at its first start (say a few seconds) is a few
milliseconds per id to an attacker grinding ids in C on a GPU. What binds an attacker is
the number of addresses it answers from: the routing table and every lookup keep at most
``max_per_ip`` ids per IP address and ``max_per_subnet`` per /24 or /48
(:class:`~p2pd.config.DHTConfig`).

The daemon keeps its node key in ``<home>/node.key`` (32 raw seed bytes, mode 0600), made
on first start and made again, with a log line, if it is missing or damaged. The seed is
never logged or printed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nacl.signing

from ..keystore import write_private_file
from ..wire import node_id_for

log = logging.getLogger(__name__)

SEED_LEN = 32
NODE_KEY_FILE = "node.key"


class NodeKey:
    """An Ed25519 signing key for DHT traffic. Its repr never shows the seed."""

    __slots__ = ("_signing", "node_id", "public_key")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.node_id: bytes = node_id_for(self.public_key)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        if len(seed) != SEED_LEN:
            raise ValueError("a node key seed is 32 bytes")
        return cls(nacl.signing.SigningKey(seed))

    def sign(self, message: bytes) -> bytes:
        return bytes(self._signing.sign(message).signature)

    def __repr__(self) -> str:
        return f"NodeKey(node_id={self.node_id.hex()})"


def load_or_create_node_key(home: Path) -> NodeKey:
    """The node key kept in ``home``; a new one if it is missing or damaged."""
    path = home / NODE_KEY_FILE
    try:
        seed = path.read_bytes()
    except FileNotFoundError:
        seed = b""
        log.info("no DHT node key in %s: generating one (a new node id)", home)
    except OSError as exc:
        seed = b""
        log.warning("cannot read the DHT node key %s (%s): generating a new one", path, exc)
    else:
        if len(seed) != SEED_LEN:
            log.warning("the DHT node key %s is damaged: generating a new one", path)
    if len(seed) == SEED_LEN:
        return NodeKey.from_seed(seed)
    seed = os.urandom(SEED_LEN)
    tmp = path.with_name(NODE_KEY_FILE + ".tmp")
    write_private_file(tmp, seed)
    os.replace(tmp, path)
    return NodeKey.from_seed(seed)
