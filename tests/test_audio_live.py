"""Live audio through a PulseAudio null sink: speech played by SpeakerPlayback in one process comes back
through MicrophoneCapture in another (as the pipeline runs them), found by cross-correlation; the
device path's latency is measured (printed, never asserted against a threshold).
"""

from __future__ import annotations

import itertools
import multiprocessing
import time

import numpy as np
import pytest

from rtpipe.stages.audio_io import (
    MicrophoneCapture,
    MicrophoneParams,
    SpeakerParams,
    SpeakerPlayback,
    audio_devices_available,
)
from rtpipe.stages.base import FRAME_SAMPLES, SAMPLE_RATE
from rtpipe.stages.errors import AudioError

from audio_support import chunk_lags, play_speech, record_microphone, speech

SPEECH_SECONDS = 6.0
CHUNK_SAMPLES = SAMPLE_RATE // 2
PROCESS_TIMEOUT_S = 60.0


def _join(process, what: str) -> None:
    process.join(PROCESS_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        pytest.fail(f"{what} process did not finish within {PROCESS_TIMEOUT_S} s")
    assert process.exitcode == 0, f"{what} process failed (exit code {process.exitcode}); see its stderr"


def test_pulse_null_sink_gives_an_input_and_an_output_device(pulse_null_sink):
    assert audio_devices_available()


def _play_and_record(tmp_path, attempt: int) -> tuple[dict, dict]:
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    rec_path, play_path = str(tmp_path / f"rec{attempt}.npz"), str(tmp_path / f"play{attempt}.npz")
    recorder = ctx.Process(target=record_microphone, args=(rec_path, ready, stop, PROCESS_TIMEOUT_S))
    recorder.start()
    try:
        assert ready.wait(PROCESS_TIMEOUT_S), "the microphone process delivered no frame"
        player = ctx.Process(target=play_speech, args=(play_path, SPEECH_SECONDS))
        player.start()
        _join(player, "speaker")
        # the speaker drained its buffers before exiting; keep recording a little for the tail
        time.sleep(0.5)
    finally:
        stop.set()
    _join(recorder, "microphone")
    return dict(np.load(rec_path)), dict(np.load(play_path))


def test_speech_played_by_the_speaker_comes_back_through_the_microphone(pulse_null_sink, tmp_path):
    speech_samples = speech(SPEECH_SECONDS)
    attempts = []
    # A loaded machine starves PulseAudio itself (ALSA xruns shift or drop audio for good): one clean
    # take out of three shows the path works; three bad ones show it does not.
    for attempt in range(3):
        rec, play = _play_and_record(tmp_path, attempt)
        recording = rec["samples"]
        chunks = chunk_lags(recording, speech_samples, CHUNK_SAMPLES)
        assert len(chunks) >= 6, "the speech sample should have several loud half-second chunks"
        found = [
            (start, lag)
            for start, lag, score in chunks
            if score > 0.999
            and np.array_equal(recording[lag : lag + CHUNK_SAMPLES], speech_samples[start : start + CHUNK_SAMPLES])
        ]
        attempts.append(
            f"take {attempt}: {len(found)}/{len(chunks)} half-second chunks bit-exact, "
            f"speaker underruns {int(play['underruns'])} overflows {int(play['overflows'])} "
            f"trims {int(play['trims'])}, "
            f"microphone frames dropped {int(rec['frames_dropped'])}"
        )
        if len(found) >= 0.75 * len(chunks):
            break
    else:
        pytest.fail("speech not found in the recording: " + "; ".join(attempts))
    lags = [lag - start for start, lag in found]
    # Audio comes back later after an underrun; it comes back earlier only by what the adaptive playout
    # trimmed (counted), never by more.
    came_back_earlier = sum(max(0, a - b) for a, b in itertools.pairwise(lags))
    trimmed_samples = round(float(play["trimmed_ms"]) * SAMPLE_RATE / 1000)
    assert came_back_earlier <= trimmed_samples + 1, (
        f"audio came back {came_back_earlier} samples earlier, but the speaker trimmed only {trimmed_samples} "
        f"({int(play['trims'])} trims): {lags}"
    )

    # Device path: capture time of a frame's first sample minus when it was handed to the device.
    capture_ns = rec["capture_ns"]
    assert np.all(np.diff(capture_ns) > 0), "capture times must increase frame by frame"

    def captured_ns(sample: int) -> int | None:
        shift = [lag - start for start, lag in found if start <= sample < start + CHUNK_SAMPLES]
        at = sample + shift[0] if shift else None
        if at is None or at // FRAME_SAMPLES >= len(capture_ns):
            return None
        return int(capture_ns[at // FRAME_SAMPLES]) + (at % FRAME_SAMPLES) * 1_000_000_000 // SAMPLE_RATE

    device_ms, write_ms = [], []
    for frame_index, handoff_ns in zip(play["handoff_frame"], play["handoff_ns"]):
        c = captured_ns(int(frame_index) * FRAME_SAMPLES)
        if c is not None:
            device_ms.append((c - int(handoff_ns)) / 1e6)
    for frame_index, write_ns in enumerate(play["write_ns"]):
        c = captured_ns(frame_index * FRAME_SAMPLES)
        if c is not None:
            write_ms.append((c - int(write_ns)) / 1e6)
    assert device_ms, "no played frame could be matched to its recording"
    # capture_ns is corrected by the latency PortAudio reports; a sample still cannot be captured
    # before the speaker stage was given it
    assert min(write_ms) > 0, f"captured before it was written: {min(write_ms):.1f} ms"
    print(
        f"\nlive audio ({attempts[-1]}): device path (handed to device -> captured) "
        f"P50 {np.median(device_ms):.1f} ms, P99 {np.percentile(device_ms, 99):.1f} ms, "
        f"max {np.max(device_ms):.1f} ms over {len(device_ms)} frames; write() -> captured "
        f"P50 {np.median(write_ms):.1f} ms; speaker output_latency_ns P50 "
        f"{np.median(play['output_latency_ns']) / 1e6:.1f} ms; PortAudio latency out "
        f"{int(play['device_latency_ns']) / 1e6:.1f} ms, in {int(rec['input_latency_ns']) / 1e6:.1f} ms"
    )


def test_the_live_speaker_counts_an_underrun_when_frames_stop_and_an_overflow_when_they_pile_up(pulse_null_sink):
    # the fixed buffer: its underrun and overflow are what this counts (the adaptive one trims instead)
    speaker = SpeakerPlayback(SpeakerParams(playout="fixed", target_latency_ms=120.0, max_latency_ms=400.0))
    speaker.open()
    try:
        for _ in range(3):
            speaker.write(np.full(FRAME_SAMPLES, 0.1, dtype=np.float32))
        # no more frames: once the queue runs dry the device plays silence and it is counted
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while speaker.counters()["underruns"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert speaker.counters() == {
            "underruns": 1,
            "overflows": 0,
            "device_underflows": 0,
            "trims": 0,
            "trimmed_ms": 0.0,
            "target_ms": 120.0,
        }
        # a burst far beyond max_latency_ms is trimmed back to the target (at least once)
        for _ in range(12):
            speaker.write(np.zeros(FRAME_SAMPLES, dtype=np.float32))
        assert speaker.counters()["overflows"] >= 1
        assert speaker.output_latency_ns >= speaker.device_latency_ns > 0
    finally:
        speaker.close()


@pytest.mark.parametrize(
    "stage",
    [
        MicrophoneCapture(MicrophoneParams(device="no-such-device-xyz")),
        SpeakerPlayback(SpeakerParams(device="no-such-device-xyz")),
    ],
)
def test_a_device_that_cannot_be_opened_is_named_and_nothing_stays_open(pulse_null_sink, stage):
    direction = "input" if isinstance(stage, MicrophoneCapture) else "output"
    with pytest.raises(AudioError, match=f"{direction} device 'no-such-device-xyz': cannot open"):
        stage.open()
    assert stage._stream is None
    stage.close()  # closing after a failed open is harmless
