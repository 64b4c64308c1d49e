"""Matrix products with a weight laid out once, at load time, for the fastest small-batch kernel.

Every convolution and projection of Mimi ends in `x [rows, in] -> x @ W.T + b`. With 2 to 16 rows a
frame the product streams its whole weight from memory, so the weight's layout decides the speed:
oneDNN's packed (blocked) layout when this torch has it, else BLAS on an input-major copy.
RTPIPE_MIMI_MATMUL=blas forces the plain path (for comparisons).

Sessions batched into one product must get the very numbers each would get alone (the same codes):
`per_session` says when one product over all their rows does, and goes session by session otherwise.
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

    def per_session(self, x: torch.Tensor) -> torch.Tensor:
        """x [sessions, rows, in] (any strides) -> [sessions, rows, out], each session's rows bit for bit
        what `self(x[b])` gives alone.

        Measured on oneDNN's packed kernels (f32 and bf16, 1 and 2 threads): a row's result does not
        depend on how many rows share the product once there are 2 or more, so such sessions go as one
        product. With 1 row each (oneDNN's 1-row kernel sums in another order than its many-row one), or
        on the BLAS path (whose blocking follows the row count), they go one session at a time."""
        sessions, rows = x.shape[0], x.shape[1]
        if sessions == 1 or (self.onednn and rows >= 2):
            return self(x.reshape(sessions * rows, x.shape[2])).view(sessions, rows, self.out_features)
        return torch.stack([self(x[b]) for b in range(sessions)])
