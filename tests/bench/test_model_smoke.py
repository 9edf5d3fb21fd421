"""scripts/bench/model.py --smoke runs on CPU in seconds and reports every figure (chunked prefill with TFLOPS, decode at
two contexts, per-row peak memory); dsr1 and HF hold the same weights."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts/bench/model.py"), "--smoke", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # Two tables: prefill (with TFLOPS and its share of the peak) and decode (with the context column).
    lines = run.stdout.splitlines()
    columns = {cells[0]: cells for cells in (re.split(r"\s{2,}", line.strip()) for line in lines) if cells[0] in ("prefill", "decode")}
    assert columns["prefill"] == ["prefill", "dsr1 tok/s", "TFLOPS", "% of peak", "peak GiB", "HF bf16-sdpa tok/s", "peak GiB", "HF time ÷ dsr1"]
    assert columns["decode"] == ["decode", "context", "dsr1 ms/step", "peak GiB", "floor ms (GB)", "dsr1 ÷ floor", "HF bf16-sdpa ms/step", "peak GiB", "HF time ÷ dsr1"]
    assert any(line.startswith("1x64 ") for line in lines) and any(line.split()[:2] == ["b=2", "32"] for line in lines)
    r = json.loads(out.read_text())
    assert {"command", "device", "date"} <= r["meta"].keys() and "--smoke" in r["meta"]["command"]
    assert r["meta"]["peak_fp8_tflops"] == 0.05 and "--peak-tflops" in r["meta"]["peak_source"]
    assert r["copy_bandwidth"] > 0
    assert r["dsr1"]["backend"] == "dequant"  # no FP8 matmul on CPU
    # Prefill: 1x64 in chunks of 16 through dsr1.engine.generation.prefill; tokens/s, FLOPs, TFLOPS and % of peak.
    assert r["dsr1"]["prefill_chunk"] == 16
    prefill = r["dsr1"]["prefill"]
    assert [(p["batch"], p["length"], p["status"]) for p in prefill] == [(1, 64, "ok"), (2, 16, "ok")]
    for p in prefill:
        assert p["tokens_per_s"] > 0 and p["flops"] > 0
        assert abs(p["tflops"] - p["flops"] / p["seconds"] / 1e12) < 1e-9 * p["tflops"]
        assert abs(p["pct_of_peak"] - 100 * p["tflops"] / 0.05) < 1e-6 * p["pct_of_peak"]
        assert "peak_memory" in p  # max_memory_allocated per row on a GPU; None on CPU
    # Decode: each batch at each context, and a floor per row that reads that context's cache.
    decode = r["dsr1"]["decode"]
    assert [(d["batch"], d["context"], d["status"]) for d in decode] == [(1, 8, "ok"), (2, 8, "ok"), (1, 32, "ok"), (2, 32, "ok")]
    assert all(d["ms_per_step"] > 0 and "peak_memory" in d for d in decode)
    floor = r["floor"]
    assert [(f["batch"], f["context"]) for f in floor] == [(1, 8), (2, 8), (1, 32), (2, 32)]
    # The floor counts exactly the experts the step routed to: top-4 of 16 in each of tiny.json's 3 MoE layers.
    assert [len(f["experts_per_layer"]) for f in floor] == [3, 3, 3, 3]
    assert all(f["experts_per_layer"] == [4, 4, 4] for f in floor[::2])  # batch 1
    assert floor[0]["bytes"]["total"] > floor[0]["bytes"]["lm_head"] > 0
    # Latent cache at the timed steps' mean position (context + warmup 1 + (steps 2 - 1) / 2), c + r = 80 wide, 4 layers, bf16.
    assert floor[0]["bytes"]["kv_cache"] == int(1 * (8 + 1.5 + 1) * 80 * 2 * 4)
    assert floor[3]["bytes"]["kv_cache"] == int(2 * (32 + 1.5 + 1) * 80 * 2 * 4)
    # HF on the same weights (bf16-sdpa: dequantized, fp32 on CPU) gives the same logits: the weight mapping is right.
    assert r["meta"]["hf_configs"] == ["bf16-sdpa"]
    hf = r["hf"]["bf16-sdpa"]
    assert "error" not in hf, hf.get("traceback")
    assert hf["attn_implementation"] == "sdpa" and hf["dtype"] == "float32" and not hf["fp8"]
    assert hf["check_vs_dsr1"]["rel_err"] < 1e-4 and hf["check_vs_dsr1"]["greedy_agree"] == 1.0
    assert [(p["batch"], p["length"], p["status"]) for p in hf["prefill"]] == [(1, 64, "ok"), (2, 16, "ok")]
    assert all(p["pct_of_peak"] > 0 for p in hf["prefill"])
    assert [(d["batch"], d["context"], d["status"]) for d in hf["decode"]] == [(1, 8, "ok"), (2, 8, "ok")]  # --hf-decode-contexts 8


def test_bench_load_smoke(tmp_path):
    """--load-only writes a checkpoint and reports the loader's rate next to the disk's and plain safetensors'."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts/bench/model.py"), "--smoke", "--load-only", "--load-dir", str(tmp_path / "ckpt"), "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cold load (page cache emptied by " in run.stdout
    ld = json.loads(out.read_text())["load"]
    assert ld["bytes"] > 0 and ld["evicted_by"] in ("drop_caches", "fadvise")
    assert min(ld["gb_per_s"], ld["disk_gb_per_s"], ld["safetensors_gb_per_s"]) > 0
