"""Latency plots from a run report's per-frame samples (no re-run needed): used by `rtpipe plot`.

Three panels: end-to-end latency over time against the frame (the deadline), each stage's compute-time
distribution, and a stacked bar of the median budget (capture in its parts, each stage, each hop, playback
buffer). The source's parts (the algorithmic frame, device input, its own work) are report.capture_parts_ms's.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import numpy as np

from rtpipe.pipeline.observe.report import CaptureParts, Report, capture_parts_ms
from rtpipe.stages.base import FRAME_MS
from rtpipe.stages.errors import RtpipeError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SAMPLE_KEYS = ("t_s", "end_to_end_ms", "capture_ms", "stage_ms", "wait_ms", "playback_ms")
TITLE_END_TO_END = "End-to-end latency per frame"
TITLE_COMPUTE = "Per-stage compute time"
TITLE_BUDGET = "Median latency budget"


class ReportError(RtpipeError):
    """A run report cannot be read or lacks what is asked of it; the message names the file and key."""

    kind = "report error"


def load_report(path: str | os.PathLike[str]) -> Report:
    """Read a `rtpipe run --report` JSON file and check what plotting reads: per-frame samples, one
    per frame in every list, and frame_ms (FRAME_MS when the file has none).

    Raises ReportError naming the file (and the missing key) when it is absent, not JSON or incomplete.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ReportError(f"{path}: is a directory, not a report file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not a JSON report ({e})") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(report, dict):
        raise ReportError(f'{path}: not a run report (a JSON object with "samples" is expected)')
    samples = report.get("samples")
    if not isinstance(samples, dict):
        raise ReportError(f'{path}: no "samples" (per-frame latencies); write it with `rtpipe run --report`')
    for key in SAMPLE_KEYS:
        if key not in samples:
            raise ReportError(f"{path}: samples.{key} is missing")
    if not isinstance(samples["end_to_end_ms"], list):
        raise ReportError(f"{path}: samples.end_to_end_ms is not a list of per-frame values")
    n = len(samples["end_to_end_ms"])
    if n == 0:
        raise ReportError(f"{path}: the run recorded no frames, nothing to plot")
    for key in ("t_s", "capture_ms", "playback_ms"):
        values = samples[key]
        if not isinstance(values, list) or len(values) != n:
            count = len(values) if isinstance(values, list) else "no"
            raise ReportError(f"{path}: samples.{key} has {count} values, samples.end_to_end_ms has {n}")
    for group in ("stage_ms", "wait_ms"):
        if not isinstance(samples[group], dict):
            raise ReportError(f"{path}: samples.{group} is not an object of per-frame lists")
        for name, values in samples[group].items():
            if not isinstance(values, list) or len(values) != n:
                raise ReportError(f"{path}: samples.{group}.{name} does not have {n} values")
    lists = {key: samples[key] for key in ("t_s", "end_to_end_ms", "capture_ms", "playback_ms")}
    for group in ("stage_ms", "wait_ms"):
        lists.update({f"{group}.{name}": values for name, values in samples[group].items()})
    for key, values in lists.items():
        bad = next(
            (
                i
                for i, v in enumerate(values)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))
            ),
            None,
        )
        if bad is not None:
            raise ReportError(f"{path}: samples.{key}[{bad}] = {values[bad]!r}: not a number")
    frame_ms = report.setdefault("frame_ms", FRAME_MS)
    if isinstance(frame_ms, bool) or not isinstance(frame_ms, (int, float)) or not 0 < frame_ms < math.inf:
        raise ReportError(f"{path}: frame_ms = {frame_ms!r}: not a finite positive number")
    # checked above: the samples and frame_ms; the rest is as `rtpipe run` wrote it, read with .get()
    return cast(Report, report)


def _values(values: Sequence[float | None]) -> np.ndarray:
    # a stage that never saw a frame leaves a negative or missing value: not a latency
    array = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return np.where(array >= 0, array, np.nan)


BUDGET_ALGORITHMIC = "capture: frame (algorithmic)"
BUDGET_DEVICE = "capture: device input"


def report_capture_parts(report: Report) -> CaptureParts:
    """The source's per-frame parts for `report` (report.capture_parts_ms over samples.capture_ms); a
    report written before the "capture" section counts as a file source's (no algorithmic frame)."""
    capture = report.get("capture")
    live_source = bool(capture.get("live_source", False)) if isinstance(capture, dict) else False
    return capture_parts_ms(
        _values(report["samples"]["capture_ms"]), live_source=live_source, frame_ms=float(report["frame_ms"])
    )


def compute_panel_ms(report: Report) -> list[tuple[str, np.ndarray]]:
    """What the per-stage panel draws, in chain order: (label, per-frame ms) per stage. The source's
    entry is its own work, or for a live source its device input (its work is not stamped apart), never
    the frame's own length."""
    samples = report["samples"]
    names = list(samples["stage_ms"])
    panel = [(name, _values(samples["stage_ms"][name])) for name in names]
    if panel:
        parts = report_capture_parts(report)
        source = names[0]
        panel[0] = (f"{source} (device input)", parts.device_ms) if parts.live_source else (source, parts.work_ms)
    return panel


