"""Builds a ready-to-run Mimi from a checkpoint (Kyutai's key layout), or from seeded random weights.

Both spellings of the attention weights load: Kyutai's released files say `self_attn.in_proj_weight`
and `self_attn.out_proj.weight`, the reference modules say `in_projs.0.weight` / `out_projs.0.weight`;
older codebook buffer names (`embed_avg`, `cluster_size`, `inited`) load too.
"""

from __future__ import annotations

import functools
import math
import re

import torch

from rtpipe.stages.checkpoint import load_checkpoint
from rtpipe.stages.mimi.model import Mimi

MODEL_NAME = "Mimi"
# How large random codebook entries are: near the scale of the projected latents of random weights, so
# that random-weight codes spread over the codebook instead of all landing on one entry.
RANDOM_CODEBOOK_STD = 0.2

_KEY_ALIASES = [
    (re.compile(r"\.self_attn\.in_proj_weight$"), ".self_attn.in_projs.0.weight"),
    (re.compile(r"\.self_attn\.in_proj\.weight$"), ".self_attn.in_projs.0.weight"),
    (re.compile(r"\.self_attn\.out_proj\.weight$"), ".self_attn.out_projs.0.weight"),
    # older codebook buffer names, as Kyutai's own loader still accepts them
    (re.compile(r"\._codebook\.inited$"), "._codebook._initialized"),
    (re.compile(r"\._codebook\.cluster_size$"), "._codebook.cluster_usage"),
    (re.compile(r"\._codebook\.embed_(avg|sum)$"), "._codebook.embedding_sum"),
]


def canonical_key(key: str) -> str:
    """The key as this implementation names it (the attention weights have two spellings in the wild)."""
    for pattern, replacement in _KEY_ALIASES:
        if pattern.search(key):
            return pattern.sub(replacement, key)
    return key


def _skeleton() -> Mimi:
    with torch.device("meta"):
        return Mimi()


@functools.lru_cache(maxsize=1)
def expected_tensors() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (shape, dtype)} of every tensor a Mimi checkpoint holds (318 keys). Do not modify."""
    return {k: (tuple(v.shape), v.dtype) for k, v in _skeleton().state_dict().items()}


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights: uniform weights that keep the signal's variance from layer to layer, small
    biases, and random codebooks of std RANDOM_CODEBOOK_STD (a zero codebook would make every code 0)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, (shape, dtype) in expected_tensors().items():
        name = key.rsplit(".", 1)[-1]
        if name in ("_initialized", "cluster_usage"):
            value = torch.ones(shape)
        elif name == "embedding_sum":
            value = torch.randn(shape, generator=gen) * RANDOM_CODEBOOK_STD
        elif name == "scale":  # layer scale
            value = torch.full(shape, 0.01)
        elif ".norm" in key:
            value = torch.ones(shape) if name == "weight" else torch.zeros(shape)
        else:
            weight_shape = shape if name == "weight" else expected_tensors()[key[:-4] + "weight"][0]
            fan_in = weight_shape[1] * (weight_shape[2] if len(weight_shape) > 2 else 1)
            # variance-keeping weights (gain 1), small biases: the signal, not the biases, drives the codes
            bound = math.sqrt(3.0 / fan_in) if name == "weight" else 0.1 / math.sqrt(fan_in)
            value = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        out[key] = value.to(dtype).contiguous()
    return out


def mimi_from_state_dict(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Mimi:
    """A Mimi holding `tensors` (already checked), prepared to run in `dtype`."""
    model = _skeleton()
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    model.eval()
    with torch.inference_mode():
        return model.prepare(dtype)


def load_mimi(weights: str | None, dtype: torch.dtype = torch.float32, seed: int = 0) -> Mimi:
    """Mimi from `weights` (a safetensors path or hf://owner/repo/file), or seeded random weights when
    None. Raises CheckpointError naming the file and the first wrong keys."""
    if weights is None:
        tensors = random_state_dict(seed)
    else:
        tensors = load_checkpoint(weights, expected_tensors(), MODEL_NAME, rename=canonical_key)
    return mimi_from_state_dict(tensors, dtype)
