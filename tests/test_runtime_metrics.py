"""Frame records to numbers: percentiles, per-stage and per-hop columns, lost-frame counting, the report
and snapshot shapes, and the one-line status."""

from __future__ import annotations

import numpy as np

from rtpipe.pipeline.observe.report import (
    FRAME_RECORD_DTYPE,
    EdgeCounters,
    RunCounters,
    build_report,
    build_snapshot,
    count_lost,
    summarize_ms,
)
from rtpipe.pipeline.observe.status_line import StatusLine, format_status

STAGES = ["capture", "encode", "lm", "decode", "playback"]
EDGES = ["capture->encode", "encode->lm", "lm->decode", "decode->playback"]
MS = 1_000_000


def synthetic(n: int, *, lm_ms: float = 10.0, t0_ns: int = 5_000 * MS) -> np.ndarray:
    records = np.zeros(n, FRAME_RECORD_DTYPE)
    for k in range(n):
        t = t0_ns + k * 80 * MS
        records[k]["seq"] = k
        records[k]["capture_ns"] = t
        stamps = []
        for i in range(5):
            enter = t + 1 * MS if i else t  # 1 ms on each hop
            compute = lm_ms * MS if STAGES[i] == "lm" else 2 * MS
            stamps.append((enter, enter + int(compute)))
            t = enter + int(compute)
        records[k]["enter_ns"][:5] = [s[0] for s in stamps]
        records[k]["exit_ns"][:5] = [s[1] for s in stamps]
        records[k]["handoff_ns"] = t + 3 * MS
    return records


def test_summaries_are_percentiles_in_ms():
    s = summarize_ms(np.arange(1, 101, dtype=float))
    assert s == {"p50": 50.5, "p95": 95.05, "p99": 99.01, "max": 100.0, "mean": 50.5}
    assert summarize_ms([]) == {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}


def test_lost_frames_are_the_gaps_in_sequence_numbers():
    assert count_lost([0, 1, 2, 5, 6, 9]) == 4
    assert count_lost([3]) == 3  # 0, 1 and 2 never came
    assert count_lost([]) == 0
    assert count_lost([2, 0, 2, 1]) == 0


def test_report_columns_per_stage_per_hop_and_end_to_end():
    records = synthetic(50, lm_ms=90.0)  # lm misses every deadline
    counters = RunCounters(
        STAGES,
        EDGES,
        restarts={"lm": 1},
        edges={"capture->encode": EdgeCounters(dropped_oldest=2)},
        frames_lost=3,
        text=["hi"],
    )
    report = build_report(
        records, counters, seconds=4.0, t0_ns=5_000 * MS, delay_frames=2, config={"stages": {}}, device_latency_ms=None
    )
    assert report["frames"] == 50 and report["frames_lost"] == 3 and report["text"] == ["hi"]
    assert report["stages"]["encode"]["compute_ms"]["p50"] == 2.0
    assert report["stages"]["lm"]["deadline_misses"] == 50 and report["stages"]["lm"]["restarts"] == 1
    assert report["stages"]["lm"]["rtf"] == 1.125
    assert report["stages"]["capture"]["compute_ms"]["max"] == 2.0  # not live: no framing to subtract
    assert report["edges"]["encode->lm"]["wait_ms"]["p99"] == 1.0
    assert report["edges"]["capture->encode"]["dropped_oldest"] == 2
    # 5 stages of compute + 4 hops + 3 ms of output
    assert report["end_to_end_ms"]["p50"] == 2 * 4 + 90 + 4 + 3
    assert report["samples"]["t_s"][:2] == [0.0, 0.08]
    assert report["samples"]["playback_ms"][0] == 5.0
    assert set(report["samples"]) == {"seq", "t_s", "end_to_end_ms", "capture_ms", "stage_ms", "wait_ms", "playback_ms"}


def test_live_source_compute_does_not_count_the_frame_it_waited_for():
    records = synthetic(20)
    records["exit_ns"][:, 0] += 80 * MS  # a microphone publishes a frame 80 ms after its first sample
    counters = RunCounters(STAGES, EDGES, live_source=True)
    report = build_report(records, counters, seconds=2.0, t0_ns=0)
    # the 80 ms frame and the 2 ms after it are the capture section's parts, not the source's compute
    assert report["capture"]["algorithmic_ms"] == 80.0 and report["capture"]["device_ms"]["p50"] == 2.0
    assert report["stages"]["capture"]["compute_ms"]["p50"] == 0.0
    assert report["stages"]["capture"]["deadline_misses"] == 0


def test_snapshot_has_fill_and_status_line_names_the_worst_stage():
    counters = RunCounters(STAGES, EDGES, edges={e: EdgeCounters(fill=1, dropped_newest=1) for e in EDGES})
    snapshot = build_snapshot(synthetic(10, lm_ms=30.0), counters, frames_total=400, seconds=32.0, t0_ns=0)
    assert snapshot["frames"] == 400 and snapshot["edges"]["lm->decode"]["fill"] == 1
    line = format_status(snapshot)
    assert "frames   400" in line and "worst lm 30.00 ms" in line and "drops 4" in line
    assert "\n" not in line

    class Out:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    out = Out()
    status = StatusLine({}, stream=out)
    status.on_start({"stages": STAGES, "kinds": {s: "echo" for s in STAGES}})
    status.on_tick(snapshot)
    assert out.text.count("\n") == 2 and "capture (echo) -> encode" in out.text
