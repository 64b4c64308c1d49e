"""Synthetic runs and checkers for the observer tests: frame records, ticks and a report with exactly
the keys of observe.report's Report and Snapshot (the numbers computed here, independently of
report.py), a trace checker and a /metrics parser.
"""

from __future__ import annotations

import itertools

import numpy as np

from rtpipe.pipeline.observe.observer import RunInfo
from rtpipe.shm.frame import FRAME_RECORD_DTYPE
from rtpipe.stages.base import FRAME_MS, FRAME_NS

STAGES = ["mic", "encode", "lm", "decode", "speaker"]
KINDS = {
    "mic": "capture.tone",
    "encode": "mimi.encode",
    "lm": "moshi.step",
    "decode": "mimi.decode",
    "speaker": "playback.null",
}
EDGES = ["mic->encode", "encode->lm", "lm->decode", "decode->speaker"]
COMPUTE_MEAN_MS = {"mic": 0.3, "encode": 20.0, "lm": 60.0, "decode": 15.0, "speaker": 0.5}


def run_info(
    t0_ns: int = 10_000_000_000, pids: dict | None = None, live_source: bool = False, sessions: int = 1
) -> RunInfo:
    return RunInfo(
        run_id="synthetic1",
        stages=list(STAGES),
        kinds=dict(KINDS),
        edges=list(EDGES),
        pids=pids if pids is not None else {name: 40_000 + i for i, name in enumerate(STAGES)},
        frame_ms=FRAME_MS,
        t0_ns=t0_ns,
        slots={edge: 8 for edge in EDGES},
        live_source=live_source,
        sessions=sessions,
    )


