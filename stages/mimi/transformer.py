"""Mimi's causal transformer (8 layers, RoPE, LayerNorm, layer scale, 250-step window), run step by step.

Key names follow Kyutai's (`transformer.layers.N.self_attn.in_projs.0.weight`, ...). Streaming keeps
a ring of the last `context` keys and values per layer, written before attending, exactly as Kyutai's
streaming does: past 250 steps the first step of a two-step chunk sees 249 past keys, not 250.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from rtpipe.stages.mimi.matmul import Linear


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250
    max_period: float = 10_000.0
    layer_scale: float = 0.01


@dataclass
class KVWindow:
    """The last `context` keys and values of every layer, in ring slots (slot = position % context)."""

    keys: torch.Tensor  # [layers, heads, context, head_dim]
    values: torch.Tensor  # [layers, heads, context, head_dim]
    slot_positions: torch.Tensor  # [context] int64, the position held by each slot, -1 if empty
    steps: int = 0  # positions consumed so far


class LayerScale(nn.Module):
    def __init__(self, channels: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), init))


# attend(q, k, v) -> [heads, T, head_dim]: attention over what it holds, storing k and v as it needs
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MultiheadAttention(nn.Module):
    """Only the weights (`in_projs.0`, `out_projs.0`): the computation lives in TransformerLayer."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_projs = nn.ModuleList([nn.Linear(dim, 3 * dim, bias=False)])
        self.out_projs = nn.ModuleList([nn.Linear(dim, dim, bias=False)])

    def projections(self) -> tuple[nn.Linear, nn.Linear]:
        """in_projs.0 and out_projs.0 as what they are (to a type checker a ModuleList holds plain Modules)."""
        in_proj, out_proj = self.in_projs[0], self.out_projs[0]
        if not (isinstance(in_proj, nn.Linear) and isinstance(out_proj, nn.Linear)):
            raise TypeError("MultiheadAttention: in_projs.0 and out_projs.0 must be nn.Linear")
        return in_proj, out_proj


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.self_attn = MultiheadAttention(d)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward, bias=False)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d, bias=False)
        self.layer_scale_1 = LayerScale(d, cfg.layer_scale)
        self.layer_scale_2 = LayerScale(d, cfg.layer_scale)

    def prepare(self, dtype: torch.dtype, rows_hint: int = 2) -> None:
        """Lays the projections out for products of `rows_hint` rows and folds the layer scales into the
        output projections."""
        scale_1 = self.layer_scale_1.scale.detach()[:, None]
        scale_2 = self.layer_scale_2.scale.detach()[:, None]
        in_proj, out_proj = self.self_attn.projections()
        self._in = Linear(in_proj.weight, None, dtype, rows_hint)
        self._out = Linear(out_proj.weight * scale_1, None, dtype, rows_hint)
        self._ff1 = Linear(self.linear1.weight, None, dtype, rows_hint)
        self._ff2 = Linear(self.linear2.weight * scale_2, None, dtype, rows_hint)
        self._n1 = (self.norm1.weight.detach().to(dtype), self.norm1.bias.detach().to(dtype))
        self._n2 = (self.norm2.weight.detach().to(dtype), self.norm2.bias.detach().to(dtype))

    def forward_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x: [T, d_model]. `attend(q, k, v) -> [heads, T, head_dim]` stores k, v as it needs."""
        cfg = self.cfg
        rows, heads = x.shape[0], cfg.num_heads
        head_dim = cfg.d_model // heads
        h = F.layer_norm(x, (cfg.d_model,), *self._n1, eps=1e-5)
        qkv = self._in(h).view(rows, 3, heads, head_dim)
        q = _rotate(qkv[:, 0], cos, sin)
        k = _rotate(qkv[:, 1], cos, sin)
        v = qkv[:, 2].transpose(0, 1)
        attn = attend(q, k, v)  # [heads, T, head_dim]
        x = x + self._out(attn.transpose(0, 1).reshape(rows, cfg.d_model))
        h = F.layer_norm(x, (cfg.d_model,), *self._n2, eps=1e-5)
        return x + self._ff2(F.gelu(self._ff1(h)))


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Softmax attention with an additive mask (0 or -inf), written out: with 2 queries this is about
    twice as fast as F.scaled_dot_product_attention's masked CPU path. q [heads, T, d] -> [heads, T, d]."""
    scores = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=q.shape[-1] ** -0.5)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.bmm(weights, values)


