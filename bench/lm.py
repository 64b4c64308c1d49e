"""`rtpipe bench lm`: Moshi LM step time per 80 ms frame, rtpipe's streaming engine against Kyutai's
reference LMGen (moshi 0.2.13) on the same random weights, in the same run, per size, torch thread
count and dtype. Prints P50/P95/P99/max (ms) and the ratio ours/reference; `--json` prints JSON.

The machine is usually shared: read the ratios, not the absolute numbers. Ours and the reference step
in turn, frame by frame, so both see the same load.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time
from typing import Any

import numpy as np

from rtpipe.bench.arguments import DEFAULT_THREADS, MAX_FRAMES, one_line_errors, parse_thread_counts
from rtpipe.pipeline.cli.arguments import check_range
from rtpipe.stages.base import FRAME_MS
from rtpipe.stages.errors import ConfigError

# Kyutai's RMSNorm is wrapped in torch.compile; without this its first step takes seconds.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

# frames timed / warm-up frames per size: the big ones take up to a second per step on 2 cores
DEFAULT_FRAMES = {"tiny": (200, 20), "small": (100, 10), "medium": (30, 5), "large": (12, 3), "7b": (50, 5)}
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
SHARE_LIMIT_BYTES = 4 << 30  # above this, the reference runs alone and is freed before ours
MAX_CONTEXT = 100_000  # KV window in steps: 33x Moshi's 3000; the 7B's cache is 1 MB a step in fp32
MAX_START_STEP = 10**9  # 2.5 years of 80 ms frames


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtpipe bench lm", description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes",
        default="tiny,small,medium,large",
        help="comma-separated built-in sizes (tiny, small, medium, large, 7b)",
    )
    p.add_argument("--threads", default=DEFAULT_THREADS, help="torch thread counts to time, e.g. 1,2")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16")
    p.add_argument("--frames", type=int, default=None, help="timed frames per case (default: by size)")
    p.add_argument("--warmup", type=int, default=None, help="untimed frames first (default: by size)")
    p.add_argument("--context", type=int, default=None, help="KV window in steps (default: the size's)")
    p.add_argument(
        "--start-step",
        type=int,
        default=0,
        help="time ours as if this many frames had passed (a fuller KV cache: what ours "
        "attends over grows to the context, the reference's is always the whole context)",
    )
    p.add_argument("--no-reference", action="store_true", help="time rtpipe's engine only")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--cores", default=None, help="pin this process to these CPU cores, e.g. 0 or 0,1")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def percentiles(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms)
    return {
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _start_at(streamer, start_step: int):
    state = streamer.new_state(seed=0)
    # Same work as a conversation start_step frames in: attention covers min(step, context) slots.
    state.step = start_step
    return state


def time_ours(streamer, frames: int, warmup: int, device: str, codes: np.ndarray, start_step: int = 0) -> list[float]:
    state = _start_at(streamer, start_step)
    out = []
    for k in range(warmup + frames):
        start = time.perf_counter_ns()
        streamer.step(state, codes[k].tolist())
        _sync(device)
        if k >= warmup:
            out.append((time.perf_counter_ns() - start) / 1e6)
    return out


def time_interleaved(
    streamer, ref_model, frames: int, warmup: int, device: str, codes: np.ndarray, start_step: int = 0
) -> tuple[list[float], list[float]]:
    """Ours and the reference one frame each in turn (order swapped every frame), so that both see
    the same moments of a shared machine's load. Returns (ours_ms, reference_ms)."""
    import torch
    from moshi.models.lm import LMGen

    state = _start_at(streamer, start_step)
    gen = LMGen(ref_model)
    ours: list[float] = []
    theirs: list[float] = []
    with torch.inference_mode(), gen.streaming(1):
        for k in range(warmup + frames):
            user = torch.as_tensor(codes[k], dtype=torch.long, device=device).view(1, -1, 1)
            for which in (0, 1) if k % 2 else (1, 0):
                start = time.perf_counter_ns()
                if which == 0:
                    streamer.step(state, codes[k].tolist())
                else:
                    gen.step(user)
                _sync(device)
                if k >= warmup:
                    (ours if which == 0 else theirs).append((time.perf_counter_ns() - start) / 1e6)
    return ours, theirs


