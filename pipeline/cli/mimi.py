"""`rtpipe mimi encode IN.wav OUT.npy` / `rtpipe mimi decode IN.npy OUT.wav`: Mimi on files.

Built on the same mimi.encode / mimi.decode stages the pipeline runs, frame by frame by default;
`--offline` runs the whole signal at once instead (refused up front when it would not fit in memory).
Codes are saved as an int32 array [codebooks, frames]; decode also takes `rtpipe infer --codes-out`'s .npz.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Literal

import numpy as np

from rtpipe.pipeline.cli.arguments import check_output_path, check_range, file_identity
from rtpipe.pipeline.cli.audio_files import read_audio_24k, write_audio_24k
from rtpipe.stages.base import FRAME_SAMPLES, SAMPLE_RATE
from rtpipe.stages.checkpoint import HF_PREFIX, MAX_SEED, local_file_problem, memory_available, resolve_weights_path
from rtpipe.stages.errors import AudioError, ConfigError
from rtpipe.stages.mimi.stage import CODEBOOK_BINS, TOTAL_CODEBOOKS

DTYPES: dict[str, Literal["float32", "bfloat16"]] = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}
# torch seeds are taken modulo 2**63 (2**63 gives seed 0's weights) and above 2**64 - 1 overflow
NPY_MAGIC = b"\x93NUMPY"
NPZ_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive
# --offline runs the whole signal through the model at once, so its peak memory grows with the audio.
# Measured with /usr/bin/time -v (maximum resident set size) on the 2-core development machine, fp32,
# random weights, 5 / 15 / 30 / 60 s of audio: encode 1.29 / 1.70 / 2.23 / 3.33 GB, decode 1.37 / 1.91 /
# 2.57 / 3.96 GB, i.e. about 1.1 GB (torch and the model) + 37 MB (encode) or 47 MB (decode) per second
# of audio, linear (2 min of codes took 6.7 GB); bf16 needs less. Rounded up, for both:
OFFLINE_BASE_BYTES = 1_200_000_000
OFFLINE_BYTES_PER_SECOND = 50_000_000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtpipe mimi", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    enc = sub.add_parser("encode", help="WAV -> codes .npy [codebooks, frames]")
    enc.add_argument("input", metavar="IN.wav")
    enc.add_argument("output", metavar="OUT.npy")
    enc.add_argument("--codebooks", type=int, default=8, help=f"codebooks to keep, 1..{TOTAL_CODEBOOKS} (default 8)")
    dec = sub.add_parser("decode", help="codes .npy [codebooks, frames] (or infer's .npz) -> 24 kHz WAV")
    dec.add_argument("input", metavar="IN.npy")
    dec.add_argument("output", metavar="OUT.wav")
    for p in (enc, dec):
        p.add_argument(
            "--weights", default=None, help="Mimi safetensors file or hf://owner/repo/file (default: random weights)"
        )
        p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="compute dtype")
        p.add_argument("--offline", action="store_true", help="run the whole signal at once instead of frame by frame")
        p.add_argument("--seed", type=int, default=0, help="seed of the random weights (no --weights), 0 to 2**63-1")
    return parser


def check_weights(weights: str | None) -> None:
    """The CheckpointError loading would raise for a local --weights path that is not a readable file,
    before the work starts (an hf:// path is checked when it downloads)."""
    if weights is not None and not weights.startswith(HF_PREFIX):
        resolve_weights_path(weights)


def check_wav_output(path: str) -> None:
    """ConfigError unless soundfile can write float samples in the format `path`'s extension names
    (it picks the format from the extension and would fail only after the decoding)."""
    import soundfile

    extension = os.path.splitext(path)[1][1:]
    if extension.upper() in soundfile.available_formats() and soundfile.check_format(extension, "FLOAT"):
        return
    what = f".{extension} files" if extension else "a file without an extension"
    raise ConfigError(f"OUT.wav {path}: cannot write 32-bit float audio as {what} (use .wav)")


def check_offline_memory(frames: int) -> None:
    """ConfigError when --offline on `frames` frames would need more memory than is available now."""
    seconds = frames * FRAME_SAMPLES / SAMPLE_RATE
    need_bytes = OFFLINE_BASE_BYTES + OFFLINE_BYTES_PER_SECOND * seconds
    available_bytes = memory_available()
    if need_bytes > available_bytes:
        raise ConfigError(
            f"--offline: {seconds:.0f} s of audio needs about {need_bytes / 1e9:.1f} GB of memory, "
            f"{available_bytes / 1e9:.1f} GB is available; leave out --offline to run frame by frame "
            f"(about {OFFLINE_BASE_BYTES / 1e9:.1f} GB whatever the length)"
        )


def check_arguments(args: argparse.Namespace) -> None:
    """Everything about the arguments that can be wrong, checked before any model loads."""
    problem = local_file_problem(args.input)
    if problem:
        raise AudioError(f"{args.input}: {problem}")
    check_weights(args.weights)
    check_range("--seed", args.seed, 0, MAX_SEED)
    if args.action == "encode":
        check_range("--codebooks", args.codebooks, 1, TOTAL_CODEBOOKS)
    out_flag = "OUT.npy" if args.action == "encode" else "OUT.wav"
    check_output_path(args.output, out_flag)
    if file_identity(args.output) == file_identity(args.input):
        raise ConfigError(f"{out_flag} {args.output}: is the input file; give another path")
    if args.action == "decode":
        check_wav_output(args.output)


def _load_codes_array(path: str) -> np.ndarray:
    """The array in a .npy file, or the `audio` array of an .npz as `rtpipe infer --codes-out` writes it
    (audio [8, frames], text [frames]); AudioError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
        if magic.startswith(NPZ_MAGIC):
            with np.load(path, allow_pickle=False) as archive:
                if "audio" not in archive.files:
                    raise AudioError(
                        f'{path}: an .npz without an "audio" array of codes '
                        f"(it holds: {', '.join(archive.files) or 'nothing'})"
                    )
                return archive["audio"]
        if magic == NPY_MAGIC:
            return np.load(path, allow_pickle=False)
    except AudioError:
        raise
    except Exception as e:
        raise AudioError(f"{path}: cannot read codes: {e}") from e
    raise AudioError(f"{path}: not a .npy file (nor an .npz from `rtpipe infer --codes-out`)")


def read_codes(path: str) -> np.ndarray:
    """An int array [codebooks, frames] of Mimi codes from a .npy (or an infer --codes-out .npz);
    AudioError naming the file when it is not one."""
    codes = _load_codes_array(path)
    if codes.ndim != 2 or not 1 <= codes.shape[0] <= TOTAL_CODEBOOKS or codes.shape[1] == 0:
        raise AudioError(
            f"{path}: codes of shape {codes.shape}, expected [codebooks 1..{TOTAL_CODEBOOKS}, frames >= 1]"
        )
    if not np.issubdtype(codes.dtype, np.integer):
        raise AudioError(f"{path}: codes of dtype {codes.dtype}, expected integers")
    if codes.min() < 0 or codes.max() >= CODEBOOK_BINS:
        raise AudioError(f"{path}: codes outside 0..{CODEBOOK_BINS - 1} (min {codes.min()}, max {codes.max()})")
    return codes.astype(np.int32)


def encode_file(args: argparse.Namespace) -> int:
    from rtpipe.stages.mimi.stage import MimiEncode, MimiParams

    samples = read_audio_24k(args.input)
    frames = -(-samples.size // FRAME_SAMPLES)
    if args.offline:
        check_offline_memory(frames)
    padded = np.zeros(frames * FRAME_SAMPLES, np.float32)
    padded[: samples.size] = samples
    stage = MimiEncode(
        MimiParams(weights=args.weights, codebooks=args.codebooks, dtype=DTYPES[args.dtype], seed=args.seed)
    )
    stage.open("cpu")
    if args.offline:
        import torch

        with torch.inference_mode():
            codes = stage.model.encode_offline(torch.from_numpy(padded), args.codebooks).numpy().T
    else:
        codes = np.stack(
            [stage.process(padded[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]) for i in range(frames)], axis=1
        )
    stage.close()
    write_codes(args.output, codes)
    print(f"rtpipe: {args.input}: {frames} frames -> {args.output} codes {list(codes.shape)}", file=sys.stderr)
    return 0


def write_codes(path: str, codes: np.ndarray) -> None:
    """Codes as int32 .npy at exactly `path` (np.save given a name would add .npy to it)."""
    try:
        with open(path, "wb") as f:
            np.save(f, codes.astype(np.int32))
    except OSError as e:
        raise AudioError(f"{path}: cannot write codes: {e.strerror or e}") from e


def decode_file(args: argparse.Namespace) -> int:
    from rtpipe.stages.mimi.stage import MimiDecode, MimiDecodeParams

    codes = read_codes(args.input)
    if args.offline:
        check_offline_memory(codes.shape[1])
    stage = MimiDecode(MimiDecodeParams(weights=args.weights, dtype=DTYPES[args.dtype], seed=args.seed))
    stage.open("cpu")
    if args.offline:
        import torch

        with torch.inference_mode():
            samples = stage.model.decode_offline(torch.from_numpy(codes.T.astype(np.int64))).numpy()
    else:
        samples = np.concatenate([stage.process(np.ascontiguousarray(codes[:, i])) for i in range(codes.shape[1])])
    stage.close()
    write_audio_24k(args.output, samples)
    print(
        f"rtpipe: {args.input}: {codes.shape[1]} frames -> {args.output} ({samples.size / SAMPLE_RATE:.2f} s)",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    check_arguments(args)
    return encode_file(args) if args.action == "encode" else decode_file(args)
