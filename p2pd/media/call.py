"""One side of a call's media over a QUIC connection: :class:`CallMedia`.

Signalling (offer, accept, hang-up) is not here: it travels as ordinary messages. Once
both sides agreed, each runs a :class:`CallMedia` on the QUIC connection that both
identity keys authenticated, and feeds it that connection's DATAGRAM frames::

    media = CallMedia(peer, audio_in="tone:440", video_in=None, record=Path("in.wav"),
                      duration=None)
    # in the QuicEndpoint's on_datagram(peer, data): media.datagram_received(data)
    async with trio.open_nursery() as nursery:
        await nursery.start(media.run)      # returns once the media loops run
        ...                                 # hang up: cancel the nursery
    media.statistics()

Why datagrams, for video too, and not one stream per frame: media is worth nothing late.
A stream retransmits a lost packet after at least one RTT and holds every later byte of
that frame behind it (and, at the connection level, spends congestion window on stale
data); a VP8 frame that cannot be decoded in time is better dropped and replaced by a
keyframe on request, as RTP does (RFC 4585 PLI). Before that, a lost fragment is asked
for again, once or twice, while its frame can still play (RFC 4585 generic NACK, only the
fragments lost, only within a deadline and a byte budget: :mod:`p2pd.media.nack`), which
a stream cannot be told to do. Datagrams also keep all media on one
callback, with no per-frame stream state (streams per peer are limited to 128 at once)
and nothing for the message layer's stream handler to route. The price is fragmentation
(:func:`p2pd.media.wire.fragment`) and the :class:`~p2pd.media.assembler.FrameAssembler`.

Timing: one task ticks every 20 ms on trio's clock (``sleep_until`` of absolute
deadlines, so no drift) and per tick reads and encodes one audio frame and sends it;
another (:class:`~p2pd.media.playout.AudioPlayout`) ticks every 20 ms too, takes one
playout decision from the :class:`~p2pd.media.jitter.JitterBuffer`, decodes and records
it, and keeps its phase just after the moment frames fall due
(:func:`~p2pd.media.jitter.align_tick`) rather than on the capture clock, whose phase
against the peer's is arbitrary (up to 20 ms of waiting, 10 on average). A third ticks
at the video frame rate.

Loss: Opus in-band FEC always, and, while the peer's receiver reports show loss,
redundancy (RFC 2198's idea): each audio datagram also carries the previous one's Opus
packet, so one lost datagram costs nothing once the next arrives. It doubles the audio
bitrate (~48 -> ~90 kbit/s) only while it is needed (docs/PROTOCOL.md, kind 0x15).

Encoding and decoding run inline in the trio thread: measured per 20 ms tick, Opus
encode ~0.3 ms and decode ~0.04 ms; per video frame, 640x480 VP8 encode ~1.5-2 ms,
decode ~0.4 ms, test pattern ~0.3 ms. That is well under a tick, and a worker thread's
hand-off would cost more than a decode. Only capture devices, whose reads block, run in
a thread (:func:`trio.to_thread.run_sync`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import trio

from ..errors import ConnectionLost, DatagramTooLarge, LocalError
from .assembler import AssembledFrame, AssemblerConfig, FrameAssembler
from .audiorate import AudioRateConfig, AudioRateController
from .audioswitch import EncoderSwitcher, open_warm_encoder
from .callargs import check_media_args
from .codecs import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    LibopusDecoder,
    OpusEncoder,
    PyAVOpusDecoder,
    Vp8Encoder,
    open_opus_decoder,
)
from .devices import MicSource, SpeakerSink, open_audio_sink
from .jitter import JitterBuffer, JitterConfig
from .nack import RetransmitConfig, RetransmitHistory
from .playout import FRAME_DURATION, AudioPlayout, PlayoutCounters, VideoPlayout
from .ratecontrol import RateConfig, SendLossMeter, VideoRateController
from .sinks import Recorder, open_recorder
from .sources import AudioSource, VideoSource, open_audio_source, open_video_source
from .stats import ReceptionStats, RttEstimator
from .wire import (
    AUDIO_RED_HEADER,
    AudioPacket,
    KeyframeRequest,
    MediaWireError,
    ReceiverReport,
    ReportBlock,
    VideoFragment,
    VideoNack,
    decode,
    fragment,
)

__all__ = ["CallMedia", "MediaConfig", "MediaPeer", "check_media_args"]

log = logging.getLogger(__name__)

#: 90 kHz: the RTP clock of video (RFC 7741 section 4.1), used for video timestamps.
VIDEO_CLOCK = 90000


class MediaPeer(Protocol):
    """What :class:`CallMedia` needs of a connection (:class:`~p2pd.transport.quic.QuicPeer`
    has it all)."""

    @property
    def max_datagram_size(self) -> int: ...

    def send_datagram(self, data: bytes, *, urgent: bool = False) -> bool: ...

    async def wait_closed(self) -> None: ...


@dataclass(frozen=True)
class MediaConfig:
    """Tuning of a call's media."""

    #: Opus bitrate (bit/s). 48 kbit/s: scripts/bench_call.py measured wideband PESQ 4.14
    #: at 0% loss and 3.53 at 5% (32 kbit/s: 3.81 and 3.27, under the 4.0 / 3.5 goals).
    audio_bitrate: int = 48000
    #: The loss (percent) the Opus encoder plans its in-band FEC for (with
    #: ``audio_rate_adaptation``: at the start, then what the reports say).
    opus_packet_loss: int = 10
    #: Follow the loss the peer's reports show with Opus's FEC, its expected loss and
    #: the bitrate (at most ``audio_bitrate``): p2pd/media/audiorate.py. False: fixed at
    #: ``audio_bitrate`` and ``opus_packet_loss``.
    audio_rate_adaptation: bool = True
    audio_rate: AudioRateConfig = field(default_factory=AudioRateConfig)
    #: Send the previous audio packet again in each datagram (kind 0x15) while the peer
    #: reports loss and says it decodes that kind. False: never (FEC only).
    audio_redundancy: bool = True
    #: Redundancy starts when a receiver report shows more than this fraction of our
    #: audio lost over its interval (0.5 s, 25 packets: so any loss at all) ...
    redundancy_loss_threshold: float = 0.01
    #: ... and stops once no report has shown that for this long (seconds).
    redundancy_hold: float = 10.0
    #: Keep the playout tick just after frames fall due (see align_tick); False: play on
    #: the capture tick, as before (and without the jitter buffer's warm-up floor).
    align_playout: bool = True
    #: How long after a frame falls due its playout tick comes (seconds): room for
    #: trio's wake-up, so the tick does not come just before the moment.
    playout_margin: float = 0.001
    #: Within this much after that moment the playout clock is left alone (seconds).
    playout_tolerance: float = 0.002
    #: After an underrun (a frame was due and not here) the playout clock keeps the
    #: frame of delay it added for this long (seconds) before it catches up again ...
    playout_underrun_hold: float = 10.0
    #: ... once this many underruns came within that time (NetEq's peak detector: a
    #: delay peak that recurs is worth a frame of delay; one alone is not, and a frame
    #: held for 10 s after it, on a path whose delay is otherwise a few ms, doubles the
    #: buffer's delay: scripts/bench_call.py measured 55-58 ms mouth-to-ear p95 with 1,
    #: the earlier behaviour, against a goal of 45).
    playout_underrun_repeats: int = 2
    #: Underruns closer together than this (seconds) count as one: one stall of the
    #: sender or the path makes several frames late in a row, often with a frame or two
    #: on time between them.
    playout_underrun_merge: float = 0.5
    #: Decode Opus through libopus itself (FEC and PLC); False: FFmpeg's decoder, PLC only.
    use_libopus: bool = True
    video_width: int = 640
    video_height: int = 480
    video_fps: float = 30.0
    #: VP8 target bitrate (bit/s): the start, and the ceiling of the adaptation.
    video_bitrate: int = 800_000
    #: Follow the loss and RTT the peer's reports show with the video bitrate, between
    #: ``rate.floor_bps`` and ``video_bitrate`` (p2pd/media/ratecontrol.py); False: fixed.
    video_rate_adaptation: bool = True
    rate: RateConfig = field(default_factory=RateConfig)
    #: Playing to a speaker: the playout loop keeps at least this many samples queued
    #: for the device (40 ms: the device thread takes 10 ms blocks, and trio may be late
    #: to top up), taking frames from the jitter buffer as the device's clock consumes
    #: them. Each underrun is 10 ms of zeros inserted, in speech too: bench_call's device
    #: path (scripts/_call_devices.py, 2 calls a run, load average 1.8-3.2) had 0-4 a run
    #: at 30 ms and a PESQ gap to the codec of 0.11-0.43 (mean 0.24, 6 runs), none at
    #: 40 ms and 0.11-0.17 (mean 0.14, 4 runs); 50 ms: 0.09, 0.10. Each 10 ms is
    #: mouth-to-ear.
    speaker_low_water: int = 1920
    #: Receiver reports (loss, jitter, RTT echo) go out this often (seconds).
    report_interval: float = 0.5
    #: A keyframe request is honoured at most this often (seconds).
    min_keyframe_interval: float = 0.1
    #: Concealed frames after the last received one that a recording holds back.
    record_hold_back: int = 50
    #: A 5 ms floor for the jitter buffer's target (JitterConfig's own default is 20 ms):
    #: on a clean path the 95th percentile decides; 25 ms for the first second, while
    #: that percentile rests on a handful of packets (the first ones through a fresh
    #: connection are the slowest), falling back in a pause afterwards.
    jitter: JitterConfig = field(
        default_factory=lambda: JitterConfig(min_delay=0.005, start_delay=0.025, warmup=50)
    )
    assembler: AssemblerConfig = field(default_factory=AssemblerConfig)
    #: Keep our recent video fragments and resend those the peer NACKs (kind 0x16), and
    #: NACK the peer's when its reports say it answers (p2pd/media/nack.py).
    video_nack: bool = True
    retransmit: RetransmitConfig = field(default_factory=RetransmitConfig)


