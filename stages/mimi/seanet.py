"""SEANet encoder and decoder of Mimi: causal convolutions with ELU, one residual unit per level.

Module order (and so the state-dict indices `model.N`) follows Kyutai's layout. `step` runs one chunk
of time-major [sessions, T, C] activations through every layer, carrying each layer's state (one row per
session slot) in a list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rtpipe.stages.mimi.conv import CausalConv1d, CausalConvTranspose1d, ConvTrOverlap, ConvWindow
from rtpipe.stages.mimi.slots import LiveSlots


@dataclass(frozen=True)
class SEANetConfig:
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder uses them reversed
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2


# What one layer carries: a convolution's window, a transposed convolution's overlap, or a residual
# unit's two windows
LayerState = ConvWindow | ConvTrOverlap | list[ConvWindow]


@dataclass
class SEANetState:
    """Per layer, in module order (the ELUs carry nothing and have no entry)."""

    layers: list[LayerState] = field(default_factory=list)

    def reset_slot(self, slot: int) -> None:
        """Slot `slot` starts over in every layer; no other slot changes."""
        for layer in self.layers:
            for part in layer if isinstance(layer, list) else [layer]:
                part.reset_slot(slot)


class ResidualUnit(nn.Module):
    """x + conv1x1(ELU(conv_k(ELU(x)))), as `block.1` and `block.3` (the ELUs are block.0 and block.2)."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int):
        super().__init__()
        hidden = dim // compress
        self.block = nn.Sequential(
            nn.ELU(), CausalConv1d(dim, hidden, kernel_size, dilation=dilation), nn.ELU(), CausalConv1d(hidden, dim, 1)
        )

    def _convs(self) -> tuple[CausalConv1d, CausalConv1d]:
        """block.1 and block.3 as what they are (to a type checker an nn.Sequential holds plain Modules)."""
        first, second = self.block[1], self.block[3]
        if not (isinstance(first, CausalConv1d) and isinstance(second, CausalConv1d)):
            raise TypeError("ResidualUnit: block.1 and block.3 must be CausalConv1d")
        return first, second

    def prepare(self, dtype: torch.dtype, rows_hint: int) -> None:
        for conv in self._convs():
            conv.prepare(dtype, rows_hint)

    def new_state(self, frame_rows: int, dtype: torch.dtype, slots: int = 1) -> list[ConvWindow]:
        return [conv.new_state(frame_rows, dtype, slots) for conv in self._convs()]

    def step(self, x: torch.Tensor, state: list[ConvWindow], live: LiveSlots) -> torch.Tensor:
        first, second = self._convs()
        h = first.step(x, state[0], live, activate=True)
        y = second.step(h, state[1], live, activate=True)
        y += x
        return y


def _step_layers(model: nn.Sequential, x: torch.Tensor, state: SEANetState, live: LiveSlots) -> torch.Tensor:
    activate = False
    i = 0
    for layer in model:
        if isinstance(layer, nn.ELU):
            activate = True  # folded into the next convolution's input copy
            continue
        layer_state = state.layers[i]
        if isinstance(layer, ResidualUnit) and isinstance(layer_state, list):
            x = layer.step(x, layer_state, live)
        elif isinstance(layer, CausalConv1d) and isinstance(layer_state, ConvWindow):
            x = layer.step(x, layer_state, live, activate=activate)
        elif isinstance(layer, CausalConvTranspose1d) and isinstance(layer_state, ConvTrOverlap):
            x = layer.step(x, layer_state, live, activate=activate)
        else:
            raise TypeError(f"SEANet state entry {i}: a {type(layer).__name__} given a {type(layer_state).__name__}")
        activate = False
        i += 1
    return x


