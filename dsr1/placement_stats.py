"""Load statistics of an expert placement: how routed tokens spread over EP ranks.

Inputs are routing decisions (global expert ids per token) and the EP rank each token lives on
(attention is data-parallel, so every token starts on some rank). DeepEP's low-latency dispatch sends
one copy of a token per chosen expert, so loads count (token, expert) pairs.

n tokens, k experts per token, R EP ranks
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsr1.config import ModelConfig
from dsr1.model.gate import Gate
from dsr1.parallel.placement import Placement, expert_placement


@dataclass
class LayerLoad:
    """One MoE layer's traffic under one placement."""

    rank_load: Tensor  # [R] (token, expert) pairs each rank computes
    cross_rank: int  # pairs whose expert lives on another rank than the token
    ranks_touched: Tensor  # [n] distinct ranks each token is sent to

    @property
    def imbalance(self) -> float:
        """max / mean rank load: 1.0 is perfect balance; the slowest rank sets the step time."""
        return float(self.rank_load.max() / self.rank_load.float().mean().clamp(min=1e-9))


def expert_rank(placement: Placement, expert_ids: Tensor) -> Tensor:
    """Global expert ids [n, k] -> the EP rank holding each [n, k] (DeepEP: physical id // L)."""
    return placement.global_to_physical[expert_ids] // placement.n_local


def layer_load(placement: Placement, expert_ids: Tensor, token_rank: Tensor) -> LayerLoad:
    """expert_ids: [n, k] global ids; token_rank: [n] the rank each token starts on."""
    dest = expert_rank(placement, expert_ids)  # [n, k]
    rank_load = torch.bincount(dest.flatten(), minlength=placement.ep_size)
    cross = int((dest != token_rank.unsqueeze(1)).sum())
    touched = torch.zeros(dest.shape[0], placement.ep_size, dtype=torch.bool).scatter_(1, dest, True).sum(1)
    return LayerLoad(rank_load, cross, touched)


def compare_placements(
    layers: list[Tensor], token_rank: Tensor, n_experts: int, ep_size: int, strategies=("linear", "round_robin")
) -> dict[str, list[LayerLoad]]:
    """Per strategy, the load of every MoE layer's routing (layers: list of [n, k] global ids)."""
    placements = {s: expert_placement(n_experts, ep_size, 0, s) for s in strategies}
    return {s: [layer_load(p, ids, token_rank) for ids in layers] for s, p in placements.items()}


def synthetic_routing(cfg: ModelConfig, n_tokens: int, skew: float, seed: int = 0) -> Tensor:
    """Route random tokens with R1's router semantics; `skew` > 0 makes some expert groups popular.

    Scores are sigmoid(noise + skew * log-popularity), where whole groups share a Zipf-like popularity
    (a batch on one topic favours some groups): 0 is uniform. Returns global expert ids [n, k].
    """
    gen = torch.Generator().manual_seed(seed)
    gate = Gate(cfg)
    group_size = cfg.n_routed_experts // cfg.n_expert_groups
    group_rank = torch.randperm(cfg.n_expert_groups, generator=gen).repeat_interleave(group_size)  # [e]
    popularity = -torch.log1p(group_rank.float())  # Zipf(1) over groups, in log space
    logits = torch.randn(n_tokens, cfg.n_routed_experts, generator=gen) + skew * popularity
    choice = gate.limit_groups(torch.sigmoid(logits))
    return choice.topk(cfg.n_activated_experts, dim=-1).indices
