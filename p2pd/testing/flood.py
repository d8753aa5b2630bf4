"""A DHT flooder for tests and benchmarks: hostile datagrams at full speed, on loopback.

Each attack is one function in :data:`ATTACKS` that builds the frames one attacker
sends (a new attack, e.g. a QUIC Initial flood, is one more entry); :func:`flood` sends
them round-robin as fast as a socket takes them for a bounded time, from one loopback
source address or, for ``sources > 1``, from that many (one socket each, on addresses
127.S.x.y: a spoofed-looking many-source flood). Run it as a process, so that the
attacker does not share the victim's interpreter::

    python -m p2pd.testing.flood --target 127.0.5.1:4747 --attack find_value \\
        --seconds 2 --source 127.66.0.1 [--sources 256]

It prints ``sending`` once it starts, then one JSON line at the end: ``{"sent": N,
"bytes": B, "replies": R, "reply_bytes": RB}``
(replies read back on its sockets, for the amplification factor). Only 127.0.0.0/8 is
ever a target or a source.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import select
import socket
import sys
import time
from collections.abc import Callable

from .. import wire
from ..dht import mailbox_entry
from ..dht.budget import REQUEST_PAD, REQUEST_PAD_MIN
from ..dht.mailbox import fetch_message
from ..dht.mailbox_revoke import pin_message
from ..identity import Identity
from ..records import HandleRecord

#: Frames built per attack (sent round-robin, each with its own message id).
FRAMES = 64


def _request(method: str, args: list[object], *, prove: bool = True) -> bytes:
    """A request as an honest stranger would send it (padded, asking for a signed reply):
    the most work it can ask of the victim, the most reply it can draw."""
    pad = REQUEST_PAD.get(method, REQUEST_PAD_MIN)
    sender = os.urandom(32)
    return wire.encode_request(os.urandom(20), method, [sender, *args], prove, pad)


def _ping(rng: random.Random) -> bytes:
    return _request("ping", [])


def _find_node(rng: random.Random) -> bytes:
    return _request("find_node", [rng.randbytes(20)])


def _find_value(rng: random.Random) -> bytes:
    return _request("find_value", [rng.randbytes(20)])


def _store(rng: random.Random) -> bytes:
    """A valid record under a new key each time: a storage-fill attack (each costs the
    victim a signature check)."""
    identity = Identity.generate(f"junk{rng.randrange(1 << 30)}")
    record = HandleRecord.create(
        identity, [wire.Address("192.0.2.1", 9)], seq=1, now=int(time.time()), lifetime=3600
    )
    return _request("store", [record.key, record.encode()])


#: The postage a junk mailbox entry pays (p2pd/dht/mailbox_entry.py): far below the
#: default ``postage_bits``, so a default node refuses the flood (``mailbox_refused_postage``);
#: a victim configured this low lets it through to its quotas.
JUNK_POSTAGE_BITS = 6


def junk_entry(rng: random.Random, key: bytes, bits: int = JUNK_POSTAGE_BITS) -> bytes:
    """A sealed-looking 512-byte entry for mailbox ``key`` with ``bits`` of postage."""
    sealed = rng.randbytes(512 - mailbox_entry.HEADER_LEN)
    return mailbox_entry.stamp(key, sealed, time.time(), bits)


def _mailbox_put(rng: random.Random) -> bytes:
    """A sealed-looking entry for a random mailbox key: fills a node's mailbox storage."""
    key = rng.randbytes(20)
    return _request("mailbox_put", [key, junk_entry(rng, key)], prove=False)


def _mailbox_fetch(rng: random.Random) -> bytes:
    """A correctly signed fetch (an owner with nothing stored), replayed."""
    owner = Identity.generate("owner")
    ts = int(time.time())
    signature = owner.sign(fetch_message(owner.public_key, ts, b""))
    return _request("mailbox_fetch", [owner.public_key, ts, b"", signature])


