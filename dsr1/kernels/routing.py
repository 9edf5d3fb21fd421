"""R1's group-limited top-k routing (Gate.forward after the router matmul) as one Triton kernel.

The PyTorch path (dsr1/model/gate.py) takes a dozen launches per MoE layer: sigmoid, bias, a top-2 per
group, a top-k over groups, a scatter and a mask, a top-k over experts, a gather and a normalization.
At batch 1 those launches cost more than the router's arithmetic, so on CUDA one program per token does
all of it in registers. Ties pick the lowest index (torch.topk leaves their order unspecified); experts
come out in descending biased score, as torch.topk(sorted=True) gives them, so the combine sums in the
same order. Gate holds a Router (or None, for shapes the kernel does not take) and runs it on CUDA devices
when Triton imports; tests run it interpreted on CPU.

n tokens, e routed experts (a power of two), g groups, k experts per token, K k rounded up to a power of two
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsr1.kernels.w8a16 import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _route_kernel(
        logits_ptr, bias_ptr, weights_ptr, ids_ptr, route_scale,
        E: tl.constexpr, G: tl.constexpr, TOPK_GROUPS: tl.constexpr, K: tl.constexpr, K_POW2: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        experts = tl.arange(0, E)
        scores = tl.sigmoid(tl.load(logits_ptr + row * E + experts))  # [e] fp32: the mixing weights' source
        grouped = tl.reshape(scores + tl.load(bias_ptr + experts), (G, E // G))  # [g, e/g] biased: what selection uses
        col = tl.arange(0, E // G)[None, :]
        best = tl.max(grouped, axis=1)
        first = tl.min(tl.where(grouped == best[:, None], col, E // G), axis=1)  # the best's column (lowest on ties)
        group_scores = best + tl.max(tl.where(col == first[:, None], float("-inf"), grouped), axis=1)  # [g] top-2 sums
        groups = tl.arange(0, G)
        kept = groups < 0  # [g] all False
        for _ in tl.static_range(TOPK_GROUPS):
            pick = tl.min(tl.where(group_scores == tl.max(group_scores, axis=0), groups, G), axis=0)
            kept = kept | (groups == pick)
            group_scores = tl.where(groups == pick, float("-inf"), group_scores)
        choice = tl.reshape(tl.where(kept[:, None], grouped, float("-inf")), (E,))  # [e], -inf outside kept groups
        slots = tl.arange(0, K_POW2)
        ids = tl.zeros((K_POW2,), dtype=tl.int64)
        weights = tl.zeros((K_POW2,), dtype=tl.float32)
        for j in tl.static_range(K):  # k rounds of argmax: the experts in descending biased score
            pick = tl.min(tl.where(choice == tl.max(choice, axis=0), experts, E), axis=0)
            ids = tl.where(slots == j, pick.to(tl.int64), ids)
            weights = tl.where(slots == j, tl.sum(tl.where(experts == pick, scores, 0.0), axis=0), weights)
            choice = tl.where(experts == pick, float("-inf"), choice)
        weights = weights / tl.sum(weights, axis=0) * route_scale
        tl.store(ids_ptr + row * K + slots, ids, mask=slots < K)
        tl.store(weights_ptr + row * K + slots, weights, mask=slots < K)


def available(device: torch.device) -> bool:
    """Whether Gate uses the kernel on `device`: CUDA with Triton (on CPU it runs only interpreted, for tests)."""
    return triton is not None and device.type == "cuda"


def supports(n_experts: int, n_groups: int, topk_groups: int, top_k: int) -> bool:
    """Shapes the kernel takes: powers of two for experts and groups, groups of at least two (top-2 sums),
    and at least k experts in the kept groups."""
    pow2 = lambda v: v > 0 and v & (v - 1) == 0  # noqa: E731
    group = n_experts // max(n_groups, 1)
    return pow2(n_experts) and pow2(n_groups) and group >= 2 and topk_groups * group >= top_k


class Router:
    """Gate.route for one router's shape as the kernel: logits [n, e] fp32, bias [e] -> weights [n, k], expert_ids [n, k]."""

    def __init__(self, n_groups: int, topk_groups: int, top_k: int, route_scale: float):
        self.n_groups, self.topk_groups, self.top_k, self.route_scale = n_groups, topk_groups, top_k, route_scale

    def takes(self, logits: Tensor) -> bool:
        return available(logits.device)

    def __call__(self, logits: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        return route(logits, bias, self.n_groups, self.topk_groups, self.top_k, self.route_scale)


def router(n_experts: int, n_groups: int, topk_groups: int, top_k: int, route_scale: float) -> Router | None:
    """The kernel for a router of this shape, or None where it does not take it (supports)."""
    return Router(n_groups, topk_groups, top_k, route_scale) if supports(n_experts, n_groups, topk_groups, top_k) else None


def route(logits: Tensor, bias: Tensor, n_groups: int, topk_groups: int, top_k: int, route_scale: float) -> tuple[Tensor, Tensor]:
    """Router logits [n, e] fp32 (before the sigmoid), bias [e] fp32 -> weights [n, k] fp32, expert_ids [n, k] int64."""
    return torch.ops.dsr1.route(logits.contiguous(), bias.contiguous(), n_groups, topk_groups, top_k, route_scale)


@torch.library.custom_op("dsr1::route", mutates_args=())
def _route(logits: Tensor, bias: Tensor, n_groups: int, topk_groups: int, top_k: int, route_scale: float) -> tuple[Tensor, Tensor]:
    """The kernel launch, an opaque operator to torch.compile."""
    n, e = logits.shape
    weights = torch.empty(n, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(n, top_k, dtype=torch.int64, device=logits.device)
    if n:
        _route_kernel[(n,)](
            logits, bias, weights, ids, route_scale,
            E=e, G=n_groups, TOPK_GROUPS=topk_groups, K=top_k, K_POW2=triton.next_power_of_2(top_k), num_warps=1 if e <= 64 else 4,
        )  # fmt: skip
    return weights, ids


@_route.register_fake
def _(logits: Tensor, bias: Tensor, n_groups: int, topk_groups: int, top_k: int, route_scale: float) -> tuple[Tensor, Tensor]:
    n = logits.shape[0]
    return logits.new_empty(n, top_k), logits.new_empty(n, top_k, dtype=torch.int64)
