"""From relayed to direct between real daemons (issue 13, item 4): alice behind an
endpoint-independent NAT, bob behind an endpoint-dependent one (``masquerade random``),
three public daemons as bootstrap nodes and relays (p2pd/testing/natnet.py). bob's
record lists relays and no address alice could reach, so alice's first message goes
through a relay; the relayed connection is then upgraded by hole punching (the birthday
case: bob sends from many sockets, alice probes many ports) and the next messages go
direct, both ways, with none lost or doubled. A call that starts relayed moves to the
direct path. Two endpoint-dependent NATs stay relayed (tests/test_relay_netns.py)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pd.testing.daemons import cli_json, popen_cli, run_cli, short_tempdir, wait_until
from p2pd.testing.natnet import routers_of, send, start_network, status
from p2pd.testing.netns import Testbed

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture()
def root() -> Iterator[Path]:
    path = short_tempdir("p2pd-upgrade-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_relayed_connection_becomes_direct_and_messages_follow(
    testbed: Testbed, root: Path
) -> None:
    start_network(testbed, root, "eim", "symmetric", republish_min=1.0)
    tag = f"upgrade-{time.time_ns():x}"
    first = send(root, "alice", "bob", f"{tag} 0")
    assert first["via"] == "relay", first  # bob lists no address alice can reach

    # bob, who got the relayed connection, punches; the birthday case finds a path
    def upgraded() -> bool:
        return status(root, "bob")["hole_punching"].get("upgrades_direct", 0) >= 1

    # (90 s: a birthday attempt misses about one time in 50; misses are tried again 1, 8
    # and 30 s later, p2pd/relay/upgrade.py RETRY_DELAYS)
    assert wait_until(upgraded, 90, interval=0.5), {
        n: status(root, n)["hole_punching"] for n in ("alice", "bob")
    }
    for i, (sender, to) in enumerate((("alice", "bob"), ("bob", "alice"), ("alice", "bob"))):
        message = send(root, sender, to, f"{tag} {i + 1}")
        assert message["via"] == "direct", message
    # every message arrived exactly once
    for name, expected in (("bob", [0, 1, 3]), ("alice", [2])):
        lines = run_cli(root / name, "inbox", "--json").stdout.splitlines()
        texts = [m["text"] for m in map(json.loads, lines) if m["text"].startswith(tag)]
        assert sorted(texts) == [f"{tag} {i}" for i in expected], texts
    stats = {n: status(root, n)["hole_punching"] for n in ("alice", "bob")}
    print(f"hole punching: {stats}")
    assert stats["alice"].get("probes_paths_found", 0) >= 1


#: Drops every hole-punch datagram (UDP, first payload byte 0x3f) of the first attempt
#: that crosses a router: the first punch datagram's session id (payload bytes 4-11, the
#: same in both directions: the initiator's) goes into a set of one, and datagrams of
#: that session are dropped; a later attempt has a session of its own and passes. (The
#: test used to delete a drop-all rule once it saw the attempt had ended: a retry 1 s
#: after the miss could start before the delete, on a loaded machine.)
LOSE_PUNCH = """table ip lose_punch {
    set first {
        typeof @th,96,64
        size 1
    }
    chain forward {
        type filter hook forward priority -10; policy accept;
        meta l4proto udp @th,64,8 0x3f add @first { @th,96,64 }
        meta l4proto udp @th,64,8 0x3f @th,96,64 @first counter drop
    }
}
"""


def test_a_lost_attempt_is_tried_again_within_seconds(testbed: Testbed, root: Path) -> None:
    """Every punch datagram of the first attempt is lost (alice's NAT router drops them),
    as a birthday attempt's misses are: the next attempt comes seconds later and finds
    the path. Before, the retry came a minute after the miss, when the idle relayed
    connection had closed (60 s after its last traffic), so none came and the pair stayed
    relayed: the clean-clone CI failure (probes_attempts 1 in 90 s)."""
    start_network(testbed, root, "eim", "symmetric", republish_min=1.0)
    router = routers_of(testbed, 1)[0]
    router.run(["nft", "-f", "-"], input=LOSE_PUNCH)
    first = send(root, "alice", "bob", f"lost-{time.time_ns():x}")
    assert first["via"] == "relay", first

    def attempts() -> int:
        return int(status(root, "bob")["hole_punching"].get("probes_attempts", 0))

    assert wait_until(lambda: attempts() >= 1, 30, interval=0.2), status(root, "bob")
    missed = time.monotonic()

    def upgraded() -> bool:
        return status(root, "bob")["hole_punching"].get("upgrades_direct", 0) >= 1

    assert wait_until(upgraded, 40, interval=0.5), {
        n: status(root, n)["hole_punching"] for n in ("alice", "bob")
    }
    took = time.monotonic() - missed
    dropped = router.run(["nft", "list", "table", "ip", "lose_punch"]).stdout
    stats = status(root, "bob")["hole_punching"]
    print(f"direct {took:.1f} s after the lost attempt; bob: {stats}; {dropped.split()}")
    assert "packets 0 " not in dropped, dropped  # the first attempt's datagrams were lost
    assert stats["upgrades_failed"] >= 1 and stats["probes_attempts"] >= 2, stats
    message = send(root, "bob", "alice", "after the retry")
    assert message["via"] == "direct", message


def test_a_call_over_a_relay_moves_to_the_direct_path_without_a_long_gap(
    testbed: Testbed, root: Path
) -> None:
    """The call itself opens the relayed connection; the upgrade lands while it rings or
    during the call. During: both sides' media move to the direct connection, and the
    audio gap while switching must stay under 150 ms (issue 13), i.e. at most 7 of 20 ms
    frames concealed. While it rings: the media starts on the direct connection (no
    switch). Either way, once upgraded the relay no longer carries the call. The call
    lasts until the upgrade has landed and two more seconds of audio have come: a
    clean-clone CI run once saw the upgrade take longer than a fixed 6 s call."""
    start_network(testbed, root, "eim", "symmetric", republish_min=1.0)
    # (both forked from the daemons' template under the test harness, the answer into
    # c2's namespace: p2pd/testing/daemons.py popen_cli)
    answer = popen_cli(
        root / "bob", "answer", "--wait", "60", "--audio-in", "tone:660", "--json",
        wrapper=testbed.hosts["c2"].command([]),
    )  # fmt: skip
    call = popen_cli(
        root / "alice", "call", "bob", "--audio-in", "tone:440", "--duration", "150", "--json"
    )  # fmt: skip
    try:

        def media() -> dict[str, Any]:
            rows = cli_json(root / "alice", "calls")
            return dict(rows[0]["media"]) if rows else {}

        def relayed() -> int:
            circuits = status(root, "alice")["relay"]["client"]["circuits"]
            return sum(int(c["bytes_in"]) for c in circuits)

        def upgraded() -> bool:
            return status(root, "bob")["hole_punching"].get("upgrades_direct", 0) >= 1

        assert wait_until(upgraded, 100, interval=0.5), {  # retries included
            n: status(root, n)["hole_punching"] for n in ("alice", "bob")
        }
        # a second of audio for the switch, then measure two seconds on the direct path
        base = media().get("audio_packets_received", 0)
        assert wait_until(lambda: media().get("audio_packets_received", 0) >= base + 50, 20)
        before, received = relayed(), media()["audio_packets_received"]
        assert wait_until(lambda: media()["audio_packets_received"] >= received + 100, 20)
        during = relayed() - before
        came = media()["audio_packets_received"] - received
    finally:
        run_cli(root / "alice", "hangup")
        out, call_err = call.communicate(timeout=60)
        answered, err = answer.communicate(timeout=60)
    assert call.returncode == 0, call_err
    assert answer.returncode == 0, err
    caller, callee = json.loads(out), json.loads(answered)
    shown = ("audio_packets_received", "audio_frames_played", "audio_frames_concealed",
             "path_switches", "rtt_ms")  # fmt: skip
    for who, side in (("caller", caller), ("callee", callee)):
        print(f"{who}: { ({k: side['media'].get(k) for k in shown}) }")
    for side in (caller, callee):
        stats = side["media"]
        assert stats["path_switches"] <= 1, stats  # relayed first, then direct at most once
        assert stats["audio_packets_received"] > 150, stats  # >= 3 s of 20 ms frames
        assert stats["audio_frames_concealed"] <= 7, stats
    # after the upgrade the call came direct: of ~150-byte packets, a relayed call brings
    # ~15 KB in 100 packets; keep-alives and stragglers stay far below a quarter of that
    print(f"after the upgrade: {came} packets in, {during} bytes of them via the relay")
    assert during < came * 150 // 4, (during, came)
