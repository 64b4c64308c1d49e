"""`rtpipe plot REPORT.json -o latency.png`: draw a run report's latency (observe/plot.py draws it).

Needs only the report (`rtpipe run --report FILE` keeps per-frame samples), never a re-run.
"""

from __future__ import annotations

import argparse
import os
import sys

from rtpipe.pipeline.cli.arguments import check_output_path
from rtpipe.pipeline.observe.plot import load_report, plot_report
from rtpipe.stages.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtpipe plot",
        description="Plot a run report: end-to-end latency over time, per-stage compute time, median budget.",
    )
    parser.add_argument("report", metavar="REPORT.json", help="a report written by `rtpipe run --report`")
    parser.add_argument(
        "-o", "--output", metavar="PNG", default=None, help="image to write (default: the report's name with .png)"
    )
    parser.add_argument("--title", default=None, help="figure title (default: frames and seconds)")
    return parser


def check_image_path(path: str) -> None:
    """ConfigError naming -o unless an image can be written at `path` in a format matplotlib knows
    (it picks the format from the extension, and adds .png to a name without one)."""
    from matplotlib.backend_bases import FigureCanvasBase

    check_output_path(path, "-o")
    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(path)[1][1:].lower()
    if extension not in formats:
        what = f".{extension}" if extension else "a file without an extension"
        known = ", ".join(f".{name}" for name in sorted(formats))
        raise ConfigError(f"-o {path}: matplotlib cannot write {what} (it writes {known})")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    report = load_report(args.report)
    output = args.output or os.path.splitext(args.report)[0] + ".png"
    check_image_path(output)
    plot_report(report, output, title=args.title)
    print(f"rtpipe: wrote {output}", file=sys.stderr)
    return 0
