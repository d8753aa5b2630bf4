"""Opus in-band FEC, required where the calls claim it (issue 15): on speech, not on a
steady tone, whose packets libopus stops giving FEC data after about 0.7 s.

The signal is :func:`p2pd.testing.speech.speech_like` (deterministic, seeded). Each
claim comes with its control: the same run with FEC off must fail the same assertion,
so a broken FEC path cannot pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio
from test_media_call import CALL, TIMEOUT, call

from p2pd.media import MediaConfig
from p2pd.media.call import CallMedia
from p2pd.media.codecs import FRAME_SAMPLES, OpusEncoder, load_libopus, open_opus_decoder
from p2pd.testing.speech import speech_like, write_wav

SECONDS = 6.0


def frames_of(pcm: np.ndarray) -> list[np.ndarray]:
    return [
        pcm[i : i + FRAME_SAMPLES] for i in range(0, pcm.size - FRAME_SAMPLES + 1, FRAME_SAMPLES)
    ]


def encode(pcm: np.ndarray, *, packet_loss: int) -> list[bytes]:
    encoder = OpusEncoder(bitrate=48000, packet_loss=packet_loss)
    packets = []
    for frame in frames_of(pcm):
        (packet,) = encoder.encode(frame)
        packets.append(packet)
    return packets


@pytest.fixture(scope="module")
def lib():  # type: ignore[no-untyped-def]
    found = load_libopus()
    assert found is not None, "libopus must load through ctypes: calls need it for FEC"
    return found


def test_speech_packets_carry_fec_a_steady_tone_stops(lib) -> None:  # type: ignore[no-untyped-def]
    speech = speech_like(np.random.default_rng(1), f0=140.0, seconds=SECONDS)
    t = np.arange(speech.size) / 48000
    tone = (np.sin(2 * np.pi * 440 * t) * 0.3 * 32767).astype(np.int16)

    def with_lbrr(packets: list[bytes]) -> int:
        return sum(lib.opus_packet_has_lbrr(p, len(p)) == 1 for p in packets)

    # After the first second: speech keeps its FEC (its pauses do not: ~1 in 4 frames
    # here), a tone has none, and with packet_loss = 0 libopus adds none to speech.
    speech_fec = with_lbrr(encode(speech, packet_loss=10)[50:])
    assert speech_fec >= 0.5 * (SECONDS * 50 - 50)
    assert with_lbrr(encode(tone, packet_loss=10)[50:]) == 0
    assert with_lbrr(encode(speech, packet_loss=0)[50:]) == 0


def lost_frame_error(packets: list[bytes], *, use_fec: bool) -> float:
    """Every 10th packet lost: the energy of (rebuilt - decoded in full) over the lost
    frames, relative to theirs. Rebuilt from the next packet's FEC, or concealed."""
    full = open_opus_decoder()
    lossy = open_opus_decoder()
    error = energy = 0.0
    try:
        for n, packet in enumerate(packets[:-1]):
            reference = full.decode(packet).astype(np.float64)
            if n % 10 == 5:
                if use_fec:
                    pcm, _ = lossy.decode_fec(packets[n + 1])
                else:
                    pcm = lossy.conceal()
                error += float(np.sum((pcm.astype(np.float64) - reference) ** 2))
                energy += float(np.sum(reference**2))
            else:
                lossy.decode(packet)
    finally:
        full.close()
        lossy.close()
    return error / energy


def test_fec_rebuilds_lost_speech_better_than_concealment() -> None:
    speech = speech_like(np.random.default_rng(2), f0=200.0, seconds=SECONDS)
    packets = encode(speech, packet_loss=10)
    fec = lost_frame_error(packets, use_fec=True)
    plc = lost_frame_error(packets, use_fec=False)
    # FEC is a coarser copy of the lost frame (measured: an error 18 dB under the
    # frame); the concealment only guesses (1 dB under). The control: with no FEC data in the
    # packets, "FEC" decoding is concealment, and no better.
    assert fec < 0.3 * plc, (fec, plc)
    no_fec = lost_frame_error(encode(speech, packet_loss=0), use_fec=True)
    assert no_fec > 0.6 * plc, (no_fec, plc)


#: Audio packets each side receives before a call hangs up: what 3 s of 20 ms frames
#: bring at 10 % loss. Counted in packets, not wall time: the assertions count lost
#: frames, and a starved process sends few in a fixed time (beside two CPU hogs at a
#: lower priority, a 3 s call sent 33-66 of its 150 frames, the rest skipped as late by
#: p2pd/media/call.py's "Starved of CPU" skip), so 3 s could hold 3 or 4 frames lost
#: on the way.
HEARD = 135
#: Frames each side rebuilds from FEC before the call hangs up (see _until)...
REBUILT = 4
#: ...or it hangs up after this many audio packets without: 12 s of audio, some 60
#: frames lost on the way (measured beside two CPU hogs: 0-6 rebuilt per 140 packets
#: received at the lower priority, 4-11 at the same; idle 9 of 14 and 11 of 17).
GIVE_UP = 4 * HEARD
#: How long such a call may take at most (seconds of wall time).
LIMIT = 60.0


