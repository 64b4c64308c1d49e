"""`rtpipe bench live`: its argument checks (one line, before anything starts), and the arithmetic it
prints (settling time after the freeze, the budget by part) on synthetic reports. The live run itself is
a benchmark, not a test: `RTPIPE_BENCH_LIVE=1` adds one short real run here (about a minute)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from rtpipe.bench import cli, live, pulse


@pytest.fixture
def nothing_is_measured(monkeypatch):
    def measure(*args, **kwargs):
        raise AssertionError("the benchmark started before its bad argument was refused")

    monkeypatch.setattr(live, "measure", measure)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "seconds, message",
    [
        ("0", "--seconds 0.0: expected 2.0 to 3600.0"),
        ("-5", "--seconds -5.0: expected 2.0 to 3600.0"),
        ("nan", "--seconds nan: expected 2.0 to 3600.0"),
        ("inf", "--seconds inf: expected 2.0 to 3600.0"),
        ("1e9", "--seconds 1000000000.0: expected 2.0 to 3600.0"),
    ],
)
def test_bad_seconds_are_one_line_naming_the_flag(capsys, nothing_is_measured, seconds, message):
    assert live.main(["--seconds", seconds]) == 2
    assert message in _one_line_error(capsys)


def test_seconds_that_are_not_a_number_are_refused_by_the_parser(capsys, nothing_is_measured):
    with pytest.raises(SystemExit) as exit_:
        live.main(["--seconds", "soon"])
    assert exit_.value.code == 2
    assert "--seconds: invalid float value: 'soon'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.encode.threads=0", "stages.encode.threads = 0: expected an integer of 1 or more"),
        ("stages.lm.kind=no.such", "no.such"),
        ("no-equals-sign", "no-equals-sign"),
    ],
)
def test_a_bad_set_is_one_line_before_anything_starts(capsys, nothing_is_measured, override, message):
    assert live.main(["--seconds", "4", "--set", override]) == 2
    assert message in _one_line_error(capsys)


def test_a_set_reaches_both_runs_configs():
    raw = live.playout_config("fixed", True, ["stages.encode.threads=2"])
    assert raw["stages"]["encode"]["threads"] == 2
    assert raw["stages"]["playback"]["params"]["playout"] == "fixed"


def test_a_missing_pulseaudio_is_one_line_naming_what_to_install(monkeypatch, capsys, nothing_is_measured):
    monkeypatch.setattr(pulse.shutil, "which", lambda tool: None)
    assert live.main(["--seconds", "4"]) == 2
    assert "pulseaudio and pactl not found" in _one_line_error(capsys)


def test_live_is_listed_among_the_benchmarks(capsys):
    assert "live" in cli.BENCHMARKS and "live" in cli.SUMMARY
    assert cli.main(["--help"]) == 0
    assert "live" in capsys.readouterr().out


# --- settling time -------------------------------------------------------------------------------


def _samples(playback_ms: list[float], e2e_ms: float = 100.0) -> dict:
    """One frame every 80 ms from t_s 0, each reaching the speaker e2e_ms after its capture."""
    return {
        "t_s": [0.08 * i for i in range(len(playback_ms))],
        "end_to_end_ms": [e2e_ms] * len(playback_ms),
        "playback_ms": playback_ms,
    }


def test_settling_time_is_from_the_freeze_to_the_first_frame_back_in_the_band_for_good():
    # 50 frames at 40 ms; a bump after the freeze that comes back, leaves once more, then stays back
    playback = [40.0] * 50
    playback[20:26] = [200.0, 150.0, 90.0, 50.0, 40.0, 60.0]  # frame 25 out again: not settled until 26
    samples = _samples(playback)
    freeze_s = 1.5  # frame 19 reaches the speaker at 1.62 s, frame 18 at 1.54 s
    settle = live.settling_time_s(samples, freeze_s, smooth_frames=1)
    # frame 26 is the first in the band for good: it reaches the speaker at 26 * 0.08 + 0.1 s
    assert settle == pytest.approx(26 * 0.08 + 0.1 - freeze_s)


def test_a_buffer_that_never_left_its_band_settled_at_once():
    samples = _samples([40.0, 45.0, 35.0, 52.0, 40.0] * 10)
    assert live.settling_time_s(samples, freeze_s=1.0, smooth_frames=1) == 0.0


def test_a_buffer_still_out_of_its_band_at_the_end_never_settled():
    playback = [40.0] * 40 + [120.0] * 5
    assert live.settling_time_s(_samples(playback), freeze_s=1.0, smooth_frames=1) is None


def test_no_frame_after_the_freeze_means_no_settling_time():
    assert live.settling_time_s(_samples([40.0] * 10), freeze_s=60.0, smooth_frames=1) is None
    assert live.settling_time_s(_samples([]), freeze_s=0.0, smooth_frames=1) is None


def test_frames_held_up_by_the_freeze_count_when_they_reach_the_speaker():
    # frame 9 was captured before the freeze but reached the speaker after it, out of the band
    playback = [40.0] * 20
    playback[9] = 140.0
    samples = _samples(playback, e2e_ms=300.0)
    freeze_s = 0.9  # frame 9 captured at 0.72 s, at the speaker at 1.02 s
    assert live.settling_time_s(samples, freeze_s, smooth_frames=1) == pytest.approx(10 * 0.08 + 0.3 - freeze_s)


def test_one_slow_frame_is_jitter_not_the_buffers_level():
    # the running median over about a second: a single frame far out does not unsettle the buffer, a
    # level that stays out does
    playback = [40.0] * 60
    playback[40] = 140.0
    assert live.settling_time_s(_samples(playback), freeze_s=0.0) == 0.0
    playback[40:] = [80.0] * 20
    assert live.settling_time_s(_samples(playback), freeze_s=0.0) is None


def test_the_band_is_the_tolerance_around_the_runs_median():
    playback = [40.0] * 30
    playback[15] = 56.0  # 16 ms off: out at 15 ms, in at 20 ms
    samples = _samples(playback)
    assert live.settling_time_s(samples, 0.0, tolerance_ms=15.0, smooth_frames=1) == pytest.approx(16 * 0.08 + 0.1)
    assert live.settling_time_s(samples, 0.0, tolerance_ms=20.0, smooth_frames=1) == 0.0


# --- budget by part ------------------------------------------------------------------------------


def _report(with_capture_section: bool) -> dict:
    frames = 5
    report = {
        "frames": frames,
        "frame_ms": 80.0,
        "end_to_end_ms": {"p50": 230.0, "p95": 240.0, "p99": 250.0, "max": 260.0, "mean": 231.0},
        "stages": {
            name: {"compute_ms": {}, "rtf": 0.1, "deadline_misses": 0, "restarts": restarts}
            for name, restarts in (("capture", 0), ("encode", 0), ("lm", 1), ("decode", 0), ("playback", 0))
        },
        "playback": {"underruns": 2, "overflows": 0, "device_underflows": 1, "trims": 3, "trimmed_ms": 30.0},
        "frames_lost": 0,
        "device_latency_ms": 20.0,
        "samples": {
            "t_s": [0.08 * i for i in range(frames)],
            "end_to_end_ms": [230.0] * frames,
            "capture_ms": [100.0, 101.0, 102.0, 103.0, 500.0],  # median 102
            "stage_ms": {
                "capture": [0.0] * frames,
                "encode": [20.0, 21.0, 22.0, 23.0, 90.0],
                "lm": [10.0] * frames,
                "decode": [25.0] * frames,
                "playback": [0.1] * frames,
            },
            "wait_ms": {
                "capture->encode": [0.1] * frames,
                "encode->lm": [0.2] * frames,
                "lm->decode": [0.3] * frames,
                "decode->playback": [0.4] * frames,
            },
            "playback_ms": [60.0, 61.0, 62.0, 63.0, 64.0],  # median 62, device out 20 of it
        },
    }
    if with_capture_section:
        report["capture"] = {
            "live_source": True,
            "algorithmic_ms": 80.0,
            "device_ms": {"p50": 21.5, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0},
            "work_ms": {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0},
            "total_ms": {"p50": 102.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0},
        }
    return report


def test_the_budget_without_a_capture_split_takes_the_frame_as_algorithmic_and_the_rest_as_device_in():
    parts = live.budget_by_part(_report(with_capture_section=False))
    assert list(parts) == [
        "algorithmic frame",
        "device in",
        "encode",
        "lm",
        "decode",
        "hops",
        "speaker buffer",
        "device out",
        "sum",
    ]
    assert parts["algorithmic frame"] == 80.0 and parts["device in"] == pytest.approx(22.0)
    assert (parts["encode"], parts["lm"], parts["decode"]) == (22.0, 10.0, 25.0)
    assert parts["hops"] == pytest.approx(1.0)
    assert parts["speaker buffer"] == pytest.approx(42.0) and parts["device out"] == 20.0
    assert parts["sum"] == pytest.approx(80 + 22 + 22 + 10 + 25 + 1 + 42 + 20)
    assert live.capture_split(_report(with_capture_section=False))[2] is False


def test_the_budget_uses_the_reports_own_capture_split_where_it_has_one():
    report = _report(with_capture_section=True)
    assert live.capture_split(report) == (80.0, 21.5, True)
    parts = live.budget_by_part(report)
    assert parts["algorithmic frame"] == 80.0 and parts["device in"] == 21.5


def test_a_run_summary_carries_the_counters_and_the_targets_say_met_or_missed():
    report = _report(with_capture_section=True)
    run = live.summarize_run(report, freeze_s=0.1)
    assert run["end_to_end_p50_ms"] == 230.0 and run["end_to_end_p99_ms"] == 250.0
    assert (run["underruns"], run["trims"], run["trimmed_ms"], run["target_ms"]) == (2, 3, 30.0, None)
    assert run["restarts"] == 1 and run["speaker_buffer_median_ms"] == 62.0
    targets = live.target_results(run)
    assert targets["end_to_end_p50_ms"] == {"at_most": 190.0, "value": 230.0, "met": False}
    assert targets["speaker_buffer_median_ms"]["met"] is False
    json.dumps(targets)  # what --json prints

    fast = dict(run, end_to_end_p50_ms=150.0, speaker_buffer_median_ms=40.0, settle_s=1.2)
    assert all(result["met"] for result in live.target_results(fast).values())
    assert live.target_results(dict(fast, settle_s=None))["settle_s"]["met"] is False


def test_the_table_shows_both_runs_their_ratio_and_each_target():
    run = live.summarize_run(_report(with_capture_section=False), freeze_s=0.1)
    fixed = dict(run, end_to_end_p50_ms=460.0)
    measured = {"runs": {"adaptive": run, "fixed": fixed}, "playout_param": False, "pulse_started": True}
    table = live.format_table(measured, 30.0)
    assert "cores (" in table and "frames: adaptive 5, fixed 5" in table
    assert "2.00x" in table  # 460 / 230
    assert "no `playout` param" in table and "device in = capture_ms - 80 ms" in table
    assert table.count("MISSED") + table.count(" met") == len(live.TARGETS)


# --- the freeze ----------------------------------------------------------------------------------


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_the_freeze_stops_the_lm_process_and_always_resumes_it():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        freeze = live.LmFreeze(after_s=0.0, freeze_ms=50.0)
        run_info = {
            "kinds": {"capture": "capture.microphone", "lm": "moshi.step"},
            "pids": {"capture": os.getpid(), "lm": child.pid},
            "t0_ns": 0,
        }
        freeze.on_start(run_info)  # type: ignore[arg-type]
        assert freeze.done.wait(10.0)
        freeze.on_stop({})  # type: ignore[arg-type]
        assert freeze.stage == "lm" and freeze.freeze_s is not None and math.isfinite(freeze.freeze_s)
        assert _state(child.pid) != "T"  # running again (sleeping), not stopped
    finally:
        child.kill()
        child.wait()


def test_a_run_that_ends_before_the_freeze_freezes_nothing():
    freeze = live.LmFreeze(after_s=3600.0)
    freeze.on_start({"kinds": {"lm": "moshi.step"}, "pids": {"lm": 2**22 + 12345}, "t0_ns": 0})  # type: ignore[arg-type]
    freeze.on_stop({})  # type: ignore[arg-type]
    assert freeze.done.is_set() and freeze.freeze_s is None


def test_the_null_sinks_microphone_is_the_monitor_of_the_sink_played_into():
    sinks = pulse.NullSinks(into_microphone="a", speaker="b")
    assert sinks.microphone == "a.monitor"


@pytest.mark.skipif(os.environ.get("RTPIPE_BENCH_LIVE") != "1", reason="a live run of a minute: RTPIPE_BENCH_LIVE=1")
def test_a_short_live_run_prints_json_for_both_playouts(capsys):
    assert live.main(["--seconds", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"adaptive", "fixed", "targets"} <= set(printed)
    for playout in live.PLAYOUTS:
        assert printed[playout]["frames"] > 0 and printed[playout]["freeze_s"] is not None
