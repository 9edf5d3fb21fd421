"""FP8 activations as DeepEP's low-latency FP8 dispatch delivers them: e4m3 values with one fp32 scale per
row and 128 channels (x ~= data * scale). Expert kernels that read them directly (dsr1/model/w8a16.py) save
the dequantized copy; every other path calls dequantize().

e local experts, M rows per expert, m model dim
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

GROUP = 128  # channels per scale


class FP8Rows(NamedTuple):
    data: Tensor  # [e, M, m] e4m3
    scales: Tensor  # [e, M, m/128] fp32 (DeepEP stores them column-major: any strides)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """[e, M, m] in dtype: each value times its group's scale, formed in fp32 and rounded once."""
        blocks = self.data.unflatten(-1, (-1, GROUP)).float() * self.scales.unsqueeze(-1)  # [e, M, m/128, 128]
        return blocks.flatten(-2).to(dtype)