def build_reference(model, device: str):
    """Kyutai's LMModel holding the very tensors of `model` (no copy: built on meta, then assigned)."""
    from moshi.models.lm import LMModel

    ref = LMModel(**model.config.to_dict(), device="meta", dtype=model.dtype)
    ref.load_state_dict(dict(model.state_dict()), assign=True)
    return ref.to(device).eval()


def run_case(
    size: str,
    dtype_name: str,
    threads: list[int],
    frames: int,
    warmup: int,
    context,
    device: str,
    with_reference: bool,
    start_step: int = 0,
) -> list[dict]:
    import torch

    from rtpipe.stages.moshi.config import config_for_size
    from rtpipe.stages.moshi.lm import LmModel
    from rtpipe.stages.moshi.streaming import LmStreamer

    config = config_for_size(size)
    if context is not None:
        config = config.replace(context=context)
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    model = LmModel(config, dtype=dtype, device=device)
    model.init_random(0)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    codes = np.random.default_rng(0).integers(0, config.card, size=(warmup + frames, config.user_q))
    results: dict[int, dict[str, Any]] = {
        n: {
            "size": size,
            "params": params,
            "dtype": dtype_name,
            "threads": n,
            "frames": frames,
            "context": config.context,
            "start_step": start_step,
            "device": device,
        }
        for n in threads
    }

    ref = None
    if with_reference and params * model.dtype.itemsize * 2 < SHARE_LIMIT_BYTES:
        # the reference first, holding the weights as loaded (row-major); our streamer then re-lays
        # (float32) or packs (bfloat16) its own, so both exist at once
        ref = build_reference(model, device)
        streamer = LmStreamer(model, context=context)
        layout = "own"
    else:
        # too big to hold twice: the reference reads the weights as our streamer laid them out
        # (float32: input-major, which speeds it up too, so the ratio errs in its favour)
        streamer = LmStreamer(model, context=context)
        ref = build_reference(model, device) if with_reference else None
        layout = "shared"
    for n in threads:
        torch.set_num_threads(n)
        if ref is not None:
            ours, theirs = time_interleaved(streamer, ref, frames, warmup, device, codes, start_step)
            results[n]["reference"] = percentiles(theirs)
            results[n]["reference_weights"] = layout
        else:
            ours = time_ours(streamer, frames, warmup, device, codes, start_step)
        results[n]["ours"] = percentiles(ours)
        if "reference" in results[n]:
            r, o = results[n]["reference"], results[n]["ours"]
            results[n]["ratio_p50"] = o["p50"] / r["p50"]
            results[n]["ratio_p99"] = o["p99"] / r["p99"]
    del streamer, ref, model
    gc.collect()
    return list(results.values())


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()),
    }


