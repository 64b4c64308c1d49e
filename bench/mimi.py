"""`rtpipe bench mimi`: Mimi streaming encode and decode time per 80 ms frame, ours vs Kyutai's reference.

Both run on the same weights (random unless --weights), one frame at a time, frames interleaved (ours,
then the reference, same frame) so machine noise hits both alike. Per dtype and torch thread count:
P50/P95/P99/max of encode, decode and their sum, and the ratio ours / reference. Not a test.
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

from rtpipe.bench.arguments import DEFAULT_THREADS, MAX_FRAMES, check_frames, one_line_errors, parse_thread_counts
from rtpipe.pipeline.cli.arguments import check_range
from rtpipe.pipeline.cli.mimi import check_weights
from rtpipe.stages.base import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE
from rtpipe.stages.errors import ConfigError
from rtpipe.stages.mimi.codes import TOTAL_CODEBOOKS


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms)
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
    name = "ours"

    def __init__(self, tensors, dtype, codebooks):
        from rtpipe.stages.mimi.checkpoint import mimi_from_state_dict

        self.model = mimi_from_state_dict(tensors, dtype)
        self.codebooks = codebooks
        self.enc = self.model.new_encode_state()
        self.dec = self.model.new_decode_state()

    def encode(self, x):  # x: float32 tensor [1920]
        return self.model.encode_step(x, self.enc, self.codebooks)

    def decode(self, codes):  # codes: [1, n]
        return self.model.decode_step(codes, self.dec)

    def close(self):
        pass


class _Reference:
    name = "reference"

    def __init__(self, weights_path, dtype, codebooks):
        from moshi.models import loaders

        self.model = loaders.get_mimi(weights_path, device="cpu").to(dtype)
        self.model.set_num_codebooks(codebooks)
        self.dtype = dtype
        self._enc_ctx = self.model.streaming(1)
        # the reference keeps one streaming state for encode and decode together, as Moshi's server does
        self._enc_ctx.__enter__()

    def encode(self, x):
        return self.model.encode(x.to(self.dtype).view(1, 1, -1))

    def decode(self, codes):  # codes [1, n] -> [1, n, 1]
        return self.model.decode(codes.t()[None])

    def close(self):
        self._enc_ctx.__exit__(None, None, None)


def run_config(torch, impls, signal, frames, warmup) -> dict[str, dict[str, list[float]]]:
    """Times every frame of every implementation, interleaved; returns {impl: {encode, decode, total}}."""
    times: dict[str, dict[str, list[float]]] = {impl.name: {"encode": [], "decode": [], "total": []} for impl in impls}
    x_all = torch.from_numpy(signal)
    for k in range(warmup + frames):
        x = x_all[(k % (len(signal) // FRAME_SAMPLES)) * FRAME_SAMPLES :][:FRAME_SAMPLES]
        for impl in impls:
            t0 = time.perf_counter_ns()
            codes = impl.encode(x)
            t1 = time.perf_counter_ns()
            if impl.name == "reference":
                codes = codes[0].t()  # [1, n]
            impl.decode(codes)
            t2 = time.perf_counter_ns()
            if k >= warmup:
                times[impl.name]["encode"].append((t1 - t0) / 1e6)
                times[impl.name]["decode"].append((t2 - t1) / 1e6)
                times[impl.name]["total"].append((t2 - t0) / 1e6)
    return times


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtpipe bench mimi", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help=f"timed frames per configuration, 1 to {MAX_FRAMES}")
    parser.add_argument("--warmup", type=int, default=20, help="untimed frames first")
    parser.add_argument("--threads", default=DEFAULT_THREADS, help="torch thread counts, comma separated")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="float32 and/or bfloat16")
    parser.add_argument("--codebooks", type=int, default=8, help=f"1 to {TOTAL_CODEBOOKS} (default 8)")
    parser.add_argument("--weights", default=None, help="Mimi safetensors (default: seeded random)")
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

    import torch

    from rtpipe.stages.checkpoint import load_checkpoint
    from rtpipe.stages.mimi.checkpoint import MODEL_NAME, canonical_key, expected_tensors, random_state_dict

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
                    impls: list[_Ours | _Reference] = [_Ours(tensors, dtypes[dtype_name], args.codebooks)]
                    if reference_ok:
                        impls.append(_Reference(weights_path, dtypes[dtype_name], args.codebooks))
                    times = run_config(torch, impls, signal, args.frames, args.warmup)
                    for impl in impls:
                        impl.close()
                for name, series in times.items():
                    report["results"].append(
                        {
                            "impl": name,
                            "dtype": dtype_name,
                            "threads": threads,
                            **{f"{part}_ms": _percentiles(values) for part, values in series.items()},
                        }
                    )
                if reference_ok:
                    ours, ref = report["results"][-2], report["results"][-1]
                    report["ratios"].append(
                        {
                            "dtype": dtype_name,
                            "threads": threads,
                            **{
                                f"{part}_{q}": round(ours[f"{part}_ms"][q] / ref[f"{part}_ms"][q], 3)
                                for part in ("encode", "decode", "total")
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
    m = report["machine"]
    print(
        f"Mimi streaming, ms per {FRAME_MS:.0f} ms frame: {report['frames']} frames after "
        f"{report['warmup']} warm-up, {report['codebooks']} codebooks, weights {report['weights']}"
    )
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load average {m['load_avg_1min']}")
    header = (
        f"{'dtype':<9} {'thr':>3} {'impl':<9} {'encode P50/P95/P99/max':>26} "
        f"{'decode P50/P95/P99/max':>26} {'enc+dec P50/P99':>16}"
    )
    print(header)
    print("-" * len(header))

    def q4(d):
        return f"{d['p50']:.1f}/{d['p95']:.1f}/{d['p99']:.1f}/{d['max']:.1f}"

    for r in report["results"]:
        print(
            f"{r['dtype']:<9} {r['threads']:>3} {r['impl']:<9} {q4(r['encode_ms']):>26} "
            f"{q4(r['decode_ms']):>26} {r['total_ms']['p50']:>7.1f}/{r['total_ms']['p99']:<8.1f}"
        )
    if report["ratios"]:
        print("\nratio ours / reference (lower is faster):")
        for q in report["ratios"]:
            print(
                f"  {q['dtype']:<9} {q['threads']} thread(s): encode P50 {q['encode_p50']:.2f} "
                f"P99 {q['encode_p99']:.2f}; decode P50 {q['decode_p50']:.2f} P99 {q['decode_p99']:.2f}; "
                f"enc+dec P50 {q['total_p50']:.2f} P99 {q['total_p99']:.2f}"
            )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
