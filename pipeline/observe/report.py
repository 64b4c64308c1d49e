"""Latency arithmetic over per-frame records: percentiles, the run report and the live snapshot.

The sink's host sends one FRAME_RECORD_DTYPE record per frame; the supervisor keeps them and calls
`build_report` (whole run) and `build_snapshot` (last few seconds) for `--report` and the observers.
`Report` and `Snapshot` are those two shapes, the one contract between this module, the supervisor,
the observers, `rtpipe plot` and `rtpipe run`'s table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np

from rtpipe.shm.frame import FRAME_RECORD_DTYPE
from rtpipe.stages.base import FRAME_MS

# In a record, stage k's enter/exit are in chain order (0 = source: enter = capture time, exit = publish).
# What the source's enter..exit holds is split once, by `capture_parts_ms`; every consumer uses that.

PERCENTILE_KEYS = ("p50", "p95", "p99", "max", "mean")


class Percentiles(TypedDict):
    """A latency's distribution in milliseconds, 3 decimals (all 0.0 when nothing was measured)."""

    p50: float
    p95: float
    p99: float
    max: float
    mean: float


class StageRow(TypedDict):
    """One stage: its compute time per frame (enter to exit; for the source, its own work as
    `capture_parts_ms` defines it), real-time factor (mean compute / frame), frames over one frame's
    time, restarts."""

    compute_ms: Percentiles
    rtf: float
    deadline_misses: int
    restarts: int


class EdgeRow(TypedDict):
    """One ring between two stages: time a frame waited in it, and what its policy dropped or blocked."""

    wait_ms: Percentiles
    dropped_oldest: int
    dropped_newest: int
    blocked: int


class SnapshotEdgeRow(EdgeRow):
    """An edge in a snapshot: also the frames in the ring at that moment (a report has no fill)."""

    fill: int


class Playback(TypedDict):
    """The sink's glitch counts: its jitter buffer ran empty (underruns) or was too full for a frame
    (overflows); the speaker's own device buffer ran dry (device_underflows, PortAudio's count); its
    adaptive playout dropped audio to bring the queue down (trims, trimmed_ms: how many, how much) and
    aims at target_ms of queued audio now (0 for a sink without a jitter buffer)."""

    underruns: int
    overflows: int
    device_underflows: int
    trims: int
    trimmed_ms: float
    target_ms: float


class Capture(TypedDict):
    """The source's time per frame, capture of the first sample to publish (total_ms), in its parts
    (`capture_parts_ms`): algorithmic_ms, the frame's own length (a live source must fill the frame
    before it can go; 0 for a file or tone); device_ms, what is left after the frame's last sample until
    the source publishes it (a live source: the device's blocks, its input latency, the hand-over);
    work_ms, the source's own work (a file or tone: the read, publish and pacing wake-up)."""

    live_source: bool
    algorithmic_ms: float
    device_ms: Percentiles
    work_ms: Percentiles
    total_ms: Percentiles


class SessionRow(TypedDict):
    """One session slot's conversation(s): the frames it carried (those whose `live` bit for it was
    set), their end to end, the frames lost between two of them (sequence gaps while it was live), and
    the model's text for it (a snapshot: the last 20 pieces)."""

    frames: int
    end_to_end_ms: Percentiles
    frames_lost: int
    text: list[str]
    text_tokens: list[int]


class Samples(TypedDict):
    """The report's per-frame values, one list entry per frame in sequence order (ms unless `_s`)."""

    seq: list[int]
    t_s: list[float]  # capture time since the run's start
    end_to_end_ms: list[float]
    capture_ms: list[float]  # the source's total (Capture.total_ms): algorithmic + device + work
    stage_ms: dict[str, list[float]]  # the source's entry is its own work (Capture.work_ms)
    wait_ms: dict[str, list[float]]
    playback_ms: list[float]


class Snapshot(TypedDict):
    """What observers get about once a second: percentiles over the last few seconds, counts over
    the whole run, each ring's fill now and the last 20 pieces of text."""

    frames: int
    seconds: float
    frame_ms: float
    end_to_end_ms: Percentiles
    stages: dict[str, StageRow]
    capture: Capture
    edges: dict[str, SnapshotEdgeRow]
    playback: Playback
    frames_lost: int
    text: list[str]
    text_tokens: list[int]
    sessions: dict[str, SessionRow]  # over the last few seconds, by slot ("0", "1", ...)
    live_sessions: int  # slots live in the latest frame
    # a network edge's latest word on its clients (rtpipe serve): active, queued, slots, bad_messages,
    # clients {slot: its summary}; {} for any other source
    network: dict[str, Any]


