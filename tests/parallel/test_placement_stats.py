"""Placement statistics on hand-checked routings, and synthetic routing obeying R1's group limit."""

import subprocess
import sys
from pathlib import Path

import torch

from dsr1.config import ModelConfig
from dsr1.parallel.placement import expert_placement
from dsr1.placement_stats import layer_load, synthetic_routing

ROOT = Path(__file__).resolve().parents[2]


def test_layer_load_by_hand():
    # 8 experts, EP=2; two tokens on rank 0 choosing experts {0,1} and {2,5}, one on rank 1 choosing {6,7}.
    ids = torch.tensor([[0, 1], [2, 5], [6, 7]])
    token_rank = torch.tensor([0, 0, 1])
    linear = layer_load(expert_placement(8, 2, 0, "linear"), ids, token_rank)  # ranks: 0-3 | 4-7
    assert linear.rank_load.tolist() == [3, 3]
    assert linear.cross_rank == 1  # expert 5 for token 1
    assert linear.ranks_touched.tolist() == [1, 2, 1]
    rr = layer_load(expert_placement(8, 2, 0, "round_robin"), ids, token_rank)  # even experts on rank 0
    assert rr.rank_load.tolist() == [3, 3]
    assert rr.cross_rank == 1 + 1 + 1  # experts 1, 5 to rank 1; expert 6 to rank 0
    assert rr.ranks_touched.tolist() == [2, 2, 2]
    assert linear.imbalance == rr.imbalance == 1.0


def test_synthetic_routing_respects_group_limit():
    cfg = ModelConfig.from_file(ROOT / "configs" / "deepseek-r1.json")
    ids = synthetic_routing(cfg, 512, skew=0.5)
    assert ids.shape == (512, cfg.n_activated_experts)
    groups = ids // (cfg.n_routed_experts // cfg.n_expert_groups)
    assert max(len(set(row)) for row in groups.tolist()) <= cfg.n_limited_groups
    assert all(len(set(row)) == cfg.n_activated_experts for row in ids.tolist())  # distinct experts


def test_skew_hurts_linear_not_round_robin():
    """At EP=8 each of R1's 8 groups is one rank under linear placement: group popularity = rank imbalance."""
    cfg = ModelConfig.from_file(ROOT / "configs" / "deepseek-r1.json")
    ids = synthetic_routing(cfg, 2048, skew=0.5)
    token_rank = torch.arange(2048) % 8
    linear = layer_load(expert_placement(256, 8, 0, "linear"), ids, token_rank)
    rr = layer_load(expert_placement(256, 8, 0, "round_robin"), ids, token_rank)
    assert linear.imbalance > 1.5 > 1.2 > rr.imbalance


def test_placement_report_script(tmp_path):
    out = tmp_path / "report.png"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "placement_report.py"), "--ep", "4", "--tokens", "256", "--layers", "2", "--out", str(out)],
        capture_output=True, text=True, check=True,
    )
    assert "round_robin" in res.stdout and "linear" in res.stdout
    assert out.stat().st_size > 1000
