"""`rtpipe bench NAME`: finds the benchmark module bench/NAME.py and runs its main(argv)."""

from __future__ import annotations

import importlib
import sys

SUMMARY = "benchmarks: ring, pipeline, mimi, lm, inline, live, sessions, serve"

BENCHMARKS = {
    "ring": "shared-memory ring vs multiprocessing / zmq, one hop",
    "pipeline": "five no-op stage processes vs a multiprocessing.Queue chain",
    "mimi": "Mimi streaming encode/decode per frame, ours vs the reference",
    "lm": "Moshi transformer step per frame, ours vs the reference",
    "inline": "encode -> step -> decode in one process, as Moshi's server runs them",
    "live": "the default pipeline on PulseAudio null sinks, LM frozen 300 ms: adaptive vs fixed playout",
    "sessions": "sessions held in real time: one pipeline batching N vs N separate pipelines",
    "serve": "rtpipe serve (or --url) with N websocket clients at real time: handshake, audio back, lag",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print("usage: rtpipe bench NAME [--json] [options]\n\nbenchmarks:")
        for name, help_ in BENCHMARKS.items():
            print(f"  {name:<9} {help_}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"{__package__}.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
