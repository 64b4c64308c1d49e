"""`rtpipe bench lm`: Moshi LM step time per 80 ms frame, rtpipe's streaming engine against Kyutai's
reference LMGen (moshi 0.2.13) on the same random weights, in the same run, per size, torch thread
count and dtype. Prints P50/P95/P99/max (ms) and the ratio ours/reference; `--json` prints JSON.

The machine is usually shared: read the ratios, not the absolute numbers. Ours and the reference step
in turn, frame by frame, so both see the same load.

--sessions N,... times N conversations live in every frame, as the `moshi.step` stage carries them: ours
steps N stream states as one batch (`step_many`), the reference runs LMGen in streaming(N) on a batch of
N. Every N steps in turn with the others, frame by frame, and N = 1 is always among them: beside ms per
frame, each N gets ms per conversation (per frame / N) and that cost over N = 1's in the same frames.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from rtpipe.bench.arguments import (
    DEFAULT_THREADS,
    MAX_FRAMES,
    one_line_errors,
    parse_session_counts,
    parse_thread_counts,
)
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
SLOT_STRIDE = 7  # session b reads the user codes SLOT_STRIDE * b frames on: N different conversations


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
    p.add_argument(
        "--sessions",
        default="1",
        help="conversations live per frame, comma separated, e.g. 1,2,4,8 (default 1; 1 is always timed)",
    )
    p.add_argument("--no-reference", action="store_true", help="time rtpipe's engine only")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--cores", default=None, help="pin this process to these CPU cores, e.g. 0 or 0,1")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def percentiles(samples_ms: list[float], sessions: int = 1) -> dict:
    """P50/P95/P99/max/mean of `samples_ms` / `sessions` (ms per conversation when a frame carried N)."""
    a = np.asarray(samples_ms) / sessions
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


def _start_at(streamer, start_step: int, seed: int = 0):
    state = streamer.new_state(seed=seed)
    # Same work as a conversation start_step frames in: attention covers min(step, context) slots.
    state.step = start_step
    return state


def session_codes(codes: np.ndarray, k: int, sessions: int) -> list[list[int]]:
    """Frame `k`'s user codes of each of `sessions` conversations: session b reads `codes` (one row per
    frame) SLOT_STRIDE * b frames further on, looping; session 0 reads row k."""
    return [codes[(k + SLOT_STRIDE * b) % len(codes)].tolist() for b in range(sessions)]


def ours_sessions(streamer, sessions: int, start_step: int = 0) -> list:
    """`sessions` conversations' stream states, seeded 0.. (session 0 is the one-conversation run's)."""
    return [_start_at(streamer, start_step, seed=b) for b in range(sessions)]


Step = Callable[[int], object]  # steps every conversation it carries by one frame, the k-th


def ours_step(streamer, states: list, codes: np.ndarray) -> Step:
    """Ours for len(states) conversations: one step_many per frame, as moshi.step's process_sessions."""
    inputs = [session_codes(codes, k, len(states)) for k in range(len(codes))]
    return lambda k: streamer.step_many(states, inputs[k])


def reference_step(gen, sessions: int, codes: np.ndarray, device: str) -> Step:
    """Kyutai's LMGen (entered in streaming(sessions)) for `sessions` conversations, one batch a frame."""
    import torch

    user = [
        torch.as_tensor(session_codes(codes, k, sessions), dtype=torch.long, device=device).view(sessions, -1, 1)
        for k in range(len(codes))
    ]
    return lambda k: gen.step(user[k])


