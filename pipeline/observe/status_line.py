"""The plain status printer: one line a second while a pipeline runs (pipes, CI, --no-live).

An observer (see pipeline/observe.py): frames so far, end-to-end P99, the slowest stage, drops.
"""

from __future__ import annotations

import sys

from rtpipe.pipeline.observe.report import worst_stage


class StatusLine:
    """Prints `frames N  e2e p99 X ms  worst STAGE Y ms  drops D  lost L` at each tick."""

    def __init__(self, run_info: dict | None = None, stream=None):
        self.run_info = run_info or {}
        self.stream = stream if stream is not None else sys.stdout

    def on_start(self, run_info: dict) -> None:
        self.run_info = run_info
        chain = " -> ".join(f"{name} ({run_info['kinds'][name]})" for name in run_info["stages"])
        print(f"rtpipe: running {chain}", file=self.stream, flush=True)

    def on_frames(self, records) -> None:
        pass

    def on_tick(self, snapshot: dict) -> None:
        print(format_status(snapshot), file=self.stream, flush=True)

    def on_stop(self, report: dict) -> None:
        pass


def format_status(snapshot: dict) -> str:
    """One line from a snapshot (or a report): frames, e2e P99, worst stage by compute P99, drops."""
    drops = sum(e["dropped_oldest"] + e["dropped_newest"] for e in snapshot.get("edges", {}).values())
    worst = worst_stage(snapshot)
    worst_text = f"worst {worst[0]} {worst[1]:.2f} ms" if worst else "worst -"
    playback = snapshot.get("playback", {})
    return (
        f"{snapshot.get('seconds', 0):6.1f} s  frames {snapshot.get('frames', 0):5d}  "
        f"e2e p99 {snapshot['end_to_end_ms']['p99']:7.2f} ms  {worst_text}  drops {drops}  "
        f"lost {snapshot.get('frames_lost', 0)}  underruns {playback.get('underruns', 0)}"
    )
