"""`rtpipe run` live, end to end: speech played into a PulseAudio null sink is captured by the pipeline's
microphone stage, goes through five processes (codec.pcm, echo, codec.pcm) and comes out of its speaker
stage into a second null sink, where the test records it and finds it by cross-correlation. Two sinks
(PULSE_SINK / PULSE_SOURCE per process) keep the pipeline from hearing itself.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest

from rtpipe.stages.base import FRAME_SAMPLES, SAMPLE_RATE

from audio_support import PipelineRun, chunk_lags, play_speech, record_microphone, speech

SPEECH_SECONDS = 5.0
CHUNK_SAMPLES = SAMPLE_RATE // 2
TIMEOUT_S = 90.0


def _one_take(session, out_sink: str, tmp_path: Path, take: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    report_path = tmp_path / f"report{take}.json"
    rec_path, play_path = str(tmp_path / f"out{take}.npz"), str(tmp_path / f"in{take}.npz")
    ready, stop = ctx.Event(), ctx.Event()
    recorder = ctx.Process(
        target=record_microphone, args=(rec_path, ready, stop, TIMEOUT_S, {"PULSE_SOURCE": f"{out_sink}.monitor"})
    )
    recorder.start()
    # the stand-ins pass audio through bit-exact, so the speech can be found sample for sample
    stand_ins = [
        "--set",
        "stages.encode.kind=codec.pcm",
        "--set",
        "stages.lm.kind=echo",
        "--set",
        "stages.decode.kind=codec.pcm",
    ]
    run = PipelineRun(
        ["--seconds", "60", "--report", str(report_path), *stand_ins],
        {"PULSE_SOURCE": session.source, "PULSE_SINK": out_sink},
    )
    try:
        assert ready.wait(TIMEOUT_S), "the recording process delivered no frame"
        if not run.running.wait(TIMEOUT_S):
            pytest.fail("rtpipe run never reported a frame:\n" + run.output())
        player = ctx.Process(target=play_speech, args=(play_path, SPEECH_SECONDS, {"PULSE_SINK": session.sink}))
        player.start()
        player.join(TIMEOUT_S)
        assert player.exitcode == 0, f"the speech player failed (exit code {player.exitcode})"
        time.sleep(1.0)  # the pipeline's own latency: let the tail come out
    finally:
        exit_code = run.stop()
        stop.set()
        recorder.join(TIMEOUT_S)
    assert recorder.exitcode == 0, f"the recording process failed (exit code {recorder.exitcode})"
    assert report_path.exists(), f"rtpipe run wrote no report (exit {exit_code}):\n" + run.output()
    return {
        "report": json.loads(report_path.read_text()),
        "out": dict(np.load(rec_path)),
        "in": dict(np.load(play_path)),
        "exit_code": exit_code,
        "output": run.output(),
    }


def test_speech_into_the_microphone_comes_out_of_the_pipelines_speaker(pulse_null_sink, tmp_path):
    out_sink = pulse_null_sink.load_null_sink("rtpipe_pipeline_out")
    speech_samples = speech(SPEECH_SECONDS)
    takes = []
    for take in range(2):  # a loaded machine can starve PulseAudio once; twice is a real failure
        result = _one_take(pulse_null_sink, out_sink, tmp_path, take)
        recording = result["out"]["samples"]
        chunks = chunk_lags(recording, speech_samples, CHUNK_SAMPLES)
        assert len(chunks) >= 5
        found = [
            (start, lag)
            for start, lag, score in chunks
            if score > 0.999
            and np.array_equal(recording[lag : lag + CHUNK_SAMPLES], speech_samples[start : start + CHUNK_SAMPLES])
        ]
        report = result["report"]
        takes.append(
            f"take {take}: {len(found)}/{len(chunks)} chunks bit-exact, playback {report['playback']}, "
            f"frames lost {report['frames_lost']}, exit {result['exit_code']}"
        )
        if len(found) >= 0.75 * len(chunks):
            break
    else:
        pytest.fail("speech did not come out of the pipeline: " + "; ".join(takes) + "\n" + result["output"])

    # the report of a live run: frames, end-to-end latency, the speaker's counters and device latency
    assert report["frames"] > 0 and report["stages"].keys() == {"capture", "encode", "lm", "decode", "playback"}
    assert report["end_to_end_ms"]["p50"] > 0
    assert set(report["playback"]) == {
        "underruns",
        "overflows",
        "device_underflows",
        "trims",
        "trimmed_ms",
        "target_ms",
    }
    # the speaker's own device underflow count, from its process through the stats to the report
    assert isinstance(report["playback"]["device_underflows"], int) and report["playback"]["device_underflows"] >= 0
    assert isinstance(report["device_latency_ms"], float) and report["device_latency_ms"] > 0

    # mouth to ear: when a speech frame was handed to the input sink -> captured from the output sink
    capture_ns = result["out"]["capture_ns"]
    played = result["in"]
    total_ms = []
    for frame_index, handoff_ns in zip(played["handoff_frame"], played["handoff_ns"]):
        sample = int(frame_index) * FRAME_SAMPLES
        shift = [lag - start for start, lag in found if start <= sample < start + CHUNK_SAMPLES]
        if not shift or (sample + shift[0]) // FRAME_SAMPLES >= len(capture_ns):
            continue
        at = sample + shift[0]
        captured = int(capture_ns[at // FRAME_SAMPLES]) + (at % FRAME_SAMPLES) * 1_000_000_000 // SAMPLE_RATE
        total_ms.append((captured - int(handoff_ns)) / 1e6)
    assert total_ms and min(total_ms) > 0, "came out of the pipeline before it went in"
    e2e = report["end_to_end_ms"]
    print(
        f"\nlive pipeline ({takes[-1]}): into input sink -> out of output sink P50 {np.median(total_ms):.1f} ms "
        f"(max {np.max(total_ms):.1f}); report end-to-end P50 {e2e['p50']:.1f} P99 {e2e['p99']:.1f} ms, "
        f"device latency {report['device_latency_ms']:.1f} ms, capture stage "
        f"{report['stages']['capture']['compute_ms']['p50']:.1f} ms"
    )
