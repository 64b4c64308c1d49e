"""Latency arithmetic over per-frame records: percentiles, the run report and the live snapshot.

The sink's host sends one FRAME_RECORD_DTYPE record per frame; the supervisor keeps them and calls
`build_report` (whole run) and `build_snapshot` (last few seconds) for `--report` and the observers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rtpipe.shm.frame import FRAME_RECORD_DTYPE
from rtpipe.stages.base import FRAME_MS

# In a record, stage k's enter/exit are in chain order (0 = source: enter = capture time, exit = publish).

PERCENTILE_KEYS = ("p50", "p95", "p99", "max", "mean")


def summarize_ms(values_ms) -> dict:
    """P50/P95/P99/max/mean (milliseconds, 3 decimals) of `values_ms`; zeros when there are none."""
    values = np.asarray(values_ms, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {key: 0.0 for key in PERCENTILE_KEYS}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "max": round(float(values.max()), 3),
        "mean": round(float(values.mean()), 3),
    }


@dataclass
class EdgeCounters:
    """What a ring counted on one edge (from shm's RingStats), as plain numbers."""

    dropped_oldest: int = 0
    dropped_newest: int = 0
    blocked: int = 0
    fill: int = 0


@dataclass
class RunCounters:
    """Everything besides the frame records that the report needs, gathered by the supervisor."""

    stage_names: list[str]
    edge_names: list[str]
    restarts: dict[str, int] = field(default_factory=dict)
    edges: dict[str, EdgeCounters] = field(default_factory=dict)
    underruns: int = 0
    overflows: int = 0
    device_underflows: int = 0  # times the speaker's own device buffer ran dry (the sink's stats)
    frames_lost: int = 0
    text: list[str] = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)  # every text token id, with or without a tokenizer
    live_source: bool = False


@dataclass
class RecordColumns:
    """Per-frame latencies (ms) derived from records: one array per column, all the same length."""

    seq: np.ndarray
    t_s: np.ndarray
    end_to_end_ms: np.ndarray
    capture_ms: np.ndarray
    stage_ms: dict[str, np.ndarray]
    wait_ms: dict[str, np.ndarray]
    playback_ms: np.ndarray


def record_columns(records: np.ndarray, stage_names: list[str], edge_names: list[str], t0_ns: int) -> RecordColumns:
    """Splits records into per-frame latencies: end to end, per stage (exit - enter), per hop (next
    stage's enter - this stage's exit), capture (source publish - capture) and playback (handoff - enter)."""
    records = np.asarray(records, dtype=FRAME_RECORD_DTYPE)
    n_stages = len(stage_names)
    enter = records["enter_ns"].astype(np.int64)
    exit_ = records["exit_ns"].astype(np.int64)
    to_ms = 1e-6
    stage_ms = {name: (exit_[:, k] - enter[:, k]) * to_ms for k, name in enumerate(stage_names)}
    wait_ms = {name: (enter[:, k + 1] - exit_[:, k]) * to_ms for k, name in enumerate(edge_names)}
    sink = n_stages - 1
    return RecordColumns(
        seq=records["seq"].astype(np.int64),
        t_s=(records["capture_ns"].astype(np.int64) - t0_ns) * 1e-9,
        end_to_end_ms=(records["handoff_ns"] - records["capture_ns"]) * to_ms,
        capture_ms=(exit_[:, 0] - records["capture_ns"]) * to_ms,
        stage_ms=stage_ms,
        wait_ms=wait_ms,
        playback_ms=(records["handoff_ns"] - enter[:, sink]) * to_ms if n_stages else np.zeros(0),
    )


def _stage_table(columns: RecordColumns, counters: RunCounters, frame_ms: float) -> dict:
    stages = {}
    for k, name in enumerate(counters.stage_names):
        compute = columns.stage_ms[name]
        if k == 0 and counters.live_source:
            # A live source's enter is the capture of its first sample: the frame itself takes
            # frame_ms to arrive, so only what comes after that is the source's own work.
            compute = np.maximum(compute - frame_ms, 0.0)
        stages[name] = {
            "compute_ms": summarize_ms(compute),
            "rtf": round(float(np.mean(compute)) / frame_ms, 4) if compute.size else 0.0,
            "deadline_misses": int(np.count_nonzero(compute > frame_ms)),
            "restarts": int(counters.restarts.get(name, 0)),
        }
    return stages


