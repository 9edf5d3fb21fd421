"""Cached generation equals recomputation: token-by-token decode, and a right-padded batch of prompts
of different lengths decoded together with per-row start positions, equal full forwards row by row."""

import pytest
import torch

from tests.model.hf_oracle import PARITY_VOCAB, assert_rel, load_dsr1

TOL = 1e-5


@pytest.fixture(scope="module", params=["absorb", "naive"])
def model(request, make_checkpoint):
    return load_dsr1(make_checkpoint({"vocab_size": PARITY_VOCAB}), attn_impl=request.param)


def random_tokens(shape, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, PARITY_VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_cached_decode_equals_full_forward(model):
    """Prefill 5 tokens, one 3-token chunk at start_pos 5, then one token at a time up to 12."""
    tokens = random_tokens((2, 12))
    full = model(tokens)  # [b, s, v]
    cache = model.new_cache(2, 16)
    impl = model.layers[0].attn.impl
    assert_rel(model(tokens[:, :5], 0, cache), full[:, :5], TOL, f"{impl} prefill 0..4")
    assert_rel(model(tokens[:, 5:8], 5, cache), full[:, 5:8], TOL, f"{impl} chunk 5..7")
    for pos in range(8, 12):
        step = model(tokens[:, pos : pos + 1], pos, cache, logits_at=torch.zeros(2, dtype=torch.long))  # [b, v]
        assert_rel(step, full[:, pos], TOL, f"{impl} decode step {pos}")


@torch.no_grad()
def test_padded_batch_equals_rows_alone(model):
    """Prompts of lengths 6, 3, 9 right-padded into one batch: prefill, then 4 decode steps with start_pos [b]."""
    lengths = torch.tensor([6, 3, 9])
    prompts = [random_tokens((1, int(n)), seed=i) for i, n in enumerate(lengths)]
    steps = random_tokens((3, 4), seed=10)  # the tokens fed back in at each decode step
    impl = model.layers[0].attn.impl

    batch = torch.full((3, int(lengths.max())), PARITY_VOCAB - 1)  # pad id: any token, it must not leak
    for i, p in enumerate(prompts):
        batch[i, : p.shape[1]] = p[0]
    cache = model.new_cache(3, 16)
    logits = [model(batch, 0, cache, logits_at=lengths - 1)]  # [b, v] at each row's last prompt token
    for j in range(steps.shape[1]):
        logits.append(model(steps[:, j : j + 1], lengths + j, cache, logits_at=torch.zeros(3, dtype=torch.long)))

    for i, p in enumerate(prompts):
        alone = model(torch.cat([p, steps[i : i + 1]], dim=1))[0]  # [n + 4, v]: one full forward
        n = p.shape[1]
        for j, step_logits in enumerate(logits):
            assert_rel(step_logits[i], alone[n - 1 + j], TOL, f"{impl} padded row {i} (length {n}) step {j}")


@torch.no_grad()
def test_empty_batch(model):
    """An idle expert-parallel rank runs a batch of zero rows."""
    out = model(torch.zeros(0, 4, dtype=torch.long))
    assert out.shape == (0, 4, PARITY_VOCAB)
