"""MoE token dispatchers: move each token to the experts the router chose, and the results back.

Every dispatcher produces DeepEP's low-latency receive layout, so expert compute is written once:
recv_x [e, M, m] with only rows [0, counts[j]) of local expert j valid (the rest are never read, and
hold whatever the memory held), M = ranks * max tokens per rank.

LocalDispatcher (one process), TorchDispatcher (torch.distributed all-to-all; gloo or NCCL) and
DeepEPLowLatencyDispatcher (dsr1/parallel/deepep.py); make_dispatcher picks one from --all2all.

n tokens on this rank, k experts per token, e local experts, m model dim, R EP ranks, T max tokens per rank,
p (token, expert) pairs sent, q rows received
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from dsr1.parallel.dist import all_reduce_max, collective_device
from dsr1.parallel.placement import Placement

ALL2ALL = ("local", "torch", "deepep_ll")


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


def ep_chunks(n_tokens: int, max_tokens: int, group: ProcessGroup | None, one_chunk: bool = False) -> list[tuple[int, int]]:
    """chunks() for an EP group: as many ranges as the busiest rank needs, so every rank (an idle one
    included, with empty ranges) joins the same number of dispatch/combine collectives. With one_chunk
    (set by `single_dispatch`) every rank has promised at most max_tokens, so no all-reduce is needed."""
    if one_chunk:
        check_chunk(n_tokens, max_tokens)
        return [(0, n_tokens)]
    return token_ranges(n_tokens, all_reduce_max(-(-n_tokens // max_tokens), group), max_tokens)


@contextmanager
def single_dispatch(dispatcher: Dispatcher) -> Iterator[None]:
    """Within this block every EP rank runs forwards of at most max_tokens tokens, so each MoE layer makes
    exactly one dispatch and chunks() skips its all-reduce: a collective read back on the host, which a
    CUDA graph cannot hold. Decode graphs are captured in it (dsr1/decode_graphs.py)."""
    before = dispatcher.one_chunk
    dispatcher.one_chunk = True
    try:
        yield
    finally:
        dispatcher.one_chunk = before


def check_group(placement: Placement, group: ProcessGroup | None) -> None:
    """The EP dispatchers' group must be the one the placement was made for."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if (size, rank) != (placement.ep_size, placement.ep_rank):
        raise ValueError(
            f"the process group has size {size} and this process is its rank {rank}, but the expert placement "
            f"was made for ep_size={placement.ep_size}, ep_rank={placement.ep_rank}"
        )


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


class _Routes(NamedTuple):
    """TorchDispatcher's handle: where each received row sits, and how to send the results back."""

    slot: Tensor  # [q] local slot of each received row
    row: Tensor  # [q] its row within that slot of recv_x
    send_splits: list[int]  # [R] pairs sent to each rank
    recv_splits: list[int]  # [R] rows received from each rank
    pair: Tensor  # [p] flat (token * k + j) index of each sent pair
    weights: Tensor  # [n, k] router weights
    dtype: torch.dtype


