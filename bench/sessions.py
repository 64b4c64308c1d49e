"""`rtpipe bench sessions`: how many conversations this machine carries in real time, two ways, in the
same invocation: (a) "batched", ONE pipeline whose every 80 ms frame carries N sessions (`sessions = N`),
and (b) "separate", N single-session pipelines running at once, a process tree per conversation as
LiveKit runs one agent per room. Both use the default stages (Mimi encode -> Moshi step, tiny ->
Mimi decode; random weights unless --set gives some), the built-in speech sample looped for --seconds
and paced at real time (capture.file), and discard the output (playback.null). N goes 1, 2, 4, 8, 12, 16,
then up by 8, to --max; each mode stops at the first N that does not hold.

A configuration HOLDS real time when, over its frames captured after its first second (WARMUP_S; first
calls and page faults are not judged), all of:
  1. every stage's P99 compute per tick (one frame: N sessions batched, one session separate) < 80 ms;
  2. at most 0.5 % of frames miss a deadline (a frame misses when any stage took over 80 ms on it);
  3. end to end does not grow: the median end to end of the last third of those frames minus that of
     the first third is under one frame (80 ms), in every pipeline;
and it ran cleanly: no stage failed or restarted, no frame was lost, and it finished its audio within
twice --seconds + 10 s of its start (CAP_FACTOR, CAP_EXTRA_S). The first edge blocks (as `rtpipe run --input`):
a pipeline that cannot keep up holds its source back, which shows as growing end to end, not as drops.
"Stage" in 1 and 2 means every stage after the source: the source's own time is how late it published
a frame that was due, which under `block` is its wait for room in the first ring (rule 3 judges that);
it is reported as source_ms.

The separate pipelines load their models together, then all start once every one is up (a barrier),
their sources a fraction of a frame apart (pipeline k at k/N of 80 ms), as independent calls would be.
A session's cost = the stages' mean compute per tick x pipelines / sessions (ms per 80 ms of one
conversation); CPU % = every process of the configuration, supervisors included, % of one core.
A benchmark, not a test: it prints whether this machine meets the issue's targets, and never fails on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from rtpipe.bench.arguments import one_line_errors
from rtpipe.bench.pipeline import CpuSampler, StolenTime, machine_line
from rtpipe.pipeline.cli.arguments import add_overrides_argument, check_range
from rtpipe.pipeline.observe.observer import Observer, RunInfo
from rtpipe.pipeline.observe.report import Percentiles, Report, Snapshot, summarize_ms
from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.shm.frame import MAX_SESSIONS
from rtpipe.stages.base import FRAME_MS
from rtpipe.stages.errors import ConfigError

PROG = "rtpipe bench sessions"
MODES = ("batched", "separate")
DEFAULT_MAX = 16
# per configuration: after the 1 s warm-up about 210 frames, the fewest in which the 0.5 % rule lets one
# late frame pass (at 10 s a single one fails it); about 10 configurations with loading stay near 5 minutes
DEFAULT_SECONDS = 18.0
MIN_SECONDS = 3.0  # a second of warm-up, then thirds of at least 8 frames each
MAX_SECONDS = 600.0
FIRST_STEPS = (1, 2, 4, 8, 12, 16)  # then +8
STEP_AFTER = 8
WARMUP_S = 1.0  # frames captured in the first second of a pipeline are not judged
P99_LIMIT_MS = FRAME_MS
MISS_LIMIT_PCT = 0.5
GROWTH_LIMIT_MS = FRAME_MS
CAP_FACTOR = 2.0  # a configuration that needs more than twice its audio's length is cut short
CAP_EXTRA_S = 10.0
BARRIER_TIMEOUT_S = 180.0  # how long separate pipelines wait for each other's models to load
# the stand-ins (--standins): raw samples instead of Mimi codes on either side, the user's codes back
STANDIN_OVERRIDES = ("stages.encode.kind=codec.pcm", "stages.lm.kind=echo", "stages.decode.kind=codec.pcm")
# the targets on the 2-core machine
TARGET_BATCHED_SESSIONS = 8
TARGET_RATIO_TO_SEPARATE = 2.0
TARGET_COST_RATIO = 0.4
COST_AT = 8  # a session's cost at this N is compared with its cost at N = 1


class StageCompute(TypedDict):
    """One stage's compute per tick over the judged frames (ms), and the frames it took over 80 ms."""

    p50: float
    p99: float
    max: float
    mean: float
    deadline_misses: int
    per_session_ms: float  # mean x pipelines / sessions: what one conversation costs it per frame


