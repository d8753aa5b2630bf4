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
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pd.testing.daemons import p2pd_command, run_cli, short_tempdir, wait_until
from p2pd.testing.natnet import send, start_network, status
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
    start_network(testbed, root, "eim", "symmetric")
    tag = f"upgrade-{time.time_ns():x}"
    first = send(root, "alice", "bob", f"{tag} 0")
    assert first["via"] == "relay", first  # bob lists no address alice can reach

    # bob, who got the relayed connection, punches; the birthday case finds a path
    def upgraded() -> bool:
        return status(root, "bob")["hole_punching"].get("upgrades_direct", 0) >= 1

    assert wait_until(upgraded, 30, interval=0.5), {
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


def test_a_call_over_a_relay_moves_to_the_direct_path_without_a_long_gap(
    testbed: Testbed, root: Path
) -> None:
    """The call itself opens the relayed connection; the upgrade lands while it rings or
    during the call. During: both sides' media move to the direct connection, and the
    audio gap while switching must stay under 150 ms (issue 13), i.e. at most 7 of 20 ms
    frames concealed. While it rings: the media starts on the direct connection (no
    switch). (A clean-clone CI run caught the second case, which then stayed relayed.)"""
    start_network(testbed, root, "eim", "symmetric")
    answer = testbed.hosts["c2"].popen(
        [*p2pd_command(), "--home", str(root / "bob"), "answer", "--wait", "60",
         "--audio-in", "tone:660", "--json"]
    )  # fmt: skip
    proc = subprocess.run(
        [*p2pd_command(), "--home", str(root / "alice"), "call", "bob", "--audio-in",
         "tone:440", "--duration", "6", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out, err = answer.communicate(timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert answer.returncode == 0, err
    caller, callee = json.loads(proc.stdout), json.loads(out)
    shown = ("audio_packets_received", "audio_frames_played", "audio_frames_concealed",
             "path_switches", "rtt_ms")  # fmt: skip
    for who, side in (("caller", caller), ("callee", callee)):
        print(f"{who}: { ({k: side['media'].get(k) for k in shown}) }")
    for side in (caller, callee):
        media = side["media"]
        assert media["path_switches"] <= 1, media  # relayed first, then direct at most once
        assert media["audio_packets_received"] > 200, media  # 6 s of 20 ms frames: 300
        assert media["audio_frames_concealed"] <= 7, media
    # either way the call ended on the direct path: bob upgraded, and each side either
    # switched or started direct, so neither shows the relay carrying the call's end
    assert status(root, "bob")["hole_punching"]["upgrades_direct"] >= 1
    relayed = sum(c["bytes_in"] for c in status(root, "alice")["relay"]["client"]["circuits"])
    print(f"relayed bytes into alice: {relayed}")
    # a call relayed throughout brings some 45 KB (300 packets of ~150 bytes); an early
    # switch about 8 KB (measured): at most half the call came through the relay
    assert relayed < 300 * 150 // 2, relayed
