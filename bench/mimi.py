"""`rtpipe bench mimi`: Mimi streaming encode and decode time per 80 ms frame, ours vs Kyutai's reference.

Both run on the same weights (random unless --weights), one frame at a time, frames interleaved (ours,
then the reference, same frame) so machine noise hits both alike. Per dtype and torch thread count:
P50/P95/P99/max of encode, decode and their sum, and the ratio ours / reference. Not a test.

--sessions N,... times N conversations live in every frame, as `mimi.encode`/`mimi.decode` carry them:
ours steps the N session slots of one streaming state as one batch (encode_sessions / decode_sessions),
the reference runs its model in streaming(N) with a batch of N. Every N is interleaved frame by frame
with the others and N = 1 is always among them: beside ms per frame, each N gets ms per conversation
(per frame / N) and that cost over N = 1's from the same frames.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

from rtpipe.bench.arguments import (
    DEFAULT_THREADS,
    MAX_FRAMES,
    check_frames,
    one_line_errors,
    parse_session_counts,
    parse_thread_counts,
)
from rtpipe.pipeline.cli.arguments import check_range
from rtpipe.pipeline.cli.mimi import check_weights
from rtpipe.stages.base import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE
from rtpipe.stages.errors import ConfigError
from rtpipe.stages.mimi.codes import TOTAL_CODEBOOKS
from rtpipe.stages.mimi.stage import DECODE_SESSION_ELEMENTS, ENCODE_SESSION_ELEMENTS, check_mimi_memory

PARTS = ("encode", "decode", "total")
SLOT_STRIDE = 7  # session slot b reads the test signal SLOT_STRIDE * b frames on: N different conversations


def _percentiles(samples_ms: list[float], sessions: int = 1) -> dict[str, float]:
    """P50/P95/P99/max/mean of `samples_ms` / `sessions` (ms per conversation when a frame carried N)."""
    a = np.asarray(samples_ms) / sessions
    return {
        "p50": round(float(np.percentile(a, 50)), 2),
        "p95": round(float(np.percentile(a, 95)), 2),
        "p99": round(float(np.percentile(a, 99)), 2),
        "max": round(float(a.max()), 2),
        "mean": round(float(a.mean()), 2),
    }


def machine_info(torch) -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "load_avg_1min": load,
        "python": platform.python_version(),
    }


def _test_signal(frames: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(frames * FRAME_SAMPLES) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


class _Ours:
    """rtpipe's Mimi carrying `sessions` conversations: one streaming state with a row per session slot,
    every slot live in every frame and stepped as one batch, as the mimi.encode / mimi.decode stages do."""

    name = "ours"

    def __init__(self, model, codebooks: int, sessions: int = 1):
        from rtpipe.stages.mimi.slots import LiveSlots

        self.model = model
        self.codebooks = codebooks
        self.sessions = sessions
        self.live = LiveSlots.every(sessions)
        self.enc = model.new_encode_state(sessions)
        self.dec = model.new_decode_state(sessions)

    def encode(self, x):  # x: float32 [sessions, 1920], row b slot b's frame -> codes [sessions, 1, codebooks]
        return self.model.encode_sessions(x, self.enc, self.codebooks, self.live)

    def decode(self, codes):  # codes [sessions, 1, n] -> samples [sessions, 1920]
        return self.model.decode_sessions(codes, self.dec, self.live)

    def close(self):
        pass


class _Reference:
    """Kyutai's MimiModel in streaming(sessions): a batch of `sessions` conversations per call."""

    name = "reference"

    def __init__(self, weights_path, dtype, codebooks, sessions: int = 1):
        from moshi.models import loaders

        self.model = loaders.get_mimi(weights_path, device="cpu").to(dtype)
        self.model.set_num_codebooks(codebooks)
        self.dtype = dtype
        self.sessions = sessions
        self._enc_ctx = self.model.streaming(sessions)
        # the reference keeps one streaming state for encode and decode together, as Moshi's server does
        self._enc_ctx.__enter__()

    def encode(self, x):  # x: [sessions, 1920] -> codes [sessions, codebooks, 1]
        return self.model.encode(x.to(self.dtype).view(self.sessions, 1, -1))

    def decode(self, codes):  # codes [sessions, n, 1] -> samples [sessions, 1, 1920]
        return self.model.decode(codes)

    def close(self):
        self._enc_ctx.__exit__(None, None, None)


def session_frames(x_frames, k: int, sessions: int):
    """Frame `k` of each of `sessions` conversations, [sessions, 1920]: slot b reads the test signal's
    frames SLOT_STRIDE * b further on, looping (`x_frames`: the signal as [frames, 1920])."""
    offsets = [(k + SLOT_STRIDE * b) % x_frames.shape[0] for b in range(sessions)]
    return x_frames[offsets]


