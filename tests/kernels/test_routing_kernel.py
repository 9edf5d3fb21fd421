"""The routing kernel (dsr1/kernels/routing.py) against Gate's PyTorch path: same experts in the same
order, same weights, at R1's shape and on the worked examples of tests/model/test_routing.py (interpreted on CPU)."""

import dataclasses

import pytest
import torch

from dsr1.kernels import routing, w8a16
from dsr1.model.gate import Gate
from tests.model.test_routing import ALL_EXAMPLES, logits_of, small_config

pytestmark = pytest.mark.skipif(not w8a16.available(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                                reason="needs Triton (a GPU, or TRITON_INTERPRET=1 on CPU)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def r1_gate(n_experts=256, n_groups=8, topk_groups=4, top_k=8) -> Gate:
    cfg = dataclasses.replace(small_config(), n_routed_experts=n_experts, n_expert_groups=n_groups, n_limited_groups=topk_groups, n_activated_experts=top_k)
    return Gate(cfg).to(DEVICE)


@pytest.mark.parametrize("shape", [(256, 8, 4, 8), (64, 8, 3, 6), (16, 1, 1, 4)])
def test_kernel_routes_as_pytorch(shape):
    gate = r1_gate(*shape)
    assert gate.kernel
    gen = torch.Generator().manual_seed(0)
    gate.bias.copy_(0.1 * torch.randn(shape[0], generator=gen))
    logits = (2 * torch.randn(37, shape[0], generator=gen)).to(DEVICE)
    want_w, want_ids = gate.route(logits)
    got_w, got_ids = routing.route(logits, gate.bias, gate.n_groups, gate.topk_groups, gate.top_k, gate.route_scale)
    assert torch.equal(got_ids, want_ids)  # the same experts, in the same (descending) order
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scores,bias,expected,why", ALL_EXAMPLES)
def test_kernel_worked_examples(scores, bias, expected, why):
    gate = Gate(small_config()).to(DEVICE)
    gate.bias.copy_(torch.tensor(bias))
    logits = logits_of(scores).to(DEVICE)
    weights, ids = routing.route(logits, gate.bias, gate.n_groups, gate.topk_groups, gate.top_k, gate.route_scale)
    assert set(ids[0].tolist()) == expected, why
    chosen = torch.tensor(scores)[ids[0].cpu()]
    torch.testing.assert_close(weights[0].cpu(), chosen / chosen.sum() * gate.route_scale)


def test_shapes_the_kernel_refuses_stay_on_pytorch():
    assert not routing.supports(96, 8, 4, 8)  # 96 experts: not a power of two
    assert not routing.supports(256, 256, 4, 8)  # groups of one have no top-2
    assert not routing.supports(256, 8, 1, 40)  # one kept group of 32 cannot give 40 experts
    assert not r1_gate(96, 8, 4, 8).kernel
