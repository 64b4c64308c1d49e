"""`moshi.step`: each frame, the user's Mimi codes in, the model's Mimi codes out (one LM step).

Text tokens go out through events(). The model, its weights and the KV caches are built in open(), in
the stage's own process; the supervisor only reads the (cheap) architecture to size the edges. With
`session_slots` = N it carries N conversations, each with its own caches, step, random generator and
sampling settings (set_session_sampling), and steps the live ones of a frame as one batch.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from rtpipe.stages.base import PayloadSpec, Role, SessionSettings, Stage
from rtpipe.stages.checkpoint import (
    DTYPE_BYTES,
    check_local_file,
    check_memory_fits,
    check_seed,
    checkpoint_load_bytes,
    resolve_weights_path,
)
from rtpipe.stages.errors import ConfigError
from rtpipe.stages.moshi.config import LmConfig, config_for_size, load_config_file
from rtpipe.stages.moshi.tokenizer import TextTokenizer

if TYPE_CHECKING:  # torch is imported in open() only: the supervisor builds this stage without it
    from rtpipe.stages.moshi.sampling import SamplingParams
    from rtpipe.stages.moshi.streaming import LmStreamer, LmStreamState

WARM_UP_STEPS = 3


@dataclass
class MoshiStepParams:
    """`size` picks a built-in architecture unless `config` (a Kyutai config.json) is given.
    No `weights` means seeded random weights (and a warning). Temperatures of 0 (or greedy) pick the
    most likely token; `seed` makes sampling repeatable; `context` overrides the KV window (steps)."""

    size: str = "tiny"
    config: str | None = None
    weights: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    temperature: float = 0.8
    top_k: int = 250
    text_temperature: float = 0.7
    text_top_k: int = 25
    greedy: bool = False
    seed: int | None = None
    tokenizer: str | None = None
    context: int | None = None

    def validate(self, where: str) -> None:
        for name in ("temperature", "text_temperature", "top_k", "text_top_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name} = {getattr(self, name)}: expected >= 0")
        if self.context is not None and self.context <= 0:
            raise ConfigError(f"{where}.context = {self.context}: expected a positive number of steps")
        check_seed(self.seed, f"{where}.seed")
        for name in ("config", "weights", "tokenizer"):
            check_local_file(getattr(self, name), f"{where}.{name}")
        config = lm_config(self, where)  # a bad size or config.json is a config error now, not at open()
        if self.context is None and config.context is None:
            raise ConfigError(
                f"{where}.context: the model's config says context = null; give the KV cache's size in steps"
            )
        check_lm_memory(config, self, where)


def lm_config(params: MoshiStepParams, where: str = "params") -> LmConfig:
    """The architecture `params` names: its config.json if given, else the built-in `size`."""
    if params.config is not None:
        return load_config_file(params.config)
    return config_for_size(params.size, f"{where}.size")


def check_lm_memory(config: LmConfig, params: MoshiStepParams, where: str, sessions: int = 1) -> None:
    """ConfigError when the model (its parameters and `sessions` conversations' KV caches in
    params.dtype, plus the checkpoint file read whole while it loads) would not fit in the memory
    available now."""
    elements = config.parameter_count() + sessions * config.kv_cache_elements(params.context)
    need = elements * DTYPE_BYTES[params.dtype] + checkpoint_load_bytes(params.weights)
    what = f"a {_parameters_text(config.parameter_count())} Moshi LM in {params.dtype}"
    if sessions > 1:
        what += f" with {sessions} sessions' KV caches"
    check_memory_fits(need, what, where)


def _parameters_text(count: int) -> str:
    return f"{count / 1e9:.2f} B-parameter" if count >= 1e9 else f"{count / 1e6:.1f} M-parameter"


@dataclass
class MoshiStepState:
    """The conversations so far: each session slot's LM stream state (KV caches, delay buffer, step,
    RNG, sampling) and frames stepped since its reset."""

    sessions: list[LmStreamState] = field(default_factory=list)  # one per slot, once opened
    frames: list[int] = field(default_factory=list)

    @property
    def lm(self) -> LmStreamState | None:
        """Slot 0's stream state: the one conversation of process()."""
        return self.sessions[0] if self.sessions else None


@dataclass(frozen=True)
class SessionSampling:
    """What one slot's conversations sample with: `sampling` (None: the stage's params) and `seed`
    (None: the stage's params.seed, or a fresh random seed at each reset when that is None too)."""

    sampling: SamplingParams | None = None
    seed: int | None = None


