"""scripts/bench/ep_decode.py on CPU (gloo, torch dispatcher): every configuration times, and an EP rank's
random weights are one GPU's, expert for expert."""

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from bench_weights import fill_dsr1
from dsr1.checkpoint.loader import build_model
from dsr1.config import ModelConfig
from tests.parallel.test_ep_generate import torchrun

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.json"


def test_rank_holds_the_single_gpu_models_experts():
    cfg = ModelConfig.from_file(TINY)
    full = build_model(cfg, "cpu", torch.float32, fp8=True)
    fill_dsr1(full, cfg)
    ids = [3, 7, 11, 15]
    rank = build_model(cfg, "cpu", torch.float32, fp8=True, dispatcher=SimpleNamespace(n_local_experts=4, local_expert_ids=ids))
    fill_dsr1(rank, cfg, expert_ids=ids)
    layer = next(i for i, block in enumerate(full.layers) if hasattr(block.ffn, "experts"))
    for name in ("w1", "w2_scale"):
        for slot, e in enumerate(ids):
            got, want = getattr(rank.layers[layer].ffn.experts, name)[slot], getattr(full.layers[layer].ffn.experts, name)[e]
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (name, e)
    assert torch.equal(rank.layers[layer].attn.wo.weight.view(torch.uint8), full.layers[layer].attn.wo.weight.view(torch.uint8))


def test_bench_ep_decode_smoke(tmp_path):
    out = tmp_path / "ep.json"
    stdout = torchrun(2, "bench/ep_decode.py", "--config", str(TINY), "--all2all", "torch", "--batch", "1", "2",
                      "--steps", "2", "--warmup", "1", "--context", "8", "--json", str(out))  # fmt: skip
    assert "torch / this" in stdout
    r = json.loads(out.read_text())
    assert r["ep"] == 2 and len(r["rows"]) == 2 * 2 * 2  # placements x skews x batches
    assert all(row["ms_per_step"] > 0 and not row["cuda_graphs"] for row in r["rows"])
    assert {(row["placement"], row["skew"], row["batch_per_rank"]) for row in r["rows"]} == {
        (p, s, b) for p in ("linear", "round_robin") for s in (0.0, 0.5) for b in (1, 2)
    }
