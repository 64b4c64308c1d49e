"""The `mimi.encode` and `mimi.decode` stages: one 80 ms audio frame <-> one frame of Mimi codes.

Both are time-aligned from the first frame (delay_frames = 0). Without `weights` they run on seeded
random weights (the same in every process, so encode and decode agree) and say so loudly on stderr.
Both carry `session_slots` conversations (`sessions = True`): the live slots of a frame run through the
model as one batch, each with its own streaming state, and each slot's output is what its conversation
alone would give (process(): one conversation, in slot 0).
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from rtpipe.stages.base import AUDIO_FRAME, FRAME_SAMPLES, NoState, PayloadSpec, Role, Stage
from rtpipe.stages.checkpoint import DTYPE_BYTES, check_local_file, check_memory_fits, check_seed, checkpoint_load_bytes
from rtpipe.stages.errors import ConfigError

# importable from here too (the pipeline's infer command checks an LM's card against CODEBOOK_BINS)
from rtpipe.stages.mimi.codes import CODEBOOK_BINS, TOTAL_CODEBOOKS

if TYPE_CHECKING:  # torch is imported only when a model stage opens
    from rtpipe.stages.mimi.slots import LiveSlots

# Numbers a Mimi holds: 79.3 M parameters and the codebooks' buffers (the sum over
# stages.mimi.checkpoint.expected_tensors(), kept here so that params are checked without torch).
STATE_ELEMENTS = 96_151_393
# Numbers one session slot's streaming state holds (float32 at most; tests/test_mimi_sessions.py checks them
# against new_encode_state / new_decode_state): mostly the transformer's 250-step KV window, 8 MB.
ENCODE_SESSION_ELEMENTS = 2_607_488
DECODE_SESSION_ELEMENTS = 2_510_458
LIVE_SETS_KEPT = 256  # distinct sets of live slots a stage keeps ready (a frame's set is mostly the last one's)


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


def check_mimi_memory(weights: str | None, where: str, session_elements: int = 0) -> None:
    """ConfigError when a Mimi (built in float32 whatever its dtype, plus the checkpoint file read whole
    while it loads) and `session_elements` numbers of streaming state would not fit in the memory
    available now."""
    need = (STATE_ELEMENTS + session_elements) * DTYPE_BYTES["float32"] + checkpoint_load_bytes(weights)
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
    """What both Mimi stages share: loading the model on open, one streaming state row per session slot,
    resetting one slot or all of them."""

    role = Role.PROCESSOR
    sessions = True
    kind = ""  # the registry name, for messages
    session_elements = 0  # numbers of streaming state per session slot
    _live: dict[bytes, LiveSlots]  # each distinct set of live slots seen, ready for the model

    def __init__(self, params=None):
        super().__init__(params)
        self.model = None
        self._live = {}

    def check_sessions(self, slots: int, where: str) -> None:
        """ConfigError naming `where` when the model and `slots` sessions' streaming state do not fit."""
        super().check_sessions(slots, where)
        check_mimi_memory(self.params.weights, where, slots * self.session_elements)

    def open(self, device: str = "cpu") -> None:
        self.model = _load_model(self.kind, self.params.weights, self.params.dtype, self.params.seed, device)
        self.reset()

    def _new_state(self):
        raise NotImplementedError

    def reset(self) -> None:
        """Every slot starts over."""
        if self.model is None:
            self.state = NoState()
            return
        import torch

        with torch.inference_mode():
            self.state = self._new_state()

    def reset_session(self, slot: int) -> None:
        """Slot `slot` starts a new conversation; the other slots carry on untouched. ValueError for a slot
        this stage does not have."""
        if not 0 <= slot < self.session_slots:
            raise ValueError(f"{self.kind}: session slot {slot}: this stage has slots 0..{self.session_slots - 1}")
        if self.model is None:
            return
        import torch

        with torch.inference_mode():
            self.state.reset_slot(slot)

    def close(self) -> None:
        self.model = None
        self.state = NoState()

    def _live_slots(self, frames: np.ndarray, live: np.ndarray, row_shape: tuple[int, ...]) -> LiveSlots:
        """`live` as LiveSlots (one made per distinct set, kept), after checking the frame's rows and the
        slot indices. ValueError saying what is wrong."""
        if frames.shape[0] != self.session_slots or frames.shape[1:] != row_shape:
            raise ValueError(
                f"{self.kind}: frames of shape {frames.shape}, expected ({self.session_slots}, "
                f"{', '.join(map(str, row_shape))}) (one row per session slot)"
            )
        key = np.ascontiguousarray(live, dtype=np.int64).tobytes()
        slots = self._live.get(key)
        if slots is None:
            from rtpipe.stages.mimi.slots import LiveSlots

            slots = LiveSlots.of(np.frombuffer(key, dtype=np.int64).tolist())  # ValueError: empty or unordered
            if slots.slots[-1] >= self.session_slots:
                raise ValueError(
                    f"{self.kind}: live session slot {slots.slots[-1]}: this stage has slots "
                    f"0..{self.session_slots - 1}"
                )
            if len(self._live) >= LIVE_SETS_KEPT:
                self._live.clear()
            self._live[key] = slots
        return slots


def _check_finite(samples: np.ndarray, kind: str, slot: int | None = None) -> None:
    """ValueError naming the first sample that is NaN or infinite: it would stay in the conversation's
    streaming state (the convolutions' windows, the KV window) for as long as it lasts."""
    if not np.isfinite(samples).all():
        where = f"session slot {slot}: " if slot is not None else ""
        bad = int(np.flatnonzero(~np.isfinite(samples))[0])
        raise ValueError(f"{kind}: {where}sample {bad} is {samples[bad]}, expected a finite number")


