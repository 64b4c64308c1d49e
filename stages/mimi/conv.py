"""Causal 1-D convolution and transposed convolution that run frame by frame, for Mimi's SEANet.

Weights keep Kyutai's key nesting (`conv.conv.weight`, `convtr.convtr.weight`) so checkpoints load
as they are. Activations are time-major per session, [sessions, T, C]: each convolution is one matrix
product over a strided (overlapping) view of a window buffer, and what it carries to the next frame is a
dataclass holding one row per session slot (see slots.py for how a step picks its rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from rtpipe.stages.mimi.matmul import Linear
from rtpipe.stages.mimi.slots import LiveSlots


class _ConvNesting(nn.Module):
    """One more level of nesting, so state-dict keys read `conv.conv.weight` as in Kyutai's files."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.conv = conv


class _ConvTrNesting(nn.Module):
    """The same for `convtr.convtr.weight`."""

    def __init__(self, convtr: nn.ConvTranspose1d):
        super().__init__()
        self.convtr = convtr


@dataclass
class ConvWindow:
    """What a causal convolution carries, per session slot: its input window, the last `context_rows`
    rows of the previous frames followed by the current frame's rows. `primed[k]`: slot k has seen its
    first frame (for replicate padding)."""

    window: torch.Tensor  # [slots, context_rows + frame_rows, in_channels]
    context_rows: int
    primed: list[bool]

    def reset_slot(self, slot: int) -> None:
        """Slot `slot` starts over: zero context, not primed; no other slot changes."""
        self.window[slot, : self.context_rows].zero_()
        self.primed[slot] = False


@dataclass
class ConvTrOverlap:
    """What a causal transposed convolution carries, per session slot: the output rows the last frame
    started but its next input still adds to (kernel - stride rows, bias not yet added)."""

    tail: torch.Tensor  # [slots, kernel - stride, out_channels]

    def reset_slot(self, slot: int) -> None:
        self.tail[slot].zero_()


