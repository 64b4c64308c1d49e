"""The live terminal view of `rtpipe run` (rich): where the milliseconds go, redrawn about once a second.

One row per stage (compute P50/P99 over the last seconds, real-time factor against the 80 ms frame,
deadline misses, restarts), one row per edge (ring fill, drops), end-to-end latency, playback glitches and
the transformer's last words. `render_snapshot` is a pure function so tests can draw it on a recorded Console.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from rtpipe.pipeline.observe.observer import Observer

TEXT_CHARS = 100  # the tail of the transcript that fits on one line


def _ms(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:7.1f}"


def _level_style(fraction: float) -> str:
    # green while a stage keeps up with room to spare; red once it needs the whole frame or more
    if fraction >= 1.0:
        return "red"
    if fraction >= 0.5:
        return "yellow"
    return "green"


def _bar(fraction: float, width: int = 16) -> ProgressBar:
    shown = max(0.0, min(fraction, 1.0))
    style = _level_style(fraction)
    return ProgressBar(total=1.0, completed=shown, width=width, complete_style=style, finished_style=style)


def _stage_table(snapshot: dict, run_info: dict) -> Table:
    frame_ms = float(snapshot.get("frame_ms") or run_info.get("frame_ms") or 80.0)
    table = Table(title=None, expand=False, box=None, pad_edge=False, header_style="bold")
    table.add_column("stage")
    table.add_column("kind", style="dim")
    table.add_column("P50 ms", justify="right")
    table.add_column("P99 ms", justify="right")
    table.add_column(f"RTF (1.0 = {frame_ms:g} ms)")
    table.add_column("RTF", justify="right")
    table.add_column("misses", justify="right")
    table.add_column("restarts", justify="right")
    stages = snapshot.get("stages") or {}
    names = list(run_info.get("stages") or stages)
    names += [name for name in stages if name not in names]
    for name in names:
        row = stages.get(name) or {}
        compute = row.get("compute_ms") or {}
        rtf = row.get("rtf")
        rtf_value = float(rtf) if isinstance(rtf, (int, float)) else 0.0
        misses = int(row.get("deadline_misses") or 0)
        restarts = int(row.get("restarts") or 0)
        table.add_row(
            name,
            str((run_info.get("kinds") or {}).get(name, "")),
            _ms(compute.get("p50")),
            _ms(compute.get("p99")),
            _bar(rtf_value),
            Text("-" if rtf is None else f"{rtf_value:.2f}", style=_level_style(rtf_value)),
            Text(str(misses), style="red" if misses else ""),
            Text(str(restarts), style="red" if restarts else ""),
        )
    return table


def _edge_table(snapshot: dict, run_info: dict) -> Table:
    table = Table(expand=False, box=None, pad_edge=False, header_style="bold")
    table.add_column("edge")
    table.add_column("fill")
    table.add_column("frames", justify="right")
    table.add_column("wait P50 ms", justify="right")
    table.add_column("dropped oldest", justify="right")
    table.add_column("dropped newest", justify="right")
    table.add_column("blocked", justify="right")
    edges = snapshot.get("edges") or {}
    names = list(run_info.get("edges") or edges)
    names += [name for name in edges if name not in names]
    slots_by_edge = run_info.get("slots") or {}
    for name in names:
        row = edges.get(name) or {}
        fill = int(row.get("fill") or 0)
        slots = int(slots_by_edge.get(name) or 0)
        dropped_oldest = int(row.get("dropped_oldest") or 0)
        dropped_newest = int(row.get("dropped_newest") or 0)
        table.add_row(
            name,
            _bar(fill / slots if slots else 0.0, width=10),
            f"{fill}/{slots}" if slots else str(fill),
            _ms((row.get("wait_ms") or {}).get("p50")),
            Text(str(dropped_oldest), style="yellow" if dropped_oldest else ""),
            Text(str(dropped_newest), style="yellow" if dropped_newest else ""),
            str(int(row.get("blocked") or 0)),
        )
    return table


def _summary(snapshot: dict) -> Text:
    e2e = snapshot.get("end_to_end_ms") or {}
    playback = snapshot.get("playback") or {}
    underruns = int(playback.get("underruns") or 0)
    overflows = int(playback.get("overflows") or 0)
    lost = int(snapshot.get("frames_lost") or 0)
    line = Text()
    line.append("end-to-end ", style="bold")
    line.append(
        f"P50 {_ms(e2e.get('p50')).strip()} ms  P99 {_ms(e2e.get('p99')).strip()} ms  "
        f"max {_ms(e2e.get('max')).strip()} ms"
    )
    line.append("   underruns ")
    line.append(str(underruns), style="red" if underruns else "")
    line.append("  overflows ")
    line.append(str(overflows), style="red" if overflows else "")
    line.append("  frames lost ")
    line.append(str(lost), style="red" if lost else "")
    return line


def _transcript(snapshot: dict) -> Text | None:
    pieces = [str(piece) for piece in (snapshot.get("text") or [])]
    if not pieces:  # no tokenizer: the token ids themselves
        pieces = [f"<{token}>" for token in (snapshot.get("text_tokens") or [])]
    if not pieces:
        return None
    joined = "".join(pieces).replace("\n", " ")
    tail = joined[-TEXT_CHARS:]
    line = Text("text ", style="bold")
    line.append(("…" if len(joined) > len(tail) else "") + tail, style="cyan")
    return line


def render_snapshot(snapshot: dict | None, run_info: dict) -> Panel:
    """Draw one snapshot (the report's shape, percentiles over the last seconds) as a rich Panel."""
    snapshot = snapshot or {}
    parts: list = [
        _stage_table(snapshot, run_info),
        Text(""),
        _edge_table(snapshot, run_info),
        Text(""),
        _summary(snapshot),
    ]
    transcript = _transcript(snapshot)
    if transcript is not None:
        parts.append(transcript)
    seconds = snapshot.get("seconds")
    title = f"rtpipe run {run_info.get('run_id', '')}".rstrip()
    if isinstance(seconds, (int, float)):
        title += f" — {seconds:.1f} s, {int(snapshot.get('frames') or 0)} frames"
    return Panel(Group(*parts), title=title, title_align="left", expand=False)


class LiveView(Observer):
    """A rich Live display redrawn at each tick; it leaves the last frame drawn on the terminal."""

    def __init__(self, run_info: dict, *, console: Console | None = None) -> None:
        self.run_info = dict(run_info)
        self.console = console or Console()
        self.last_snapshot: dict | None = None
        self._live: Live | None = None

    def on_start(self, run_info: dict) -> None:
        self.run_info = dict(run_info)
        # no auto-refresh thread: the supervisor's ticks drive redraws, which spares a core on small hosts
        self._live = Live(
            render_snapshot(None, self.run_info),
            console=self.console,
            auto_refresh=False,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start(refresh=True)

    def on_tick(self, snapshot: dict) -> None:
        self.last_snapshot = snapshot
        if self._live is not None:
            try:
                self._live.update(render_snapshot(snapshot, self.run_info), refresh=True)
            except Exception:
                # the supervisor drops an observer that raises: give the terminal back first
                self._live.stop()
                self._live = None
                raise

    def on_stop(self, report: dict) -> None:
        # the report has no fill levels of its own: show the last tick's (copies: the report is shared)
        last_edges = (self.last_snapshot or {}).get("edges") or {}
        snapshot = dict(report)
        snapshot["edges"] = {
            edge: {"fill": (last_edges.get(edge) or {}).get("fill", 0), **row}
            for edge, row in (report.get("edges") or {}).items()
        }
        if not snapshot.get("text") and not snapshot.get("text_tokens") and self.last_snapshot:
            snapshot["text"] = self.last_snapshot.get("text")
            snapshot["text_tokens"] = self.last_snapshot.get("text_tokens")
        if self._live is not None:
            self._live.update(render_snapshot(snapshot, self.run_info), refresh=True)
            self._live.stop()
            self._live = None
