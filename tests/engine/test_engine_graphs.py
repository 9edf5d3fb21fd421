"""The serving engine's decode steps from CUDA graphs over the paged cache (dsr1/engine/paged_graphs.py) give the
tokens its eager decode gives; on CPU the graphs are declined (auto) or refused (on) with the reason."""

from __future__ import annotations

import pytest
import torch

from dsr1.engine.engine import Engine, EngineConfig, SamplingParams
from dsr1.kernels import w8a16
from dsr1.kernels.fp8_gemm import select_fp8_backend, use_fp8_gemm
from tests.kernels.test_fp8_gemm import tiny_fp8_model

GPU = torch.cuda.is_available() and w8a16.triton is not None


def test_graphs_declined_on_cpu():
    model = tiny_fp8_model("cpu", torch.float32)
    assert Engine(model, config=EngineConfig(num_blocks=64)).runner.graphs is None  # auto: none on CPU
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        Engine(model, config=EngineConfig(num_blocks=64, cuda_graphs="on"))
    with pytest.raises(ValueError, match="EngineConfig.cuda_graphs 'yes' is not one of"):
        EngineConfig(num_blocks=64, cuda_graphs="yes")
    with pytest.raises(ValueError, match="EngineConfig.decode_attention 'flash' is not one of"):
        EngineConfig(num_blocks=64, decode_attention="flash")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and Triton")
def test_engine_graph_decode_matches_eager():
    model = tiny_fp8_model("cuda", torch.bfloat16)
    use_fp8_gemm(model, select_fp8_backend("w8a16", "cuda"))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (5, 9, 3, 17, 30)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outputs = {}
    for mode in ("off", "on"):
        engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=128, max_num_seqs=4, cuda_graphs=mode))
        outputs[mode] = [o.token_ids for o in engine.generate(prompts, params)]  # 5 prompts, 4 rows at most: buckets 1-4
        if mode == "on":
            assert sorted(engine.runner.graphs.graphs) and max(engine.runner.graphs.graphs) == 4
            assert engine.stats().used_blocks == 0
    assert outputs["on"] == outputs["off"]