def _until(rebuilt: int) -> Callable[[CallMedia, CallMedia], bool]:
    """An ``until`` for :func:`call`: the call lasted CALL seconds and each side received
    HEARD audio packets and rebuilt ``rebuilt`` frames from FEC, or GIVE_UP packets.

    The share of lost frames rebuilt varies from call to call: a frame is rebuilt when
    the next packet carries FEC (speech: ~3 in 4) and came before the frame was due, and
    on a loaded machine the jitter buffer, behind, drops a lost frame to catch up
    instead (jitter.py's "Accelerate"). A clean-clone CI run rebuilt 3 in a fixed 3 s
    call where 4 are asked; a call that goes on until it has its 4, at most GIVE_UP
    packets, still fails when FEC rebuilds nothing or next to nothing."""

    def enough(alice: CallMedia, bob: CallMedia) -> bool:
        return all(
            s["duration_s"] >= CALL
            and s["audio_packets_received"] >= HEARD
            and (s["audio_fec_recovered"] >= rebuilt or s["audio_packets_received"] >= GIVE_UP)
            for s in (alice.statistics(), bob.statistics())
        )

    return enough


async def fec_call(
    tmp_path: Path, *, packet_loss: int, rebuilt: int, adapt: bool = False
) -> tuple[dict, dict]:  # type: ignore[type-arg]
    """A call at 10 % loss with speech both ways and no redundant copies (FEC alone),
    for as long as ``_until(rebuilt)`` says; the Opus settings fixed unless ``adapt``
    (p2pd/media/audiorate.py)."""
    for name, f0 in (("alice", 120.0), ("bob", 210.0)):
        rng = np.random.default_rng(3 if name == "alice" else 4)
        write_wav(tmp_path / f"{name}_says.wav", speech_like(rng, f0=f0, seconds=SECONDS))
    config = replace(
        MediaConfig(audio_redundancy=False, audio_rate_adaptation=adapt),
        opus_packet_loss=packet_loss,
    )
    with trio.fail_after(LIMIT + TIMEOUT):
        alice, bob = await call(
            tmp_path,
            audio=(f"file:{tmp_path}/alice_says.wav", f"file:{tmp_path}/bob_says.wav"),
            drop=0.10,
            config=config,
            until=_until(rebuilt),
            limit=LIMIT,
        )
    stats = alice.statistics(), bob.statistics()
    for side in stats:
        assert side["audio_packets_received"] >= HEARD, side  # not cut short by LIMIT
    return stats


async def test_a_lossy_speech_call_rebuilds_lost_frames_from_fec(tmp_path: Path) -> None:
    for stats in await fec_call(tmp_path, packet_loss=10, rebuilt=REBUILT):
        assert stats["loss_pct"] > 3, stats
        assert stats["audio_red_sent"] == 0 and stats["audio_red_recovered"] == 0, stats
        rebuilt, concealed = stats["audio_fec_recovered"], stats["audio_frames_concealed"]
        # A lost frame is rebuilt when the next packet came in time and carries FEC
        # (speech: ~3 in 4 packets; the jitter buffer holds a frame more once it saw
        # loss). Measured: 9 of 14 and 11 of 17 lost frames rebuilt; with no FEC data
        # (the control below) 0 of 14 and 0 of 18. (No ratio to the concealed frames: on
        # a loaded machine, frames late after a stall are concealed too, and a share of
        # those failed once in a full run.) The call went on until both sides had
        # REBUILT, or GIVE_UP packets without (_until).
        assert rebuilt >= REBUILT, (rebuilt, concealed, stats)


async def test_control_without_fec_data_nothing_is_rebuilt(tmp_path: Path) -> None:
    """The assertion above fails when the encoder sends no FEC: it tests FEC."""
    for stats in await fec_call(tmp_path, packet_loss=0, rebuilt=0):
        assert stats["loss_pct"] > 3, stats
        assert stats["audio_fec_recovered"] == 0, stats
        assert stats["audio_frames_concealed"] >= 5, stats


async def test_a_call_that_starts_without_fec_turns_it_on_when_the_peer_reports_loss(
    tmp_path: Path,
) -> None:
    """Adaptation on, started as the control above (no FEC data): the peer's reports of
    10 % loss open a new encoder with FEC planned for the loss they report (rounded up
    to 5 % steps, at least one), and lost frames are rebuilt from it (the control
    rebuilds none)."""
    for stats in await fec_call(tmp_path, packet_loss=0, rebuilt=1, adapt=True):
        assert stats["loss_pct"] > 3, stats
        # The plan follows the mean of the recent reports, not the configured 10 %: a
        # clean-clone CI run planned 5 (its reports' mean under 5 %
        # at 10 % loss: a report covers about 25 frames, and 1 or 2 lost is common).
        assert stats["audio_fec"] is True and stats["audio_fec_packet_loss_pct"] >= 5, stats
        assert stats["audio_encoder_switches"] >= 1, stats
        # at least one lost frame rebuilt from FEC (the control rebuilds none): a 3 s
        # call at 10 % loss loses about 10 frames after the switch, but a clean-clone CI
        # run rebuilt 1, with the switch late under load (the call now goes on until
        # each side rebuilt one, at most GIVE_UP packets: _until)
        assert stats["audio_fec_recovered"] >= 1, stats
