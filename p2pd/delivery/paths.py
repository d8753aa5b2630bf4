"""How delivery (and calls and files, through it) reaches a peer: :class:`Paths`.

An open connection to the key first (a direct one before a relayed one); else its LAN
addresses, hints and record addresses in turn, raced against its record's relays
(p2pd/relay/): happy eyeballs (RFC 8305 section 5), because a NATed peer's record lists
addresses that never answer, each worth a connect timeout. The relays start at once,
or ``RELAY_HEAD_START`` later when the LAN or a hint knows where the peer is; they are
tried staggered by ``RELAY_STAGGER``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..errors import ConnectionLost, LocalError, PeerKeyMismatch
from ..identity import fingerprint
from ..records import HandleRecord
from ..relay.client import is_virtual
from ..transport.quic import QuicEndpoint, QuicPeer
from ..wire import Address

log = logging.getLogger("p2pd.delivery")

#: How long the direct attempts run alone before a peer's relays are tried too (RFC 8305
#: section 5 suggests 250 ms between address families).
RELAY_HEAD_START = 0.25
#: How long one relay is tried alone before the record's next relay is tried too.
RELAY_STAGGER = 0.5
#: Opens a circuit through a relay to a key and returns its virtual address.
RelayConnect = Callable[[Address, bytes], Awaitable[tuple[str, int]]]


class Paths:
    """Connections to peers by key: ``lan_addresses(key)`` (LAN and hints) before the
    record's addresses, and ``relay_connect`` for the record's relays (None: no relays)."""

    def __init__(
        self,
        quic: QuicEndpoint,
        lan_addresses: Callable[[bytes], list[Address]],
        relay_connect: RelayConnect | None,
        connect_timeout: float,
    ) -> None:
        self.quic = quic
        self.lan_addresses = lan_addresses
        self.relay_connect = relay_connect
        self.connect_timeout = connect_timeout

    async def connect(self, peer_key: bytes, record: HandleRecord | None) -> QuicPeer | None:
        """An open connection to the key, else a new one: its LAN addresses, hints and
        record addresses in turn, raced against its record's relays (see the module's
        docstring)."""
        found = None
        for peer in self.quic.peers():
            if peer.public_key == peer_key and not peer.is_closing:
                if not is_virtual(peer.address[0]):
                    return peer
                found = found or peer  # relayed: a direct one is better, if open
        if found is not None:
            return found
        nearby = list(self.lan_addresses(peer_key))
        addresses = nearby + [a for a in (record.addresses if record else ()) if a not in nearby]
        relays = list(record.relays) if record and self.relay_connect is not None else []
        if not relays:
            return await self._connect_addresses(peer_key, addresses)
        won: list[QuicPeer] = []
        async with trio.open_nursery() as nursery:

            async def attempt(
                delay: float,
                connect: Callable[[bytes, list[Address]], Awaitable[QuicPeer | None]],
                where: list[Address],
            ) -> None:
                await trio.sleep(delay)
                peer = await connect(peer_key, where)
                if peer is not None:
                    won.append(peer)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(attempt, 0.0, self._connect_addresses, addresses)
            # A record lists relays only while its owner is unreachable from outside: its
            # addresses are for its own LAN. So the relays wait only for where the LAN
            # or a hint says the peer is (measured: 250 ms more per first message).
            head_start = RELAY_HEAD_START if nearby else 0.0
            nursery.start_soon(attempt, head_start, self._connect_relays, relays)
        return won[0] if won else None

    async def _connect_relays(self, peer_key: bytes, relays: list[Address]) -> QuicPeer | None:
        """Through the first of ``relays`` that gets us a connection: each starts when
        the one before failed or ``RELAY_STAGGER`` after it started (happy eyeballs
        again), so a dead relay, listed until its clients notice, costs half a second."""
        won: list[QuicPeer] = []
        async with trio.open_nursery() as nursery:
            for relay in relays:
                failed = trio.Event()
                nursery.start_soon(self._via_relay, peer_key, relay, won, nursery, failed)
                with trio.move_on_after(RELAY_STAGGER):
                    await failed.wait()
        return won[0] if won else None

    async def _via_relay(
        self,
        peer_key: bytes,
        relay: Address,
        won: list[QuicPeer],
        race: trio.Nursery,
        failed: trio.Event,
    ) -> None:
        assert self.relay_connect is not None
        try:
            with trio.fail_after(self.connect_timeout):
                virtual = await self.relay_connect(relay, peer_key)
                peer = await self.quic.connect(virtual, peer_key)
        except PeerKeyMismatch:
            log.warning("relay %s: the peer answered with another key", relay)
        except (ConnectionLost, trio.TooSlowError) as exc:
            log.info("no connection to %s through relay %s: %s", _who(peer_key), relay, exc)
        except LocalError as exc:
            log.warning("cannot connect to %s: %s", _who(peer_key), exc)
        else:
            log.info("connected to %s through relay %s", _who(peer_key), relay)
            won.append(peer)
            race.cancel_scope.cancel()
            return
        failed.set()

    async def _connect_addresses(
        self, peer_key: bytes, addresses: list[Address]
    ) -> QuicPeer | None:
        for address in addresses:
            try:
                with trio.fail_after(self.connect_timeout):
                    return await self.quic.connect(address, peer_key)
            except PeerKeyMismatch:
                log.warning("%s answered with another key than %s", address, _who(peer_key))
            except (ConnectionLost, trio.TooSlowError):
                log.debug("no QUIC connection to %s at %s", _who(peer_key), address)
            except LocalError as exc:
                # Our side cannot connect at all (every connection slot taken, the
                # endpoint stopping): like an offline peer, the message goes to the
                # mailbox instead of ending this worker (issue 12).
                log.warning("cannot connect to %s: %s", _who(peer_key), exc)
                return None
        return None


def _who(key: bytes) -> str:
    return fingerprint(key)[:12]
