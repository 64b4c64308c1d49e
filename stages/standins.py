"""Stand-ins for the model stages, so a pipeline runs before any model exists and an experiment can
swap a model out: `codec.pcm` (encode/decode as identity on samples) and `echo` (its input, N frames
later). Both are exact, so a test can check the pipeline's output sample for sample, and both carry
any number of sessions, each slot on its own.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from rtpipe.stages.base import AUDIO_FRAME, PayloadSpec, Role, Stage
from rtpipe.stages.errors import ConfigError


class PcmCodec(Stage):
    """`codec.pcm`: stands in for mimi.encode or mimi.decode; audio frames in, the same samples out.

    process() returns its input array itself (no copy): the host copies it into the output slot."""

    role = Role.PROCESSOR
    sessions = True

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        if input_spec != AUDIO_FRAME:
            raise ConfigError(f"codec.pcm: takes {AUDIO_FRAME} audio frames, but its input is {input_spec}")
        return AUDIO_FRAME

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """PCM "codes" are the samples themselves."""
        return samples

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return codes

    def process(self, frame: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(frame))

    def process_sessions(self, frames: np.ndarray, live: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(frames))  # rows are independent; the host reads the live ones

    def reset_session(self, slot: int) -> None:
        """Nothing is carried from frame to frame."""


@dataclass
class EchoParams:
    delay_frames: int = 0  # output frame k is input frame k - delay_frames; zeros before that

    def validate(self, where: str) -> None:
        if self.delay_frames < 0:
            raise ConfigError(f"{where}.delay_frames = {self.delay_frames}: expected 0 or more")


@dataclass
class EchoState:
    held: collections.deque = field(default_factory=collections.deque)  # copies of the last inputs
    # with sessions: one such deque per slot
    held_by_slot: dict[int, collections.deque] = field(default_factory=dict)


class Echo(Stage):
    """`echo`: stands in for the transformer step; returns its input `delay_frames` frames later and
    zeros (of the input's dtype and shape) until then. Takes any payload spec."""

    role = Role.PROCESSOR
    Params = EchoParams
    sessions = True

    def __init__(self, params: EchoParams | None = None):
        super().__init__(params)
        self.state = EchoState()

    def output_spec(self, input_spec: PayloadSpec | None) -> PayloadSpec:
        if input_spec is None:
            raise ConfigError("echo: needs an input edge")
        return input_spec

    @property
    def delay_frames(self) -> int:
        return self.params.delay_frames

    def process(self, frame: np.ndarray) -> np.ndarray:
        return self._delayed(self.state.held, frame)

    def _delayed(self, held: collections.deque, frame: np.ndarray) -> np.ndarray:
        if self.params.delay_frames == 0:
            return frame
        # copy: the input is a view of a ring slot that is reused once released
        held.append(np.array(frame, copy=True))
        if len(held) > self.params.delay_frames:
            return held.popleft()
        return np.zeros_like(frame)

    def process_sessions(self, frames: np.ndarray, live: np.ndarray) -> np.ndarray:
        if self.params.delay_frames == 0:
            return frames
        out = np.zeros_like(frames)
        by_slot = self.state.held_by_slot
        for k in live.tolist():  # each slot's own history: a frame where a slot is not live does not count
            out[k] = self._delayed(by_slot.setdefault(k, collections.deque()), frames[k])
        return out

    def reset_session(self, slot: int) -> None:
        self.state.held_by_slot.pop(slot, None)
