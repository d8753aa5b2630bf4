#!/usr/bin/env python3
"""One side of a call in a process of its own, for scripts/bench_call.py's CPU figures.

With both sides in one process on one trio thread, "CPU / wall / 2" tops out near 50 %
of a core, so a "< 50 % per side" goal could hardly fail (issue 15). Here each side has
its process, its trio thread, its QUIC endpoint and its codecs, and measures its own
CPU time (``time.process_time``: all of its threads) over its own call.

    _call_side.py answer --duration S [media options]      # first line: {"port", "key"}
    _call_side.py call --peer PORT --key HEX --duration S [media options]

Both print, last, one JSON line: ``{"cpu_s", "wall_s", "stats"}`` (``stats``: the
side's ``CallMedia.statistics()``; none for an idle connection). 127.0.0.1 only; every
wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from p2pd.identity import Identity
from p2pd.media import CallMedia
from p2pd.transport.quic import QuicPeer, open_quic_endpoint
from p2pd.transport.udp import UdpEndpoint
from p2pd.wire import Address

#: Connecting, opening sources and closing may take this long on top of a call.
SLACK = 30.0


async def side(args: argparse.Namespace) -> dict[str, Any]:
    identity = Identity.generate(args.role)
    udp = UdpEndpoint.bind(Address("127.0.0.1", 0))
    holder: list[CallMedia] = []
    incoming: list[QuicPeer] = []
    connected = trio.Event()

    def on_datagram(peer: QuicPeer, data: bytes) -> None:
        if holder:
            holder[0].datagram_received(data)

    def on_connection(peer: QuicPeer) -> None:
        incoming.append(peer)
        connected.set()

    try:
        with trio.fail_after(args.duration + SLACK):
            async with (
                open_quic_endpoint(
                    udp, identity, on_datagram=on_datagram, on_connection=on_connection
                ) as quic,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(udp.serve, lambda data, addr: None, quic.datagram_received)
                if args.role == "answer":
                    port = udp.local_address.as_tuple()[1]
                    print(json.dumps({"port": port, "key": identity.public_key.hex()}), flush=True)
                    await connected.wait()
                    peer = incoming[0]
                else:
                    peer = await quic.connect(
                        Address("127.0.0.1", args.peer), bytes.fromhex(args.key)
                    )
                result = await run_media(args, peer, holder)
                nursery.cancel_scope.cancel()
                return result
    finally:
        udp.close()


async def run_media(args: argparse.Namespace, peer: QuicPeer, holder: list[CallMedia]) -> dict:  # type: ignore[type-arg]
    if args.audio_in is None:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await trio.sleep(args.duration)
        return {
            "cpu_s": time.process_time() - cpu0,
            "wall_s": time.perf_counter() - wall0,
            "stats": {},
        }
    media = CallMedia(
        peer,
        audio_in=args.audio_in,
        video_in=args.video_in,
        record=Path(args.record) if args.record else None,
        duration=args.duration,
        audio_out=args.audio_out,
    )
    holder.append(media)
    async with trio.open_nursery() as nursery:
        await nursery.start(media.run)
        cpu0, wall0 = time.process_time(), time.perf_counter()
    return {
        "cpu_s": time.process_time() - cpu0,
        "wall_s": time.perf_counter() - wall0,
        "stats": media.statistics(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("answer", "call"))
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--peer", type=int, help="call: the answering side's UDP port")
    parser.add_argument("--key", help="call: its public key, hex")
    parser.add_argument("--audio-in", help="an audio source spec (none: an idle connection)")
    parser.add_argument("--audio-out", help="speaker[:NAME] to play what is received")
    parser.add_argument("--video-in")
    parser.add_argument("--record")
    args = parser.parse_args()
    if args.role == "call" and (args.peer is None or args.key is None):
        parser.error("call needs --peer and --key")
    print(json.dumps(trio.run(side, args)), flush=True)


if __name__ == "__main__":
    main()
