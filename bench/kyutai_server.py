"""Kyutai's reference `moshi.server` (moshi 0.2.13), started by `rtpipe bench serve --kyutai` on the very
files the `rtpipe serve` it measures runs on: the baseline of the "lag P50 at most 0.8x Kyutai's" target,
measured in the same run with the same weights, with no checkpoint to download.

SharedWeights.write() puts in a folder the models rtpipe's default stages run when given no weights (the
tiny Moshi LM and Mimi, seeded random weights, seed 0) in Kyutai's file layouts, the LM's config.json, and
a sentencepiece tokenizer with a piece for each of the LM's text ids (Kyutai's server looks up every text
token it samples); `overrides()` points rtpipe's stages at them. KyutaiServer runs Kyutai's server on them,
unchanged but for a no-op torch.cuda.synchronize, with its own defaults (LM in bfloat16, torch's threads).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rtpipe.bench.processes import stop_process_group
from rtpipe.stages.errors import ConfigError

MOSHI_VERSION = "0.2.13"  # the reference release whose server.py and loaders.py this drives
LM_DTYPE = "bfloat16"  # Kyutai's server runs its LM in bfloat16 (--half: float16), so rtpipe's LM does too
# the model stages of `rtpipe serve` and the kinds a comparison with Kyutai's server needs them to be
MODEL_STAGES = {"encode": "mimi.encode", "lm": "moshi.step", "decode": "mimi.decode"}
# the fields of those stages that --kyutai sets (SharedWeights.overrides) or that must keep their default
# for the files to be the model they run: a --set of any of them is a ConfigError
_FIXED = {
    "lm": ("weights", "config", "tokenizer", "dtype", "size"),
    "encode": ("weights", "dtype"),
    "decode": ("weights", "dtype"),
}
FIXED_FIELDS = frozenset(f"stages.{stage}.params.{field}" for stage, fields in _FIXED.items() for field in fields)
READY_TIMEOUT_S = 300.0  # Kyutai's server loads both models and warms up before it listens
POLL_S = 0.2
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # its log's terminal colours
# Kyutai's server unchanged but for one stand-in: its warm-up ends with torch.cuda.synchronize(), which
# fails on a machine without CUDA. moshi/server.py runs main() when imported, with sys.argv's flags.
SHIM = (
    "import runpy, sys, torch\n"
    "torch.cuda.synchronize = lambda *args, **kwargs: None\n"
    "sys.argv[0] = 'moshi.server'\n"
    "runpy.run_module('moshi.server', run_name='__main__', alter_sys=True)\n"
)


class KyutaiServerError(Exception):
    """Kyutai's server failed or never became ready, or its files could not be written (exit code 1)."""


def check_moshi_installed() -> None:
    """ConfigError (one line) when Kyutai's `moshi` package is not importable here."""
    if importlib.util.find_spec("moshi") is None:
        raise ConfigError(f"--kyutai needs Kyutai's moshi package: pip install --no-deps moshi=={MOSHI_VERSION}")


# --- the files both servers run on -------------------------------------------------------------------


