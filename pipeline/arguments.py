"""Checks of command-line values that several commands share (rtpipe's own and the benchmarks'): each
failure is a ConfigError naming the flag, printed as one line with exit code 2."""

from __future__ import annotations

import math

from stages.errors import ConfigError


def check_range(flag: str, value: float, low: float, high: float | None = None) -> None:
    """Raises ConfigError naming `flag` unless low <= value <= high (no upper bound when high is None);
    NaN and infinities are refused too."""
    finite = not isinstance(value, float) or math.isfinite(value)
    if finite and low <= value and (high is None or value <= high):
        return
    expected = f"at least {low}" if high is None else f"{low} to {high}"
    raise ConfigError(f"{flag} {value}: expected {expected}")
