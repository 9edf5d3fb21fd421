"""The paged, key-split decode attention kernel (dsr1/kernels/mla_decode.py) computes what MLA's absorbed
einsums compute over a row's gathered keys: softmax(scale * q . keys) . kv, for rows of different lengths,
keys scattered over the pool's blocks in any order, splits past a row's end, and heads not a multiple of the
kernel's block. On CPU in Triton's interpreter (fp32); on a GPU in bf16 against the bf16 einsums."""

from __future__ import annotations

import pytest
import torch

from dsr1.kernels import mla_decode

pytestmark = pytest.mark.skipif(mla_decode.triton is None, reason="needs Triton")


def reference(q, pool, table, lengths, scale, c):
    """The einsums of MLA.absorbed on each row's keys gathered from its blocks: [b, h, c]."""
    out = []
    for i, n in enumerate(lengths.tolist()):
        keys = pool[table[i]].flatten(0, 1)[:n].float()  # [t, c + r]
        probs = torch.softmax(scale * torch.einsum("hc,tc->ht", q[i].float(), keys), dim=-1)  # [h, t]
        out.append(torch.einsum("ht,tc->hc", probs, keys[:, :c]))
    return torch.stack(out)


def case(device, dtype, lengths, heads=20, c=64, r=16, page=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_table = -(-max(lengths) // page) + 1  # one entry more than the longest row needs (points anywhere)
    n_blocks = len(lengths) * n_table + 3
    pool = torch.randn(n_blocks, page, c + r, generator=gen)
    table = torch.randperm(n_blocks, generator=gen)[: len(lengths) * n_table].view(len(lengths), n_table)  # scattered blocks
    q = torch.randn(len(lengths), heads, c + r, generator=gen)
    to = dict(device=device)
    return q.to(dtype=dtype, **to), pool.to(dtype=dtype, **to), table.to(**to), torch.tensor(lengths, **to)


@pytest.mark.parametrize("lengths", [[1], [5, 40, 1, 17], [2500, 3]], ids=["one-key", "mixed", "several-splits"])
def test_kernel_equals_einsums_on_cpu(lengths):
    if not mla_decode.available(torch.device("cpu"), torch.float32):
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    q, pool, table, n = case("cpu", torch.float32, lengths)
    got = mla_decode.paged_decode(q, pool, table, n, 0.125, 64)
    ref = reference(q, pool, table, n, 0.125, 64)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_equals_einsums_on_gpu_at_r1_widths():
    q, pool, table, n = case("cuda", torch.bfloat16, [1, 700, 5000, 33000], heads=128, c=512, r=64, page=64)
    got = mla_decode.paged_decode(q, pool, table, n, 0.07, 512).float()
    ref = reference(q, pool, table, n, 0.07, 512)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2  # bf16 inputs and probabilities


def test_engine_decodes_through_the_kernel_as_through_gathered_blocks(make_checkpoint):
    """The serving engine on the tiny model (fp32, CPU), its decode steps through the kernel (interpreted) against
    the same engine gathering each row's blocks: the same greedy tokens, their logprobs within 1e-4."""
    if not mla_decode.available(torch.device("cpu"), torch.float32):
        pytest.skip("needs TRITON_INTERPRET=1")
    from dsr1 import load_model
    from dsr1.engine.engine import Engine, EngineConfig, SamplingParams
    from dsr1.kernels.attention import PagedDecode, use_paged_decode

    model = load_model(make_checkpoint(), device="cpu", dtype=torch.float32, progress=False)
    prompts = [[0, *range(5, 5 + n)] for n in (3, 30, 11)]
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=0)
    config = EngineConfig(block_size=4, num_blocks=64)
    gathered = Engine(model, config=config).generate(prompts, params)
    engine = Engine(model, config=config)
    calls = []
    kernel = PagedDecode(devices=("cpu",))
    decode = kernel.decode
    kernel.decode = lambda *a: calls.append(1) or decode(*a)
    use_paged_decode(model, kernel)
    try:
        paged = engine.generate(prompts, params)
    finally:
        use_paged_decode(model, PagedDecode(devices=()))
    assert calls, "the kernel never ran"
    assert [o.token_ids for o in paged] == [o.token_ids for o in gathered]
    for a, b in zip(paged, gathered):
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in a.logprobs]), torch.tensor([lp.logprob for lp in b.logprobs]), rtol=1e-4, atol=1e-4)


def test_static_decode_through_the_kernel_equals_the_einsums(make_checkpoint):
    """generation's contiguous latent cache read in place by the kernel (each row one block of the whole cache):
    a decode step's logits for rows at different positions equal the einsums' within 1e-4 (fp32, interpreted)."""
    if not mla_decode.available(torch.device("cpu"), torch.float32):
        pytest.skip("needs TRITON_INTERPRET=1")
    from dsr1 import load_model
    from dsr1.kernels.attention import GATHER, PagedDecode, use_paged_decode

    model = load_model(make_checkpoint(), device="cpu", dtype=torch.float32, progress=False)
    tokens = torch.randint(2, 500, (3, 20), generator=torch.Generator().manual_seed(4))
    step = torch.randint(2, 500, (3, 1), generator=torch.Generator().manual_seed(5))
    start = torch.tensor([20, 7, 13])  # each row's decode position (rows 1 and 2 attend to fewer cached keys)
    logits = []
    for kernel in (GATHER, PagedDecode(devices=("cpu",))):
        use_paged_decode(model, kernel)
        cache = model.new_cache(3, 32)
        with torch.inference_mode():
            model(tokens, 0, cache, logits_at=torch.zeros(3, dtype=torch.long))
            logits.append(model(step, start, cache, logits_at=torch.zeros(3, dtype=torch.long)))
    use_paged_decode(model, GATHER)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