def _edge_table(columns: RecordColumns, counters: RunCounters, with_fill: bool) -> dict:
    edges = {}
    for name in counters.edge_names:
        c = counters.edges.get(name, EdgeCounters())
        entry = {
            "wait_ms": summarize_ms(columns.wait_ms[name]),
            "dropped_oldest": int(c.dropped_oldest),
            "dropped_newest": int(c.dropped_newest),
            "blocked": int(c.blocked),
        }
        if with_fill:
            entry["fill"] = int(c.fill)
        edges[name] = entry
    return edges


def _round_list(values: np.ndarray) -> list:
    return [round(float(v), 3) for v in values]


def build_report(
    records: np.ndarray,
    counters: RunCounters,
    *,
    seconds: float,
    t0_ns: int,
    frame_ms: float = FRAME_MS,
    delay_frames: int = 0,
    config: dict | None = None,
    device_latency_ms: float | None = None,
) -> dict:
    """The run report, keys exactly as in the team contract (see contracts.md), with per-frame samples."""
    records = np.asarray(records, dtype=FRAME_RECORD_DTYPE)
    columns = record_columns(records, counters.stage_names, counters.edge_names, t0_ns)
    return {
        **_summary(columns, counters, frames=int(records.size), seconds=seconds, frame_ms=frame_ms, with_fill=False),
        "samples": {
            "seq": [int(s) for s in columns.seq],
            "t_s": _round_list(columns.t_s),
            "end_to_end_ms": _round_list(columns.end_to_end_ms),
            "capture_ms": _round_list(columns.capture_ms),
            "stage_ms": {name: _round_list(v) for name, v in columns.stage_ms.items()},
            "wait_ms": {name: _round_list(v) for name, v in columns.wait_ms.items()},
            "playback_ms": _round_list(columns.playback_ms),
        },
        "text": list(counters.text),
        "text_tokens": list(counters.text_tokens),
        "delay_frames": int(delay_frames),
        "config": config or {},
        "device_latency_ms": device_latency_ms,
    }


def build_snapshot(
    recent_records: np.ndarray,
    counters: RunCounters,
    *,
    frames_total: int,
    seconds: float,
    t0_ns: int,
    frame_ms: float = FRAME_MS,
) -> dict:
    """What observers get once a second: the report's shape, percentiles over `recent_records` (the
    last few seconds), counters for the whole run, each edge's current fill and the latest text."""
    records = np.asarray(recent_records, dtype=FRAME_RECORD_DTYPE)
    columns = record_columns(records, counters.stage_names, counters.edge_names, t0_ns)
    return {
        **_summary(columns, counters, frames=int(frames_total), seconds=seconds, frame_ms=frame_ms, with_fill=True),
        "text": list(counters.text[-20:]),
        "text_tokens": list(counters.text_tokens[-20:]),
    }


def _summary(columns, counters: RunCounters, *, frames: int, seconds: float, frame_ms: float, with_fill: bool) -> dict:
    """The keys the report and the once-a-second snapshot share."""
    return {
        "frames": frames,
        "seconds": round(float(seconds), 3),
        "frame_ms": float(frame_ms),
        "end_to_end_ms": summarize_ms(columns.end_to_end_ms),
        "stages": _stage_table(columns, counters, frame_ms),
        "edges": _edge_table(columns, counters, with_fill=with_fill),
        "playback": {"underruns": int(counters.underruns), "overflows": int(counters.overflows)},
        "frames_lost": int(counters.frames_lost),
    }


def worst_stage(snapshot: dict) -> tuple[str, float] | None:
    """The stage with the highest compute P99 in a snapshot or report, and that P99 in ms."""
    stages = snapshot.get("stages") or {}
    if not stages:
        return None
    name = max(stages, key=lambda s: stages[s]["compute_ms"]["p99"])
    return name, stages[name]["compute_ms"]["p99"]


def count_lost(seqs: np.ndarray) -> int:
    """Frames missing from the sequence numbers seen, which a run numbers 0, 1, 2, ... (so frames
    missing before the first one seen count too); order and repeats do not matter."""
    seqs = np.unique(np.asarray(seqs, dtype=np.int64))
    return int(seqs[-1] + 1 - seqs.size) if seqs.size else 0
