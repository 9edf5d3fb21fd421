"""The routed experts on packed rows (kernels/experts.Contiguous: DeepGEMM's grouped GEMM on contiguous,
aligned segments) against the per-expert loop, and the MoE layer's packed path (a prefill on one process, no
dispatch) against its dispatch path. On CPU, DeepGEMM's call is emulated in torch from its documented contract
(tests below check the layout it is handed: e4m3 rows with 1x128 scales, segments aligned, -1 for padding
rows, whose outputs are NaN here so that reading one would show); on a GPU with deep_gemm built, the real one."""

import pytest
import torch
import torch.nn.functional as F

from dsr1.config import ModelConfig
from dsr1.fp8 import BLOCK, FP8_DTYPE, dequantize, quantize, quantize_activation
from dsr1.kernels.backend import Dequant
from dsr1.kernels.experts import Contiguous
from dsr1.model.dispatch import LocalDispatcher
from dsr1.model.moe import MoE

TOL = 1e-5


class FakeDeepGemm:
    """m_grouped_fp8_gemm_nt_contiguous as DeepGEMM documents it, in fp32 torch, checking what it is given."""

    def __init__(self, align: int):
        self.align, self.calls = align, 0

    def get_mk_alignment_for_contiguous_layout(self) -> int:
        return self.align

    def m_grouped_fp8_gemm_nt_contiguous(self, a, b, d, m_indices):
        (q, q_scale), (w, w_scale) = a, b
        rows, k = q.shape
        assert q.dtype == FP8_DTYPE and w.dtype == FP8_DTYPE and q_scale.shape == (rows, k // BLOCK)
        assert m_indices.dtype == torch.int32 and m_indices.shape == (rows,) and d.shape == (rows, w.shape[1])
        assert rows % self.align == 0, "the grouped GEMM's rows must be whole blocks"
        x = (q.float().view(rows, -1, BLOCK) * q_scale.unsqueeze(-1)).view(rows, k)  # [P, K]
        d.fill_(float("nan"))  # padding rows (-1) are not written by DeepGEMM: never to be read
        for g in m_indices.unique().tolist():
            if g < 0:
                continue
            where = (m_indices == g).nonzero().flatten()
            assert where[0] % self.align == 0 and where.numel() == where[-1] - where[0] + 1, f"expert {g}'s rows are not one aligned segment"
            d[where] = (x[where] @ dequantize(w[g], w_scale[g], torch.float32).t()).to(d.dtype)
        self.calls += 1


def quantized(x: torch.Tensor) -> torch.Tensor:
    """x as the FP8 GEMMs see it: e4m3 in 1x128 groups, dequantized in fp32."""
    q, s = quantize_activation(x)
    return (q.float().view(x.shape[0], x.shape[1] // BLOCK, BLOCK) * s.unsqueeze(-1)).view_as(x)


class QuantizedDequant(Dequant):
    """The dispatch path's twin of the packed kernel: activations quantized as the FP8 GEMMs quantize them, then
    the dequantized weight; and packed rows through `packed` (Contiguous on the emulated DeepGEMM)."""

    def __init__(self, packed: Contiguous | None):
        self.packed = packed

    def linear(self, x, weight, scale):
        return F.linear(quantized(x.reshape(-1, x.shape[-1])).view_as(x), dequantize(weight, scale, x.dtype))

    def packed_experts(self, x, fp8):
        return self.packed


def random_experts(n: int, dim: int, inter: int, gen: torch.Generator):
    """(weight [n, out, in] e4m3, scale) for w1, w2, w3 (HF gate, down, up)."""
    out = []
    for o, i in ((inter, dim), (dim, inter), (inter, dim)):
        pairs = [quantize(torch.randn(o, i, generator=gen) / 8) for _ in range(n)]
        out.append((torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])))
    return out


@pytest.mark.parametrize("align", [128, 8])
def test_contiguous_equals_loop(align):
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 130, 1, 128])  # an empty expert, one past a block, one exactly a block
    rows = torch.randn(int(counts.sum()), 256, generator=gen)
    w1, w2, w3 = random_experts(counts.numel(), 256, 128, gen)
    fake = FakeDeepGemm(align)
    got = Contiguous(fake)(rows, counts, w1, w2, w3)
    assert fake.calls == 3
    ref, start = torch.empty_like(rows), 0
    for j, n in enumerate(counts.tolist()):
        x = quantized(rows[start : start + n])
        h = F.silu(x @ dequantize(w1[0][j], w1[1][j], torch.float32).t()) * (x @ dequantize(w3[0][j], w3[1][j], torch.float32).t())
        ref[start : start + n] = quantized(h) @ dequantize(w2[0][j], w2[1][j], torch.float32).t()
        start += n
    assert torch.isfinite(got).all(), "a padding row's output was read"
    assert ((got - ref).norm() / ref.norm()).item() < TOL


@torch.no_grad()
def test_moe_packed_path_equals_dispatch():
    cfg = ModelConfig.from_hf({**_moe_config(), "hidden_size": 256, "moe_intermediate_size": 128})
    gen = torch.Generator().manual_seed(1)
    moe = MoE(cfg, LocalDispatcher(cfg.n_routed_experts, max_tokens=16), fp8=True)
    for name, (w, s) in zip(("w1", "w2", "w3"), random_experts(cfg.n_routed_experts, 256, 128, gen)):
        getattr(moe.experts, name).copy_(w)
        getattr(moe.experts, f"{name}_scale").copy_(s)
    for p in [moe.gate.weight, *moe.shared_experts.parameters()]:
        if p.dtype == FP8_DTYPE:
            p.copy_(quantize(torch.randn(p.shape, generator=gen) / 8)[0])
        else:
            p.copy_(torch.rand(p.shape, generator=gen) / 8)
    x = torch.randn(40, 256, generator=gen)  # [n, m]: 40 tokens, so the dispatch path runs 3 chunks

    fake = FakeDeepGemm(128)
    for module in moe.modules():
        if hasattr(module, "gemm"):
            module.gemm = QuantizedDequant(None)
    dispatched = moe(x)
    moe.experts.gemm = QuantizedDequant(Contiguous(fake))
    packed = moe(x)
    assert fake.calls == 3, "the packed path did not run"
    assert ((packed - dispatched).norm() / dispatched.norm()).item() < TOL


def _moe_config() -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parents[2] / "configs/tiny.json").read_text())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deepgemm_contiguous_on_gpu():
    """The real DeepGEMM grouped GEMM against the same loop, within the e4m3 activations' error."""
    deep_gemm = pytest.importorskip("deep_gemm")
    from dsr1.kernels.fp8_gemm import _self_check_experts

    assert _self_check_experts(Contiguous(deep_gemm), torch.device("cuda")) < 5e-2
