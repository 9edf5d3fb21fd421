"""The absorbed MLA computation equals the naive one (same weights), with and without a cache; the einsums over
blocks of queries equal one block; the SDPA prefill kernel equals the einsums."""

import pytest
import torch

from dsr1.kernels.attention import SDPA, SDPAPrefill
from dsr1.model.attention import MLA, SCORE_BLOCK_BYTES, Causal, HeadCache, LatentCache
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
    """x [b, s, m] and the rope rows and causal mask for `positions` [b, s] (all rows at one start)."""
    x = torch.randn(*positions.shape, dim, generator=torch.Generator().manual_seed(seed))
    mask = Causal.cached(positions, int(positions.max()) + 1, aligned=True) if cached else Causal.own(positions)
    return x, positions, freqs_cis[positions], mask


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


def chunk_after_prefill(attn: MLA, freqs_cis: torch.Tensor, starts: list[int], chunk: int, dtype=torch.float32) -> torch.Tensor:
    """Prefill positions [0, 37) of two rows into a fresh cache, then run a chunk of `chunk` tokens at row i's start
    starts[i] against cache rows [0, max start + chunk); the chunk's output [2, chunk, m]."""
    cache = attn.new_cache(2, 96, dtype, "cpu")
    with torch.no_grad():
        attn(*inputs(freqs_cis, torch.arange(37).expand(2, -1), attn.wo.out_dim, cached=True), cache=cache)
        positions = torch.tensor(starts).unsqueeze(1) + torch.arange(chunk)  # [b, s]
        x = torch.randn(2, chunk, attn.wo.out_dim, generator=torch.Generator().manual_seed(5))
        mask = Causal.cached(positions, int(positions.max()) + 1, aligned=len(set(starts)) == 1)
        return attn(x, positions, freqs_cis[positions], mask, cache=cache)


@pytest.mark.parametrize("starts", [[37, 37], [37, 20]], ids=["aligned", "rows-at-different-positions"])
def test_query_blocks_equal_one_block(pair, starts):
    """The einsums over blocks of 3 queries (the byte budget shrunk) give what one block gives, per path."""
    for attn in pair[:2]:
        one = chunk_after_prefill(attn, pair[2], starts, 29)
        attn.score_bytes = 4 * 2 * attn.n_heads * 66 * 3  # [b, q, h, t] fp32 scores: 3 queries per block
        try:
            assert len(attn._query_blocks(torch.zeros(2, 29, attn.n_heads, 1), 66)) == 10
            blocks = chunk_after_prefill(attn, pair[2], starts, 29)
        finally:
            attn.score_bytes = SCORE_BLOCK_BYTES
        assert_rel(blocks, one, 1e-6, f"{attn.impl}: blocks of 3 queries vs one block, starts {starts}")


@pytest.mark.parametrize("starts", [[37, 37], [37, 20], [0, 0]], ids=["aligned", "rows-at-different-positions", "from-zero"])
def test_sdpa_prefill_equals_plain(pair, starts):
    """The SDPA prefill kernel (run here on CPU in fp32: torch's CPU backends) equals the plain path for a chunk at an
    offset against a cache, on the naive (per-head) and the absorbed (latent, expanded through wkv_b) caches."""
    for attn in pair[:2]:
        plain = chunk_after_prefill(attn, pair[2], starts, 29)
        attn.flash = SDPAPrefill(devices=("cpu",), dtypes=(torch.float32,))
        try:
            assert attn.flash.takes(torch.zeros(2, 29, attn.n_heads, 1))
            got = chunk_after_prefill(attn, pair[2], starts, 29)
        finally:
            attn.flash = SDPA
        assert_rel(got, plain, TOL, f"{attn.impl}: SDPA prefill vs plain, starts {starts}")


def test_sdpa_prefill_without_cache_and_not_for_decode(pair):
    """Without a cache (keys: the call's own tokens) SDPA equals the plain path; a decode step (s = 1) is not its."""
    flash = SDPAPrefill(devices=("cpu",), dtypes=(torch.float32,))
    assert not flash.takes(torch.zeros(2, 1, 4, 8)) and not flash.takes(torch.zeros(0, 5, 4, 8))
    assert not SDPA.takes(torch.zeros(2, 5, 4, 8))  # off on CPU by default
    args = inputs(pair[2], torch.arange(11).expand(3, -1), pair[0].wo.out_dim, cached=False)
    for attn in pair[:2]:
        with torch.no_grad():
            plain = attn(*args)
            attn.flash = flash
            try:
                got = attn(*args)
            finally:
                attn.flash = SDPA
        assert_rel(got, plain, TOL, f"{attn.impl}: SDPA vs plain, no cache")
