"""Real five-process runs: a WAV through codec.pcm and echo comes out delayed by exactly the declared
delay, sample for sample; a stage swapped by import path or by entry point runs in the chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.pipeline.runtime.supervisor import EXIT_HEALTHY, Supervisor
from rtpipe.shm.ring import EdgePolicy

from runtime_support import TESTS_DIR, chain_config, delayed, noise_wav, run_segments

FRAME = 1920
REPORT_KEYS = {
    "frames",
    "seconds",
    "frame_ms",
    "end_to_end_ms",
    "stages",
    "capture",
    "edges",
    "playback",
    "sessions",
    "frames_lost",
    "samples",
    "text",
    "text_tokens",
    "delay_frames",
    "config",
    "device_latency_ms",
}
SUMMARY_KEYS = {"p50", "p95", "p99", "max", "mean"}


def test_wav_through_five_processes_comes_out_delayed_by_exactly_the_declared_delay(tmp_path):
    samples = noise_wav(tmp_path / "in.wav", 3.3)  # not a whole number of frames: the last is padded
    raw = chain_config(
        {"kind": "capture.file", "params": {"path": str(tmp_path / "in.wav"), "pace": False}},
        [
            {"kind": "codec.pcm"},
            {"kind": "echo", "params": {"delay_frames": 2}},
            {"kind": "echo", "params": {"delay_frames": 1}},
        ],
        {"kind": "playback.file", "params": {"path": str(tmp_path / "out.wav")}},
        slots=4,
    )
    config = pipeline_config.validate(raw)
    assert config.delay_frames == 3
    supervisor = Supervisor(config, handle_signals=False)
    result = supervisor.run()
    assert result.exit_code == EXIT_HEALTHY, result.error
    out, rate = sf.read(str(tmp_path / "out.wav"), dtype="float32")
    n_frames = -(-len(samples) // FRAME)
    assert rate == 24_000 and len(out) == n_frames * FRAME
    np.testing.assert_array_equal(out, delayed(samples, 3, len(out)))

    report = result.report
    assert set(report) == REPORT_KEYS
    assert report["frames"] == n_frames and report["frames_lost"] == 0 and report["delay_frames"] == 3
    assert list(report["stages"]) == ["capture", "encode", "lm", "decode", "playback"]
    assert list(report["edges"]) == ["capture->encode", "encode->lm", "lm->decode", "decode->playback"]
    assert set(report["end_to_end_ms"]) == SUMMARY_KEYS
    for stage in report["stages"].values():
        assert set(stage) == {"compute_ms", "rtf", "deadline_misses", "restarts"} and stage["restarts"] == 0
    for edge in report["edges"].values():
        assert set(edge) == {"wait_ms", "dropped_oldest", "dropped_newest", "blocked"}
        assert edge["dropped_oldest"] == edge["dropped_newest"] == 0
    assert report["samples"]["seq"] == list(range(n_frames))
    assert len(report["samples"]["stage_ms"]["lm"]) == n_frames
    assert all(v >= 0 for v in report["samples"]["end_to_end_ms"])
    assert report["playback"] == {
        "underruns": 0,
        "overflows": 0,
        "device_underflows": 0,
        "trims": 0,
        "trimmed_ms": 0.0,
        "target_ms": 0.0,
    }
    assert run_segments(supervisor.run_id) == []
    json.dumps(report)  # plain data all the way down


def test_the_sinks_device_underflows_reach_the_run_counters_and_the_report():
    # the sink's process counts them, its stats message carries them to the supervisor
    raw = chain_config(
        {"kind": "capture.tone", "params": {"seconds": 1.0}},
        [],
        {"kind": "runtime_support:DeviceUnderflows", "params": {"underflows": 5}},
    )
    supervisor = Supervisor(pipeline_config.validate(raw), handle_signals=False)
    result = supervisor.run()
    assert result.exit_code == EXIT_HEALTHY, result.error
    assert supervisor.stages["playback"].stats["device_underflows"] == 5
    assert supervisor.stages["capture"].stats["device_underflows"] == 0  # a stage that is no sink: 0
    assert supervisor._counters().device_underflows == 5
    assert result.report["playback"]["device_underflows"] == 5
    # the playout's trims and target travel the same way
    assert supervisor.stages["playback"].stats["trims"] == 2
    assert (result.report["playback"]["trims"], result.report["playback"]["trimmed_ms"]) == (2, 7.5)
    assert result.report["playback"]["target_ms"] == 100.0


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: float = 120):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR), *(env_extra or {}).pop("PYTHONPATH", "").split(os.pathsep), env.get("PYTHONPATH", "")]
    ).strip(os.pathsep)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "rtpipe.pipeline.cli.main", "run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(pipeline_config.to_toml(raw))
    return path


def swap_config(tmp_path: Path, lm_kind: str) -> Path:
    raw = chain_config(
        {"kind": "capture.file", "params": {"path": str(tmp_path / "in.wav"), "pace": False}},
        [{"kind": "codec.pcm"}, {"kind": lm_kind}, {"kind": "codec.pcm"}],
        {"kind": "playback.file", "params": {"path": str(tmp_path / "out.wav")}},
    )
    return write_config(tmp_path / "swap.toml", raw)


def test_stage_swapped_by_import_path_runs_in_its_own_process(tmp_path):
    samples = noise_wav(tmp_path / "in.wav", 1.0)
    config = swap_config(tmp_path, "runtime_support:Negate")
    result = run_cli([str(config), "--report", str(tmp_path / "r.json"), "--no-live"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out, _ = sf.read(str(tmp_path / "out.wav"), dtype="float32")
    np.testing.assert_array_equal(out, -delayed(samples, 0, len(out)))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["stages"]["lm"]["kind"] == "runtime_support:Negate"
    assert "end to end" in result.stdout  # the table at the end


def test_stage_swapped_by_entry_point_name(tmp_path):
    samples = noise_wav(tmp_path / "in.wav", 1.0)
    site = tmp_path / "site"
    dist_info = site / "rtpipe_negate_plugin-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: rtpipe-negate-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[rtpipe.stages]\nnegate.test = runtime_support:Negate\n")
    config = swap_config(tmp_path, "negate.test")
    result = run_cli([str(config), "--no-live"], cwd=tmp_path, env_extra={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    out, _ = sf.read(str(tmp_path / "out.wav"), dtype="float32")
    np.testing.assert_array_equal(out, -delayed(samples, 0, len(out)))
    # without the plugin on the path the name is unknown, and the error says so before anything starts
    missing = run_cli([str(config)], cwd=tmp_path)
    assert missing.returncode == 2
    assert "stages.lm.kind = 'negate.test': unknown stage" in missing.stderr


def test_run_with_no_arguments_and_no_devices_plays_the_speech_sample_to_rtpipe_out(tmp_path):
    from rtpipe.pipeline.cli.run import build_parser, effective_raw

    said = []
    raw = effective_raw(build_parser().parse_args([]), devices_available=lambda: False, say=said.append)
    config = pipeline_config.validate(raw)
    assert config.stages[0].kind == "capture.file" and config.stages[0].params_raw["path"] == ""
    assert config.stages[-1].kind == "playback.file"
    assert config.stages[-1].params_raw["path"] == "rtpipe-out.wav"
    assert config.edges[0].policy is EdgePolicy.BLOCK
    assert "speech sample" in said[0] and "rtpipe-out.wav" in said[0]
    said.clear()
    raw = effective_raw(build_parser().parse_args([]), devices_available=lambda: True, say=said.append)
    assert raw["stages"]["capture"]["kind"] == "capture.microphone"
    assert raw["stages"]["playback"]["kind"] == "playback.speaker"
    assert "microphone" in said[0]


def test_built_in_config_without_devices_fills_in_only_the_end_not_given(tmp_path):
    from rtpipe.pipeline.cli.run import build_parser, effective_raw

    said = []
    args = build_parser().parse_args(["--input", "x.wav"])
    raw = effective_raw(args, devices_available=lambda: False, say=said.append)
    assert raw["stages"]["capture"]["params"]["path"] == "x.wav"
    assert raw["stages"]["playback"] == {"kind": "playback.file", "params": {"path": "rtpipe-out.wav"}}
    assert said == ["rtpipe: no audio devices: x.wav -> pipeline -> rtpipe-out.wav"]
    args = build_parser().parse_args(["--input", "x.wav", "--output", "y.wav"])
    said.clear()
    effective_raw(args, devices_available=lambda: pytest.fail("no device needed"), say=said.append)
    assert said == []


def test_what_a_run_says_it_chose_is_what_set_left(tmp_path):
    from rtpipe.pipeline.cli.run import build_parser, effective_raw

    said = []
    args = build_parser().parse_args(["--set", "stages.playback.params.path=X.wav"])
    effective_raw(args, devices_available=lambda: False, say=said.append)
    assert said == ["rtpipe: no audio devices: the built-in speech sample -> pipeline -> X.wav"]


@pytest.mark.parametrize(
    "flags, complaint",
    [
        (["--output", "{wav}"], "the output {wav} is also the input"),
        (["--output", "{link}"], "the output {link} is also the input"),
        (["--output", "{hard}"], "the output {hard} is also the input"),
        (["--output", "out.wav", "--report", "{hard}"], "--report {hard} is also the input"),
        (["--output", "out.wav", "--report", "{wav}"], "--report {wav} is also the input"),
        (["--output", "out.wav", "--report", "out.wav"], "--report out.wav is also the output"),
        (["--output", "out.wav", "--report", "r.json", "--trace", "r.json"], "--trace r.json is also --report"),
    ],
)
def test_a_run_refuses_to_write_over_its_own_input_or_outputs(tmp_path, flags, complaint):
    wav, link, hard = tmp_path / "in.wav", tmp_path / "link.wav", tmp_path / "hard.wav"
    sf.write(str(wav), np.full(4000, 0.25, np.float32), 24_000)
    link.symlink_to(wav)
    os.link(wav, hard)
    before = wav.read_bytes()
    names = {"wav": wav, "link": link, "hard": hard}
    flags = [f.format(**names) for f in flags]
    result = run_cli(["--input", str(wav), *flags, "--no-live"], cwd=tmp_path)
    assert result.returncode == 2
    assert complaint.format(**names) in result.stderr
    assert wav.read_bytes() == before  # nothing started, nothing written


@pytest.mark.parametrize("seconds", ["nan", "inf", "0", "-1", "x"])
def test_run_seconds_must_be_a_positive_number(tmp_path, seconds):
    result = run_cli(["--seconds", seconds], cwd=tmp_path)
    assert result.returncode == 2
    assert f"argument --seconds: '{seconds}': expected a positive number of seconds" in result.stderr
