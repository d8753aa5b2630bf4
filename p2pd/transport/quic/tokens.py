"""Retry tokens (RFC 9000 section 8.1.2, address validation): :class:`RetryTokens`.

A server that answers an Initial with a Retry keeps no state: everything it needs when
the client comes back is in the token, which only the server can make. Ours is::

    issued (8, signed big-endian milliseconds) | len (1) | original DCID (len <= 20)
    | tag (16): HMAC-SHA256, truncated, over a label, the client's IP address and port,
      the Retry's Source Connection ID, issued, len and the original DCID

under a 32-byte key drawn when the endpoint starts and held in memory only (a restart
voids every token, which costs a client one more Retry). A token is good only from the
address it was sent to, for the connection ID the client must use after a Retry, and
for :data:`TOKEN_LIFETIME` seconds: "clients return retry tokens immediately" (section
8.1.4; a round trip), so 10 s spares slow paths and leaves little to replay. The
original DCID travels in the clear: it was on the wire already. Pure: ``now`` is any
clock, used consistently (the endpoint passes ``trio.current_time()``).

aioquic has a token handler (its asyncio server's, undocumented): making a token costs
17 us there against 5 us here (AES-GCM and ``ipaddress`` parsing against one HMAC;
measured with ``timeit`` on the development machine), its lifetime is fixed at 30 s,
and under a flood the Retry path (about 40 us per Initial in all) is what the server
runs most.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

#: A Retry token is refused this long after it was made (seconds).
TOKEN_LIFETIME = 10.0
#: RFC 9000 section 17.2: connection IDs are at most 20 bytes in QUIC version 1.
MAX_CID = 20
TAG_SIZE = 16
_ISSUED = struct.Struct(">q")
_LABEL = b"p2pd quic retry token 1"
#: The longest token we make; a longer one is refused before any hashing.
MAX_TOKEN = _ISSUED.size + 1 + MAX_CID + TAG_SIZE


class RetryTokens:
    """Make and check Retry tokens (module docstring)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else os.urandom(32)

    def _tag(self, address: tuple[str, int], retry_cid: bytes, body: bytes) -> bytes:
        host = address[0].encode()
        message = b"".join(
            (
                _LABEL,
                bytes((len(host),)),
                host,
                struct.pack(">H", address[1] & 0xFFFF),
                bytes((len(retry_cid),)),
                retry_cid,
                body,
            )
        )
        return hmac.digest(self._key, message, hashlib.sha256)[:TAG_SIZE]

    def create(
        self, address: tuple[str, int], original_cid: bytes, retry_cid: bytes, now: float
    ) -> bytes:
        """A token for a client at ``address`` whose first Initial went to
        ``original_cid``, told by our Retry to use ``retry_cid``."""
        if len(original_cid) > MAX_CID or len(retry_cid) > MAX_CID:
            raise ValueError("a connection ID is at most 20 bytes")
        body = _ISSUED.pack(round(now * 1000)) + bytes((len(original_cid),)) + original_cid
        return body + self._tag(address, retry_cid, body)

    def validate(
        self, address: tuple[str, int], destination_cid: bytes, token: bytes, now: float
    ) -> bytes | None:
        """The original DCID if ``token`` is ours, for ``address``, for an Initial sent
        to ``destination_cid`` (our Retry's Source Connection ID) and not expired;
        else None."""
        if not _ISSUED.size + 1 + TAG_SIZE <= len(token) <= MAX_TOKEN:
            return None
        if len(destination_cid) > MAX_CID:
            return None
        length = token[_ISSUED.size]
        if len(token) != _ISSUED.size + 1 + length + TAG_SIZE:
            return None
        body, tag = token[:-TAG_SIZE], token[-TAG_SIZE:]
        if not hmac.compare_digest(tag, self._tag(address, destination_cid, body)):
            return None
        (issued_ms,) = _ISSUED.unpack_from(body)
        age = now - issued_ms / 1000
        if not -0.001 <= age <= TOKEN_LIFETIME:  # -0.001: issued was rounded
            return None
        return body[_ISSUED.size + 1 :]
