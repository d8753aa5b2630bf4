"""Sound devices: the microphone a call sends from and the speaker it plays to.

Through `sounddevice <https://python-sounddevice.readthedocs.io>`_ over PortAudio, the
``[audio]`` extra (``pip install 'p2pd[audio]'``; on Debian PortAudio is
``apt-get install libportaudio2``). Why this library: PortAudio is the portable C
library most audio programs use (ALSA, and PulseAudio/PipeWire through ALSA's pulse
plugin on Linux; CoreAudio; WASAPI), sounddevice is its kept Python binding (cffi, no
compiler needed, wheels that bundle PortAudio on macOS and Windows), and both install
here. PyAV's FFmpeg, which the calls use already, has ALSA capture only (no PulseAudio,
no playback), and `soundcard` talks to PulseAudio only.

Specs, as ``--audio-in`` / ``--audio-out`` take them: ``mic`` / ``speaker`` (the default
input / output device), ``mic:NAME`` / ``speaker:NAME`` (a device by its name as
``p2pd devices`` lists it, a unique part of it, or its index). On PulseAudio or
PipeWire the ``default`` and ``pulse`` devices follow the desktop's choice (or the
``PULSE_SOURCE`` / ``PULSE_SINK`` environment of the daemon).

Threads. Each device runs one thread of ours that does blocking reads (or writes) of
the PortAudio stream, paced by the device's own clock, and hands frames to trio through
a :class:`SampleRing`: a bounded deque that one thread appends to and the other pops
from (both atomic under the GIL, no lock), dropping and counting the oldest samples
when full and never blocking the device thread. Trio is woken with
``TrioToken.run_sync_soon`` (idempotent), which never blocks either. The threads touch
nothing else of the daemon.

Why blocking reads in a thread of ours rather than PortAudio's callback thread, as most
programs do: measured here (PortAudio 19.6 as Debian 12 ships it, through ALSA's pulse
plugin to a PulseAudio 16 null sink), callback streams misbehaved: capture stopped
calling back after 1-3 s while the stream said it was active, and playback began
1.5-2 s late; blocking ``read``/``write`` of the same devices ran steadily for as long as
we measured (8 s, 48,000 samples every second). Our thread does what the callback
would: it only moves samples, and it is the device's clock that paces it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from ..errors import LocalError, UsageError
from .codecs import FRAME_SAMPLES, SAMPLE_RATE, Pcm

__all__ = [
    "AudioDevice",
    "DeviceList",
    "MicSource",
    "SampleRing",
    "SpeakerSink",
    "check_devices",
    "check_output_spec",
    "list_devices",
    "open_audio_sink",
]

#: What to tell someone whose machine cannot open devices.
INSTALL_HINT = "pip install 'p2pd[audio]' (and, on Debian, apt-get install libportaudio2)"


class SampleRing:
    """A bounded single-producer, single-consumer queue of int16 samples.

    The producer calls :meth:`write`, the consumer :meth:`read`; each runs in one thread
    and neither ever waits for the other (``deque.append`` and ``popleft`` are atomic
    under the GIL, and each counter is written by one side only). When ``capacity``
    samples are queued, a write drops the oldest block(s) and counts them (the
    producer's side: ``dropped``); a read of more than is queued returns what there is
    followed by zeros, and counts the shortfall (the consumer's side: ``short``)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise UsageError("a sample ring needs a positive capacity")
        self.capacity = capacity
        self._blocks: deque[Pcm] = deque()
        self._offset = 0  # samples of the first block already read (consumer's)
        self.written = 0  # producer's counter
        self.consumed = 0  # consumer's counter (samples taken, zeros not included)
        self.dropped = 0  # producer's: samples thrown away on overflow
        self.dropped_blocks = 0
        self.short = 0  # consumer's: zeros returned for want of samples
        self.short_reads = 0

    @property
    def level(self) -> int:
        """Samples queued (either thread may ask; it may be one block stale)."""
        return max(0, self.written - self.dropped - self.consumed)

    def write(self, pcm: Pcm) -> None:
        while self._blocks and self.level + pcm.shape[0] > self.capacity:
            # Overflow: the oldest block goes (the consumer may be reading it: then the
            # popleft below loses the race harmlessly and this block is dropped next).
            try:
                old = self._blocks.popleft()
            except IndexError:
                break
            self.dropped += old.shape[0]
            self.dropped_blocks += 1
        self._blocks.append(pcm)
        self.written += pcm.shape[0]

    def read(self, n: int, *, count: bool = True) -> Pcm:
        """``n`` samples: what is queued, then zeros (counted in ``short`` if ``count``)."""
        out = np.zeros(n, np.int16)
        got = 0
        while got < n:
            try:
                block = self._blocks[0]
            except IndexError:
                break
            take = min(n - got, block.shape[0] - self._offset)
            out[got : got + take] = block[self._offset : self._offset + take]
            got += take
            self._offset += take
            if self._offset >= block.shape[0]:
                with contextlib.suppress(IndexError):
                    self._blocks.popleft()
                self._offset = 0
        self.consumed += got
        if got < n and count:
            self.short += n - got
            self.short_reads += 1
        return out

    def read_frame(self, n: int) -> Pcm | None:
        """``n`` samples if that many are queued, else None (nothing taken)."""
        if self.level < n:
            return None
        return self.read(n)


# --------------------------------------------------------------------------- library


def _sounddevice() -> Any:
    """The sounddevice module, or a LocalError saying how to get it."""
    try:
        import sounddevice  # the [audio] extra; imported only when a device is used
    except ImportError as exc:
        raise LocalError(f"sound devices need the sounddevice package: {INSTALL_HINT}") from exc
    except OSError as exc:  # sounddevice raises OSError when libportaudio is missing
        raise LocalError(f"sound devices need the PortAudio library: {INSTALL_HINT}") from exc
    return sounddevice


@dataclass(frozen=True)
class AudioDevice:
    """One device as ``p2pd devices`` lists it."""

    index: int
    name: str
    host_api: str
    channels: int
    default_samplerate: float
    default: bool

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "host_api": self.host_api,
            "channels": self.channels,
            "default_samplerate": self.default_samplerate,
            "default": self.default,
        }


@dataclass(frozen=True)
class DeviceList:
    inputs: list[AudioDevice]
    outputs: list[AudioDevice]

    def summary(self) -> dict[str, Any]:
        return {
            "inputs": [d.summary() for d in self.inputs],
            "outputs": [d.summary() for d in self.outputs],
        }


def list_devices() -> DeviceList:
    """The machine's input and output devices (empty lists on a machine with none).
    LocalError if sounddevice or PortAudio is missing."""
    sd = _sounddevice()
    try:
        if _DeviceThread.open_streams == 0:
            # PortAudio reads the device list once, when it initialises (at import):
            # start it again so that a headset plugged in since is seen. Only while no
            # stream of ours is open, since that closes them (sounddevice's own advice).
            sd._terminate()
            sd._initialize()
        raw = sd.query_devices()
        apis = sd.query_hostapis()
        default_in, default_out = sd.default.device
    except sd.PortAudioError as exc:
        raise LocalError(f"cannot list the sound devices: {exc}") from exc
    inputs: list[AudioDevice] = []
    outputs: list[AudioDevice] = []
    for info in raw:
        index = int(info["index"])
        name = str(info["name"])
        api = str(apis[info["hostapi"]]["name"])
        rate = float(info["default_samplerate"])
        for channels, default, found in (
            (int(info["max_input_channels"]), index == default_in, inputs),
            (int(info["max_output_channels"]), index == default_out, outputs),
        ):
            if channels > 0:
                found.append(AudioDevice(index, name, api, channels, rate, default))
    return DeviceList(inputs, outputs)


def _opener(sd: Any, stream_class: Any, device: Any, blocksize: int, what: str) -> Any:
    """A function that opens ``device`` as a mono 16-bit stream at our rate (again, when
    a stream fails mid-call); PortAudio's errors become a LocalError naming ``what``."""

    def open_stream() -> Any:
        try:
            return stream_class(
                device=device.index,
                samplerate=SAMPLE_RATE,
                channels=1,
                dtype="int16",
                blocksize=blocksize,
                latency="low",
            )
        except (sd.PortAudioError, ValueError) as exc:
            raise LocalError(f"cannot open {what} {device.name!r}: {exc}") from exc

    return open_stream


def _pick(kind: str, name: str, devices: list[AudioDevice]) -> AudioDevice:
    """The device ``name`` names among ``devices`` (empty name: the default)."""
    if kind == "mic":
        flag, spec = "--audio-in", "FILE|tone:HZ"
    else:
        flag, spec = "--audio-out", "none or --record FILE"
    what = "microphone" if kind == "mic" else "speaker"
    if not devices:
        raise LocalError(f"no {what} found: use {flag} {spec}")
    if not name:
        for device in devices:
            if device.default:
                return device
        return devices[0]
    if name.isdigit():
        found = [d for d in devices if d.index == int(name)]
    else:
        found = [d for d in devices if d.name == name] or [
            d for d in devices if name.lower() in d.name.lower()
        ]
    names = ", ".join(repr(d.name) for d in devices)
    if not found:
        raise LocalError(f"no {what} named {name!r}; there are: {names}")
    if len(found) > 1:
        raise LocalError(f"{name!r} names more than one {what}: {names}")
    return found[0]


def check_devices(audio_in: str | None, audio_out: str | None) -> None:
    """LocalError unless the microphone and speaker these specs name exist (other
    specs are not devices and pass). Before ringing anyone: a call that cannot use its
    devices fails here, with what to do instead."""
    mic = audio_in is not None and audio_in.partition(":")[0] == "mic"
    speaker = audio_out is not None and audio_out.partition(":")[0] == "speaker"
    if not (mic or speaker):
        return
    found = list_devices()
    if mic and audio_in is not None:
        _pick("mic", audio_in.partition(":")[2], found.inputs)
    if speaker and audio_out is not None:
        _pick("speaker", audio_out.partition(":")[2], found.outputs)


def check_output_spec(spec: str) -> None:
    """UsageError unless ``spec`` is ``none``, ``speaker`` or ``speaker:NAME``."""
    kind, _, _ = spec.partition(":")
    if spec != "none" and kind != "speaker":
        raise UsageError(f"--audio-out takes speaker[:NAME] or none, not {spec!r}")


# --------------------------------------------------------------------------- threads


class _DeviceThread:
    """A thread of ours that moves samples between a PortAudio stream and a ring, and
    wakes trio through its token. Subclasses say what one step does."""

    thread_name = "p2pd-audio"
    #: Streams open in this process (PortAudio's state is the process's; see
    #: list_devices). Changed in the trio thread or its worker threads only.
    open_streams = 0

    #: A stream that fails mid-call is opened again this many times at most.
    MAX_RESTARTS = 5

    def __init__(self, open_stream: Any, ring: SampleRing) -> None:
        self._open_stream = open_stream
        self._stream = open_stream()  # raises here, before the call, if it cannot open
        _DeviceThread.open_streams += 1
        self._closed = False
        self.ring = ring
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._event = trio.Event()
        self.device_errors = 0
        self.failed: str | None = None

    def _start(self) -> None:
        if self._thread is not None:
            return
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._stream.start()
                    self._prime()
                    while not self._stop.is_set():
                        self._step()
                except Exception:
                    # Measured here: now and then PortAudio's ALSA code fails both streams
                    # of a process at once ("Unanticipated host error", a failed poll of
                    # the pulse plugin's descriptors); a fresh stream works. A device
                    # unplugged mid-call fails again, and is reported.
                    self.device_errors += 1
                    with contextlib.suppress(Exception):
                        self._stream.close()
                    if self.device_errors > self.MAX_RESTARTS or self._stop.is_set():
                        raise
                    self._stop.wait(0.05)
                    self._stream = self._open_stream()
        except Exception as exc:  # say so, do not crash
            self.failed = str(exc) or type(exc).__name__
        finally:
            with contextlib.suppress(Exception):
                self._stream.close()
            self._wake()

    def _prime(self) -> None:
        """Before the first step (the stream is started)."""

    def _step(self) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._set_event, idempotent=True)

    def _set_event(self) -> None:  # runs in the trio thread
        self._event.set()

    async def _wait(self) -> None:
        """Until the thread wakes us (call only after checking there is nothing to do)."""
        self._event = trio.Event()
        await self._event.wait()

    def close(self) -> None:
        """Stop the thread (it finishes its current block, at most ~20 ms) and close the
        stream. Idempotent."""
        self._stop.set()
        if not self._closed:
            self._closed = True
            _DeviceThread.open_streams -= 1
        thread = self._thread
        if thread is None:
            with contextlib.suppress(Exception):
                self._stream.close()
            return
        # A device that hangs in read/write would keep us here: the join is bounded,
        # and the thread is a daemon thread.
        thread.join(timeout=1.0)


