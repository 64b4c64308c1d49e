"""Audio in and out of the pipeline: the sources (microphone, WAV file, tone) and sinks (speaker, WAV
file, null) that sit at the two ends of the chain, all speaking 80 ms frames of 24 kHz mono float32.

Device streams use small blocks (240 samples by default) because the output buffer is always two blocks
whatever `latency=` says (on PulseAudio a 1920-sample block alone costs 160 ms of delay, a 240-sample one
20 ms); the stages assemble them into 1920-sample frames. sounddevice is imported only
when a device is used, so a machine without PortAudio can still run file-to-file pipelines.

Sinks expose `counters() -> {"underruns", "overflows", "device_underflows", "trims", "trimmed_ms",
"target_ms"}` for the report's "playback" section (device_underflows: the output device's own underflows;
trims, trimmed_ms, target_ms: the speaker's adaptive playout; all 0 but for the speaker);
SpeakerPlayback also exposes `device_latency_ns` (PortAudio's output latency) and `pop_handoffs()`.
"""

from __future__ import annotations

import collections
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rtpipe.stages.base import (
    AUDIO_FRAME,
    FRAME_NS,
    FRAME_SAMPLES,
    PLAYBACK_COUNTERS,
    SAMPLE_RATE,
    EndOfStream,
    PayloadSpec,
    Role,
    SourceFrame,
    Stage,
)
from rtpipe.stages.checkpoint import check_seed
from rtpipe.stages.errors import AudioError, ConfigError
from rtpipe.stages.jitter_buffer import JitterBuffer
from rtpipe.stages.playout import AdaptivePlayout, PlayoutConfig

# The built-in speech sample: a few sentences from espeak-ng, 24 kHz mono (stages/data/make_speech.sh).
SPEECH_SAMPLE_PATH = Path(__file__).resolve().parent / "data" / "speech.wav"

NS_PER_S = 1_000_000_000
# A fresh PulseAudio stream can stall for a second or two before its callbacks flow (measured 1.2-1.7 s).
DEVICE_START_ALLOWANCE_S = 10.0


# --- devices -------------------------------------------------------------------------------------


def _sounddevice():
    """The sounddevice module; AudioError when the PortAudio library is missing."""
    try:
        import sounddevice
    except OSError as e:  # sounddevice raises OSError when libportaudio cannot be loaded
        raise AudioError(f"PortAudio library not found (install libportaudio2): {e}") from e
    except ImportError as e:
        raise AudioError(f"the sounddevice package is not installed: {e}") from e
    return sounddevice


def list_audio_devices() -> list[dict]:
    """Every PortAudio device: {"index", "name", "hostapi", "inputs", "outputs", "default_samplerate",
    "default_input", "default_output"}. Raises AudioError when PortAudio is missing."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
        default_in, default_out = sd.default.device
    except Exception as e:  # PortAudio errors come as sd.PortAudioError or ValueError
        raise AudioError(f"cannot list audio devices: {e}") from e
    rows = []
    for index, dev in enumerate(devices):
        rows.append(
            {
                "index": index,
                "name": dev["name"],
                "hostapi": hostapis[dev["hostapi"]]["name"],
                "inputs": int(dev["max_input_channels"]),
                "outputs": int(dev["max_output_channels"]),
                "default_samplerate": float(dev["default_samplerate"]),
                "default_input": index == default_in,
                "default_output": index == default_out,
            }
        )
    return rows


def audio_devices_available() -> bool:
    """True when PortAudio sees at least one input and one output device. Never raises."""
    try:
        rows = list_audio_devices()
    except Exception:
        return False
    return any(r["inputs"] > 0 for r in rows) and any(r["outputs"] > 0 for r in rows)


def _device_arg(device: str):
    """sounddevice's device argument: None for the default, an index for digits, else a name substring."""
    if device == "":
        return None
    return int(device) if device.isdigit() else device


def _start_stream(make_stream, flowing: threading.Event, wait_s: float, device: str, silent: str):
    """Makes and starts a PortAudio stream and returns it once its callback has set `flowing`.
    AudioError naming `device` if it cannot be opened or stays `silent` for wait_s; nothing is left open."""
    stream = None
    try:
        stream = make_stream()
        stream.start()
    except Exception as e:
        _close_quietly(stream)
        raise AudioError(f"{device}: cannot open: {e}") from e
    if not flowing.wait(wait_s):
        _close_quietly(stream)
        raise AudioError(f"{device} {silent} within {wait_s:.0f} s of starting")
    return stream


def _close_quietly(stream) -> None:
    if stream is not None:
        try:
            stream.abort()
            stream.close()
        except Exception:
            pass  # closing a broken device must not hide why we are closing


def _check_block(where: str, block_samples: int) -> None:
    if not 16 <= block_samples <= FRAME_SAMPLES:
        raise ConfigError(f"{where}.block_samples = {block_samples}: expected 16..{FRAME_SAMPLES} samples")


