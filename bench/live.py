"""`rtpipe bench live`: the default pipeline (microphone -> Mimi encode -> Moshi step -> Mimi decode ->
speaker) live on PulseAudio null sinks, with the built-in speech looped into the microphone and the LM
stage frozen for 300 ms halfway (SIGSTOP, SIGCONT), once with the speaker's adaptive playout and once
with today's fixed 120 ms buffer (the baseline), in the same invocation. Prints end to end P50/P99, the
median budget by part, underruns, trims and how long the speaker buffer took to settle after the freeze.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rtpipe.bench.arguments import one_line_errors
from rtpipe.bench.pipeline import StolenTime, machine_line
from rtpipe.bench.pulse import NullSinks, check_installed, live_audio
from rtpipe.pipeline.cli.arguments import add_overrides_argument, check_range
from rtpipe.pipeline.observe.observer import Observer, RunInfo
from rtpipe.pipeline.observe.report import Report
from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.stages.base import FRAME_MS
from rtpipe.stages.errors import AudioError, ConfigError

PROG = "rtpipe bench live"
DEFAULT_SECONDS = 30.0
MIN_SECONDS = 2.0  # the freeze is halfway: a second before it, a second after it at least
MAX_SECONDS = 3600.0  # per run, and there are two
FREEZE_MS = 300.0
SETTLE_TOLERANCE_MS = 15.0  # "settled": the speaker buffer within this of its median, and staying there
SETTLE_SMOOTH_FRAMES = 13  # the buffer's level: a running median over about a second of frames
PLAYER_BLOCK_SAMPLES = 240  # the speech player's device block: 10 ms, as the pipeline's own streams
PLAYOUTS = ("adaptive", "fixed")
# this machine's targets for the adaptive playout: (what, the run's key, at most)
TARGETS = (
    ("end to end P50 (ms)", "end_to_end_p50_ms", 190.0),
    ("speaker buffer median, device incl. (ms)", "speaker_buffer_median_ms", 45.0),
    ("settled after the freeze (s)", "settle_s", 5.0),
)


# --- pure arithmetic over a report (tests call these on synthetic data) ---------------------------


def _median(values: Any) -> float:
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    return round(float(np.median(array)), 3) if array.size else 0.0


def settling_time_s(
    samples: Mapping[str, Any],
    freeze_s: float,
    tolerance_ms: float = SETTLE_TOLERANCE_MS,
    smooth_frames: int = SETTLE_SMOOTH_FRAMES,
) -> float | None:
    """Seconds from the freeze (`freeze_s`, on the samples' t_s clock) until the speaker buffer is back
    within `tolerance_ms` of its median over the whole run and stays there to the end. The buffer is
    samples["playback_ms"] as a running median of the last `smooth_frames` frames: one frame a model
    was slow on is that frame's jitter, not the buffer's level. A frame counts at the moment it reached
    the speaker (t_s + end_to_end_ms): the freeze holds up frames captured before it. 0.0 when the
    buffer never left the band after the freeze; None when it never came back (still out at the last
    frame) or no frame reached the speaker after it."""
    raw = np.asarray(samples["playback_ms"], dtype=np.float64)
    playback = np.array([np.median(raw[max(0, i - smooth_frames + 1) : i + 1]) for i in range(raw.size)])
    at_speaker_s = np.asarray(samples["t_s"], dtype=np.float64) + np.asarray(samples["end_to_end_ms"]) / 1000.0
    if playback.size == 0:
        return None
    median = float(np.median(raw[np.isfinite(raw)])) if np.isfinite(raw).any() else 0.0
    after = np.flatnonzero(at_speaker_s >= freeze_s)
    if after.size == 0:
        return None
    out_of_band = ~(np.abs(playback[after] - median) <= tolerance_ms)  # NaN counts as out
    if not out_of_band.any():
        return 0.0
    last_out = int(np.flatnonzero(out_of_band)[-1])
    if last_out == after.size - 1:
        return None
    return round(float(at_speaker_s[after[last_out + 1]] - freeze_s), 3)


def capture_split(report: Mapping[str, Any]) -> tuple[float, float, bool]:
    """(algorithmic frame ms, device in ms at the median, taken from the report). Where the report
    splits the source's time itself (its "capture" section) that split is used; else the frame's own
    80 ms is the algorithmic part and the rest of a live source's capture_ms is the input device's."""
    capture = report.get("capture")
    if isinstance(capture, Mapping) and "algorithmic_ms" in capture and "device_ms" in capture:
        return float(capture["algorithmic_ms"]), float(capture["device_ms"]["p50"]), True
    frame_ms = float(report.get("frame_ms", FRAME_MS))
    return frame_ms, round(_median(report["samples"]["capture_ms"]) - frame_ms, 3), False


def budget_by_part(report: Mapping[str, Any]) -> dict[str, float]:
    """The median of each part of a frame's end to end time (ms), in the order a frame meets them:
    the algorithmic frame, device in, each middle stage's compute, the hops (all rings' waits, summed
    medians), the speaker buffer (device out taken off) and device out (the output latency PortAudio
    reports). Medians do not add up exactly to the end to end median; "sum" says how close they come."""
    samples = report["samples"]
    algorithmic, device_in, _ = capture_split(report)
    parts: dict[str, float] = {"algorithmic frame": algorithmic, "device in": device_in}
    stage_ms = samples["stage_ms"]
    for name in list(stage_ms)[1:-1]:  # the source's time is the capture; the sink's is in its buffer
        parts[name] = _median(stage_ms[name])
    parts["hops"] = round(sum(_median(wait) for wait in samples["wait_ms"].values()), 3)
    device_out = float(report.get("device_latency_ms") or 0.0)
    parts["speaker buffer"] = round(_median(samples["playback_ms"]) - device_out, 3)
    parts["device out"] = device_out
    parts["sum"] = round(sum(parts.values()), 3)
    return parts


def summarize_run(report: Mapping[str, Any], freeze_s: float | None) -> dict[str, Any]:
    """One run's numbers for the table and the JSON, from its report and when the freeze began."""
    samples = report["samples"]
    playback = report.get("playback", {})
    _, _, split_from_report = capture_split(report)
    return {
        "frames": int(report["frames"]),
        "end_to_end_p50_ms": report["end_to_end_ms"]["p50"],
        "end_to_end_p99_ms": report["end_to_end_ms"]["p99"],
        "budget_ms": budget_by_part(report),
        "capture_split_from_report": split_from_report,
        "speaker_buffer_median_ms": _median(samples["playback_ms"]),
        "underruns": int(playback.get("underruns", 0)),
        "overflows": int(playback.get("overflows", 0)),
        "device_underflows": int(playback.get("device_underflows", 0)),
        "trims": playback.get("trims"),  # None: this speaker does not count them
        "trimmed_ms": playback.get("trimmed_ms"),
        "target_ms": playback.get("target_ms"),
        "frames_lost": int(report.get("frames_lost", 0)),
        "restarts": sum(int(row["restarts"]) for row in report["stages"].values()),
        "freeze_s": None if freeze_s is None else round(freeze_s, 3),
        "settle_s": None if freeze_s is None else settling_time_s(samples, freeze_s),
    }


