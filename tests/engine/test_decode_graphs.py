"""CUDA-graph decode (dsr1/engine/decode_graphs.py): on a GPU, generation replaying graphs gives the tokens eager
decode gives, for batches that fill a bucket and batches that are padded into one; on CPU, the flag's errors."""

import pytest
import torch

from dsr1.config import GenerationConfig
from dsr1.engine.decode_graphs import DecodeGraphs, make_graphs
from dsr1.engine.generation import generate
from dsr1.kernels import w8a16
from dsr1.kernels.fp8_gemm import select_fp8_backend, use_fp8_gemm

GPU = torch.cuda.is_available() and w8a16.triton is not None


def test_cuda_graphs_on_cpu_say_why_not():
    from tests.kernels.test_fp8_gemm import tiny_fp8_model

    model = tiny_fp8_model("cpu", torch.float32)
    assert make_graphs(model, "auto", 64, 4) is None and make_graphs(model, "off", 64, 4) is None
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device, it is on cpu"):
        make_graphs(model, "on", 64, 4)
    with pytest.raises(ValueError, match="--cuda-graphs 'yes' is not one of"):
        make_graphs(model, "yes", 64, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("fp8_gemm", ["w8a16", "dequant"])
def test_graph_decode_matches_eager(fp8_gemm):
    from tests.kernels.test_fp8_gemm import tiny_fp8_model

    model = tiny_fp8_model("cuda", torch.bfloat16)
    use_fp8_gemm(model, select_fp8_backend(fp8_gemm, "cuda"))
    if fp8_gemm == "dequant":  # FP8 experts through the per-expert loop read counts on the host: no graphs
        with pytest.raises(ValueError, match="CUDA graphs need the masked expert kernel"):
            DecodeGraphs(model, 64)
        return
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    graphs = DecodeGraphs(model, 64, max_batch=4)
    for batch in (prompts[:1], prompts[:2], prompts):  # buckets 1 and 2 exactly, 3 rows padded into 4
        eager = generate(model, batch, GenerationConfig(12, eos_id=-1))
        replayed = generate(model, batch, GenerationConfig(12, eos_id=-1), graphs=graphs)
        assert replayed == eager, len(batch)
    assert sorted(graphs.graphs) == [1, 2, 4]


def test_compiled_blocks_trace_whole_and_once_per_kind():
    """The compiled decode block (DecodeGraphs(compile=True)) traces each block with no graph break, once
    per kind of block (dense, MoE) for all layers, and computes what the plain block computes."""
    from dsr1.engine.decode_graphs import decode_step, run_block
    from tests.kernels.test_fp8_gemm import tiny_fp8_model

    device = "cuda" if GPU else "cpu"
    model = tiny_fp8_model(device, torch.bfloat16)
    use_fp8_gemm(model, select_fp8_backend("w8a16", device))  # the masked expert kernel (interpreted on CPU)
    graphs = []

    def backend(gm, example_inputs):  # dynamo's graphs, run as traced
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(run_block, backend=backend, fullgraph=True, dynamic=False)
    tokens = torch.randint(2, 512, (2, 1), generator=torch.Generator().manual_seed(0)).to(device)
    start = torch.tensor([3, 7], device=device)
    caches = [model.new_cache(2, 16) for _ in range(2)]
    kinds = {type(layer.ffn).__name__ for layer in model.layers}
    with torch._dynamo.config.patch(recompile_limit=4):
        logits_at = torch.zeros(2, dtype=torch.long, device=device)
        eager = decode_step(model, tokens, start, caches[0], logits_at, 16)
        got = decode_step(model, tokens, start, caches[1], logits_at, 16, compiled)
        torch.testing.assert_close(eager, model(tokens, start, model.new_cache(2, 16), logits_at), rtol=1e-5, atol=1e-5)
    assert len(graphs) == len(kinds) == 2 and len(model.layers) > 2
    torch.testing.assert_close(got, eager, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and Triton")
def test_compiled_graph_decode_is_as_accurate_as_eager():
    """Compiled blocks must stay as close to the fp32 model's logits as eager bf16 is. Inductor's default
    (fp32 kept between fused ops where eager rounds) moved them 7x further on an H200; compiled_block asks
    it to round where eager rounds (fused reductions may still sum in another order)."""
    from bench_measure import Dsr1GraphRunner, Dsr1Runner, compare_logits, decode_step_logits
    from tests.kernels.test_fp8_gemm import tiny_fp8_model

    model = tiny_fp8_model("cuda", torch.bfloat16)
    use_fp8_gemm(model, select_fp8_backend("w8a16", "cuda"))
    with torch.inference_mode():
        ref = decode_step_logits(Dsr1Runner(tiny_fp8_model("cuda", torch.float32)), 16, 24, 512)
        eager = compare_logits(decode_step_logits(Dsr1Runner(model), 16, 24, 512), ref)
        compiled = compare_logits(decode_step_logits(Dsr1GraphRunner(model, compile=True), 16, 24, 512), ref)
    assert 0 < eager["rel_err"] < 2e-2, eager
    assert compiled["rel_err"] < 1.5 * eager["rel_err"] and compiled["greedy_agree"] >= eager["greedy_agree"] - 1 / 16, (compiled, eager)
