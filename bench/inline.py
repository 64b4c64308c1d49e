"""`rtpipe bench inline`: the default pipeline's three model stages run one after the other in ONE
process, as Moshi's server runs them, frame by frame on real speech.

This is the baseline that says why rtpipe gives each stage its own process: in one process a frame
costs encode + step + decode back to back on one core's worth of time, and every slow frame of any
stage is a miss of the 80 ms beat. Prints P50/P95/P99/max per stage and for the sum, the deadline
misses, and (--json) the same as JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from rtpipe.bench.arguments import check_frames, check_thread_counts, one_line_errors
from rtpipe.pipeline.observe.report import summarize_ms
from rtpipe.stages.base import FRAME_MS, FRAME_SAMPLES, Stage
from rtpipe.stages.registry import find_stage

STAGES = (("encode", "mimi.encode"), ("lm", "moshi.step"), ("decode", "mimi.decode"))


def speech_frames(frames: int) -> np.ndarray:
    """`frames` frames of the built-in speech sample, looped: float32 [frames, 1920]."""
    from rtpipe.stages.audio_io import FileCapture

    source = FileCapture.from_config({"path": "", "pace": False, "loop": True})
    source.open()
    try:
        return np.stack([_next_payload(source) for _ in range(frames)])
    finally:
        source.close()


def _next_payload(source: Stage) -> np.ndarray:
    """A copy of the source's next frame; an unpaced file always has one ready, so None is a bug."""
    frame = source.read(1.0)
    if frame is None:
        raise RuntimeError("the built-in speech sample gave no frame")
    return frame.payload.copy()


def measure(threads: int, frames: int, warmup: int) -> dict:
    """Runs encode -> step -> decode inline for warmup + frames frames with `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    stages = []
    for name, kind in STAGES:
        stage = find_stage(kind).from_config({}, f"stages.{name}.params")
        stage.open("cpu")
        stages.append((name, stage))
    per_stage_ms: dict[str, list[float]] = {name: [] for name, _ in STAGES}
    total_ms: list[float] = []
    signal = speech_frames(warmup + frames)
    try:
        for i, frame in enumerate(signal):
            start_ns = time.perf_counter_ns()
            value = frame
            for name, stage in stages:
                t0 = time.perf_counter_ns()
                value = stage.process(value)
                if i >= warmup:
                    per_stage_ms[name].append((time.perf_counter_ns() - t0) / 1e6)
            if i >= warmup:
                total_ms.append((time.perf_counter_ns() - start_ns) / 1e6)
    finally:
        for _, stage in stages:
            stage.close()
    return {
        "threads": threads,
        "stages": {name: summarize_ms(ms) for name, ms in per_stage_ms.items()},
        "one_process_ms": summarize_ms(total_ms),
        "deadline_misses": int(sum(ms > FRAME_MS for ms in total_ms)),
        "rtf_p50": round(float(np.percentile(total_ms, 50)) / FRAME_MS, 3),
    }


@one_line_errors("rtpipe bench inline")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rtpipe bench inline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200, help="timed frames per run (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed frames first (default 20)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads to try")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    check_frames(args.frames, args.warmup)  # the speech is held whole: 7.7 kB a frame
    check_thread_counts(args.threads)

    runs = []
    for threads in args.threads:
        print(f"bench inline: {threads} thread(s), {args.frames} frames ...", file=sys.stderr)
        runs.append(measure(threads, args.frames, args.warmup))
    result = {
        "frame_ms": FRAME_MS,
        "frame_samples": FRAME_SAMPLES,
        "cores": os.cpu_count(),
        "frames": args.frames,
        "stages": [kind for _, kind in STAGES],
        "runs": runs,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(
        f"encode -> step -> decode in one process, {args.frames} frames of speech, "
        f"{os.cpu_count()} cores (ms per {FRAME_MS:.0f} ms frame)"
    )
    print(f"{'threads':>7} {'part':<12} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}")
    for run in runs:
        rows = [*list(run["stages"].items()), ("all three", run["one_process_ms"])]
        for part, s in rows:
            print(f"{run['threads']:>7} {part:<12} {s['p50']:>8.2f} {s['p95']:>8.2f} {s['p99']:>8.2f} {s['max']:>8.2f}")
        print(f"{'':>7} deadline misses {run['deadline_misses']} of {args.frames}, RTF at P50 {run['rtf_p50']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
