"""Peak host memory while loading stays near the model's own size: each tensor's bytes are read straight
into its parameter (dsr1/checkpoint/reader.py), and no state dict or whole shard is held in memory. (A
loader that reads a full state dict first, or keeps every shard mapped, peaks at about twice the model.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsr1.checkpoint.synthetic as synthetic

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.json"

MEASURE = """
import json, sys, torch
from dsr1 import load_model
from dsr1.checkpoint.loader import Checkpoint, build_model

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

build_model(Checkpoint(sys.argv[1]).config, "cpu", torch.bfloat16, False)  # imports and allocator warm-up
before = rss()
model = load_model(sys.argv[1], device="cpu", dtype=torch.bfloat16, progress=False)
# VmHWM, this process's own high-water mark: getrusage's ru_maxrss also keeps the parent's RSS from before exec
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"model": sum(t.nbytes for t in model.state_dict().values()), "peak": peak - before}))
"""


@pytest.mark.slow  # a fresh interpreter: ~5 s of imports
def test_peak_host_memory_is_near_the_model_size(tmp_path, monkeypatch):
    # ~330 MB of weights, mostly routed experts, in 16 shards (large against the interpreter's own allocations);
    # the values do not matter, so zeros are written (fast).
    raw = {**json.loads(TINY_CONFIG.read_text()), "vocab_size": 512, "hidden_size": 1024, "moe_intermediate_size": 1024,
           "n_routed_experts": 16, "num_nextn_predict_layers": 0}
    monkeypatch.setattr(synthetic, "random_tensor", lambda spec, gen, n_layers: torch.zeros(spec.shape, dtype=torch.bfloat16))
    path = synthetic.write_checkpoint(raw, tmp_path / "ckpt", dtype="bf16", shards=16)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=True)
    sizes = json.loads(out.stdout.strip().splitlines()[-1])
    assert sizes["model"] > 256 * 2**20
    assert sizes["peak"] < 1.25 * sizes["model"], f"peak {sizes['peak'] / 2**20:.0f} MiB over {sizes['model'] / 2**20:.0f} MiB of model"
