"""`rtpipe`: the command line. Each subcommand lives in its own module with its own argparse parser;
this file only finds it and turns project errors into one line without a traceback.

Every command module exposes `main(argv: list[str]) -> int` (the exit code). Commands that sit above
the pipeline (`rtpipe bench`, which measures it) join through the `rtpipe.commands` entry-point group,
named in pyproject.toml, so that this package never imports the layers built on it.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points

from rtpipe.stages.errors import RtpipeError

# subcommand -> (module, one line of help). Imported only when used, so `rtpipe --help` is fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("rtpipe.pipeline.cli.run", "run the pipeline (default config: microphone or built-in speech)"),
    "config": ("rtpipe.pipeline.cli.config", "print the effective config, or what is wrong with it"),
    "devices": ("rtpipe.pipeline.cli.devices", "list audio devices"),
    "mimi": ("rtpipe.pipeline.cli.mimi", "offline Mimi: encode WAV -> codes, decode codes -> WAV"),
    "infer": ("rtpipe.pipeline.cli.infer", "offline replay: encode -> Moshi step -> decode, in one process"),
    "check-causal": ("rtpipe.pipeline.cli.check_causal", "does a stage give the same frame by frame as offline?"),
    "plot": ("rtpipe.pipeline.cli.plot", "plot a run report's latency"),
    "serve": ("rtpipe.pipeline.cli.serve", "serve the pipeline over Kyutai's /api/chat websocket protocol"),
}


COMMAND_GROUP = "rtpipe.commands"


def all_commands() -> dict[str, tuple[str, str]]:
    """The built-in commands and those installed under the `rtpipe.commands` entry-point group (value: a
    module with `main(argv)` and a one-line `SUMMARY`)."""
    commands = dict(COMMANDS)
    for entry in entry_points(group=COMMAND_GROUP):
        if entry.name not in commands:
            summary = getattr(importlib.import_module(entry.value), "SUMMARY", "")
            commands[entry.name] = (entry.value, summary)
    return commands


def usage() -> str:
    lines = ["usage: rtpipe COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in all_commands().items()]
    lines += ["", "`rtpipe COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    commands = all_commands()
    if name not in commands:
        print(f"rtpipe: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(commands[name][0])
    try:
        return int(module.main(rest) or 0)
    except RtpipeError as e:
        print(f"rtpipe: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
