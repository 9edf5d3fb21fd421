"""A bias-free linear layer whose weight is either in the run dtype or block-quantized FP8.

FP8 weights stay e4m3 in memory (half the bytes of bf16). How they are multiplied is the layer's `gemm`
backend (dsr1/kernels/backend.py): by default they are dequantized per matmul, as the official
`gemm_impl="bf16"` path does; fp8_gemm.use_fp8_gemm switches a model to FP8 matmuls that read the FP8 weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr1.fp8 import FP8_DTYPE, dequantize, scale_shape
from dsr1.kernels.backend import DEQUANT


class Linear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, fp8: bool = False):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        dtype = FP8_DTYPE if fp8 else None
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, dtype=dtype), requires_grad=False)
        if fp8:  # HF: weight_scale_inv
            self.scale = nn.Parameter(torch.empty(scale_shape(out_dim, in_dim), dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("scale", None)
        self.gemm = DEQUANT  # FP8 matmul backend, set by fp8_gemm.use_fp8_gemm
        self._dense: Tensor | None = None  # kept dense weight (backends with keeps_dense), made after the weights are loaded

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight [out, in] in `dtype`, dequantized if it is stored as FP8.

        MLA uses wkv_b's weight outside a matmul on every step; with an FP8 backend (keeps_dense) the
        dequantized copy is made once and kept, the dequant backend remakes it each call instead."""
        if self.scale is None:
            return self.weight.to(dtype)
        if not self.gemm.keeps_dense:
            self._dense = None
            return dequantize(self.weight, self.scale, dtype)
        if self._dense is None or self._dense.dtype != dtype or self._dense.device != self.weight.device:
            self._dense = dequantize(self.weight, self.scale, dtype)
        return self._dense

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in] -> [..., out]."""
        if self.scale is None:
            return F.linear(x, self.weight.to(x.dtype))
        return self.gemm.linear(x, self.weight, self.scale)


def linear_pair(x: Tensor, first: Linear, second: Linear) -> tuple[Tensor, Tensor]:
    """(first(x), second(x)): two projections of one input (gate and up; wq_a and wkv_a). Two FP8 ones go to
    their backend together, which may compute both in one launch (W8A16.linear_pair): the same function."""
    if first.scale is None or second.scale is None or first.gemm is not second.gemm:
        return first(x), second(x)
    return first.gemm.linear_pair(x, (first.weight, first.scale), (second.weight, second.scale))