class SessionRow(TypedDict):
    """One conversation: the frames that reached the sink for it, their end to end, and losses."""

    frames: int
    end_to_end_ms: Percentiles
    frames_lost: int


class Configuration(TypedDict):
    """One N of one mode. The measurements are None (stages {}) where the configuration did not run
    (its config was refused: `error` says why)."""

    sessions: int
    pipelines: int
    holds: bool
    why_not: list[str]  # empty when it holds
    error: str | None
    stages: dict[str, StageCompute]  # every stage after the source, in chain order
    source_ms: Percentiles | None  # the source's time per frame: its read and publish, waits included
    frames: int  # ticks that reached the sink, all pipelines together
    frames_judged: int  # of those, after the warm-up
    deadline_misses: int  # judged frames on which some stage took over 80 ms
    miss_pct: float | None
    end_to_end_ms: Percentiles | None  # judged frames, all pipelines
    e2e_growth_ms: float | None  # the worst pipeline's last-third minus first-third median
    frames_lost: int
    restarts: int
    cut_short: bool
    started_together: bool
    per_session: dict[str, SessionRow]  # by session ("0", "1", ...)
    compute_ms_per_session: float | None  # all stages' per_session_ms summed
    cpu_pct: float | None  # all processes, % of one core
    cpu_pct_per_session: float | None
    steal_pct: float | None
    load_average: float
    wall_s: float


class Mode(TypedDict):
    max_realtime_sessions: int
    by_sessions: dict[str, Configuration]


# --- the rule: pure arithmetic over reports (tests call these on synthetic data) ------------------


def session_counts(max_sessions: int) -> list[int]:
    """The N to try, ascending: 1, 2, 4, 8, 12, 16, then +8, up to `max_sessions` (itself included)."""
    counts = [n for n in FIRST_STEPS if n <= max_sessions]
    while counts[-1] + STEP_AFTER <= max_sessions and counts[-1] >= FIRST_STEPS[-1]:
        counts.append(counts[-1] + STEP_AFTER)
    if counts[-1] != max_sessions:
        counts.append(max_sessions)
    return counts


def e2e_growth_ms(end_to_end_ms: Sequence[float] | np.ndarray) -> float | None:
    """Median end to end of the last third of the frames minus that of the first third (ms), 3
    decimals; None with fewer than 3 frames."""
    values = np.asarray(end_to_end_ms, dtype=np.float64)
    third = values.size // 3
    if third == 0:
        return None
    return round(float(np.median(values[-third:]) - np.median(values[:third])), 3)


def judged(report: Report, warmup_s: float = WARMUP_S) -> np.ndarray:
    """Indexes of the report's frames captured at least `warmup_s` after its first frame."""
    t_s = np.asarray(report["samples"]["t_s"], dtype=np.float64)
    if t_s.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(t_s >= t_s[0] + warmup_s)


