"""Checks of command-line values that several commands share (rtpipe's own and the benchmarks'): each
failure is a ConfigError naming the flag, printed as one line with exit code 2."""

from __future__ import annotations

import argparse
import math
import os

from rtpipe.stages.errors import ConfigError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG (a TOML file, optional) and --set A.B.C=VALUE (repeatable, into args.overrides): how every
    command that takes a pipeline config is told which one."""
    parser.add_argument("config", nargs="?", help="a TOML config (default: the built-in one)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="A.B.C=VALUE",
        help="override one config field, e.g. --set stages.lm.kind=echo (repeatable)",
    )


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
