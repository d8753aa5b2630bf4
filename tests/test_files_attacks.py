"""Files under attack, with two in-process nodes over real QUIC on loopback: a forged
chunk (a bit flipped after sealing) is refused, counted and fetched again, and the
sender comes back at once after each; a wrong root is refused every time until the
transfer fails, nothing saved; a network drop that kills the connection is resumed on
a new one; a disk that corrupts the file is given up on; a hostile name lands as a
safe one inside the files dir; garbage, oversized and misdirected file streams are
refused and change nothing; transfers that ended, however, leave nothing in memory
(issue 14)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from p2pd.config import FilesConfig, LanConfig, NodeConfig, QuicConfig
from p2pd.daemon import Node, open_node
from p2pd.files import incoming, outgoing, protocol
from p2pd.files.outgoing import OutgoingTransfers
from p2pd.files.protocol import F_CHUNK, Layout, Offer, hash_file, root_of
from p2pd.files.service import FilesService
from p2pd.identity import Identity
from p2pd.testing import waiting
from p2pd.testing.daemons import short_tempdir
from p2pd.testing.proxy import open_lossy_proxy
from p2pd.wire import Address


@pytest.fixture()
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-fatk-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def node(
    root: Path,
    identity: Identity,
    bootstrap: tuple[Address, ...] = (),
    max_rate: int = 0,
    listen: int = 0,
    advertise: tuple[str, int] | None = None,
    max_pending_per_peer: int = 20,
    auto_accept_daily_per_peer: int = 1_000_000_000,
    idle_timeout: float = 30.0,
) -> AsyncIterator[Node]:
    downloads = root / f"{identity.handle}-dl"
    downloads.mkdir(exist_ok=True)
    config = NodeConfig(
        home=root / identity.handle,
        listen=Address("127.0.0.1", listen),
        advertise=() if advertise is None else (Address(*advertise),),
        bootstrap=bootstrap,
        ack_timeout=2.0,
        connect_timeout=1.0,
        lan=LanConfig(mode="off"),
        quic=QuicConfig(idle_timeout=idle_timeout),
        files=FilesConfig(
            dir=str(downloads),
            max_rate=max_rate,
            max_pending_per_peer=max_pending_per_peer,
            auto_accept_daily_per_peer=auto_accept_daily_per_peer,
        ),
    )
    async with open_node(config, identity) as n:
        yield n


def files_of(n: Node) -> FilesService:
    assert n.files is not None
    return n.files


#: How often the waits below ask. Their predicates mostly read every transfer from the
#: database (``FilesService.transfers``: a query, an offer decoded per row), and at
#: wait_for's default 5 ms a long wait (a transfer through the lossy proxy and its
#: blackout, ~10 s) asked some 1,300 times, each a scheduling round of the process that
#: runs both nodes: 0.1-0.2 s of CPU a test. 20 ms costs a wait 10 ms on average.
POLL = 0.02


async def wait_for(predicate: Callable[[], object], *, timeout: float = 30.0) -> None:
    await waiting.wait_for(predicate, timeout=timeout, interval=POLL)


def state_of(n: Node, direction: str) -> str:
    rows = [f for f in files_of(n).transfers() if f["direction"] == direction]
    return rows[0]["state"] if rows else ""


@asynccontextmanager
async def pair(root: Path, max_rate: int = 0) -> AsyncIterator[tuple[Node, Node]]:
    alice_id, bob_id = Identity.generate("alice"), Identity.generate("bob")
    async with (
        node(root, alice_id, max_rate=max_rate) as alice,
        node(root, bob_id, bootstrap=(alice.listen_address,)) as bob,
    ):
        # bob pins alice (as a first message would): her files are accepted at once
        bob.delivery.contacts.pin("alice", alice_id.public_key, time.time())
        yield alice, bob


async def test_a_forged_chunk_is_refused_counted_and_fetched_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = root / "payload.bin"
    data = os.urandom(5 * (1 << 20) + 99)
    src.write_bytes(data)
    real = protocol.SenderStream.chunk_frame
    forged: list[int] = []

    def forge_once(self: protocol.SenderStream, index: int, plain: bytes) -> bytes:
        frame = real(self, index, plain)
        if index == 40 and not forged:  # in the third group, once: one bit of ciphertext
            forged.append(index)
            frame = frame[:20] + bytes([frame[20] ^ 1]) + frame[21:]
        return frame

    monkeypatch.setattr(protocol.SenderStream, "chunk_frame", forge_once)
    with trio.fail_after(120):
        async with pair(root) as (alice, bob):
            await files_of(alice).send_file("bob", str(src))
            await wait_for(lambda: state_of(bob, "in") == "done", timeout=90)
            got = files_of(bob).transfers()[0]
            assert forged == [40]
            assert got["refused"] == 1 and files_of(bob).stats["chunks_refused"] == 1
            assert Path(got["path"]).read_bytes() == data
            # resumed at the refused group (2): what came again is at most that group
            assert got["resent"] <= 1 << 20
            await wait_for(lambda: state_of(alice, "out") == "done")


async def test_a_hostile_name_lands_inside_the_files_dir(root: Path) -> None:
    src = root / "innocent.txt"
    src.write_bytes(b"payload")
    with trio.fail_after(60):
        async with pair(root) as (alice, bob):
            files = files_of(alice)
            layout = Layout.for_size(7)
            hashes = hash_file(src, layout)
            for name in ("../../escaped.txt", "/etc/passwd", ".hidden", "a\x1b[31mred"):
                offer = Offer(os.urandom(16), os.urandom(32), layout, root_of(hashes), name)
                # what send_file does, with the name a hostile sender would put
                files.offer("bob", bob.identity.public_key, offer, str(src), hashes)
            await wait_for(
                lambda: len([f for f in files_of(bob).transfers() if f["state"] == "done"]) == 4
            )
            downloads = root / "bob-dl"
            saved = sorted(p.name for p in downloads.iterdir())
            assert saved == ["a_[31mred", "escaped.txt", "hidden", "passwd"]
            assert (
                not (root / "escaped.txt").exists() and not (root.parent / "escaped.txt").exists()
            )
            assert all((downloads / n).read_bytes() == b"payload" for n in saved)


async def test_garbage_and_misdirected_file_streams_change_nothing(root: Path) -> None:
    with trio.fail_after(60):
        async with pair(root) as (alice, bob):
            carol = Identity.generate("carol")
            async with node(root, carol, bootstrap=(alice.listen_address,)) as mallory:
                peer = await mallory.quic.connect(bob.listen_address, bob.identity.public_key)
                bad_streams = [
                    protocol.STREAM_HEADER + struct.pack(">BI", F_CHUNK, protocol.MAX_FRAME + 1),
                    protocol.STREAM_HEADER + struct.pack(">BI", 99, 0),
                    bytes([protocol.STREAM_MAGIC, 9]) + b"\0" * 20,  # an unknown version
                    protocol.STREAM_HEADER + protocol.encode_frame(F_CHUNK, b"\0" * 40),
                ]
                for payload in bad_streams:
                    stream = await peer.open_stream()
                    await stream.send_all(payload)
                    with trio.fail_after(10):
                        while True:  # bob resets it
                            try:
                                if not await stream.receive_some():
                                    break
                            except trio.BrokenResourceError:
                                break
                assert files_of(bob).stats["streams_refused"] == len(bad_streams)
                # OPEN for a transfer that is alice's, from mallory: answered as unknown
                src = root / "x.bin"
                src.write_bytes(os.urandom(70_000))
                sent = await files_of(alice).send_file("bob", str(src))
                await wait_for(lambda: state_of(bob, "in") == "done")
                stream = await peer.open_stream()
                tid = bytes.fromhex(sent["id"])
                await stream.send_all(
                    protocol.STREAM_HEADER + protocol.encode_frame(protocol.F_OPEN, tid)
                )
                answer = b""
                with trio.fail_after(10):
                    while chunk := await stream.receive_some():
                        answer += chunk
                assert answer == protocol.encode_frame(protocol.F_WAIT)
                # a CANCEL from mallory for alice's transfer changes nothing either
                stream = await peer.open_stream()
                await stream.send_all(protocol.control_frames(protocol.F_CANCEL, tid, 2), eof=True)
                await trio.sleep(0.3)  # nothing to wait for: a change would be the failure
                assert state_of(bob, "in") == "done"
                assert (
                    hashlib.sha256(src.read_bytes()).digest()
                    == hashlib.sha256((root / "bob-dl" / "x.bin").read_bytes()).digest()
                )


async def test_the_sender_cancels_mid_way_and_the_receiver_keeps_nothing(root: Path) -> None:
    src = root / "big.bin"
    src.write_bytes(os.urandom(6 << 20))
    with trio.fail_after(60):
        async with pair(root, max_rate=2_000_000) as (alice, bob):
            sent = await files_of(alice).send_file("bob", str(src))
            await wait_for(
                lambda: sum(f["bytes_done"] for f in files_of(bob).transfers()) >= 1 << 20
            )
            await files_of(alice).cancel(sent["id"][:8])
            await wait_for(lambda: state_of(bob, "in") == "cancelled")
            assert state_of(alice, "out") == "cancelled"
            assert list((root / "bob-dl").iterdir()) == []  # the partial file is gone


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_a_transfer_crosses_a_lossy_path_with_a_blackout(root: Path) -> None:
    """Every QUIC connection goes through a lossy proxy (each node advertises its own:
    2 % loss, 1 % duplication, 5 % reordering, both ways), and the path goes black for
    3 s mid-way: the file arrives whole and identical, and the proxy's counters show that
    datagrams were dropped, duplicated and reordered."""
    src = root / "lossy.bin"
    data = os.urandom(6 << 20)
    src.write_bytes(data)
    alice_id, bob_id = Identity.generate("alice"), Identity.generate("bob")
    ports = {"alice": free_udp_port(), "bob": free_udp_port()}
    impair = {"drop": 0.02, "duplicate": 0.01, "reorder": 0.05}
    with trio.fail_after(120):
        async with (
            open_lossy_proxy(("127.0.0.1", ports["alice"]), seed=1, **impair) as to_alice,
            open_lossy_proxy(("127.0.0.1", ports["bob"]), seed=2, **impair) as to_bob,
            node(root, alice_id, listen=ports["alice"], advertise=to_alice.address) as alice,
            node(
                root,
                bob_id,
                bootstrap=(alice.listen_address,),
                listen=ports["bob"],
                advertise=to_bob.address,
            ) as bob,
        ):
            bob.delivery.contacts.pin("alice", alice_id.public_key, time.time())
            await files_of(alice).send_file("bob", str(src))
            await wait_for(
                lambda: sum(f["bytes_done"] for f in files_of(bob).transfers()) >= 2 << 20,
                timeout=60,
            )
            to_bob.blackout(3.0)
            await wait_for(lambda: state_of(bob, "in") == "done", timeout=100)
            assert Path(files_of(bob).transfers()[0]["path"]).read_bytes() == data
            assert to_bob.stats["dropped"] > 0 and to_bob.stats["blackout_dropped"] > 0
            # the reordering and duplication did happen on the data's path (alice dials
            # bob's advertised address: bob's proxy), not just configured
            print(f"to_bob {dict(to_bob.stats)}")
            assert to_bob.stats["reordered"] > 0 and to_bob.stats["duplicated"] > 0


async def test_a_stranger_cannot_pile_up_offers(root: Path) -> None:
    """Offers that wait for `accept` are bounded per sender (here 3): the rest are
    dropped and counted; a pinned contact's files still arrive."""
    alice_id, bob_id, carol_id = (Identity.generate(h) for h in ("alice", "bob", "carol"))
    small = root / "s.txt"
    small.write_bytes(b"hello")
    with trio.fail_after(60):
        async with (
            node(root, alice_id) as alice,
            node(root, bob_id, bootstrap=(alice.listen_address,), max_pending_per_peer=3) as bob,
            node(root, carol_id, bootstrap=(alice.listen_address,)) as carol,
        ):
            bob.delivery.contacts.pin("alice", alice_id.public_key, time.time())
            for _ in range(5):
                await files_of(carol).send_file("bob", str(small))
            await wait_for(lambda: files_of(bob).stats["offers_over_limit"] == 2)
            pending = [f for f in files_of(bob).transfers() if f["state"] == "pending"]
            assert len(pending) == 3 and all(f["handle"] == "carol" for f in pending)
            await files_of(alice).send_file("bob", str(small))
            await wait_for(
                lambda: any(
                    f["handle"] == "alice" and f["state"] == "done"
                    for f in files_of(bob).transfers()
                )
            )