def reasons_not_holding(entry: Configuration) -> list[str]:
    """Why a measured configuration does not hold real time (the module docstring's rule); [] = it holds."""
    if entry["error"]:
        return [entry["error"]]
    why = []
    if entry["frames_judged"] == 0:
        why.append(f"no frame reached the sink after the {WARMUP_S:g} s warm-up")
    slow = {name: s["p99"] for name, s in entry["stages"].items() if not s["p99"] < P99_LIMIT_MS}
    if slow:
        why.append(
            "P99 compute over one frame: "
            + ", ".join(f"{name} {p99:.1f} ms" for name, p99 in slow.items())
            + f" (limit {P99_LIMIT_MS:g} ms)"
        )
    if entry["miss_pct"] is not None and entry["miss_pct"] > MISS_LIMIT_PCT:
        why.append(
            f"{entry['deadline_misses']} of {entry['frames_judged']} frames ({entry['miss_pct']:.2f} %) missed "
            f"a deadline (limit {MISS_LIMIT_PCT:g} %)"
        )
    growth = entry["e2e_growth_ms"]
    if growth is None:
        if entry["frames_judged"]:
            why.append("too few frames to tell whether end to end grows")
    elif not growth < GROWTH_LIMIT_MS:
        why.append(f"end to end grew {growth:.1f} ms from the first third to the last (limit {GROWTH_LIMIT_MS:g} ms)")
    if entry["restarts"]:
        why.append(f"{entry['restarts']} stage restart(s)")
    if entry["frames_lost"]:
        why.append(f"{entry['frames_lost']} frame(s) lost")
    if entry["cut_short"]:
        why.append(f"did not finish its audio within {CAP_FACTOR:g}x its length + {CAP_EXTRA_S:g} s: cut short")
    return why


def summarize(
    sessions: int,
    reports: list[Report],
    errors: list[str],
    cpu_pct: float | None,
    started_together: bool = True,
    pipelines: int | None = None,
) -> Configuration:
    """One configuration's entry from its pipelines' reports (one batched, or N separate), pooled.
    `pipelines`: how many were started (default: one per report; a failed one may leave no report)."""
    pipelines = len(reports) if pipelines is None else pipelines
    entry = not_run(sessions, pipelines, "; ".join(errors) if errors else None)
    entry["started_together"] = started_together
    source, *names = list(reports[0]["stages"]) if reports else [""]
    source_ms: list[np.ndarray] = []
    stage_ms: dict[str, list[np.ndarray]] = {name: [] for name in names}
    e2e: list[np.ndarray] = []
    growths: list[float] = []
    misses = judged_frames = 0
    for report in reports:
        samples = report["samples"]
        keep = judged(report)
        per_stage = [np.asarray(samples["stage_ms"][name], dtype=np.float64)[keep] for name in names]
        source_ms.append(np.asarray(samples["stage_ms"][source], dtype=np.float64)[keep])
        for name, values in zip(names, per_stage):
            stage_ms[name].append(values)
        if per_stage:
            misses += int(np.any(np.stack(per_stage) > FRAME_MS, axis=0).sum())
        judged_frames += int(keep.size)
        frame_e2e = np.asarray(samples["end_to_end_ms"], dtype=np.float64)[keep]
        e2e.append(frame_e2e)
        growth = e2e_growth_ms(frame_e2e)
        if growth is not None:
            growths.append(growth)
        entry["frames"] += int(report["frames"])
        entry["frames_lost"] += int(report["frames_lost"])
        entry["restarts"] += sum(int(row["restarts"]) for row in report["stages"].values())
    share = pipelines / sessions  # pipelines per session: 1/N batched, 1 separate
    for name in names:
        values = np.concatenate(stage_ms[name]) if stage_ms[name] else np.zeros(0)
        if values.size == 0:
            continue  # no frame judged: nothing to say about the stage
        summary = summarize_ms(values)
        entry["stages"][name] = StageCompute(
            p50=summary["p50"],
            p99=summary["p99"],
            max=summary["max"],
            mean=summary["mean"],
            deadline_misses=int((values > FRAME_MS).sum()),
            per_session_ms=round(summary["mean"] * share, 3),
        )
    entry["frames_judged"] = judged_frames
    entry["deadline_misses"] = misses
    if judged_frames:
        entry["miss_pct"] = round(100.0 * misses / judged_frames, 3)
        entry["end_to_end_ms"] = summarize_ms(np.concatenate(e2e))
        entry["source_ms"] = summarize_ms(np.concatenate(source_ms))
        entry["compute_ms_per_session"] = round(sum(s["per_session_ms"] for s in entry["stages"].values()), 3)
    entry["e2e_growth_ms"] = max(growths) if len(growths) == len(reports) and growths else None
    entry["per_session"] = _per_session(reports)
    if cpu_pct is not None:
        entry["cpu_pct"] = round(cpu_pct, 2)
        entry["cpu_pct_per_session"] = round(cpu_pct / sessions, 2)
    entry["why_not"] = reasons_not_holding(entry)
    entry["holds"] = not entry["why_not"]
    return entry