def print_table(report: dict) -> None:
    m = report["machine"]
    print(
        f"Moshi LM step, ms per {FRAME_MS:.0f} ms frame: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"load average {m['load_average'][0]:.1f} at start"
    )
    head = (
        f"{'size':<7}{'params':>8} {'dtype':<5}{'thr':>4} {'frames':>6}  "
        f"{'ours P50/P95/P99/max':<26}{'reference P50/P95/P99/max':<28}{'P50 x':>7}{'P99 x':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in report["results"]:

        def fmt(s):
            return "/".join(f"{s[k]:.1f}" for k in ("p50", "p95", "p99", "max")) if s else "-"

        short = "fp32" if r["dtype"] == "float32" else "bf16"
        ratio50 = f"{r['ratio_p50']:.2f}" if "ratio_p50" in r else "-"
        ratio99 = f"{r['ratio_p99']:.2f}" if "ratio_p99" in r else "-"
        print(
            f"{r['size']:<7}{r['params'] / 1e6:>7.0f}M {short:<5}{r['threads']:>4} "
            f"{r['frames']:>6}  {fmt(r.get('ours')):<26}{fmt(r.get('reference')):<28}"
            f"{ratio50:>7}{ratio99:>7}"
        )
    print("x = ours / reference in this run (below 1: ours is faster)")


def _dtypes(text: str) -> list[str]:
    names = [d for d in text.split(",") if d]
    unknown = [d for d in names if d not in DTYPES]
    if unknown or not names:
        raise ConfigError(f"--dtypes: unknown dtype {unknown[0] if unknown else text!r} (fp32, bf16)")
    return [DTYPES[d] for d in names]


def _core_list(text: str) -> list[int]:
    """'0,1' -> [0, 1]; ConfigError unless this process may run on each of them."""
    from rtpipe.pipeline.runtime.config import available_cores

    try:
        cores = [int(c) for c in text.split(",")]
    except ValueError:
        raise ConfigError(f"--cores {text!r}: expected core numbers like 0 or 0,1") from None
    allowed = available_cores()
    if any(c not in allowed for c in cores):
        raise ConfigError(f"--cores {text}: this process may run on cores {','.join(map(str, allowed))}")
    return cores


def _check_device(device: str) -> None:
    from rtpipe.pipeline.runtime.config import check_cuda

    if not re.fullmatch(r"cpu|cuda:\d+", device):
        raise ConfigError(f"--device {device!r}: expected cpu or cuda:N")
    if device != "cpu":
        check_cuda(device, "--device")


def _check_sizes(sizes: list[str], dtypes: list[str], context: int | None, device: str) -> None:
    """ConfigError for an unknown size, or (on the CPU) a model that would not fit in memory: what the
    moshi.step stage checks of the same size, before anything is built."""
    from rtpipe.stages.moshi.config import config_for_size
    from rtpipe.stages.registry import find_stage

    if not sizes:
        raise ConfigError("--sizes: expected sizes like tiny,small")
    for size in sizes:
        config_for_size(size, "--sizes")
        for dtype in dtypes:
            if device == "cpu":
                params = {"size": size, "dtype": dtype, **({"context": context} if context else {})}
                find_stage("moshi.step").from_config(params, f"--sizes {size} --dtypes {dtype}")


def _check_arguments(args: argparse.Namespace) -> None:
    if args.frames is not None:
        check_range("--frames", args.frames, 1, MAX_FRAMES)
    if args.warmup is not None:
        check_range("--warmup", args.warmup, 0, MAX_FRAMES)
    if args.context is not None:
        check_range("--context", args.context, 1, MAX_CONTEXT)
    check_range("--start-step", args.start_step, 0, MAX_START_STEP)
    _check_device(args.device)


@one_line_errors("rtpipe bench lm")
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    threads = parse_thread_counts(args.threads)
    dtypes = _dtypes(args.dtypes)
    _check_arguments(args)
    cores = _core_list(args.cores) if args.cores else None
    _check_sizes(sizes, dtypes, args.context, args.device)
    if cores:
        import psutil

        psutil.Process().cpu_affinity(cores)
    with_reference = not args.no_reference
    if with_reference:
        try:
            import moshi.models.lm  # noqa: F401
        except ImportError:
            print(
                "rtpipe bench lm: the reference (pip install --no-deps moshi==0.2.13) is not "
                "installed; timing ours only",
                file=sys.stderr,
            )
            with_reference = False
    report: dict[str, Any] = {"benchmark": "lm", "machine": machine(), "results": []}
    for size in sizes:
        frames, warmup = DEFAULT_FRAMES.get(size, (50, 5))
        frames = args.frames or frames
        warmup = args.warmup if args.warmup is not None else warmup
        for dtype in dtypes:
            print(
                f"rtpipe bench lm: {size} {dtype}, {frames} frames after {warmup} of warm-up, threads {args.threads}",
                file=sys.stderr,
                flush=True,
            )
            report["results"] += run_case(
                size, dtype, threads, frames, warmup, args.context, args.device, with_reference, args.start_step
            )
    report["machine"]["load_average_end"] = list(os.getloadavg())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