def _mailbox_delete(rng: random.Random) -> bytes:
    ids = [rng.randbytes(16)]
    return _request("mailbox_delete", [rng.randbytes(32), int(time.time()), ids, rng.randbytes(64)])


def _mailbox_relay(rng: random.Random) -> bytes:
    """A put to relay (p2pd/dht/mailbox_relay.py) to a node that is not there (the
    discard port): what the relay sends on, and its budget."""
    key = rng.randbytes(20)
    args = [rng.randbytes(32), "127.0.0.1", 9, key, junk_entry(rng, key)]
    return _request("mailbox_relay", args, prove=False)


def _mailbox_find(rng: random.Random) -> bytes:
    """A lookup to run for the flooder (p2pd/dht/mailbox_find.py): the relay's lookup
    budget, and its cache."""
    return _request("mailbox_find", [rng.randbytes(20)], prove=False)


def _mailbox_revoke(rng: random.Random) -> bytes:
    """A pin revoking passes (p2pd/dht/mailbox_revoke.py), well signed by a throwaway
    identity: the victim checks it in full and holds it (its table of pins)."""
    owner = Identity.generate("flood")
    now = int(time.time())
    pass_key = rng.randbytes(32)
    expires = now + 7 * 24 * 3600
    signature = owner.sign(pin_message(owner.public_key, now, expires, pass_key))
    return _request("mailbox_revoke", [owner.public_key, now, expires, pass_key, signature])


def _proof(rng: random.Random) -> bytes:
    return _request("proof", [rng.randbytes(16), rng.randbytes(64)], prove=False)


#: attack name -> one frame of it (called FRAMES times per attacker).
ATTACKS: dict[str, Callable[[random.Random], bytes]] = {
    "ping": _ping,
    "find_node": _find_node,
    "find_value": _find_value,
    "store": _store,
    "mailbox_put": _mailbox_put,
    "mailbox_fetch": _mailbox_fetch,
    "mailbox_delete": _mailbox_delete,
    "proof": _proof,
    "mailbox_relay": _mailbox_relay,
    "mailbox_find": _mailbox_find,
    "mailbox_revoke": _mailbox_revoke,
}


def _loopback(host: str) -> str:
    if ipaddress.ip_address(host) not in ipaddress.ip_network("127.0.0.0/8"):
        raise ValueError(f"the flooder uses 127.0.0.0/8 only, not {host}")
    return host


def source_addresses(first: str, count: int) -> list[str]:
    """``count`` loopback addresses from ``first`` on, one per /24 after the first
    (127.S.x.1, x counting up), so that many sources also span many /24s."""
    base = ipaddress.IPv4Address(_loopback(first))
    if count == 1:
        return [str(base)]
    return [str(base + 256 * i) for i in range(count)]


def flood(
    target: tuple[str, int],
    attack: str,
    seconds: float,
    *,
    source: str = "127.66.0.1",
    sources: int = 1,
    seed: int = 0,
    on_start: Callable[[], None] | None = None,
) -> dict[str, int]:
    """Send ``attack`` frames to ``target`` as fast as possible for ``seconds``; count
    what was sent and what came back. ``on_start`` is called once the frames are built,
    just before the first is sent."""
    _loopback(target[0])
    rng = random.Random(seed)
    frames = [ATTACKS[attack](rng) for _ in range(FRAMES)]
    socks = []
    for host in source_addresses(source, sources):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.setblocking(False)
        socks.append(sock)
    sent = sent_bytes = replies = reply_bytes = 0
    if on_start is not None:
        on_start()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            for sock in socks:
                for frame in frames[:8] if sources > 1 else frames:
                    try:
                        sock.sendto(frame, target)
                    except (BlockingIOError, InterruptedError):
                        continue  # our own send buffer is full: go on
                    sent += 1
                    sent_bytes += len(frame)
                frames.append(frames.pop(0))
            readable, _, _ = select.select(socks, [], [], 0)
            for sock in readable:
                for _ in range(256):
                    try:
                        data = sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    replies += 1
                    reply_bytes += len(data)
    finally:
        for sock in socks:
            sock.close()
    return {"sent": sent, "bytes": sent_bytes, "replies": replies, "reply_bytes": reply_bytes}