def _per_session(reports: list[Report]) -> dict[str, SessionRow]:
    """Each conversation's row: a batched report's slots as they are, separate reports' one slot each."""
    if len(reports) == 1:
        rows = reports[0].get("sessions", {})
        return {
            k: SessionRow(frames=r["frames"], end_to_end_ms=r["end_to_end_ms"], frames_lost=r["frames_lost"])
            for k, r in rows.items()
        }
    out = {}
    for k, report in enumerate(reports):
        row = report.get("sessions", {}).get("0")
        if row is not None:
            out[str(k)] = SessionRow(
                frames=row["frames"], end_to_end_ms=row["end_to_end_ms"], frames_lost=row["frames_lost"]
            )
    return out


def not_run(sessions: int, pipelines: int, error: str | None) -> Configuration:
    """An entry with nothing measured yet (and, with `error`, why nothing will be)."""
    return Configuration(
        sessions=sessions,
        pipelines=pipelines,
        holds=False,
        why_not=[error] if error else [],
        error=error,
        stages={},
        source_ms=None,
        frames=0,
        frames_judged=0,
        deadline_misses=0,
        miss_pct=None,
        end_to_end_ms=None,
        e2e_growth_ms=None,
        frames_lost=0,
        restarts=0,
        cut_short=False,
        started_together=True,
        per_session={},
        compute_ms_per_session=None,
        cpu_pct=None,
        cpu_pct_per_session=None,
        steal_pct=None,
        load_average=round(os.getloadavg()[0], 2),
        wall_s=0.0,
    )


def max_realtime_sessions(by_sessions: dict[str, Configuration]) -> int:
    """The largest N that held, counting up from the smallest tried, before the first that did not."""
    best = 0
    for key in sorted(by_sessions, key=int):
        if not by_sessions[key]["holds"]:
            break
        best = int(key)
    return best


def cost_ratio(mode: Mode, at: int = COST_AT, cost: str = "compute_ms_per_session") -> float | None:
    """A session's cost at N = `at` over its cost at N = 1; None unless both ran. `cost`: the entry's
    compute_ms_per_session (the target's measure), or cpu_pct_per_session, which a machine whose
    cores are taken by other work inflates less (compute is wall time, waits for a core included)."""
    rows = mode["by_sessions"]
    one, many = rows.get("1"), rows.get(str(at))
    base = one.get(cost) if one else None
    value = many.get(cost) if many else None
    if not isinstance(base, (int, float)) or not base or not isinstance(value, (int, float)):
        return None
    return round(value / base, 3)


def target_results(batched: Mode, separate: Mode) -> dict[str, dict[str, Any]]:
    """The issue's three targets, each {"want", "value", "met"} (None never meets one)."""
    held, held_apart = batched["max_realtime_sessions"], separate["max_realtime_sessions"]
    ratio = cost_ratio(batched)
    return {
        "batched_sessions": {
            "want": f"at least {TARGET_BATCHED_SESSIONS}",
            "value": held,
            "met": held >= TARGET_BATCHED_SESSIONS,
        },
        "batched_over_separate": {
            "want": f"at least {TARGET_RATIO_TO_SEPARATE:g}x",
            "value": round(held / held_apart, 3) if held_apart else None,
            "met": held > 0 and held >= TARGET_RATIO_TO_SEPARATE * held_apart,
        },
        "cost_ratio_8_vs_1": {
            "want": f"at most {TARGET_COST_RATIO:g}",
            "value": ratio,
            "met": ratio is not None and ratio <= TARGET_COST_RATIO,
        },
    }


# --- configs --------------------------------------------------------------------------------------