class TorchDispatcher:
    """Expert parallelism over plain torch.distributed collectives (gloo on CPU, NCCL on GPU).

    Produces DeepEP low-latency's receive layout, deterministically: slot j's rows are those from source
    rank 0 first, then rank 1, ..., each rank's in token order. Per dispatch: one all_to_all_single of the
    [R, e] pair counts, then one of the rows, each (token, expert) pair sent only to the rank holding that
    expert (variable splits, which gloo supports too: checked on torch 2.13). An all_gather of padded
    [T*k] buffers would need no count exchange but would move R times the data to every rank. Combine
    sends the expert outputs back along the same routes and does the weighted sum on the source rank, as
    DeepEP does. Reading the split sizes costs a host sync per dispatch: a reference path, not for CUDA graphs.
    """

    capturable = False

    def __init__(self, placement: Placement, group: ProcessGroup | None = None, max_tokens_per_rank: int = 128):
        check_group(placement, group)
        self.placement = placement.to(collective_device(group))
        self.group, self.max_tokens, self.one_chunk = group, max_tokens_per_rank, False
        self.n_local_experts = placement.n_local
        self.local_expert_ids = placement.local_expert_global_ids.tolist()

    def chunks(self, n_tokens: int) -> list[tuple[int, int]]:
        return ep_chunks(n_tokens, self.max_tokens, self.group, self.one_chunk)

    def dispatch(self, x: Tensor, expert_ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Any]:
        n, k = expert_ids.shape
        check_chunk(n, self.max_tokens)
        n_ranks, n_local = self.placement.ep_size, self.n_local_experts
        phys = self.placement.to_physical(expert_ids).flatten()  # [n*k]; rank p // e, slot p % e
        pair = (phys >= 0).nonzero().squeeze(1)  # [p]; id -1 goes nowhere, as in DeepEP
        phys, order = torch.sort(phys[pair], stable=True)  # by destination rank, then slot, then token
        pair = pair[order]
        send_counts = torch.bincount(phys, minlength=n_ranks * n_local)  # [R*e]: (destination rank, its slot)
        recv_counts = torch.empty_like(send_counts)  # [R*e]: (source rank, my slot)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits = send_counts.view(n_ranks, n_local).sum(1).tolist()
        recv_splits = recv_counts.view(n_ranks, n_local).sum(1).tolist()
        token = pair // k
        recv = x.new_empty(sum(recv_splits), x.shape[-1])  # [q, m]: by source rank, then slot, then token
        dist.all_to_all_single(recv, x[token], recv_splits, send_splits, group=self.group)

        # Block (s, j) of recv moves to slot j, after the blocks of sources < s.
        per_source = recv_counts.view(n_ranks, n_local)  # [R, e]
        block_start = torch.cumsum(recv_counts, 0) - recv_counts  # [R*e] in recv
        slot_start = (torch.cumsum(per_source, 0) - per_source).flatten()  # [R*e] in recv_x[j]
        q = recv.shape[0]
        slot = torch.arange(n_local, device=x.device).repeat(n_ranks).repeat_interleave(recv_counts, output_size=q)
        row = torch.arange(q, device=x.device) + (slot_start - block_start).repeat_interleave(recv_counts, output_size=q)
        recv_x = x.new_empty(n_local, n_ranks * self.max_tokens, x.shape[-1])  # [e, R*T, m]; rows past counts unset
        recv_x[slot, row] = recv
        routes = _Routes(slot, row, send_splits, recv_splits, pair, weights, x.dtype)
        return recv_x, per_source.sum(0).int(), routes

    def combine(self, y: Tensor, handle: Any) -> Tensor:
        back = y[handle.slot, handle.row]  # [q, m]
        ret = y.new_empty(sum(handle.send_splits), y.shape[-1])  # [p, m], in the order the pairs were sent
        dist.all_to_all_single(ret, back, handle.send_splits, handle.recv_splits, group=self.group)
        return weighted_sum(ret, handle.pair, handle.weights, handle.dtype)


def make_dispatcher(
    all2all: str, placement: Placement, group: ProcessGroup | None, max_tokens: int, hidden: int, fp8_dispatch: bool = False
) -> Dispatcher:
    """The dispatcher for --all2all (local | torch | deepep_ll); one EP rank always gets LocalDispatcher.

    max_tokens is the per-rank chunk size T; hidden the model dim (DeepEP sizes its buffer with it);
    fp8_dispatch sends FP8 activations (deepep_ll only).
    """
    if all2all not in ALL2ALL:
        raise ValueError(f"--all2all={all2all!r} is not one of {ALL2ALL}")
    if fp8_dispatch and all2all != "deepep_ll":
        raise ValueError(f"FP8 dispatch needs --all2all deepep_ll, got --all2all {all2all}")
    if placement.ep_size == 1:
        return LocalDispatcher(placement.n_experts, max_tokens)
    if all2all == "local":
        raise ValueError(
            f"--all2all local holds all experts in one process, but ep_size={placement.ep_size}: use torch or deepep_ll"
        )
    if all2all == "torch":
        return TorchDispatcher(placement, group, max_tokens)
    from dsr1.parallel.deepep import DeepEPLowLatencyDispatcher  # deepep.py imports this module's helpers

    return DeepEPLowLatencyDispatcher(placement, group, max_tokens, hidden, fp8_dispatch)
