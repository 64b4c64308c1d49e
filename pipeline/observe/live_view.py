"""The live terminal view of `rtpipe run` (rich): where the milliseconds go, redrawn about once a second.

One row per stage (compute P50/P99 over the last seconds, real-time factor against the 80 ms frame,
deadline misses, restarts), one row per edge (ring fill, drops), end-to-end latency, playback glitches and
the transformer's last words. `render_snapshot` is a pure function so tests can draw it on a recorded Console.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from rtpipe.pipeline.observe.observer import Observer, RunInfo
from rtpipe.pipeline.observe.report import Report, Snapshot, final_snapshot, no_playback

TEXT_CHARS = 100  # the tail of the transcript that fits on one line


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:7.1f}"


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


def _count(value: int) -> Text:
    """A glitch count: red once there is any."""
    return Text(str(value), style="red" if value else "")


def _names(run_info: RunInfo, key: Literal["stages", "edges"], rows: Mapping[str, object]) -> list[str]:
    """The run's stages or edges in chain order, then any the snapshot has that run_info does not."""
    names = list(run_info[key])
    return names + [name for name in rows if name not in names]


def _stage_table(snapshot: Snapshot | None, run_info: RunInfo) -> Table:
    frame_ms = snapshot["frame_ms"] if snapshot else run_info["frame_ms"]
    table = Table(title=None, expand=False, box=None, pad_edge=False, header_style="bold")
    table.add_column("stage")
    table.add_column("kind", style="dim")
    table.add_column("P50 ms", justify="right")
    table.add_column("P99 ms", justify="right")
    table.add_column(f"RTF (1.0 = {frame_ms:g} ms)")
    table.add_column("RTF", justify="right")
    table.add_column("misses", justify="right")
    table.add_column("restarts", justify="right")
    stages = snapshot["stages"] if snapshot else {}
    for name in _names(run_info, "stages", stages):
        kind = run_info["kinds"].get(name, "")
        row = stages.get(name)
        if row is None:  # no tick yet
            table.add_row(name, kind, _ms(None), _ms(None), _bar(0.0), Text("-"), Text("0"), Text("0"))
            continue
        rtf = row["rtf"]
        table.add_row(
            name,
            kind,
            _ms(row["compute_ms"]["p50"]),
            _ms(row["compute_ms"]["p99"]),
            _bar(rtf),
            Text(f"{rtf:.2f}", style=_level_style(rtf)),
            _count(row["deadline_misses"]),
            _count(row["restarts"]),
        )
        capture = snapshot["capture"] if snapshot and name == run_info["stages"][0] else None
        if capture and capture["live_source"]:  # the rest of a live source's time (report.capture_parts_ms)
            device = capture["device_ms"]
            table.add_row(
                "  + device input", "", _ms(device["p50"]), _ms(device["p99"]), "", Text(""), Text(""), Text("")
            )
            frame = _ms(capture["algorithmic_ms"])
            table.add_row("  + frame (algorithmic)", "", frame, frame, "", Text(""), Text(""), Text(""))
    return table


def _edge_table(snapshot: Snapshot | None, run_info: RunInfo) -> Table:
    table = Table(expand=False, box=None, pad_edge=False, header_style="bold")
    table.add_column("edge")
    table.add_column("fill")
    table.add_column("frames", justify="right")
    table.add_column("wait P50 ms", justify="right")
    table.add_column("dropped oldest", justify="right")
    table.add_column("dropped newest", justify="right")
    table.add_column("blocked", justify="right")
    edges = snapshot["edges"] if snapshot else {}
    for name in _names(run_info, "edges", edges):
        row = edges.get(name)
        fill = row["fill"] if row else 0
        slots = run_info["slots"].get(name, 0)
        dropped_oldest = row["dropped_oldest"] if row else 0
        dropped_newest = row["dropped_newest"] if row else 0
        table.add_row(
            name,
            _bar(fill / slots if slots else 0.0, width=10),
            f"{fill}/{slots}" if slots else str(fill),
            _ms(row["wait_ms"]["p50"] if row else None),
            Text(str(dropped_oldest), style="yellow" if dropped_oldest else ""),
            Text(str(dropped_newest), style="yellow" if dropped_newest else ""),
            str(row["blocked"] if row else 0),
        )
    return table


def _summary(snapshot: Snapshot | None) -> Text:
    e2e = snapshot["end_to_end_ms"] if snapshot else None
    playback = snapshot["playback"] if snapshot else no_playback()
    line = Text()
    line.append("end-to-end ", style="bold")
    line.append(
        f"P50 {_ms(e2e['p50'] if e2e else None).strip()} ms  P99 {_ms(e2e['p99'] if e2e else None).strip()} ms  "
        f"max {_ms(e2e['max'] if e2e else None).strip()} ms"
    )
    line.append("   underruns ")
    line.append(_count(playback["underruns"]))
    line.append("  overflows ")
    line.append(_count(playback["overflows"]))
    line.append("  device underflows ")
    line.append(_count(playback["device_underflows"]))
    line.append(f"  trims {playback['trims']} ({playback['trimmed_ms']:.0f} ms)  target {playback['target_ms']:.0f} ms")
    line.append("  frames lost ")
    line.append(_count(snapshot["frames_lost"] if snapshot else 0))
    return line