def time_steps(steps: list[Step], frames: int, warmup: int, device: str) -> list[list[float]]:
    """Each of `steps` one frame in turn (the order reversed every other frame), so that all see the same
    moments of a shared machine's load. Returns each one's ms per timed frame."""
    import torch

    out: list[list[float]] = [[] for _ in steps]
    order = list(range(len(steps)))
    with torch.inference_mode():
        for k in range(warmup + frames):
            for i in order if k % 2 else order[::-1]:
                start = time.perf_counter_ns()
                steps[i](k)
                _sync(device)
                if k >= warmup:
                    out[i].append((time.perf_counter_ns() - start) / 1e6)
    return out


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
    sessions: list[int] | None = None,
) -> list[dict]:
    """One size and dtype at each thread count and each N of `sessions` (default [1]): a row each."""
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
    counts = sessions or [1]
    results: dict[tuple[int, int], dict[str, Any]] = {
        (n, sessions_n): {
            "size": size,
            "params": params,
            "dtype": dtype_name,
            "threads": n,
            "frames": frames,
            "context": config.context,
            "start_step": start_step,
            "device": device,
            "sessions": sessions_n,
        }
        for n in threads
        for sessions_n in counts
    }

    refs: list = []
    if with_reference and params * model.dtype.itemsize * 2 < SHARE_LIMIT_BYTES:
        # the reference first, holding the weights as loaded (row-major); our streamer then re-lays
        # (float32) or packs (bfloat16) its own, so both exist at once. One reference per N (each
        # holds its streaming state in its modules), all on the same tensors.
        refs = [build_reference(model, device) for _ in counts]
        streamer = LmStreamer(model, context=context)
        layout = "own"
    else:
        # too big to hold twice: the reference reads the weights as our streamer laid them out
        # (float32: input-major, which speeds it up too, so the ratio errs in its favour)
        streamer = LmStreamer(model, context=context)
        refs = [build_reference(model, device) for _ in counts] if with_reference else []
        layout = "shared"
    for n in threads:
        torch.set_num_threads(n)
        with contextlib.ExitStack() as streaming:
            steps = []
            for i, sessions_n in enumerate(counts):
                steps.append(ours_step(streamer, ours_sessions(streamer, sessions_n, start_step), codes))
                if refs:
                    from moshi.models.lm import LMGen

                    gen = LMGen(refs[i])
                    streaming.enter_context(gen.streaming(sessions_n))
                    steps.append(reference_step(gen, sessions_n, codes, device))
            times = time_steps(steps, frames, warmup, device)
        per_n = len(times) // len(counts)  # ours, then the reference when it runs
        for i, sessions_n in enumerate(counts):
            row, base = results[(n, sessions_n)], results[(n, 1)]
            row["ours"] = percentiles(times[i * per_n])
            if refs:
                row["reference"] = percentiles(times[i * per_n + 1])
                row["reference_weights"] = layout
            for side in ("ours", "reference") if refs else ("ours",):
                row[f"{side}_per_conversation"] = percentiles(times[i * per_n + (side == "reference")], sessions_n)
                row[f"{side}_per_conversation_vs_1"] = {
                    q: row[f"{side}_per_conversation"][q] / base[side][q] for q in ("p50", "p99")
                }
            if refs:
                r, o = row["reference"], row["ours"]
                row["ratio_p50"] = o["p50"] / r["p50"]
                row["ratio_p99"] = o["p99"] / r["p99"]
    del streamer, refs, model
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
    """The report as a table; with more than one N, a column for N and per-conversation columns besides."""
    m = report["machine"]
    many = report.get("sessions", [1]) != [1]
    print(
        f"Moshi LM step, ms per {FRAME_MS:.0f} ms frame: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"load average {m['load_average'][0]:.1f} at start"
    )
    n_head = f" {'N':>2}" if many else ""
    head = (
        f"{'size':<7}{'params':>8} {'dtype':<5}{'thr':>4}{n_head} {'frames':>6}  "
        f"{'ours P50/P95/P99/max':<26}{'reference P50/P95/P99/max':<28}{'P50 x':>7}{'P99 x':>7}"
    )
    if many:
        head += f"  {'ours/conv P50/P99':<18}{'x N=1':<11}{'ref/conv P50/P99':<18}x N=1"
    print(head)
    print("-" * len(head))
    for r in report["results"]:

        def fmt(s):
            return "/".join(f"{s[k]:.1f}" for k in ("p50", "p95", "p99", "max")) if s else "-"

        short = "fp32" if r["dtype"] == "float32" else "bf16"
        ratio50 = f"{r['ratio_p50']:.2f}" if "ratio_p50" in r else "-"
        ratio99 = f"{r['ratio_p99']:.2f}" if "ratio_p99" in r else "-"
        n_cell = f" {r['sessions']:>2}" if many else ""
        line = (
            f"{r['size']:<7}{r['params'] / 1e6:>7.0f}M {short:<5}{r['threads']:>4}{n_cell} "
            f"{r['frames']:>6}  {fmt(r.get('ours')):<26}{fmt(r.get('reference')):<28}"
            f"{ratio50:>7}{ratio99:>7}"
        )
        if many:
            for side in ("ours", "reference"):
                conv, vs_1 = r.get(f"{side}_per_conversation"), r.get(f"{side}_per_conversation_vs_1")
                cell = f"{conv['p50']:.1f}/{conv['p99']:.1f}" if conv else "-"
                ratio = f"{vs_1['p50']:.2f}/{vs_1['p99']:.2f}" if vs_1 else "-"
                line += f"  {cell:<16}{ratio:<11}" if side == "ours" else f"{cell:<18}{ratio}"
        print(line)
    print("x = ours / reference in this run (below 1: ours is faster)")
    if many:
        print(
            "N = conversations live in every frame, one batch; conv = per frame / N; "
            "x N=1 = per conv over N = 1's (P50/P99)"
        )


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


def _check_sizes(
    sizes: list[str], dtypes: list[str], context: int | None, device: str, sessions: list[int] | None = None
) -> None:
    """ConfigError for an unknown size, or (on the CPU) a model that would not fit in memory with the
    KV caches of every N of `sessions` at once (the N step in turn): what the moshi.step stage checks of
    the same size and sessions, before anything is built."""
    from rtpipe.stages.moshi.config import config_for_size
    from rtpipe.stages.registry import find_stage

    if not sizes:
        raise ConfigError("--sizes: expected sizes like tiny,small")
    for size in sizes:
        config_for_size(size, "--sizes")
        for dtype in dtypes:
            if device == "cpu":
                params = {"size": size, "dtype": dtype, **({"context": context} if context else {})}
                where = f"--sizes {size} --dtypes {dtype}"
                stage = find_stage("moshi.step").from_config(params, where)
                if sessions and sessions != [1]:
                    stage.check_sessions(sum(sessions), f"{where} --sessions {','.join(map(str, sessions))}")


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
    sessions = parse_session_counts(args.sessions)
    _check_arguments(args)
    cores = _core_list(args.cores) if args.cores else None
    _check_sizes(sizes, dtypes, args.context, args.device, sessions)
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
    report: dict[str, Any] = {"benchmark": "lm", "machine": machine(), "sessions": sessions, "results": []}
    for size in sizes:
        frames, warmup = DEFAULT_FRAMES.get(size, (50, 5))
        frames = args.frames or frames
        warmup = args.warmup if args.warmup is not None else warmup
        for dtype in dtypes:
            at_n = f", sessions {','.join(map(str, sessions))}" if sessions != [1] else ""
            print(
                f"rtpipe bench lm: {size} {dtype}, {frames} frames after {warmup} of warm-up, threads {args.threads}"
                + at_n,
                file=sys.stderr,
                flush=True,
            )
            report["results"] += run_case(
                size,
                dtype,
                threads,
                frames,
                warmup,
                args.context,
                args.device,
                with_reference,
                args.start_step,
                sessions,
            )
    report["machine"]["load_average_end"] = list(os.getloadavg())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
