"""MoE token dispatchers: move each token to the experts the router chose, and the results back.

Every dispatcher produces DeepEP's low-latency receive layout, so expert compute is written once:
recv_x [e, M, m] with only rows [0, counts[j]) of local expert j valid, M = ranks * max tokens per rank.

n tokens on this rank, k experts per token, e local experts, m model dim
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor


class Dispatcher(Protocol):
    n_local_experts: int
    local_expert_ids: list[int]  # global id of the expert in each local slot

    def chunks(self, n_tokens: int) -> list[tuple[int, int]]:
        """Token ranges [start, end) to dispatch one at a time; every EP rank gets the same count."""
        ...

    def dispatch(self, x: Tensor, expert_ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Any]:
        """x [n, m], global expert_ids [n, k], weights [n, k] fp32 -> recv_x [e, M, m], counts [e] int, handle."""
        ...

    def combine(self, y: Tensor, handle: Any) -> Tensor:
        """Expert outputs y [e, M, m] -> [n, m]: each token's outputs summed with its router weights."""
        ...


def token_ranges(n_tokens: int, n_chunks: int, chunk: int) -> list[tuple[int, int]]:
    """`n_chunks` ranges of at most `chunk` tokens covering [0, n_tokens); trailing ones may be empty."""
    return [(min(i * chunk, n_tokens), min((i + 1) * chunk, n_tokens)) for i in range(n_chunks)]


def group_by_expert(slots: Tensor, n_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sort (token, choice) pairs by destination slot, keeping token order within a slot.

    slots: [n, k] -> order [n*k] (indices into the flattened pairs), row [n*k] (each sorted pair's row
    within its slot), counts [n_slots].
    """
    flat = slots.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_slots)
    starts = torch.cumsum(counts, 0) - counts  # [n_slots]
    row = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return order, row, counts


class LocalDispatcher:
    """One process holds every expert: dispatch is a sort by expert, combine a weighted scatter-add."""

    def __init__(self, n_experts: int, max_tokens: int = 128):
        self.n_local_experts = n_experts
        self.local_expert_ids = list(range(n_experts))
        self.max_tokens = max_tokens

    def chunks(self, n_tokens: int) -> list[tuple[int, int]]:
        return token_ranges(n_tokens, -(-n_tokens // self.max_tokens), self.max_tokens)

    def dispatch(self, x: Tensor, expert_ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Any]:
        n, k = expert_ids.shape
        order, row, counts = group_by_expert(expert_ids, self.n_local_experts)
        token = order // k
        slot = expert_ids.flatten()[order]
        recv_x = x.new_zeros(self.n_local_experts, n, x.shape[-1])  # [e, n, m]
        recv_x[slot, row] = x[token]
        return recv_x, counts.int(), (slot, row, token, weights.flatten()[order], n)

    def combine(self, y: Tensor, handle: Any) -> Tensor:
        slot, row, token, weight, n = handle
        out = torch.zeros(n, y.shape[-1], dtype=torch.float32, device=y.device)
        out.index_add_(0, token, y[slot, row].float() * weight.unsqueeze(-1))
        return out.to(y.dtype)
