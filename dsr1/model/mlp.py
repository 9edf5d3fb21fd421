"""SwiGLU feed-forward networks: the dense MLP (and shared expert), and the stacked routed experts.

e local experts, M rows per expert, m model dim, i expert inner dim
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr1.fp8 import FP8_DTYPE, dequantize, scale_shape
from dsr1.kernels import w8a16
from dsr1.kernels.fp8_gemm import DEQUANT
from dsr1.model.linear import Linear, linear_pair
from dsr1.fp8 import FP8Rows


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
    """This rank's routed experts, stacked in local-slot order (HF: mlp.experts.{expert_id}.*).

    Works on the layout DeepEP's low-latency dispatch produces: x [e, M, m] where only rows
    [0, counts[j]) of expert j are valid. Slot j holds the global expert the placement assigns it.

    Three ways to compute the same function (`impl`):
    - `loop`: per expert, three matmuls through the FP8 `gemm` backend. The readable reference.
    - `grouped`: the valid rows of all experts packed, then three grouped matmuls (torch._grouped_mm).
    - `masked`: the W8A16 Triton kernel (dsr1/kernels/w8a16.py) straight on the masked layout: only routed
      experts' weights are read, FP8 ones as FP8, and the counts never leave the device (no host sync,
      so a decode step can be captured in a CUDA graph).
    `auto` (the default) takes `masked` where the kernel runs (CUDA, bf16 activations, and for FP8
    weights the w8a16 backend), else `grouped` for run-dtype weights and `loop` for FP8 ones.
    """

    IMPLS = ("auto", "loop", "grouped", "masked")

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
        self.gemm = DEQUANT  # FP8 matmul backend; see fp8_gemm.use_fp8_gemm
        self.impl = "auto"

    def resolve_impl(self, x: Tensor | FP8Rows) -> str:
        """The implementation `auto` stands for on x's device and dtype (FP8Rows count as bf16), or `impl`
        itself when it names one."""
        if self.impl != "auto":
            return self.impl
        dtype = torch.bfloat16 if isinstance(x, FP8Rows) else x.dtype
        x = x.data if isinstance(x, FP8Rows) else x
        kernel = w8a16.available(x.device, dtype)
        if self.w1_scale is not None:
            return "masked" if kernel and self.gemm.name == "w8a16" else "loop"
        if kernel and x.is_cuda:  # not on CPU, where the kernel only runs interpreted (tests ask for it by name)
            return "masked"
        return "grouped" if hasattr(torch, "_grouped_mm") else "loop"

    def weight(self, name: str, slot: int, dtype: torch.dtype) -> Tensor:
        """Expert `slot`'s weight `name` ('w1', 'w2' or 'w3') in `dtype`, dequantized if FP8."""
        w, scale = getattr(self, name)[slot], getattr(self, f"{name}_scale")
        return w.to(dtype) if scale is None else dequantize(w, scale[slot], dtype)

    def linear(self, name: str, slot: int, x: Tensor) -> Tensor:
        """x [n, in] times expert `slot`'s weight `name`: FP8 weights go through the `gemm` backend."""
        scale = getattr(self, f"{name}_scale")
        if scale is None:
            return F.linear(x, self.weight(name, slot, x.dtype))
        return self.gemm.linear(x, getattr(self, name)[slot], scale[slot])

    def forward(self, x: Tensor | FP8Rows, counts: Tensor, max_active: int | None = None) -> Tensor:
        """x: [e, M, m] (or FP8Rows from an FP8 dispatch), counts: [e] -> [e, M, m] in the run dtype; rows past
        counts[j] are not to be read (zero, except with `masked`). max_active: at most this many experts have
        rows (`masked` then launches its kernels for that many, not for all e)."""
        impl = self.resolve_impl(x)
        if impl not in self.IMPLS[1:]:
            raise ValueError(f"GroupedExperts.impl {impl!r} is not one of {self.IMPLS}")
        if isinstance(x, FP8Rows) and impl != "masked":  # only the masked kernel reads FP8 activations
            x = x.dequantize(torch.bfloat16)
        if impl == "masked":
            return self._masked(x, counts, max_active)
        return {"loop": self._loop, "grouped": self._grouped}[impl](x, counts)

    def _masked(self, x: Tensor | FP8Rows, counts: Tensor, max_active: int | None) -> Tensor:
        experts = w8a16.active_experts(counts, max_active) if max_active is not None and max_active < self.n_local else None
        return self._swiglu(x, counts=counts, experts=experts)

    def listed(self, x: Tensor, expert_ids: Tensor) -> Tensor:
        """One token x [1, m] through each of its experts expert_ids [1, k] (local slots) -> [k, m], in the order
        listed: the W8A16 kernel reads the token and the listed experts' weights directly, with no dispatch into
        the [e, M, m] layout. Each product is the one `masked` computes for that token (same tiles, bit for bit)."""
        ids = expert_ids.flatten()  # [k]
        rows = x.view(1, 1, -1).expand(ids.numel(), 1, x.shape[-1])  # [k, 1, m], no copy
        return self._swiglu(rows, experts=ids, listed=True).squeeze(1)

    def _swiglu(self, x: Tensor | FP8Rows, counts: Tensor | None = None, experts: Tensor | None = None, listed: bool = False) -> Tensor:
        """w2(silu(w1 x) * w3 x) per expert through the W8A16 kernel (grouped_linear's counts / experts / listed)."""

        def mm(a: Tensor | FP8Rows, name: str, second: str | None = None) -> Tensor:  # [e, M, in] -> [e, M, out], valid rows only
            pair = None if second is None else (getattr(self, second), getattr(self, f"{second}_scale"))
            weight, scale = getattr(self, name), getattr(self, f"{name}_scale")
            return w8a16.grouped_linear(a, weight, scale, counts, experts=experts, second=pair, listed=listed)

        gate, up = mm(x, "w1", second="w3").split([self.w1.shape[1], self.w3.shape[1]], dim=-1)  # one launch for both
        return mm(F.silu(gate) * up, "w2")

    def _grouped(self, x: Tensor, counts: Tensor) -> Tensor:
        valid = torch.arange(x.shape[1], device=x.device) < counts.unsqueeze(1)  # [e, M]
        rows = x[valid]  # [p, m]: expert 0's valid rows, then expert 1's, ...
        ends = torch.cumsum(counts, 0).int()  # [e]: where each expert's rows end in `rows`

        def mm(a: Tensor, w: Tensor) -> Tensor:  # a [p, in] times each expert's w [e, out, in] -> [p, out]
            return torch._grouped_mm(a, w.to(a.dtype).transpose(-2, -1), offs=ends)

        h = F.silu(mm(rows, self.w1)) * mm(rows, self.w3)  # [p, i]
        out = torch.zeros_like(x)
        out[valid] = mm(h, self.w2)
        return out

    def _loop(self, x: Tensor, counts: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for slot, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            xe = x[slot, :n]  # [n, m]
            h = F.silu(self.linear("w1", slot, xe)) * self.linear("w3", slot, xe)
            out[slot, :n] = self.linear("w2", slot, h)
        return out