class MicSource(_DeviceThread):
    """A microphone: 20 ms frames of 48 kHz mono int16, paced by the device's clock.

    The call's send loop awaits :meth:`receive` instead of sleeping on trio's clock, so
    that the timestamps the peer sees advance with this device's clock (whose drift
    against the peer's speaker the peer's jitter buffer absorbs)."""

    live = True
    paced = True
    thread_name = "p2pd-mic"
    #: A frame this much later than the device's pace is taken as a stall: silence is
    #: sent instead, on trio's clock, until the device delivers again (a device that
    #: starts late, or hangs). Well over the device's own jitter (measured through
    #: PulseAudio: 20 ms apart at the median, 24 at p95, 40 at most) and over the
    #: moments a busy machine holds a thread back: at 60 ms, silence went out for frames
    #: that came later all the same, each one a 20 ms hole in the sound.
    STALL = 0.200
    #: More frames queued than this (trio fell behind) and the oldest are dropped, so
    #: that what we send stays this close to live (the peer conceals them).
    BACKLOG = 5

    def __init__(self, name: str = "", *, buffer_frames: int = 25) -> None:
        sd = _sounddevice()
        device = _pick("mic", name, list_devices().inputs)

        open_stream = _opener(sd, sd.InputStream, device, FRAME_SAMPLES, "the microphone")
        super().__init__(open_stream, SampleRing(buffer_frames * FRAME_SAMPLES))
        self.description = f"mic:{device.name}"
        self.overflows = 0  # the device's own: PortAudio said input was lost
        self.stalls = 0  # frames of silence sent for want of the device's
        self.trimmed = 0  # frames dropped from a backlog
        self._next: float | None = None  # when the device's next frame is expected
        self._stalled = False
        self._dropped_seen = 0

    def _step(self) -> None:
        data, overflowed = self._stream.read(FRAME_SAMPLES)
        if overflowed:
            self.overflows += 1
        self.ring.write(np.asarray(data, dtype=np.int16).reshape(-1).copy())
        self._wake()

    def read(self) -> Pcm:
        """The next frame if one is queued, else silence (for callers outside trio)."""
        frame = self.ring.read_frame(FRAME_SAMPLES)
        return frame if frame is not None else np.zeros(FRAME_SAMPLES, np.int16)

    async def receive(self) -> tuple[Pcm, int]:
        """The next 20 ms frame, and how many frames were lost before it (dropped because
        trio fell behind: the timeline moves on by that many). Paced by the device; once
        it has delivered nothing for STALL past its pace, silence at each moment a frame
        was due (on trio's clock), until it delivers again."""
        self._start()
        lost = 0
        while self.ring.level > self.BACKLOG * FRAME_SAMPLES:
            self.ring.read(FRAME_SAMPLES)
            self.trimmed += 1
            lost += 1
        if self.ring.dropped != self._dropped_seen:  # the ring overflowed (rare: 0.5 s)
            lost += (self.ring.dropped - self._dropped_seen) // FRAME_SAMPLES
            self._dropped_seen = self.ring.dropped
        now = trio.current_time()
        due = now if self._next is None else self._next
        # Stalled already: the silence for the slot at ``due`` goes then, not STALL later,
        # so that its timing matches the frames before the stall.
        with trio.move_on_at(max(now, due) + (0.0 if self._stalled else self.STALL)):
            while (frame := self.ring.read_frame(FRAME_SAMPLES)) is None:
                if self.failed is not None:
                    raise LocalError(f"the microphone failed: {self.failed}")
                await self._wait()
            self._stalled = False
            self._next = trio.current_time() + FRAME_SAMPLES / SAMPLE_RATE
            return frame, lost
        self.stalls += 1
        if not self._stalled:
            # The stall begins: silence from now on, without a burst for the slots that
            # passed meanwhile (sent late, they would look like a network delay spike to
            # the peer, whose jitter buffer would grow, then drop frames to catch up).
            # Mid-call those slots count as lost, so the timeline stays true; before the
            # first frame there is no timeline yet.
            now = trio.current_time()
            if self._next is not None:
                lost += int((now - due) * SAMPLE_RATE) // FRAME_SAMPLES
            due = now
            self._stalled = True
        self._next = due + FRAME_SAMPLES / SAMPLE_RATE
        return np.zeros(FRAME_SAMPLES, np.int16), lost

    def statistics(self) -> dict[str, int]:
        return {
            "mic_dropped_frames": self.ring.dropped // FRAME_SAMPLES + self.trimmed,
            "mic_overflows": self.overflows,
            "mic_stalls": self.stalls,
            "mic_restarts": self.device_errors,
        }


