"""A bias-free linear layer whose weight is either in the run dtype or block-quantized FP8.

FP8 weights stay e4m3 in memory (half the bytes of bf16) and are dequantized per matmul, as the
official `gemm_impl="bf16"` path does; activations are not quantized.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr1.checkpoint.fp8 import FP8_DTYPE, dequantize, scale_shape


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

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight [out, in] in `dtype`, dequantized if it is stored as FP8."""
        if self.scale is None:
            return self.weight.to(dtype)
        return dequantize(self.weight, self.scale, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in] -> [..., out]."""
        return F.linear(x, self.dense_weight(x.dtype))
