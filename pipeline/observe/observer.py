"""What every observer of a running pipeline is: the hooks the supervisor calls while frames flow.

On every observer the supervisor calls `on_start(run_info)`, `on_frames(records)` (FRAME_RECORD_DTYPE
array), `on_tick(snapshot)` (about once a second) and `on_stop(report)`.
"""

from __future__ import annotations

from typing import Any


class Observer:
    """Base of every observer: each hook does nothing unless a subclass cares about it."""

    def on_start(self, run_info: dict) -> None:
        pass

    def on_frames(self, records: Any) -> None:
        pass

    def on_tick(self, snapshot: dict) -> None:
        pass

    def on_stop(self, report: dict) -> None:
        pass