async def test_a_contact_cannot_fill_the_disk_past_the_daily_quota(root: Path) -> None:
    """Each file under auto_accept_max, but together over the sender's daily quota
    (here 10 kB): the third waits for `accept` (counted), nothing is lost, and the
    user can still accept it."""
    alice_id, bob_id = Identity.generate("alice"), Identity.generate("bob")
    src = root / "four.bin"
    src.write_bytes(os.urandom(4000))
    with trio.fail_after(60):
        async with (
            node(root, alice_id) as alice,
            node(
                root, bob_id, bootstrap=(alice.listen_address,), auto_accept_daily_per_peer=10_000
            ) as bob,
        ):
            bob.delivery.contacts.pin("alice", alice_id.public_key, time.time())
            for _ in range(3):
                await files_of(alice).send_file("bob", str(src))

            def states() -> list[str]:
                return sorted(f["state"] for f in files_of(bob).transfers())

            await wait_for(lambda: states() == ["done", "done", "pending"])
            assert files_of(bob).stats["offers_over_quota"] == 1
            (waiting,) = [f for f in files_of(bob).transfers() if f["state"] == "pending"]
            await files_of(bob).accept(waiting["id"])
            await wait_for(lambda: states() == ["done", "done", "done"])


async def test_a_wrong_root_is_refused_every_time_and_nothing_is_saved(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The offer's root is not the one the hash list gives (a sender that lies, or whose
    offer and data disagree): every stream is refused at the hash list, counted; after
    MAX_REFUSED refusals the transfer fails on both sides, and nothing is ever at the
    final path, partial file included."""
    monkeypatch.setattr(outgoing, "BACKOFF_MAX", 0.5)  # eight retries in seconds, not minutes
    src = root / "lie.bin"
    src.write_bytes(os.urandom(3 << 20))
    with trio.fail_after(60):
        async with pair(root) as (alice, bob):
            files = files_of(alice)
            layout = Layout.for_size(3 << 20)
            hashes = hash_file(src, layout)
            wrong = root_of([hashes[0], hashes[2], hashes[1]])  # the groups, reordered
            offer = Offer(os.urandom(16), os.urandom(32), layout, wrong, "lie.bin")
            files.offer("bob", bob.identity.public_key, offer, str(src), hashes)
            await wait_for(lambda: state_of(bob, "in") == "failed", timeout=45)
            got = files_of(bob).transfers()[0]
            assert got["refused"] == incoming.MAX_REFUSED and got["bytes_done"] == 0, got
            assert "root" in got["error"], got
            assert files_of(bob).stats["groups_verified"] == 0
            assert list((root / "bob-dl").iterdir()) == []
            await wait_for(lambda: state_of(alice, "out") == "failed", timeout=30)
            assert files_of(alice).transfers()[0]["error"] == "corrupt"


async def test_a_stream_that_breaks_after_progress_is_retried_at_once(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four streams of one transfer each break (a forged chunk in groups 2, 4, 6 and 8:
    refused, reset), each after some groups were acked: the sender tries again after
    the least backoff every time, not after one that doubles as if nothing came
    through (it did: 0.5, 1, 2, 4 s here; the eighth break of a long transfer on a
    flaky path waited a minute)."""
    src = root / "payload.bin"
    data = os.urandom(10 << 20)
    src.write_bytes(data)
    real = protocol.SenderStream.chunk_frame
    forge_at = {40, 72, 104, 136}  # chunk indexes, 16 chunks a group
    forged: list[int] = []

    def forge_each_once(self: protocol.SenderStream, index: int, plain: bytes) -> bytes:
        frame = real(self, index, plain)
        if index in forge_at and index not in forged:
            forged.append(index)
            frame = frame[:20] + bytes([frame[20] ^ 1]) + frame[21:]
        return frame

    waits: list[float] = []
    real_wait = OutgoingTransfers._wait_nudge

    async def recorded(self: OutgoingTransfers, transfer_id: bytes, delay: float) -> None:
        if forged:  # the waits after the first refusal
            waits.append(delay)
        await real_wait(self, transfer_id, delay)

    monkeypatch.setattr(protocol.SenderStream, "chunk_frame", forge_each_once)
    monkeypatch.setattr(OutgoingTransfers, "_wait_nudge", recorded)
    with trio.fail_after(120):
        async with pair(root) as (alice, bob):
            await files_of(alice).send_file("bob", str(src))
            await wait_for(lambda: state_of(bob, "in") == "done", timeout=90)
            got = files_of(bob).transfers()[0]
            assert sorted(forged) == sorted(forge_at) and got["refused"] == len(forge_at)
            assert Path(got["path"]).read_bytes() == data
    assert waits == [outgoing.BACKOFF_MIN] * len(forge_at), waits


