"""The device plumbing that needs no device: the sample ring between a device thread and
trio, the ``[calls]`` defaults, the CLI's choice of microphone and speaker, and the
errors when sounddevice or a device is missing. The devices themselves:
tests/test_audio_devices.py."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from p2pd.config import CallsConfig, load_config
from p2pd.errors import LocalError, UsageError
from p2pd.media import devices
from p2pd.media.call import check_media_args
from p2pd.media.devices import AudioDevice, SampleRing, _pick, check_output_spec
from p2pd_cli.commands.calls import _media_params


def frames(start: int, n: int, size: int = 960) -> list[np.ndarray]:
    return [np.full(size, start + i, np.int16) for i in range(n)]


def test_the_ring_hands_samples_over_in_order_and_counts_shortfalls() -> None:
    ring = SampleRing(4 * 960)
    for f in frames(1, 3):
        ring.write(f)
    assert ring.level == 3 * 960
    out = np.concatenate([ring.read(480) for _ in range(6)])
    assert list(out[::960]) == [1, 2, 3] and ring.level == 0 and ring.short == 0
    short = ring.read(480)  # nothing queued: zeros, counted
    assert not short.any() and ring.short == 480 and ring.short_reads == 1
    ring.read(480, count=False)  # silence before playout began: not an underrun
    assert ring.short_reads == 1
    assert ring.read_frame(960) is None  # a whole frame or nothing


def test_a_full_ring_drops_the_oldest_and_counts_them() -> None:
    ring = SampleRing(3 * 960)
    for f in frames(1, 5):
        ring.write(f)  # never blocks, never grows past its capacity
    assert ring.level == 3 * 960 and ring.dropped == 2 * 960 and ring.dropped_blocks == 2
    got = ring.read_frame(960)
    assert got is not None and got[0] == 3  # the newest three remain


def test_a_producer_and_a_consumer_thread_lose_nothing_without_overflow() -> None:
    """The device thread appends while trio pops: no lock, and nothing lost or reordered."""
    ring = SampleRing(1 << 20)
    n = 2000

    def produce() -> None:
        for i in range(n):
            ring.write(np.full(480, i % 30000, np.int16))

    thread = threading.Thread(target=produce)
    thread.start()
    seen: list[int] = []
    for _ in range(100_000):  # bounded
        block = ring.read_frame(480)
        if block is not None:
            assert (block == block[0]).all()  # never a block torn in two
            seen.append(int(block[0]))
        elif not thread.is_alive() and ring.level == 0:
            break
    thread.join(5)
    assert seen == [i % 30000 for i in range(n)] and ring.dropped == 0


def test_devices_are_picked_by_name_part_or_index_and_missing_ones_say_what_to_do() -> None:
    found = [
        AudioDevice(0, "pulse", "ALSA", 32, 44100.0, False),
        AudioDevice(1, "default", "ALSA", 32, 44100.0, True),
        AudioDevice(4, "USB Headset: Audio (hw:2,0)", "ALSA", 1, 48000.0, False),
    ]
    assert _pick("mic", "", found).index == 1  # the default
    assert _pick("mic", "headset", found).index == 4  # a unique part, any case
    assert _pick("speaker", "0", found).name == "pulse"  # an index
    with pytest.raises(LocalError, match="no microphone named 'webcam'; there are: 'pulse'"):
        _pick("mic", "webcam", found)
    with pytest.raises(LocalError, match="more than one"):
        _pick("mic", "u", found)
    with pytest.raises(LocalError, match=r"^no microphone found: use --audio-in FILE\|tone:HZ$"):
        _pick("mic", "", [])
    with pytest.raises(LocalError, match=r"^no speaker found: use --audio-out none or --rec"):
        _pick("speaker", "", [])


def test_without_sounddevice_a_device_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import raises ImportError
    with pytest.raises(LocalError, match=r"pip install 'p2pd\[audio\]'"):
        devices.list_devices()
    with pytest.raises(LocalError, match="sounddevice package"):
        devices.check_devices("mic", None)
    devices.check_devices("tone:440", "none")  # no device named: nothing to load


def test_audio_out_specs() -> None:
    for good in ("none", "speaker", "speaker:USB Headset"):
        check_output_spec(good)
        check_media_args(None, None, None, None, good)
    for bad in ("speakers", "out.wav", "mic"):
        with pytest.raises(UsageError, match="--audio-out takes"):
            check_output_spec(bad)


def test_the_calls_section_sets_the_default_devices(tmp_path: Path) -> None:
    calls = load_config(tmp_path).calls
    assert (calls.audio_in, calls.audio_out) == ("mic", "speaker")
    (tmp_path / "config.toml").write_text(
        '[calls]\nfrom = "contacts"\naudio_in = "mic:USB"\naudio_out = "speaker:USB"\n'
    )
    calls = load_config(tmp_path).calls
    assert calls == CallsConfig("contacts", "mic:USB", "speaker:USB")
    for bad in ('[calls]\naudio_out = "out.wav"\n', '[calls]\naudio_in = ""\n',
                "[calls]\naudio_in = 3\n", '[calls]\nvolume = "11"\n'):  # fmt: skip
        (tmp_path / "config.toml").write_text(bad)
        with pytest.raises(UsageError):
            load_config(tmp_path)


def test_the_cli_sends_the_configured_devices_unless_told_otherwise(tmp_path: Path) -> None:
    record = tmp_path / "in.wav"
    # Nothing said: the microphone and the speaker.
    assert _media_params(None, None, None, None, home=tmp_path) == {
        "audio_in": "mic", "video_in": None, "record": None, "duration": None,
        "audio_out": "speaker",
    }  # fmt: skip
    # A recording alone plays nowhere (as before devices); asked for, it does both.
    params = _media_params("tone:440", None, record, 3.0, home=tmp_path)
    assert params["audio_in"] == "tone:440" and "audio_out" not in params
    params = _media_params(None, None, record, None, home=tmp_path, audio_out="speaker:USB")
    assert params["audio_out"] == "speaker:USB" and params["audio_in"] == "mic"
    assert "audio_out" not in _media_params(None, None, None, None, home=tmp_path, audio_out="none")
    (tmp_path / "config.toml").write_text('[calls]\naudio_in = "tone:300"\naudio_out = "none"\n')
    params = _media_params(None, None, None, None, home=tmp_path)
    assert params["audio_in"] == "tone:300" and "audio_out" not in params