def bench_config(sessions: int, seconds: float, overrides: Sequence[str]) -> dict:
    """The default pipeline's raw config for `sessions` conversations: the built-in speech, looped for
    `seconds` and paced, into playback.null; the first edge blocks; then `overrides` (--set)."""
    raw = pipeline_config.load_raw(None)
    raw["sessions"] = sessions
    stages = raw["stages"]
    names = list(stages)
    source, sink = names[0], names[-1]
    stages[source] = {
        **stages[source],
        "kind": "capture.file",
        "params": {"path": "", "loop": True, "seconds": seconds, "pace": True},
    }
    stages[sink] = {**stages[sink], "kind": "playback.null", "params": {}}
    for label, edge in raw.get("edges", {}).items():
        if label.partition("->")[0].strip() == source and isinstance(edge, dict):
            edge["policy"] = "block"  # falling behind shows as growing end to end, nothing is dropped
    return pipeline_config.apply_overrides(raw, list(overrides))


def held_back(raw: dict) -> dict:
    """`raw` for one of the separate pipelines, whose supervisor waits in the start barrier for up to
    BARRIER_TIMEOUT_S without pinging: its stages must not take that silence for a dead supervisor
    (they give up after heartbeat x liveness x 2), nor their supervisor take N pipelines' loading on
    shared cores for a stage that cannot open (start_timeout_s: 120 s was too little for 8 here)."""
    raw = copy.deepcopy(raw)
    table = raw.setdefault("supervisor", {})
    heartbeat_ms = int(table.get("heartbeat_ms", 1000))
    needed = math.ceil(BARRIER_TIMEOUT_S * 1000 / (2 * heartbeat_ms)) + 1
    table["liveness"] = max(int(table.get("liveness", 3)), needed)
    # N pipelines load their models at once on the same cores: give them the barrier's time to open
    table["start_timeout_s"] = max(float(table.get("start_timeout_s", 0)), BARRIER_TIMEOUT_S)
    return raw


# --- running one configuration --------------------------------------------------------------------


class StartAndWatch(Observer):
    """Holds the source back until every pipeline of the configuration is up (`barrier`, across
    processes; None: start at once), then `offset_s` more; from there measures the CPU of the stages
    and of this process (the supervisor), and stops the run once it has taken `cap_s`."""

    def __init__(self, cap_s: float, barrier: Any = None, offset_s: float = 0.0):
        self.cap_s = cap_s
        self.barrier = barrier
        self.offset_s = offset_s
        self.started_together = True
        self.cut_short = False
        self.sampler: CpuSampler | None = None
        self.stolen: StolenTime | None = None
        self.started = 0.0
        self.request_stop = lambda reason: None

    def on_start(self, run_info: RunInfo) -> None:
        if self.barrier is not None:
            try:
                self.barrier.wait(BARRIER_TIMEOUT_S)
            except threading.BrokenBarrierError:  # another pipeline failed or is too slow: go anyway
                self.started_together = False
        time.sleep(self.offset_s)
        self.sampler = CpuSampler([*run_info["pids"].values(), os.getpid()])
        self.stolen = StolenTime()
        self.started = time.monotonic()

    def on_tick(self, snapshot: Snapshot) -> None:
        if self.sampler is not None:
            self.sampler.sample()
        if self.started and time.monotonic() - self.started > self.cap_s and not self.cut_short:
            self.cut_short = True
            self.request_stop(f"{self.cap_s:g} s cap")

    def cpu_pct(self) -> float | None:
        return self.sampler.percent() if self.sampler is not None else None


def cap_seconds(seconds: float) -> float:
    return CAP_FACTOR * seconds + CAP_EXTRA_S


def run_pipeline(raw: dict, seconds: float, barrier: Any = None, offset_s: float = 0.0) -> dict[str, Any]:
    """Runs one pipeline to its end here; {"report", "error", "cpu_pct", "steal_pct", "cut_short",
    "started_together"}. ConfigError when `raw` is refused."""
    from rtpipe.pipeline.runtime.supervisor import Supervisor

    cfg = pipeline_config.validate(raw)
    watch = StartAndWatch(cap_seconds(seconds), barrier, offset_s)
    supervisor = Supervisor(cfg, observer_factory=lambda run_info: [watch], handle_signals=barrier is not None)
    watch.request_stop = supervisor.request_stop
    result = supervisor.run()
    return {
        "report": result.report,
        "error": result.error,
        "cpu_pct": watch.cpu_pct(),
        "steal_pct": watch.stolen.percent() if watch.stolen is not None else None,
        "cut_short": watch.cut_short,
        "started_together": watch.started_together,
    }