@dataclass(frozen=True)
class SharedWeights:
    """Paths of the files written for both servers (Kyutai's layouts: safetensors, config.json, .model)."""

    lm_weights: Path
    lm_config: Path
    mimi_weights: Path
    tokenizer: Path

    @staticmethod
    def write(folder: Path) -> SharedWeights:
        """Writes into `folder` the LM and Mimi that rtpipe's stages run with no weights (their default
        size and seed), the LM's config.json and a tokenizer covering its text ids."""
        import torch
        from safetensors.torch import save_file

        from rtpipe.stages.mimi.checkpoint import random_state_dict
        from rtpipe.stages.mimi.stage import MimiParams
        from rtpipe.stages.moshi.lm import LmModel
        from rtpipe.stages.moshi.stage import MoshiStepParams, lm_config

        files = SharedWeights(
            folder / "model.safetensors",
            folder / "config.json",
            folder / "mimi.safetensors",
            folder / "tokenizer.model",
        )
        lm_params = MoshiStepParams()
        config = lm_config(lm_params)
        with torch.no_grad():
            model = LmModel(config)
            model.init_random(lm_params.seed or 0)  # the seed moshi.step's open() takes with no weights
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(files.lm_weights))
        del model
        files.lm_config.write_text(json.dumps(config.to_dict(), indent=1))
        save_file(random_state_dict(MimiParams().seed), str(files.mimi_weights))
        files.tokenizer.write_bytes(tokenizer_model_bytes(config.text_card))
        return files

    def overrides(self) -> list[str]:
        """`rtpipe serve` --set values that run its model stages on these files (LM in Kyutai's dtype)."""
        lm = "stages.lm.params"
        return [
            f"{lm}.weights={self.lm_weights}",
            f"{lm}.config={self.lm_config}",
            f"{lm}.tokenizer={self.tokenizer}",
            f"{lm}.dtype={LM_DTYPE}",
            f"stages.encode.params.weights={self.mimi_weights}",
            f"stages.decode.params.weights={self.mimi_weights}",
        ]


@contextlib.contextmanager
def shared_weights() -> Iterator[SharedWeights]:
    """SharedWeights written in a temporary folder, removed with everything in it on exit."""
    folder = Path(tempfile.mkdtemp(prefix="rtpipe-kyutai-"))
    try:
        try:
            files = SharedWeights.write(folder)
        except OSError as e:
            raise KyutaiServerError(f"writing the shared model files in {folder}: {e}") from None
        yield files
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_overrides(sessions: int, overrides: Sequence[str]) -> None:
    """ConfigError (one line) when a --set would undo the comparison: a model stage of another kind, or a
    field --kyutai sets itself (the models' files, the LM's size and dtype)."""
    from rtpipe.pipeline.cli import serve
    from rtpipe.pipeline.runtime import config as pipeline_config

    for override in overrides:
        key = override.partition("=")[0].strip()
        if key in FIXED_FIELDS:
            raise ConfigError(f"--set {override}: --kyutai sets {key} itself (both servers run the same files)")
    sets = [arg for o in overrides for arg in ("--set", o)]
    args = serve.build_parser().parse_args(["--sessions", str(sessions), *sets])
    config = pipeline_config.validate(serve.serve_raw(args))
    for name, kind in MODEL_STAGES.items():
        have = config.stage(name).kind
        if have != kind:
            raise ConfigError(
                f"stages.{name}.kind = {have!r}: --kyutai compares the model stages with Kyutai's, so it needs {kind}"
            )


# --- a tokenizer for any vocabulary size -----------------------------------------------------------
# A sentencepiece model file is a serialized ModelProto (sentencepiece_model.proto); written here by hand
# so that neither a training corpus of 32000 pieces nor the protobuf package is needed.
_UNKNOWN, _CONTROL, _NORMAL = 2, 3, 1  # SentencePiece.Type
_UNIGRAM = 1  # TrainerSpec.ModelType
_SPECIALS = [("<unk>", _UNKNOWN), ("<s>", _CONTROL), ("</s>", _CONTROL), ("<pad>", _CONTROL)]  # ids 0-3
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
WORD_START = "\u2581"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:  # wire type 2: length-delimited
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _field_int(number: int, value: int) -> bytes:  # wire type 0: varint (int32 -1 is 10 bytes)
    return _varint(number << 3) + _varint(value & 0xFFFFFFFFFFFFFFFF)


