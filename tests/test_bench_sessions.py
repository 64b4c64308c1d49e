"""`rtpipe bench sessions`: the N it steps through, its real-time rule on made-up reports, one short run
on the stand-ins (codec.pcm, echo) in the documented JSON shape, and bad arguments in one line (no
timing is asserted: the machines are noisy)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from rtpipe.bench import cli, sessions
from rtpipe.bench.sessions import (
    STANDIN_OVERRIDES,
    cost_ratio,
    e2e_growth_ms,
    format_table,
    main,
    max_realtime_sessions,
    measure_batched,
    measure_mode,
    session_counts,
    summarize,
)

STAGES = ("capture", "encode", "lm", "decode", "playback")


def fake_report(frames: int = 40, stage_ms: float = 10.0, slow: dict | None = None, e2e=None, sessions: int = 1):
    """A report with just what the rule reads: per-frame samples (one frame each 80 ms), stages, sessions."""
    e2e = list(e2e) if e2e is not None else [50.0] * frames
    per_stage = {name: [stage_ms] * frames for name in STAGES}
    for name, values in (slow or {}).items():
        per_stage[name] = list(values)
    row = {"frames": frames, "end_to_end_ms": {"p50": 50.0}, "frames_lost": 0}
    return {
        "frames": frames,
        "frames_lost": 0,
        "stages": {name: {"restarts": 0} for name in STAGES},
        "sessions": {str(k): dict(row) for k in range(sessions)},
        "samples": {"t_s": [0.08 * i for i in range(frames)], "end_to_end_ms": e2e, "stage_ms": per_stage},
    }


def test_sessions_step_1_2_4_8_12_16_then_by_8_up_to_the_max():
    assert session_counts(16) == [1, 2, 4, 8, 12, 16]
    assert session_counts(40) == [1, 2, 4, 8, 12, 16, 24, 32, 40]
    assert session_counts(30) == [1, 2, 4, 8, 12, 16, 24, 30]
    assert session_counts(10) == [1, 2, 4, 8, 10]
    assert session_counts(2) == [1, 2]
    assert session_counts(1) == [1]


def test_growth_is_the_last_thirds_median_minus_the_firsts():
    assert e2e_growth_ms([50.0] * 30) == 0.0
    assert e2e_growth_ms([10.0] * 10 + [99.0] * 10 + [130.0] * 10) == 120.0
    assert e2e_growth_ms([50.0, 60.0]) is None  # fewer than three frames: nothing to tell


def test_a_steady_fast_pipeline_holds():
    entry = summarize(2, [fake_report(sessions=2)], [], cpu_pct=30.0)
    assert entry["holds"] and entry["why_not"] == []
    assert entry["frames_judged"] == 40 - 13  # the first second is warm-up
    assert entry["compute_ms_per_session"] == pytest.approx(4 * 10.0 / 2)  # the stages after the source
    assert entry["cpu_pct_per_session"] == 15.0
    assert set(entry["per_session"]) == {"0", "1"}


def test_a_stage_whose_p99_reaches_a_frame_does_not_hold_and_is_named():
    encode = [10.0] * 30 + [85.0] * 10
    entry = summarize(1, [fake_report(slow={"encode": encode})], [], cpu_pct=None)
    assert not entry["holds"]
    assert any("P99 compute" in why and "encode" in why for why in entry["why_not"])
    assert any("missed a deadline" in why for why in entry["why_not"])
    assert entry["stages"]["encode"]["deadline_misses"] == 10


def test_one_late_frame_in_a_thousand_still_holds_on_misses():
    lm = [10.0] * 1000
    lm[500] = 120.0  # 1 of 987 judged frames: 0.1 %, and P99 stays low
    entry = summarize(1, [fake_report(frames=1000, slow={"lm": lm})], [], cpu_pct=None)
    assert entry["deadline_misses"] == 1
    assert entry["holds"], entry["why_not"]


def test_a_source_held_back_by_a_full_ring_is_judged_by_end_to_end_not_by_its_own_time():
    entry = summarize(1, [fake_report(slow={"capture": [500.0] * 40})], [], cpu_pct=None)
    assert entry["holds"], entry["why_not"]
    assert "capture" not in entry["stages"] and entry["source_ms"]["p50"] == 500.0


def test_end_to_end_that_grows_by_a_frame_does_not_hold():
    growing = [50.0 + 8.0 * i for i in range(40)]
    entry = summarize(1, [fake_report(e2e=growing)], [], cpu_pct=None)
    assert not entry["holds"]
    assert any("end to end grew" in why for why in entry["why_not"])


def test_separate_pipelines_are_judged_by_the_worst_one():
    steady, growing = fake_report(), fake_report(e2e=[50.0 + 8.0 * i for i in range(40)])
    entry = summarize(2, [steady, growing], [], cpu_pct=None)
    assert not entry["holds"]
    assert set(entry["per_session"]) == {"0", "1"}
    assert entry["compute_ms_per_session"] == pytest.approx(4 * 10.0)  # one pipeline per session


def test_a_pipeline_that_delivered_no_frame_has_no_stage_numbers():
    entry = summarize(1, [fake_report(frames=0)], ["stages.encode: could not start"], cpu_pct=None)
    assert entry["stages"] == {} and entry["end_to_end_ms"] is None and not entry["holds"]


def test_a_failed_pipeline_never_holds():
    entry = summarize(1, [fake_report()], ["the run failed: stages.lm: died"], cpu_pct=None)
    assert not entry["holds"] and "died" in entry["why_not"][0]


def test_a_separate_pipeline_that_left_no_report_still_counts_as_one_pipeline_per_session():
    entry = summarize(2, [fake_report()], ["pipeline 1 ended without a result"], cpu_pct=None, pipelines=2)
    assert entry["pipelines"] == 2 and not entry["holds"]
    assert entry["compute_ms_per_session"] == pytest.approx(4 * 10.0)


def test_max_realtime_sessions_is_the_last_n_before_the_first_that_fails():
    held, failed = summarize(1, [fake_report()], [], None), summarize(1, [fake_report()], ["x"], None)
    assert max_realtime_sessions({"1": held, "2": held, "4": failed}) == 2
    assert max_realtime_sessions({"1": failed}) == 0
    assert max_realtime_sessions({"1": held, "2": held, "4": held, "8": failed, "12": held}) == 4


def test_a_pipeline_refusing_n_sessions_does_not_hold_and_says_why_without_running():
    speaker = [*STANDIN_OVERRIDES, "stages.playback.kind=playback.speaker"]  # a speaker is one conversation
    entry = measure_batched(2, 3.0, speaker)
    assert not entry["holds"] and entry["frames"] == 0 and entry["stages"] == {}
    assert entry["why_not"][0].startswith("refused: config error: stages.playback")


def test_a_mode_stops_after_the_first_n_that_fails_unless_told_to_go_on(monkeypatch):
    def fake_measure(n, seconds, overrides):  # N = 4 fails, every other holds
        return summarize(n, [fake_report(sessions=n)], ["too slow"] if n == 4 else [], cpu_pct=None)

    monkeypatch.setitem(sessions.MEASURE, "batched", fake_measure)
    stopped = measure_mode("batched", [1, 2, 4, 8], 3.0, [])
    assert list(stopped["by_sessions"]) == ["1", "2", "4"] and stopped["max_realtime_sessions"] == 2
    went_on = measure_mode("batched", [1, 2, 4, 8], 3.0, [], keep_going=True)
    assert list(went_on["by_sessions"]) == ["1", "2", "4", "8"] and went_on["max_realtime_sessions"] == 2


def test_cost_ratio_is_a_sessions_cost_at_8_over_its_cost_at_1():
    one = summarize(1, [fake_report()], [], cpu_pct=80.0)
    eight = summarize(8, [fake_report(stage_ms=20.0, sessions=8)], [], cpu_pct=160.0)
    mode = {"max_realtime_sessions": 8, "by_sessions": {"1": one, "8": eight}}
    assert cost_ratio(mode) == pytest.approx(0.25)  # 2x the compute per tick for 8x the sessions
    assert cost_ratio(mode, cost="cpu_pct_per_session") == pytest.approx(0.25)
    assert cost_ratio({"max_realtime_sessions": 1, "by_sessions": {"1": one}}) is None  # N = 8 not run


def test_bench_cli_lists_sessions():
    assert "sessions" in cli.BENCHMARKS and "sessions" in cli.SUMMARY


@pytest.fixture(scope="module")
def standin_run():
    """One short run of both modes on the stand-ins, N = 1 and 2: (exit code, JSON)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--standins", "--max", "2", "--seconds", "3", "--json"])
    return code, json.loads(out.getvalue())


