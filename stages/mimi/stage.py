"""The `mimi.encode` and `mimi.decode` stages: one 80 ms audio frame <-> one frame of Mimi codes.

Both are time-aligned from the first frame (delay_frames = 0). Without `weights` they run on seeded
random weights (the same in every process, so encode and decode agree) and say so loudly on stderr.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np

from rtpipe.stages.base import AUDIO_FRAME, FRAME_SAMPLES, NoState, PayloadSpec, Role, Stage
from rtpipe.stages.checkpoint import DTYPE_BYTES, check_local_file, check_memory_fits, check_seed, checkpoint_load_bytes
from rtpipe.stages.errors import ConfigError

# importable from here too (the pipeline's infer command checks an LM's card against CODEBOOK_BINS)
from rtpipe.stages.mimi.codes import CODEBOOK_BINS, TOTAL_CODEBOOKS

# Numbers a Mimi holds: 79.3 M parameters and the codebooks' buffers (the sum over
# stages.mimi.checkpoint.expected_tensors(), kept here so that params are checked without torch).
STATE_ELEMENTS = 96_151_393


@dataclass
class MimiDecodeParams:
    weights: str | None = None  # safetensors path or hf://owner/repo/file; None: random weights
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0  # random weights only

    def validate(self, where: str) -> None:
        check_local_file(self.weights, f"{where}.weights")
        check_seed(self.seed, f"{where}.seed")
        check_mimi_memory(self.weights, where)


@dataclass
class MimiParams(MimiDecodeParams):
    codebooks: int = 8  # how many of the 32 codebooks to emit (Moshi uses 8)

    def validate(self, where: str) -> None:
        if not 1 <= self.codebooks <= TOTAL_CODEBOOKS:
            raise ConfigError(f"{where}.codebooks = {self.codebooks}: expected 1 to {TOTAL_CODEBOOKS}")
        super().validate(where)


def check_mimi_memory(weights: str | None, where: str) -> None:
    """ConfigError when a Mimi (built in float32 whatever its dtype, plus the checkpoint file read whole
    while it loads) would not fit in the memory available now."""
    need = STATE_ELEMENTS * DTYPE_BYTES["float32"] + checkpoint_load_bytes(weights)
    check_memory_fits(need, "a Mimi codec", where)


def _load_model(kind: str, weights: str | None, dtype_name: str, seed: int, device: str):
    if device != "cpu":
        raise ConfigError(f"{kind}: device {device!r}: this Mimi runs on the CPU only")
    check_mimi_memory(weights, kind)  # again: a stage built from params directly never validated them
    import torch  # only when a model stage is opened

    from rtpipe.stages.mimi.checkpoint import load_mimi

    if weights is None:
        print(
            f"rtpipe: WARNING: {kind} has no weights: running on random weights (seed {seed}); "
            "timings are real, the audio is not",
            file=sys.stderr,
            flush=True,
        )
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    model = load_mimi(weights, dtype=dtype, seed=seed)
    # the model's many long-lived objects leave the collector's sight: no full collection walks them
    # in the middle of a frame
    gc.collect()
    gc.freeze()
    return model


class _MimiStage(Stage):
    """What both Mimi stages share: loading the model on open, a fresh streaming state on reset."""

    role = Role.PROCESSOR
    kind = ""  # the registry name, for messages

    def __init__(self, params=None):
        super().__init__(params)
        self.model = None

    def open(self, device: str = "cpu") -> None:
        self.model = _load_model(self.kind, self.params.weights, self.params.dtype, self.params.seed, device)
        self.reset()

    def _new_state(self):
        raise NotImplementedError

    def reset(self) -> None:
        if self.model is None:
            self.state = NoState()
            return
        import torch

        with torch.inference_mode():
            self.state = self._new_state()

    def close(self) -> None:
        self.model = None
        self.state = NoState()


class MimiEncode(_MimiStage):
    """float32[1920] audio at 24 kHz -> int32[codebooks] codes, streaming."""

    kind = "mimi.encode"
    Params = MimiParams

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        if input_spec != AUDIO_FRAME:
            raise ConfigError(f"mimi.encode: input {input_spec}: expected audio frames {AUDIO_FRAME}")
        return PayloadSpec("int32", (self.params.codebooks,))

    def open(self, device: str = "cpu") -> None:
        import torch

        super().open(device)
        self._samples = torch.zeros(FRAME_SAMPLES)

    def _new_state(self):
        return self.model.new_encode_state()

    def process(self, frame: np.ndarray) -> np.ndarray:
        import torch

        if frame.shape != (FRAME_SAMPLES,):
            raise ValueError(f"mimi.encode: frame of shape {frame.shape}, expected ({FRAME_SAMPLES},)")
        self._samples.numpy()[:] = frame  # copy: ring slots are read-only views
        with torch.inference_mode():
            codes = self.model.encode_step(self._samples, self.state, self.params.codebooks)
        return codes[0].numpy().astype(np.int32)

    def process_offline(self, frames: np.ndarray) -> np.ndarray:
        """The whole signal at once: frames [N, 1920] -> codes [N, codebooks] (for check-causal)."""
        import torch

        samples = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32).reshape(-1))
        with torch.inference_mode():
            codes = self.model.encode_offline(samples, self.params.codebooks)
        return codes.numpy().astype(np.int32)


class MimiDecode(_MimiStage):
    """int32[n] codes (n = 1..32) -> float32[1920] audio at 24 kHz, streaming."""

    kind = "mimi.decode"
    Params = MimiDecodeParams

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        if (
            input_spec is None
            or input_spec.dtype != "int32"
            or len(input_spec.shape) != 1
            or not 1 <= input_spec.shape[0] <= TOTAL_CODEBOOKS
        ):
            raise ConfigError(f"mimi.decode: input {input_spec}: expected codes int32[1..{TOTAL_CODEBOOKS}]")
        return AUDIO_FRAME

    def _new_state(self):
        return self.model.new_decode_state()

    def process(self, frame: np.ndarray) -> np.ndarray:
        import torch

        if frame.ndim != 1 or not 1 <= frame.shape[0] <= TOTAL_CODEBOOKS:
            raise ValueError(f"mimi.decode: codes of shape {frame.shape}, expected (1..{TOTAL_CODEBOOKS},)")
        if frame.min() < 0 or frame.max() >= CODEBOOK_BINS:
            bad = int(np.flatnonzero((frame < 0) | (frame >= CODEBOOK_BINS))[0])
            raise ValueError(f"mimi.decode: code {int(frame[bad])} of codebook {bad} is outside 0..{CODEBOOK_BINS - 1}")
        codes = torch.from_numpy(frame.astype(np.int64)).view(1, -1)
        with torch.inference_mode():
            samples = self.model.decode_step(codes, self.state)
        return samples.numpy()

    def process_offline(self, frames: np.ndarray) -> np.ndarray:
        """All frames of codes at once: [N, n] -> samples [N, 1920] (for check-causal)."""
        import torch

        codes = torch.from_numpy(np.asarray(frames).astype(np.int64))
        with torch.inference_mode():
            samples = self.model.decode_offline(codes)
        return samples.numpy().reshape(codes.shape[0], FRAME_SAMPLES)
