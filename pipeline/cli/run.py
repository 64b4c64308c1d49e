"""`rtpipe run`: validates a config, runs it under the supervisor, prints a table and writes the report.

With no arguments it runs the built-in config microphone -> speaker when audio devices exist, else the
built-in speech sample to rtpipe-out.wav, and says which it chose.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtpipe.pipeline.cli.arguments import (
    add_config_arguments,
    check_output_path,
    file_identity,
    positive_seconds,
    with_sessions,
)
from rtpipe.pipeline.cli.observer_arguments import add_observer_arguments, check_observer_arguments, observer_choices
from rtpipe.pipeline.observe import observers
from rtpipe.pipeline.observe.observer import Observer, RunInfo
from rtpipe.pipeline.observe.report import Percentiles, Report
from rtpipe.pipeline.runtime import config as pipeline_config
from rtpipe.pipeline.runtime.supervisor import EXIT_DEGRADED, EXIT_HEALTHY, Supervisor
from rtpipe.stages.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_OUTPUT = "rtpipe-out.wav"
DEFAULT_OUTPUT_DIR = "rtpipe-out"  # with more than one session: one WAV each, session-<k>.wav


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtpipe run",
        description="run the pipeline: one process per stage, shared-memory rings",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="With no CONFIG, --input or --output: microphone -> speaker when audio devices exist, else\n"
        f"the built-in speech sample -> {DEFAULT_OUTPUT} ({DEFAULT_OUTPUT_DIR}/ with --sessions over 1).\n"
        "Exit code: 0 healthy, 1 failed (a stage could not start or kept dying), 2 bad config or\n"
        "arguments, 3 finished degraded (a stage was restarted or frames were lost).",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--input",
        metavar="FILE.wav",
        action="append",
        help="capture from this file instead of the source; repeated, one per session (reused in turn)",
    )
    parser.add_argument("--output", metavar="FILE.wav", help="play into this file instead of the sink")
    parser.add_argument(
        "--output-dir", metavar="DIR", help="play each session into DIR/session-<k>.wav instead of the sink"
    )
    parser.add_argument(
        "--no-pace", action="store_true", help="read --input as fast as the pipeline takes it, not at real time"
    )
    parser.add_argument("--seconds", type=positive_seconds, metavar="N", help="stop after N seconds")
    parser.add_argument("--report", metavar="FILE.json", help="write the run report (JSON) here")
    add_observer_arguments(parser)
    return parser


def effective_raw(
    args: argparse.Namespace,
    devices_available: Callable[[], bool] | None = None,
    say: Callable[[str], object] = print,
) -> dict[str, Any]:
    """The config a run uses: file or default, then --sessions, --input/--output/--output-dir/--no-pace,
    then --set.

    With the built-in config, a microphone or speaker on a machine without audio devices (or with more
    than one session, which they cannot carry) becomes the built-in speech sample / rtpipe-out.wav
    (rtpipe-out/ for many sessions); `say` is told which was chosen."""
    if args.output is not None and args.output_dir is not None:
        raise ConfigError("--output and --output-dir: give one (a file for one session, a directory for many)")
    raw = with_sessions(pipeline_config.load_raw(args.config), args.sessions)
    many_sessions = isinstance(raw.get("sessions"), int) and raw["sessions"] > 1
    stages = raw.get("stages", {})
    names = list(stages)
    source, sink = (names[0], names[-1]) if names else (None, None)
    edges = raw.get("edges", {})

    def first_edge() -> dict | None:
        for label, table in edges.items():
            if label.partition("->")[0].strip() == source and isinstance(table, dict):
                return table
        return None

    inputs: list[str] | None = args.input
    output_path, output_dir = args.output, args.output_dir
    announce = None
    if args.config is None:
        # the built-in config wants a microphone and a speaker: without devices (or with many sessions),
        # use the built-in speech sample and rtpipe-out.wav (or rtpipe-out/) for whichever end was not given
        needs_devices = inputs is None or (output_path is None and output_dir is None)
        if devices_available is None:
            from rtpipe.stages.audio_io import audio_devices_available

            devices_available = audio_devices_available
        if needs_devices and many_sessions:
            inputs = [""] if inputs is None else inputs
            if output_path is None and output_dir is None:
                output_dir = DEFAULT_OUTPUT_DIR
            announce = "rtpipe: many sessions: "
        elif needs_devices and devices_available():
            announce = "rtpipe: audio devices found: "
        elif needs_devices:
            inputs = [""] if inputs is None else inputs
            if output_path is None and output_dir is None:
                output_path = DEFAULT_OUTPUT
            announce = "rtpipe: no audio devices: "
    if inputs is not None and source is not None:
        files: dict[str, Any] = {"path": inputs[0]} if len(inputs) == 1 else {"paths": list(inputs)}
        stages[source] = {**stages[source], "kind": "capture.file", "params": {**files, "pace": not args.no_pace}}
        edge = first_edge()
        if edge is not None:
            edge["policy"] = "block"  # a file can wait; nothing of it is lost
    elif args.no_pace and source is not None:
        stages[source].setdefault("params", {})["pace"] = False
    if output_path is not None and sink is not None:
        stages[sink] = {**stages[sink], "kind": "playback.file", "params": {"path": str(output_path)}}
    elif output_dir is not None and sink is not None:
        stages[sink] = {**stages[sink], "kind": "playback.file", "params": {"output_dir": str(output_dir)}}
    raw = pipeline_config.apply_overrides(raw, args.overrides)
    if announce:  # what was chosen, as --set left it
        final = raw.get("stages", {})
        source_name = _end_name(final.get(source))
        say(
            f"{announce}{source_name} -> pipeline -> {_end_name(final.get(sink))}"
            + (" (Ctrl-C to stop)" if source_name == "microphone" else "")
        )
    return raw


def _end_name(table: object) -> str:
    """How the run's source or sink is called in one line: microphone, speaker, a file, or its kind."""
    if not isinstance(table, dict):
        table = {}
    kind, params = table.get("kind"), table.get("params") or {}
    names = {"capture.microphone": "microphone", "playback.speaker": "speaker"}
    if kind == "capture.file":
        paths = params.get("paths") or [params.get("path")]
        return ", ".join(str(p or "the built-in speech sample") for p in paths)
    if kind == "playback.file":
        if params.get("output_dir"):
            return f"{params['output_dir']}/session-<k>.wav"
        return str(params.get("path") or DEFAULT_OUTPUT)
    return names.get(str(kind), str(kind))


