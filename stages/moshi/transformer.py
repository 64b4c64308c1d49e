"""Transformer building blocks of the Moshi LM, named so Kyutai's state-dict keys load as they are.

Each module holds weights and a full-sequence forward (used to check the streaming engine and for
prompts); the per-frame streaming path lives in streaming.py and reads these same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rtpipe.stages.moshi.config import gated_hidden_size

ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


class RmsNorm(nn.Module):
    """RMS normalisation with a learnt gain `alpha` [1, 1, dim]; `float32=True` computes in float32."""

    def __init__(self, dim: int, eps: float, float32: bool, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.float32 = float32
        self.alpha = nn.Parameter(torch.ones(1, 1, dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_dtype = x.dtype
        if self.float32:
            x = x.float()
        gain = self.alpha.view(-1).to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), gain, self.eps).to(x_dtype)


class LayerNormF32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the model's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(
            x.dtype
        )


def make_norm(kind: str, dim: int, dtype=None, device=None) -> nn.Module:
    """The norm Kyutai's `norm` names (eps values as in their release)."""
    if kind == "rms_norm_f32":
        return RmsNorm(dim, 1e-8, True, dtype, device)
    if kind == "rms_norm":
        return RmsNorm(dim, 1e-5, False, dtype, device)
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=1e-5, dtype=dtype, device=device)
    if kind == "layer_norm_f32":
        return LayerNormF32(dim, eps=1e-8, device=device)
    raise ValueError(f"unknown norm {kind!r}")


class ActivationGating(nn.Module):
    """Gated feed-forward: linear_in to 2*hidden, act(first half) * second half, linear_out."""

    def __init__(self, dim: int, dim_feedforward: int, activation: str, dtype=None, device=None):
        super().__init__()
        hidden = gated_hidden_size(dim, dim_feedforward)
        self.hidden = hidden
        self.activation = ACTIVATION_FNS[activation]
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False, dtype=dtype, device=device)
        self.linear_out = nn.Linear(hidden, dim, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_in(x).unflatten(-1, (2, self.hidden))
        return self.linear_out(self.activation(h[..., 0, :]) * h[..., 1, :])


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float, dtype=None, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def rope_frequencies(head_dim: int, max_period: float, device=None) -> torch.Tensor:
    """Angular frequency of each interleaved (real, imaginary) pair of a head, float32 [head_dim/2]."""
    pairs = torch.arange(head_dim // 2, dtype=torch.float32, device=device)
    return torch.exp(pairs * (-math.log(max_period) * 2 / head_dim))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs of x [..., T, D] by position * freq; positions float32 [T]."""
    angles = positions[:, None] * freqs  # [T, D/2]
    rotor = torch.polar(torch.ones_like(angles), angles)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotor).flatten(-2).to(x.dtype)


def sin_embedding(positions: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """Sinusoidal position embedding [T, dim]: cosines then sines (Kyutai's depformer 'sin')."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=positions.device)
    phase = positions.float()[:, None] / (torch.tensor(max_period) ** (steps / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class MultiheadSelfAttention(nn.Module):
    """Causal self-attention with `mult` sets of projections (one per depformer step, else one)."""

    def __init__(self, dim: int, num_heads: int, mult: int, dtype=None, device=None):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.in_projs = nn.ModuleList(
            nn.Linear(dim, 3 * dim, bias=False, dtype=dtype, device=device) for _ in range(mult)
        )
        self.out_projs = nn.ModuleList(nn.Linear(dim, dim, bias=False, dtype=dtype, device=device) for _ in range(mult))

    def forward(self, x: torch.Tensor, rope_freqs: torch.Tensor | None, context: int | None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; with per-step weights, position t uses projection t."""
        B, T, _ = x.shape
        qkv = _per_step_linear(self.in_projs, x)
        q, k, v = qkv.view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # each [B, H, T, D]
        if rope_freqs is not None:
            positions = torch.arange(T, dtype=torch.float32, device=x.device)
            q, k = apply_rope(q, positions, rope_freqs), apply_rope(k, positions, rope_freqs)
        index = torch.arange(T, device=x.device)
        delta = index[:, None] - index[None, :]
        allowed = delta >= 0
        if context is not None:
            allowed &= delta < context
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return _per_step_linear(self.out_projs, out.transpose(1, 2).reshape(B, T, self.dim))


def _per_step_linear(linears: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    if len(linears) == 1:
        return linears[0](x)
    return torch.cat([linears[t](x[:, t : t + 1]) for t in range(x.shape[1])], dim=1)


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + attn(norm1(x)), then x + feed_forward(norm2(x)) (optional layer scale)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dim_feedforward: int,
        norm: str,
        gating: str,
        mult: int,
        layer_scale: float | None,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.self_attn = MultiheadSelfAttention(dim, num_heads, mult, dtype, device)
        self.norm1 = make_norm(norm, dim, dtype, device)
        self.norm2 = make_norm(norm, dim, dtype, device)
        self.gating: nn.Module | None = None
        if gating == "none":
            # Kyutai's ungated feed-forward uses GELU.
            self.linear1 = nn.Linear(dim, dim_feedforward, bias=False, dtype=dtype, device=device)
            self.linear2 = nn.Linear(dim_feedforward, dim, bias=False, dtype=dtype, device=device)
        elif mult > 1:
            self.gating = nn.ModuleList(
                ActivationGating(dim, dim_feedforward, gating, dtype, device) for _ in range(mult)
            )
        else:
            self.gating = ActivationGating(dim, dim_feedforward, gating, dtype, device)
        self.layer_scale_1: LayerScale | None = None
        self.layer_scale_2: LayerScale | None = None
        if layer_scale is not None:
            self.layer_scale_1 = LayerScale(dim, layer_scale, dtype, device)
            self.layer_scale_2 = LayerScale(dim, layer_scale, dtype, device)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gating is None:
            return self.linear2(F.gelu(self.linear1(x)))
        if isinstance(self.gating, nn.ModuleList):
            return torch.cat([self.gating[t](x[:, t : t + 1]) for t in range(x.shape[1])], dim=1)
        return self.gating(x)

    def forward(self, x: torch.Tensor, rope_freqs: torch.Tensor | None, context: int | None) -> torch.Tensor:
        update = self.self_attn(self.norm1(x), rope_freqs, context)
        x = x + (update if self.layer_scale_1 is None else self.layer_scale_1(update))
        update = self.feed_forward(self.norm2(x))
        return x + (update if self.layer_scale_2 is None else self.layer_scale_2(update))


class Transformer(nn.Module):
    """A stack of TransformerLayer (`layers.N`), RoPE or no positions, causal with a context window."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_layers: int,
        dim_feedforward: int,
        norm: str,
        gating: str,
        mult: int,
        layer_scale: float | None,
        context: int | None,
        rope_max_period: float | None,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.context = context
        self.rope_max_period = rope_max_period
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, dim_feedforward, norm, gating, mult, layer_scale, dtype, device)
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim] from position 0 -> [B, T, dim]."""
        freqs = None
        if self.rope_max_period is not None:
            freqs = rope_frequencies(self.dim // self.num_heads, self.rope_max_period, x.device)
        for layer in self.layers:
            x = layer(x, freqs, self.context)
        return x
