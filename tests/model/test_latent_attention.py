"""The decode-step MLA attention kernel (dsr1/model/latent_attention.py) against the einsum path's math in fp32:
masked positions (per row, whole masked slices and tiles), one and several position slices (the merge of
partials), heads not filling a block, and MLA's absorbed decode with the kernel vs the einsums. On CPU the
kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import pytest
import torch

from dsr1.model import latent_attention as la
from dsr1.model.w8a16 import _ARRIVALS

pytestmark = pytest.mark.skipif(la.triton is None, reason="needs Triton (pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-2  # probabilities meet the cache in bf16 (2^-9 relative each) and the output is bf16


def reference(q, keys, keep, c, scale):
    """The einsum path's function in fp32: softmax(scale * q . keys, masked) @ kv."""
    scores = torch.einsum("bshc,btc->bsht", q.float(), keys.float()) * scale
    probs = scores.masked_fill(~keep.unsqueeze(2), float("-inf")).softmax(-1)
    return torch.einsum("bsht,btc->bshc", probs, keys[..., :c].float())


@pytest.mark.parametrize("t,positions,slices", [(37, [36, 5], None), (200, [199, 70], None), (200, [199, 3], 1), (96, [95, 40], 3)])
def test_matches_the_einsum_math(t, positions, slices, monkeypatch):
    """Rows at different positions (row 1 sees a prefix only: later tiles and slices are all masked)."""
    if slices is not None:  # force the number of position slices: 1 (no merge) or several
        monkeypatch.setattr(la, "TARGET_PROGRAMS", slices * 2 * 2)  # b = 2 rows x 2 head blocks
    b, h, c, r = 2, 20, 64, 16
    gen = torch.Generator().manual_seed(t)
    q = torch.randn(b, 1, h, c + r, generator=gen).to(DEVICE, torch.bfloat16)
    keys = torch.randn(b, t, c + r, generator=gen).to(DEVICE, torch.bfloat16)
    keep = torch.arange(t, device=DEVICE)[None, None, :] <= torch.tensor(positions, device=DEVICE)[:, None, None]  # [b, 1, t]
    got = la.latent_attention(q, keys, keep, c, 0.125)
    assert got.shape == (b, 1, h, c) and got.dtype == torch.bfloat16
    want = reference(q, keys, keep, c, 0.125)
    assert ((got.double() - want.double()).norm() / want.double().norm()).item() < TOL
    if DEVICE in _ARRIVALS:
        assert not _ARRIVALS[torch.device(DEVICE)].any()  # counters back at zero for the next call


def test_bad_shapes_are_refused():
    q = torch.zeros(1, 2, 16, 80, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q \\[b, 1, h, c \\+ r\\]"):
        la.latent_attention(q, torch.zeros(1, 8, 80, dtype=torch.bfloat16), torch.ones(1, 2, 8, dtype=torch.bool), 64, 1.0)


def test_mla_decode_with_the_kernel_matches_the_einsums(monkeypatch):
    """A bf16 MLA decoding one position from a cache: the kernel (forced on CPU) vs the einsum path."""
    from dsr1.config import ModelConfig
    from dsr1.model.attention import MLA
    from dsr1.model.rope import precompute_freqs_cis
    from dsr1.model.transformer import Transformer

    cfg = ModelConfig.from_file("configs/tiny.json")
    torch.manual_seed(0)
    attn = MLA(cfg, fp8=False)
    for p in attn.parameters():
        p.data.normal_(0, 0.05)
    attn = attn.to(DEVICE, torch.bfloat16)
    freqs_cis = precompute_freqs_cis(cfg, 64).to(DEVICE)
    cache = attn.new_cache(2, 64, torch.bfloat16, DEVICE)
    prefix = torch.arange(9, device=DEVICE).expand(2, -1)
    x = torch.randn(2, 10, cfg.dim, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        attn(x[:, :9], prefix, freqs_cis[prefix], Transformer.attention_mask(prefix, [], 9), cache)
        step = torch.full((2, 1), 9, device=DEVICE)
        args = (x[:, 9:], step, freqs_cis[step], Transformer.attention_mask(step, [], 10), cache)
        monkeypatch.setattr(la, "used_for", lambda q: False)
        want = attn(*args)
        monkeypatch.setattr(la, "used_for", lambda q: q.shape[1] == 1)
        got = attn(*args)
    assert ((got.double() - want.double()).norm() / want.double().norm()).item() < TOL
