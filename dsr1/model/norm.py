"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, normalized in fp32 (HF: *_layernorm, model.norm)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., d] -> [..., d] in x's dtype. As HF: normalized in fp32, rounded to x's dtype, then scaled
        (F.rms_norm is one fused kernel on CUDA, where the spelled-out formula is five)."""
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x / sqrt(mean(x^2) + eps)
        return self.weight * xf.to(x.dtype)