def records(
    n_frames: int, *, t0_ns: int = 10_000_000_000, seed: int = 0, skip_seqs=(), live=lambda seq: 1
) -> np.ndarray:
    """Frame records of a 5-stage chain; the lm stage sometimes overruns the frame (deadline misses).
    `live(seq)`: the frame's live session bits (slot 0 alone unless told)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n_frames, dtype=FRAME_RECORD_DTYPE)
    busy_until = np.zeros(len(STAGES), dtype=np.int64)
    for k in range(n_frames):
        seq = k + sum(1 for s in skip_seqs if s <= k)
        capture = t0_ns + seq * FRAME_NS
        out[k]["seq"] = seq
        out[k]["live"] = live(seq)
        out[k]["capture_ns"] = capture
        t = capture
        for i, name in enumerate(STAGES):
            if i == 0:
                enter = capture  # the source's enter is the capture of its first sample
                leave = capture + FRAME_NS + int(rng.uniform(0.1, 1.0) * 1e6)
            else:
                enter = max(t + int(rng.uniform(0.05, 2.0) * 1e6), int(busy_until[i]))
                leave = enter + int(rng.gamma(4.0, COMPUTE_MEAN_MS[name] / 4.0) * 1e6)
            out[k]["enter_ns"][i] = enter
            out[k]["exit_ns"][i] = leave
            busy_until[i] = leave
            t = leave
        out[k]["handoff_ns"] = t + int(rng.uniform(30, 50) * 1e6)
    return out


def _summary(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "max": round(float(v.max()), 3),
        "mean": round(float(v.mean()), 3),
    }


def counters(step: int = 1) -> dict:
    """Cumulative counters that grow with `step` (ticks), as the supervisor would count them."""
    return {
        "restarts": {"lm": 1 if step >= 2 else 0},
        "edges": {
            "mic->encode": {"dropped_oldest": 2 * step, "dropped_newest": 0, "blocked": 0},
            "encode->lm": {"dropped_oldest": 0, "dropped_newest": step, "blocked": 3 * step},
        },
        "underruns": step,
        "overflows": 1 if step >= 3 else 0,
        "device_underflows": 4 * step,
        "trims": 5 * step,
        "trimmed_ms": 12.5 * step,
        "target_ms": 100.0 + step,
        "frames_lost": 2 * step + step,
    }


def report(recs: np.ndarray, info: dict, *, step: int = 3, fill: bool = False, text=()) -> dict:
    """A report (or, with fill=True, a snapshot) of `recs`, keys exactly as in Report (Snapshot)."""
    count = counters(step)
    t0_ns, frame_ms = info["t0_ns"], info["frame_ms"]
    enter = recs["enter_ns"].astype(np.int64)
    leave = recs["exit_ns"].astype(np.int64)
    stage_ms = {name: (leave[:, i] - enter[:, i]) / 1e6 for i, name in enumerate(STAGES)}
    # the source's parts: a live one's total is its frame, then device input (its work is not stamped
    # apart); any other's total is its own work
    capture_total_ms = (leave[:, 0] - recs["capture_ns"]) / 1e6
    live = bool(info.get("live_source", False))
    algorithmic_ms = frame_ms if live else 0.0
    device_ms = np.maximum(capture_total_ms - frame_ms, 0.0) if live else np.zeros(recs.size)
    stage_ms[STAGES[0]] = np.zeros(recs.size) if live else capture_total_ms
    wait_ms = {edge: (enter[:, i + 1] - leave[:, i]) / 1e6 for i, edge in enumerate(EDGES)}
    e2e_ms = (recs["handoff_ns"] - recs["capture_ns"]) / 1e6
    stages = {}
    for name in STAGES:
        compute = stage_ms[name]
        stages[name] = {
            "compute_ms": _summary(compute),
            "rtf": round(float(compute.mean()) / frame_ms, 4),
            "deadline_misses": int(np.count_nonzero(compute > frame_ms)),
            "restarts": int(count["restarts"].get(name, 0)),
        }
    edges = {}
    for i, edge in enumerate(EDGES):
        c = count["edges"].get(edge, {})
        edges[edge] = {
            "wait_ms": _summary(wait_ms[edge]),
            "dropped_oldest": c.get("dropped_oldest", 0),
            "dropped_newest": c.get("dropped_newest", 0),
            "blocked": c.get("blocked", 0),
        }
        if fill:
            edges[edge]["fill"] = (i + step) % 9
    out = {
        "frames": int(recs.size),
        "seconds": round(recs.size * frame_ms / 1000, 3),
        "frame_ms": frame_ms,
        "end_to_end_ms": _summary(e2e_ms),
        "stages": stages,
        "capture": {
            "live_source": live,
            "algorithmic_ms": algorithmic_ms,
            "device_ms": _summary(device_ms),
            "work_ms": _summary(stage_ms[STAGES[0]]),
            "total_ms": _summary(capture_total_ms),
        },
        "edges": edges,
        "playback": {
            "underruns": count["underruns"],
            "overflows": count["overflows"],
            "device_underflows": count["device_underflows"],
            "trims": count["trims"],
            "trimmed_ms": count["trimmed_ms"],
            "target_ms": count["target_ms"],
        },
        "frames_lost": count["frames_lost"],
        "sessions": _sessions(recs, e2e_ms),
    }
    if fill:
        out["text"] = list(text)
        out["text_tokens"] = []
        latest = recs[int(np.argmax(recs["seq"]))] if recs.size else None
        out["live_sessions"] = 0 if latest is None else bin(int(latest["live"])).count("1")
        out["network"] = {}
        return out
    r3 = lambda a: [round(float(x), 3) for x in a]  # noqa: E731
    out["samples"] = {
        "seq": [int(s) for s in recs["seq"]],
        "t_s": r3((recs["capture_ns"] - t0_ns) / 1e9),
        "end_to_end_ms": r3(e2e_ms),
        "capture_ms": r3((leave[:, 0] - recs["capture_ns"]) / 1e6),
        "stage_ms": {k: r3(v) for k, v in stage_ms.items()},
        "wait_ms": {k: r3(v) for k, v in wait_ms.items()},
        "playback_ms": r3((recs["handoff_ns"] - enter[:, len(STAGES) - 1]) / 1e6),
    }
    out["text"] = list(text)
    out["text_tokens"] = []
    out["delay_frames"] = 0
    out["config"] = {}
    out["device_latency_ms"] = None
    return out


def _sessions(recs: np.ndarray, e2e_ms: np.ndarray) -> dict:
    """Per slot, frame by frame: the frames whose live bit it has, their end to end, sequence gaps."""
    sessions = {}
    for k in range(64):
        mine = [i for i in range(recs.size) if int(recs[i]["live"]) >> k & 1]
        if not mine:
            continue
        seqs = sorted(int(recs[i]["seq"]) for i in mine)
        sessions[str(k)] = {
            "frames": len(mine),
            "end_to_end_ms": _summary(e2e_ms[mine]),
            "frames_lost": sum(b - a - 1 for a, b in itertools.pairwise(seqs)),
            "text": [],
            "text_tokens": [],
        }
    return sessions


def check_trace(events) -> dict:
    """Check a Chrome/Perfetto trace the way the viewers read it; returns counts of what it holds.

    Every event has ph/pid/tid; every slice ("X") has numeric ts and dur >= 0 and a process named by
    metadata; slices on one thread nest or follow each other; every flow start ("s") has exactly one finish
    ("f") with the same id, bound inside a slice, on another process, no earlier than its start.
    """
    if isinstance(events, dict):
        events = events["traceEvents"]
    assert isinstance(events, list) and events, "a trace is a non-empty list of events"
    named_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    slices: dict[tuple, list] = {}
    flows: dict[tuple, dict] = {}
    counters = 0
    for event in events:
        for key in ("ph", "pid", "tid", "name"):
            assert key in event, f"event without {key}: {event}"
        ph = event["ph"]
        assert ph in ("X", "M", "C", "s", "f"), f"unexpected phase {ph}"
        if ph == "X":
            assert isinstance(event["ts"], (int, float)) and isinstance(event["dur"], (int, float))
            assert event["dur"] >= 0, event
            assert event["pid"] in named_pids, f"slice on an unnamed process {event['pid']}"
            slices.setdefault((event["pid"], event["tid"]), []).append((event["ts"], event["ts"] + event["dur"]))
        elif ph == "C":
            assert isinstance(event["ts"], (int, float))
            assert event["args"] and all(isinstance(v, (int, float)) for v in event["args"].values())
            counters += 1
        elif ph in ("s", "f"):
            key = (event.get("cat"), event["name"], event["id"])
            assert ph not in flows.setdefault(key, {}), f"two flow {ph} events for {key}"
            flows[key][ph] = event
    for track, spans in slices.items():
        spans.sort(key=lambda span: (span[0], -span[1]))  # on one start the longer slice encloses the rest
        stack: list[float] = []
        for start, end in spans:
            # timestamps are microseconds with 3 decimals: viewers round them to whole nanoseconds
            while stack and stack[-1] <= start + 1e-3:
                stack.pop()
            assert not stack or end <= stack[-1] + 1e-3, f"slices overlap without nesting on {track}"
            stack.append(end)
    for key, pair in flows.items():
        assert set(pair) == {"s", "f"}, f"flow {key} does not pair up: {sorted(pair)}"
        start, finish = pair["s"], pair["f"]
        assert start["ts"] <= finish["ts"], f"flow {key} goes back in time"
        assert (start["pid"], start["tid"]) != (finish["pid"], finish["tid"])
        for end in (start, finish):
            spans = slices.get((end["pid"], end["tid"]), [])
            assert any(a <= end["ts"] <= b for a, b in spans), f"flow {key} is bound to no slice"
    return {
        "slices": sum(len(v) for v in slices.values()),
        "flows": len(flows),
        "counters": counters,
        "tracks": len(slices),
        "processes": len(named_pids),
    }


def parse_metrics(text: str) -> dict:
    """Prometheus text exposition -> {(name, frozenset(labels.items())): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def counters_from_report(report: dict) -> dict:
    """The counter samples /metrics must show for `report`, keyed as parse_metrics keys them."""
    expected = {}
    for stage, row in report["stages"].items():
        expected[("rtpipe_deadline_misses_total", frozenset({"stage": stage}.items()))] = row["deadline_misses"]
        expected[("rtpipe_restarts_total", frozenset({"stage": stage}.items()))] = row["restarts"]
    for edge, row in report["edges"].items():
        for key, policy in (("dropped_oldest", "drop-oldest"), ("dropped_newest", "drop-newest")):
            expected[("rtpipe_dropped_frames_total", frozenset({"edge": edge, "policy": policy}.items()))] = row[key]
        expected[("rtpipe_blocked_total", frozenset({"edge": edge}.items()))] = row["blocked"]
    expected[("rtpipe_playback_underruns_total", frozenset())] = report["playback"]["underruns"]
    expected[("rtpipe_playback_overflows_total", frozenset())] = report["playback"]["overflows"]
    expected[("rtpipe_playback_device_underflows_total", frozenset())] = report["playback"]["device_underflows"]
    expected[("rtpipe_playback_trims_total", frozenset())] = report["playback"]["trims"]
    expected[("rtpipe_playback_trimmed_seconds_total", frozenset())] = report["playback"]["trimmed_ms"] / 1000.0
    expected[("rtpipe_frames_lost_total", frozenset())] = report["frames_lost"]
    expected[("rtpipe_frames_total", frozenset())] = report["frames"]
    return expected


def check_latency_png(png_path, report):
    """The PNG opens; the figure drawn from `report` has the three panels and the frame's line."""
    import matplotlib.image

    image = matplotlib.image.imread(str(png_path))
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 400
    from rtpipe.pipeline.observe.plot import TITLE_BUDGET, TITLE_COMPUTE, TITLE_END_TO_END, plot_report

    fig = plot_report(report)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == TITLE_END_TO_END and titles[1].startswith(TITLE_COMPUTE) and titles[2] == TITLE_BUDGET
    assert fig.axes[0].get_xlabel() == "time since start (s)"
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == list(report["samples"]["stage_ms"])
    frame_lines = [line for line in fig.axes[0].get_lines() if list(line.get_ydata()) == [FRAME_MS, FRAME_MS]]
    assert frame_lines, "no frame line on the end-to-end panel"
    return fig
