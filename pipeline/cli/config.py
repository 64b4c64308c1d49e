"""`rtpipe config [CONFIG] [--set a.b=v ...]`: prints the effective config as TOML, or what is wrong.

Validates exactly as `rtpipe run` does, so a config that prints here starts there.
"""

from __future__ import annotations

import argparse

from rtpipe.pipeline.cli.arguments import add_config_arguments, with_sessions
from rtpipe.pipeline.runtime import config as pipeline_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rtpipe config", description="print the effective pipeline config, or its first error"
    )
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    raw = with_sessions(pipeline_config.load_raw(args.config), args.sessions)
    raw = pipeline_config.apply_overrides(raw, args.overrides)
    cfg = pipeline_config.validate(raw)  # ConfigError -> one line from rtpipe.pipeline.cli.main
    print(
        f"# {args.config or 'built-in default'}; chain: "
        + " -> ".join(f"{s.name} ({s.kind})" for s in cfg.stages)
        + f"; declared delay {cfg.delay_frames} frames"
    )
    print(pipeline_config.to_toml(raw), end="")
    return 0