def budget_segments_ms(report: Report) -> list[tuple[str, float]]:
    """The median of each part of the end-to-end latency, in chain order: capture in its parts (a live
    source: the algorithmic frame, then device input; any other: its own work), then each hop's wait
    and each following stage's compute, then the playback buffer (hand-off minus the sink's exit).
    Per frame these parts add up to the end-to-end latency."""
    samples = report["samples"]
    stage_ms = {name: _values(v) for name, v in samples["stage_ms"].items()}
    wait_ms = {name: _values(v) for name, v in samples["wait_ms"].items()}
    stages = list(report.get("stages") or stage_ms) or list(stage_ms)
    stages = [s for s in stages if s in stage_ms]
    parts = report_capture_parts(report)
    if parts.live_source:
        segments = [
            (BUDGET_ALGORITHMIC, np.full(parts.device_ms.shape, parts.algorithmic_ms)),
            (BUDGET_DEVICE, parts.device_ms),
        ]
    else:
        segments = [("capture", parts.work_ms)]
    for upstream, downstream in itertools.pairwise(stages):
        edge = f"{upstream}->{downstream}"
        if edge in wait_ms:
            segments.append((f"wait {edge}", wait_ms[edge]))
        segments.append((downstream, stage_ms[downstream]))
    playback = _values(samples["playback_ms"])
    if stages:
        playback = playback - stage_ms[stages[-1]]  # playback_ms runs from the sink's enter
    segments.append(("playback buffer", playback))
    out = []
    for name, values in segments:
        finite = values[np.isfinite(values)]
        out.append((name, float(np.median(finite)) if finite.size else 0.0))
    return out


def plot_report(
    report: Report, output_path: str | os.PathLike[str] | None = None, *, title: str | None = None
) -> Figure:
    """Draw the three panels for `report` (as load_report returns it); save a PNG if `output_path` is
    given. Returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    frame_ms = float(report["frame_ms"])
    t_s = _values(samples["t_s"])
    e2e_ms = _values(samples["end_to_end_ms"])

    fig, (ax_time, ax_compute, ax_budget) = plt.subplots(
        3, 1, figsize=(11, 12), gridspec_kw={"height_ratios": [3, 3, 1.6]}
    )
    fig.suptitle(title or f"rtpipe run: {len(e2e_ms)} frames, {report.get('seconds', 0):.1f} s")

    ax_time.plot(t_s, e2e_ms, ".", markersize=3, color="tab:blue", label="frame")
    finite = e2e_ms[np.isfinite(e2e_ms)]
    if finite.size:
        p50, p99 = np.percentile(finite, [50, 99])
        ax_time.axhline(p50, color="tab:green", linestyle="--", linewidth=1, label=f"P50 {p50:.1f} ms")
        ax_time.axhline(p99, color="tab:orange", linestyle="--", linewidth=1, label=f"P99 {p99:.1f} ms")
    ax_time.axhline(frame_ms, color="tab:red", linewidth=1.5, label=f"{frame_ms:g} ms frame (budget)")
    ax_time.set_title(TITLE_END_TO_END)
    ax_time.set_xlabel("time since start (s)")
    ax_time.set_ylabel("capture to output (ms)")
    ax_time.set_ylim(bottom=0)
    ax_time.legend(loc="upper right", fontsize="small")
    ax_time.grid(alpha=0.3)

    panel = compute_panel_ms(report)
    names = [name for name, _ in panel]
    data = []
    for _, values in panel:
        values = values[np.isfinite(values)]
        data.append(np.maximum(values, 1e-3) if values.size else np.array([1e-3]))
    ax_compute.boxplot(data, whis=(1, 99), showfliers=True, flierprops={"markersize": 2})
    ax_compute.set_xticks(range(1, len(names) + 1), names)
    ax_compute.set_yscale("log")
    ax_compute.axhline(frame_ms, color="tab:red", linewidth=1.5, label=f"deadline ({frame_ms:g} ms frame)")
    ax_compute.set_title(TITLE_COMPUTE + " (box: quartiles, whiskers: P1-P99)")
    ax_compute.set_xlabel("stage")
    ax_compute.set_ylabel("enter to exit (ms, log)")
    ax_compute.legend(loc="upper right", fontsize="small")
    ax_compute.grid(alpha=0.3, axis="y")

    segments = budget_segments_ms(report)
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(segments), 2)))
    left = 0.0
    for (name, width_ms), color in zip(segments, colors):
        ax_budget.barh(0, width_ms, left=left, color=color, edgecolor="white", label=f"{name} {width_ms:.1f} ms")
        if width_ms > 0.04 * max(sum(w for _, w in segments), 1e-9):
            ax_budget.text(left + width_ms / 2, 0, f"{width_ms:.0f}", ha="center", va="center", fontsize=8)
        left += width_ms
    if finite.size:
        ax_budget.axvline(
            float(np.median(finite)),
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"median end-to-end {np.median(finite):.1f} ms",
        )
    ax_budget.set_title(TITLE_BUDGET)
    ax_budget.set_xlabel("milliseconds (median of each part)")
    ax_budget.set_yticks([])
    ax_budget.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=4, fontsize="small", frameon=False)

    fig.tight_layout()
    if output_path is not None:
        save_plot(fig, output_path)
    return fig


def save_plot(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Writes `fig` at `path` in the format its extension names. Raises ReportError naming the file
    when it cannot: a directory, a full disk, or a format whose tool is missing (pgf needs xelatex)."""
    path = os.fspath(path)
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise ReportError(f"{path}: cannot write the plot ({e.strerror or e})") from None
    except RuntimeError as e:  # matplotlib's word for a missing external tool
        raise ReportError(f"{path}: cannot write the plot ({' '.join(str(e).split())})") from None