def _separate_child(raw_json: str, seconds: float, barrier: Any, offset_s: float, out_path: str) -> None:
    """Child process: one of the separate pipelines; its outcome as JSON in `out_path`."""
    try:
        outcome = run_pipeline(json.loads(raw_json), seconds, barrier, offset_s)
    except Exception as e:  # a config refused here was accepted in the parent: say so, do not hang the rest
        outcome = {"report": None, "error": f"{type(e).__name__}: {e}"}
    if outcome.get("error") or outcome.get("report") is None:
        barrier.abort()  # the others must not wait for a pipeline that never starts
    Path(out_path).write_text(json.dumps(outcome), encoding="utf-8")


def measure_batched(sessions: int, seconds: float, overrides: Sequence[str]) -> Configuration:
    """One pipeline carrying `sessions` conversations."""
    started = time.monotonic()
    try:
        raw = bench_config(sessions, seconds, overrides)
        outcome = run_pipeline(raw, seconds)
    except ConfigError as e:
        return not_run(sessions, 1, f"refused: {e}")
    errors = [f"the run failed: {outcome['error']}"] if outcome["error"] else []
    entry = summarize(sessions, [outcome["report"]], errors, outcome["cpu_pct"])
    entry["steal_pct"] = outcome["steal_pct"]
    entry["cut_short"] = outcome["cut_short"]
    entry["wall_s"] = round(time.monotonic() - started, 1)
    entry["why_not"] = reasons_not_holding(entry)
    entry["holds"] = not entry["why_not"]
    return entry


def measure_separate(sessions: int, seconds: float, overrides: Sequence[str]) -> Configuration:
    """`sessions` single-session pipelines at once, each run by its own process (its supervisor)."""
    started = time.monotonic()
    try:
        raw = held_back(bench_config(1, seconds, overrides))
        pipeline_config.validate(raw)
    except ConfigError as e:
        return not_run(sessions, sessions, f"refused: {e}")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(sessions)
    join_s = BARRIER_TIMEOUT_S + cap_seconds(seconds) + 60.0
    with tempfile.TemporaryDirectory(prefix="rtpipe-bench-sessions-") as folder:
        paths = [os.path.join(folder, f"pipeline-{k}.json") for k in range(sessions)]
        children = [
            ctx.Process(
                target=_separate_child,
                args=(json.dumps(raw), seconds, barrier, k * FRAME_MS / 1000.0 / sessions, paths[k]),
                name=f"session-{k}",
            )
            for k in range(sessions)
        ]
        try:
            for child in children:
                child.start()
            deadline = time.monotonic() + join_s
            for child in children:
                child.join(max(0.0, deadline - time.monotonic()))
        finally:
            for child in children:
                if child.is_alive():  # SIGTERM: its supervisor stops its stages and cleans up
                    child.terminate()
                    child.join(30.0)
                if child.is_alive():
                    child.kill()
                    child.join()
        outcomes = [json.loads(Path(p).read_text(encoding="utf-8")) if os.path.exists(p) else None for p in paths]
    errors = []
    reports: list[Report] = []
    for k, outcome in enumerate(outcomes):
        if outcome is None:
            errors.append(f"pipeline {k} ended without a result (exit code {children[k].exitcode})")
            continue
        if outcome.get("error"):
            errors.append(f"pipeline {k} failed: {outcome['error']}")
        if outcome.get("report") is not None:
            reports.append(outcome["report"])
    cpus = [o["cpu_pct"] for o in outcomes if o and o.get("cpu_pct") is not None]
    steals = [o["steal_pct"] for o in outcomes if o and o.get("steal_pct") is not None]
    together = all(o is not None and o.get("started_together", False) for o in outcomes)
    entry = summarize(sessions, reports, errors, sum(cpus) if len(cpus) == sessions else None, together, sessions)
    entry["steal_pct"] = max(steals) if steals else None
    entry["cut_short"] = any(o is not None and o.get("cut_short") for o in outcomes)
    entry["wall_s"] = round(time.monotonic() - started, 1)
    entry["why_not"] = reasons_not_holding(entry)
    if not together and not errors:
        entry["why_not"].append(f"the pipelines did not all load within {BARRIER_TIMEOUT_S:g} s to start together")
    entry["holds"] = not entry["why_not"]
    return entry


