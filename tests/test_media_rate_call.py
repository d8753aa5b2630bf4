"""The video bitrate adaptation in real calls (two in-process QUIC endpoints through the
lossy proxy, as tests/test_media_call.py runs them): the target follows the loss, the
encoder follows the target, and a call with adaptation off keeps its bitrate."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from test_media_call import TIMEOUT, call

from p2pd.media import MediaConfig

pytestmark = pytest.mark.serial  # frames and reports per second of a real-time call


async def test_heavy_loss_brings_the_video_bitrate_down_and_the_encoder_with_it(
    tmp_path: Path,
) -> None:
    """25 % loss both ways: the reports show it (over 10 %), and through aioquic's
    NewReno the connection carries far less than the 300 kbit/s start plus audio, so
    datagrams queue for its congestion window and overflow (measured: 60-210 dropped,
    RTT 0.9 s): each side's target falls towards the 150 kbit/s floor, for any of the
    three reasons, and the encoder is opened again at the lower rate."""
    with trio.fail_after(TIMEOUT):
        alice, bob = await call(
            tmp_path, audio=("tone:440", "tone:440"), video=("testsrc", "testsrc"),
            suffix=".mkv", drop=0.25,
        )  # fmt: skip
    for media in (alice, bob):
        stats = media.statistics()
        cuts = sum(stats[f"video_rate_decreases_{why}"] for why in ("loss", "delay", "local"))
        assert cuts >= 2, stats
        assert stats["video_target_kbps"] < 300 * 0.9**2 + 1, stats
        assert stats["video_target_kbps"] >= 150, stats
        assert stats["video_encoder_switches"] >= 1, stats
        assert stats["video_encoder_kbps"] < 300, stats


async def test_without_adaptation_the_configured_bitrate_stays(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        alice, bob = await call(
            tmp_path, audio=("tone:440", "tone:440"), video=("testsrc", "testsrc"),
            suffix=".mkv", drop=0.25, config=MediaConfig(video_rate_adaptation=False),
        )  # fmt: skip
    for media in (alice, bob):
        stats = media.statistics()
        assert stats["video_target_kbps"] == 800.0, stats
        assert stats["video_encoder_kbps"] == 800.0, stats
        assert stats["video_encoder_switches"] == 0, stats
