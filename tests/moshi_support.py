"""Helpers for the Moshi LM tests (not a test module): a reduced random model written to safetensors,
Kyutai's reference LM built from the same file, and both driven greedily on the same user codes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # the reference compiles its RMSNorm otherwise (slow)

from rtpipe.stages.moshi.config import LmConfig
from rtpipe.stages.moshi.lm import LmModel

# Small enough for CI, same structure as the 7B: 16 streams, 8 the model's, Kyutai's delays,
# weights per depformer step; a context of 20 so a few hundred steps wrap the KV window many times.
REDUCED = LmConfig(
    dim=64,
    num_layers=2,
    num_heads=4,
    depformer_dim=32,
    depformer_num_layers=2,
    depformer_num_heads=2,
    depformer_dim_feedforward=132,
    card=64,
    text_card=100,
    context=20,
)


def write_checkpoint(
    path: Path, config: LmConfig = REDUCED, seed: int = 1, kyutai_attention_names: bool = False
) -> dict[str, torch.Tensor]:
    """Seeded random weights for `config` saved at `path`; with `kyutai_attention_names`, attention
    weights are stacked under the released files' names (`self_attn.in_proj_weight`)."""
    model = LmModel(config)
    model.init_random(seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if kyutai_attention_names:
        state = stack_attention(state)
    save_file(state, str(path))
    return state


def stack_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, list] = {}
    result = {}
    pattern = re.compile(r"^(.*\.self_attn\.)(in_projs|out_projs)\.(\d+)\.weight$")
    for key, value in state.items():
        m = pattern.match(key)
        if m is None:
            result[key] = value
            continue
        name = m.group(1) + ("in_proj_weight" if m.group(2) == "in_projs" else "out_proj.weight")
        out.setdefault(name, []).append((int(m.group(3)), value))
    for name, parts in out.items():
        result[name] = torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])]).contiguous()
    return result


def write_config(path: Path, config: LmConfig = REDUCED, **extra) -> Path:
    raw = config.to_dict()
    raw.update(extra)
    path.write_text(json.dumps(raw))
    return path


def reference_lm(path: Path, config: LmConfig = REDUCED):
    """Kyutai's LMModel (moshi 0.2.13) with the weights at `path`."""
    from moshi.models.lm import LMModel
    from safetensors.torch import load_file

    model = LMModel(**config.to_dict(), device="cpu", dtype=torch.float32)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def user_codes(steps: int, card: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, card, size=(steps, 8))


def reference_greedy(path: Path, codes: np.ndarray, config: LmConfig = REDUCED) -> list:
    """LMGen.step's outputs (None or [text, dep_q codes]) for each frame of user codes, greedy."""
    from moshi.models.lm import LMGen

    gen = LMGen(reference_lm(path, config), use_sampling=False)
    outs = []
    with one_thread(), torch.no_grad(), gen.streaming(1):
        for frame in codes:
            r = gen.step(torch.as_tensor(frame, dtype=torch.long).view(1, -1, 1))
            outs.append(None if r is None else r.view(-1).tolist())
    return outs


@contextlib.contextmanager
def one_thread():
    """Small models on a shared 2-core machine: extra OpenMP threads only spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_torch_thread():
    with one_thread():
        yield
