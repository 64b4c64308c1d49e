"""Checks of command-line values that several commands share (rtpipe's own and the benchmarks'): each
failure is a ConfigError naming the flag, printed as one line with exit code 2."""

from __future__ import annotations

import argparse
import math
import os

from rtpipe.shm.frame import MAX_SESSIONS
from rtpipe.stages.errors import ConfigError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG (a TOML file, optional), --sessions N and --set A.B.C=VALUE (repeatable, into
    args.overrides): how every command that takes a pipeline config is told which one."""
    parser.add_argument("config", nargs="?", help="a TOML config (default: the built-in one)")
    add_sessions_argument(parser)
    add_overrides_argument(parser, "override one config field, e.g. --set stages.lm.kind=echo (repeatable)")


def add_overrides_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """--set A.B.C=VALUE, repeatable, into args.overrides (pipeline/runtime/config.py applies them)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B.C=VALUE", help=help)


def add_sessions_argument(parser: argparse.ArgumentParser) -> None:
    """--sessions N: how many conversations each frame carries (the config's `sessions` key)."""
    parser.add_argument(
        "--sessions",
        type=int,
        metavar="N",
        help=f"conversations the pipeline carries at once, 1 to {MAX_SESSIONS} (default: the config's, else 1)",
    )


def with_sessions(raw: dict, sessions: int | None) -> dict:
    """The config with --sessions applied (checked with the rest of the config: one line if bad)."""
    if sessions is not None:
        raw["sessions"] = sessions
    return raw


def positive_seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds (argparse names the flag in its error)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of seconds")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port}: a port is 0-65535 (0: any free port)")
    return port


def check_range(flag: str, value: float, low: float, high: float | None = None) -> None:
    """Raises ConfigError naming `flag` unless low <= value <= high (no upper bound when high is None);
    NaN and infinities are refused too."""
    finite = not isinstance(value, float) or math.isfinite(value)
    if finite and low <= value and (high is None or value <= high):
        return
    expected = f"at least {low}" if high is None else f"{low} to {high}"
    raise ConfigError(f"{flag} {value}: expected {expected}")


def file_identity(path: str) -> object:
    """What makes two paths one file: device and inode when it exists (symlinks and hard links too),
    else the resolved path (a file still to be written)."""
    path = os.path.expanduser(path)
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def check_output_path(path: str, flag: str) -> None:
    """Raises ConfigError naming `flag` when a file cannot be written at `path`: it is a directory, its
    directory does not exist, or that directory is not writable."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a directory")
    if not os.path.isdir(directory):
        raise ConfigError(f"{flag} {path}: no such directory {directory}")
    if not os.access(directory, os.W_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {directory}")
