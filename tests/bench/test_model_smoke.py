"""scripts/bench/model.py --smoke runs on CPU in seconds and reports every figure; dsr1 and HF hold the same weights."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts/bench/model.py"), "--smoke", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "decode b=1 ms/step" in run.stdout and "prefill 1x16 tok/s" in run.stdout
    r = json.loads(out.read_text())
    assert r["copy_bandwidth"] > 0
    assert r["dsr1"]["backend"] == "dequant"  # no FP8 matmul on CPU
    assert [p["tokens_per_s"] > 0 for p in r["dsr1"]["prefill"]] == [True, True]
    assert [d["batch"] for d in r["dsr1"]["decode"]] == [1, 2]
    # The floor counts exactly the experts the step routed to: top-4 of 16 in each of tiny.json's 3 MoE layers.
    assert [len(f["experts_per_layer"]) for f in r["floor"]] == [3, 3]
    assert all(f["experts_per_layer"] == [4, 4, 4] for f in r["floor"][:1])
    assert r["floor"][0]["bytes"]["total"] > r["floor"][0]["bytes"]["lm_head"] > 0
    # HF on the same weights (dequantized, fp32 on CPU) gives the same logits: the weight mapping is right.
    assert "error" not in r["hf"], r["hf"].get("traceback")
    assert r["hf"]["check_vs_dsr1"]["rel_err"] < 1e-4 and r["hf"]["check_vs_dsr1"]["greedy_agree"] == 1.0
    assert len(r["hf"]["decode"]) == 2


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