def target_results(adaptive: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target against the adaptive run: {key: {"at_most", "value", "met"}} (None never meets one)."""
    results = {}
    for _, key, limit in TARGETS:
        value = adaptive.get(key)
        results[key] = {"at_most": limit, "value": value, "met": value is not None and value <= limit}
    return results


def check_seconds(seconds: float) -> None:
    """ConfigError naming --seconds unless MIN_SECONDS <= seconds <= MAX_SECONDS (NaN refused too)."""
    check_range("--seconds", seconds, MIN_SECONDS, MAX_SECONDS)


# --- the live run ----------------------------------------------------------------------------------


def play_speech_loop(sink: str, ready, stop, max_seconds: float) -> None:
    """Child process: the built-in speech, looped, into PulseAudio sink `sink` until `stop` (or
    `max_seconds`, should the parent die without setting it). `ready` once the device asks for audio."""
    os.environ["PULSE_SINK"] = sink  # before PortAudio starts: it picks the sink up from here
    import sounddevice
    import soundfile

    from rtpipe.stages.audio_io import SPEECH_SAMPLE_PATH
    from rtpipe.stages.base import SAMPLE_RATE

    speech, rate = soundfile.read(str(SPEECH_SAMPLE_PATH), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise SystemExit(f"{PROG}: {SPEECH_SAMPLE_PATH} is at {rate} Hz, not {SAMPLE_RATE}")
    speech = speech[:, 0].copy()
    position = 0

    def on_block(outdata, n_samples, time_info, status) -> None:
        nonlocal position
        index = (position + np.arange(n_samples)) % speech.size
        outdata[:, 0] = speech[index]
        position = (position + n_samples) % speech.size
        ready.set()

    with sounddevice.OutputStream(
        samplerate=SAMPLE_RATE,
        channels=1,
        dtype="float32",
        blocksize=PLAYER_BLOCK_SAMPLES,
        latency="low",
        callback=on_block,
    ):
        stop.wait(max_seconds)


class LmFreeze(Observer):
    """Freezes the LM stage's process (SIGSTOP) `after_s` into the run, and thaws it (SIGCONT)
    `freeze_ms` later: a stall of the model, as a GC pause or a page-in would cause. `freeze_s` is when
    it began on the report's t_s clock (None if the run ended first)."""

    def __init__(self, after_s: float, freeze_ms: float = FREEZE_MS):
        self.after_s = after_s
        self.freeze_ms = freeze_ms
        self.freeze_s: float | None = None
        self.stage = ""
        self.done = threading.Event()  # set once the freeze is over (or was cancelled, or failed)
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def on_start(self, run_info: RunInfo) -> None:
        kinds = run_info["kinds"]
        self.stage = next((name for name, kind in kinds.items() if kind == "moshi.step"), "lm")
        pid = run_info["pids"][self.stage]
        t0_ns = run_info["t0_ns"]
        self._thread = threading.Thread(target=self._freeze, args=(pid, t0_ns), name="lm-freeze", daemon=True)
        self._thread.start()

    def _freeze(self, pid: int, t0_ns: int) -> None:
        try:
            self._freeze_once(pid, t0_ns)
        finally:
            self.done.set()

    def _freeze_once(self, pid: int, t0_ns: int) -> None:
        if self._cancel.wait(self.after_s):
            return
        frozen_ns = time.monotonic_ns()
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return  # the stage is gone (restarted or stopped): nothing to freeze
        try:
            self.freeze_s = (frozen_ns - t0_ns) / 1e9
            time.sleep(self.freeze_ms / 1000.0)  # not cancellable: a frozen stage is always thawed
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def on_stop(self, report: Report) -> None:
        self._cancel.set()
        if self._thread is not None:
            self._thread.join()


def playout_config(playout: str, with_param: bool, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The default pipeline's raw config with `overrides` (--set) applied, its speaker's playout set to
    `playout` where it has the param."""
    raw = pipeline_config.apply_overrides(pipeline_config.load_raw(None), list(overrides))
    if with_param:
        sink = list(raw["stages"])[-1]
        raw["stages"][sink].setdefault("params", {})["playout"] = playout
    return raw


def playout_param_exists() -> bool:
    """Whether the speaker takes `playout` (another change adds it): a config error naming it says not."""
    try:
        pipeline_config.validate(playout_config("fixed", with_param=True))
    except ConfigError as e:
        if "playout" in str(e):
            return False
        raise
    return True


def run_live(raw: dict[str, Any], seconds: float, sinks: NullSinks) -> tuple[Report, float | None]:
    """One live run of `raw` for `seconds`, the microphone on sinks.microphone and the speaker into
    sinks.speaker, the LM frozen halfway; its report and when the freeze began (t_s clock)."""
    from rtpipe.pipeline.runtime.supervisor import Supervisor

    freeze = LmFreeze(after_s=seconds / 2)
    supervisor = Supervisor(
        pipeline_config.validate(copy.deepcopy(raw)),
        observer_factory=lambda run_info: [freeze],
        seconds=seconds,
        handle_signals=False,  # Ctrl-C: KeyboardInterrupt, and every process and sink is cleaned up
        extra_env={"PULSE_SOURCE": sinks.microphone, "PULSE_SINK": sinks.speaker},
    )
    result = supervisor.run()
    if result.error:
        raise AudioError(f"the live run failed: {result.error}")
    if not result.report["frames"]:
        raise AudioError("the live run delivered no frame to the speaker")
    return result.report, freeze.freeze_s


def measure(seconds: float, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Both runs, adaptive then fixed, with the speech player running throughout; their summaries."""
    with_param = playout_param_exists()
    with live_audio() as (sinks, pulse_started):
        ctx = mp.get_context("spawn")
        ready, stop = ctx.Event(), ctx.Event()
        player = ctx.Process(
            target=play_speech_loop,
            args=(sinks.into_microphone, ready, stop, 4 * seconds + 600.0),
            name="speech-player",
            daemon=True,
        )
        player.start()
        try:
            if not ready.wait(30.0):
                raise AudioError(f"the speech player got no audio callback from sink {sinks.into_microphone}")
            runs: dict[str, Any] = {}
            for playout in PLAYOUTS:
                load_average = round(os.getloadavg()[0], 2)  # the machine is shared: say how busy it was
                stolen = StolenTime()
                report, freeze_s = run_live(playout_config(playout, with_param, overrides), seconds, sinks)
                runs[playout] = summarize_run(report, freeze_s)
                runs[playout]["load_average"] = load_average
                runs[playout]["steal_pct"] = stolen.percent()
                runs[playout]["torch_threads"] = {
                    name: stage.get("threads")
                    for name, stage in report["config"]["stages"].items()
                    if "threads" in stage
                }
        finally:
            stop.set()
            player.join(10.0)
            if player.is_alive():
                player.kill()
                player.join()
    return {"runs": runs, "playout_param": with_param, "pulse_started": pulse_started, "overrides": list(overrides)}


# --- output ---------------------------------------------------------------------------------------


def _cell(value: Any, unit: str = "", none: str = "n/a") -> str:
    if value is None:
        return none
    if isinstance(value, float):
        return f"{value:.1f}{unit}"
    return f"{value}{unit}"


def _settle_cell(run: dict[str, Any]) -> str:
    if run["freeze_s"] is None:
        return "no freeze"  # the run ended before it
    return "never" if run["settle_s"] is None else f"{run['settle_s']:.1f}"


def _ratio(fixed: Any, adaptive: Any) -> str:
    if not isinstance(fixed, (int, float)) or not isinstance(adaptive, (int, float)):
        return ""
    if adaptive == 0:
        return "" if fixed == 0 else "inf"
    return f"{fixed / adaptive:.2f}x"


def format_table(measured: dict[str, Any], seconds: float) -> str:
    adaptive, fixed = measured["runs"]["adaptive"], measured["runs"]["fixed"]
    threads = adaptive.get("torch_threads") or {}
    lines = [
        f"{PROG}: the default pipeline (capture.microphone -> mimi.encode -> moshi.step -> mimi.decode -> "
        f"playback.speaker) live on two PulseAudio null sinks, the built-in speech looped into the microphone, "
        f"the lm stage frozen {FREEZE_MS:.0f} ms (SIGSTOP/SIGCONT) {seconds / 2:g} s in; {seconds:g} s per run, "
        "adaptive playout, then the fixed 120 ms speaker buffer (baseline)",
        f"machine: {machine_line()}; torch threads "
        + (", ".join(f"{name} {count}" for name, count in threads.items()) or "default")
        + f"; frames: adaptive {adaptive['frames']}, fixed {fixed['frames']}"
        + ("" if measured["pulse_started"] else "; on the PulseAudio that was already running"),
    ]
    if measured.get("overrides"):
        lines.append("both runs with --set " + " --set ".join(measured["overrides"]))
    if not measured["playout_param"]:
        lines.append("NOTE: this speaker has no `playout` param yet: both runs used its default (the fixed buffer)")
    if not adaptive["capture_split_from_report"]:
        lines.append(
            f"algorithmic frame = {FRAME_MS:g} ms and device in = capture_ms - {FRAME_MS:g} ms (the report "
            "does not split the capture time)"
        )
    lines.append(
        "speaker buffer = samples.playback_ms less the device out PortAudio reports; medians, so the "
        "parts' sum is near, not equal to, the end to end P50"
    )
    lines.append(f"{'':<34} {'adaptive':>10} {'fixed':>10} {'fixed/adaptive':>15}")

    def row(label: str, a: Any, f: Any) -> None:
        lines.append(f"{label:<34} {_cell(a):>10} {_cell(f):>10} {_ratio(f, a):>15}")

    row("end to end P50 (ms)", adaptive["end_to_end_p50_ms"], fixed["end_to_end_p50_ms"])
    row("end to end P99 (ms)", adaptive["end_to_end_p99_ms"], fixed["end_to_end_p99_ms"])
    for part in adaptive["budget_ms"]:
        row(f"  median {part} (ms)", adaptive["budget_ms"][part], fixed["budget_ms"].get(part))
    row("speaker buffer median, dev. (ms)", adaptive["speaker_buffer_median_ms"], fixed["speaker_buffer_median_ms"])
    row("speaker target (ms)", adaptive["target_ms"], fixed["target_ms"])
    lines.append(
        f"{'settled after the freeze (s)':<34} {_settle_cell(adaptive):>10} {_settle_cell(fixed):>10} "
        f"{_ratio(fixed['settle_s'], adaptive['settle_s']):>15}"
    )
    for key in ("underruns", "trims", "trimmed_ms", "overflows", "device_underflows", "frames_lost", "restarts"):
        row(key.replace("_", " "), adaptive[key], fixed[key])
    row("load average at the start", adaptive.get("load_average"), fixed.get("load_average"))
    row("hypervisor steal (% of cores)", adaptive.get("steal_pct"), fixed.get("steal_pct"))
    lines.append(
        f"targets on this machine (adaptive run; settled = the buffer's running median of {SETTLE_SMOOTH_FRAMES} "
        f"frames within {SETTLE_TOLERANCE_MS:g} ms of the run's median, staying):"
    )
    results = target_results(adaptive)
    for label, key, limit in TARGETS:
        result = results[key]
        lines.append(
            f"  {label:<42} at most {limit:<6g} {_cell(result['value'], none='never'):>8}  "
            f"{'met' if result['met'] else 'MISSED'}"
        )
    return "\n".join(lines)


@one_line_errors(PROG)
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"length of each of the two runs (default {DEFAULT_SECONDS:g}; the freeze is halfway)",
    )
    parser.add_argument("--json", action="store_true", help='print JSON: {"adaptive", "fixed", "targets"}')
    add_overrides_argument(
        parser, "override a field of the default config in both runs, e.g. --set stages.encode.threads=2 (repeatable)"
    )
    args = parser.parse_args(argv)
    check_seconds(args.seconds)
    pipeline_config.validate(playout_config("adaptive", playout_param_exists(), args.overrides))  # one line, now
    check_installed()  # before anything starts: a missing PulseAudio is one line too
    measured = measure(args.seconds, args.overrides)
    runs = measured["runs"]
    if args.json:
        print(
            json.dumps(
                {
                    "adaptive": runs["adaptive"],
                    "fixed": runs["fixed"],
                    "targets": target_results(runs["adaptive"]),
                    "machine": machine_line(),
                    "seconds": args.seconds,
                    "playout_param": measured["playout_param"],
                    "overrides": list(args.overrides),
                }
            )
        )
    else:
        print(format_table(measured, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
