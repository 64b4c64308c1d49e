"""`rtpipe config [CONFIG] [--set a.b=v ...]`: prints the effective config as TOML, or what is wrong.

Validates exactly as `rtpipe run` does, so a config that prints here starts there.
"""

from __future__ import annotations

import argparse

from rtpipe.pipeline.runtime import config as pipeline_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rtpipe config", description="print the effective pipeline config, or its first error"
    )
    parser.add_argument("config", nargs="?", help="a TOML config (default: the built-in one)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="A.B.C=VALUE",
        help="override one field, e.g. --set stages.lm.kind=echo (repeatable)",
    )
    args = parser.parse_args(argv)
    raw = pipeline_config.apply_overrides(pipeline_config.load_raw(args.config), args.overrides)
    cfg = pipeline_config.validate(raw)  # ConfigError -> one line from rtpipe.pipeline.cli.main
    print(
        f"# {args.config or 'built-in default'}; chain: "
        + " -> ".join(f"{s.name} ({s.kind})" for s in cfg.stages)
        + f"; declared delay {cfg.delay_frames} frames"
    )
    print(pipeline_config.to_toml(raw), end="")
    return 0