def _check_codes(codes: np.ndarray, kind: str, slot: int | None = None) -> None:
    """ValueError naming the first code outside 0..CODEBOOK_BINS - 1 (and its session slot)."""
    if codes.min() < 0 or codes.max() >= CODEBOOK_BINS:
        where = f"session slot {slot}: " if slot is not None else ""
        bad = int(np.flatnonzero((codes < 0) | (codes >= CODEBOOK_BINS))[0])
        raise ValueError(f"{kind}: {where}code {int(codes[bad])} of codebook {bad} is outside 0..{CODEBOOK_BINS - 1}")


class MimiEncode(_MimiStage):
    """float32[1920] audio at 24 kHz -> int32[codebooks] codes, streaming."""

    kind = "mimi.encode"
    Params = MimiParams
    session_elements = ENCODE_SESSION_ELEMENTS

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        if input_spec != AUDIO_FRAME:
            raise ConfigError(f"mimi.encode: input {input_spec}: expected audio frames {AUDIO_FRAME}")
        return PayloadSpec("int32", (self.params.codebooks,))

    def open(self, device: str = "cpu") -> None:
        import torch

        super().open(device)
        self._samples = torch.zeros(self.session_slots, FRAME_SAMPLES)

    def _new_state(self):
        return self.model.new_encode_state(self.session_slots)

    def process(self, frame: np.ndarray) -> np.ndarray:
        """One conversation (slot 0): audio float32[1920] -> codes int32[codebooks]. ValueError for a frame
        of another shape or with a sample that is not finite."""
        import torch

        if frame.shape != (FRAME_SAMPLES,):
            raise ValueError(f"mimi.encode: frame of shape {frame.shape}, expected ({FRAME_SAMPLES},)")
        _check_finite(frame, self.kind)
        self._samples.numpy()[0] = frame  # copy: ring slots are read-only views
        with torch.inference_mode():
            codes = self.model.encode_step(self._samples[0], self.state, self.params.codebooks)
        return codes[0].numpy().astype(np.int32)

    def process_sessions(self, frames: np.ndarray, live: np.ndarray) -> np.ndarray:
        """frames float32[slots, 1920], `live` the slots carrying a conversation -> codes
        int32[slots, codebooks] (rows outside `live` are zero). ValueError naming the first slot whose
        audio is not finite, or for frames and slots that do not fit this stage."""
        import torch

        slots = self._live_slots(frames, live, (FRAME_SAMPLES,))
        batch = self._samples.numpy()[: slots.count]
        np.take(frames, slots.index.numpy(), axis=0, out=batch)  # copy: ring slots are read-only views
        if not np.isfinite(batch).all():
            for row, slot in enumerate(slots.slots):
                _check_finite(batch[row], self.kind, slot)
        with torch.inference_mode():
            codes = self.model.encode_sessions(self._samples[: slots.count], self.state, self.params.codebooks, slots)
        out = np.zeros((self.session_slots, self.params.codebooks), dtype=np.int32)
        out[slots.index.numpy()] = codes[:, 0].numpy()
        return out

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
    session_elements = DECODE_SESSION_ELEMENTS

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
        return self.model.new_decode_state(self.session_slots)

    def process(self, frame: np.ndarray) -> np.ndarray:
        """One conversation (slot 0): codes int32[n] -> audio float32[1920]. ValueError for codes of
        another shape or outside 0..2047."""
        import torch

        if frame.ndim != 1 or not 1 <= frame.shape[0] <= TOTAL_CODEBOOKS:
            raise ValueError(f"mimi.decode: codes of shape {frame.shape}, expected (1..{TOTAL_CODEBOOKS},)")
        _check_codes(frame, self.kind)
        codes = torch.from_numpy(frame.astype(np.int64)).view(1, -1)
        with torch.inference_mode():
            samples = self.model.decode_step(codes, self.state)
        return samples.numpy()

    def process_sessions(self, frames: np.ndarray, live: np.ndarray) -> np.ndarray:
        """frames int32[slots, n] codes, `live` the slots carrying a conversation -> audio
        float32[slots, 1920] (rows outside `live` are silence). ValueError naming the first slot with a
        code outside 0..2047, or for frames and slots that do not fit this stage."""
        import torch

        if frames.ndim != 2 or not 1 <= frames.shape[1] <= TOTAL_CODEBOOKS:
            raise ValueError(
                f"mimi.decode: codes of shape {frames.shape}, expected ({self.session_slots}, 1..{TOTAL_CODEBOOKS})"
            )
        slots = self._live_slots(frames, live, frames.shape[1:])
        batch = frames[slots.index.numpy()]
        if batch.min() < 0 or batch.max() >= CODEBOOK_BINS:
            for row, slot in enumerate(slots.slots):
                _check_codes(batch[row], self.kind, slot)
        codes = torch.from_numpy(batch.astype(np.int64)).view(slots.count, 1, -1)
        with torch.inference_mode():
            samples = self.model.decode_sessions(codes, self.state, slots)
        out = np.zeros((self.session_slots, FRAME_SAMPLES), dtype=np.float32)
        out[slots.index.numpy()] = samples.numpy()
        return out

    def process_offline(self, frames: np.ndarray) -> np.ndarray:
        """All frames of codes at once: [N, n] -> samples [N, 1920] (for check-causal)."""
        import torch

        codes = torch.from_numpy(np.asarray(frames).astype(np.int64))
        with torch.inference_mode():
            samples = self.model.decode_offline(codes)
        return samples.numpy().reshape(codes.shape[0], FRAME_SAMPLES)
