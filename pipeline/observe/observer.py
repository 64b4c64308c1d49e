"""What every observer of a running pipeline is: the hooks the supervisor calls while frames flow, and
`RunInfo`, what they are told about the run when it starts.

On every observer the supervisor calls `on_start(run_info)`, `on_frames(records)` (FRAME_RECORD_DTYPE
array), `on_tick(snapshot)` (about once a second) and `on_stop(report)`; the last two are the shapes
`report.Snapshot` and `report.Report`.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np

from rtpipe.pipeline.observe.report import Report, Snapshot


class RunInfo(TypedDict):
    """The run as it starts, once every stage is up (the supervisor builds it)."""

    run_id: str
    stages: list[str]  # stage names in chain order: a record's enter_ns[k] / exit_ns[k] is stages[k]'s
    kinds: dict[str, str]  # stage name -> its kind (registered name or import path)
    edges: list[str]  # "<from>-><to>", in chain order
    pids: dict[str, int]  # stage name -> its process id
    frame_ms: float
    t0_ns: int  # time.monotonic_ns() when the run started; a report's t_s counts from it
    slots: dict[str, int]  # edge -> the frames its ring holds
    live_source: bool  # the source captures live (a microphone): its frame takes frame_ms to arrive
    sessions: int  # session slots each frame carries


class Observer:
    """Base of every observer: each hook does nothing unless a subclass cares about it."""

    def on_start(self, run_info: RunInfo) -> None:
        pass

    def on_frames(self, records: np.ndarray) -> None:
        pass

    def on_tick(self, snapshot: Snapshot) -> None:
        pass

    def on_stop(self, report: Report) -> None:
        pass
