"""`rtpipe mimi encode IN.wav OUT.npy` / `rtpipe mimi decode IN.npy OUT.wav`: Mimi on files.

Built on the same mimi.encode / mimi.decode stages the pipeline runs, frame by frame by default;
`--offline` runs the whole signal at once instead. Codes are saved as an int32 array [codebooks, frames].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from stages.base import FRAME_SAMPLES, SAMPLE_RATE
from stages.errors import AudioError, ConfigError

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtpipe mimi", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    enc = sub.add_parser("encode", help="WAV -> codes .npy [codebooks, frames]")
    enc.add_argument("input", metavar="IN.wav")
    enc.add_argument("output", metavar="OUT.npy")
    enc.add_argument("--codebooks", type=int, default=8, help="codebooks to keep, 1..32 (default 8)")
    dec = sub.add_parser("decode", help="codes .npy [codebooks, frames] -> 24 kHz WAV")
    dec.add_argument("input", metavar="IN.npy")
    dec.add_argument("output", metavar="OUT.wav")
    for p in (enc, dec):
        p.add_argument("--weights", default=None,
                       help="Mimi safetensors file or hf://owner/repo/file (default: random weights)")
        p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="compute dtype")
        p.add_argument("--offline", action="store_true",
                       help="run the whole signal at once instead of frame by frame")
        p.add_argument("--seed", type=int, default=0, help="seed of the random weights (no --weights)")
    return parser


def read_audio_24k(path: str) -> np.ndarray:
    """Mono float32 samples at 24 kHz from an audio file (mixed down and resampled when needed)."""
    import soundfile

    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{path}: cannot read audio: {e}") from e
    samples = data.mean(axis=1).astype(np.float32)
    if rate != SAMPLE_RATE:
        import soxr

        print(f"rtpipe: {path}: resampling {rate} Hz -> {SAMPLE_RATE} Hz", file=sys.stderr)
        samples = soxr.resample(samples, rate, SAMPLE_RATE).astype(np.float32)
    if samples.size == 0:
        raise AudioError(f"{path}: no samples")
    return samples


def read_codes(path: str) -> np.ndarray:
    """An int array [codebooks, frames] of Mimi codes; AudioError naming the file when it is not one."""
    try:
        codes = np.load(path, allow_pickle=False)
    except Exception as e:
        raise AudioError(f"{path}: cannot read codes: {e}") from e
    if codes.ndim != 2 or not 1 <= codes.shape[0] <= 32 or codes.shape[1] == 0:
        raise AudioError(f"{path}: codes of shape {codes.shape}, expected [codebooks 1..32, frames >= 1]")
    if not np.issubdtype(codes.dtype, np.integer):
        raise AudioError(f"{path}: codes of dtype {codes.dtype}, expected integers")
    if codes.min() < 0 or codes.max() >= 2048:
        raise AudioError(f"{path}: codes outside 0..2047 (min {codes.min()}, max {codes.max()})")
    return codes.astype(np.int32)


def encode_file(args: argparse.Namespace) -> int:
    from stages.mimi.stage import MimiEncode, MimiParams

    if not 1 <= args.codebooks <= 32:
        raise ConfigError(f"--codebooks {args.codebooks}: expected 1 to 32")
    samples = read_audio_24k(args.input)
    frames = -(-samples.size // FRAME_SAMPLES)
    padded = np.zeros(frames * FRAME_SAMPLES, np.float32)
    padded[:samples.size] = samples
    stage = MimiEncode(MimiParams(weights=args.weights, codebooks=args.codebooks,
                                  dtype=DTYPES[args.dtype], seed=args.seed))
    stage.open("cpu")
    if args.offline:
        import torch

        with torch.inference_mode():
            codes = stage.model.encode_offline(torch.from_numpy(padded), args.codebooks).numpy().T
    else:
        codes = np.stack([stage.process(padded[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES])
                          for i in range(frames)], axis=1)
    stage.close()
    np.save(args.output, codes.astype(np.int32))
    print(f"rtpipe: {args.input}: {frames} frames -> {args.output} codes {list(codes.shape)}", file=sys.stderr)
    return 0


def decode_file(args: argparse.Namespace) -> int:
    import soundfile

    from stages.mimi.stage import MimiDecode, MimiDecodeParams

    codes = read_codes(args.input)
    stage = MimiDecode(MimiDecodeParams(weights=args.weights, dtype=DTYPES[args.dtype], seed=args.seed))
    stage.open("cpu")
    if args.offline:
        import torch

        with torch.inference_mode():
            samples = stage.model.decode_offline(torch.from_numpy(codes.T.astype(np.int64))).numpy()
    else:
        samples = np.concatenate([stage.process(np.ascontiguousarray(codes[:, i]))
                                  for i in range(codes.shape[1])])
    stage.close()
    try:
        soundfile.write(args.output, samples, SAMPLE_RATE, subtype="FLOAT")
    except Exception as e:
        raise AudioError(f"{args.output}: cannot write audio: {e}") from e
    print(f"rtpipe: {args.input}: {codes.shape[1]} frames -> {args.output} "
          f"({samples.size / SAMPLE_RATE:.2f} s)", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    for name in ("input",):
        if not Path(getattr(args, name)).is_file():
            raise AudioError(f"{getattr(args, name)}: no such file")
    return encode_file(args) if args.action == "encode" else decode_file(args)
