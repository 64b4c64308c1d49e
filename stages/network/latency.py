"""Where one client's milliseconds went, over the last few seconds: sent to it once a second as a 0x04
metadata message (JSON), for a page that draws it live.

Each answer the sink hands back carries its frame header: the tick that made its input frame, and every
stage's enter and exit time. With the time the edge sent it, that is the whole path on the server: the
source's own part, each stage's compute, each hop's wait, and the way back (the sink's hand-back to the
send, Opus encoding included). The shape (JSON):

    {"latency": {"window_s": 5.0, "frames": 61, "frame_ms": 80.0,
                 "end_to_end_ms": {"p50": 71.2, "p99": 90.3},
                 "parts": [{"name": "capture", "kind": "stage", "p50": 0.4, "p99": 1.1},
                           {"name": "capture->encode", "kind": "hop", "p50": 0.1, "p99": 0.3}, ...,
                           {"name": "back to the edge", "kind": "hop", ...}],
                 "underruns": 0, "trims": 0, "client": 3, "slot": 0}}

end_to_end_ms is the tick to the send; parts add up to it, in chain order.
"""

from __future__ import annotations

import collections
import itertools
import json

import numpy as np

from rtpipe.stages.base import FRAME_MS
from rtpipe.stages.network.protocol import METADATA

WINDOW_NS = 5_000_000_000
BACK_TO_THE_EDGE = "back to the edge"


class LatencyWindow:
    """One client's answered frames of the last WINDOW_NS: per frame, the path's parts in ms."""

    def __init__(self, chain: list[str]):
        self.chain = chain  # the pipeline's stage names, source first (a header's stage index -> name)
        self.names = _part_names(chain)
        self.kinds = _part_kinds(chain)
        self.frames: collections.deque[tuple[int, np.ndarray]] = collections.deque()  # (sent_ns, parts ms)

    def add(self, capture_ns: int, enter_ns: np.ndarray, exit_ns: np.ndarray, sent_ns: int) -> None:
        """One answer: its frame's tick, its stages' enter/exit times (header order) and when it went."""
        n = len(self.chain)
        parts = np.empty(len(self.names), dtype=np.float64)
        parts[0] = exit_ns[0] - capture_ns  # the source's own part
        column = 1
        for index in range(1, n):
            parts[column] = enter_ns[index] - exit_ns[index - 1]  # the hop into stage `index`
            parts[column + 1] = exit_ns[index] - enter_ns[index]  # its compute
            column += 2
        parts[column] = sent_ns - exit_ns[n - 1]
        self.frames.append((sent_ns, parts / 1e6))
        while self.frames and sent_ns - self.frames[0][0] > WINDOW_NS:
            self.frames.popleft()

    def summary(self) -> dict:
        """The window as the "latency" message's content (without the client's counts)."""
        if not self.frames:
            parts = np.zeros((0, len(self.names)))
        else:
            parts = np.stack([p for _, p in self.frames])
        total = parts.sum(axis=1) if parts.size else np.zeros(0)
        return {
            "window_s": WINDOW_NS / 1e9,
            "frames": int(parts.shape[0]),
            "frame_ms": FRAME_MS,
            "end_to_end_ms": _p50_p99(total),
            "parts": [
                {"name": name, "kind": kind, **_p50_p99(parts[:, i] if parts.size else np.zeros(0))}
                for i, (name, kind) in enumerate(zip(self.names, self.kinds, strict=True))
            ],
        }


def latency_message(content: dict) -> bytes:
    """The 0x04 metadata message carrying {"latency": content}."""
    return bytes([METADATA]) + json.dumps({"latency": content}, separators=(",", ":")).encode()


def _part_names(chain: list[str]) -> list[str]:
    names = [chain[0]]
    for previous, stage in itertools.pairwise(chain):
        names += [f"{previous}->{stage}", stage]
    return [*names, BACK_TO_THE_EDGE]


def _part_kinds(chain: list[str]) -> list[str]:
    return ["stage"] + ["hop", "stage"] * (len(chain) - 1) + ["hop"]


def _p50_p99(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"p50": 0.0, "p99": 0.0}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}
