"""What a node storing a mailbox holds: not the text, not the sender, nothing that ties
two puts of one sender together (docs/SECURITY.md, "What a node storing a mailbox
holds")."""

from __future__ import annotations

import itertools

import nacl.bindings
import pytest
import trio

from p2pd.dht.mailbox import mailbox_key
from p2pd.dht.mailbox_entry import HEADER_LEN
from p2pd.testing.swarm import SwarmNode, open_swarm

#: Two entries share no run of this many bytes by chance (two 2 KiB random strings share
#: a given 8-byte run with probability about 2**-40).
RUN = 8


def runs(data: bytes) -> set[bytes]:
    return {data[i : i + RUN] for i in range(len(data) - RUN + 1)}


def identifying(node: SwarmNode) -> dict[str, bytes]:
    """Every byte string that would name ``node`` as a sender."""
    key = node.identity.public_key
    return {
        "identity key": key,
        "identity X25519 key": nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(key),
        "node key": node.node_key.public_key,
        "node id": node.node_key.node_id,
    }


@pytest.mark.slow
async def test_a_storing_node_holds_no_text_no_sender_and_no_link_between_puts() -> None:
    texts = {
        "alice": [b"alice's first secret: meet at nine " * 3, b"alice's second secret, later " * 4],
        "carol": [b"carol's only secret, told once " * 4, b"carol again, with a second note " * 3],
    }
    with trio.fail_after(90):
        async with open_swarm(10) as swarm:
            alice, carol, bob = swarm.nodes[2], swarm.nodes[5], swarm.nodes[8]
            key = mailbox_key(bob.identity.public_key)
            for sender, name in ((alice, "alice"), (carol, "carol")):
                for text in texts[name]:
                    assert await sender.dht.mailbox_put(bob.identity.public_key, text) >= 2
            senders = {"alice": identifying(alice), "carol": identifying(carol)}
            storing = [n for n in swarm.nodes if n not in (alice, carol)]
            checked = 0
            for node in storing:
                mailboxes = node.dht.core.mailboxes
                assert mailboxes is not None
                rows = mailboxes.rows()
                if not rows:
                    continue
                checked += 1
                assert {k for k, _, _, _ in rows} == {key}
                held = b"".join(k + i + e for k, i, e, _ in rows)
                # no text, nor any 8 bytes of it
                for text in itertools.chain(*texts.values()):
                    assert not runs(text) & runs(held)
                # no key or id of either sender
                for name, values in senders.items():
                    for what, value in values.items():
                        assert value not in held, (name, what)
                # nothing shared between two entries but the version and the postage
                # window, which every sender's entry of these ten minutes carries alike
                entries = [e for _, _, e, _ in rows]
                assert len(entries) == 4 and {len(e) for e in entries} == {512}
                assert len({e[:5] for e in entries}) <= 2  # a window boundary: 2
                for one, other in itertools.combinations(entries, 2):
                    assert not runs(one[5:]) & runs(other[5:]), "two entries share bytes"
                    # the sealed box's one-off sender key differs in every entry
                    assert one[HEADER_LEN : HEADER_LEN + 32] != other[HEADER_LEN : HEADER_LEN + 32]
            assert checked >= 6  # k=20 > 10 nodes: every storing node holds the entries
