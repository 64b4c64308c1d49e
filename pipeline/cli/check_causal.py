"""`rtpipe check-causal STAGE [--frames N]`: does a stage give frame by frame what it gives all at once?

Works for any processor stage (a built-in name, an entry point or package.module:Class). It feeds a
seeded signal of the stage's input kind (audio, or random codes for a code-consuming stage) frame by
frame, then all at once through the stage's optional `process_offline(frames[N, ...]) -> [N, ...]`,
and reports the largest difference. A stage without `process_offline` is checked by replaying the
signal after `reset()` and on a fresh instance: what it carries between frames must be all its state.

A NaN or an infinity agrees only with the same value at the same place in the other run (a stage that
makes the same NaN both ways is causal, and the NaN are counted apart); against anything else it
differs by infinity, so it is never within --tolerance. An exception in the stage's own code is
reported in one line naming the stage and the call.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import numpy as np

from rtpipe.pipeline.cli.arguments import check_range
from rtpipe.stages.base import AUDIO_FRAME, FRAME_SAMPLES, SAMPLE_RATE, PayloadSpec, Role, Stage
from rtpipe.stages.checkpoint import MAX_SEED
from rtpipe.stages.errors import ConfigError, RtpipeError, raised_as
from rtpipe.stages.mimi.stage import CODEBOOK_BINS, TOTAL_CODEBOOKS
from rtpipe.stages.registry import find_stage

MAX_FRAMES = 10_000  # 800 s of audio: more takes many minutes per stage and says nothing new
# the test signal's size whatever its spec: test_signal makes a few float64 arrays of it (~150 MB each)
MAX_SIGNAL_VALUES = MAX_FRAMES * FRAME_SAMPLES


class StageFailed(RtpipeError):
    """The stage under check raised in its own code (process, open, ...); the message names it."""

    kind = "stage error"


def _stage_code(kind: str, call: str):
    """Runs the stage's own code: what it raises becomes one StageFailed line naming the stage and call."""
    return raised_as(StageFailed, f"{kind}: {call}")


def _parse_spec(text: str) -> PayloadSpec:
    """'float32[1920]' or 'int32[8]' -> PayloadSpec; an integer or float dtype, every dimension >= 1."""
    usage = f"--input-spec {text!r}: expected e.g. float32[{FRAME_SAMPLES}] or int32[8]"
    try:
        dtype_name, rest = text.split("[", 1)
        if not rest.endswith("]"):
            raise ValueError
        shape = tuple(int(n) for n in rest[:-1].split(",") if n.strip())
        dtype = np.dtype(dtype_name)
    except (ValueError, TypeError) as e:
        raise ConfigError(usage) from e
    if dtype.kind not in "iuf":
        raise ConfigError(f"{usage} (an integer or float type, not {dtype.name})")
    if not shape or min(shape) < 1:
        raise ConfigError(f"{usage} (every dimension 1 or more)")
    return PayloadSpec(dtype.name, shape)


