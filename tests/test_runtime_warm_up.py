"""Warming up before each frame (runtime/warm_up.py): on a paced run every stage warms its frame path up
ahead of the frames, what comes out is exactly what comes out without it, stages that change the payload
(a codec) warm up too, and `warm_up_us = 0` turns it off."""

from __future__ import annotations

import numpy as np
import soundfile as sf

from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.pipeline.runtime.supervisor import EXIT_HEALTHY, Supervisor

from runtime_support import chain_config, delayed, noise_wav

FRAME = 1920
STAGES = ["capture", "encode", "lm", "decode", "playback"]


def paced_run(tmp_path, warm_up_us: int) -> tuple[np.ndarray, np.ndarray, dict, int]:
    """2.4 s of noise, paced like a microphone, through pcm -> echo (1 frame) -> pcm to a WAV."""
    samples = noise_wav(tmp_path / "in.wav", 2.4, seed=warm_up_us)
    raw = chain_config(
        {"kind": "capture.file", "params": {"path": str(tmp_path / "in.wav")}},
        [{"kind": "codec.pcm"}, {"kind": "echo", "params": {"delay_frames": 1}}, {"kind": "codec.pcm"}],
        {"kind": "playback.file", "params": {"path": str(tmp_path / "out.wav")}},
        supervisor={"warm_up_us": warm_up_us},
    )
    supervisor = Supervisor(pipeline_config.validate(raw), handle_signals=False)
    result = supervisor.run()
    assert result.exit_code == EXIT_HEALTHY, result.error
    out, _ = sf.read(str(tmp_path / "out.wav"), dtype="float32")
    warm_ups = {name: supervisor.stages[name].stats["warm_ups"] for name in STAGES}
    return samples, out, warm_ups, result.report["frames"]


def test_every_stage_warms_up_ahead_of_paced_frames_and_the_output_is_unchanged(tmp_path):
    samples, out, warm_ups, frames = paced_run(tmp_path, 500)
    np.testing.assert_array_equal(out, delayed(samples, 1, len(out)))
    assert frames == 30
    # The first few frames teach each ring its beat; from then on frames are warmed up for, as long as
    # the beat stays steady. How many is up to the machine's load (a stall makes the beat unsteady for a
    # while): `rtpipe bench pipeline` reports the share, this asserts that each stage does it at all,
    # and never more than once a frame.
    for name, count in warm_ups.items():
        assert 1 <= count <= frames, (name, warm_ups)


def test_warm_up_us_zero_turns_warm_ups_off(tmp_path):
    samples, out, warm_ups, _ = paced_run(tmp_path, 0)
    np.testing.assert_array_equal(out, delayed(samples, 1, len(out)))
    assert warm_ups == dict.fromkeys(STAGES, 0)


def test_stages_that_change_the_payload_warm_up_without_failing(tmp_path):
    # audio -> int32[8] codes -> echo -> a sink taking any frame: input and output slots differ in shape
    raw = chain_config(
        {"kind": "capture.tone", "params": {"seconds": 2.0}},
        [{"kind": "runtime_support:CodesOut"}, {"kind": "echo"}],
        {"kind": "playback.null"},
    )
    supervisor = Supervisor(pipeline_config.validate(raw), handle_signals=False)
    result = supervisor.run()
    assert result.exit_code == EXIT_HEALTHY, result.error
    assert all(sp.restarts == 0 for sp in supervisor.stages.values())
    assert 1 <= supervisor.stages["encode"].stats["warm_ups"] <= result.report["frames"]
