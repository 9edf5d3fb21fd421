"""Expert parallelism over plain torch.distributed collectives (gloo on CPU, NCCL on GPU): TorchDispatcher,
and what every EP dispatcher shares (the chunking all ranks agree on, the group check).

It produces the receive layout of dsr1/model/dispatch.py (DeepEP's low-latency layout); DeepEP's own
dispatcher is dsr1/parallel/deepep.py.

n tokens on this rank, k experts per token, e local experts, m model dim, R EP ranks, T max tokens per rank,
p (token, expert) pairs sent, q rows received
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from dsr1.model.dispatch import check_chunk, group_by_expert, token_ranges, weighted_sum
from dsr1.parallel.dist import all_reduce_max, collective_device
from dsr1.parallel.placement import Placement


def ep_chunks(n_tokens: int, max_tokens: int, group: ProcessGroup | None, one_chunk: bool = False) -> list[tuple[int, int]]:
    """chunks() for an EP group: as many ranges as the busiest rank needs, so every rank (an idle one
    included, with empty ranges) joins the same number of dispatch/combine collectives. With one_chunk
    (set by `single_dispatch`) every rank has promised at most max_tokens, so no all-reduce is needed."""
    if one_chunk:
        check_chunk(n_tokens, max_tokens)
        return [(0, n_tokens)]
    return token_ranges(n_tokens, all_reduce_max(-(-n_tokens // max_tokens), group), max_tokens)


def check_group(placement: Placement, group: ProcessGroup | None) -> None:
    """The EP dispatchers' group must be the one the placement was made for."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if (size, rank) != (placement.ep_size, placement.ep_rank):
        raise ValueError(
            f"the process group has size {size} and this process is its rank {rank}, but the expert placement "
            f"was made for ep_size={placement.ep_size}, ep_rank={placement.ep_rank}"
        )


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