def _check_watchdog(where: str, watchdog_s: float) -> None:
    if not watchdog_s > 0:
        raise ConfigError(f"{where}.watchdog_s = {watchdog_s}: expected a positive number of seconds")


def _check_seconds(where: str, seconds: float | None) -> None:
    if seconds is not None and not 0 < seconds < math.inf:
        raise ConfigError(f"{where}.seconds = {seconds}: expected a positive number of seconds (or leave it out)")


def _total_samples(seconds: float | None) -> int | None:
    return None if seconds is None else max(1, round(seconds * SAMPLE_RATE))


def _require_audio_input(kind: str, input_spec: PayloadSpec | None) -> None:
    if input_spec != AUDIO_FRAME:
        raise ConfigError(f"{kind}: takes {AUDIO_FRAME} audio frames, but its input is {input_spec}")


# --- microphone ----------------------------------------------------------------------------------


@dataclass
class MicrophoneParams:
    device: str = ""  # PortAudio device name (or part of it, or its index); "" = default input
    # device block; input costs about two of these (PulseAudio, 20 s: 120 -> 10.2 ms median, 240 -> 20.2
    # ms, no overflow or drop at either, also with both cores busy)
    block_samples: int = 120
    queue_frames: int = 8  # frames waiting for read(); when full the oldest is dropped and counted
    watchdog_s: float = 3.0  # read() raises AudioError when no callback came for this long
    seconds: float | None = None  # EndOfStream after this much audio; None: until stopped

    def validate(self, where: str) -> None:
        _check_block(where, self.block_samples)
        _check_watchdog(where, self.watchdog_s)
        _check_seconds(where, self.seconds)
        if self.queue_frames < 1:
            raise ConfigError(f"{where}.queue_frames = {self.queue_frames}: expected at least 1")


@dataclass
class MicrophoneState:
    frames_emitted: int = 0


