"""`rtpipe infer IN.wav OUT.wav`: offline replay, like Kyutai's moshi-inference. Runs mimi.encode ->
moshi.step -> mimi.decode frame by frame in this one process and writes the model's side of the
conversation, as many whole frames as the input has (what the live pipeline plays for the same input);
`--codes-out` keeps its codes (`audio` int [8, frames]) and text tokens (`text` [frames]).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from rtpipe.pipeline.cli.arguments import check_output_path, file_identity
from rtpipe.pipeline.cli.audio_files import read_audio_24k, write_audio_24k
from rtpipe.stages.base import AUDIO_FRAME, FRAME_SAMPLES, SAMPLE_RATE, Stage
from rtpipe.stages.errors import ConfigError
from rtpipe.stages.mimi.stage import CODEBOOK_BINS
from rtpipe.stages.moshi.stage import MoshiStep
from rtpipe.stages.registry import find_stage


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtpipe infer", description=__doc__.splitlines()[0])
    parser.add_argument("input", metavar="IN.wav", help="the user's side (any rate; mixed to mono)")
    parser.add_argument("output", metavar="OUT.wav", help="the model's side, 24 kHz mono")
    parser.add_argument(
        "--mimi-weights", default=None, help="Mimi safetensors or hf://owner/repo/file (default: random weights)"
    )
    parser.add_argument(
        "--lm-weights", default=None, help="Moshi LM safetensors or hf://owner/repo/file (default: random weights)"
    )
    parser.add_argument(
        "--lm-config",
        default=None,
        metavar="config.json",
        help="a Kyutai config.json giving the LM's architecture (default: --size)",
    )
    parser.add_argument(
        "--size",
        default="tiny",
        help="built-in LM size without --lm-config (tiny, small, medium, large, 7b; default tiny)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model to show text as words")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="always the most likely token")
    mode.add_argument("--temperature", type=float, default=None, help="audio sampling temperature (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="audio top-k (default 250)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (repeatable runs)")
    parser.add_argument(
        "--codes-out",
        default=None,
        metavar="OUT.npz",
        help="save the model's codes (audio [8, frames]) and text tokens (text [frames])",
    )
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.greedy and args.top_k is not None:
        raise ConfigError("--top-k: cannot be combined with --greedy")
    _check_outputs(args)  # before the models load and run: not a traceback after the whole inference
    encode, lm, decode = _build_stages(args)
    samples = read_audio_24k(args.input)
    frames = -(-samples.size // FRAME_SAMPLES)
    padded = np.zeros(frames * FRAME_SAMPLES, dtype=np.float32)
    padded[: samples.size] = samples

    for stage in (encode, lm, decode):
        stage.open("cpu")
    start = time.perf_counter()
    try:
        audio, codes, text, words = _replay(encode, lm, decode, padded, frames)
    finally:
        for stage in (encode, lm, decode):
            stage.close()
    seconds = time.perf_counter() - start

    write_audio_24k(args.output, audio)
    if args.codes_out:
        np.savez(args.codes_out, audio=codes, text=text)
    audio_s = frames * FRAME_SAMPLES / SAMPLE_RATE
    print(
        f"rtpipe infer: {frames} frames ({audio_s:.2f} s) in {seconds:.2f} s "
        f"(real-time factor {seconds / audio_s:.2f}); wrote {args.output}"
        + (f" and {args.codes_out}" if args.codes_out else ""),
        file=sys.stderr,
    )
    if words:
        print("".join(words).strip())
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """ConfigError naming the argument when OUT.wav or --codes-out cannot be written."""
    if Path(args.output).suffix.lower() != ".wav":
        raise ConfigError(f"OUT.wav {args.output}: rtpipe infer writes WAV: name it .wav")
    if file_identity(args.output) == file_identity(args.input):
        raise ConfigError(f"OUT.wav {args.output}: is the input; it would be overwritten")
    check_output_path(args.output, "OUT.wav")
    if args.codes_out:
        check_output_path(args.codes_out, "--codes-out")


def _build_stages(args: argparse.Namespace) -> tuple[Stage, MoshiStep, Stage]:
    """mimi.encode, moshi.step and mimi.decode from the arguments, their params validated (paths,
    numbers, whether the model fits in memory) and their edges checked; nothing is loaded yet."""
    lm_params: dict[str, Any] = {"size": args.size, "dtype": args.dtype}
    for key, value in (
        ("config", args.lm_config),
        ("weights", args.lm_weights),
        ("tokenizer", args.tokenizer),
        ("seed", args.seed),
        ("temperature", args.temperature),
        ("top_k", args.top_k),
    ):
        if value is not None:
            lm_params[key] = value
    if args.greedy:
        lm_params["greedy"] = True
    mimi_params = {"weights": args.mimi_weights} if args.mimi_weights else {}
    encode = find_stage("mimi.encode").from_config(dict(mimi_params), "mimi")
    # from_config builds the class it is called on, typed as the base it is defined in
    lm = cast(MoshiStep, MoshiStep.from_config(lm_params, "lm"))
    decode = find_stage("mimi.decode").from_config(dict(mimi_params), "mimi")
    decode.output_spec(lm.output_spec(encode.output_spec(AUDIO_FRAME)))
    if lm.config.card != CODEBOOK_BINS:  # else the first frame's codes are out of range, mid-run
        raise ConfigError(
            f"lm.card = {lm.config.card}: the LM reads and writes Mimi's codes, "
            f"0..{CODEBOOK_BINS - 1}: expected card = {CODEBOOK_BINS}"
        )
    return encode, lm, decode


def _replay(
    encode: Stage, lm: MoshiStep, decode: Stage, padded: np.ndarray, frames: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Every frame through encode -> step -> decode: (audio float32 [frames * FRAME_SAMPLES], codes int32
    [dep_q, frames], text tokens int64 [frames], words).

    Every frame the step emits is decoded, its warm-up frame(s) of zero codes included (delay_frames:
    it has nothing of its own to say before it has heard a frame): that is what the live pipeline
    plays, sample for sample, and it keeps the output as long as the input, frame k answering input
    frame k - delay. Skipping the warm-up frame made the output a frame shorter than the input."""
    padding_id = lm.config.existing_text_padding_id  # "nothing said" for the warm-up frames' text
    audio: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    text: list[int] = []
    words: list[str] = []
    for k in range(frames):
        user_codes = encode.process(padded[k * FRAME_SAMPLES : (k + 1) * FRAME_SAMPLES])
        model_codes = np.asarray(lm.process(np.asarray(user_codes, dtype=np.int32)), dtype=np.int32)
        events = lm.events()
        text.append(events[0]["text_token"] if events else padding_id)
        words.extend(event["text"] for event in events if event.get("text"))
        codes.append(model_codes)
        audio.append(np.asarray(decode.process(model_codes), dtype=np.float32))
    return (np.concatenate(audio), np.stack(codes, axis=1), np.asarray(text, dtype=np.int64), words)
