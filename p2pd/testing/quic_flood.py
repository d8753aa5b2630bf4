"""QUIC Initial packets for flood tests and benchmarks: real ones, made cheaply.

An attacker who spoofs source addresses sends Initial packets it never follows up. For
the server to do the work a real handshake costs (decrypt, parse a ClientHello, run the
TLS key exchange, sign, send its flight) each must be a real, fresh Initial: a new
Destination Connection ID, from which its keys derive (RFC 9001 section 5.2), around a
ClientHello the server accepts. Making one with aioquic's client takes about 3 ms (it
generates key shares); :class:`InitialForge` captures one ClientHello once and seals it
into a new Initial per call (an HKDF and one AES-GCM, tens of microseconds), as an
attacker replaying a captured ClientHello would.

Used by tests/test_quic_floods.py and scripts/bench_quic_flood.py.
"""

from __future__ import annotations

import os
import ssl

from ..transport.quic._aioquic import (
    SMALLEST_MAX_DATAGRAM_SIZE,
    Buffer,
    Connection,
    CryptoPair,
    QuicConfiguration,
    QuicFrameType,
    QuicPacketBuilder,
    QuicPacketType,
    pull_quic_header,
)
from ..transport.quic.codes import ALPN, CID_LENGTH

#: Frame types (RFC 9000 section 19) met in a client's first Initial.
_PADDING, _PING, _CRYPTO = 0x00, 0x01, 0x06


def client_initial(server: tuple[str, int], alpn: str = ALPN) -> bytes:
    """One real first Initial datagram of an aioquic client (no certificate)."""
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=[alpn], verify_mode=ssl.CERT_NONE
    )
    conn = Connection(configuration=configuration, stream_window=1 << 16)
    conn.connect(server, now=0.0)
    data: bytes = conn.datagrams_to_send(now=0.0)[0][0]
    return data


def client_hello_of(initial: bytes) -> tuple[int, bytes, bytes]:
    """The QUIC version, Source Connection ID and TLS ClientHello of a client's first
    Initial, decrypted with the Initial keys its Destination Connection ID gives
    anyone."""
    buf = Buffer(data=initial)
    header = pull_quic_header(buf, host_cid_length=CID_LENGTH)
    assert header.version is not None and header.packet_type == QuicPacketType.INITIAL
    crypto = CryptoPair()
    crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
    _, payload, _ = crypto.decrypt_packet(initial[: header.packet_length], buf.tell(), 0)
    frames = Buffer(data=payload)
    chunks: dict[int, bytes] = {}
    while not frames.eof():
        frame_type = frames.pull_uint_var()
        if frame_type in (_PADDING, _PING):
            continue
        if frame_type != _CRYPTO:
            raise ValueError(f"unexpected frame {frame_type:#x} in a first Initial")
        offset, length = frames.pull_uint_var(), frames.pull_uint_var()
        chunks[offset] = frames.pull_bytes(length)
    hello = b"".join(chunks[k] for k in sorted(chunks))
    return header.version, header.source_cid, hello


class InitialForge:
    """Fresh, valid client Initial datagrams (1,200 bytes) around one captured
    ClientHello; each call draws a new Destination Connection ID (a new connection
    for the server). The Source Connection ID stays the captured one: the ClientHello's
    initial_source_connection_id transport parameter must match it (RFC 9000 section
    7.3), or the server closes at once instead of answering with its flight."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.version, self.source_cid, self.client_hello = client_hello_of(client_initial(server))

    def initial(self) -> bytes:
        dcid, scid = os.urandom(CID_LENGTH), self.source_cid
        crypto = CryptoPair()
        crypto.setup_initial(cid=dcid, is_client=True, version=self.version)
        builder = QuicPacketBuilder(
            host_cid=scid,
            peer_cid=dcid,
            version=self.version,
            is_client=True,
            max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
        )
        builder.start_packet(QuicPacketType.INITIAL, crypto)
        hello = self.client_hello
        buf = builder.start_frame(QuicFrameType.CRYPTO, capacity=len(hello) + 16)
        buf.push_uint_var(0)
        buf.push_uint_var(len(hello))
        buf.push_bytes(hello)
        datagrams, _ = builder.flush()
        data: bytes = datagrams[0]
        return data
