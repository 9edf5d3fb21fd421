"""The mixture-of-experts layer: route -> dispatch -> expert compute -> combine, plus the shared expert.

The dispatcher is the only place expert parallelism enters: the router produces global expert ids,
the dispatcher moves tokens to whichever rank and slot holds them, and brings the results back. One token
on a process holding every expert (a batch-1 decode step on one GPU) needs no move: the expert kernels
read its k experts by id, and the outputs are summed as the combine sums them. Many tokens there (a prefill)
need none either, where the backend has a kernel for packed rows: the pairs are sorted by expert and each
expert's weights read once (Backend.packed_experts).

b batch, s positions, n tokens (b*s), m model dim, k experts per token
"""

import torch
from torch import Tensor, nn

from dsr1.config import ModelConfig
from dsr1.model.gate import Gate
from dsr1.model.mlp import MLP, GroupedExperts
from dsr1.model.dispatch import Dispatcher, group_by_expert, sum_choices, weighted_sum


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dispatcher: Dispatcher, fp8: bool):
        super().__init__()
        self.dispatcher = dispatcher
        self.gate = Gate(cfg)  # HF: mlp.gate
        self.experts = GroupedExperts(dispatcher.n_local_experts, cfg.dim, cfg.moe_inter_dim, fp8)  # HF: mlp.experts
        self.holds_all = dispatcher.n_local_experts == cfg.n_routed_experts  # then every routed pair is one of our tokens
        self.slot_is_id = dispatcher.local_expert_ids == list(range(cfg.n_routed_experts))  # one process, expert j in slot j
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, fp8) if cfg.n_shared_experts else None

    def forward(self, x: Tensor) -> Tensor:
        """x: [b, s, m] -> [b, s, m]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [n, m]
        weights, expert_ids = self.gate(x)  # [n, k] fp32, [n, k] global ids
        kernel = self.experts.kernel(x)  # the experts' fast path on x, None for their reference loop
        packed = self.experts.packed_kernel(x) if self.slot_is_id else None
        if packed is not None:
            # every expert here and many tokens (a prefill on one process): the routed pairs sorted by expert,
            # each expert's weights read once for all its rows; no dispatch buffer of [e, M, m]
            order, _, counts = group_by_expert(expert_ids, self.experts.n_local)  # order [n*k], counts [e]
            y = packed(x[order // self.gate.top_k], counts, *self.experts.weights())  # [n*k, m], sorted by expert
            y = weighted_sum(y, order, weights, x.dtype)  # [n, m]: the combine's sums
        elif self.slot_is_id and x.shape[0] == 1 and kernel is not None and kernel.takes_listed:
            # one token, every expert here (a batch-1 decode step): the kernel reads its k experts by id, no dispatch
            y = kernel.listed(x, expert_ids, *self.experts.weights())  # [k, m]
            y = sum_choices(y.unsqueeze(0), weights, x.dtype)  # [1, m]: the same sums as combine's
        else:
            y = torch.empty_like(x)
            for start, end in self.dispatcher.chunks(x.shape[0]):
                recv_x, counts, handle = self.dispatcher.dispatch(x[start:end], expert_ids[start:end], weights[start:end])
                max_active = (end - start) * self.gate.top_k if self.holds_all else None  # other ranks' tokens are not counted here
                y[start:end] = self.dispatcher.combine(self.experts(recv_x, counts, max_active), handle)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)