def _prepare_layers(model: nn.Sequential, rows: int, dtype: torch.dtype) -> None:
    """Lays out every layer's weights for `rows` input rows a frame, following each layer's stride."""
    for layer in model:
        if isinstance(layer, CausalConv1d):
            rows //= layer.stride
            layer.prepare(dtype, rows)
        elif isinstance(layer, CausalConvTranspose1d):
            layer.prepare(dtype, rows)
            rows *= layer.stride
        elif isinstance(layer, ResidualUnit):
            layer.prepare(dtype, rows)


def _new_layer_states(model: nn.Sequential, rows: int, dtype: torch.dtype, slots: int) -> SEANetState:
    """Window buffers sized for `rows` input rows (one frame) of `slots` sessions, following each layer's
    stride."""
    layers: list[LayerState] = []
    for layer in model:
        if isinstance(layer, CausalConv1d):
            layers.append(layer.new_state(rows, dtype, slots))
            rows //= layer.stride
        elif isinstance(layer, CausalConvTranspose1d):
            layers.append(layer.new_state(dtype, slots))
            rows *= layer.stride
        elif isinstance(layer, ResidualUnit):
            layers.append(layer.new_state(rows, dtype, slots))
    return SEANetState(layers)


class SEANetEncoder(nn.Module):
    """Audio [sessions, T, 1] at 24 kHz -> latent [sessions, T / hop, dimension] (hop 960: 25 Hz)."""

    def __init__(self, cfg: SEANetConfig = SEANetConfig()):
        super().__init__()
        self.cfg = cfg
        mult = 1
        layers: list[nn.Module] = [CausalConv1d(cfg.channels, cfg.n_filters, cfg.kernel_size)]
        for ratio in reversed(cfg.ratios):
            dim = mult * cfg.n_filters
            layers += [
                ResidualUnit(dim, cfg.residual_kernel_size, 1, cfg.compress),
                nn.ELU(),
                CausalConv1d(dim, dim * 2, ratio * 2, stride=ratio),
            ]
            mult *= 2
        layers += [nn.ELU(), CausalConv1d(mult * cfg.n_filters, cfg.dimension, cfg.last_kernel_size)]
        self.model = nn.Sequential(*layers)

    def prepare(self, dtype: torch.dtype, frame_samples: int) -> None:
        _prepare_layers(self.model, frame_samples, dtype)

    def new_state(self, frame_samples: int, dtype: torch.dtype, slots: int = 1) -> SEANetState:
        return _new_layer_states(self.model, frame_samples, dtype, slots)

    def step(self, x: torch.Tensor, state: SEANetState, live: LiveSlots) -> torch.Tensor:
        return _step_layers(self.model, x, state, live)


class SEANetDecoder(nn.Module):
    """Latent [sessions, T, dimension] at 25 Hz -> audio [sessions, T * hop, 1]."""

    def __init__(self, cfg: SEANetConfig = SEANetConfig()):
        super().__init__()
        self.cfg = cfg
        mult = 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [CausalConv1d(cfg.dimension, mult * cfg.n_filters, cfg.kernel_size)]
        for ratio in cfg.ratios:
            dim = mult * cfg.n_filters
            layers += [
                nn.ELU(),
                CausalConvTranspose1d(dim, dim // 2, ratio * 2, stride=ratio),
                ResidualUnit(dim // 2, cfg.residual_kernel_size, 1, cfg.compress),
            ]
            mult //= 2
        layers += [nn.ELU(), CausalConv1d(cfg.n_filters, cfg.channels, cfg.last_kernel_size)]
        self.model = nn.Sequential(*layers)

    def prepare(self, dtype: torch.dtype, frame_rows: int) -> None:
        _prepare_layers(self.model, frame_rows, dtype)

    def new_state(self, frame_rows: int, dtype: torch.dtype, slots: int = 1) -> SEANetState:
        return _new_layer_states(self.model, frame_rows, dtype, slots)

    def step(self, x: torch.Tensor, state: SEANetState, live: LiveSlots) -> torch.Tensor:
        return _step_layers(self.model, x, state, live)