MEASURE = {"batched": measure_batched, "separate": measure_separate}


def measure_mode(
    mode: str, counts: list[int], seconds: float, overrides: Sequence[str], keep_going: bool = False
) -> Mode:
    """Each N of `counts` in turn, stopping after the first that does not hold (unless `keep_going`:
    on a busy machine the cost per session is still worth seeing)."""
    by_sessions: dict[str, Configuration] = {}
    for n in counts:
        print(f"{PROG}: {mode}, {n} session(s), {seconds:g} s of speech ...", file=sys.stderr, flush=True)
        entry = MEASURE[mode](n, seconds, overrides)
        by_sessions[str(n)] = entry
        if not entry["holds"]:
            print(f"{PROG}: {mode}, {n} session(s) does not hold: {'; '.join(entry['why_not'])}", file=sys.stderr)
            if not keep_going:
                break
    return Mode(max_realtime_sessions=max_realtime_sessions(by_sessions), by_sessions=by_sessions)


# --- output ---------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    batched, separate = result["batched"], result["separate"]
    names: list[str] = []
    for mode in (batched, separate):
        for entry in mode["by_sessions"].values():
            names += [name for name in entry["stages"] if name not in names]
    lines = [
        f"{PROG}: {' -> '.join(result['kinds'])}, the built-in speech looped {result['seconds']:g} s per "
        f"configuration at the {FRAME_MS:g} ms pace; batched = one pipeline, N sessions a frame; separate = N "
        "one-session pipelines at once",
        f"machine: {result['machine']}; torch threads "
        + (", ".join(f"{name} {count}" for name, count in result["torch_threads"].items()) or "default"),
        f"holds = every stage's P99 < {P99_LIMIT_MS:g} ms, misses <= {MISS_LIMIT_PCT:g} %, end to end growth "
        f"(last third - first third, medians) < {GROWTH_LIMIT_MS:g} ms, after a {WARMUP_S:g} s warm-up",
        "stage cells: compute per tick P50/P99 ms; misses: frames a stage took over a frame on; e2e p99, growth: "
        "ms; cpu %: all its processes, % of one core; ms/sess: compute per frame per session, all stages; "
        "load: load average at its start",
        f"{'mode':<9} {'N':>3} {'holds':<5} "
        + " ".join(f"{name:>13}" for name in names)
        + f" {'misses':>7} {'e2e p99':>8} {'growth':>7} {'cpu %':>6} {'ms/sess':>8} {'cpu/sess':>8} {'load':>5}",
    ]
    notes = []
    for mode_name, mode in (("batched", batched), ("separate", separate)):
        for key, entry in mode["by_sessions"].items():
            cells = []
            for name in names:
                s = entry["stages"].get(name)
                cell = "-" if s is None else f"{s['p50']:.1f}/{s['p99']:.1f}"
                cells.append(f"{cell:>13}")
            e2e = entry["end_to_end_ms"]
            misses = "-" if entry["miss_pct"] is None else f"{entry['deadline_misses']}"
            lines.append(
                f"{mode_name:<9} {key:>3} {'yes' if entry['holds'] else 'NO':<5} "
                + " ".join(cells)
                + f" {misses:>7} {_num(e2e['p99'] if e2e else None):>8} {_num(entry['e2e_growth_ms']):>7}"
                f" {_num(entry['cpu_pct']):>6} {_num(entry['compute_ms_per_session'], 2):>8}"
                f" {_num(entry['cpu_pct_per_session']):>8} {_num(entry['load_average']):>5}"
            )
            if entry["why_not"]:
                notes.append(f"  {mode_name} N={key}: {'; '.join(entry['why_not'])}")
    lines.append(
        f"max sessions in real time: batched {batched['max_realtime_sessions']}, separate "
        f"{separate['max_realtime_sessions']}"
    )
    if notes:
        lines.append("does not hold:")
        lines += notes
    ratio = result["cost_ratio_8_vs_1"]
    lines.append(
        f"a session's cost (ms of compute per frame, all stages) batched at N = {COST_AT} / at N = 1: "
        + ("not measured (N = 8 was not run)" if ratio["batched"] is None else f"{ratio['batched']:.3f}")
        + ("" if ratio["separate"] is None else f"; separate: {ratio['separate']:.3f}")
        + ("" if ratio.get("batched_cpu") is None else f"; by CPU % per session, batched: {ratio['batched_cpu']:.3f}")
    )
    lines.append("targets (the issue's, for the 2-core machine):")
    labels = {
        "batched_sessions": "batched sessions in real time",
        "batched_over_separate": "batched / separate sessions",
        "cost_ratio_8_vs_1": f"session cost at N = {COST_AT} / N = 1",
    }
    for key, target in result["targets"].items():
        value = target["value"]
        shown = "n/a" if value is None else (f"{value:g}" if isinstance(value, (int, float)) else str(value))
        lines.append(f"  {labels[key]:<32} {target['want']:<12} {shown:>8}  {'met' if target['met'] else 'MISSED'}")
    return "\n".join(lines)


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: expected a whole number") from None

    return parse


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--seconds {text!r}: expected a number of seconds") from None


