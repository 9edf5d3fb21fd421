"""The seam between the MoE layer and expert parallelism: the Dispatcher protocol, and LocalDispatcher, the
one-process dispatcher (and the test oracle of the others, dsr1/parallel/).

Every dispatcher produces DeepEP's low-latency receive layout, so expert compute is written once:
recv_x [e, M, m] with only rows [0, counts[j]) of local expert j valid (the rest are never read, and
hold whatever the memory held), M = ranks * max tokens per rank.

n tokens on this rank, k experts per token, e local experts, m model dim, p (token, expert) pairs sent
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Protocol

import torch
from torch import Tensor


class Dispatcher(Protocol):
    n_local_experts: int
    local_expert_ids: list[int]  # global id of the expert in each local slot
    max_tokens: int  # tokens per rank per dispatch
    one_chunk: bool  # see single_dispatch
    capturable: bool  # dispatch and combine run without host syncs (a CUDA graph can hold them)

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
    counts = torch.zeros(n_slots, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))  # no host sync, unlike bincount
    starts = torch.cumsum(counts, 0) - counts  # [n_slots]
    row = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return order, row, counts


def weighted_sum(rows: Tensor, pair: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
    """Σ_j w_j · y_j per token (sum_choices) from the expert outputs rows [p, m] of the pairs `pair` [p]
    (flat index token * k + j); weights [n, k]. Pairs never sent (expert id -1) count as zero. -> [n, m] in dtype.
    """
    n, k = weights.shape
    per_pair = rows.new_zeros(n * k, rows.shape[-1], dtype=torch.float32)
    per_pair[pair] = rows.float()
    return sum_choices(per_pair.view(n, k, rows.shape[-1]), weights, dtype)


def sum_choices(per_pair: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
    """Σ_j w_j · y_j per token: per_pair [n, k, m] (token i's j-th expert output), weights [n, k] -> [n, m] in
    dtype. Accumulated in fp32 in j order as DeepEP's combine kernel does, so the result is deterministic (a
    scatter-add's order is not on GPU) and equal across dispatchers."""
    out = torch.zeros(per_pair.shape[0], per_pair.shape[-1], dtype=torch.float32, device=per_pair.device)
    for j in range(per_pair.shape[1]):
        out += per_pair[:, j].float() * weights[:, j : j + 1].float()
    return out.to(dtype)


@contextmanager
def single_dispatch(dispatcher: Dispatcher) -> Iterator[None]:
    """Within this block every EP rank runs forwards of at most max_tokens tokens, so each MoE layer makes
    exactly one dispatch and chunks() skips its all-reduce: a collective read back on the host, which a
    CUDA graph cannot hold. Decode graphs are captured in it (dsr1/engine/decode_graphs.py)."""
    before = dispatcher.one_chunk
    dispatcher.one_chunk = True
    try:
        yield
    finally:
        dispatcher.one_chunk = before


def check_chunk(n_tokens: int, max_tokens: int) -> None:
    """One dispatch carries at most max_tokens tokens per rank (the receive buffer holds R * T rows per expert)."""
    if n_tokens > max_tokens:
        raise ValueError(f"dispatch got {n_tokens} tokens, more than max_tokens_per_rank={max_tokens}; split them with chunks(n)")


class LocalDispatcher:
    """One process holds every expert: dispatch is a sort by expert, combine a weighted scatter-add."""

    capturable = True

    def __init__(self, n_experts: int, max_tokens: int = 128):
        self.n_local_experts = n_experts
        self.local_expert_ids = list(range(n_experts))
        self.max_tokens = max_tokens
        self.one_chunk = False  # unused: chunks() needs no collective here

    def chunks(self, n_tokens: int) -> list[tuple[int, int]]:
        return token_ranges(n_tokens, -(-n_tokens // self.max_tokens), self.max_tokens)

    def dispatch(self, x: Tensor, expert_ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Any]:
        n, k = expert_ids.shape
        order, row, counts = group_by_expert(expert_ids, self.n_local_experts)
        token = order // k
        slot = expert_ids.flatten()[order]
        recv_x = x.new_empty(self.n_local_experts, n, x.shape[-1])  # [e, n, m]; rows past counts unset, as in DeepEP's buffer
        recv_x[slot, row] = x[token]
        return recv_x, counts.int(), (slot, row, order, weights)

    def combine(self, y: Tensor, handle: Any) -> Tensor:
        slot, row, pair, weights = handle
        return weighted_sum(y[slot, row], pair, weights, y.dtype)