class MicrophoneCapture(Stage):
    """`capture.microphone`: a sounddevice InputStream whose callback assembles 1920-sample frames.

    The callback never blocks: finished frames go on a queue of `queue_frames`; if read() falls behind,
    the oldest frame is dropped and counted (`counters()["frames_dropped"]`). Each frame's capture_ns is
    the time.monotonic_ns() at which its first sample was captured, from a sample clock anchored on the
    least-delayed callbacks of the last second, minus the input latency PortAudio reports. (PortAudio's
    inputBufferAdcTime is not used: on ALSA's pulse device it drifted by ~100 ms in a second.)"""

    role = Role.SOURCE
    Params = MicrophoneParams
    live = True

    def __init__(self, params: MicrophoneParams | None = None):
        super().__init__(params)
        self.state = MicrophoneState()
        self._stream = None
        self._frames: queue.SimpleQueue[SourceFrame] = queue.SimpleQueue()
        self._first_callback = threading.Event()
        # written only by the PortAudio callback thread once the stream runs
        self._frame_buf: np.ndarray | None = None
        self._frame_fill = 0
        self._frame_first_index = 0
        self._samples_seen = 0
        self._anchor_estimates: collections.deque[int] = collections.deque(maxlen=128)
        self._last_callback_ns = 0
        self._frames_dropped = 0
        self._input_overflows = 0
        self._input_latency_ns = 0

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        return AUDIO_FRAME

    def check_sessions(self, slots: int, where: str) -> None:
        if slots > 1:
            raise ConfigError(
                f"{where}: a microphone is one conversation, and this pipeline has {slots} sessions "
                "(use capture.file with one input per session, or sessions = 1)"
            )

    def reset(self) -> None:
        """Starts afresh from what the device captures next: frames queued before the reset are dropped."""
        super().reset()
        while True:
            try:
                self._frames.get_nowait()
            except queue.Empty:
                break

    @property
    def device_latency_ns(self) -> int:
        """The input latency PortAudio reports for the open stream (0 before open)."""
        return self._input_latency_ns

    def counters(self) -> dict:
        """{"frames_dropped": frames lost because read() fell behind, "input_overflows": device overflows}."""
        return {"frames_dropped": self._frames_dropped, "input_overflows": self._input_overflows}

    def open(self, device: str = "cpu") -> None:
        sd = _sounddevice()
        p = self.params
        blocks_per_second = SAMPLE_RATE / p.block_samples
        self._anchor_estimates = collections.deque(maxlen=max(8, int(blocks_per_second)))

        def make_stream():
            stream = sd.InputStream(
                device=_device_arg(p.device),
                samplerate=SAMPLE_RATE,
                channels=1,
                dtype="float32",
                blocksize=p.block_samples,
                latency="low",
                callback=self._on_block,
            )
            self._input_latency_ns = int(stream.latency * NS_PER_S)  # before start: the callback uses it
            return stream

        self._stream = _start_stream(
            make_stream,
            self._first_callback,
            DEVICE_START_ALLOWANCE_S + p.watchdog_s,
            f"capture.microphone: input device {p.device or 'default'!r}",
            "delivered no audio",
        )

    def _on_block(self, indata, n_samples, time_info, status) -> None:
        # PortAudio's thread: no waiting, no allocation beyond one frame buffer per 80 ms.
        now_ns = time.monotonic_ns()
        self._last_callback_ns = now_ns
        if status.input_overflow:
            # samples were lost: the sample clock no longer lines up with the old anchor
            self._input_overflows += 1
            self._anchor_estimates.clear()
        block_end = self._samples_seen + n_samples
        self._anchor_estimates.append(now_ns - self._input_latency_ns - block_end * NS_PER_S // SAMPLE_RATE)
        anchor_ns = min(self._anchor_estimates)
        samples = indata[:, 0]
        pos = 0
        while pos < n_samples:
            if self._frame_buf is None:
                self._frame_buf = np.empty(FRAME_SAMPLES, dtype=np.float32)
                self._frame_fill = 0
                self._frame_first_index = self._samples_seen + pos
            take = min(n_samples - pos, FRAME_SAMPLES - self._frame_fill)
            self._frame_buf[self._frame_fill : self._frame_fill + take] = samples[pos : pos + take]
            self._frame_fill += take
            pos += take
            if self._frame_fill == FRAME_SAMPLES:
                capture_ns = anchor_ns + self._frame_first_index * NS_PER_S // SAMPLE_RATE
                # drop-oldest: a live microphone never waits on a slow reader
                while self._frames.qsize() >= self.params.queue_frames:
                    try:
                        self._frames.get_nowait()
                        self._frames_dropped += 1
                    except queue.Empty:
                        break
                self._frames.put(SourceFrame(self._frame_buf, int(capture_ns)))
                self._frame_buf = None
        self._samples_seen = block_end
        self._first_callback.set()

    def read(self, timeout_s: float) -> SourceFrame | None:
        """The next 80 ms frame, None when none came within `timeout_s`.

        Raises AudioError when the device stopped delivering (watchdog), EndOfStream after `seconds`."""
        p = self.params
        total = _total_samples(p.seconds)
        if total is not None and self.state.frames_emitted * FRAME_SAMPLES >= total:
            raise EndOfStream()
        if self._stream is None:
            raise AudioError("capture.microphone: read() before open()")
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            try:
                frame = self._frames.get(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                silent_s = (time.monotonic_ns() - self._last_callback_ns) / NS_PER_S
                if silent_s > p.watchdog_s:
                    raise AudioError(
                        f"capture.microphone: no audio from input device {p.device or 'default'!r} for {silent_s:.1f} s"
                    ) from None
                if time.monotonic() >= deadline:
                    return None
                continue
            self.state.frames_emitted += 1
            return frame

    def _close_stream(self) -> None:
        _close_quietly(self._stream)
        self._stream = None

    def close(self) -> None:
        self._close_stream()


# --- sources that compute their frames: a WAV file, a tone ---------------------------------------


@dataclass
class PacedState:
    next_frame: int = 0
    t0_ns: int | None = None  # when frame 0's first sample was "captured" (set by the first read)


class _ComputedSource(Stage):
    """A source whose frame k is known in advance. Paced, frame k is handed out at t0 + k * 80 ms (t0:
    frame 0's time, from the first read; a restarted process's first frame is due at once) and that is
    its capture_ns: a file has no moment of capture before it is read, so unlike a microphone's frames
    these carry no 80 ms of framing (the report counts that only for a live source). Unpaced, frames
    come as fast as read() is called; capture_ns is the time of the read."""

    role = Role.SOURCE
    sessions = True

    def __init__(self, params=None):
        super().__init__(params)
        self.state = PacedState()

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        return AUDIO_FRAME

    def open(self, device: str = "cpu") -> None:
        self.state.next_frame = self.resume_frame  # a restart carries on where the last process stopped

    def _frame(self, k: int, slot: int) -> np.ndarray | None:
        """Frame k (float32 [1920]) of session slot `slot`, or None past the end of its input."""
        raise NotImplementedError

    def _frames(self, k: int) -> SourceFrame | None:
        """Frame k of every slot; a slot whose input has ended is not live; None when none is left.
        With one slot, the frame itself, as a one-slot source gives it."""
        if self.session_slots == 1:
            frame = self._frame(k, 0)
            return None if frame is None else SourceFrame(frame, 0)
        rows = np.zeros((self.session_slots, FRAME_SAMPLES), dtype=np.float32)
        live = []
        for slot in range(self.session_slots):
            frame = self._frame(k, slot)
            if frame is not None:
                rows[slot] = frame
                live.append(slot)
        if not live:
            return None
        return SourceFrame(rows, 0, live=live, fresh=live if k == 0 else ())

    def read(self, timeout_s: float) -> SourceFrame | None:
        k = self.state.next_frame
        frame = self._frames(k)
        if frame is None:
            raise EndOfStream()
        if not self.params.pace:
            self.state.next_frame += 1
            frame.capture_ns = time.monotonic_ns()
            return frame
        now_ns = time.monotonic_ns()
        if self.state.t0_ns is None:  # the first frame read (frame 0, or the first after a restart) is due now
            self.state.t0_ns = now_ns - k * FRAME_NS
        capture_ns = self.state.t0_ns + k * FRAME_NS
        wait_ns = capture_ns - now_ns
        if wait_ns > timeout_s * NS_PER_S:
            time.sleep(max(0.0, timeout_s))
            return None
        if wait_ns > 0:
            time.sleep(wait_ns / NS_PER_S)
        self.state.next_frame += 1
        frame.capture_ns = capture_ns
        return frame


@dataclass
class FileParams:
    path: str = ""  # WAV (or anything libsndfile reads); "" = the built-in speech sample
    # one input per session (session k reads paths[k % len(paths)]); empty: every session reads `path`
    paths: list[str] = field(default_factory=list)
    pace: bool = True  # real time, like a microphone; false: as fast as the pipeline takes it
    loop: bool = False  # start over at the end (with `seconds`, to make a long run from a sample)
    seconds: float | None = None  # stop after this much audio (the last frame is zero-padded)

    def validate(self, where: str) -> None:
        _check_seconds(where, self.seconds)
        if self.paths:
            for i, path in enumerate(self.paths):
                _check_finite_audio(f"{where}.paths[{i}]", _resolved(path))
        else:
            _check_finite_audio(f"{where}.path", self.resolved_path())

    def resolved_path(self) -> Path:
        return _resolved(self.path)

    def session_path(self, slot: int) -> Path:
        """The input of session slot `slot`: inputs are reused in turn when fewer than the slots."""
        return _resolved(self.paths[slot % len(self.paths)]) if self.paths else self.resolved_path()


def _resolved(path: str) -> Path:
    return Path(path).expanduser() if path else SPEECH_SAMPLE_PATH


def _check_finite_audio(where: str, path: Path) -> None:
    """AudioError naming the file when it cannot be read, or holds NaN or infinite samples (they would
    reach the models as they are)."""
    _check_readable_audio(where, path)
    load_audio_24k_mono(path, where)


def _check_readable_audio(where: str, path: Path):
    """soundfile's info for `path`; AudioError naming the path when missing, unreadable or empty."""
    import soundfile

    if not path.exists():
        raise AudioError(f"{where} = '{path}': no such file")
    if path.is_dir():
        raise AudioError(f"{where} = '{path}': is a directory, not an audio file")
    if not os.access(path, os.R_OK):  # else libsndfile says only "System error."
        raise AudioError(f"{where} = '{path}': cannot be read (permission denied)")
    try:
        info = soundfile.info(str(path))
    except Exception as e:
        raise AudioError(f"{where} = '{path}': not a readable audio file ({_one_line(e)})") from e
    if info.frames <= 0:
        raise AudioError(f"{where} = '{path}': holds no audio samples")
    return info


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class FileCapture(_ComputedSource):
    """`capture.file`: a WAV file as 80 ms frames, mixed to mono and resampled to 24 kHz (soxr) when it
    is not already. The last frame is zero-padded. Errors name the file: AudioError."""

    Params = FileParams

    def __init__(self, params: FileParams | None = None):
        super().__init__(params)
        self._inputs: list[np.ndarray] = []  # per session slot (a file read once, shared by its slots)
        self.source_samplerate: int | None = None
        self.source_channels: int | None = None

    def open(self, device: str = "cpu") -> None:
        super().open(device)
        loaded: dict[Path, np.ndarray] = {}
        for slot in range(self.session_slots):
            path = self.params.session_path(slot)
            if path not in loaded:
                loaded[path] = load_audio_24k_mono(path)
            self._inputs.append(loaded[path])

    def _frame(self, k: int, slot: int) -> np.ndarray | None:
        if not self._inputs:
            raise AudioError("capture.file: read() before open()")
        samples = self._inputs[slot]
        n = len(samples)
        total = _total_samples(self.params.seconds)
        if not self.params.loop:
            total = n if total is None else min(total, n)
        start = k * FRAME_SAMPLES
        if total is not None and start >= total:
            return None
        stop = start + FRAME_SAMPLES if total is None else min(start + FRAME_SAMPLES, total)
        frame = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        if self.params.loop:
            frame[: stop - start] = np.take(samples, np.arange(start, stop), mode="wrap")
        else:
            frame[: stop - start] = samples[start:stop]
        return frame

    def close(self) -> None:
        self._inputs = []


def load_audio_24k_mono(path: Path | str, where: str = "capture.file.path") -> np.ndarray:
    """The whole file as float32 mono at 24 kHz (channels averaged, soxr HQ resampling).

    Raises AudioError naming the file when it is missing, unreadable, holds no samples, or holds NaN or
    infinite ones."""
    import soundfile
    import soxr

    path = Path(path)
    _check_readable_audio(where, path)
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{path}: cannot read audio ({_one_line(e)})") from e
    if data.size == 0:
        raise AudioError(f"{path}: holds no audio samples")
    bad = ~np.isfinite(data)
    if bad.any():
        first = int(np.flatnonzero(bad.any(axis=1))[0])
        raise AudioError(
            f"{where} = '{path}': holds {int(bad.sum())} NaN or infinite samples (the first at "
            f"{first / rate:.3f} s); audio must be finite"
        )
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


@dataclass
class ToneParams:
    signal: Literal["sine", "noise", "silence"] = "sine"
    frequency_hz: float = 440.0
    amplitude: float = 0.5  # peak, of full scale 1.0
    seed: int = 0  # noise: the same seed gives the same frames
    pace: bool = True
    seconds: float | None = None  # None: until stopped

    def validate(self, where: str) -> None:
        _check_seconds(where, self.seconds)
        if not 0.0 <= self.amplitude <= 1.0:
            raise ConfigError(f"{where}.amplitude = {self.amplitude}: expected 0.0..1.0 of full scale")
        if not 0.0 < self.frequency_hz < SAMPLE_RATE / 2:
            raise ConfigError(f"{where}.frequency_hz = {self.frequency_hz}: expected 0 < f < {SAMPLE_RATE // 2} Hz")
        check_seed(self.seed, f"{where}.seed")


class ToneCapture(_ComputedSource):
    """`capture.tone`: a sine, white noise or silence, for tests and benchmarks. Frame k depends only on
    the params, k and the session slot (noise differs per slot), so a run (or a restart) is
    reproducible."""

    Params = ToneParams

    def _frame(self, k: int, slot: int) -> np.ndarray | None:
        p = self.params
        total = _total_samples(p.seconds)
        start = k * FRAME_SAMPLES
        if total is not None and start >= total:
            return None
        if p.signal == "sine":
            n = np.arange(start, start + FRAME_SAMPLES, dtype=np.float64)
            # phase in cycles, reduced before scaling so long runs keep full precision
            cycles = np.mod(p.frequency_hz * n, SAMPLE_RATE) / SAMPLE_RATE
            frame = (p.amplitude * np.sin(2.0 * math.pi * cycles)).astype(np.float32)
        elif p.signal == "noise":
            rng = np.random.default_rng([p.seed, k] if slot == 0 else [p.seed, k, slot])
            frame = rng.uniform(-p.amplitude, p.amplitude, FRAME_SAMPLES).astype(np.float32)
        else:
            frame = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        if total is not None and start + FRAME_SAMPLES > total:
            frame[total - start :] = 0.0
        return frame


# --- sinks ---------------------------------------------------------------------------------------

NO_PLAYBACK_COUNTERS: dict[str, int | float] = {name: kind() for name, kind in PLAYBACK_COUNTERS.items()}


@dataclass
class SpeakerParams:
    device: str = ""  # PortAudio device name (or part of it, or its index); "" = default output
    block_samples: int = 120  # device block; the device path costs about two of these (240 measured 20 ms)
    # "adaptive": the queue's target follows the lateness of arriving frames and excess audio is trimmed
    # (stages/playout.py); "fixed": target_latency_ms always (the behaviour before adaptive playout)
    playout: Literal["adaptive", "fixed"] = "adaptive"
    target_latency_ms: float = 120.0  # queue length when a frame lands (adaptive: until lateness is known)
    max_latency_ms: float = 320.0  # more than this queued: trim the oldest back to the target
    watchdog_s: float = 3.0  # write() raises AudioError when no callback came for this long
    # adaptive only (see stages/playout.py, whose PlayoutConfig holds the defaults):
    min_target_ms: float = PlayoutConfig.min_target_ms  # the target never goes below this
    max_target_ms: float = PlayoutConfig.max_target_ms  # ... nor above this (nor max_latency_ms - a frame)
    lateness_window_ms: float = PlayoutConfig.window_ms  # the lateness statistics cover this much audio
    lateness_percentile: float = PlayoutConfig.percentile  # the target covers this percentile of lateness
    margin_ms: float = PlayoutConfig.margin_ms  # ... plus this
    underrun_raise_ms: float = PlayoutConfig.underrun_raise_ms  # an underrun raises the floor this (a window)
    speech_cut_ms: float = PlayoutConfig.speech_cut_ms  # the most a frame of speech loses to a trim
    hysteresis_ms: float = PlayoutConfig.hysteresis_ms  # trim only when the queue stands this much above target

    def validate(self, where: str) -> None:
        _check_block(where, self.block_samples)
        _check_watchdog(where, self.watchdog_s)
        if self.playout not in ("adaptive", "fixed"):
            raise ConfigError(f"{where}.playout = {self.playout!r}: expected 'adaptive' or 'fixed'")
        if not self.target_latency_ms > 0:
            raise ConfigError(f"{where}.target_latency_ms = {self.target_latency_ms}: expected a positive number")
        if self.max_latency_ms < self.target_latency_ms + 1000.0 * FRAME_SAMPLES / SAMPLE_RATE:
            raise ConfigError(
                f"{where}.max_latency_ms = {self.max_latency_ms}: expected at least "
                f"target_latency_ms + one frame (80 ms)"
            )
        frame_ms = 1000.0 * FRAME_SAMPLES / SAMPLE_RATE
        if not frame_ms <= self.min_target_ms < math.inf:
            raise ConfigError(f"{where}.min_target_ms = {self.min_target_ms}: expected at least one frame (80 ms)")
        if not self.min_target_ms <= self.max_target_ms:
            raise ConfigError(f"{where}.max_target_ms = {self.max_target_ms}: expected at least min_target_ms")
        if self.playout == "adaptive" and self.min_target_ms > self.max_latency_ms - frame_ms:
            raise ConfigError(f"{where}.min_target_ms = {self.min_target_ms}: expected max_latency_ms - 80 ms or less")
        if not 0 < self.lateness_window_ms < math.inf:
            raise ConfigError(f"{where}.lateness_window_ms = {self.lateness_window_ms}: expected a positive number")
        if not 0 <= self.lateness_percentile <= 100:
            raise ConfigError(f"{where}.lateness_percentile = {self.lateness_percentile}: expected 0..100")
        for name in ("margin_ms", "underrun_raise_ms", "hysteresis_ms"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ConfigError(f"{where}.{name} = {value}: expected a number of ms, 0 or more")
        if not 0 <= self.speech_cut_ms <= frame_ms / 2:
            raise ConfigError(f"{where}.speech_cut_ms = {self.speech_cut_ms}: expected 0..40 ms")

    def playout_config(self) -> PlayoutConfig:
        """The adaptive playout's parameters from these."""
        return PlayoutConfig(
            sample_rate=SAMPLE_RATE,
            frame_samples=FRAME_SAMPLES,
            start_target_ms=min(max(self.target_latency_ms, self.min_target_ms), self.max_target_ms),
            min_target_ms=self.min_target_ms,
            max_target_ms=min(self.max_target_ms, self.max_latency_ms - 1000.0 * FRAME_SAMPLES / SAMPLE_RATE),
            window_ms=self.lateness_window_ms,
            percentile=self.lateness_percentile,
            margin_ms=self.margin_ms,
            underrun_raise_ms=self.underrun_raise_ms,
            speech_cut_ms=self.speech_cut_ms,
            hysteresis_ms=self.hysteresis_ms,
        )


@dataclass
class SpeakerState:
    frames_written: int = 0


class SpeakerPlayback(Stage):
    """`playback.speaker`: a sounddevice OutputStream fed through a JitterBuffer.

    write() never waits on the device: it queues the frame and returns. Interface for the host:
      counters() -> {"underruns": int, "overflows": int, "device_underflows": int, "trims": int,
                     "trimmed_ms": float, "target_ms": float}   cumulative: the jitter buffer's
                     underruns, overflows and trims (count, audio dropped), PortAudio's output
                     underflows; target_ms is the buffer's target now
      output_latency_ns  -> for the frame just written: audio queued ahead of it plus device_latency_ns
      device_latency_ns  -> the output latency PortAudio reports for the open stream
      pop_handoffs() -> [(frame_index, handoff_ns)]  when each frame's first sample went to the device
    Raises AudioError when the device cannot be opened or stops asking for audio (watchdog)."""

    role = Role.SINK
    Params = SpeakerParams

    def __init__(self, params: SpeakerParams | None = None):
        super().__init__(params)
        self.state = SpeakerState()
        self._stream = None
        self._buffer: JitterBuffer | None = None
        self._output_latency_ns = 0
        self._device_latency_ns = 0
        self._callbacks = 0
        self._last_callback_ns = 0
        self._device_underflows = 0
        self._running = threading.Event()
        self._pending_starts: collections.deque[tuple[int, int]] = collections.deque()
        self._handoffs: collections.deque[tuple[int, int]] = collections.deque(maxlen=4096)

    def output_spec(self, input_spec: PayloadSpec | None) -> None:
        _require_audio_input("playback.speaker", input_spec)
        return None

    def check_sessions(self, slots: int, where: str) -> None:
        if slots > 1:
            raise ConfigError(
                f"{where}: a speaker is one conversation, and this pipeline has {slots} sessions "
                "(use playback.file with output_dir for one WAV per session, or sessions = 1)"
            )

    @property
    def device_latency_ns(self) -> int:
        return self._device_latency_ns

    @property
    def output_latency_ns(self) -> int:
        return self._output_latency_ns

    def counters(self) -> dict[str, int | float]:
        buffer = self._buffer
        if buffer is None:
            return dict(NO_PLAYBACK_COUNTERS)
        c = buffer.counters
        return {
            "underruns": c.underruns,
            "overflows": c.overflows,
            "device_underflows": self._device_underflows,
            "trims": c.trims,
            "trimmed_ms": round(1000.0 * c.samples_trimmed / SAMPLE_RATE, 3),
            "target_ms": round(1000.0 * buffer.target_samples / SAMPLE_RATE, 3),
        }

    def device_underflows(self) -> int:
        """Times PortAudio itself reported an output underflow (the device ran ahead of the callback)."""
        return self._device_underflows

    def pop_handoffs(self) -> list[tuple[int, int]]:
        """(frame_index, handoff_ns) for frames whose first sample reached the device since the last call:
        handoff_ns is the callback's time.monotonic_ns() plus the sample's offset in the block."""
        out = []
        while self._handoffs:
            out.append(self._handoffs.popleft())
        return out

    def open(self, device: str = "cpu") -> None:
        sd = _sounddevice()
        p = self.params
        self._buffer = JitterBuffer(
            target_samples=round(p.target_latency_ms * SAMPLE_RATE / 1000.0),
            max_samples=round(p.max_latency_ms * SAMPLE_RATE / 1000.0),
            playout=AdaptivePlayout(p.playout_config()) if p.playout == "adaptive" else None,
        )
        # A new PulseAudio stream takes its first blocks at once, then may stall for a second or two;
        # wait until callbacks flow so the first frames are not queued behind the stall.

        def make_stream():
            stream = sd.OutputStream(
                device=_device_arg(p.device),
                samplerate=SAMPLE_RATE,
                channels=1,
                dtype="float32",
                blocksize=p.block_samples,
                latency="low",
                callback=self._on_block,
            )
            self._device_latency_ns = int(stream.latency * NS_PER_S)
            return stream

        self._stream = _start_stream(
            make_stream,
            self._running,
            DEVICE_START_ALLOWANCE_S + p.watchdog_s,
            f"playback.speaker: output device {p.device or 'default'!r}",
            "asked for no audio",
        )

    def _on_block(self, outdata, n_samples, time_info, status) -> None:
        now_ns = time.monotonic_ns()
        self._last_callback_ns = now_ns
        self._callbacks += 1
        if status.output_underflow:
            self._device_underflows += 1
        buffer = self._buffer
        if buffer is None:  # not opened (open() makes the buffer before the stream): silence
            outdata.fill(0)
            return
        took = buffer.pull(outdata[:, 0])
        position, offset = buffer.last_pull_position, buffer.last_pull_offset
        # frames whose first sample left in this block (or was trimmed away by an overflow)
        while self._pending_starts and self._pending_starts[0][1] < position + took:
            index, start = self._pending_starts.popleft()
            if start >= position:
                self._handoffs.append((index, now_ns + (offset + start - position) * NS_PER_S // SAMPLE_RATE))
        if self._callbacks == 16:
            self._running.set()

    def write(self, frame: np.ndarray) -> None:
        if self._buffer is None or self._stream is None:
            raise AudioError("playback.speaker: write() before open()")
        silent_s = (time.monotonic_ns() - self._last_callback_ns) / NS_PER_S
        if silent_s > self.params.watchdog_s:
            raise AudioError(
                f"playback.speaker: output device {self.params.device or 'default'!r} "
                f"asked for no audio for {silent_s:.1f} s"
            )
        start = self._buffer.samples_pushed
        self._pending_starts.append((self.state.frames_written, start))
        ahead = self._buffer.push(frame)
        self.state.frames_written += 1
        self._output_latency_ns = ahead * NS_PER_S // SAMPLE_RATE + self._device_latency_ns

    def close(self) -> None:
        if self._buffer is not None and self._stream is not None:
            # play out what is queued, then the device's own buffer, before stopping
            self._buffer.drain()
            deadline = time.monotonic() + self._buffer.fill_samples / SAMPLE_RATE + self.params.watchdog_s
            while self._buffer.fill_samples > 0 and time.monotonic() < deadline:
                if time.monotonic_ns() - self._last_callback_ns > NS_PER_S // 2:
                    break  # the device stopped asking: what is left will never play
                time.sleep(0.01)
            time.sleep(self._device_latency_ns / NS_PER_S + 2 * self.params.block_samples / SAMPLE_RATE)
        self._close_stream()

    def _close_stream(self) -> None:
        _close_quietly(self._stream)
        self._stream = None


WAV_FORMATS = ("WAV", "WAVEX", "RF64")  # soundfile's names for what a .wav may hold


@dataclass
class FilePlaybackParams:
    path: str = "rtpipe-out.wav"
    subtype: Literal["FLOAT", "PCM_16", "PCM_24"] = "FLOAT"  # FLOAT keeps the samples bit-exact
    # one WAV per session, <output_dir>/session-<k>.wav (k from 0); "": the one file `path` (one session)
    output_dir: str = ""

    def validate(self, where: str) -> None:
        import soundfile

        if self.output_dir:
            directory = Path(self.output_dir).expanduser()
            if directory.exists() and not directory.is_dir():
                raise ConfigError(f"{where}.output_dir = '{self.output_dir}': is a file, not a directory")
            parent = directory.resolve().parent
            if not directory.exists() and not parent.is_dir():
                raise ConfigError(f"{where}.output_dir = '{self.output_dir}': directory {parent} does not exist")
            if not os.access(directory if directory.exists() else parent, os.W_OK):
                raise ConfigError(f"{where}.output_dir = '{self.output_dir}': not writable")
            return
        if not self.path:
            raise ConfigError(f"{where}.path = '': expected the path of the WAV file to write")
        path = Path(self.path).expanduser()
        if path.is_dir():
            raise ConfigError(f"{where}.path = '{self.path}': is a directory")
        other_format = path.suffix[1:].upper()
        if other_format in soundfile.available_formats() and other_format not in WAV_FORMATS:
            raise ConfigError(f"{where}.path = '{self.path}': this stage writes WAV, not {other_format}: name it .wav")
        parent = path.resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"{where}.path = '{self.path}': directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"{where}.path = '{self.path}': directory {parent} is not writable")


@dataclass
class CountingState:
    frames_written: int = 0


class FilePlayback(Stage):
    """`playback.file`: writes what the speaker would have played, one whole frame per write(), so the
    output holds exactly frames x 1920 samples at 24 kHz mono. With sessions, one WAV per session slot
    in `output_dir` (session-<k>.wav, opened at the slot's first frame), each holding the frames where
    its slot was live. Restarted mid-run, it goes on after the last whole frame its predecessor wrote
    (libsndfile reads a WAV whose writer was killed by its length)."""

    role = Role.SINK
    Params = FilePlaybackParams
    sessions = True

    def __init__(self, params: FilePlaybackParams | None = None):
        super().__init__(params)
        self.state = CountingState()
        self._files: dict[int, Any] = {}  # session slot -> its open soundfile.SoundFile

    def output_spec(self, input_spec: PayloadSpec | None) -> None:
        _require_audio_input("playback.file", input_spec)
        return None

    def check_sessions(self, slots: int, where: str) -> None:
        if slots > 1 and not self.params.output_dir:
            raise ConfigError(
                f"{where}.params.output_dir: {slots} sessions write one WAV each; give a directory "
                "(rtpipe run --output-dir DIR) rather than the one file path"
            )

    def session_path(self, slot: int) -> Path:
        """Where session slot `slot`'s audio goes."""
        if self.params.output_dir:
            return Path(self.params.output_dir).expanduser() / f"session-{slot}.wav"
        return Path(self.params.path).expanduser()

    def counters(self) -> dict:
        return dict(NO_PLAYBACK_COUNTERS)

    def open(self, device: str = "cpu") -> None:
        if self.params.output_dir:
            Path(self.params.output_dir).expanduser().mkdir(parents=True, exist_ok=True)
        else:
            self._file_of(0)  # the one file exists from the start, even if no frame comes

    def _file_of(self, slot: int):
        file = self._files.get(slot)
        if file is None:
            file = self._files[slot] = self._open_file(self.session_path(slot))
        return file

    def _open_file(self, path: Path):
        import soundfile

        if self.restarted and path.is_file() and path.stat().st_size > 0:
            try:
                written = soundfile.SoundFile(str(path), "r+")
            except Exception as e:
                raise AudioError(f"playback.file: cannot go on writing {path}: {_one_line(e)}") from e
            if written.samplerate != SAMPLE_RATE or written.channels != 1:
                written.close()
                raise AudioError(f"playback.file: {path} is no longer this run's 24 kHz mono output")
            whole_frames = written.frames // FRAME_SAMPLES
            written.seek(whole_frames * FRAME_SAMPLES)  # a torn last frame is overwritten
            self.state.frames_written += whole_frames
            return written
        try:
            return soundfile.SoundFile(
                str(path), "w", samplerate=SAMPLE_RATE, channels=1, subtype=self.params.subtype, format="WAV"
            )
        except Exception as e:
            raise AudioError(f"playback.file: cannot write {path}: {_one_line(e)}") from e

    def write(self, frame: np.ndarray) -> None:
        self._write(0, frame)

    def write_sessions(self, frames: np.ndarray, live: np.ndarray) -> None:
        for slot in live.tolist():
            self._write(slot, frames[slot])

    def _write(self, slot: int, frame: np.ndarray) -> None:
        if not self._files and not self.params.output_dir:
            raise AudioError("playback.file: write() before open()")
        self._file_of(slot).write(np.asarray(frame, dtype=np.float32).reshape(FRAME_SAMPLES))
        self.state.frames_written += 1

    def close(self) -> None:
        files, self._files = self._files, {}
        for file in files.values():
            file.close()


class NullPlayback(Stage):
    """`playback.null`: takes any frame and discards it (benchmarks of the pipeline itself)."""

    role = Role.SINK
    sessions = True

    def __init__(self, params=None):
        super().__init__(params)
        self.state = CountingState()

    def output_spec(self, input_spec: PayloadSpec | None) -> None:
        if input_spec is None:
            raise ConfigError("playback.null: needs an input edge")
        return None

    def counters(self) -> dict:
        return dict(NO_PLAYBACK_COUNTERS)

    def write(self, frame: np.ndarray) -> None:
        self.state.frames_written += 1

    def write_sessions(self, frames: np.ndarray, live: np.ndarray) -> None:
        self.state.frames_written += len(live)