def check_distinct_files(cfg: pipeline_config.PipelineConfig, args: argparse.Namespace) -> None:
    """ConfigError when two of the run's files (input, output, --report, --trace) are one file: the
    output or a report would overwrite the input, or each other, while the run reads or writes them."""
    source, sink = cfg.stages[0], cfg.stages[-1]
    files: list[tuple[str, str | None]] = []
    if source.kind == "capture.file":
        inputs = source.params_raw.get("paths") or [source.params_raw.get("path")]
        files += [("the input", path) for path in dict.fromkeys(inputs)]  # one input may serve many sessions
    if sink.kind == "playback.file":
        output_dir = sink.params_raw.get("output_dir")
        if output_dir:
            files += [
                (f"the output of session {k}", str(Path(output_dir) / f"session-{k}.wav")) for k in range(cfg.sessions)
            ]
        else:
            files.append(("the output", sink.params_raw.get("path") or DEFAULT_OUTPUT))
    files += [("--report", args.report), ("--trace", args.trace)]
    seen: dict[object, str] = {}
    for name, path in files:
        if not path:
            continue
        key = file_identity(path)
        if key in seen:
            raise ConfigError(f"{name} {path} is also {seen[key]}: give each its own file")
        seen[key] = name


def format_table(report: Report) -> str:
    """The end-of-run table: per stage, per edge, end to end, then lost frames and playback glitches."""

    def p(d: Percentiles) -> str:
        return f"{d['p50']:8.3f} {d['p95']:8.3f} {d['p99']:8.3f} {d['max']:8.3f}"

    lines = [
        f"{'stage':<12} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'rtf':>7} "
        f"{'misses':>6} {'restarts':>8}"
    ]
    capture = report.get("capture")
    for index, (name, s) in enumerate(report["stages"].items()):
        lines.append(f"{name:<12} {p(s['compute_ms'])} {s['rtf']:7.4f} {s['deadline_misses']:6d} {s['restarts']:8d}")
        if index == 0 and capture and capture["live_source"]:  # the source's row is its own work; its other parts:
            lines.append(f"{'  + device':<12} {p(capture['device_ms'])}   (input: its last sample to the publish)")
            lines.append(f"{'  + frame':<12} {capture['algorithmic_ms']:8.3f}   (algorithmic: the frame fills first)")
    lines.append(
        f"{'edge (wait)':<20} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'drop-old':>8} {'drop-new':>8} {'blocked':>7}"
    )
    for name, e in report["edges"].items():
        lines.append(
            f"{name:<20} {p(e['wait_ms'])} {e['dropped_oldest']:8d} {e['dropped_newest']:8d} {e['blocked']:7d}"
        )
    lines.append(
        f"{'end to end':<20} {p(report['end_to_end_ms'])}   ({report['frames']} frames, "
        f"{report['seconds']:.1f} s, declared delay {report['delay_frames']} frames)"
    )
    sessions = report.get("sessions", {})
    if len(sessions) > 1 or set(sessions) - {"0"}:
        for slot, row in sessions.items():
            lines.append(
                f"{'  session ' + slot:<20} {p(row['end_to_end_ms'])}   ({row['frames']} frames, "
                f"{row['frames_lost']} lost)"
            )
    pb = report["playback"]
    latency = report.get("device_latency_ms")
    lines.append(
        f"frames lost {report['frames_lost']}; playback underruns {pb['underruns']}, overflows "
        f"{pb['overflows']}, device underflows {pb['device_underflows']}, trims {pb['trims']} "
        f"({pb['trimmed_ms']:.0f} ms), target {pb['target_ms']:.0f} ms"
        + (f"; device output latency {latency:.1f} ms" if latency else "")
    )
    return "\n".join(lines)


