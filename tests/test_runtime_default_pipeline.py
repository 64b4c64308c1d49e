"""The built-in default config runs the real model stages: Mimi encode -> Moshi step (tiny) -> Mimi
decode, each in its own process, end to end on speech, as `rtpipe run` does."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf

from rtpipe.pipeline.cli import run as cmd_run
from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.shm import cleanup

from runtime_support import TESTS_DIR, run_segments

SPEECH = TESTS_DIR.parent / "stages" / "data" / "speech.wav"


def test_default_config_names_the_model_stages_one_thread_each():
    config = pipeline_config.validate(pipeline_config.load_raw())  # no path: the built-in default
    kinds = [stage.kind for stage in config.stages]
    assert kinds[1:4] == ["mimi.encode", "moshi.step", "mimi.decode"]
    assert [stage.threads for stage in config.stages[1:4]] == [1, 1, 1]


def test_default_pipeline_runs_speech_through_five_processes_frame_for_frame(tmp_path, capsys, monkeypatch):
    speech, rate = sf.read(str(SPEECH), dtype="float32")
    assert rate == 24_000
    # this run's id, to look for its own segments afterwards (other runs may share /dev/shm meanwhile)
    run_ids = []

    def recording_new_run_id(new_run_id=cleanup.new_run_id):
        run_ids.append(new_run_id())
        return run_ids[-1]

    monkeypatch.setattr(cleanup, "new_run_id", recording_new_run_id)
    code = cmd_run.main(
        [
            "--input",
            str(SPEECH),
            "--no-pace",
            "--output",
            str(tmp_path / "out.wav"),
            "--report",
            str(tmp_path / "report.json"),
            "--no-live",
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    frames = -(-len(speech) // 1920)
    assert report["frames"] == frames and report["frames_lost"] == 0
    assert list(report["stages"]) == ["capture", "encode", "lm", "decode", "playback"]
    assert all(stage["restarts"] == 0 for stage in report["stages"].values())
    assert report["delay_frames"] == 1  # moshi.step answers one frame behind, as Kyutai's LMGen
    out, out_rate = sf.read(str(tmp_path / "out.wav"), dtype="float32")
    assert out_rate == 24_000 and len(out) == frames * 1920
    # random weights: the audio is not speech, but it is audio, not silence or garbage
    assert np.isfinite(out).all() and 0 < np.abs(out[1920:]).max() <= 1.5
    assert len(run_ids) == 1 and run_segments(run_ids[0]) == []