@dataclass
class _Counters:
    bytes_sent: int = 0
    bytes_received: int = 0
    datagrams_sent: int = 0
    datagrams_received: int = 0
    send_dropped: int = 0
    #: Of send_dropped, control datagrams (reports, NACKs, keyframe requests).
    control_send_dropped: int = 0
    malformed: int = 0
    audio_packets_sent: int = 0
    audio_red_sent: int = 0
    video_frames_sent: int = 0
    video_keyframes_sent: int = 0
    keyframe_requests_sent: int = 0
    keyframe_requests_received: int = 0
    nacks_received: int = 0
    reports_sent: int = 0
    reports_received: int = 0
    #: Capture ticks skipped after a stall (the playout clock's: PlayoutCounters).
    ticks_late: int = 0
    video_frames_skipped: int = 0


class CallMedia:
    """Sends and receives one call's audio (and video) over a QUIC connection.

    ``audio_in`` / ``video_in``: source specs (:mod:`p2pd.media.sources`), or None to send
    nothing of that kind (what the peer sends is received all the same). ``record``: a
    ``.wav`` / ``.mkv`` / ``.webm`` / ``.mka`` file for what is received. ``audio_out``:
    ``speaker[:NAME]`` to play what is received on a sound device, whose clock then paces
    playout (:mod:`p2pd.media.devices`); None or ``none``: no device. ``duration``:
    seconds after which :meth:`run` returns by itself (None: until cancelled or the
    connection closes). Raises :class:`~p2pd.errors.UsageError` for a bad spec or path.
    """

    def __init__(
        self,
        peer: MediaPeer,
        *,
        audio_in: str | None,
        video_in: str | None,
        record: Path | None,
        duration: float | None,
        config: MediaConfig | None = None,
        audio_out: str | None = None,
    ) -> None:
        check_media_args(audio_in, video_in, record, duration, audio_out)
        self.audio_out = None if audio_out == "none" else audio_out
        self._speaker: SpeakerSink | None = None
        self._audio_source: AudioSource | None = None
        self.peer = peer
        self.audio_in, self.video_in = audio_in, video_in
        self.record, self.duration = record, duration
        self.config = c = config or MediaConfig()
        self._state = "new"
        self._end_reason = ""
        self._path_switches = 0
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._c = _Counters()
        # The warm-up floor comes down by the playout clock catching up in a pause; on
        # the capture tick nothing would bring it down (dropping starts two frames late).
        self._jitter = JitterBuffer(c.jitter if c.align_playout else replace(c.jitter, warmup=0))
        self._assembler = FrameAssembler(c.assembler)
        self._history = RetransmitHistory(c.retransmit)
        fixed = replace(c.rate, start_bps=c.video_bitrate)  # the statistics say so
        self._rate = VideoRateController(
            c.rate if c.video_rate_adaptation else fixed, ceiling=c.video_bitrate
        )
        self._send_loss = SendLossMeter(c.rate.min_samples)
        fixed_opus = replace(c.audio_rate, start_fec=True, start_packet_loss=c.opus_packet_loss)
        start = replace(c.audio_rate, start_packet_loss=c.opus_packet_loss)
        audio_rate = start if c.audio_rate_adaptation else fixed_opus
        self._opus = EncoderSwitcher(AudioRateController(audio_rate, ceiling=c.audio_bitrate))
        self._video_encoder_bps = 0
        self._audio_rx = ReceptionStats(SAMPLE_RATE)
        self._video_rx = ReceptionStats(VIDEO_CLOCK)
        self._rtt = RttEstimator()
        self._remote_audio = ReportBlock()
        self._remote_video = ReportBlock()
        self._peer_accepts_red = False
        self._red_until = -math.inf
        #: Decodes and records the video frames the assembler completes.
        self._video_out = VideoPlayout(self._assembler.decode_failed)
        #: Plays the audio: built in run() with the decoder, recording and speaker.
        self._audio_out: AudioPlayout | None = None
        self._keyframe_wanted = False
        self._last_request_seen = 0
        self._decoder: LibopusDecoder | PyAVOpusDecoder | None = None
        self._recorder: Recorder | None = None
        self._scope: trio.CancelScope | None = None

    # ---- the receive path (called from the endpoint's on_datagram)

    def datagram_received(self, data: bytes) -> None:
        """Take one DATAGRAM frame of this connection. Synchronous and cheap: audio goes
        into the jitter buffer, video fragments into the assembler; decoding happens in
        :meth:`run`'s tasks. Datagrams before :meth:`run` are kept the same way, after
        it are ignored."""
        if self._state == "ended":
            return
        now = trio.current_time()
        c = self._c
        c.datagrams_received += 1
        c.bytes_received += len(data)
        try:
            message = decode(data)
        except MediaWireError:
            c.malformed += 1
            return
        if isinstance(message, AudioPacket):
            # Loss statistics (and so the peer's redundancy) count the packets' own
            # arrivals only: a frame rebuilt from a copy was still lost on the way.
            self._audio_rx.packet(message.seq, message.timestamp, now)
            self._jitter.push(
                message.seq, message.timestamp, message.payload, now, start=message.start
            )
            if message.redundant:
                self._jitter.push_redundant(
                    message.redundant_seq, message.redundant_timestamp, message.redundant
                )
        elif isinstance(message, VideoFragment):
            self._deliver_frames(self._assembler.push(message, now), now)
            self._send_nack(now)
        elif isinstance(message, ReceiverReport):
            c.reports_received += 1
            self._rtt.report_received(
                message.send_time_us, message.echo_us, message.echo_delay_us, now
            )
            self._remote_audio, self._remote_video = message.audio, message.video
            self._peer_accepts_red = message.accepts_redundancy
            self._assembler.nack_enabled = self.config.video_nack and message.answers_nacks
            if message.audio.loss_fraction > self.config.redundancy_loss_threshold:
                self._red_until = now + self.config.redundancy_hold
            if self.config.video_rate_adaptation or self.config.audio_rate_adaptation:
                loss = self._send_loss.report(message.audio, self._history.first_nacked)
                if self.config.video_rate_adaptation:
                    self._rate.report(now, loss, self._rtt.latest)
                if self.config.audio_rate_adaptation:
                    self._opus.report(now, loss)
        elif isinstance(message, KeyframeRequest):
            c.keyframe_requests_received += 1
            if message.request > self._last_request_seen:
                self._last_request_seen = message.request
                self._keyframe_wanted = True
        elif isinstance(message, VideoNack):
            c.nacks_received += 1
            if self.config.video_nack:
                for datagram in self._history.nacked(message, now):
                    self._send(datagram)

    def _send_nack(self, now: float) -> None:
        nack = self._assembler.nack_request(now, self._rtt.smoothed)
        if nack is not None:
            self._send(nack.encode(), control=True)

    def _deliver_frames(self, frames: list[AssembledFrame], now: float) -> None:
        for frame in frames:
            self._video_rx.packet(frame.frame_id, frame.timestamp, now)
        self._video_out.push(frames)

    # ---- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send and receive until ``duration`` is over, the connection closes, or the
        caller cancels; the recording is finished in every case. Reports readiness
        through ``task_status`` once sources, codecs and the recording are open."""
        if self._state != "new":
            raise LocalError("this CallMedia has already run")
        c = self.config
        audio_source: AudioSource | None = None
        video_source: VideoSource | None = None
        self._state = "starting"
        try:
            if self.audio_in is not None:
                audio_source = await self._open(open_audio_source, self.audio_in)
                self._audio_source = audio_source
            if self.audio_out is not None:
                low_water = c.speaker_low_water
                self._speaker = await self._open(
                    lambda s: open_audio_sink(s, low_water=low_water), self.audio_out
                )
            if self.video_in is not None:
                spec = self.video_in
                video_source = await self._open(
                    lambda s: open_video_source(s, width=c.video_width, height=c.video_height),
                    spec,
                )
            self._decoder = decoder = open_opus_decoder(use_libopus=c.use_libopus)
            encoder = await trio.to_thread.run_sync(self._open_encoder) if audio_source else None
            start = trio.current_time()
            self._started_at = start
            if self.record is not None:
                self._recorder = open_recorder(
                    self.record,
                    start=start,
                    width=c.video_width,
                    height=c.video_height,
                    fps=c.video_fps,
                )
            self._audio_out = audio_out = AudioPlayout(
                c, self._jitter, decoder, recorder=self._recorder, speaker=self._speaker,
                device_failed=self._device_failed,
            )  # fmt: skip
            self._state = "running"
            with trio.CancelScope() as scope:
                self._scope = scope
                if self.duration is not None:
                    scope.deadline = start + self.duration
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._audio_loop, start, audio_source, encoder, audio_out)
                    nursery.start_soon(audio_out.run, start)
                    if video_source is not None:
                        nursery.start_soon(self._video_send_loop, start, video_source)
                    nursery.start_soon(self._video_out.run, self._recorder)
                    nursery.start_soon(self._watch_connection, scope)
                    if encoder is not None and c.audio_rate_adaptation:
                        nursery.start_soon(self._opus.serve)
                    task_status.started()
            if not self._end_reason:
                self._end_reason = "duration" if scope.cancelled_caught else "ended"
        finally:
            if not self._end_reason:
                self._end_reason = "cancelled"
            self._state = "ended"
            self._ended_at = trio.current_time()
            for source in (audio_source, video_source, self._speaker):
                if source is not None:
                    source.close()
            if self._recorder is not None:
                self._recorder.close()
            if self._decoder is not None:
                self._decoder.close()

    async def _open(self, opener: Any, spec: str) -> Any:
        # Opening a file or device may touch the disk or hardware: off the trio thread.
        return await trio.to_thread.run_sync(opener, spec)

    async def _watch_connection(self, scope: trio.CancelScope) -> None:
        for _ in range(1 << 20):  # once per switch of connection (switch_peer)
            watched = self.peer
            await watched.wait_closed()
            if self.peer is watched:
                break
        self._end_reason = "connection closed"
        scope.cancel()

    def switch_peer(self, peer: MediaPeer) -> None:
        """Send on ``peer`` from now on: a better connection to the same peer (a relayed
        one made direct, p2pd/relay/upgrade.py). What arrives on either is played; the
        jitter buffer orders it. The call ends when the connection in use closes."""
        if peer is not self.peer:
            self.peer = peer
            self._path_switches += 1

    def _send(self, data: bytes, *, control: bool = False) -> None:
        """Send one datagram. ``control``: a receiver report, NACK or keyframe request,
        not audio or video payload. It goes as ``urgent``, ahead of the media waiting
        for the congestion window and not refused while media would be
        (p2pd/transport/quic/peer.py, ``send_datagram``). Queued behind the video, a
        25 %-loss call beside two CPU hogs dropped 5-7 reports, 15-22 keyframe requests
        and 5-12 NACKs at our own full queue (3 runs, both sides)."""
        c = self._c
        try:
            sent = self.peer.send_datagram(data, urgent=control)
        except ConnectionLost:
            # The connection is gone (closed by either side, or timed out): the call ends.
            if not self._end_reason:
                self._end_reason = "connection lost"
            if self._scope is not None:
                self._scope.cancel()
            return
        except DatagramTooLarge:
            # Our packets are sized by max_datagram_size; only a shrinking path gets here.
            c.send_dropped += 1
            c.control_send_dropped += control
            return
        if not sent:
            c.send_dropped += 1
            c.control_send_dropped += control
            return
        c.datagrams_sent += 1
        c.bytes_sent += len(data)

    def _open_encoder(self) -> OpusEncoder:
        """The Opus encoder, warmed up: PyAV sets up its resampler on the first frame it
        encodes, which took 20-40 ms here, so a first frame in the call would reach the
        peer that late and the next few behind it (the peer's jitter buffer then plays
        its first frames late, or takes the next ones for late). A frame of silence
        encoded now, and not sent, costs nothing in the call."""
        return open_warm_encoder(self._opus.controller.current)

    async def _audio_loop(
        self,
        start: float,
        source: AudioSource | None,
        encoder: OpusEncoder | None,
        playout: AudioPlayout,
    ) -> None:
        """Capture, encode and send one audio frame per 20 ms (on the microphone's clock
        if it is one), and the call's control traffic: keyframe requests, NACKs, reports.
        With ``align_playout`` off, ``playout`` plays on this tick too."""
        c = self.config
        seq = 0
        tick = 0
        next_report = start
        # The last packet sent, (seq, payload), for the next one to carry again.
        previous: tuple[int, bytes] | None = None
        # A microphone paces this loop with its own clock (its frames are awaited);
        # anything else is read on trio's.
        mic = source if isinstance(source, MicSource) else None
        paced = mic is not None
        while True:
            if mic is not None:
                try:
                    pcm, lost = await mic.receive()
                except LocalError as exc:  # it failed again after restarts: unplugged?
                    self._device_failed(exc.message)
                    return
                # Frames the device delivered while we were starved, dropped from its
                # queue: the timeline moves on by as many, and the peer conceals them.
                seq += lost
            else:
                await trio.sleep_until(start + tick * FRAME_DURATION)
            now = trio.current_time()
            if source is not None and encoder is not None:
                if not paced:
                    pcm = (
                        await trio.to_thread.run_sync(source.read) if source.live else source.read()
                    )
                encoder = self._opus.take(now, pcm, encoder)
                for payload in encoder.encode(pcm):
                    self._send_audio(seq, payload, previous, now)
                    previous = (seq, payload)
                    seq += 1
            if not c.align_playout:
                playout.play(now)
            self._deliver_frames(self._assembler.poll(now), now)
            request = self._assembler.keyframe_request(now)
            if request is not None:
                self._send(KeyframeRequest(request).encode(), control=True)
                self._c.keyframe_requests_sent += 1
            self._send_nack(now)
            if now >= next_report:
                self._send_report(now)
                next_report = now + c.report_interval
            tick += 1
            behind = trio.current_time() - (start + tick * FRAME_DURATION)
            if not paced and behind > 10 * FRAME_DURATION:
                # Starved of CPU for over 200 ms: skip ahead rather than burst. The
                # peer's jitter buffer sees a gap in timestamps and conceals it.
                skipped = int(behind / FRAME_DURATION)
                tick += skipped
                seq += skipped
                self._c.ticks_late += skipped

    def redundancy_active(self, now: float) -> bool:
        """Whether our audio datagrams carry a redundant copy now: the peer accepts them
        and reported loss within ``redundancy_hold``."""
        return self.config.audio_redundancy and self._peer_accepts_red and now < self._red_until

    def _send_audio(
        self, seq: int, payload: bytes, previous: tuple[int, bytes] | None, now: float
    ) -> None:
        timestamp = (seq * FRAME_SAMPLES) % (1 << 32)
        redundant = b""
        if (
            previous is not None
            and previous[0] == seq - 1
            and self.redundancy_active(now)
            and AUDIO_RED_HEADER + len(previous[1]) + len(payload) <= self.peer.max_datagram_size
        ):
            redundant = previous[1]
        packet = AudioPacket(
            seq % (1 << 32), timestamp, payload, start=seq == 0, redundant=redundant
        )
        self._send(packet.encode())
        self._c.audio_packets_sent += 1
        if redundant:
            self._c.audio_red_sent += 1

    def _device_failed(self, message: str) -> None:
        """A sound device failed for good: the call ends, saying why."""
        log.warning("%s: the call ends", message)
        if not self._end_reason:
            self._end_reason = message
        if self._scope is not None:
            self._scope.cancel()

    def _send_report(self, now: float) -> None:
        echo, delay = self._rtt.echo(now)
        report = ReceiverReport(
            send_time_us=RttEstimator.clock_us(now),
            echo_us=echo,
            echo_delay_us=delay,
            audio=self._audio_rx.report(),
            video=self._video_rx.report(),
            accepts_redundancy=True,
            answers_nacks=self.config.video_nack,
        )
        self._send(report.encode(), control=True)
        self._c.reports_sent += 1

    async def _video_send_loop(self, start: float, source: VideoSource) -> None:
        c = self.config

        def open_encoder(bitrate: int) -> Vp8Encoder:
            self._video_encoder_bps = bitrate
            w, h, fps = c.video_width, c.video_height, c.video_fps
            return Vp8Encoder(width=w, height=h, fps=fps, bitrate=bitrate)

        encoder = open_encoder(
            round(self._rate.target) if c.video_rate_adaptation else c.video_bitrate
        )
        interval = 1 / c.video_fps
        tick = 0
        frame_id = 0
        last_keyframe = -math.inf
        while True:
            await trio.sleep_until(start + tick * interval)
            now = trio.current_time()
            t = tick * interval
            picture = (
                await trio.to_thread.run_sync(source.read, t) if source.live else source.read(t)
            )
            force = self._keyframe_wanted and now - last_keyframe >= c.min_keyframe_interval
            if force:
                self._keyframe_wanted = False
            if c.video_rate_adaptation:  # a new encoder's first frame is a keyframe
                queued = getattr(self.peer, "queued_datagrams", 0)  # a QuicPeer's
                self._rate.local_queue(now, self._c.send_dropped, queued)
                bitrate = self._rate.encoder_bitrate(now, encoder.bitrate, keyframe_due=force)
                encoder = encoder if bitrate is None else open_encoder(bitrate)
            timestamp = round(t * VIDEO_CLOCK) % (1 << 32)
            for data, keyframe in encoder.encode(picture, keyframe=force):
                if keyframe:
                    last_keyframe = now
                    self._c.video_keyframes_sent += 1
                limit = self.peer.max_datagram_size
                pieces = fragment(frame_id, timestamp, data, keyframe=keyframe, max_datagram=limit)
                if self._assembler.nack_enabled:  # the peer NACKs what it misses
                    self._send_loss.fragments_sent(len(pieces))
                for piece in pieces:
                    datagram = piece.encode()
                    self._send(datagram)
                    if c.video_nack:
                        self._history.sent(piece, datagram, now)
                frame_id += 1
                self._c.video_frames_sent += 1
            tick += 1
            late = trio.current_time() - (start + tick * interval)
            if late > interval:
                skipped = int(late / interval)  # drop frames rather than fall behind
                tick += skipped
                self._c.video_frames_skipped += skipped

    # ---- statistics

    def statistics(self) -> dict[str, Any]:
        """A flat, JSON-ready snapshot. Times in ms unless named otherwise; rates averaged
        over the call so far. ``loss_pct`` and ``jitter_ms`` are what we receive (RFC 3550
        loss and interarrival jitter of the peer's audio); ``remote_loss_pct`` is what the
        peer reports of ours."""
        c = self._c
        played = self._audio_out.counters if self._audio_out else PlayoutCounters()
        plc_replaced = self._audio_out.floor.replaced if self._audio_out else 0
        now = self._ended_at if self._ended_at is not None else trio.current_time()
        duration = now - self._started_at if self._started_at is not None else 0.0
        seconds = max(duration, 1e-9)
        rtt = self._rtt.smoothed
        jitter = self._jitter.statistics()
        assembler = self._assembler.statistics()
        return {
            "state": self._state,
            "end_reason": self._end_reason,
            "path_switches": self._path_switches,
            "duration_s": round(duration, 3),
            "rtt_ms": round(rtt * 1000, 2) if rtt is not None else None,
            "loss_pct": round(self._audio_rx.loss_fraction * 100, 2),
            "remote_loss_pct": round(self._remote_audio.loss_fraction * 100, 2),
            "jitter_ms": round(self._audio_rx.jitter * 1000, 2),
            "bitrate_sent_kbps": round(c.bytes_sent * 8 / seconds / 1000, 1) if duration else 0.0,
            "bitrate_received_kbps": (
                round(c.bytes_received * 8 / seconds / 1000, 1) if duration else 0.0
            ),
            "audio_packets_sent": c.audio_packets_sent,
            "audio_packets_received": self._audio_rx.received,
            "audio_frames_played": played.frames_played,
            "audio_frames_concealed": played.concealed,
            "audio_fec_recovered": played.fec_recovered,
            "audio_red_recovered": played.red_recovered,
            "audio_red_sent": c.audio_red_sent,
            "audio_redundancy": self.redundancy_active(now),
            "audio_decode_errors": played.decode_errors,
            "audio_plc_replaced": plc_replaced,
            "audio_stretched": jitter["expanded"],
            "audio_late": jitter["late"],
            "audio_late_concealed": jitter["late_concealed"],
            "audio_delay_peaks_held": jitter["peaks_held"],
            "audio_dropped": jitter["dropped"],
            "audio_start_skipped": jitter["start_skipped"],
            "jitter_buffer_target_ms": jitter["target_ms"],
            "opus_decoder": self._decoder.name if self._decoder is not None else None,
            "video_frames_sent": c.video_frames_sent,
            "video_keyframes_sent": c.video_keyframes_sent,
            "video_frames_received": self._video_out.frames_received,
            "video_loss_pct": round(self._video_rx.loss_fraction * 100, 2),
            "video_remote_loss_pct": round(self._remote_video.loss_fraction * 100, 2),
            "video_decode_errors": self._video_out.decode_errors,
            "video_frames_discarded": assembler["discarded"],
            "keyframe_requests_sent": c.keyframe_requests_sent,
            "keyframe_requests_received": c.keyframe_requests_received,
            "video_nacks_sent": assembler["nacks_sent"],
            "video_fragments_nacked": assembler["fragments_nacked"],
            "video_nack_recovered": assembler["nack_recovered"],
            "video_nacks_received": c.nacks_received,
            **self._history.statistics(),
            **self._rate.statistics(),
            **self._opus.statistics(),
            "video_encoder_kbps": round(self._video_encoder_bps / 1000, 1),
            "video_send_loss_pct": round(100 * (self._send_loss.last or 0.0), 2),
            "datagrams_sent": c.datagrams_sent,
            "datagrams_received": c.datagrams_received,
            "datagrams_send_dropped": c.send_dropped,
            "control_send_dropped": c.control_send_dropped,
            "reports_sent": c.reports_sent,
            "reports_received": c.reports_received,
            "datagrams_malformed": c.malformed,
            "ticks_late": c.ticks_late + played.skipped,
            "audio_playout_skipped": played.skipped,
            "video_frames_skipped": c.video_frames_skipped,
            "recorded_frames": self._recorder.frames_written if self._recorder else 0,
            **self._device_statistics(),
        }

    def _device_statistics(self) -> dict[str, Any]:
        """The microphone's and speaker's counters, when the call uses them."""
        out: dict[str, Any] = {}
        source = self._audio_source
        stats = getattr(source, "statistics", None)
        if callable(stats):
            out.update(stats())
        if self._speaker is not None:
            out.update(self._speaker.statistics())
        return out
