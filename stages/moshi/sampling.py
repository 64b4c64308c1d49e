"""Choosing a token from logits: greedy (temperature 0), or temperature + top-k with a seeded RNG.

Sampling draws `probs / Exponential(1)` and keeps the arg-max, which picks index i with probability
probs[i] (the exponential-race form of a categorical draw) without torch.multinomial's extra work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtpipe.stages.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """Temperatures (0 = greedy) and top-k (0 = whole vocabulary) for audio codes and text tokens.
    Defaults are the reference's LMGen defaults."""

    temperature: float = 0.8
    top_k: int = 250
    text_temperature: float = 0.7
    text_top_k: int = 25

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls(0.0, 0, 0.0, 0)

    def validate(self, where: str) -> None:
        for name in ("temperature", "text_temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name} = {getattr(self, name)}: expected >= 0 (0 = greedy)")
        for name in ("top_k", "text_top_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name} = {getattr(self, name)}: expected >= 0 (0 = all)")


def sample_token(
    logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id (a 0-d int64 tensor) from logits [vocab]; temperature <= 0 picks the arg-max."""
    if temperature <= 0:
        return logits.argmax()
    logits = logits.float()
    indices = None
    if 0 < top_k < logits.shape[-1]:
        logits, indices = torch.topk(logits, top_k, sorted=False)  # order is irrelevant to the draw
    probs = torch.softmax(logits / temperature, dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    choice = (probs / race).argmax()
    return choice if indices is None else indices[choice]