class Report(TypedDict):
    """The whole run (`rtpipe run --report` writes it as JSON, `rtpipe plot` reads it back): the
    snapshot's keys over every frame (edges without fill), per-frame samples, all the text, the
    config run, its declared delay and the output device's own latency (None when unknown)."""

    frames: int
    seconds: float
    frame_ms: float
    end_to_end_ms: Percentiles
    stages: dict[str, StageRow]
    capture: Capture
    edges: dict[str, EdgeRow]
    playback: Playback
    frames_lost: int
    sessions: dict[str, SessionRow]  # by slot ("0", "1", ...): each slot's frames, end to end, losses
    samples: Samples
    text: list[str]
    text_tokens: list[int]
    delay_frames: int
    config: dict[str, Any]
    device_latency_ms: float | None


def summarize_ms(values_ms: Sequence[float] | np.ndarray) -> Percentiles:
    """P50/P95/P99/max/mean (milliseconds, 3 decimals) of `values_ms`; zeros when there are none."""
    values = np.asarray(values_ms, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Percentiles(p50=0.0, p95=0.0, p99=0.0, max=0.0, mean=0.0)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return Percentiles(
        p50=round(float(p50), 3),
        p95=round(float(p95), 3),
        p99=round(float(p99), 3),
        max=round(float(values.max()), 3),
        mean=round(float(values.mean()), 3),
    )


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
    trims: int = 0  # times the speaker's jitter buffer dropped audio to come down to its target
    trimmed_ms: float = 0.0  # audio those trims dropped
    target_ms: float = 0.0  # the speaker's jitter buffer target, last reported
    frames_lost: int = 0
    text: list[str] = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)  # every text token id, with or without a tokenizer
    # the same by session slot (events that name a "session"; 0 for those that do not)
    session_text: dict[int, list[str]] = field(default_factory=dict)
    session_text_tokens: dict[int, list[int]] = field(default_factory=dict)
    network: dict[str, Any] = field(default_factory=dict)  # the network edge's latest status, if any
    live_source: bool = False


@dataclass
class CaptureParts:
    """The source's time per frame in its parts, ms: algorithmic_ms (one number, the same for every
    frame), device_ms and work_ms (one entry per frame). Per frame algorithmic + device + work is the
    total (capture to publish), except where a live source published before its frame's last sample
    was due (a capture clock error): device_ms is then 0, never negative."""

    live_source: bool
    algorithmic_ms: float
    device_ms: np.ndarray
    work_ms: np.ndarray


def capture_parts_ms(total_ms: Sequence[float] | np.ndarray, *, live_source: bool, frame_ms: float) -> CaptureParts:
    """Splits the source's per-frame total (publish - capture of its first sample, ms) into its parts.

    A live source (a microphone) stamps the capture of the frame's first sample, so its total holds the
    frame itself (algorithmic: frame_ms, the frame must be filled before it can go) and then device
    input: the rest, from the frame's last sample to the publish (the device's blocks, PortAudio's
    input latency, the wait in the capture queue and the publish itself, which are not stamped apart:
    a live source's work_ms is 0). A file or tone source waits on no device: its capture stamp is when
    its frame was due, so all of its total is its own work (read, publish, how late its pacing woke)."""
    total = np.asarray(total_ms, dtype=np.float64)
    if live_source:
        return CaptureParts(True, float(frame_ms), np.maximum(total - frame_ms, 0.0), np.zeros_like(total))
    return CaptureParts(False, 0.0, np.zeros_like(total), total)


def _capture(columns: RecordColumns, live_source: bool, frame_ms: float) -> Capture:
    parts = capture_parts_ms(columns.capture_ms, live_source=live_source, frame_ms=frame_ms)
    return Capture(
        live_source=parts.live_source,
        algorithmic_ms=parts.algorithmic_ms,
        device_ms=summarize_ms(parts.device_ms),
        work_ms=summarize_ms(parts.work_ms),
        total_ms=summarize_ms(columns.capture_ms),
    )


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


def record_columns(
    records: np.ndarray,
    stage_names: list[str],
    edge_names: list[str],
    t0_ns: int,
    *,
    live_source: bool = False,
    frame_ms: float = FRAME_MS,
) -> RecordColumns:
    """Splits records into per-frame latencies: end to end, per stage (exit - enter; the source's own
    work, `capture_parts_ms`), per hop (next stage's enter - this stage's exit), capture (source publish
    - capture) and playback (handoff - enter)."""
    records = np.asarray(records, dtype=FRAME_RECORD_DTYPE)
    n_stages = len(stage_names)
    enter = records["enter_ns"].astype(np.int64)
    exit_ = records["exit_ns"].astype(np.int64)
    to_ms = 1e-6
    stage_ms = {name: (exit_[:, k] - enter[:, k]) * to_ms for k, name in enumerate(stage_names)}
    wait_ms = {name: (enter[:, k + 1] - exit_[:, k]) * to_ms for k, name in enumerate(edge_names)}
    sink = n_stages - 1
    capture_ms = (exit_[:, 0] - records["capture_ns"]) * to_ms if n_stages else np.zeros(records.size)
    if n_stages:
        stage_ms[stage_names[0]] = capture_parts_ms(capture_ms, live_source=live_source, frame_ms=frame_ms).work_ms
    return RecordColumns(
        seq=records["seq"].astype(np.int64),
        t_s=(records["capture_ns"].astype(np.int64) - t0_ns) * 1e-9,
        end_to_end_ms=(records["handoff_ns"] - records["capture_ns"]) * to_ms,
        capture_ms=capture_ms,
        stage_ms=stage_ms,
        wait_ms=wait_ms,
        playback_ms=(records["handoff_ns"] - enter[:, sink]) * to_ms if n_stages else np.zeros(0),
    )


