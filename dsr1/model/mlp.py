"""SwiGLU feed-forward networks: the dense MLP (and shared expert), and the stacked routed experts.

e local experts, M rows per expert, n rows of one expert, m model dim, i expert inner dim, k listed experts
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr1.fp8 import FP8_DTYPE, FP8Rows, scale_shape
from dsr1.kernels.backend import DEQUANT
from dsr1.kernels.experts import Contiguous, Grouped, Masked
from dsr1.model.linear import Linear, linear_pair


class MLP(nn.Module):
    """w2(silu(w1 x) * w3 x). Dense layers (HF: mlp) and the shared expert (HF: mlp.shared_experts)."""

    def __init__(self, dim: int, inter_dim: int, fp8: bool):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, fp8)  # HF: gate_proj
        self.w2 = Linear(inter_dim, dim, fp8)  # HF: down_proj
        self.w3 = Linear(dim, inter_dim, fp8)  # HF: up_proj

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., m] -> [..., m]."""
        gate, up = linear_pair(x, self.w1, self.w3)
        return self.w2(F.silu(gate) * up)


class GroupedExperts(nn.Module):
    """This rank's routed experts, stacked in local-slot order (HF: mlp.experts.{expert_id}.*): per expert j,
    w2(silu(w1 x) * w3 x) on its valid rows.

    Works on the layout DeepEP's low-latency dispatch produces: x [e, M, m] where only rows
    [0, counts[j]) of expert j are valid. Slot j holds the global expert the placement assigns it.
    `forward` is the reference: a loop over the experts with rows. The backend `gemm` may instead hand over
    a kernel for x (Backend.expert_kernel: grouped products, or the masked W8A16 kernel with no host sync).
    """

    def __init__(self, n_local: int, dim: int, inter_dim: int, fp8: bool):
        super().__init__()
        self.n_local = n_local
        dtype = FP8_DTYPE if fp8 else None
        shapes = {"w1": (inter_dim, dim), "w2": (dim, inter_dim), "w3": (inter_dim, dim)}  # HF: gate, down, up
        for name, (out_dim, in_dim) in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(n_local, out_dim, in_dim, dtype=dtype), requires_grad=False))
            scale = None
            if fp8:  # HF: weight_scale_inv, one block grid per expert
                scale = nn.Parameter(torch.empty(n_local, *scale_shape(out_dim, in_dim), dtype=torch.float32), requires_grad=False)
            self.register_parameter(f"{name}_scale", scale)
        self.gemm = DEQUANT  # FP8 matmul backend, set by fp8_gemm.use_fp8_gemm; it also picks the experts' kernel

    def forward(self, x: Tensor | FP8Rows, counts: Tensor, max_active: int | None = None) -> Tensor:
        """x: [e, M, m] (or FP8Rows from an FP8 dispatch), counts: [e] -> [e, M, m] in the run dtype; rows past
        counts[j] are not to be read (zero, except from the masked kernel). max_active: at most this many
        experts have rows (the masked kernel then launches for that many, not for all e)."""
        kernel = self.kernel(x)
        if kernel is not None:
            return kernel(x, counts, max_active, *self.weights())
        if isinstance(x, FP8Rows):
            x = x.dequantize(torch.bfloat16)
        out = torch.zeros_like(x)
        for slot, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            xe = x[slot, :n]  # [n, m]
            h = F.silu(self.linear("w1", slot, xe)) * self.linear("w3", slot, xe)  # [n, i]
            out[slot, :n] = self.linear("w2", slot, h)
        return out

    def linear(self, name: str, slot: int, x: Tensor) -> Tensor:
        """x [n, in] times expert `slot`'s weight `name` ('w1', 'w2' or 'w3'): FP8 weights go through `gemm`."""
        w, scale = getattr(self, name)[slot], getattr(self, f"{name}_scale")
        if scale is None:
            return F.linear(x, w.to(x.dtype))
        return self.gemm.linear(x, w, scale[slot])

    def kernel(self, x: Tensor | FP8Rows) -> Grouped | Masked | None:
        """The kernel `gemm` runs these experts with on x (dsr1/kernels/experts.py), or None: the loop."""
        return self.gemm.expert_kernel(x, fp8=self.w1_scale is not None)

    def packed_kernel(self, x: Tensor) -> Contiguous | None:
        """The kernel `gemm` runs these experts with on packed rows of the tokens x [n, m], or None (then dispatch)."""
        return self.gemm.packed_experts(x, fp8=self.w1_scale is not None)

    def weights(self) -> list[tuple[Tensor, Tensor | None]]:
        """(weight [e, out, in], scale or None) of w1, w2, w3: what the kernels take."""
        return [(getattr(self, name), getattr(self, f"{name}_scale")) for name in ("w1", "w2", "w3")]
