"""The MoE router exactly as DeepSeek-R1 (`scoring_func=sigmoid`, `topk_method=noaux_tc`).

n tokens, m model dim, e routed experts, g expert groups, k experts per token
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr1.config import ModelConfig
from dsr1.kernels import routing


class Gate(nn.Module):
    """Group-limited top-k routing (HF: mlp.gate): x [n, m] -> mixing weights [n, k] fp32, expert_ids [n, k]."""

    fp32_params = ("weight",)  # the router matmul runs in fp32 (as HF's): the bf16 checkpoint weight is widened once, at load

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.n_activated_experts
        self.n_groups, self.topk_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.route_scale = cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim, dtype=torch.float32), requires_grad=False)  # HF: mlp.gate.weight
        # HF: mlp.gate.e_score_correction_bias; kept in fp32 whatever the run dtype.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        # On CUDA, `route` runs as one kernel (dsr1/kernels/routing.py): the same function in one launch, not a dozen.
        self.kernel = routing.router(cfg.n_routed_experts, self.n_groups, self.topk_groups, self.top_k, self.route_scale)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Choose k experts per token. x: [n, m] -> weights [n, k] fp32, expert_ids [n, k] int64 (global ids)."""
        logits = F.linear(x.float(), self.weight.float())  # [n, e]
        if self.kernel is not None and self.kernel.takes(logits):
            return self.kernel(logits, self.bias)
        return self.route(logits)

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Router logits [n, e] fp32 -> weights [n, k] fp32, expert_ids [n, k], in PyTorch."""
        scores = torch.sigmoid(logits)
        # The bias only steers which experts are chosen; mixing weights use the raw scores.
        choice = self.limit_groups(scores + self.bias)  # [n, e], -inf outside the kept groups
        expert_ids = choice.topk(self.top_k, dim=-1).indices  # [n, k]
        weights = scores.gather(-1, expert_ids)  # [n, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, expert_ids

    def limit_groups(self, scores: Tensor) -> Tensor:
        """Keep the `topk_group` groups with the largest top-2 score sum; mask the rest with -inf."""
        n = scores.shape[0]
        grouped = scores.view(n, self.n_groups, scores.shape[-1] // self.n_groups)  # [n, g, e/g]
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [n, g]
        kept = group_scores.topk(self.topk_groups, dim=-1).indices  # [n, topk_group]
        drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)  # [n, g]
        return grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