def _stage_table(columns: RecordColumns, counters: RunCounters, frame_ms: float) -> dict[str, StageRow]:
    stages = {}
    for name in counters.stage_names:
        compute = columns.stage_ms[name]  # the source's: its own work (capture_parts_ms)
        stages[name] = StageRow(
            compute_ms=summarize_ms(compute),
            rtf=round(float(np.mean(compute)) / frame_ms, 4) if compute.size else 0.0,
            deadline_misses=int(np.count_nonzero(compute > frame_ms)),
            restarts=int(counters.restarts.get(name, 0)),
        )
    return stages


def _edge_table(columns: RecordColumns, counters: RunCounters) -> dict[str, EdgeRow]:
    edges = {}
    for name in counters.edge_names:
        c = counters.edges.get(name, EdgeCounters())
        edges[name] = EdgeRow(
            wait_ms=summarize_ms(columns.wait_ms[name]),
            dropped_oldest=int(c.dropped_oldest),
            dropped_newest=int(c.dropped_newest),
            blocked=int(c.blocked),
        )
    return edges


def _with_fill(edges: dict[str, EdgeRow], fill: dict[str, int]) -> dict[str, SnapshotEdgeRow]:
    return {name: SnapshotEdgeRow(**row, fill=int(fill.get(name, 0))) for name, row in edges.items()}


def no_playback() -> Playback:
    """The "playback" section before any counts have come (all zero)."""
    return Playback(underruns=0, overflows=0, device_underflows=0, trims=0, trimmed_ms=0.0, target_ms=0.0)


def _playback(counters: RunCounters) -> Playback:
    return Playback(
        underruns=int(counters.underruns),
        overflows=int(counters.overflows),
        device_underflows=int(counters.device_underflows),
        trims=int(counters.trims),
        trimmed_ms=round(float(counters.trimmed_ms), 3),
        target_ms=round(float(counters.target_ms), 3),
    )


def session_table(
    records: np.ndarray, end_to_end_ms: np.ndarray, counters: RunCounters, text_pieces: int | None = None
) -> dict[str, SessionRow]:
    """Per session slot, from each record's `live` bits: the slot's frames, their end to end, and its
    lost frames (sequence numbers missing between two frames it carried); its text from `counters`
    (the last `text_pieces` pieces, all when None)."""
    first = 0 if text_pieces is None else -text_pieces
    live = records["live"].astype(np.uint64)
    seq = records["seq"].astype(np.int64)
    present = np.bitwise_or.reduce(live) if live.size else np.uint64(0)
    sessions = {}
    for k in range(int(present).bit_length()):
        mine = (live >> np.uint64(k)) & np.uint64(1) == 1
        if not mine.any():
            continue
        my_seq = np.sort(seq[mine])
        gaps = np.diff(my_seq) - 1
        sessions[str(k)] = SessionRow(
            frames=int(mine.sum()),
            end_to_end_ms=summarize_ms(end_to_end_ms[mine]),
            frames_lost=int(gaps[gaps > 0].sum()),
            text=list(counters.session_text.get(k, [])[first:]),
            text_tokens=list(counters.session_text_tokens.get(k, [])[first:]),
        )
    return sessions


def live_sessions(records: np.ndarray) -> int:
    """How many slots the latest record (highest sequence number) carried."""
    if not records.size:
        return 0
    latest = records[int(np.argmax(records["seq"]))]
    return int(latest["live"]).bit_count()


def _round_list(values: np.ndarray) -> list[float]:
    return [round(float(v), 3) for v in values]


