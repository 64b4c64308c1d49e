"""The plain status printer: one line a second while a pipeline runs (pipes, CI, --no-live).

An observer (observer.Observer): frames so far, end-to-end P99, the slowest stage, drops, lost frames
and the playback glitches.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rtpipe.pipeline.observe.observer import Observer, RunInfo
from rtpipe.pipeline.observe.report import Report, Snapshot, worst_stage


class StatusLine(Observer):
    """Prints `frames N  e2e p99 X ms  worst STAGE Y ms  drops D  lost L  underruns U  device underflows V`
    at each tick, after one line naming the chain at the start."""

    def __init__(self, run_info: RunInfo | None = None, stream: TextIO | None = None):
        self.run_info = run_info
        self.stream = stream if stream is not None else sys.stdout

    def on_start(self, run_info: RunInfo) -> None:
        self.run_info = run_info
        chain = " -> ".join(f"{name} ({run_info['kinds'][name]})" for name in run_info["stages"])
        print(f"rtpipe: running {chain}", file=self.stream, flush=True)

    def on_tick(self, snapshot: Snapshot) -> None:
        print(format_status(snapshot), file=self.stream, flush=True)


def format_status(snapshot: Snapshot | Report) -> str:
    """One line from a snapshot (or a report): frames, e2e P99, worst stage by compute P99, drops,
    lost frames, the jitter buffer's underruns and the output device's own underflows."""
    drops = sum(e["dropped_oldest"] + e["dropped_newest"] for e in snapshot["edges"].values())
    worst = worst_stage(snapshot)
    worst_text = f"worst {worst[0]} {worst[1]:.2f} ms" if worst else "worst -"
    playback = snapshot["playback"]
    return (
        f"{snapshot['seconds']:6.1f} s  frames {snapshot['frames']:5d}  "
        f"e2e p99 {snapshot['end_to_end_ms']['p99']:7.2f} ms  {worst_text}  drops {drops}  "
        f"lost {snapshot['frames_lost']}  underruns {playback['underruns']}  "
        f"device underflows {playback['device_underflows']}  trims {playback['trims']}  "
        f"target {playback['target_ms']:.0f} ms"
    )
