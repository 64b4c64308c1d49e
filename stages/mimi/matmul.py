"""Matrix products with a weight laid out once, at load time, for the fastest small-batch kernel.

Every convolution and projection of Mimi ends in `x [rows, in] -> x @ W.T + b`. With 2 to 16 rows a
frame the product streams its whole weight from memory, so the weight's layout decides the speed:
oneDNN's packed (blocked) layout when this torch has it, else BLAS on an input-major copy.
RTPIPE_MIMI_MATMUL=blas forces the plain path (for comparisons).
"""

from __future__ import annotations

import os

import torch


def _onednn_available(dtype: torch.dtype) -> bool:
    if os.environ.get("RTPIPE_MIMI_MATMUL", "auto") == "blas":
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        probe = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 8, dtype=dtype), 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8, dtype=dtype), probe, None, "none", [], "")
        return True
    except (AttributeError, RuntimeError):
        return False


_ONEDNN: dict[torch.dtype, bool] = {}


class Linear:
    """y = x @ weight.T + bias for x [rows, in] (any row stride); weight [out, in] as stored."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, rows_hint: int):
        if dtype not in _ONEDNN:
            _ONEDNN[dtype] = _onednn_available(dtype)
        weight = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.out_features = weight.shape[0]
        self.onednn = _ONEDNN[dtype]
        if self.onednn:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, max(1, rows_hint))
        else:
            self.weight = weight.t().contiguous()  # input-major: a faster product for few rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            if not x.is_contiguous():
                x = x.contiguous()
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.bias is not None:
            return torch.addmm(self.bias, x, self.weight)
        return x @ self.weight