def build_report(
    records: np.ndarray,
    counters: RunCounters,
    *,
    seconds: float,
    t0_ns: int,
    frame_ms: float = FRAME_MS,
    delay_frames: int = 0,
    config: dict[str, Any] | None = None,
    device_latency_ms: float | None = None,
) -> Report:
    """The run report over every record, with per-frame samples (`Report`)."""
    records = np.asarray(records, dtype=FRAME_RECORD_DTYPE)
    columns = record_columns(
        records, counters.stage_names, counters.edge_names, t0_ns, live_source=counters.live_source, frame_ms=frame_ms
    )
    return Report(
        frames=int(records.size),
        seconds=round(float(seconds), 3),
        frame_ms=float(frame_ms),
        end_to_end_ms=summarize_ms(columns.end_to_end_ms),
        stages=_stage_table(columns, counters, frame_ms),
        capture=_capture(columns, counters.live_source, frame_ms),
        edges=_edge_table(columns, counters),
        playback=_playback(counters),
        frames_lost=int(counters.frames_lost),
        sessions=session_table(records, columns.end_to_end_ms, counters),
        samples=Samples(
            seq=[int(s) for s in columns.seq],
            t_s=_round_list(columns.t_s),
            end_to_end_ms=_round_list(columns.end_to_end_ms),
            capture_ms=_round_list(columns.capture_ms),
            stage_ms={name: _round_list(v) for name, v in columns.stage_ms.items()},
            wait_ms={name: _round_list(v) for name, v in columns.wait_ms.items()},
            playback_ms=_round_list(columns.playback_ms),
        ),
        text=list(counters.text),
        text_tokens=list(counters.text_tokens),
        delay_frames=int(delay_frames),
        config=config or {},
        device_latency_ms=device_latency_ms,
    )


def build_snapshot(
    recent_records: np.ndarray,
    counters: RunCounters,
    *,
    frames_total: int,
    seconds: float,
    t0_ns: int,
    frame_ms: float = FRAME_MS,
) -> Snapshot:
    """What observers get once a second (`Snapshot`): percentiles over `recent_records` (the last few
    seconds), counters for the whole run, each edge's current fill and the latest text."""
    records = np.asarray(recent_records, dtype=FRAME_RECORD_DTYPE)
    columns = record_columns(
        records, counters.stage_names, counters.edge_names, t0_ns, live_source=counters.live_source, frame_ms=frame_ms
    )
    fill = {name: c.fill for name, c in counters.edges.items()}
    return Snapshot(
        frames=int(frames_total),
        seconds=round(float(seconds), 3),
        frame_ms=float(frame_ms),
        end_to_end_ms=summarize_ms(columns.end_to_end_ms),
        stages=_stage_table(columns, counters, frame_ms),
        capture=_capture(columns, counters.live_source, frame_ms),
        edges=_with_fill(_edge_table(columns, counters), fill),
        playback=_playback(counters),
        frames_lost=int(counters.frames_lost),
        text=list(counters.text[-20:]),
        text_tokens=list(counters.text_tokens[-20:]),
        sessions=session_table(records, columns.end_to_end_ms, counters, text_pieces=20),
        live_sessions=live_sessions(records),
        network=dict(counters.network),
    )


def final_snapshot(report: Report, last: Snapshot | None) -> Snapshot:
    """The report as a snapshot, for an observer that draws its last state the way it drew each tick.

    A report has no fill levels: each edge keeps `last`'s (0 without one). A report without any text
    takes `last`'s. `report` itself is left as it was (every observer gets the same one)."""
    last_edges = last["edges"] if last else {}
    fill = {name: row["fill"] for name, row in last_edges.items()}
    has_text = bool(report["text"] or report["text_tokens"])
    return Snapshot(
        frames=report["frames"],
        seconds=report["seconds"],
        frame_ms=report["frame_ms"],
        end_to_end_ms=report["end_to_end_ms"],
        stages=report["stages"],
        capture=report["capture"],
        edges=_with_fill(report["edges"], fill),
        playback=report["playback"],
        frames_lost=report["frames_lost"],
        text=list(report["text"] if has_text or last is None else last["text"]),
        text_tokens=list(report["text_tokens"] if has_text or last is None else last["text_tokens"]),
        sessions=report["sessions"],
        live_sessions=last["live_sessions"] if last else 0,
        network=last["network"] if last else {},
    )


def worst_stage(snapshot: Snapshot | Report) -> tuple[str, float] | None:
    """The stage with the highest compute P99 in a snapshot or report, and that P99 in ms."""
    stages = snapshot["stages"]
    if not stages:
        return None
    name = max(stages, key=lambda s: stages[s]["compute_ms"]["p99"])
    return name, stages[name]["compute_ms"]["p99"]


def count_lost(seqs: Sequence[int] | np.ndarray) -> int:
    """Frames missing from the sequence numbers seen, which a run numbers 0, 1, 2, ... (so frames
    missing before the first one seen count too); order and repeats do not matter."""
    unique = np.unique(np.asarray(seqs, dtype=np.int64))
    return int(unique[-1] + 1 - unique.size) if unique.size else 0