SESSIONS_SHOWN = 8  # more sessions than this: the worst ones by P99, then how many more


def _sessions(snapshot: Snapshot | None) -> Text | None:
    """With more than one session: how many are live, and each one's end to end (the worst first)."""
    sessions = snapshot.get("sessions", {}) if snapshot else {}
    if snapshot is None or (len(sessions) <= 1 and set(sessions) <= {"0"}):
        return None
    line = Text("sessions ", style="bold")
    line.append(f"{snapshot.get('live_sessions', 0)} live")
    worst = sorted(sessions.items(), key=lambda item: -item[1]["end_to_end_ms"]["p99"])
    for slot, row in worst[:SESSIONS_SHOWN]:
        e2e = row["end_to_end_ms"]
        line.append(f"   #{slot} P50 {e2e['p50']:.0f} P99 {e2e['p99']:.0f} ms")
        if row["frames_lost"]:
            line.append(f" lost {row['frames_lost']}", style="red")
    if len(worst) > SESSIONS_SHOWN:
        line.append(f"   (+{len(worst) - SESSIONS_SHOWN} more)")
    return line


def _clients(snapshot: Snapshot | None) -> Text | None:
    """rtpipe serve: active and queued clients, each one's lag, underruns and trims."""
    network = snapshot.get("network", {}) if snapshot else {}
    if not network:
        return None
    line = Text("clients ", style="bold")
    line.append(f"{network.get('active', 0)}/{network.get('slots', 0)} active, {network.get('queued', 0)} queued")
    bad = network.get("bad_messages", 0)
    if bad:
        line.append(f", {bad} bad messages", style="red")
    for slot, client in list(network.get("clients", {}).items())[:SESSIONS_SHOWN]:
        line.append(
            f"   #{slot} lag P50 {client.get('lag_ms_p50', 0):.0f} P99 {client.get('lag_ms_p99', 0):.0f} ms"
            f" underruns {client.get('underruns', 0)} trims {client.get('trims', 0)}"
        )
    return line


def _transcript(snapshot: Snapshot | None) -> Text | None:
    if snapshot is None:
        return None
    pieces = [str(piece) for piece in snapshot["text"]]
    if not pieces:  # no tokenizer: the token ids themselves
        pieces = [f"<{token}>" for token in snapshot["text_tokens"]]
    if not pieces:
        return None
    joined = "".join(pieces).replace("\n", " ")
    tail = joined[-TEXT_CHARS:]
    line = Text("text ", style="bold")
    line.append(("…" if len(joined) > len(tail) else "") + tail, style="cyan")
    return line


def render_snapshot(snapshot: Snapshot | None, run_info: RunInfo) -> Panel:
    """Draw one snapshot (None: before the first tick, every stage and edge without numbers yet) as a
    rich Panel."""
    parts: list[RenderableType] = [
        _stage_table(snapshot, run_info),
        Text(""),
        _edge_table(snapshot, run_info),
        Text(""),
        _summary(snapshot),
    ]
    for extra in (_clients(snapshot), _sessions(snapshot), _transcript(snapshot)):
        if extra is not None:
            parts.append(extra)
    title = f"rtpipe run {run_info['run_id']}".rstrip()
    if snapshot is not None:
        title += f" — {snapshot['seconds']:.1f} s, {snapshot['frames']} frames"
    return Panel(Group(*parts), title=title, title_align="left", expand=False)


class LiveView(Observer):
    """A rich Live display redrawn at each tick; it leaves the last frame drawn on the terminal."""

    def __init__(self, run_info: RunInfo, *, console: Console | None = None) -> None:
        self.run_info = run_info
        self.console = console or Console()
        self.last_snapshot: Snapshot | None = None  # the last one drawn
        self._live: Live | None = None

    def on_start(self, run_info: RunInfo) -> None:
        self.run_info = run_info
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

    def on_tick(self, snapshot: Snapshot) -> None:
        if self._live is not None:
            try:
                self._live.update(render_snapshot(snapshot, self.run_info), refresh=True)
            except Exception:
                # the supervisor drops an observer that raises: give the terminal back first
                self._live.stop()
                self._live = None
                raise
        self.last_snapshot = snapshot

    def on_stop(self, report: Report) -> None:
        # the report has no fill levels of its own: the last tick's stay on screen
        if self._live is not None:
            self._live.update(render_snapshot(final_snapshot(report, self.last_snapshot), self.run_info), refresh=True)
            self._live.stop()
            self._live = None
