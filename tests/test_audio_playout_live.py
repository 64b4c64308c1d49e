"""The speaker's adaptive playout, live: `rtpipe run` from a PulseAudio null sink's monitor to a second
null sink (stand-in codec and LM, so what comes out can be compared with what went in). A slow start and
a frozen stage each cost a gap, and then the speaker buffer comes back to its target instead of keeping
the delay for the rest of the run; speech through it comes out intact apart from the trims it counts.

Where the buffer "is back": samples.playback_ms is, per frame, the audio queued ahead of it when it
landed plus the device's latency; the target counts the landing frame itself, so a frame landing at the
target has target - 80 ms ahead of it. SLACK_MS covers the playout's hysteresis (10 ms), a device block
and the scheduler; the tests look at the median of the run's last frames, not at a single one.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from rtpipe.stages.base import FRAME_MS

from audio_support import PIPELINE_TIMEOUT_S, PipelineRun, chunk_lags, play_speech, record_microphone, speech
from runtime_support import TESTS_DIR

SLACK_MS = 25.0
TAIL_FRAMES = 25
SPEECH_SECONDS = 5.0
CHUNK_SAMPLES = 12_000  # 0.5 s
STAND_INS = ["--set", "stages.encode.kind=codec.pcm", "--set", "stages.decode.kind=codec.pcm"]
# more --set arguments for every run, e.g. stages.playback.params.playout="fixed" to see these fail
EXTRA = os.environ.get("RTPIPE_PLAYOUT_TEST_EXTRA", "").split()


def settled_bound_ms(report: dict) -> float:
    """The most a frame landing at the run's final target waits, device included, plus SLACK_MS."""
    return report["playback"]["target_ms"] - FRAME_MS + report["device_latency_ms"] + SLACK_MS


def tail_ms(report: dict) -> float:
    return float(np.median(report["samples"]["playback_ms"][-TAIL_FRAMES:]))


def live_run(session, out_sink: str, tmp_path: Path, lm: list[str], during) -> tuple[dict, dict, dict]:
    """One `rtpipe run` microphone -> speaker, its middle stage set by `lm` (--set arguments);
    `during(run, ...)` runs once
    frames flow, while a recorder captures what the speaker plays. Returns (report, recording, played)."""
    ctx = multiprocessing.get_context("spawn")
    report_path, rec_path, play_path = tmp_path / "report.json", str(tmp_path / "out.npz"), str(tmp_path / "in.npz")
    ready, stop = ctx.Event(), ctx.Event()
    recorder = ctx.Process(
        target=record_microphone,
        args=(rec_path, ready, stop, PIPELINE_TIMEOUT_S, {"PULSE_SOURCE": f"{out_sink}.monitor"}),
    )
    recorder.start()
    run = PipelineRun(
        ["--seconds", "60", "--report", str(report_path), *STAND_INS, *lm, *EXTRA],
        {"PULSE_SOURCE": session.source, "PULSE_SINK": out_sink, "PYTHONPATH": str(TESTS_DIR)},
    )
    played: dict = {}
    try:
        assert ready.wait(PIPELINE_TIMEOUT_S), "the recording process delivered no frame"
        if not run.running.wait(PIPELINE_TIMEOUT_S):
            pytest.fail("rtpipe run never reported a frame:\n" + run.output())
        played = during(run, ctx, session, play_path) or {}
    finally:
        exit_code = run.stop()
        stop.set()
        recorder.join(PIPELINE_TIMEOUT_S)
    assert report_path.exists(), f"rtpipe run wrote no report (exit {exit_code}):\n" + run.output()
    return json.loads(report_path.read_text()), dict(np.load(rec_path)), played


def play_speech_into(ctx, session, play_path: str) -> dict:
    player = ctx.Process(target=play_speech, args=(play_path, SPEECH_SECONDS, {"PULSE_SINK": session.sink}))
    player.start()
    player.join(PIPELINE_TIMEOUT_S)
    assert player.exitcode == 0, f"the speech player failed (exit code {player.exitcode})"
    return dict(np.load(play_path))


def test_a_slow_start_leaves_no_delay_behind_and_speech_comes_through(pulse_null_sink, tmp_path):
    out_sink = pulse_null_sink.load_null_sink("rtpipe_playout_slow_start")

    def speak_then_listen(run, ctx, session, play_path):
        played = play_speech_into(ctx, session, play_path)
        time.sleep(4.0)  # the pipeline's tail out, then frames on time for the buffer to settle
        return played

    # the middle stage takes 160 ms on each of its first 2 frames, as a model warming up: 160 ms of
    # audio queues behind it, less than the most the speaker ever holds (max_latency_ms), so only
    # the playout's own decisions can take it out again
    slow_start = [
        "--set",
        "stages.lm.kind=runtime_support:SlowStart",
        "--set",
        "stages.lm.params.frames=2",
        "--set",
        "stages.lm.params.sleep_ms=160.0",
    ]
    report, recording, _ = live_run(pulse_null_sink, out_sink, tmp_path, slow_start, speak_then_listen)
    playback_ms = report["samples"]["playback_ms"]
    bound = settled_bound_ms(report)
    # the slow start really did hold audio back, then the buffer came down to its target
    assert max(playback_ms[:30]) > bound + 50, (max(playback_ms[:30]), bound)
    assert tail_ms(report) <= bound, (tail_ms(report), bound, report["playback"])
    assert report["playback"]["trims"] >= 1

    # speech: each loud half second is found in what the speaker played; a chunk that a trim cut into
    # (a crossfaded cut, or silence taken out of a pause inside it) may differ, no more of them than trims
    chunks = chunk_lags(recording["samples"], speech(SPEECH_SECONDS), CHUNK_SAMPLES)
    intact = [score for _, _, score in chunks if score > 0.99]
    assert len(chunks) >= 5
    assert len(chunks) - len(intact) <= report["playback"]["trims"], (len(intact), len(chunks), report["playback"])
    assert len(intact) >= len(chunks) // 2, (len(intact), len(chunks), report["playback"])


def test_a_stage_frozen_for_300_ms_costs_a_gap_then_the_buffer_returns(pulse_null_sink, tmp_path):
    out_sink = pulse_null_sink.load_null_sink("rtpipe_playout_freeze")

    def freeze_the_middle_stage(run, ctx, session, play_path):
        time.sleep(3.0)  # settled before the freeze
        pid = run.stage_pid("lm")
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(0.3)
        finally:
            os.kill(pid, signal.SIGCONT)
        time.sleep(6.0)  # two lateness windows: the freeze must leave the target too

    echo = ["--set", "stages.lm.kind=echo"]
    report, _, _ = live_run(pulse_null_sink, out_sink, tmp_path, echo, freeze_the_middle_stage)
    playback = report["playback"]
    # the frames behind the frozen stage waited in its ring: none lost, nothing restarted
    assert report["frames_lost"] == 0 and report["stages"]["lm"]["restarts"] == 0
    # the gap: the speaker ran dry while the stage was stopped, then the queued frames came in a burst
    assert playback["underruns"] >= 1, playback
    assert max(report["samples"]["end_to_end_ms"]) > 250
    assert tail_ms(report) <= settled_bound_ms(report), (tail_ms(report), settled_bound_ms(report), playback)
