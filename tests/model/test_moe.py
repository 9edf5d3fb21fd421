"""The MoE layer through LocalDispatcher (sort by expert, grouped compute, weighted combine) equals
a plain loop: for each token, sum_k w_k * expert_k(x) + shared(x) — with and without chunking."""

import pytest
import torch
import torch.nn.functional as F

from dsr1.model.moe import MoE
from dsr1.model.dispatch import LocalDispatcher
from tests.model.hf_oracle import PARITY_VOCAB, assert_rel, load_dsr1

TOL = 1e-5


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return load_dsr1(make_checkpoint({"vocab_size": PARITY_VOCAB}))


def swiglu(x, w1, w2, w3):
    """w2(silu(w1 x) * w3 x) for one token x [m]."""
    return w2 @ (F.silu(w1 @ x) * (w3 @ x))


def loop_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """x [n, m] -> [n, m], one token and one chosen expert at a time."""
    weights, expert_ids = moe.gate(x)  # [n, k], [n, k]
    experts, shared = moe.experts, moe.shared_experts
    slots = moe.dispatcher.local_expert_ids
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        out[t] = swiglu(x[t], shared.w1.weight, shared.w2.weight, shared.w3.weight)
        for w, e in zip(weights[t].tolist(), expert_ids[t].tolist()):
            j = slots.index(e)
            out[t] += w * swiglu(x[t], experts.w1[j], experts.w2[j], experts.w3[j])
    return out


def moe_with(model, max_tokens: int, layer: int = 1) -> MoE:
    """Layer `layer`'s MoE with its weights, behind a LocalDispatcher that sends at most max_tokens per chunk."""
    moe = MoE(model.cfg, LocalDispatcher(model.cfg.n_routed_experts, max_tokens=max_tokens), fp8=False)
    moe.load_state_dict(model.layers[layer].ffn.state_dict())
    return moe


@torch.no_grad()
@pytest.mark.parametrize("max_tokens", [128, 3], ids=["one-chunk", "chunks-of-3"])
def test_moe_equals_loop_over_experts(model, max_tokens):
    x = torch.randn(2, 11, model.cfg.dim, generator=torch.Generator().manual_seed(0))  # [b, s, m], n = 22
    moe = moe_with(model, max_tokens)
    assert len(moe.dispatcher.chunks(22)) == -(-22 // max_tokens)
    _, expert_ids = moe.gate(x.view(-1, model.cfg.dim))
    assert expert_ids.unique().numel() > model.cfg.n_routed_experts // 2, "too few experts used to test dispatch"
    ref = loop_moe(moe, x.view(-1, model.cfg.dim)).view_as(x)
    assert_rel(moe(x), ref, TOL, f"MoE via LocalDispatcher(max_tokens={max_tokens}) vs loop")


@torch.no_grad()
def test_chunked_equals_unchunked(model):
    x = torch.randn(40, model.cfg.dim, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(moe_with(model, 7)(x), moe_with(model, 128)(x), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_no_tokens(model):
    assert moe_with(model, 3)(torch.zeros(0, model.cfg.dim)).shape == (0, model.cfg.dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_kernel_equals_the_loop(dtype):
    """The packed grouped-matmul kernel computes what the per-expert reference loop computes, empty experts included."""
    from dsr1.kernels.experts import GROUPED
    from dsr1.model.mlp import GroupedExperts

    experts = GroupedExperts(5, 64, 32, fp8=False).to(dtype)
    gen = torch.Generator().manual_seed(0)
    for p in experts.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    x = torch.randn(5, 9, 64, generator=gen).to(dtype)
    counts = torch.tensor([3, 0, 9, 1, 4], dtype=torch.int32)
    assert experts.kernel(x) is None  # on CPU the plain backend runs the loop
    want = experts(x, counts)
    torch.testing.assert_close(GROUPED(x, counts, None, *experts.weights()), want, rtol=1e-5, atol=1e-5)
    assert want[1].abs().sum() == 0 and want[0, 3:].abs().sum() == 0  # rows past each count stay zero
