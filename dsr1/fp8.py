"""FP8 (e4m3) as DeepSeek-R1 uses it: block-quantized weights, and FP8 activation rows.

Weights: `weight` [out, in] float8_e4m3fn plus `weight_scale_inv` [ceil(out/B), ceil(in/B)] float32, B = 128;
the last block of each dim may be ragged. The stored scale is *multiplied* into the FP8 values:
w = fp8.float() * scale_inv[i // B, j // B].

Activations: quantize_activation makes 1x128-group e4m3 rows with fp32 scales (DeepSeek-V3's recipe, what
the FP8xFP8 GEMMs take). FP8Rows: e4m3 values with one fp32 scale per row and 128 channels (x ~= data * scale), as
DeepEP's low-latency FP8 dispatch delivers them. Expert kernels that read them directly
(dsr1/kernels/w8a16.py) save the dequantized copy; every other path calls dequantize().

e local experts, M rows per expert, m model dim
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
BLOCK = 128
AMAX_MIN = 1e-4  # floor of a group's amax, so an all-zero group gets a finite scale (DeepGEMM's per_token_cast_to_fp8)


def scale_shape(out_dim: int, in_dim: int, block: int = BLOCK) -> tuple[int, int]:
    return (math.ceil(out_dim / block), math.ceil(in_dim / block))


def dequantize(weight: Tensor, scale_inv: Tensor, dtype: torch.dtype, block: int = BLOCK) -> Tensor:
    """[o, i] e4m3 and [ceil(o/B), ceil(i/B)] fp32 -> [o, i] in `dtype` (products formed in fp32)."""
    out_dim, in_dim = weight.shape[-2:]
    s = scale_inv.repeat_interleave(block, dim=-2)[..., :out_dim, :]
    s = s.repeat_interleave(block, dim=-1)[..., :in_dim]  # [o, i]
    return (weight.float() * s).to(dtype)


def quantize(weight: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """[o, i] float -> ([o, i] e4m3, [ceil(o/B), ceil(i/B)] fp32 scale_inv) with per-block amax / 448."""
    out_dim, in_dim = weight.shape
    so, si = scale_shape(out_dim, in_dim, block)
    padded = weight.float().new_zeros(so * block, si * block)
    padded[:out_dim, :in_dim] = weight.float()
    tiles = padded.view(so, block, si, block)
    amax = tiles.abs().amax(dim=3).amax(dim=1).clamp(min=1e-12)  # [so, si]; one dim at a time: amax(dim=(1, 3)) is ~40x slower on CPU
    scale_inv = amax / FP8_MAX
    q = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(so * block, si * block)[:out_dim, :in_dim].contiguous(), scale_inv.float()


def quantize_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] (K a multiple of 128) -> (e4m3 [M, K], fp32 scales [M, K/128]); x ~= q * scale in each 1x128 group.

    The scales come out column-major (strides (1, M)), the layout cuBLASLt and DeepGEMM read."""
    m, k = x.shape
    groups = x.reshape(m, k // BLOCK, BLOCK)  # [M, Kb, 128]
    amax = groups.transpose(0, 1).abs().amax(dim=-1).float()  # [Kb, M]; exact in x's dtype
    scale = (amax.clamp_(min=AMAX_MIN) / FP8_MAX).t()  # [M, Kb]
    q = (groups / scale.unsqueeze(-1)).to(FP8_DTYPE)  # in fp32; |q| <= 448 by construction
    return q.view(m, k), scale


class FP8Rows(NamedTuple):
    data: Tensor  # [e, M, m] e4m3
    scales: Tensor  # [e, M, m/128] fp32 (DeepEP stores them column-major: any strides)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """[e, M, m] in dtype: each value times its group's scale, formed in fp32 and rounded once."""
        blocks = self.data.unflatten(-1, (-1, BLOCK)).float() * self.scales.unsqueeze(-1)  # [e, M, m/128, 128]
        return blocks.flatten(-2).to(dtype)