class MoshiStep(Stage):
    """Moshi's temporal + depth transformer, one step per 80 ms frame.

    Input int32 [user_q] (the user's codes), output int32 [dep_q] (the model's codes).
    delay_frames = max(delays) = 1 for Kyutai's models: like Kyutai's LMGen, the first step has no
    model frame yet (the audio streams are one step behind the text), so the stage emits a frame of
    zero codes for it; from then on output k is the model frame the reference returns at step k,
    which has read every code of user frame k - 1 (and the semantic code of frame k)."""

    role = Role.PROCESSOR
    Params = MoshiStepParams
    sessions = True

    def __init__(self, params: MoshiStepParams | None = None):
        super().__init__(params)
        self.config: LmConfig = lm_config(self.params)
        self.state = MoshiStepState()
        self._streamer: LmStreamer | None = None
        self._tokenizer: TextTokenizer | None = None
        self._events: list[dict] = []
        self._session_sampling: dict[int, SessionSampling] = {}  # slot -> its own; absent: the params'

    def check_sessions(self, slots: int, where: str) -> None:
        super().check_sessions(slots, where)
        check_lm_memory(self.config, self.params, where, sessions=slots)

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        want = PayloadSpec("int32", (self.config.user_q,))
        if input_spec != want:
            raise ConfigError(f"moshi.step input = {input_spec}: expected {want} (the user's Mimi codes)")
        return PayloadSpec("int32", (self.config.dep_q,))

    @property
    def delay_frames(self) -> int:
        return self.config.max_delay

    def open(self, device: str = "cpu") -> None:
        import torch

        from rtpipe.stages.moshi.lm import LmModel
        from rtpipe.stages.moshi.sampling import SamplingParams
        from rtpipe.stages.moshi.streaming import LmStreamer

        p = self.params
        # before the model: a bad tokenizer is said at once, not after a minute of loading weights
        self._tokenizer = self._open_tokenizer()
        slots = self.session_slots
        if device == "cpu":
            # again here: other stages may have taken memory since validate(), and a stage built from
            # params directly never ran it
            check_lm_memory(self.config, p, "moshi.step", sessions=slots)
        dtype = torch.bfloat16 if p.dtype == "bfloat16" else torch.float32
        model = LmModel(self.config, dtype=dtype, device=device)
        if p.weights is None:
            print(
                "rtpipe: WARNING: moshi.step has no weights: running a RANDOM "
                f"{p.size if p.config is None else p.config} model (its speech is noise); "
                "set params.weights to a Kyutai model.safetensors",
                file=sys.stderr,
                flush=True,
            )
            model.init_random(p.seed or 0)
        else:
            from rtpipe.stages.moshi.checkpoint import load_lm_weights

            load_lm_weights(model, p.weights)
        model.eval()
        if p.greedy:
            sampling = SamplingParams.greedy()
        else:
            sampling = SamplingParams(p.temperature, p.top_k, p.text_temperature, p.text_top_k)
        streamer = self._streamer = LmStreamer(model, sampling, context=p.context)
        states = [streamer.new_state(0) for _ in range(slots)]
        self.state = MoshiStepState(states, [0] * slots)
        # A few throwaway steps so the first live frame does not pay for first-call kernel setup
        # (oneDNN primitives, allocator growth, the batch path's kernel probes) and miss its deadline;
        # reset() then starts every slot over.
        silence = [0] * self.config.user_q
        for _ in range(WARM_UP_STEPS):
            streamer.step(states[0], silence)
            if slots > 1:
                streamer.step_many(states, [silence] * slots)
        self.reset()

    def _open_tokenizer(self) -> TextTokenizer | None:
        if self.params.tokenizer is None:
            return None
        return TextTokenizer(
            resolve_weights_path(self.params.tokenizer),
            (self.config.existing_text_padding_id, self.config.existing_text_end_padding_id),
        )

    def reset(self) -> None:
        """Starts every slot's conversation over (and drops pending events)."""
        for slot in range(len(self.state.sessions)):
            self.reset_session(slot)
        self._events = []

    def reset_session(self, slot: int) -> None:
        """Starts slot `slot`'s conversation over, reseeded from its seed (set_session_sampling, else
        params.seed, else a fresh random one); no other slot changes. Raises IndexError for a slot
        this stage does not have, RuntimeError before open()."""
        if self._streamer is None:
            raise RuntimeError("moshi.step: reset_session() before open()")
        state = self.state.sessions[slot]
        settings = self._session_sampling.get(slot, SessionSampling())
        seed = settings.seed if settings.seed is not None else self.params.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        self._streamer.restart(state, seed)
        state.sampling = settings.sampling
        self.state.frames[slot] = 0

    def set_session_sampling(self, slot: int, sampling: SamplingParams | None, seed: int | None = None) -> None:
        """What slot `slot` samples with, for every client of a server its own: `sampling` (its
        temperatures and top-k; SamplingParams.greedy() for greedy; None: the stage's params) applies
        from the slot's next step; `seed` reseeds the slot now and at each reset_session(slot), so
        one seed gives one slot the same tokens for the same input, whatever the other slots do
        (None: the slot's resets seed from params.seed, else at random). Settings outlast resets and
        may be given before open(). Call it between frames, from the thread that steps the stage.
        Raises ConfigError for a bad setting, IndexError for a slot outside 0..session_slots - 1."""
        where = f"moshi.step: session {slot}"
        if not 0 <= slot < self.session_slots:
            raise IndexError(f"{where}: this stage has session slots 0..{self.session_slots - 1}")
        if sampling is not None:
            sampling.validate(f"{where}.sampling")
        check_seed(seed, f"{where}.seed")
        settings = self._session_sampling[slot] = SessionSampling(sampling, seed)
        if slot < len(self.state.sessions) and self._streamer is not None:
            state = self.state.sessions[slot]
            state.sampling = settings.sampling
            if seed is not None:
                self._streamer.reseed(state, seed)

    def configure_session(self, slot: int, settings: SessionSettings) -> None:
        """A conversation's own sampling (a network client's query parameters), on the stage's params
        where it gives none; its seed is audio_seed, else text_seed (one generator per slot). A setting
        this stage cannot take is logged and the stage's own used: a client never stops the stage."""
        from rtpipe.stages.moshi.sampling import SamplingParams

        p = self.params
        given = {name: value for name, value in dataclasses.asdict(settings).items() if value is not None}
        seed = given.get("audio_seed", given.get("text_seed"))
        sampling = None
        if set(given) - {"audio_seed", "text_seed"}:
            default = (
                SamplingParams.greedy()
                if p.greedy
                else SamplingParams(p.temperature, p.top_k, p.text_temperature, p.text_top_k)
            )
            sampling = SamplingParams(
                given.get("audio_temperature", default.temperature),
                given.get("audio_top_k", default.top_k),
                given.get("text_temperature", default.text_temperature),
                given.get("text_top_k", default.text_top_k),
            )
        try:
            self.set_session_sampling(slot, sampling, seed)
        except ConfigError as e:
            print(f"rtpipe: moshi.step: session {slot}: settings not used: {e}", file=sys.stderr, flush=True)
            self.set_session_sampling(slot, None, None)
        except IndexError as e:  # not a slot of this stage: nothing to set
            print(f"rtpipe: moshi.step: {e}", file=sys.stderr, flush=True)

    def process(self, frame: np.ndarray) -> np.ndarray:
        """One frame of one conversation (session slot 0): int32 [user_q] -> int32 [dep_q]."""
        if self._streamer is None:
            raise RuntimeError("moshi.step: process() before open()")
        c = self.config
        codes = np.asarray(frame)
        if codes.shape != (c.user_q,):
            raise ValueError(f"moshi.step: input frame has shape {codes.shape}, expected ({c.user_q},)")
        if codes.min() < 0 or codes.max() >= c.card:
            raise ValueError(
                f"moshi.step: input codes must be in 0..{c.card - 1}, got {int(codes.min())}..{int(codes.max())}"
            )
        tokens = self._streamer.step(self.state.sessions[0], codes.tolist())
        self.state.frames[0] += 1
        return self._emit(0, tokens)

    def process_sessions(self, frames: np.ndarray, live: np.ndarray) -> np.ndarray:
        """All live slots of a frame as one batch: frames int32 [slots, user_q], `live` the ascending
        slot indices to step -> int32 [slots, dep_q] (rows outside `live`: zeros). Slots outside `live`
        are not touched. Raises ValueError naming the slot for codes outside 0..card - 1."""
        if self._streamer is None:
            raise RuntimeError("moshi.step: process_sessions() before open()")
        c = self.config
        slots = len(self.state.sessions)
        codes = np.asarray(frames)
        if codes.shape != (slots, c.user_q):
            raise ValueError(f"moshi.step: input frames have shape {codes.shape}, expected ({slots}, {c.user_q})")
        indices = [int(k) for k in live]
        rows = codes[indices]
        bad = ((rows < 0) | (rows >= c.card)).any(axis=1)
        if bad.any():
            b = int(np.argmax(bad))
            raise ValueError(
                f"moshi.step: session {indices[b]}: input codes must be in 0..{c.card - 1}, "
                f"got {int(rows[b].min())}..{int(rows[b].max())}"
            )
        states = [self.state.sessions[k] for k in indices]
        results = self._streamer.step_many(states, rows.tolist())
        out = np.zeros((slots, c.dep_q), dtype=np.int32)
        for k, tokens in zip(indices, results):
            self.state.frames[k] += 1
            out[k] = self._emit(k, tokens)
        return out

    def _emit(self, slot: int, tokens: list[int] | None) -> np.ndarray:
        """The model's codes for `slot` this frame, its text token queued as an event."""
        if tokens is None:
            return np.zeros(self.config.dep_q, dtype=np.int32)  # warm-up: see delay_frames
        text = tokens[0]
        piece = self._tokenizer.piece(text) if self._tokenizer is not None else None
        self._events.append({"text_token": int(text), "text": piece, "session": slot})
        return np.asarray(tokens[1:], dtype=np.int32)

    def events(self) -> list[dict]:
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        self._streamer = None
        self._tokenizer = None
        self.state = MoshiStepState()
