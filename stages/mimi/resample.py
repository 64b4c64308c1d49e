"""Mimi's learnt resampling between the encoder's 25 Hz and the codes' 12.5 Hz.

Down: a strided causal convolution padded by repeating the first input (as Kyutai's). Up: a channel-wise
causal transposed convolution. Both keep Kyutai's key nesting (`downsample.conv.conv.conv.weight`).
"""

from __future__ import annotations

from torch import nn

from rtpipe.stages.mimi.conv import CausalConv1d, CausalConvTranspose1d


class ConvDownsample1d(nn.Module):
    def __init__(self, stride: int, dimension: int):
        super().__init__()
        self.conv = CausalConv1d(dimension, dimension, 2 * stride, stride=stride, bias=False, pad_mode="replicate")


class ConvTrUpsample1d(nn.Module):
    def __init__(self, stride: int, dimension: int):
        super().__init__()
        self.convtr = CausalConvTranspose1d(
            dimension, dimension, 2 * stride, stride=stride, groups=dimension, bias=False
        )