def _mask_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved (real, imaginary) pairs, in float32. x: [T, heads, head_dim] -> [heads, T, head_dim]."""
    rows, heads, head_dim = x.shape
    pairs = x.view(rows, heads, head_dim // 2, 2).float()
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.to(x.dtype).view(rows, heads, head_dim).transpose(0, 1)


class StreamingTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_layers)])

    def typed_layers(self) -> list[TransformerLayer]:
        """`layers` as what they are (to a type checker a ModuleList holds plain Modules)."""
        layers = [layer for layer in self.layers if isinstance(layer, TransformerLayer)]
        if len(layers) != len(self.layers):
            raise TypeError("StreamingTransformer: every one of `layers` must be a TransformerLayer")
        return layers


class ProjectedTransformer(nn.Module):
    """Kyutai's wrapper (`<name>.transformer.layers...`); input and output dimensions equal d_model here,
    so it has no projections of its own."""

    def __init__(self, cfg: TransformerConfig = TransformerConfig()):
        super().__init__()
        self.cfg = cfg
        self.transformer = StreamingTransformer(cfg)

    def prepare(self, dtype: torch.dtype) -> None:
        cfg = self.cfg
        head_dim = cfg.d_model // cfg.num_heads
        # computed as Kyutai does, so positions rotate by the same float32 angles
        self._freqs = torch.exp(
            torch.arange(head_dim // 2, dtype=torch.float32) * (-math.log(cfg.max_period) * 2 / head_dim)
        )
        self._layers = self.transformer.typed_layers()
        for layer in self._layers:
            layer.prepare(dtype)

    def _angles(self, first_position: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(rows, dtype=torch.float32) + float(first_position)
        angles = self._freqs * positions.view(rows, 1, 1)  # [T, 1 (heads), head_dim / 2]
        return torch.cos(angles), torch.sin(angles)

    def new_state(self, dtype: torch.dtype) -> KVWindow:
        cfg = self.cfg
        shape = (cfg.num_layers, cfg.num_heads, cfg.context, cfg.d_model // cfg.num_heads)
        return KVWindow(
            torch.zeros(shape, dtype=dtype),
            torch.zeros(shape, dtype=dtype),
            torch.full((cfg.context,), -1, dtype=torch.long),
        )

    def step(self, x: torch.Tensor, state: KVWindow) -> torch.Tensor:
        """Streaming: x [T, d_model] (T <= context) continues the sequence held in `state`."""
        cfg = self.cfg
        rows = x.shape[0]
        if rows > cfg.context:
            raise ValueError(f"a streaming step of {rows} rows exceeds the context of {cfg.context}")
        first = state.steps
        positions = torch.arange(first, first + rows)
        slots = positions % cfg.context
        state.slot_positions.index_copy_(0, slots, positions)
        delta = positions.view(rows, 1) - state.slot_positions.view(1, -1)
        allowed = (state.slot_positions >= 0) & (delta >= 0) & (delta < cfg.context)  # [T, context]
        bias = _mask_bias(allowed, x.dtype)
        cos, sin = self._angles(first, rows)
        for i, layer in enumerate(self._layers):
            keys, values = state.keys[i], state.values[i]

            def attend(
                q: torch.Tensor,
                k: torch.Tensor,
                v: torch.Tensor,
                keys: torch.Tensor = keys,
                values: torch.Tensor = values,
            ) -> torch.Tensor:
                keys.index_copy_(1, slots, k)
                values.index_copy_(1, slots, v)
                return _attention(q, keys, values, bias)

            x = layer.forward_step(x, cos, sin, attend)
        state.steps += rows
        return x

    def forward_offline(self, x: torch.Tensor) -> torch.Tensor:
        """A whole sequence at once, each position seeing the `context` positions up to itself."""
        rows = x.shape[0]
        positions = torch.arange(rows)
        delta = positions.view(-1, 1) - positions.view(1, -1)
        bias = _mask_bias((delta >= 0) & (delta < self.cfg.context), x.dtype)
        cos, sin = self._angles(0, rows)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return _attention(q, k, v, bias)

        for layer in self._layers:
            x = layer.forward_step(x, cos, sin, attend)
        return x
