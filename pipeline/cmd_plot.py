"""`rtpipe plot REPORT.json -o latency.png`: draw a run report's latency (see pipeline/plot.py).

Needs only the report (`rtpipe run --report FILE` keeps per-frame samples), never a re-run.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.plot import ReportError, load_report, plot_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtpipe plot",
        description="Plot a run report: end-to-end latency over time, per-stage compute time, median budget.")
    parser.add_argument("report", metavar="REPORT.json", help="a report written by `rtpipe run --report`")
    parser.add_argument("-o", "--output", metavar="PNG", default=None,
                        help="image to write (default: the report's name with .png)")
    parser.add_argument("--title", default=None, help="figure title (default: frames and seconds)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    report = load_report(args.report)
    output = args.output or os.path.splitext(args.report)[0] + ".png"
    try:
        plot_report(report, output, title=args.title)
    except OSError as e:
        raise ReportError(f"{output}: cannot write the plot ({e.strerror or e})") from None
    print(f"rtpipe: wrote {output}", file=sys.stderr)
    return 0
