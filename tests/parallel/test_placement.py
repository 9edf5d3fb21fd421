import pytest
import torch

import dsr1
from dsr1.parallel.placement import expert_placement


def test_round_robin_e8_ep4_by_hand():
    p = expert_placement(8, 4, 1, "round_robin")
    assert p.local_expert_global_ids.tolist() == [1, 5]
    assert p.global_to_physical.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert p.physical_to_global.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert (p.n_experts, p.n_local, p.ep_size, p.ep_rank, p.strategy) == (8, 2, 4, 1, "round_robin")
    assert p.global_to_physical.dtype == p.local_expert_global_ids.dtype == torch.int64


def test_round_robin_e8_ep2_matches_vllm_table():
    p0, p1 = (expert_placement(8, 2, r, "round_robin") for r in (0, 1))
    assert p0.global_to_physical.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert p0.physical_to_global.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert p0.local_expert_global_ids.tolist() == [0, 2, 4, 6]
    assert p1.local_expert_global_ids.tolist() == [1, 3, 5, 7]


def test_linear_is_identity_with_contiguous_ranges():
    p = expert_placement(16, 4, 2, "linear")
    assert p.global_to_physical.tolist() == list(range(16)) == p.physical_to_global.tolist()
    assert p.local_expert_global_ids.tolist() == [8, 9, 10, 11]


def test_r1_round_robin_spreads_every_group_over_every_rank():
    # 8 groups of 32 experts at EP=8: linear puts a whole group on one rank, round-robin 4 of each on every rank.
    for strategy, per_rank in (("linear", {32, 0}), ("round_robin", {4})):
        for r in range(8):
            local = expert_placement(256, 8, r, strategy).local_expert_global_ids
            assert set(torch.bincount(local // 32, minlength=8).tolist()) == per_rank


@pytest.mark.parametrize("strategy", ["linear", "round_robin"])
@pytest.mark.parametrize("n_experts,ep_size", [(8, 1), (8, 2), (8, 4), (16, 4), (256, 16), (12, 3)])
def test_tables_are_consistent(strategy, n_experts, ep_size):
    n_local = n_experts // ep_size
    held = []
    for r in range(ep_size):
        p = expert_placement(n_experts, ep_size, r, strategy)
        g2p, p2g = p.global_to_physical, p.physical_to_global
        assert torch.equal(p2g[g2p], torch.arange(n_experts)) and torch.equal(g2p[p2g], torch.arange(n_experts))
        local = p.local_expert_global_ids
        # Local slot j of rank r is physical id r * L + j: where DeepEP LL delivers it.
        assert torch.equal(g2p[local], torch.arange(r * n_local, (r + 1) * n_local))
        held += local.tolist()
    assert sorted(held) == list(range(n_experts))  # every expert once: disjoint and complete


def test_to_physical_maps_ids_and_keeps_minus_one():
    p = expert_placement(8, 4, 0, "round_robin")
    ids = torch.tensor([[0, 7, -1], [4, 1, 2]])
    assert p.to_physical(ids).tolist() == [[0, 7, -1], [1, 2, 4]]


def test_exported_from_package():
    assert "expert_placement" in dsr1.__all__ and dsr1.expert_placement is expert_placement
    # Called through the package: 8 experts over 4 ranks, rank 1 (the worked example above).
    rr = dsr1.expert_placement(8, 4, 1, "round_robin")
    assert rr.local_expert_global_ids.tolist() == [1, 5] and rr.global_to_physical.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    linear = dsr1.expert_placement(8, 4, 1)  # linear is the default strategy
    assert linear.strategy == "linear" and linear.local_expert_global_ids.tolist() == [2, 3]
    assert linear.global_to_physical.tolist() == list(range(8))


def test_errors():
    with pytest.raises(ValueError, match=r"n_routed_experts=10 is not divisible by ep_size=4.*\[1, 2, 5, 10\]"):
        expert_placement(10, 4, 0, "linear")
    with pytest.raises(ValueError, match=r"n_routed_experts=256 is not divisible by ep_size=3"):
        expert_placement(256, 3, 0, "round_robin")
    with pytest.raises(ValueError, match=r"strategy='zigzag' is not one of \('linear', 'round_robin'\)"):
        expert_placement(8, 2, 0, "zigzag")
    with pytest.raises(ValueError, match=r"ep_rank=2 is out of range for ep_size=2"):
        expert_placement(8, 2, 2, "linear")
    with pytest.raises(ValueError, match=r"ep_rank=-1 is out of range"):
        expert_placement(8, 2, -1, "linear")
    with pytest.raises(ValueError, match=r"ep_size=0 must be >= 1"):
        expert_placement(8, 0, 0, "linear")