async def test_a_network_drop_that_kills_the_connection_resumes_on_a_new_one(
    root: Path,
) -> None:
    """The path goes black (both ways) for longer than the QUIC idle timeout (2 s here):
    the connection dies on both sides, the sender reconnects once the path is back
    (bob's address from his record, through the proxy), and the transfer resumes where
    bob's last verified group ended: he receives at most one group twice."""
    src = root / "drop.bin"
    # 8 MiB at 3 MB/s: the blackout starts after 3 MiB and 5 are left for after it (1.7 s
    # of sending, room for a late start of the blackout); 12 MiB added 1.3 s of sending
    data = os.urandom(8 << 20)
    src.write_bytes(data)
    alice_id, bob_id = Identity.generate("alice"), Identity.generate("bob")
    ports = {"alice": free_udp_port(), "bob": free_udp_port()}
    with trio.fail_after(120):
        async with (
            open_lossy_proxy(("127.0.0.1", ports["bob"]), seed=3) as to_bob,
            node(root, alice_id, listen=ports["alice"], max_rate=3_000_000,
                 idle_timeout=2.0) as alice,
            node(root, bob_id, bootstrap=(alice.listen_address,), listen=ports["bob"],
                 advertise=to_bob.address, idle_timeout=2.0) as bob,
        ):  # fmt: skip
            bob.delivery.contacts.pin("alice", alice_id.public_key, time.time())
            await files_of(alice).send_file("bob", str(src))
            await wait_for(
                lambda: sum(f["bytes_done"] for f in files_of(bob).transfers()) >= 3 << 20,
                timeout=60,
            )
            (first,) = [p for p in alice.quic.peers() if p.public_key == bob_id.public_key]
            # Twice the idle timeout (was 6 s): the connection is dead 2 s into the
            # blackout, on both sides, and the path is back 2 s later
            to_bob.blackout(4.0)
            await wait_for(lambda: first.is_closing, timeout=20)  # the drop killed it
            await wait_for(lambda: state_of(bob, "in") == "done", timeout=90)
            got = files_of(bob).transfers()[0]
            assert Path(got["path"]).read_bytes() == data
            # resumed, not started over: bob wrote at most one group more than the file
            assert got["resent"] <= 1 << 20, got
            assert len(data) <= files_of(bob).stats["bytes_in"] <= len(data) + (1 << 20)
            assert to_bob.stats["blackout_dropped"] > 0
            now = [p for p in alice.quic.peers() if p.public_key == bob_id.public_key]
            assert first not in now  # it went on over another connection
            await wait_for(lambda: state_of(alice, "out") == "done")


