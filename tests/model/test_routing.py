"""The R1 router: equal to transformers' DeepseekV3TopkRouter, and to a worked example computed by hand.

Worked example: 8 experts in 4 groups of 2 (g0 = e0 e1, g1 = e2 e3, g2 = e4 e5, g3 = e6 e7), keep
topk_group=2 groups, choose top_k=3 experts, route_scale 2.5. Groups are ranked by the sum of their
two best biased scores; experts are chosen by biased score inside the kept groups; mixing weights
are the *raw* sigmoid scores of the chosen experts, normalized, times route_scale.
"""

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from dsr1.config import ModelConfig
from dsr1.model.gate import Gate
from tests.model.hf_oracle import PARITY_VOCAB, load_dsr1, load_hf

BIAS = [0.0, 0.0, 0.4, 0.4, -0.3, -0.3, -0.5, -0.5]
# (raw sigmoid scores of one token, bias, expected expert ids in any order, why)
EXAMPLES = [
    (
        # biased: [.6 .5 | .7 .65 | .4 -.2 | .4 .35] -> group sums [1.1, 1.35, .2, .75]: keep g1, g0.
        # g3 holds the two highest raw scores (.9, .85) yet is masked; e1 (raw .5) loses to e2, e3 (raw .3, .25).
        [0.6, 0.5, 0.3, 0.25, 0.7, 0.1, 0.9, 0.85],
        BIAS,
        {2, 3, 0},
        "the bias steers selection but not the weights",
    ),
    (
        # biased: [.6 .45 | 1. .9 | .67 -.29 | -.4 -.4] -> sums [1.05, 1.9, .38, -.8]: keep g1, g0.
        # e4's biased .67 beats e0's .6, but its group is masked.
        [0.6, 0.45, 0.6, 0.5, 0.97, 0.01, 0.1, 0.1],
        BIAS,
        {2, 3, 0},
        "a masked expert outscores a kept one",
    ),
    (
        # A bias of -1 everywhere: every biased score is negative. Sums [-.9, -1.45, -1.2, -.25]: keep g3, g0.
        # Masked experts must be -inf (as official and HF 5.x): with 0 (HF <= 5.0) they would win.
        [0.6, 0.5, 0.3, 0.25, 0.7, 0.1, 0.9, 0.85],
        [-1.0] * 8,
        {6, 7, 0},
        "masked groups are -inf, not 0",
    ),
]
GROUP_SUM_EXAMPLE = (
    # Groups rank by their top-2 sum, not their max: sums g0 1.05, g2 .98, g1 .9 keep g0, g2 -> {4, 0, 1};
    # ranking by max (g2 .97, g1 .7, g0 .6) would keep g2, g1 -> {4, 2, 3}.
    [0.6, 0.45, 0.7, 0.2, 0.97, 0.01, 0.0001, 0.0001],
    [0.0] * 8,
    {0, 1, 4},
    "groups rank by their top-2 sum",
)
ALL_EXAMPLES = EXAMPLES + [GROUP_SUM_EXAMPLE]


def small_config() -> ModelConfig:
    """8 experts in 4 groups, topk_group 2, top-3; dim 8 so the gate weight can be the identity."""
    sizes = dict(vocab_size=16, hidden_size=8, intermediate_size=16, moe_intermediate_size=8, max_position_embeddings=16)
    attn = dict(num_attention_heads=1, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2)
    moe = dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    return ModelConfig.from_hf(dict(**sizes, **attn, **moe, num_hidden_layers=1, first_k_dense_replace=0))


def gate_for(bias: list[float]) -> Gate:
    """A Gate whose logits are its input (weight = I), so sigmoid(logit(s)) gives back scores s."""
    gate = Gate(small_config())
    gate.weight.data = torch.eye(8)
    gate.bias.copy_(torch.tensor(bias))
    return gate


def logits_of(scores: list[float]) -> torch.Tensor:
    s = torch.tensor(scores, dtype=torch.float64)
    return torch.log(s / (1 - s)).float().unsqueeze(0)  # [1, 8]


def expected_weights(scores: list[float], ids: set[int]) -> dict[int, float]:
    total = sum(scores[e] for e in ids)
    return {e: 2.5 * scores[e] / total for e in ids}


def sort_by_id(weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """weights [n, k] reordered by ascending expert id, so routings compare as sets."""
    return weights.gather(-1, expert_ids.argsort(dim=-1))


@pytest.mark.parametrize("scores, bias, ids, why", ALL_EXAMPLES, ids=[e[-1] for e in ALL_EXAMPLES])
def test_worked_example(scores, bias, ids, why):
    weights, expert_ids = gate_for(bias)(logits_of(scores))
    assert weights.dtype == torch.float32 and expert_ids.shape == (1, 3)
    assert set(expert_ids[0].tolist()) == ids, why
    want = expected_weights(scores, ids)
    for w, e in zip(weights[0].tolist(), expert_ids[0].tolist()):
        assert w == pytest.approx(want[e], rel=1e-5), why
    assert weights.sum().item() == pytest.approx(2.5, rel=1e-6)


def test_hf_router_agrees_on_the_worked_example():
    cfg = DeepseekV3Config(hidden_size=8, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5)
    hf = DeepseekV3TopkRouter(cfg)
    hf.weight.data = torch.eye(8)
    for scores, bias, ids, _ in ALL_EXAMPLES:
        hf.e_score_correction_bias.copy_(torch.tensor(bias))
        _, weights, expert_ids = hf(logits_of(scores))
        assert set(expert_ids[0].tolist()) == ids
        ours_w, ours_ids = gate_for(bias)(logits_of(scores))
        torch.testing.assert_close(sort_by_id(weights, expert_ids), sort_by_id(ours_w, ours_ids), rtol=1e-6, atol=0)


@pytest.mark.parametrize("overrides", [{}, {"n_group": 1, "topk_group": 1}], ids=["4-groups", "1-group"])
def test_routing_matches_hf(make_checkpoint, tmp_path, overrides):
    """Every MoE layer: same expert sets per token and the same weights as HF's router on the same inputs."""
    ckpt = make_checkpoint({**overrides, "vocab_size": PARITY_VOCAB})
    ours, hf = load_dsr1(ckpt), load_hf(ckpt, tmp_path)
    x = torch.randn(256, ours.cfg.dim, generator=torch.Generator().manual_seed(0))  # [n, m]
    n_used = 0
    for i, layer in enumerate(ours.layers):
        if not ours.cfg.is_moe_layer(i):
            continue
        weights, expert_ids = layer.ffn.gate(x)
        _, hf_weights, hf_ids = hf.model.layers[i].mlp.gate(x)
        assert torch.equal(expert_ids.sort(dim=-1).values, hf_ids.sort(dim=-1).values), f"layer {i}: expert sets differ"
        torch.testing.assert_close(sort_by_id(weights, expert_ids), sort_by_id(hf_weights, hf_ids), rtol=1e-6, atol=1e-7)
        n_used = max(n_used, expert_ids.unique().numel())
    assert n_used > ours.cfg.n_routed_experts // 2, "routing is degenerate: the test would not see wrong choices"
    assert ours.cfg.route_scale == hf.config.routed_scaling_factor
