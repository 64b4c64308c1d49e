"""The Moshi LM's modules in Kyutai's layout: embeddings, temporal transformer, depformer, heads.

`LmModel.state_dict()` has exactly the keys of Kyutai's `model.safetensors` for the same config.
`forward_sequence` runs a whole teacher-forced sequence at once; streaming.py runs one step per frame.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rtpipe.stages.moshi.config import LmConfig
from rtpipe.stages.moshi.transformer import Transformer, make_norm, sin_embedding

ZERO_TOKEN = -1  # an input token that contributes nothing (a zero embedding)


class LmModel(nn.Module):
    """Text + n_q audio streams in, text logits and dep_q audio codebooks' logits out."""

    def __init__(self, config: LmConfig, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        c = config
        self.config = c
        kw = {"dtype": dtype, "device": device}
        self.emb = nn.ModuleList(nn.Embedding(c.card + 1, c.dim, **kw) for _ in range(c.n_q))
        self.text_emb = nn.Embedding(c.text_card + 1, c.dim, **kw)
        self.text_linear = nn.Linear(c.dim, c.text_card, bias=False, **kw)
        self.transformer = Transformer(
            c.dim,
            c.num_heads,
            c.num_layers,
            c.dim_feedforward,
            c.norm,
            c.gating,
            1,
            c.layer_scale,
            c.context,
            c.max_period if c.positional_embedding == "rope" else None,
            **kw,
        )
        self.out_norm = make_norm(c.norm, c.dim, **kw)
        n_in = c.dep_q if c.depformer_multi_linear else 1
        self.depformer_in = nn.ModuleList(nn.Linear(c.dim, c.depformer_dim, bias=False, **kw) for _ in range(n_in))
        self.depformer_emb = nn.ModuleList(nn.Embedding(c.card + 1, c.depformer_dim, **kw) for _ in range(c.dep_q - 1))
        self.depformer_text_emb = nn.Embedding(c.text_card + 1, c.depformer_dim, **kw)
        mult = c.dep_q if c.depformer_weights_per_step else 1
        # The depformer sees one frame's dep_q steps, all of them (its context never binds).
        self.depformer = Transformer(
            c.depformer_dim,
            c.depformer_num_heads,
            c.depformer_num_layers,
            c.depformer_feedforward,
            c.norm,
            c.depformer_gating,
            mult,
            c.depformer_layer_scale,
            None,
            None,
            **kw,
        )
        self.linears = nn.ModuleList(nn.Linear(c.depformer_dim, c.card, bias=False, **kw) for _ in range(c.dep_q))

    @property
    def dtype(self) -> torch.dtype:
        return self.text_linear.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_linear.weight.device

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> None:
        """Seeded random weights (std 1/sqrt(fan-in), norms at 1), for runs and tests without a checkpoint."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("alpha") or name.endswith(".scale") or param.dim() == 1:
                continue  # norm gains and layer scales keep their constructor values
            fan_in = param.shape[-1]
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            values.mul_(1 / math.sqrt(fan_in)).clamp_(-3 / math.sqrt(fan_in), 3 / math.sqrt(fan_in))
            param.copy_(values)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, K, T] (text first; ZERO_TOKEN gives nothing) -> summed embeddings [B, T, dim]."""
        out = None
        for k in range(self.config.n_q):
            e = _lookup(self.emb[k], tokens[:, k + 1])
            out = e if out is None else out + e
        text = _lookup(self.text_emb, tokens[:, 0])
        return text if out is None else out + text

    @torch.no_grad()
    def forward_sequence(self, inputs: torch.Tensor, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits for a whole sequence.

        inputs [B, K, T]: what the temporal transformer reads at each step (delays already applied);
        sampled [B, 1 + dep_q, T]: the text token and audio codes chosen at each step.
        Returns text logits [B, T, text_card] and audio logits [B, T, dep_q, card] (float32)."""
        c = self.config
        B, _, T = inputs.shape
        hidden = self.out_norm(self.transformer(self.embed(inputs)))
        text_logits = self.text_linear(hidden)
        steps = []
        for k in range(c.dep_q):
            proj = self.depformer_in[k if c.depformer_multi_linear else 0](hidden)
            table = self.depformer_text_emb if k == 0 else self.depformer_emb[k - 1]
            steps.append(proj + _lookup(table, sampled[:, k]))
        dep_in = torch.stack(steps, dim=2).view(B * T, c.dep_q, c.depformer_dim)
        if c.depformer_pos_emb == "sin":
            positions = torch.arange(c.dep_q, device=dep_in.device)
            dep_in = dep_in + sin_embedding(positions, c.depformer_dim, c.depformer_max_period).to(dep_in.dtype)
        dep_out = self.depformer(dep_in)
        audio = torch.stack([self.linears[k](dep_out[:, k]) for k in range(c.dep_q)], dim=1)
        return text_logits.float(), audio.view(B, T, c.dep_q, c.card).float()


def _lookup(table: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """table(tokens), zero where a token is ZERO_TOKEN; `table` an nn.Embedding (ModuleList items are
    plain Modules to a type checker)."""
    is_zero = tokens == ZERO_TOKEN
    out = table(tokens.clamp(min=0))
    return torch.where(is_zero[..., None], torch.zeros((), dtype=out.dtype, device=out.device), out)