def run_config(torch, impls, signal, frames, warmup) -> list[dict[str, list[float]]]:
    """Times every frame of every implementation (each carrying its `sessions` conversations),
    interleaved; returns {encode, decode, total} ms per frame, one per implementation, in order."""
    times: list[dict[str, list[float]]] = [{part: [] for part in PARTS} for _ in impls]
    x_frames = torch.from_numpy(signal).view(-1, FRAME_SAMPLES)
    for k in range(warmup + frames):
        batches = {n: session_frames(x_frames, k, n) for n in {impl.sessions for impl in impls}}
        for impl, series in zip(impls, times):
            x = batches[impl.sessions]
            t0 = time.perf_counter_ns()
            codes = impl.encode(x)
            t1 = time.perf_counter_ns()
            impl.decode(codes)
            t2 = time.perf_counter_ns()
            if k >= warmup:
                series["encode"].append((t1 - t0) / 1e6)
                series["decode"].append((t2 - t1) / 1e6)
                series["total"].append((t2 - t0) / 1e6)
    return times


def _result(name: str, sessions: int, dtype_name: str, threads: int, series: dict[str, list[float]]) -> dict:
    """One implementation's row: ms per frame, and per conversation (per frame / sessions)."""
    return {
        "impl": name,
        "dtype": dtype_name,
        "threads": threads,
        **{f"{part}_ms": _percentiles(series[part]) for part in PARTS},
        "sessions": sessions,
        **{f"{part}_ms_per_conversation": _percentiles(series[part], sessions) for part in PARTS},
    }


def _ratio(value: float, base: float) -> float | None:
    return round(value / base, 3) if base else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtpipe bench mimi", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help=f"timed frames per configuration, 1 to {MAX_FRAMES}")
    parser.add_argument("--warmup", type=int, default=20, help="untimed frames first")
    parser.add_argument("--threads", default=DEFAULT_THREADS, help="torch thread counts, comma separated")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="float32 and/or bfloat16")
    parser.add_argument("--codebooks", type=int, default=8, help=f"1 to {TOTAL_CODEBOOKS} (default 8)")
    parser.add_argument("--weights", default=None, help="Mimi safetensors (default: seeded random)")
    parser.add_argument(
        "--sessions",
        default="1",
        help="conversations live per frame, comma separated, e.g. 1,2,4,8 (default 1; 1 is always timed)",
    )
    parser.add_argument("--no-reference", action="store_true", help="time ours only")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser


def _dtype_names(text: str) -> list[str]:
    names = [d.strip() for d in text.split(",") if d.strip()]
    if not names or any(d not in ("float32", "bfloat16") for d in names):
        raise ConfigError(f"--dtypes {text!r}: expected float32 and/or bfloat16")
    return names