class CausalConv1d(nn.Module):
    """Conv1d padded on the left only (zeros, or the first sample repeated with pad_mode="replicate")."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ):
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode {pad_mode!r}: expected 'constant' or 'replicate'")
        self.conv = _ConvNesting(
            nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, bias=bias)
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.pad_mode = pad_mode
        self.context_rows = (kernel_size - 1) * dilation + 1 - stride
        self._product: Linear | None = None

    def prepare(self, dtype: torch.dtype, out_rows_hint: int) -> None:
        """Lays the weight out for one matrix product over (kernel tap, input channel); after loading.
        `out_rows_hint`: output rows of a streaming frame."""
        w = self.conv.conv.weight.detach()  # [out, in, kernel]
        self._product = Linear(
            w.permute(0, 2, 1).reshape(self.out_channels, -1), self.conv.conv.bias, dtype, out_rows_hint
        )

    def new_state(self, frame_rows: int, dtype: torch.dtype, slots: int = 1) -> ConvWindow:
        window = torch.zeros(slots, self.context_rows + frame_rows, self.in_channels, dtype=dtype)
        return ConvWindow(window, self.context_rows, [False] * slots)

    def step(self, x: torch.Tensor, state: ConvWindow, live: LiveSlots, activate: bool = False) -> torch.Tensor:
        """x: [sessions, T, in_channels] (T a multiple of stride), row b for slot live.slots[b]
        -> [sessions, T / stride, out_channels].

        `activate` applies ELU to x first (SEANet puts an ELU before most convolutions)."""
        sessions, rows = x.shape[0], x.shape[1]
        ctx = state.context_rows
        span = live.span
        if span is not None:  # one stretch of slots: their rows of the state are the window, in place
            if state.window.shape[1] != ctx + rows:  # another chunk length (a whole signal): resize
                grown = state.window.new_zeros(state.window.shape[0], ctx + rows, self.in_channels)
                grown[:, :ctx] = state.window[:, :ctx]
                state.window = grown
            window = state.window[span]
        else:  # scattered slots: gather their context rows, scatter them back below
            window = state.window.new_empty(sessions, ctx + rows, self.in_channels)
            if ctx:
                window[:, :ctx] = state.window[:, :ctx].index_select(0, live.index)
        current = window[:, ctx:]
        current.copy_(x)
        if activate:
            F.elu_(current)
        if self.pad_mode == "replicate":
            for row, slot in enumerate(live.slots):
                if not state.primed[slot]:
                    window[row, :ctx] = current[row, :1]
                    state.primed[slot] = True
        out_rows = rows // self.stride
        if self.dilation == 1:
            cols = window.as_strided(
                (sessions, out_rows, self.kernel_size * self.in_channels),
                (window.stride(0), self.stride * self.in_channels, 1),
            )
        else:  # not used by Mimi; correct but copies
            cols = window.as_strided(
                (sessions, out_rows, self.kernel_size, self.in_channels),
                (window.stride(0), self.stride * self.in_channels, self.dilation * self.in_channels, 1),
            ).reshape(sessions, out_rows, -1)
        if self._product is None:
            raise RuntimeError("CausalConv1d.step() before prepare()")
        y = self._product.per_session(cols)
        if ctx:
            if span is None:
                state.window[:, :ctx].index_copy_(0, live.index, window[:, rows:])
            elif ctx <= rows:
                window[:, :ctx] = window[:, rows:]
            else:  # overlapping rows: copy through a temporary
                window[:, :ctx] = window[:, rows:].clone()
        return y


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d whose output is trimmed on the right only, so frame k's output is final once
    frame k is in. The kernel must be twice the stride, as everywhere in Mimi."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1, bias: bool = True
    ):
        super().__init__()
        if kernel_size != 2 * stride:
            raise ValueError(f"kernel_size {kernel_size}: only kernel = 2 x stride ({2 * stride}) is supported")
        if groups not in (1, in_channels) or (groups > 1 and in_channels != out_channels):
            raise ValueError("only groups=1 or channel-wise (groups = in = out channels) are supported")
        self.convtr = _ConvTrNesting(
            nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self._product: Linear | None = None
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None

    def prepare(self, dtype: torch.dtype, in_rows_hint: int) -> None:
        """Lays the weight out for the matrix product; after loading. `in_rows_hint`: input rows of a
        streaming frame."""
        w = self.convtr.convtr.weight.detach()  # [in, out / groups, kernel]
        if self.groups == 1:  # x [T, in] -> one [kernel, out] block per input row
            self._product = Linear(w.permute(2, 1, 0).reshape(-1, self.in_channels), None, dtype, in_rows_hint)
        else:  # channel-wise: each channel is scaled by its own kernel
            self._weight = w[:, 0, :].t().to(dtype).contiguous()  # [kernel, channels]
        b = self.convtr.convtr.bias
        self._bias = None if b is None else b.detach().to(dtype).contiguous()

    def new_state(self, dtype: torch.dtype, slots: int = 1) -> ConvTrOverlap:
        return ConvTrOverlap(torch.zeros(slots, self.kernel_size - self.stride, self.out_channels, dtype=dtype))

    def step(self, x: torch.Tensor, state: ConvTrOverlap, live: LiveSlots, activate: bool = False) -> torch.Tensor:
        """x: [sessions, T, in_channels], row b for slot live.slots[b] -> [sessions, T * stride, out_channels].
        `activate` applies ELU to x first."""
        if activate:
            x = F.elu(x)
        sessions, rows, stride, channels = x.shape[0], x.shape[1], self.stride, self.out_channels
        if self._product is not None:  # groups == 1
            parts = self._product.per_session(x).view(sessions, rows, 2, stride, channels)
        elif self._weight is not None:  # channel-wise
            parts = (x[:, :, None, :] * self._weight).view(sessions, rows, 2, stride, channels)
        else:
            raise RuntimeError("CausalConvTranspose1d.step() before prepare()")
        # input row t writes its first half to output block t and its second half to block t + 1
        out = parts[:, :, 0].clone().view(sessions, rows * stride, channels)
        out_blocks = out.view(sessions, rows, stride, channels)
        if rows > 1:
            out_blocks[:, 1:] += parts[:, :-1, 1]
        span = live.span
        if span is not None:
            tail = state.tail[span]
            out_blocks[:, 0] += tail
            tail.copy_(parts[:, -1, 1])
        else:
            out_blocks[:, 0] += state.tail.index_select(0, live.index)
            state.tail.index_copy_(0, live.index, parts[:, -1, 1])
        if self._bias is not None:
            out += self._bias
        return out
