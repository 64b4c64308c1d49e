"""The supervisor's side of the sink's frame records: FrameRecords drains the records ring, keeps every
record of the run and the last few seconds of them, counts the frames lost on the way, and builds the
live snapshot and the final report from them (the arithmetic is pipeline/observe/report.py's).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np

from rtpipe.pipeline.observe.report import Report, RunCounters, Snapshot, build_report, build_snapshot, count_lost
from rtpipe.shm.frame import FRAME_RECORD_DTYPE
from rtpipe.shm.ring import Consumer

SNAPSHOT_WINDOW_NS = 5_000_000_000  # the live snapshot's percentiles cover the last 5 s


class FrameRecords:
    """Every FRAME_RECORD_DTYPE record the sink wrote in this run, in the order taken.

    `batches` holds one array per drain that found records (other threads may read it: it only ever
    grows); `recent` the batches whose newest frame was captured within SNAPSHOT_WINDOW_NS."""

    def __init__(self) -> None:
        self.consumer: Consumer | None = None  # the records ring's consumer end, once it exists
        self.batches: list[np.ndarray] = []
        self.recent: deque[np.ndarray] = deque()

    def drain(self) -> np.ndarray | None:
        """Takes the records the sink has written since the last call; None when there are none."""
        consumer = self.consumer
        if consumer is None:
            return None
        taken = []
        while (slot := consumer.acquire(timeout_s=0)) is not None:
            taken.append(slot.payload.tobytes())
            slot.release()
        if not taken:
            return None
        records = np.frombuffer(b"".join(taken), dtype=FRAME_RECORD_DTYPE)
        self.batches.append(records)
        self.recent.append(records)
        return records

    @property
    def frames(self) -> int:
        """Records taken so far."""
        return sum(r.size for r in self.batches)

    def frames_lost(self, dropped_by_rings: int) -> int:
        """Frames missing at the sink that no ring's policy dropped: the ones a crash lost."""
        seqs = np.concatenate([r["seq"] for r in self.batches]) if self.batches else np.zeros(0, np.int64)
        # every sequence gap at the sink is a frame some ring dropped by policy or one a crash lost
        return max(0, count_lost(seqs) - dropped_by_rings)

    def snapshot(self, counters: RunCounters, *, now_ns: int, t0_ns: int) -> Snapshot:
        """The once-a-second snapshot at time.monotonic_ns() `now_ns`: percentiles over the last
        SNAPSHOT_WINDOW_NS of records, `counters` for the whole run (run started at t0_ns)."""
        recent = self.recent
        while recent and recent[0].size and now_ns - int(recent[0]["capture_ns"][-1]) > SNAPSHOT_WINDOW_NS:
            recent.popleft()
        window = np.concatenate(list(recent)) if recent else np.zeros(0, FRAME_RECORD_DTYPE)
        return build_snapshot(window, counters, frames_total=self.frames, seconds=(now_ns - t0_ns) / 1e9, t0_ns=t0_ns)

    def report(
        self,
        counters: RunCounters,
        *,
        t0_ns: int,
        delay_frames: int,
        config: dict[str, Any],
        device_latency_ms: float | None,
    ) -> Report:
        """The run report over every record, in sequence order; `t0_ns` 0: the run never started."""
        records = np.concatenate(self.batches) if self.batches else np.zeros(0, FRAME_RECORD_DTYPE)
        records = records[np.argsort(records["seq"], kind="stable")]
        seconds = (time.monotonic_ns() - t0_ns) / 1e9 if t0_ns else 0.0
        return build_report(
            records,
            counters,
            seconds=seconds,
            t0_ns=t0_ns,
            delay_frames=delay_frames,
            config=config,
            device_latency_ms=device_latency_ms,
        )

    def session_report(
        self, counters: RunCounters, *, slot: int, first_capture_ns: int, last_capture_ns: int, t0_ns: int
    ) -> Report:
        """The report's shape over one conversation's frames: those that carried slot `slot` live,
        captured from `first_capture_ns` to `last_capture_ns` (the run's counters, its text left out)."""
        records = np.concatenate(self.batches) if self.batches else np.zeros(0, FRAME_RECORD_DTYPE)
        live = (records["live"].astype(np.uint64) >> np.uint64(slot)) & np.uint64(1) == 1
        captured = records["capture_ns"].astype(np.int64)
        mine = records[live & (captured >= first_capture_ns) & (captured <= last_capture_ns)]
        mine = mine[np.argsort(mine["seq"], kind="stable")]
        only_slot = RunCounters(
            stage_names=counters.stage_names,
            edge_names=counters.edge_names,
            restarts=counters.restarts,
            edges=counters.edges,
            live_source=counters.live_source,
            frames_lost=_gaps(mine["seq"]),  # missing between its frames: lost to this conversation
        )
        return build_report(
            mine,
            only_slot,
            seconds=(last_capture_ns - first_capture_ns) / 1e9 if mine.size else 0.0,
            t0_ns=t0_ns,
            delay_frames=0,
            config={},
            device_latency_ms=None,
        )

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()


def _gaps(seqs: np.ndarray) -> int:
    """Sequence numbers missing between the first and the last of `seqs` (sorted or not)."""
    unique = np.unique(seqs.astype(np.int64))
    return int(unique[-1] - unique[0] + 1 - unique.size) if unique.size else 0
