"""The source's parts (report.capture_parts_ms): the algorithmic frame, device input and its own work,
defined once and shown the same by the report, the end-of-run table, the plot, the trace and /metrics,
for a live source (a microphone) and a file/tone source, on synthetic records."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from rtpipe.pipeline.cli.run import format_table
from rtpipe.pipeline.observe.live_view import render_snapshot
from rtpipe.pipeline.observe.plot import (
    BUDGET_ALGORITHMIC,
    BUDGET_DEVICE,
    budget_segments_ms,
    compute_panel_ms,
    plot_report,
)
from rtpipe.pipeline.observe.prometheus import PrometheusExporter
from rtpipe.pipeline.observe.report import RunCounters, build_report, build_snapshot, capture_parts_ms
from rtpipe.pipeline.observe.trace import TraceWriter
from rtpipe.stages.base import FRAME_MS

import observe_support as support

N = 40


def _report(live: bool):
    info = support.run_info(live_source=live)
    recs = support.records(N)
    counters = RunCounters(support.STAGES, support.EDGES, live_source=live)
    report = build_report(recs, counters, seconds=N * FRAME_MS / 1000, t0_ns=info["t0_ns"])
    return info, recs, json.loads(json.dumps(report))  # as `rtpipe plot` reads it back


def _total_ms(recs):
    return (recs["exit_ns"][:, 0].astype(np.int64) - recs["capture_ns"].astype(np.int64)) / 1e6


def test_live_parts_are_the_frame_then_device_input_and_no_work():
    parts = capture_parts_ms([100.0, 81.5, 79.0], live_source=True, frame_ms=80.0)
    assert parts.live_source and parts.algorithmic_ms == 80.0
    assert list(parts.device_ms) == [20.0, 1.5, 0.0]  # a capture clock error never goes negative
    assert list(parts.work_ms) == [0.0, 0.0, 0.0]


def test_file_source_parts_are_all_its_own_work():
    parts = capture_parts_ms([0.3, 2.0], live_source=False, frame_ms=80.0)
    assert not parts.live_source and parts.algorithmic_ms == 0.0
    assert list(parts.device_ms) == [0.0, 0.0] and list(parts.work_ms) == [0.3, 2.0]


@pytest.mark.parametrize("live", [True, False])
def test_report_capture_section_stage_row_and_samples_follow_the_definition(live):
    info, recs, report = _report(live)
    expected = support.report(recs, info)
    assert report["capture"] == expected["capture"]
    assert report["stages"]["mic"] == expected["stages"]["mic"]
    parts = capture_parts_ms(_total_ms(recs), live_source=live, frame_ms=FRAME_MS)
    assert report["samples"]["capture_ms"] == pytest.approx(_total_ms(recs), abs=1e-3)  # the total, as before
    assert report["samples"]["stage_ms"]["mic"] == pytest.approx(parts.work_ms, abs=1e-3)
    assert report["stages"]["mic"]["deadline_misses"] == (0 if live else N)  # the synthetic file source is slow
    snapshot = build_snapshot(
        recs,
        RunCounters(support.STAGES, support.EDGES, live_source=live),
        frames_total=N,
        seconds=3.2,
        t0_ns=info["t0_ns"],
    )
    assert snapshot["capture"] == report["capture"]


def test_table_shows_a_live_sources_device_input_and_frame_under_its_row():
    _, _, report = _report(True)
    lines = format_table(report).splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("mic "))
    device, frame = lines[row + 1].split(), lines[row + 2].split()
    assert device[:2] == ["+", "device"] and [float(v) for v in device[2:6]] == [
        report["capture"]["device_ms"][k] for k in ("p50", "p95", "p99", "max")
    ]
    assert frame[:2] == ["+", "frame"] and float(frame[2]) == 80.0
    assert float(lines[row].split()[1]) == report["stages"]["mic"]["compute_ms"]["p50"] == 0.0


def test_table_of_a_file_source_has_no_capture_parts():
    _, _, report = _report(False)
    assert "+ device" not in format_table(report) and "+ frame" not in format_table(report)


def test_plot_budget_keeps_the_algorithmic_frame_as_its_own_labelled_part():
    _, recs, report = _report(True)
    segments = budget_segments_ms(report)
    parts = capture_parts_ms(_total_ms(recs), live_source=True, frame_ms=FRAME_MS)
    assert segments[0] == (BUDGET_ALGORITHMIC, FRAME_MS)
    assert segments[1][0] == BUDGET_DEVICE and segments[1][1] == pytest.approx(np.median(parts.device_ms), abs=1e-3)
    assert segments[2][0] == "wait mic->encode"
    fig = plot_report(report)
    labels = fig.axes[2].get_legend_handles_labels()[1]
    assert f"{BUDGET_ALGORITHMIC} {FRAME_MS:.1f} ms" in labels


@pytest.mark.parametrize("live", [True, False])
def test_plot_per_stage_panel_draws_the_sources_part_not_the_frame(live):
    _, recs, report = _report(live)
    panel = compute_panel_ms(report)
    parts = capture_parts_ms(_total_ms(recs), live_source=live, frame_ms=FRAME_MS)
    label, values = panel[0]
    assert label == ("mic (device input)" if live else "mic")
    assert values == pytest.approx(parts.device_ms if live else parts.work_ms, abs=1e-3)
    if live:
        assert np.max(values) < FRAME_MS  # no longer drawn above the deadline
    fig = plot_report(report)
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == [name for name, _ in panel]


def test_plot_of_a_report_without_a_capture_section_reads_it_as_a_file_source():
    _, _, report = _report(True)
    del report["capture"]
    assert budget_segments_ms(report)[0][0] == "capture"


@pytest.mark.parametrize("live", [True, False])
def test_trace_source_slices_carry_the_reports_parts(tmp_path, live):
    info, recs, report = _report(live)
    path = tmp_path / "run.json"
    writer = TraceWriter(path, info)
    writer.on_start(info)
    writer.on_frames(recs)
    writer.on_stop(report)
    events = json.loads(path.read_text())
    support.check_trace(events)  # the nested part slices keep every track well formed
    source_pid = info["pids"]["mic"]
    source = [e for e in events if e["ph"] == "X" and e["pid"] == source_pid and e["name"] == "mic"]
    parts = capture_parts_ms(_total_ms(recs), live_source=live, frame_ms=FRAME_MS)
    assert [e["args"]["device_ms"] for e in source] == pytest.approx(parts.device_ms, abs=1e-3)
    assert [e["args"]["work_ms"] for e in source] == pytest.approx(parts.work_ms, abs=1e-3)
    assert {e["args"]["algorithmic_ms"] for e in source} == {parts.algorithmic_ms}
    frames = [e for e in events if e["ph"] == "X" and e["name"] == "frame (algorithmic)"]
    devices = [e for e in events if e["ph"] == "X" and e["name"] == "device input"]
    assert len(frames) == len(devices) == (N if live else 0)
    if live:
        assert {round(e["dur"] / 1000, 3) for e in frames} == {FRAME_MS}


@pytest.mark.parametrize("live", [True, False])
def test_metrics_split_the_source_as_the_report_does(live):
    info, recs, _ = _report(live)
    exporter = PrometheusExporter(info, port=0, serve=False)
    exporter.on_start(info)
    exporter.on_frames(recs)
    from prometheus_client import generate_latest

    metrics = support.parse_metrics(generate_latest(exporter.registry).decode())
    parts = capture_parts_ms(_total_ms(recs), live_source=live, frame_ms=FRAME_MS)
    compute_s = metrics[("rtpipe_stage_compute_seconds_sum", frozenset({"stage": "mic"}.items()))]
    assert compute_s == pytest.approx(parts.work_ms.sum() / 1000)
    assert metrics[("rtpipe_capture_device_input_seconds_sum", frozenset())] == pytest.approx(
        parts.device_ms.sum() / 1000
    )
    assert metrics[("rtpipe_capture_algorithmic_seconds", frozenset())] == pytest.approx(parts.algorithmic_ms / 1000)


def test_live_view_shows_a_live_sources_device_input_and_frame():
    from rich.console import Console

    info, recs, _ = _report(True)
    snapshot = build_snapshot(
        recs,
        RunCounters(support.STAGES, support.EDGES, live_source=True),
        frames_total=N,
        seconds=3.2,
        t0_ns=info["t0_ns"],
    )
    console = Console(record=True, width=160)
    console.print(render_snapshot(snapshot, info))
    text = console.export_text()
    assert "+ device input" in text and "+ frame (algorithmic)" in text
