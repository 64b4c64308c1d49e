"""`rtpipe infer IN.wav OUT.wav`: offline replay, like Kyutai's moshi-inference. Runs mimi.encode ->
moshi.step -> mimi.decode frame by frame in this one process and writes the model's side of the
conversation; `--codes-out` keeps its codes (`audio` int [8, frames]) and text tokens (`text` [frames]).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from stages.base import AUDIO_FRAME, FRAME_SAMPLES, SAMPLE_RATE
from stages.errors import AudioError, ConfigError
from stages.registry import find_stage


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtpipe infer", description=__doc__.splitlines()[0])
    parser.add_argument("input", metavar="IN.wav", help="the user's side (any rate; mixed to mono)")
    parser.add_argument("output", metavar="OUT.wav", help="the model's side, 24 kHz mono")
    parser.add_argument("--mimi-weights", default=None,
                        help="Mimi safetensors or hf://owner/repo/file (default: random weights)")
    parser.add_argument("--lm-weights", default=None,
                        help="Moshi LM safetensors or hf://owner/repo/file (default: random weights)")
    parser.add_argument("--lm-config", default=None, metavar="config.json",
                        help="a Kyutai config.json giving the LM's architecture (default: --size)")
    parser.add_argument("--size", default="tiny", help="built-in LM size without --lm-config "
                        "(tiny, small, medium, large, 7b; default tiny)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model to show text as words")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="always the most likely token")
    mode.add_argument("--temperature", type=float, default=None,
                      help="audio sampling temperature (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="audio top-k (default 250)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (repeatable runs)")
    parser.add_argument("--codes-out", default=None, metavar="OUT.npz",
                        help="save the model's codes (audio [8, frames]) and text tokens (text [frames])")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.greedy and args.top_k is not None:
        raise ConfigError("--top-k: cannot be combined with --greedy")
    from pipeline.cmd_mimi import read_audio_24k

    samples = read_audio_24k(args.input)
    frames = -(-samples.size // FRAME_SAMPLES)
    padded = np.zeros(frames * FRAME_SAMPLES, dtype=np.float32)
    padded[:samples.size] = samples

    lm_params: dict = {"size": args.size, "dtype": args.dtype}
    for key, value in (("config", args.lm_config), ("weights", args.lm_weights),
                       ("tokenizer", args.tokenizer), ("seed", args.seed),
                       ("temperature", args.temperature), ("top_k", args.top_k)):
        if value is not None:
            lm_params[key] = value
    if args.greedy:
        lm_params["greedy"] = True
    mimi_params = {"weights": args.mimi_weights} if args.mimi_weights else {}
    encode = find_stage("mimi.encode").from_config(dict(mimi_params), "--mimi-weights")
    lm = find_stage("moshi.step").from_config(lm_params, "infer")
    decode = find_stage("mimi.decode").from_config(dict(mimi_params), "--mimi-weights")
    codes_spec = encode.output_spec(AUDIO_FRAME)
    decode.output_spec(lm.output_spec(codes_spec))

    for stage in (encode, lm, decode):
        stage.open("cpu")
    delay = lm.delay_frames
    audio_out, codes_out, text_out, words = [], [], [], []
    start = time.perf_counter()
    try:
        for k in range(frames):
            user_codes = encode.process(padded[k * FRAME_SAMPLES:(k + 1) * FRAME_SAMPLES])
            model_codes = lm.process(np.asarray(user_codes, dtype=np.int32))
            for event in lm.events():
                text_out.append(event["text_token"])
                if event.get("text"):
                    words.append(event["text"])
            if k < delay:
                continue  # the model's warm-up frame(s): nothing of its own to say yet
            codes_out.append(np.asarray(model_codes, dtype=np.int32))
            audio_out.append(np.asarray(decode.process(model_codes), dtype=np.float32))
    finally:
        for stage in (encode, lm, decode):
            stage.close()
    seconds = time.perf_counter() - start

    audio = np.concatenate(audio_out) if audio_out else np.zeros(0, dtype=np.float32)
    _write_wav(args.output, audio)
    if args.codes_out:
        audio_codes = np.stack(codes_out, axis=1) if codes_out else np.zeros((8, 0), np.int32)
        np.savez(args.codes_out, audio=audio_codes, text=np.asarray(text_out, dtype=np.int64))
    audio_s = frames * FRAME_SAMPLES / SAMPLE_RATE
    print(f"rtpipe infer: {frames} frames ({audio_s:.2f} s) in {seconds:.2f} s "
          f"(real-time factor {seconds / audio_s:.2f}); wrote {args.output}"
          + (f" and {args.codes_out}" if args.codes_out else ""), file=sys.stderr)
    if words:
        print("".join(words).strip())
    return 0


def _write_wav(path: str, audio: np.ndarray) -> None:
    import soundfile

    try:
        soundfile.write(path, audio, SAMPLE_RATE, subtype="FLOAT")
    except Exception as e:
        raise AudioError(f"{path}: cannot write audio: {e}") from e