def _field_float(number: int, value: float) -> bytes:  # wire type 5: fixed32
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def tokenizer_pieces(vocab_size: int) -> list[str]:
    """`vocab_size` distinct pieces: the 4 specials, then syllables (consonant + vowel) alone and starting
    a word, then words of 2, 3 ... syllables, so that a random model's text reads as made-up words."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    pieces = [name for name, _ in _SPECIALS] + [WORD_START] + list(_VOWELS)
    words = list(syllables)
    pieces += [WORD_START + s for s in syllables] + syllables
    while len(pieces) < vocab_size:
        words = [w + s for w in words for s in syllables]
        pieces += [WORD_START + w for w in words[: vocab_size - len(pieces)]]
    return pieces[:vocab_size]


def tokenizer_model_bytes(vocab_size: int) -> bytes:
    """A unigram sentencepiece model with exactly `vocab_size` pieces (ids 0 <unk>, 1 <s>, 2 </s>, 3 <pad>).
    ValueError under 16 pieces."""
    if vocab_size < 16:
        raise ValueError(f"vocab_size {vocab_size}: expected at least 16")
    kinds = dict(_SPECIALS)
    out = bytearray()
    for i, piece in enumerate(tokenizer_pieces(vocab_size)):
        kind = kinds.get(piece, _NORMAL)
        score = 0.0 if kind != _NORMAL else -1.0 - i / vocab_size  # shorter, earlier pieces preferred
        out += _field_bytes(1, _field_bytes(1, piece.encode()) + _field_float(2, score) + _field_int(3, kind))
    trainer = (
        _field_int(3, _UNIGRAM) + _field_int(4, vocab_size)
        + _field_int(40, 0) + _field_int(41, 1) + _field_int(42, 2) + _field_int(43, 3)
    )  # fmt: skip
    normalizer = _field_bytes(1, b"identity") + _field_int(3, 1) + _field_int(4, 1) + _field_int(5, 1)
    out += _field_bytes(2, trainer) + _field_bytes(3, normalizer)
    return bytes(out)


# --- the server --------------------------------------------------------------------------------------


def server_command(port: int, files: SharedWeights) -> list[str]:
    return [
        sys.executable, "-c", SHIM, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
        "--static", "none",  # else it downloads its web client from the HF hub
        "--moshi-weight", str(files.lm_weights), "--mimi-weight", str(files.mimi_weights),
        "--tokenizer", str(files.tokenizer), "--config-path", str(files.lm_config),
    ]  # fmt: skip


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        NO_TORCH_COMPILE="1",  # its RMSNorm would compile (slow, needs a C compiler) on first use
        HF_HUB_OFFLINE="1",  # every file is local: a hub call would be a bug, and fail at once
        PYTHONUNBUFFERED="1",  # its log lines come as they are printed
    )
    return env


class KyutaiServer:
    """Kyutai's `moshi.server` on `files` in a subprocess of its own process group, serving
    ws://127.0.0.1:PORT/api/chat (one session at a time), ready once it accepts connections; `stop()`
    always leaves nothing behind (SIGTERM, then SIGKILL to the group)."""

    def __init__(self, files: SharedWeights, port: int):
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/api/chat"
        self.process = subprocess.Popen(
            server_command(port, files),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # its log goes to stdout, a traceback to stderr: one stream to read
            text=True,
            env=server_environment(),
            start_new_session=True,
        )
        self.lines: deque[str] = deque(maxlen=40)
        threading.Thread(target=self._read_output, daemon=True).start()

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:  # drained to the end: it logs every frame and must never block
            text = _COLOUR.sub("", line).rstrip()
            if text and "frame handled in" not in text and "text token" not in text:
                self.lines.append(text)

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=POLL_S):
                return True
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Returns once it accepts connections; KyutaiServerError if it exits or takes over `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self._listening():
            self.check_alive()
            if time.monotonic() > deadline:
                raise KyutaiServerError(f"Kyutai's server not ready within {timeout_s:g} s: {self._last_words()}")
            time.sleep(POLL_S)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise KyutaiServerError(f"Kyutai's server exited ({self.process.returncode}): {self._last_words()}")

    def _last_words(self) -> str:
        time.sleep(POLL_S)  # let the reader take the last lines
        # a traceback's frames are indented: what is left is its log and the exception itself
        words = [line for line in self.lines if not line[:1].isspace() and not line.startswith("Traceback")]
        return " | ".join(words[-3:]) or "(no output)"

    def stop(self) -> None:
        stop_process_group(self.process)
