"""Argument checks the benchmarks share (frame, torch thread and session counts), and one-line errors: a
benchmark's main() decorated with `one_line_errors` prints a bad argument in one line and returns 2, also
when it is called directly (tests) rather than through `rtpipe bench`."""

from __future__ import annotations

import functools
import os
import sys

from rtpipe.pipeline.cli.arguments import check_range
from rtpipe.shm.frame import MAX_SESSIONS
from rtpipe.stages.errors import ConfigError, RtpipeError

MAX_FRAMES = 10_000  # timed frames per case: 13 minutes of 80 ms frames, hours for a big model
# torch thread counts timed by default: 1 and 2, as far as this machine has cores
DEFAULT_THREADS = ",".join(str(n) for n in (1, 2) if n <= (os.cpu_count() or 1))


def one_line_errors(prog: str):
    """Decorates a benchmark's main(argv): an RtpipeError becomes `prog: <what is wrong>` on stderr
    and exit code 2, as `rtpipe` itself prints it."""

    def decorate(main):
        @functools.wraps(main)
        def checked_main(argv: list[str]) -> int:
            try:
                return main(argv)
            except RtpipeError as e:
                print(f"{prog}: {e}", file=sys.stderr)
                return 2

        return checked_main

    return decorate


def check_frames(frames: int, warmup: int) -> None:
    """ConfigError unless 1 <= --frames and 0 <= --warmup, both at most MAX_FRAMES."""
    check_range("--frames", frames, 1, MAX_FRAMES)
    check_range("--warmup", warmup, 0, MAX_FRAMES)


def check_thread_counts(counts: list[int]) -> None:
    """ConfigError unless every torch thread count is 1 to this machine's cores (more only adds noise)."""
    cores = os.cpu_count() or 1
    if not counts:
        raise ConfigError("--threads: expected at least one thread count, e.g. 1,2")
    bad = [count for count in counts if not 1 <= count <= cores]
    if bad:  # and torch crashes on a huge count
        raise ConfigError(f"--threads {bad[0]}: expected 1 to {cores} (this machine has {cores} cores)")


def parse_thread_counts(text: str) -> list[int]:
    """'1,2' -> [1, 2], checked by check_thread_counts; ConfigError naming --threads otherwise."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--threads {text!r}: expected counts like 1,2") from None
    check_thread_counts(counts)
    return counts


def parse_session_counts(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]: conversations live per frame, each 1 to MAX_SESSIONS; ascending, without
    repeats, and with 1 added when missing (the baseline a conversation's cost at N is divided by).
    ConfigError naming --sessions otherwise."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--sessions {text!r}: expected counts like 1,2,4,8") from None
    if not counts:
        raise ConfigError("--sessions: expected at least one count, e.g. 1,2,4,8")
    for count in counts:
        check_range("--sessions", count, 1, MAX_SESSIONS)
    return sorted({1, *counts})