@one_line_errors("rtpipe bench mimi")
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    dtype_names = _dtype_names(args.dtypes)
    thread_counts = parse_thread_counts(args.threads)
    check_frames(args.frames, args.warmup)
    check_range("--codebooks", args.codebooks, 1, TOTAL_CODEBOOKS)
    check_weights(args.weights)
    session_counts = parse_session_counts(args.sessions)
    # every N's streaming state lives at once (the N are interleaved)
    session_elements = sum(session_counts) * (ENCODE_SESSION_ELEMENTS + DECODE_SESSION_ELEMENTS)
    check_mimi_memory(args.weights, f"--sessions {args.sessions}", session_elements)

    import torch

    from rtpipe.stages.checkpoint import load_checkpoint
    from rtpipe.stages.mimi.checkpoint import (
        MODEL_NAME,
        canonical_key,
        expected_tensors,
        mimi_from_state_dict,
        random_state_dict,
    )

    if args.weights:
        tensors = load_checkpoint(args.weights, expected_tensors(), MODEL_NAME, rename=canonical_key)
    else:
        tensors = random_state_dict(seed=0)
    reference_ok = not args.no_reference
    if reference_ok:
        try:
            import moshi.models.loaders  # noqa: F401
        except ImportError:
            print("rtpipe: bench mimi: the reference `moshi` is not installed; timing ours only", file=sys.stderr)
            reference_ok = False
    tmp = None
    weights_path = args.weights
    if reference_ok and weights_path is None:
        from safetensors.torch import save_file

        tmp = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
        tmp.close()
        save_file(tensors, tmp.name)
        weights_path = tmp.name

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    signal = _test_signal(50)
    report = {
        "benchmark": f"mimi streaming, ms per {FRAME_MS:.0f} ms frame",
        "frames": args.frames,
        "warmup": args.warmup,
        "codebooks": args.codebooks,
        "sessions": session_counts,
        "machine": machine_info(torch),
        "weights": args.weights or "random",
        "results": [],
        "ratios": [],
    }
    try:
        for dtype_name in dtype_names:
            for threads in thread_counts:
                torch.set_num_threads(threads)
                with torch.inference_mode():
                    model = mimi_from_state_dict(tensors, dtypes[dtype_name])
                    impls: list[_Ours | _Reference] = []
                    for n in session_counts:
                        impls.append(_Ours(model, args.codebooks, n))
                        if reference_ok:
                            impls.append(_Reference(weights_path, dtypes[dtype_name], args.codebooks, n))
                    times = run_config(torch, impls, signal, args.frames, args.warmup)
                    timed = [(impl.name, impl.sessions) for impl in impls]
                    for impl in impls:
                        impl.close()
                    del impls, model
                rows = [_result(name, n, dtype_name, threads, series) for (name, n), series in zip(timed, times)]
                for row in rows:
                    base = next(r for r in rows if r["impl"] == row["impl"] and r["sessions"] == 1)
                    row["per_conversation_vs_1"] = {
                        f"{part}_{q}": _ratio(row[f"{part}_ms_per_conversation"][q], base[f"{part}_ms"][q])
                        for part in PARTS
                        for q in ("p50", "p99")
                    }
                report["results"] += rows
                if reference_ok:
                    for ours, ref in zip(rows[::2], rows[1::2]):
                        report["ratios"].append(
                            {
                                "dtype": dtype_name,
                                "threads": threads,
                                "sessions": ours["sessions"],
                                **{
                                    f"{part}_{q}": _ratio(ours[f"{part}_ms"][q], ref[f"{part}_ms"][q])
                                    for part in PARTS
                                    for q in ("p50", "p99")
                                },
                            }
                        )
    finally:
        if tmp is not None:
            os.unlink(tmp.name)

    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


def print_table(report: dict) -> None:
    """The report as a table; with more than one N, a column for N and per-conversation columns besides."""
    m = report["machine"]
    many = report.get("sessions", [1]) != [1]
    print(
        f"Mimi streaming, ms per {FRAME_MS:.0f} ms frame: {report['frames']} frames after "
        f"{report['warmup']} warm-up, {report['codebooks']} codebooks, weights {report['weights']}"
    )
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load average {m['load_avg_1min']}")
    if many:
        print(
            "N: conversations live in every frame, one batch; per conv = per frame / N; "
            "x N=1: per conv over N = 1's enc+dec (P50/P99)"
        )
    n_head = f" {'N':>2}" if many else ""
    header = (
        f"{'dtype':<9} {'thr':>3}{n_head} {'impl':<9} {'encode P50/P95/P99/max':>26} "
        f"{'decode P50/P95/P99/max':>26} {'enc+dec P50/P99':>16}"
    )
    if many:
        header += f" {'per conv P50/P99':>16} {'x N=1':>11}"
    print(header)
    print("-" * len(header))

    def q4(d):
        return f"{d['p50']:.1f}/{d['p95']:.1f}/{d['p99']:.1f}/{d['max']:.1f}"

    for r in report["results"]:
        n_cell = f" {r['sessions']:>2}" if many else ""
        line = (
            f"{r['dtype']:<9} {r['threads']:>3}{n_cell} {r['impl']:<9} "
            f"{q4(r['encode_ms']):>26} {q4(r['decode_ms']):>26} "
            f"{r['total_ms']['p50']:>7.1f}/{r['total_ms']['p99']:<8.1f}"
        )
        if many:
            conv, vs_1 = r["total_ms_per_conversation"], r["per_conversation_vs_1"]
            line += f" {conv['p50']:>7.1f}/{conv['p99']:<8.1f} {_x(vs_1['total_p50']):>5}/{_x(vs_1['total_p99']):<5}"
        print(line.rstrip() if many else line)
    if report["ratios"]:
        print("\nratio ours / reference (lower is faster):")
        for q in report["ratios"]:
            at_n = f", N={q['sessions']}" if many else ""
            print(
                f"  {q['dtype']:<9} {q['threads']} thread(s){at_n}: encode P50 {_x(q['encode_p50'])} "
                f"P99 {_x(q['encode_p99'])}; decode P50 {_x(q['decode_p50'])} P99 {_x(q['decode_p99'])}; "
                f"enc+dec P50 {_x(q['total_p50'])} P99 {_x(q['total_p99'])}"
            )


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
