"""The absorbed MLA computation equals the naive one (same weights), with and without a cache."""

import pytest
import torch

from dsr1.model.attention import MLA, HeadCache, LatentCache
from dsr1.model.transformer import Transformer
from tests.model.hf_oracle import PARITY_VOCAB, assert_rel, load_dsr1

TOL = 1e-5


@pytest.fixture(scope="module", params=[False, True], ids=["dequantized", "fp8-in-memory"])
def pair(request, make_checkpoint):
    """(absorbed MLA, naive MLA with the same weights, the model's rope table) from layer 1 of the tiny checkpoint."""
    model = load_dsr1(make_checkpoint({"vocab_size": PARITY_VOCAB}), fp8=request.param)
    absorb = model.layers[1].attn
    naive = MLA(model.cfg, fp8=request.param, impl="naive")
    naive.load_state_dict(absorb.state_dict())
    assert absorb.impl == "absorb"
    return absorb, naive, model.freqs_cis


def inputs(freqs_cis: torch.Tensor, positions: torch.Tensor, dim: int, cached: bool, seed: int = 0):
    """x [b, s, m] and the rope rows and keep mask for `positions` [b, s]."""
    x = torch.randn(*positions.shape, dim, generator=torch.Generator().manual_seed(seed))
    return x, positions, freqs_cis[positions], Transformer.attention_mask(positions, [] if cached else None)


def test_absorbed_equals_naive_without_cache(pair):
    absorb, naive, freqs_cis = pair
    args = inputs(freqs_cis, torch.arange(11).expand(3, -1), absorb.wo.out_dim, cached=False)
    with torch.no_grad():
        assert_rel(absorb(*args), naive(*args), TOL, "MLA absorb vs naive, no cache")


def test_absorbed_equals_naive_with_cache(pair):
    """Prefill 5 positions, a 3-position chunk, then 3 single steps; each step's output agrees."""
    absorb, naive, freqs_cis = pair
    caches = {
        "absorb": absorb.new_cache(2, 16, torch.float32, "cpu"),
        "naive": naive.new_cache(2, 16, torch.float32, "cpu"),
    }
    assert isinstance(caches["absorb"], LatentCache) and isinstance(caches["naive"], HeadCache)
    for step, (start, end) in enumerate([(0, 5), (5, 8), (8, 9), (9, 10), (10, 11)]):
        args = inputs(freqs_cis, torch.arange(start, end).expand(2, -1), absorb.wo.out_dim, cached=True, seed=step)
        with torch.no_grad():
            out_a = absorb(*args, cache=caches["absorb"])
            out_n = naive(*args, cache=caches["naive"])
        assert_rel(out_a, out_n, TOL, f"MLA absorb vs naive, cached positions {start}..{end - 1}")
