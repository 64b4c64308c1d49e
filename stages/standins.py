"""Stand-ins for the model stages, so a pipeline runs before any model exists and an experiment can
swap a model out: `codec.pcm` (encode/decode as identity on samples) and `echo` (its input, N frames
later). Both are exact, so a test can check the pipeline's output sample for sample.
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


@dataclass
class EchoParams:
    delay_frames: int = 0  # output frame k is input frame k - delay_frames; zeros before that

    def validate(self, where: str) -> None:
        if self.delay_frames < 0:
            raise ConfigError(f"{where}.delay_frames = {self.delay_frames}: expected 0 or more")


@dataclass
class EchoState:
    held: collections.deque = field(default_factory=collections.deque)  # copies of the last inputs


class Echo(Stage):
    """`echo`: stands in for the transformer step; returns its input `delay_frames` frames later and
    zeros (of the input's dtype and shape) until then. Takes any payload spec."""

    role = Role.PROCESSOR
    Params = EchoParams

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
        if self.params.delay_frames == 0:
            return frame
        # copy: the input is a view of a ring slot that is reused once released
        self.state.held.append(np.array(frame, copy=True))
        if len(self.state.held) > self.params.delay_frames:
            return self.state.held.popleft()
        return np.zeros_like(frame)
