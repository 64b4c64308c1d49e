"""`rtpipe run --trace run.json`: a Chrome/Perfetto trace of the run (open it in ui.perfetto.dev).

One track per stage process, one slice per frame per stage, flow arrows carrying each frame from one
process to the next, and counters for ring fill levels. The source's slice carries its parts
(report.capture_parts_ms) as args; a live source's nests its frame (algorithmic) and then device input.
Written as it goes in the JSON array format, which trace viewers read even when a crashed run never wrote
the closing bracket; `on_stop` closes it.
"""

from __future__ import annotations

import json
import os
import time
from typing import IO, Any

import numpy as np

from rtpipe.pipeline.observe.observer import Observer, RunInfo
from rtpipe.pipeline.observe.report import Report, Snapshot, capture_parts_ms
from rtpipe.stages.errors import ConfigError

MAX_LANES = 8  # slices of one stage that overlap in time (a source's 80 ms capture windows) go on lanes
SUPERVISOR_TID = 1
# one event of the Trace Event Format (name, ph, ts, pid, tid, args, ...), written as JSON as it stands
TraceEvent = dict[str, Any]


class TraceWriter(Observer):
    """Writes trace events for every frame record and tick to `path`; valid JSON once `on_stop` ran.

    Raises ConfigError (naming the path) at construction if the file cannot be written.
    """

    def __init__(self, path: str | os.PathLike[str], run_info: RunInfo) -> None:
        self.path = os.fspath(path)
        try:
            self._file: IO[str] | None = open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--trace {self.path}: cannot write the trace file ({e.strerror})") from None
        self._file.write("[\n")
        self._events_written = 0
        self._lane_end_us: list[list[float]] = []
        self._lanes_named: set[tuple[int, int]] = set()
        self._setup(run_info)

    # -- tracks -------------------------------------------------------------------------------------------

    def _setup(self, run_info: RunInfo) -> None:
        self.run_info = run_info
        self.stages: list[str] = list(run_info["stages"])
        self.t0_ns = run_info["t0_ns"]
        self.supervisor_pid = os.getpid()
        self.stage_pids: list[int] = []
        for index, name in enumerate(self.stages):
            pid = run_info["pids"].get(name, 0)
            # a stage without a known pid, or sharing one, still gets its own track
            if pid <= 0 or pid in self.stage_pids or pid == self.supervisor_pid:
                pid = 1_000_000_000 + index
            self.stage_pids.append(pid)
        self._lane_end_us = [[] for _ in self.stages]

    def _metadata(self) -> list[TraceEvent]:
        kinds = self.run_info["kinds"]
        events: list[TraceEvent] = []

        def name_process(pid: int, name: str, sort_index: int) -> None:
            events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}})
            events.append(
                {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": sort_index}}
            )

        for index, (name, pid) in enumerate(zip(self.stages, self.stage_pids)):
            kind = kinds.get(name)
            name_process(pid, f"{index} {name}" + (f" ({kind})" if kind and kind != name else ""), index)
        name_process(self.supervisor_pid, "supervisor (rings)", len(self.stages))
        events.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": self.supervisor_pid,
                "tid": SUPERVISOR_TID,
                "args": {"name": "counters"},
            }
        )
        return events

    def _lane_tid(self, stage: int, start_us: float, end_us: float) -> int:
        lanes = self._lane_end_us[stage]
        lane = next((i for i, lane_end in enumerate(lanes) if lane_end <= start_us), None)
        if lane is None:
            lane = len(lanes) if len(lanes) < MAX_LANES else len(lanes) - 1
            if lane == len(lanes):
                lanes.append(end_us)
        lanes[lane] = max(lanes[lane], end_us)
        tid = lane + 1
        pid = self.stage_pids[stage]
        if (pid, tid) not in self._lanes_named:
            self._lanes_named.add((pid, tid))
            label = "frames" if lane == 0 else f"frames (overlapping, lane {lane + 1})"
            self._write([{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": label}}])
        return tid

    # -- writing ------------------------------------------------------------------------------------------

    def _us(self, t_ns: int) -> float:
        return round((int(t_ns) - self.t0_ns) / 1000.0, 3)

    def _write(self, events: list[TraceEvent]) -> None:
        if self._file is None or not events:
            return
        parts = [json.dumps(event, separators=(",", ":")) for event in events]
        prefix = ",\n" if self._events_written else ""
        self._file.write(prefix + ",\n".join(parts))
        self._events_written += len(parts)

    def _capture_parts(self, source_slice: TraceEvent, algorithmic_ms: float, device_ms: float) -> list[TraceEvent]:
        """A live source's slice (capture to publish) split into two nested slices: its frame filling
        (algorithmic) and then device input; none for a source whose algorithmic part is 0."""
        if algorithmic_ms <= 0:
            return []
        start_us, end_us = source_slice["ts"], source_slice["ts"] + source_slice["dur"]
        frame_end_us = round(min(start_us + algorithmic_ms * 1000.0, end_us), 3)
        common = {"cat": "capture", "ph": "X", "pid": source_slice["pid"], "tid": source_slice["tid"]}
        return [
            {
                **common,
                "name": "frame (algorithmic)",
                "ts": start_us,
                "dur": round(frame_end_us - start_us, 3),
                "args": {},
            },
            {
                **common,
                "name": "device input",
                "ts": frame_end_us,
                "dur": round(max(end_us - frame_end_us, 0.0), 3),
                "args": {"device_ms": round(device_ms, 3)},
            },
        ]

    # -- observer hooks -----------------------------------------------------------------------------------

    def on_start(self, run_info: RunInfo) -> None:
        self._setup(run_info)
        # every ring starts empty: the fill counters begin at zero even if the run ends before a tick
        self._write(
            self._metadata()
            + [
                {
                    "name": f"ring {edge}",
                    "ph": "C",
                    "ts": 0,
                    "pid": self.supervisor_pid,
                    "tid": SUPERVISOR_TID,
                    "args": {"fill": 0},
                }
                for edge in self.run_info["edges"]
            ]
        )
        if self._file is not None:
            self._file.flush()

    def on_frames(self, records: np.ndarray) -> None:
        if self._file is None or len(records) == 0:
            return
        n_stages = len(self.stages)
        events: list[TraceEvent] = []
        total_ms = (records["exit_ns"][:, 0].astype(np.int64) - records["capture_ns"].astype(np.int64)) / 1e6
        parts = capture_parts_ms(
            total_ms, live_source=bool(self.run_info["live_source"]), frame_ms=float(self.run_info["frame_ms"])
        )
        for index_in_batch, record in enumerate(records):
            seq = int(record["seq"])
            flags = int(record["flags"])
            enter_ns = record["enter_ns"]
            exit_ns = record["exit_ns"]
            previous: tuple[int, int, float] | None = None  # (stage, tid, bind ts) of the last slice
            for stage in range(n_stages):
                enter, leave = int(enter_ns[stage]), int(exit_ns[stage])
                if enter <= 0 or leave < enter:  # this stage did not see the frame (lost, or restarted)
                    previous = None
                    continue
                start_us, end_us = self._us(enter), self._us(leave)
                dur_us = round(end_us - start_us, 3)
                tid = self._lane_tid(stage, start_us, end_us)
                pid = self.stage_pids[stage]
                events.append(
                    {
                        "name": self.stages[stage],
                        "cat": "stage",
                        "ph": "X",
                        "ts": start_us,
                        "dur": dur_us,
                        "pid": pid,
                        "tid": tid,
                        "args": {"seq": seq, "flags": flags},
                    }
                )
                if stage == 0:  # the source's parts, as the report counts them
                    device_ms = float(parts.device_ms[index_in_batch])
                    source_slice = events[-1]
                    source_slice["args"].update(
                        algorithmic_ms=round(parts.algorithmic_ms, 3),
                        device_ms=round(device_ms, 3),
                        work_ms=round(float(parts.work_ms[index_in_batch]), 3),
                    )
                    events += self._capture_parts(source_slice, parts.algorithmic_ms, device_ms)
                # flow arrows bind to the enclosing slice ("bp": "e") at the slice's midpoint
                bind_us = round(start_us + dur_us / 2, 3)
                if previous is not None and previous[0] == stage - 1:
                    flow_id = seq * 16 + stage  # one arrow per hop per frame
                    prev_stage, prev_tid, prev_bind_us = previous
                    events.append(
                        {
                            "name": "frame",
                            "cat": "frame",
                            "ph": "s",
                            "id": flow_id,
                            "bp": "e",
                            "ts": prev_bind_us,
                            "pid": self.stage_pids[prev_stage],
                            "tid": prev_tid,
                        }
                    )
                    events.append(
                        {
                            "name": "frame",
                            "cat": "frame",
                            "ph": "f",
                            "id": flow_id,
                            "bp": "e",
                            "ts": bind_us,
                            "pid": pid,
                            "tid": tid,
                        }
                    )
                previous = (stage, tid, bind_us)
            capture_ns, handoff_ns = int(record["capture_ns"]), int(record["handoff_ns"])
            if capture_ns > 0 and handoff_ns >= capture_ns:
                events.append(
                    {
                        "name": "end-to-end ms",
                        "ph": "C",
                        "ts": self._us(handoff_ns),
                        "pid": self.supervisor_pid,
                        "tid": SUPERVISOR_TID,
                        "args": {"ms": round((handoff_ns - capture_ns) / 1e6, 3)},
                    }
                )
        self._write(events)
        self._file.flush()

    def on_tick(self, snapshot: Snapshot) -> None:
        if self._file is None:
            return
        ts_us = self._us(time.monotonic_ns())
        events: list[TraceEvent] = []
        for edge, row in snapshot["edges"].items():
            events.append(
                {
                    "name": f"ring {edge}",
                    "ph": "C",
                    "ts": ts_us,
                    "pid": self.supervisor_pid,
                    "tid": SUPERVISOR_TID,
                    "args": {"fill": row["fill"]},
                }
            )
            events.append(
                {
                    "name": f"drops {edge}",
                    "ph": "C",
                    "ts": ts_us,
                    "pid": self.supervisor_pid,
                    "tid": SUPERVISOR_TID,
                    "args": {
                        "oldest": row["dropped_oldest"],
                        "newest": row["dropped_newest"],
                    },
                }
            )
        self._write(events)
        self._file.flush()

    def on_stop(self, report: Report) -> None:
        if self._file is None:
            return
        self._file.write("\n]\n")
        self._file.close()
        self._file = None
