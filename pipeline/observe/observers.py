"""Which observers a run gets: `ObserverChoices` says what is asked for (`rtpipe run` fills it from its
flags), and `make_observers(choices, run_info)` builds the live view or status line, the trace writer
and the Prometheus exporter it asks for (each an `observer.Observer`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from rtpipe.pipeline.observe.observer import Observer, RunInfo
from rtpipe.pipeline.observe.prometheus import DEFAULT_HOST, PrometheusExporter

if TYPE_CHECKING:
    from rich.console import Console


@dataclass(frozen=True)
class ObserverChoices:
    """What a run asks to be watched by, as plain values."""

    trace_path: str | None = None  # write a Chrome/Perfetto trace here
    metrics_port: int | None = None  # serve /metrics on this port (0: any free port; None: no exporter)
    metrics_host: str = DEFAULT_HOST  # the address /metrics listens on
    live_view: bool = True  # the rich live view when stdout is a terminal, else the status line


def wants_live_view(choices: ObserverChoices, stdout: TextIO | None = None) -> bool:
    """The rich live view when stdout is a terminal and the live view is not turned off."""
    stdout = sys.stdout if stdout is None else stdout
    return choices.live_view and stdout.isatty()


def make_observers(
    choices: ObserverChoices, run_info: RunInfo, *, stdout: TextIO | None = None, console: Console | None = None
) -> list[Observer]:
    """The observers `choices` asks for, in the order they should be called.

    The rich live view (on `console`, if given) when wants_live_view(), else the plain status line; a
    trace writer with a trace path; a Prometheus exporter with a metrics port (its server starts
    here). Raises ConfigError if the trace file cannot be written or the port cannot be listened on.
    """
    observers: list[Observer] = []
    if wants_live_view(choices, stdout):
        from rtpipe.pipeline.observe.live_view import LiveView

        observers.append(LiveView(run_info, console=console))
    else:
        from rtpipe.pipeline.observe.status_line import StatusLine

        observers.append(StatusLine(run_info))
    if choices.trace_path:
        from rtpipe.pipeline.observe.trace import TraceWriter

        observers.append(TraceWriter(choices.trace_path, run_info))
    if choices.metrics_port is not None:
        observers.append(PrometheusExporter(run_info, port=choices.metrics_port, host=choices.metrics_host))
    return observers


__all__ = ["ObserverChoices", "make_observers", "wants_live_view"]
