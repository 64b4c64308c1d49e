"""`rtpipe check-causal STAGE [--frames N]`: does a stage give frame by frame what it gives all at once?

Works for any processor stage (a built-in name, an entry point or package.module:Class). It feeds a
seeded signal of the stage's input kind (audio, or random codes for a code-consuming stage) frame by
frame, then all at once through the stage's optional `process_offline(frames[N, ...]) -> [N, ...]`,
and reports the largest difference. A stage without `process_offline` is checked by replaying the
signal after `reset()` and on a fresh instance: what it carries between frames must be all its state.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from stages.base import AUDIO_FRAME, SAMPLE_RATE, PayloadSpec, Role
from stages.errors import ConfigError
from stages.registry import find_stage

CODE_CARDINALITY = 2048  # random codes are drawn below this (Mimi's codebook size)


def _parse_spec(text: str) -> PayloadSpec:
    """'float32[1920]' or 'int32[8]' -> PayloadSpec."""
    try:
        dtype, rest = text.split("[", 1)
        shape = tuple(int(n) for n in rest.rstrip("]").split(",") if n.strip())
        np.dtype(dtype)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--input-spec {text!r}: expected e.g. float32[1920] or int32[8]") from e
    return PayloadSpec(dtype, shape)


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
    candidates = [AUDIO_FRAME] + [PayloadSpec("int32", (n,)) for n in (8, *range(1, 33))]
    for spec in candidates:
        try:
            stage.output_spec(spec)
            return spec
        except ConfigError:
            continue
    raise ConfigError("stage accepts neither audio frames nor code frames; give --input-spec")


def test_signal(spec: PayloadSpec, frames: int, seed: int) -> np.ndarray:
    """[frames, *shape]: for audio, a gliding tone with noise bursts (so every band moves); for
    integers, uniform random codes below CODE_CARDINALITY."""
    rng = np.random.default_rng(seed)
    shape = (frames, *spec.shape)
    if np.issubdtype(np.dtype(spec.dtype), np.integer):
        return rng.integers(0, CODE_CARDINALITY, size=shape).astype(spec.dtype)
    n = int(np.prod(shape))
    t = np.arange(n) / SAMPLE_RATE
    glide = 0.3 * np.sin(2 * np.pi * (150 * t + 400 * t * t / max(t[-1], 1e-9)))
    bursts = 0.1 * rng.standard_normal(n) * (np.sin(2 * np.pi * 1.5 * t) > 0.3)
    return (glide + bursts).astype(spec.dtype).reshape(shape)


def _run_stream(stage, signal: np.ndarray) -> list:
    return [stage.process(np.ascontiguousarray(frame)) for frame in signal]


def _compare(a: list, b: list) -> dict:
    """Largest difference between two output sequences of equal length (None = no output that frame)."""
    max_diff, differing, total, first_bad = 0.0, 0, 0, None
    for k, (x, y) in enumerate(zip(a, b)):
        if (x is None) != (y is None):
            differing += 1
            first_bad = k if first_bad is None else first_bad
            max_diff = float("inf")
            continue
        if x is None:
            continue
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            raise ConfigError(f"frame {k}: output shapes differ: {x.shape} vs {y.shape}")
        diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
        total += diff.size
        n_bad = int(np.count_nonzero(diff))
        if n_bad and first_bad is None:
            first_bad = k
        differing += n_bad
        max_diff = max(max_diff, float(diff.max(initial=0.0)))
    return {"max_abs_diff": max_diff, "values_differing": differing, "values_compared": total,
            "first_frame_differing": first_bad}


def check_causal(kind: str, frames: int, params: dict, input_spec: PayloadSpec | None,
                 seed: int = 0) -> dict:
    """Runs the check and returns the result as a dict (see main for the fields)."""
    cls = find_stage(kind, "STAGE")
    if cls.role is not Role.PROCESSOR:
        raise ConfigError(f"STAGE = {kind!r}: a {cls.role.value}, not a processor; nothing to compare")
    stage = cls.from_config(params, "--set")
    spec = input_spec or find_input_spec(stage)
    out_spec = stage.output_spec(spec)
    delay = stage.delay_frames
    signal = test_signal(spec, frames, seed)
    stage.open("cpu")
    try:
        streamed = _run_stream(stage, signal)
        stage.reset()
        offline_fn = getattr(stage, "process_offline", None)
        if callable(offline_fn):
            whole = np.asarray(offline_fn(signal))
            reference = [whole[k] for k in range(whole.shape[0])]
            # output k of the stream answers input k - delay; offline output k answers input k
            result = _compare(streamed[delay:], reference[:frames - delay])
            method = "process_offline (whole signal at once)"
        else:
            result = _compare(streamed, _run_stream(stage, signal))
            method = "replay after reset() and on a fresh instance"
    finally:
        stage.close()
    if method.startswith("replay"):
        fresh = cls.from_config(params, "--set")
        fresh.open("cpu")
        try:
            fresh_result = _compare(streamed, _run_stream(fresh, signal))
        finally:
            fresh.close()
        if fresh_result["max_abs_diff"] > result["max_abs_diff"]:
            result = fresh_result
    result.update({"stage": kind, "frames": frames, "input_spec": str(spec), "output_spec": str(out_spec),
                   "delay_frames": delay, "method": method})
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rtpipe check-causal", description=__doc__.splitlines()[0])
    parser.add_argument("stage", metavar="STAGE", help="stage kind: a built-in name or package.module:Class")
    parser.add_argument("--frames", type=int, default=100, help="frames of 80 ms to feed (default 100)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a stage parameter (JSON value or bare string), repeatable")
    parser.add_argument("--input-spec", default=None, help="e.g. float32[1920] or int32[8] (default: found)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest absolute difference accepted for float outputs (default 1e-4)")
    parser.add_argument("--max-differing", type=float, default=0.001,
                        help="fraction of integer outputs (codes) allowed to differ (default 0.001)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test signal")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.frames < 1:
        raise ConfigError(f"--frames {args.frames}: expected at least 1")
    spec = _parse_spec(args.input_spec) if args.input_spec else None
    result = check_causal(args.stage, args.frames, _parse_set(args.set), spec, args.seed)
    integer_out = np.issubdtype(np.dtype(result["output_spec"].split("[")[0]), np.integer)
    if integer_out:
        fraction = result["values_differing"] / max(result["values_compared"], 1)
        ok = fraction <= args.max_differing and result["max_abs_diff"] != float("inf")
    else:
        ok = result["max_abs_diff"] <= args.tolerance
    result["ok"] = ok
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['stage']}: {result['frames']} frames of {result['input_spec']} -> "
              f"{result['output_spec']}, streaming vs {result['method']}")
        print(f"  largest difference {result['max_abs_diff']:.3g}; {result['values_differing']} of "
              f"{result['values_compared']} values differ"
              + (f" (first in frame {result['first_frame_differing']})"
                 if result["first_frame_differing"] is not None else ""))
        print("  causal: yes" if ok else "  causal: NO (beyond tolerance)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