class SpeakerSink(_DeviceThread):
    """A speaker, fed 20 ms frames; its thread writes ``block`` samples at a time at the
    device's pace and wakes trio whenever fewer than ``low_water`` samples are queued.

    The call's playout loop waits on :meth:`wait_for_room` and tops the queue up to
    ``low_water`` from the jitter buffer: playout follows this device's clock. Each
    block the device needs that we have not queued is an underrun (zeros played,
    counted in ``ring.short``) once the first frame was written."""

    thread_name = "p2pd-speaker"

    def __init__(
        self, name: str = "", *, low_water: int = 1920, max_low_water: int = 4800, block: int = 480
    ) -> None:
        sd = _sounddevice()
        device = _pick("speaker", name, list_devices().outputs)

        open_stream = _opener(sd, sd.OutputStream, device, block, "the speaker")

        capacity = max(low_water, max_low_water) + 10 * FRAME_SAMPLES
        super().__init__(open_stream, SampleRing(capacity))
        self.description = f"speaker:{device.name}"
        #: Samples kept queued: starts at ``low_water``, grows by a block after each
        #: underrun (written by the device thread, read by trio: one int, atomic).
        self.low_water = low_water
        self.max_low_water = max(low_water, max_low_water)
        self.block = block
        self.device_underflows = 0  # the device's own: PortAudio said output ran dry
        self._fed = False

    def _prime(self) -> None:
        # Fill the device's own buffer with silence first: a fresh stream takes as many
        # blocks as its buffer holds at once (measured through PulseAudio: the first
        # writes return at once), which would otherwise drain our queue faster than trio
        # tops it up and count as underruns. Then the device starts late: measured with
        # PulseAudio 16 (a null sink, sounddevice alone, 10 ms blocks, latency "low"),
        # the first write after the buffer filled blocked 0.67-0.71 s (0.53 s at latency
        # "high", 0.31 s at 0.1 s). The call's audio that arrived meanwhile is not played
        # late: the jitter buffer starts with the newest frame due (start_skipped).
        for _ in range(64):
            if self._stream.write_available < self.block:
                break
            self._stream.write(np.zeros((self.block, 1), np.int16))

    def _step(self) -> None:
        # Until the first frame of the call's audio, trio queues silence, and running
        # short of silence is no underrun: zeros are the same silence.
        short = self.ring.short_reads
        samples = self.ring.read(self.block, count=self._fed)
        if self.ring.short_reads != short:
            # An underrun: trio was late to top up (a busy machine). Keep one block more
            # queued from now on, as a jitter buffer grows after a late packet.
            self.low_water = min(self.max_low_water, self.low_water + self.block)
        if self._stream.write(samples.reshape(-1, 1)):
            self.device_underflows += 1
        if self.ring.level < self.low_water:
            self._wake()

    def write(self, pcm: Pcm, *, audio: bool = True) -> None:
        """Queue one frame (from trio); ``audio`` False: silence before the call's
        audio began."""
        self.ring.write(pcm)
        self._fed = self._fed or audio

    def stop_feeding(self) -> None:
        """Playout ends (the call is over): what the device plays from now on until it
        closes is silence, and not an underrun."""
        self._fed = False

    @property
    def needs_more(self) -> bool:
        return self.ring.level < self.low_water

    async def wait_for_room(self) -> None:
        """Until fewer than ``low_water`` samples are queued."""
        self._start()
        while not self.needs_more:
            if self.failed is not None:
                raise LocalError(f"the speaker failed: {self.failed}")
            await self._wait()

    def statistics(self) -> dict[str, int]:
        return {
            "speaker_underruns": self.ring.short_reads,
            "speaker_underrun_ms": self.ring.short * 1000 // SAMPLE_RATE,
            "speaker_overflow_frames": self.ring.dropped // FRAME_SAMPLES,
            "speaker_device_underflows": self.device_underflows,
            "speaker_restarts": self.device_errors,
            "speaker_queue_ms": self.low_water * 1000 // SAMPLE_RATE,
        }


def open_audio_sink(spec: str, *, low_water: int = 1920) -> SpeakerSink | None:
    """The speaker ``spec`` names (``speaker[:NAME]``), or None for ``none``."""
    check_output_spec(spec)
    if spec == "none":
        return None
    return SpeakerSink(spec.partition(":")[2], low_water=low_water)