def _parse_set(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value  # a bare string such as a path
    return params


def find_input_spec(stage) -> PayloadSpec:
    """The first input the stage accepts among audio frames and code frames of 1..32 codebooks."""
    candidates = [AUDIO_FRAME] + [PayloadSpec("int32", (n,)) for n in (8, *range(1, TOTAL_CODEBOOKS + 1))]
    for spec in candidates:
        try:
            stage.output_spec(spec)
            return spec
        except ConfigError:
            continue
    raise ConfigError("stage accepts neither audio frames nor code frames; give --input-spec")


def test_signal(spec: PayloadSpec, frames: int, seed: int) -> np.ndarray:
    """[frames, *shape]: for audio, a gliding tone with noise bursts (so every band moves); for
    integers, uniform random codes below CODEBOOK_BINS (Mimi's codebook size)."""
    rng = np.random.default_rng(seed)
    shape = (frames, *spec.shape)
    if np.issubdtype(np.dtype(spec.dtype), np.integer):
        high = min(CODEBOOK_BINS, int(np.iinfo(spec.dtype).max) + 1)  # int8 holds only 0..127
        return rng.integers(0, high, size=shape).astype(spec.dtype)
    n = math.prod(shape)
    t = np.arange(n) / SAMPLE_RATE
    glide = 0.3 * np.sin(2 * np.pi * (150 * t + 400 * t * t / max(t[-1], 1e-9)))
    bursts = 0.1 * rng.standard_normal(n) * (np.sin(2 * np.pi * 1.5 * t) > 0.3)
    return (glide + bursts).astype(spec.dtype).reshape(shape)


def _check_signal(kind: str, spec: PayloadSpec, frames: int, delay: int) -> None:
    """ConfigError when the test signal would be too big, or too short to compare anything."""
    values = frames * math.prod(spec.shape)
    if values > MAX_SIGNAL_VALUES:
        raise ConfigError(
            f"--frames {frames} of {spec}: {values} values, at most {MAX_SIGNAL_VALUES} "
            "(fewer frames or a smaller --input-spec)"
        )
    if not isinstance(delay, int) or delay < 0:
        raise StageFailed(f"{kind}: delay_frames = {delay!r}: expected a whole number of frames >= 0")
    if frames <= delay:
        raise ConfigError(f"--frames {frames}: {kind} delays its output by {delay} frame(s); give more than {delay}")


def _run_stream(kind: str, stage, signal: np.ndarray) -> list:
    outputs = []
    for k, frame in enumerate(signal):
        with _stage_code(kind, f"process() of frame {k}"):
            outputs.append(stage.process(np.ascontiguousarray(frame)))
    return outputs


def _run_offline(kind: str, stage, signal: np.ndarray) -> list:
    """process_offline's output split into frames; StageFailed unless it gives one per input frame."""
    with _stage_code(kind, "process_offline()"):
        whole = np.asarray(stage.process_offline(signal))
    if whole.ndim == 0 or whole.shape[0] != len(signal):
        raise StageFailed(
            f"{kind}: process_offline() gave {whole.shape[0] if whole.ndim else 0} frames for {len(signal)}"
        )
    return list(whole)


def _as_numbers(kind: str, output, k: int) -> np.ndarray:
    array = np.asarray(output)
    if array.dtype.kind not in "biuf":
        raise StageFailed(f"{kind}: output of frame {k} has dtype {array.dtype}: not numbers to compare")
    return array.astype(np.float64)


def _value_differences(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|x - y| per value; where either is NaN or infinite: 0 if both are the same, else infinity."""
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(x - y)
    diff[np.isnan(diff)] = np.inf  # NaN on one side (or both), or +inf against +inf
    diff[(x == y) | (np.isnan(x) & np.isnan(y))] = 0.0
    return diff


def _compare(kind: str, a: list, b: list) -> dict:
    """Largest difference between two output sequences of `kind`, of equal length (None = no output
    that frame)."""
    max_diff, differing, total, nan_both, first_bad = 0.0, 0, 0, 0, None
    for k, (x, y) in enumerate(zip(a, b)):
        if (x is None) != (y is None):
            differing += 1
            first_bad = k if first_bad is None else first_bad
            max_diff = float("inf")
            continue
        if x is None:
            continue
        x, y = _as_numbers(kind, x, k), _as_numbers(kind, y, k)
        if x.shape != y.shape:
            raise StageFailed(f"{kind}: output shapes of frame {k} differ: {x.shape} vs {y.shape}")
        diff = _value_differences(x, y)
        total += diff.size
        nan_both += int(np.count_nonzero(np.isnan(x) & np.isnan(y)))
        n_bad = int(np.count_nonzero(diff))
        if n_bad and first_bad is None:
            first_bad = k
        differing += n_bad
        max_diff = max(max_diff, float(diff.max(initial=0.0)))
    return {
        "max_abs_diff": max_diff,
        "values_differing": differing,
        "values_compared": total,
        "values_nan_in_both": nan_both,
        "first_frame_differing": first_bad,
    }


def _processor_class(kind: str) -> type[Stage]:
    cls = find_stage(kind, "STAGE")
    if cls.role is not Role.PROCESSOR:
        raise ConfigError(f"STAGE = {kind!r}: a {cls.role.value}, not a processor; nothing to compare")
    if cls.process is Stage.process:
        raise ConfigError(f"STAGE = {kind!r}: does not implement process(); is it a base class?")
    return cls


def _new_stage(kind: str, cls: type[Stage], params: dict[str, Any]) -> Stage:
    with _stage_code(kind, "from_config()"):
        return cls.from_config(params, "--set")


def _compare_fresh_replay(
    kind: str, cls: type[Stage], params: dict[str, Any], streamed: list, signal: np.ndarray
) -> dict:
    fresh = _new_stage(kind, cls, params)
    with _stage_code(kind, "open()"):
        fresh.open("cpu")
    try:
        return _compare(kind, streamed, _run_stream(kind, fresh, signal))
    finally:
        with _stage_code(kind, "close()"):
            fresh.close()


def check_causal(kind: str, frames: int, params: dict, input_spec: PayloadSpec | None, seed: int = 0) -> dict:
    """Runs the check and returns the result as a dict (see main for the fields). Raises ConfigError
    for bad arguments, StageFailed when the stage's own code raises."""
    cls = _processor_class(kind)
    stage = _new_stage(kind, cls, params)
    with _stage_code(kind, "output_spec()"):
        spec = input_spec or find_input_spec(stage)
        out_spec = stage.output_spec(spec)
    with _stage_code(kind, "delay_frames"):
        delay = stage.delay_frames
    _check_signal(kind, spec, frames, delay)
    signal = test_signal(spec, frames, seed)
    offline = callable(getattr(stage, "process_offline", None))
    with _stage_code(kind, "open()"):
        stage.open("cpu")
    try:
        streamed = _run_stream(kind, stage, signal)
        with _stage_code(kind, "reset()"):
            stage.reset()
        if offline:
            # output k of the stream answers input k - delay; offline output k answers input k
            reference = _run_offline(kind, stage, signal)
            result = _compare(kind, streamed[delay:], reference[: frames - delay])
        else:
            result = _compare(kind, streamed, _run_stream(kind, stage, signal))
    finally:
        with _stage_code(kind, "close()"):
            stage.close()
    if offline:
        method = "process_offline (whole signal at once)"
    else:
        method = "replay after reset() and on a fresh instance"
        fresh_result = _compare_fresh_replay(kind, cls, params, streamed, signal)
        if fresh_result["max_abs_diff"] > result["max_abs_diff"]:
            result = fresh_result
    result.update(
        {
            "stage": kind,
            "frames": frames,
            "input_spec": str(spec),
            "output_spec": str(out_spec),
            "delay_frames": delay,
            "method": method,
        }
    )
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtpipe check-causal", description=__doc__.splitlines()[0])
    parser.add_argument("stage", metavar="STAGE", help="stage kind: a built-in name or package.module:Class")
    parser.add_argument(
        "--frames", type=int, default=100, help=f"frames of 80 ms to feed, 1 to {MAX_FRAMES} (default 100)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a stage parameter (JSON value or bare string), repeatable",
    )
    parser.add_argument(
        "--input-spec", default=None, help=f"e.g. float32[{FRAME_SAMPLES}] or int32[8] (default: found)"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest absolute difference accepted for float outputs (default 1e-4)",
    )
    parser.add_argument(
        "--max-differing",
        type=float,
        default=0.001,
        help="fraction of integer outputs (codes) allowed to differ, 0 to 1 (default 0.001)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the test signal")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    check_range("--frames", args.frames, 1, MAX_FRAMES)
    check_range("--tolerance", args.tolerance, 0.0)
    check_range("--max-differing", args.max_differing, 0.0, 1.0)
    check_range("--seed", args.seed, 0, MAX_SEED)


def _verdict(result: dict, tolerance: float, max_differing: float) -> bool:
    """Integer outputs: few enough values differ, and every frame has an output on both sides;
    float outputs: the largest difference (infinite for a NaN that is not matched) within tolerance."""
    if np.issubdtype(np.dtype(result["output_spec"].split("[")[0]), np.integer):
        fraction = result["values_differing"] / max(result["values_compared"], 1)
        return fraction <= max_differing and result["max_abs_diff"] != float("inf")
    return result["max_abs_diff"] <= tolerance


def _print_result(result: dict) -> None:
    print(
        f"{result['stage']}: {result['frames']} frames of {result['input_spec']} -> "
        f"{result['output_spec']}, streaming vs {result['method']}"
    )
    print(
        f"  largest difference {result['max_abs_diff']:.3g}; {result['values_differing']} of "
        f"{result['values_compared']} values differ"
        + (
            f" (first in frame {result['first_frame_differing']})"
            if result["first_frame_differing"] is not None
            else ""
        )
    )
    if result["values_nan_in_both"]:
        print(
            f"  note: {result['values_nan_in_both']} values are NaN in both runs, at the same places "
            "(counted as agreeing)"
        )
    print("  causal: yes" if result["ok"] else "  causal: NO (beyond tolerance)")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    _check_arguments(args)
    spec = _parse_spec(args.input_spec) if args.input_spec else None
    result = check_causal(args.stage, args.frames, _parse_set(args.set), spec, args.seed)
    result["ok"] = _verdict(result, args.tolerance, args.max_differing)
    if args.json:  # strict JSON (jq and others refuse Infinity): an unmatched NaN's infinite difference is null
        infinite = result["max_abs_diff"] == float("inf")
        print(json.dumps({**result, "max_abs_diff": None if infinite else result["max_abs_diff"]}, allow_nan=False))
    else:
        _print_result(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
