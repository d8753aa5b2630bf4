"""A peer that restarted is reached over its new connection, on real QUIC on loopback.

After a kill -9 the old connection still looks open on our side until its idle timeout
(30 s), while the restarted peer's new one works; whoever asks the endpoint for a
connection to that key (delivery's and files' connect) takes the first one
:meth:`QuicEndpoint.peers` lists. They used to come from a set, and about half the time
a file transfer to a restarted receiver waited out the idle timeout."""

from __future__ import annotations

import trio

from p2pd.delivery.paths import Paths
from p2pd.identity import Identity
from p2pd.testing.quic_nodes import open_node

TIMEOUT = 10


async def test_the_newest_connection_to_a_key_is_the_one_delivery_takes() -> None:
    bob_id = Identity.generate("bob")
    with trio.fail_after(TIMEOUT):
        async with (
            open_node("alice") as alice,
            open_node(identity=bob_id) as bob_before,
            open_node(identity=bob_id) as bob_after,  # the same key on a new port
        ):
            paths = Paths(alice.quic, lambda key: [], None, connect_timeout=3.0)
            old = await alice.quic.connect(bob_before.address, bob_id.public_key)
            assert await paths.connect(bob_id.public_key, None) is old
            new = await alice.quic.connect(bob_after.address, bob_id.public_key)
            assert new is not old and not old.is_closing  # both open, as after a restart
            to_bob = [p for p in alice.quic.peers() if p.public_key == bob_id.public_key]
            assert to_bob == [new, old]
            for _ in range(5):  # not an accident of one ordering
                assert await paths.connect(bob_id.public_key, None) is new
            old.close()
            assert await paths.connect(bob_id.public_key, None) is new