def test_short_standin_run_reports_both_modes_in_the_documented_shape(standin_run):
    code, result = standin_run
    assert code == 0
    assert {"batched", "separate", "targets"} <= set(result)
    for mode_name in ("batched", "separate"):
        mode = result[mode_name]
        assert set(mode) == {"max_realtime_sessions", "by_sessions"}
        tried = [int(n) for n in mode["by_sessions"]]
        assert tried in ([1], [1, 2])  # N = 2 only after N = 1 held
        holds = [mode["by_sessions"][str(n)]["holds"] for n in tried]
        assert all(holds[:-1])  # it stops at the first N that does not hold
        assert mode["max_realtime_sessions"] == max_realtime_sessions(mode["by_sessions"])
    assert set(result["targets"]) == {"batched_sessions", "batched_over_separate", "cost_ratio_8_vs_1"}
    assert all(isinstance(t["met"], bool) for t in result["targets"].values())


def test_every_session_tried_had_its_frames_counted(standin_run):
    _, result = standin_run
    for mode_name, mode in ((m, result[m]) for m in ("batched", "separate")):
        for key, entry in mode["by_sessions"].items():
            n = int(key)
            assert entry["sessions"] == n
            assert entry["pipelines"] == (1 if mode_name == "batched" else n)
            assert entry["error"] is None, entry["why_not"]
            assert set(entry["per_session"]) == {str(k) for k in range(n)}
            assert all(row["frames"] > 0 for row in entry["per_session"].values())
            if mode_name == "batched":  # every frame carries every session
                assert len({row["frames"] for row in entry["per_session"].values()}) == 1
            assert entry["frames"] >= entry["frames_judged"] > 0
            assert list(entry["stages"]) == ["encode", "lm", "decode", "playback"]  # the source's is source_ms
            assert entry["source_ms"] is not None
            for stage in entry["stages"].values():
                assert {"p50", "p99", "deadline_misses", "per_session_ms"} <= set(stage)
                assert 0 <= stage["p50"] <= stage["p99"] <= stage["max"]
            assert entry["cpu_pct"] is not None and entry["cpu_pct"] >= 0
            assert entry["started_together"]
            assert entry["holds"] == (entry["why_not"] == [])


def test_the_table_has_a_row_per_configuration_tried(standin_run):
    _, result = standin_run
    table = format_table(result)
    for mode_name in ("batched", "separate"):
        for key in result[mode_name]["by_sessions"]:
            assert any(line.split()[:2] == [mode_name, key] for line in table.splitlines())
    assert "targets" in table and "max sessions in real time" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max", "0"], "--max 0: expected 1 to 64"),
        (["--max", "65"], "--max 65: expected 1 to 64"),
        (["--max", "many"], "--max 'many': expected a whole number"),
        (["--seconds", "1"], "--seconds 1.0: expected 3.0 to 600.0"),
        (["--seconds", "nan"], "--seconds nan: expected"),
        (["--seconds", "soon"], "--seconds 'soon': expected a number of seconds"),
        (["--set", "stages.lm.kind"], "expected a.b.c=value"),
        (["--set", "stages.lm.kind=nosuch"], "stages.lm.kind = 'nosuch': unknown stage"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("rtpipe bench sessions: ") and "\n" not in err
    assert message in err
    assert captured.out == ""  # nothing ran
