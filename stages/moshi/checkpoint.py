"""Loads a Moshi LM checkpoint (Kyutai's `model.safetensors` layout) into an LmModel.

Uses the shared loader (stages/checkpoint.py) for paths, hf://, safetensors and key/shape/dtype checks;
adds what is Moshi's own: the released files spell attention weights `self_attn.in_proj_weight` /
`out_proj.weight` (all per-step projections stacked), which are split into `in_projs.N.weight`.
"""

from __future__ import annotations

import re

import torch

from rtpipe.stages.checkpoint import check_tensors, read_safetensors, resolve_weights_path
from rtpipe.stages.moshi.lm import LmModel

MODEL_NAME = "Moshi LM"
_LEGACY = re.compile(r"^(.*\.self_attn\.)(in_proj_weight|in_proj\.weight|out_proj\.weight)$")


def load_lm_weights(model: LmModel, weights: str) -> None:
    """Copies the weights at `weights` (path or hf://owner/repo/file) into `model`, converting float
    dtypes to the model's. Raises CheckpointError naming the file and the first wrong keys."""
    tensors = read_safetensors(resolve_weights_path(weights))
    state = model.state_dict()
    tensors = split_stacked_attention(tensors, state)
    expected = {key: (tuple(value.shape), value.dtype) for key, value in state.items()}
    check_tensors(tensors, expected, str(weights), MODEL_NAME)
    with torch.no_grad():
        for key, value in state.items():
            value.copy_(tensors[key])


def split_stacked_attention(
    tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Renames Kyutai's stacked attention keys to per-step keys (`in_projs.N.weight`), splitting the
    stack in as many parts as the model has steps; other keys pass unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        match = _LEGACY.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, name = match.groups()
        target = "in_projs" if name.startswith("in_proj") else "out_projs"
        steps = sum(1 for k in state if k.startswith(f"{prefix}{target}.") and k.endswith(".weight"))
        if steps == 0 or value.shape[0] % steps:
            out[key] = value  # reported as an unexpected key / wrong shape by check_tensors
            continue
        for i, part in enumerate(value.view(steps, -1, *value.shape[1:])):
            out[f"{prefix}{target}.{i}.weight"] = part
    return out
