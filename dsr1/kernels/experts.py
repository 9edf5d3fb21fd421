"""Kernels for the routed experts, each computing GroupedExperts' reference loop (dsr1/model/mlp.py): per
expert j, w2(silu(w1 x) * w3 x) on its valid rows x[j, :counts[j]] of the masked layout, or on its segment of
packed rows (a prefill on one process, which skips the dispatch: dsr1/model/moe.py).

- Grouped: the valid rows of all experts packed, then one torch._grouped_mm per weight (run-dtype weights).
- Masked: the W8A16 Triton kernel (dsr1/kernels/w8a16.py) straight on the masked layout: only routed experts'
  weights are read, FP8 ones as FP8, and the counts never leave the device (no host sync, so a decode step
  can be captured in a CUDA graph). It also reads one token's experts by id (`listed`), with no dispatch.

- Contiguous: FP8 weights through DeepGEMM's grouped GEMM on contiguous rows (m_grouped_fp8_gemm_nt_contiguous):
  each expert's packed rows copied into a segment aligned to DeepGEMM's block (128 rows), activations
  quantized per token in 1x128 groups as the dense FP8 GEMMs quantize them. Every expert's weights are read
  once per call however many tokens it carries, so a prefill of thousands of tokens reads them once.

Which one runs (or the loop) is the model's backend's choice: Backend.expert_kernel, Backend.packed_experts.
Weights come as (weight [e, out, in], scale [e, out/128, in/128] or None) pairs.

e local experts, M rows per expert, m model dim, i expert inner dim, p valid rows of all experts, k listed experts,
P aligned rows (the segments padded to DeepGEMM's alignment)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dsr1.fp8 import FP8Rows, quantize_activation
from dsr1.kernels import w8a16

Weight = tuple[Tensor, Tensor | None]  # (weight [e, out, in], its block scales or None)


class Grouped:
    name = "grouped"
    capturable = False  # x[valid] sizes its result on the host
    takes_listed = False

    def takes(self, x: Tensor | FP8Rows) -> bool:
        return hasattr(torch, "_grouped_mm")

    def __call__(self, x: Tensor | FP8Rows, counts: Tensor, max_active: int | None, w1: Weight, w2: Weight, w3: Weight) -> Tensor:
        """x [e, M, m], counts [e] -> [e, M, m], zero past each count; run-dtype weights."""
        if isinstance(x, FP8Rows):
            x = x.dequantize(torch.bfloat16)
        valid = torch.arange(x.shape[1], device=x.device) < counts.unsqueeze(1)  # [e, M]
        rows = x[valid]  # [p, m]: expert 0's valid rows, then expert 1's, ...
        ends = torch.cumsum(counts, 0).int()  # [e]: where each expert's rows end in `rows`

        def mm(a: Tensor, w: Weight) -> Tensor:  # a [p, in] times each expert's weight [e, out, in] -> [p, out]
            return torch._grouped_mm(a, w[0].to(a.dtype).transpose(-2, -1), offs=ends)

        h = F.silu(mm(rows, w1)) * mm(rows, w3)  # [p, i]
        out = torch.zeros_like(x)
        out[valid] = mm(h, w2)
        return out


class Masked:
    name = "masked"
    capturable = True
    takes_listed = True

    def takes(self, x: Tensor | FP8Rows) -> bool:
        """The kernel runs on x's device with x's dtype (FP8Rows count as bf16: the kernel dequantizes them)."""
        if isinstance(x, FP8Rows):
            return w8a16.available(x.data.device)
        return w8a16.available(x.device, x.dtype)

    def __call__(self, x: Tensor | FP8Rows, counts: Tensor, max_active: int | None, w1: Weight, w2: Weight, w3: Weight) -> Tensor:
        """x [e, M, m] (or FP8Rows), counts [e] -> [e, M, m] bf16, rows past each count unwritten. max_active: at
        most this many experts have rows, and the kernels are launched for that many (a device-side list)."""
        n_local = w1[0].shape[0]
        experts = w8a16.active_experts(counts, max_active) if max_active is not None and max_active < n_local else None
        return self._swiglu(x, w1, w2, w3, counts=counts, experts=experts)

    def listed(self, x: Tensor, expert_ids: Tensor, w1: Weight, w2: Weight, w3: Weight) -> Tensor:
        """One token x [1, m] through each of its experts expert_ids [1, k] (local slots) -> [k, m], in the order
        listed: each product is the one __call__ computes for that token (same tiles, bit for bit)."""
        ids = expert_ids.flatten()  # [k]
        rows = x.view(1, 1, -1).expand(ids.numel(), 1, x.shape[-1])  # [k, 1, m], no copy
        return self._swiglu(rows, w1, w2, w3, experts=ids, listed=True).squeeze(1)

    def _swiglu(self, x: Tensor | FP8Rows, w1: Weight, w2: Weight, w3: Weight, counts=None, experts=None, listed=False) -> Tensor:
        """w2(silu(w1 x) * w3 x) per expert: w1 and w3 in one launch, then w2 (grouped_linear's counts / experts / listed)."""
        both = w8a16.grouped_linear(x, *w1, counts, experts=experts, second=w3, listed=listed)  # [., ., 2i]
        gate, up = both.split([w1[0].shape[1], w3[0].shape[1]], dim=-1)
        return w8a16.grouped_linear(F.silu(gate) * up, *w2, counts, experts=experts, listed=listed)


class Contiguous:
    """DeepGEMM's m_grouped_fp8_gemm_nt_contiguous on packed rows; `deep_gemm` is the imported module."""

    name = "deepgemm_contiguous"

    def __init__(self, deep_gemm):
        self.deep_gemm = deep_gemm
        alignment = getattr(deep_gemm, "get_mk_alignment_for_contiguous_layout", None) or deep_gemm.get_m_alignment_for_contiguous_layout
        self.align = alignment()

    def __call__(self, rows: Tensor, counts: Tensor, w1: Weight, w2: Weight, w3: Weight) -> Tensor:
        """rows [p, m] bf16, expert j's rows after expert j-1's (counts [e]) -> [p, m] bf16, FP8 weights."""
        padded = (counts + self.align - 1) // self.align * self.align  # [e]
        starts = torch.cumsum(padded, 0) - padded  # [e]: where each expert's segment begins
        slot = torch.repeat_interleave(torch.arange(counts.numel(), device=rows.device), counts, output_size=rows.shape[0])  # [p]
        dest = starts[slot] + torch.arange(rows.shape[0], device=rows.device) - (torch.cumsum(counts, 0) - counts)[slot]  # [p]
        total = int(padded.sum())  # a host sync: the grouped GEMM's row count
        m_indices = torch.full((total,), -1, dtype=torch.int32, device=rows.device)  # [P]: padding rows are skipped
        m_indices[dest] = slot.int()
        x = rows.new_zeros(total, rows.shape[-1])  # [P, m]
        x[dest] = rows
        h = F.silu(self._mm(x, w1, m_indices)) * self._mm(x, w3, m_indices)  # [P, i]
        return self._mm(h, w2, m_indices)[dest]

    def _mm(self, x: Tensor, w: Weight, m_indices: Tensor) -> Tensor:
        """x [P, in] bf16 times each row's expert weight [e, out, in] FP8 (its 128x128 scales) -> [P, out] bf16."""
        out = x.new_empty(x.shape[0], w[0].shape[1])
        self.deep_gemm.m_grouped_fp8_gemm_nt_contiguous(quantize_activation(x), w, out, m_indices)
        return out


GROUPED, MASKED = Grouped(), Masked()