@one_line_errors(PROG)
def main(argv: list[str]) -> int:
    paragraphs = (__doc__ or "").split("\n\n")
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=paragraphs[0],
        epilog="\n\n".join(paragraphs[1:3]),  # the rule a configuration is judged by
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--max",
        type=_positive_int("--max"),
        default=DEFAULT_MAX,
        help=f"the most sessions to try (default {DEFAULT_MAX}; N goes 1, 2, 4, 8, 12, 16, then +8)",
    )
    parser.add_argument(
        "--seconds",
        type=_seconds,
        default=DEFAULT_SECONDS,
        help=f"speech per configuration (default {DEFAULT_SECONDS:g}; the first {WARMUP_S:g} s is not judged)",
    )
    add_overrides_argument(
        parser, "override a field of every configuration's config, e.g. --set stages.lm.params.size=tiny"
    )
    parser.add_argument(
        "--standins",
        action="store_true",
        help="codec.pcm and echo instead of Mimi and Moshi (the machinery alone, no models)",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="try every N up to --max, also past one that does not hold (the maximum still counts up to it)",
    )
    parser.add_argument("--json", action="store_true", help='print JSON: {"batched": {...}, "separate": {...}, ...}')
    args = parser.parse_args(argv)
    check_range("--max", args.max, 1, MAX_SESSIONS)
    check_range("--seconds", args.seconds, MIN_SECONDS, MAX_SECONDS)
    overrides = [*(STANDIN_OVERRIDES if args.standins else ()), *args.overrides]
    first = pipeline_config.validate(bench_config(1, args.seconds, overrides))  # a bad --set: one line, now
    counts = session_counts(args.max)
    batched, separate = (measure_mode(mode, counts, args.seconds, overrides, args.all) for mode in MODES)
    result: dict[str, Any] = {
        "batched": batched,
        "separate": separate,
        "targets": target_results(batched, separate),
        "cost_ratio_8_vs_1": {
            "batched": cost_ratio(batched),
            "separate": cost_ratio(separate),
            "batched_cpu": cost_ratio(batched, cost="cpu_pct_per_session"),
            "separate_cpu": cost_ratio(separate, cost="cpu_pct_per_session"),
        },
        "seconds": args.seconds,
        "warmup_s": WARMUP_S,
        "tried": counts,
        "past_failures": args.all,
        "kinds": [stage.kind for stage in first.stages],
        "torch_threads": {s.name: s.threads for s in first.stages if s.threads},
        "machine": machine_line(),
        "cores": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