async def test_a_disk_that_corrupts_the_partial_file_fails_the_transfer_in_the_end(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every group matches as it arrives, but the whole file read back from disk never
    matches the root (a disk that corrupts what it stores; here verify_file says so):
    bob fetches it again, MAX_REFUSED times, then fails it, keeps nothing, and alice is
    told he cannot save it. (It fetched the file again forever before.)"""
    monkeypatch.setattr(incoming, "verify_file", lambda *args: False)
    src = root / "photo.jpg"
    src.write_bytes(os.urandom(200_000))
    with trio.fail_after(90):
        async with pair(root) as (alice, bob):
            await files_of(alice).send_file("bob", str(src))
            await wait_for(lambda: state_of(bob, "in") == "failed", timeout=60)
            got = files_of(bob).transfers()[0]
            assert got["refused"] == incoming.MAX_REFUSED, got
            assert "did not match" in got["error"], got
            assert list((root / "bob-dl").iterdir()) == []
            await wait_for(lambda: state_of(alice, "out") == "failed", timeout=30)
            assert files_of(alice).transfers()[0]["error"] == "the receiver cannot save it"


async def test_transfers_that_ended_leave_nothing_in_memory(root: Path) -> None:
    """Six transfers end every way a transfer ends: three done, one cancelled by alice
    and one by bob mid-way, one failed (its source gone before a byte was read). Once
    all are final, neither daemon holds anything for any of them (`status`
    `files.transfers_in_memory` is 0): a daemon that runs for months and moves
    thousands of files keeps no entry per file. While they ran, it held some."""
    sources = []
    for i, size in enumerate((3 << 19, 3 << 19, 3 << 19, 6 << 20, 6 << 20, 1000)):
        sources.append(root / f"f{i}.bin")
        sources[-1].write_bytes(os.urandom(size))
    with trio.fail_after(90):
        async with pair(root, max_rate=2_000_000) as (alice, bob):
            sent = [await files_of(alice).send_file("bob", str(src)) for src in sources[:5]]
            # the sixth is offered, then its source goes before the sender reads it
            layout = Layout.for_size(1000)
            hashes = hash_file(sources[5], layout)
            gone = Offer(os.urandom(16), os.urandom(32), layout, root_of(hashes), "gone.bin")
            sources[5].unlink()
            files_of(alice).offer("bob", bob.identity.public_key, gone, str(sources[5]), hashes)

            def received(i: int) -> int:
                rows = [f for f in files_of(bob).transfers() if f["id"] == sent[i]["id"]]
                return rows[0]["bytes_done"] if rows else 0

            await wait_for(lambda: received(3) >= 1 << 20 and received(4) >= 1 << 20, timeout=30)
            held = [files_of(n).statistics()["transfers_in_memory"] for n in (alice, bob)]
            await files_of(alice).cancel(sent[3]["id"])
            await files_of(bob).cancel(sent[4]["id"])

            def states(n: Node, direction: str) -> list[str]:
                return sorted(f["state"] for f in files_of(n).transfers()
                              if f["direction"] == direction)  # fmt: skip

            final = ["cancelled", "cancelled", "done", "done", "done", "failed"]
            await wait_for(lambda: states(alice, "out") == final, timeout=60)
            await wait_for(lambda: states(bob, "in") == final, timeout=30)
            assert all(h > 0 for h in held), held
            for n in (alice, bob):
                await wait_for(lambda n=n: files_of(n).statistics()["transfers_in_memory"] == 0)