@contextlib.contextmanager
def ctrl_c_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside (in the main thread; elsewhere signals do not arrive anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    raw = effective_raw(args)
    cfg = pipeline_config.validate(raw)  # ConfigError -> one line, before anything starts
    check_distinct_files(cfg, args)
    sink = cfg.stages[-1]
    if sink.kind == "playback.file":
        print(f"rtpipe: writing {sink.params_raw.get('path') or DEFAULT_OUTPUT}")

    check_observer_arguments(args)  # a bad --trace path or a taken port fails before any stage starts
    if args.report:
        check_output_path(args.report, "--report")

    choices = observer_choices(args)
    console: Console | None = None
    logs: AbstractContextManager[object] = contextlib.nullcontext()
    if observers.wants_live_view(choices):  # every log line, ours and the stages', goes above the view
        from rich.console import Console

        from rtpipe.pipeline.observe.console_logs import StderrThroughConsole

        console = Console()
        logs = StderrThroughConsole(console)

    def make_observers(run_info: RunInfo) -> list[Observer]:
        return observers.make_observers(choices, run_info, console=console)

    with logs:
        result = Supervisor(cfg, observer_factory=make_observers, seconds=args.seconds).run()
    with ctrl_c_ignored():  # the run is over: a Ctrl-C pressed late must not cut the report short
        print(format_table(result.report))
        if args.report:
            Path(args.report).write_text(json.dumps(result.report, indent=1) + "\n", encoding="utf-8")
            print(f"rtpipe: report written to {args.report}")
    if result.error:
        print(f"rtpipe: run failed: {result.error}", file=sys.stderr)
    elif result.exit_code == EXIT_DEGRADED:
        print("rtpipe: run finished degraded (a stage restarted or frames were lost)", file=sys.stderr)
    elif result.exit_code != EXIT_HEALTHY:
        print("rtpipe: run did not finish", file=sys.stderr)
    return result.exit_code