def flood_command(
    target: tuple[str, int],
    attack: str,
    seconds: float,
    *,
    source: str = "127.66.0.1",
    sources: int = 1,
) -> list[str]:
    """The command line that runs :func:`flood` in a process of its own."""
    return [
        sys.executable,
        "-m",
        "p2pd.testing.flood",
        "--target",
        f"{target[0]}:{target[1]}",
        "--attack",
        attack,
        "--seconds",
        str(seconds),
        "--source",
        source,
        "--sources",
        str(sources),
    ]


async def run(
    target: tuple[str, int],
    attack: str,
    seconds: float,
    *,
    source: str = "127.66.0.1",
    sources: int = 1,
    on_start: Callable[[], None] | None = None,
) -> dict[str, int]:
    """Run :func:`flood` in a process of its own (:func:`flood_command`) and return what
    it reports; ``on_start`` is called once it says it is sending. Under the test
    harness (p2pd.testing.daemons.use_forkserver) the process is forked from the daemons'
    template, which has imported all that the flooder needs: its ~0.2 s of imports
    saved, each of test_floods' 14 floods (p2pd/testing/forkserver.py :func:`start`);
    otherwise (``P2PD_TEST_FORK=0``, coverage, the benchmarks) it is exec'd. Either way
    stdin is /dev/null, stdout a pipe read here, stderr the caller's fd 2. Bounded: the
    read by the flooder's own end (``seconds``, at most 60), the wait after it by 10 s
    (then it is killed)."""
    import subprocess

    import trio

    from . import daemons, forkserver

    command = flood_command(target, attack, seconds, source=source, sources=sources)
    proc: trio.Process | forkserver.ForkedProcess
    stream: trio.abc.ReceiveStream
    if daemons._fork and not daemons._coverage():
        read, write = os.pipe()
        try:
            # argv as ``python -m`` gives it: this module's path, then the options. (The
            # child then has this directory first on sys.path where ``-m`` puts the
            # working directory; the flooder imports nothing by a top-level name.)
            proc = forkserver.start(
                [os.path.abspath(__file__), *command[3:]],
                dict(os.environ),
                entry=f"{__name__}:main",
                stdout=write,
                stderr=2,
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        stream = trio.lowlevel.FdStream(read)
    else:
        proc = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        stream = proc.stdout

    async def wait() -> None:
        if isinstance(proc, trio.Process):
            await proc.wait()
            return
        for _ in range(100_000):  # (bounded; the move_on_after below bounds the time)
            if proc.poll() is not None:
                return
            await trio.sleep(0.005)

    out = b""
    try:
        async with stream:
            for _ in range(10_000):  # (bounded: it prints two lines)
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                out += chunk
                if on_start is not None and b"sending\n" in out:
                    on_start()  # its frames are built: it is sending
                    on_start = None
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(10):  # it stops by itself after ``seconds``
                await wait()
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(10):
                    await wait()
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise RuntimeError(f"the flooder failed (exit {proc.returncode}): {out!r}")
    result: dict[str, int] = json.loads(lines[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT on 127.0.0.0/8")
    parser.add_argument("--attack", required=True, choices=sorted(ATTACKS))
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--source", default="127.66.0.1")
    parser.add_argument("--sources", type=int, default=1)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    seconds = min(args.seconds, 60.0)  # bounded whatever it is asked
    result = flood(
        (host, int(port)),
        args.attack,
        seconds,
        source=args.source,
        sources=args.sources,
        on_start=lambda: print("sending", flush=True),
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
