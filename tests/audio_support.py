"""Helpers for the audio tests (not a test module): find played audio inside a recording by
cross-correlation, never assuming a lag, and the child processes that play and record live audio.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from rtpipe.stages.audio_io import (
    FileCapture,
    FileParams,
    MicrophoneCapture,
    MicrophoneParams,
    SpeakerParams,
    SpeakerPlayback,
)
from rtpipe.stages.base import EndOfStream

REPO = Path(__file__).resolve().parents[1]
PIPELINE_TIMEOUT_S = 90.0


def find_lag(recording: np.ndarray, played: np.ndarray) -> tuple[int, float]:
    """The lag L (samples) that best matches recording[L:L+len(played)] to `played`, and the normalized
    correlation there (1.0: identical up to gain)."""
    recording = np.asarray(recording, dtype=np.float64)
    played = np.asarray(played, dtype=np.float64)
    if len(recording) < len(played) or not np.any(played):
        return 0, 0.0
    n = 1 << int(np.ceil(np.log2(len(recording) + len(played))))
    corr = np.fft.irfft(np.fft.rfft(recording, n) * np.conj(np.fft.rfft(played, n)), n)
    corr = corr[: len(recording) - len(played) + 1]
    # normalise by each window's energy, so a loud stretch of the recording does not win by loudness
    energy = np.concatenate([[0.0], np.cumsum(recording**2)])
    window = energy[len(played) :] - energy[: -len(played)]
    score = corr / np.sqrt(np.maximum(window, 1e-20) * np.sum(played**2))
    lag = int(np.argmax(score))
    return lag, float(score[lag])


def chunk_lags(
    recording: np.ndarray, played: np.ndarray, chunk_samples: int, min_rms: float = 0.02
) -> list[tuple[int, int, float]]:
    """(start of the chunk in `played`, where it starts in `recording`, correlation) for each chunk of
    `played` loud enough to find; robust to the one-off shift an underrun causes."""
    out = []
    for start in range(0, len(played) - chunk_samples + 1, chunk_samples):
        chunk = played[start : start + chunk_samples]
        if np.sqrt(np.mean(np.asarray(chunk, dtype=np.float64) ** 2)) < min_rms:
            continue
        lag, score = find_lag(recording, chunk)
        out.append((start, lag, score))
    return out


def record_microphone(path: str, ready, stop, max_seconds: float, env: dict | None = None) -> None:
    """Child process: records MicrophoneCapture frames until `stop`; saves samples and capture times.
    `env` (e.g. PULSE_SOURCE) is applied before the device is opened."""
    os.environ.update(env or {})
    mic = MicrophoneCapture(MicrophoneParams(block_samples=240))
    mic.open()
    frames, capture_ns = [], []
    deadline = time.monotonic() + max_seconds
    while not stop.is_set() and time.monotonic() < deadline:
        frame = mic.read(0.2)
        if frame is None:
            continue
        frames.append(np.array(frame.payload))
        capture_ns.append(frame.capture_ns)
        ready.set()
    counters = mic.counters()
    np.savez(
        path,
        samples=np.concatenate(frames),
        capture_ns=np.array(capture_ns, dtype=np.int64),
        input_latency_ns=mic.device_latency_ns,
        frames_dropped=counters["frames_dropped"],
        input_overflows=counters["input_overflows"],
    )
    mic.close()


def play_speech(path: str, seconds: float, env: dict | None = None) -> None:
    """Child process: plays the built-in speech through SpeakerPlayback at real time; saves write and
    hand-off times. `env` (e.g. PULSE_SINK) is applied before the device is opened."""
    os.environ.update(env or {})
    source = FileCapture(FileParams(seconds=seconds, pace=True))
    speaker = SpeakerPlayback(SpeakerParams(block_samples=240))
    speaker.open()
    source.open()
    write_ns, latency_ns = [], []
    while True:
        try:
            frame = source.read(1.0)
        except EndOfStream:
            break
        if frame is None:
            continue
        speaker.write(frame.payload)
        write_ns.append(time.monotonic_ns())
        latency_ns.append(speaker.output_latency_ns)
    speaker.close()
    handoffs = np.array(speaker.pop_handoffs(), dtype=np.int64).reshape(-1, 2)
    counters = speaker.counters()
    np.savez(
        path,
        write_ns=np.array(write_ns),
        output_latency_ns=np.array(latency_ns),
        handoff_frame=handoffs[:, 0],
        handoff_ns=handoffs[:, 1],
        device_latency_ns=speaker.device_latency_ns,
        underruns=counters["underruns"],
        overflows=counters["overflows"],
        trims=counters["trims"],
        trimmed_ms=counters["trimmed_ms"],
    )


def speech(seconds: float) -> np.ndarray:
    """The first `seconds` of the built-in speech sample, as the file source frames it."""
    source = FileCapture(FileParams(seconds=seconds, pace=False))
    source.open()
    frames = []
    try:
        while True:
            frames.append(source.read(0.0).payload)
    except EndOfStream:
        pass
    return np.concatenate(frames)


class PipelineRun:
    """`rtpipe run` in a subprocess; `running` is set once its status line counts frames."""

    def __init__(self, args: list[str], env: dict):
        self.lines: list[str] = []
        self.running = threading.Event()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rtpipe.pipeline.cli", "run", *args],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if "ALSA lib" in line or "Expression '" in line:
                continue  # PortAudio/ALSA chatter on PulseAudio's null sink: harmless
            self.lines.append(line.rstrip())
            match = re.search(r"frames\s+(\d+)", line)
            if match and int(match.group(1)) > 0:
                self.running.set()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # a clean stop: the report is still written
        try:
            return self.process.wait(PIPELINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail("rtpipe run did not stop after SIGINT:\n" + self.output())

    def output(self) -> str:
        return "\n".join(self.lines[-40:])

    def stage_pid(self, stage: str) -> int:
        """The pid of this run's process for `stage` (`python -m rtpipe.pipeline.runtime.host STAGE`)."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if child.cmdline()[-2:] == ["rtpipe.pipeline.runtime.host", stage]:
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        raise LookupError(f"no process for stage {stage!r}:\n{self.output()}")
