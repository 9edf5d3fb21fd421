"""scripts/bench/bench_measure.py: the prefill FLOP count, and the rows that are skipped or run out of memory."""

import torch

import bench_measure as measure
from dsr1.config import ModelConfig
from dsr1.model.transformer import Transformer


def test_prefill_flops_counts_the_weights_a_token_runs_through(tiny_config):
    """2 FLOPs per weight a token touches (attention projections, dense MLP; router, shared and top-k of the
    routed experts), lm_head once per row, and causal attention over (s + 1) / 2 keys on average."""
    cfg = ModelConfig.from_hf(tiny_config)
    with torch.device("meta"):
        model = Transformer(cfg, fp8=True)
    per_token = 0
    for layer in model.layers:
        per_token += sum(getattr(layer.attn, n).weight.numel() for n in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo"))
        ffn = layer.ffn
        if hasattr(ffn, "gate"):
            experts = sum(w.numel() for w in (ffn.experts.w1, ffn.experts.w2, ffn.experts.w3)) // cfg.n_routed_experts
            shared = sum(p.numel() for n, p in ffn.shared_experts.named_parameters() if n.endswith("weight"))
            per_token += ffn.gate.weight.numel() + shared + cfg.n_activated_experts * experts
        else:
            per_token += sum(p.numel() for n, p in ffn.named_parameters() if n.endswith("weight"))
    b, s = 3, 100
    d_qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attention = sum((j + 1) * 2 * cfg.n_heads * (d_qk + cfg.v_head_dim) for j in range(s)) * b * cfg.n_layers
    want = 2 * per_token * b * s + 2 * b * model.head.weight.numel() + attention
    got = measure.prefill_flops(cfg, b, s)
    assert got["total"] == want
    assert got["attention"] == attention and got["lm_head"] == 2 * b * cfg.dim * cfg.vocab_size


def test_peak_tflops_names_its_source():
    assert measure.peak_tflops("NVIDIA H200")[0] == 1979.0
    assert measure.peak_tflops("NVIDIA H100 80GB HBM3")[0] == 1979.0
    assert measure.peak_tflops("NVIDIA H100 PCIe")[0] == 1513.0
    tflops, source = measure.peak_tflops("NVIDIA H200")
    assert "datasheet" in source and "3,958" in source
    assert measure.peak_tflops("cpu") == (None, "no dense FP8 peak known for 'cpu'; give --peak-tflops")


def test_row_skipped_when_its_cache_cannot_fit():
    ran = []
    row = measure.run_row(lambda: ran.append(1) or {}, torch.device("cpu"), need_bytes=3 * 2**30, available=2**30, batch=64, context=131072)
    assert not ran
    assert row["status"] == "skipped" and row["message"] == "skipped: would need 3.0 GiB"
    assert row["batch"] == 64 and row["context"] == 131072 and row["peak_memory"] is None


def test_row_out_of_memory_does_not_raise():
    def fn():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 275.00 GiB\nmore")

    row = measure.run_row(fn, torch.device("cpu"), batch=1, length=131072)
    assert row["status"] == "out of memory" and row["message"] == "out of memory"
    assert row["error"] == "CUDA out of memory. Tried to allocate 275.00 GiB" and row["length"] == 131072


def test_row_ok():
    row = measure.run_row(lambda: {"tokens_per_s": 5.0}, torch.device("cpu"), need_bytes=10, batch=2, length=8)
    assert row == {"batch": 2, "length": 8, "need_bytes": 10, "available_bytes": None, "held_bytes": 0, "tokens_per_s": 5.0, "status": "ok", "peak_memory": None}
