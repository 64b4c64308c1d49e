"""Mimi's causal transformer (8 layers, RoPE, LayerNorm, layer scale, 250-step window), run step by step.

Key names follow Kyutai's (`transformer.layers.N.self_attn.in_projs.0.weight`, ...). Streaming keeps
a ring of the last `context` keys and values per layer, written before attending, exactly as Kyutai's
streaming does: past 250 steps the first step of a two-step chunk sees 249 past keys, not 250. Each
session slot has its own ring and position; the live sessions of a step share the projections (one
matrix product) and attend each over its own ring.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from rtpipe.stages.mimi.matmul import Linear
from rtpipe.stages.mimi.slots import LiveSlots


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
    """Per session slot, the last `context` keys and values of every layer in a ring (ring index =
    position % context), the position each ring entry holds and how many positions the slot consumed."""

    keys: torch.Tensor  # [layers, slots, heads, context, head_dim]
    values: torch.Tensor  # [layers, slots, heads, context, head_dim]
    ring_positions: torch.Tensor  # [slots, context] int64, the position held by each entry, -1 if empty
    steps: list[int]  # [slots], positions consumed so far

    def reset_slot(self, slot: int) -> None:
        """Slot `slot` starts over at position 0 with an empty ring; no other slot changes. The keys and
        values are zeroed too: masked entries still enter the product, and a NaN left there would stay."""
        self.keys[:, slot].zero_()
        self.values[:, slot].zero_()
        self.ring_positions[slot].fill_(-1)
        self.steps[slot] = 0


class LayerScale(nn.Module):
    def __init__(self, channels: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), init))


# attend(q, k, v), each [sessions * T, heads, head_dim] session after session -> [sessions * T, d_model]:
# attention over what it holds, storing k and v as it needs
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

    def forward_step(
        self, x: torch.Tensor, sessions: int, cos: torch.Tensor, sin: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        """x: [sessions * T, d_model], session after session; cos, sin: [sessions * T, 1, head_dim / 2].
        `attend(q, k, v)` stores k, v as it needs. The products go through Linear.per_session, so a
        session's rows come out as they would alone."""
        cfg = self.cfg
        rows, heads = x.shape[0], cfg.num_heads
        head_dim = cfg.d_model // heads

        def product(linear: Linear, h: torch.Tensor) -> torch.Tensor:
            if sessions == 1:
                return linear(h)
            return linear.per_session(h.view(sessions, rows // sessions, -1)).view(rows, -1)

        h = F.layer_norm(x, (cfg.d_model,), *self._n1, eps=1e-5)
        qkv = product(self._in, h).view(rows, 3, heads, head_dim)
        q = _rotate(qkv[:, 0], cos, sin)
        k = _rotate(qkv[:, 1], cos, sin)
        x = x + product(self._out, attend(q, k, qkv[:, 2]))
        h = F.layer_norm(x, (cfg.d_model,), *self._n2, eps=1e-5)
        return x + product(self._ff2, F.gelu(product(self._ff1, h)))


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Softmax attention with an additive mask (0 or -inf), written out: with 2 queries this is about
    twice as fast as F.scaled_dot_product_attention's masked CPU path. q [heads, T, d] -> [heads, T, d]."""
    scores = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=q.shape[-1] ** -0.5)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.bmm(weights, values)


def _mask_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved (real, imaginary) pairs, in float32. x: [rows, heads, head_dim] -> the same."""
    rows, heads, head_dim = x.shape
    pairs = x.view(rows, heads, head_dim // 2, 2).float()
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.to(x.dtype).view(rows, heads, head_dim)


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

    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [rows] int64 -> cos, sin [rows, 1 (heads), head_dim / 2]."""
        angles = self._freqs * positions.to(torch.float32).view(-1, 1, 1)
        return torch.cos(angles), torch.sin(angles)

    def new_state(self, dtype: torch.dtype, slots: int = 1) -> KVWindow:
        cfg = self.cfg
        shape = (cfg.num_layers, slots, cfg.num_heads, cfg.context, cfg.d_model // cfg.num_heads)
        return KVWindow(
            torch.zeros(shape, dtype=dtype),
            torch.zeros(shape, dtype=dtype),
            torch.full((slots, cfg.context), -1, dtype=torch.long),
            [0] * slots,
        )

    def step(self, x: torch.Tensor, state: KVWindow, live: LiveSlots) -> torch.Tensor:
        """Streaming: x [sessions, T, d_model] (T <= context), row b continuing the sequence that slot
        live.slots[b] holds in `state`."""
        cfg = self.cfg
        sessions, rows = x.shape[0], x.shape[1]
        if rows > cfg.context:
            raise ValueError(f"a streaming step of {rows} rows exceeds the context of {cfg.context}")
        firsts = torch.tensor([state.steps[k] for k in live.slots], dtype=torch.long)
        positions = firsts.view(-1, 1) + torch.arange(rows)  # [sessions, T]
        ring = positions % cfg.context
        span = live.span
        if span is not None:
            held = state.ring_positions[span]
            held.scatter_(1, ring, positions)
        else:
            held = state.ring_positions.index_select(0, live.index).scatter_(1, ring, positions)
            state.ring_positions.index_copy_(0, live.index, held)
        delta = positions.view(sessions, rows, 1) - held.view(sessions, 1, -1)
        allowed = (held.view(sessions, 1, -1) >= 0) & (delta >= 0) & (delta < cfg.context)
        bias = _mask_bias(allowed, x.dtype)  # [sessions, T, context]
        heads, head_dim, d_model = cfg.num_heads, cfg.d_model // cfg.num_heads, cfg.d_model
        # per stretch of neighbouring slots (see slots.py): its rows of the batch and its slots, the ring
        # index of each key it writes, the mask of each of its heads. A slot alone attends exactly as a
        # lone session does: its ring a plain view, its mask broadcast over its heads.
        alone, together = [], []
        for run in live.runs:
            rows_of = slice(run.row * rows, (run.row + run.count) * rows)
            if run.count == 1:
                alone.append((rows_of, run.slot, ring[run.row], bias[run.row]))
            else:
                run_ring = ring[run.row : run.row + run.count].view(run.count, 1, rows, 1)
                run_bias = bias[run.row : run.row + run.count, None].expand(-1, heads, -1, -1)
                together.append(
                    (
                        rows_of,
                        slice(run.slot, run.slot + run.count),
                        run_ring.expand(run.count, heads, rows, head_dim),
                        run_bias.reshape(run.count * heads, rows, -1),
                    )
                )
        cos, sin = self._angles(positions.view(-1))
        h = x.reshape(sessions * rows, cfg.d_model)
        for i, layer in enumerate(self._layers):
            keys, values = state.keys[i], state.values[i]

            def attend(
                q: torch.Tensor,
                k: torch.Tensor,
                v: torch.Tensor,
                keys: torch.Tensor = keys,
                values: torch.Tensor = values,
            ) -> torch.Tensor:
                outs = []  # stretch by stretch, in row order
                for rows_of, slot, one_ring, one_bias in alone:
                    slot_keys, slot_values = keys[slot], values[slot]  # [heads, context, head_dim]
                    slot_keys.index_copy_(1, one_ring, k[rows_of].transpose(0, 1))
                    slot_values.index_copy_(1, one_ring, v[rows_of].transpose(0, 1))
                    attn = _attention(q[rows_of].transpose(0, 1), slot_keys, slot_values, one_bias)
                    outs.append((rows_of.start, attn.transpose(0, 1).reshape(-1, d_model)))
                for rows_of, slots_of, run_ring, run_bias in together:
                    run_keys, run_values = keys[slots_of], values[slots_of]  # [count, heads, context, head_dim]
                    count = run_keys.shape[0]
                    run_q, run_k, run_v = (
                        t[rows_of].view(count, rows, heads, head_dim).transpose(1, 2) for t in (q, k, v)
                    )
                    run_keys.scatter_(2, run_ring, run_k)
                    run_values.scatter_(2, run_ring, run_v)
                    # the stretch's heads side by side: [count * heads, ...]
                    attn = _attention(
                        run_q.reshape(count * heads, rows, head_dim),
                        run_keys.flatten(0, 1),
                        run_values.flatten(0, 1),
                        run_bias,
                    )
                    outs.append(
                        (rows_of.start, attn.view(count, heads, rows, head_dim).transpose(1, 2).reshape(-1, d_model))
                    )
                if len(outs) == 1:
                    return outs[0][1]
                return torch.cat([out for _, out in sorted(outs, key=lambda o: o[0])])

            h = layer.forward_step(h, sessions, cos, sin, attend)
        for k in live.slots:
            state.steps[k] += rows
        return h.view(sessions, rows, cfg.d_model)

    def forward_offline(self, x: torch.Tensor) -> torch.Tensor:
        """A whole sequence at once, each position seeing the `context` positions up to itself.
        x [T, d_model] -> [T, d_model]."""
        rows = x.shape[0]
        positions = torch.arange(rows)
        delta = positions.view(-1, 1) - positions.view(1, -1)
        bias = _mask_bias((delta >= 0) & (delta < self.cfg.context), x.dtype)
        cos, sin = self._angles(positions)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            attn = _attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), bias)
            return attn.transpose(0, 1).reshape(rows, -1)

        for layer in self._layers:
            x = layer.forward_step(x, 1, cos, sin, attend)
        return x
