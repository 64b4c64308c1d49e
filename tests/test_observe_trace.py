"""The --trace writer: Chrome/Perfetto JSON with a track per stage, a slice per frame per stage, paired
flow arrows and ring-fill counters, fed with synthetic records (FRAME_RECORD_DTYPE) and run_info (RunInfo)."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from rtpipe.pipeline.observe.trace import TraceWriter
from rtpipe.stages.errors import ConfigError

import observe_support as support


def _write_trace(path, recs, *, ticks=3, stop=True):
    info = support.run_info()
    writer = TraceWriter(path, info)
    writer.on_start(info)
    for i, chunk in enumerate(np.array_split(recs, ticks)):
        writer.on_frames(chunk)
        writer.on_tick(support.report(recs, info, step=i + 1, fill=True))
    if stop:
        writer.on_stop(support.report(recs, info))
    return writer


def test_trace_has_a_slice_per_frame_per_stage_and_paired_flows(tmp_path):
    recs = support.records(40)
    path = tmp_path / "run.json"
    _write_trace(path, recs)
    events = json.loads(path.read_text())
    summary = support.check_trace(events)
    n_stages, n_edges = len(support.STAGES), len(support.EDGES)
    assert summary["slices"] == 40 * n_stages
    assert summary["flows"] == 40 * n_edges
    assert summary["counters"] >= 3 * n_edges  # one fill counter per edge per tick at least
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert {f"{i} {s} ({support.KINDS[s]})" for i, s in enumerate(support.STAGES)} <= names
    pids = {e["pid"] for e in events if e["ph"] == "X"}
    assert pids == set(support.run_info()["pids"].values())  # one process track per stage, real pids


def test_overlapping_capture_windows_go_on_separate_lanes(tmp_path):
    # the synthetic source's slice is capture..publish (> 80 ms), so consecutive frames overlap
    recs = support.records(10)
    path = tmp_path / "run.json"
    _write_trace(path, recs, ticks=1)
    events = json.loads(path.read_text())
    support.check_trace(events)  # nesting holds on every thread
    source_pid = support.run_info()["pids"]["mic"]
    assert len({e["tid"] for e in events if e["ph"] == "X" and e["pid"] == source_pid}) == 2


def test_stage_that_missed_a_frame_gets_no_slice_and_breaks_no_flow(tmp_path):
    recs = support.records(5)
    recs[2]["enter_ns"][2] = 0  # the lm stage restarted: no timestamps for frame 2
    recs[2]["exit_ns"][2] = 0
    path = tmp_path / "run.json"
    _write_trace(path, recs, ticks=1)
    summary = support.check_trace(json.loads(path.read_text()))
    assert summary["slices"] == 5 * len(support.STAGES) - 1
    assert summary["flows"] == 5 * len(support.EDGES) - 2


def test_unfinished_trace_is_a_json_array_missing_only_its_bracket(tmp_path):
    # a crashed run never calls on_stop: viewers accept the array format without its closing bracket
    recs = support.records(5)
    path = tmp_path / "run.json"
    writer = _write_trace(path, recs, ticks=1, stop=False)
    writer._file.flush()
    text = path.read_text()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    support.check_trace(json.loads(text + "]"))


def test_unwritable_trace_path_is_a_config_error_naming_it(tmp_path):
    bad = tmp_path / "no-such-dir" / "run.json"
    with pytest.raises(ConfigError, match="no-such-dir/run.json"):
        TraceWriter(bad, support.run_info())


def test_trace_checker_rejects_an_unpaired_flow(tmp_path):
    recs = support.records(3)
    path = tmp_path / "run.json"
    _write_trace(path, recs, ticks=1)
    events = [e for e in json.loads(path.read_text()) if not (e["ph"] == "f" and e["id"] == events_first_id(path))]
    with pytest.raises(AssertionError, match="does not pair up"):
        support.check_trace(events)


def events_first_id(path):
    return next(e["id"] for e in json.loads(path.read_text()) if e["ph"] == "s")
