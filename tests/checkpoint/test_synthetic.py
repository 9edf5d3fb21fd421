"""Synthetic checkpoints: R1's exact layout, byte-balanced shards, well-conditioned activations and a
router that spreads tokens over all experts."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsr1 import load_model
from dsr1.fp8 import FP8_DTYPE
from dsr1.checkpoint.hf_names import checkpoint_tensors
from dsr1.checkpoint.loader import INDEX_FILE
from dsr1.checkpoint.reader import SAFETENSORS_DTYPES
from dsr1.checkpoint.synthetic import split_points, write_checkpoint
from dsr1.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def headers(path: Path) -> dict[str, tuple[str, tuple[int, ...], torch.dtype]]:
    """name -> (shard, shape, dtype) for every tensor in every shard file of the directory."""
    out = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (shard.name, tuple(sl.get_shape()), SAFETENSORS_DTYPES[sl.get_dtype()])
    return out


def test_fp8_layout_is_r1s(small_checkpoint):
    path = small_checkpoint("fp8", shards=5)
    raw = json.loads((path / "config.json").read_text())
    assert raw["quantization_config"]["weight_block_size"] == [128, 128]
    cfg = ModelConfig.from_hf(raw)
    index = json.loads((path / INDEX_FILE).read_text())
    found = headers(path)
    assert {n: s for n, (s, _, _) in found.items()} == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in found.values())
    assert sorted(set(index["weight_map"].values())) == [f"model-{i:05d}-of-000005.safetensors" for i in range(1, 6)]
    specs = checkpoint_tensors(cfg, fp8=True, mtp=True)
    assert {s.hf_name: (s.shape, s.dtype) for s in specs} == {n: (shape, dtype) for n, (_, shape, dtype) in found.items()}
    # R1's: e4m3 projections with fp32 scales; bf16 router and MTP eh_proj; fp32 router bias; an MTP layer.
    assert found["model.layers.1.mlp.experts.15.down_proj.weight"][2] == FP8_DTYPE
    assert found["model.layers.1.mlp.experts.15.down_proj.weight_scale_inv"][1:] == ((2, 1), torch.float32)
    assert found["model.layers.1.mlp.gate.weight"][2] == torch.bfloat16
    assert found["model.layers.1.mlp.gate.e_score_correction_bias"][2] == torch.float32
    assert found["model.layers.4.eh_proj.weight"][1:] == ((192, 384), torch.bfloat16)
    assert (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()


def test_bf16_has_no_quantization_config_or_scales(small_checkpoint):
    path = small_checkpoint("bf16")
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    found = headers(path)
    assert not [n for n in found if n.endswith("_scale_inv")]
    assert {dtype for _, _, dtype in found.values()} == {torch.bfloat16, torch.float32}


def test_split_points_are_contiguous_balanced_and_never_empty():
    assert split_points([1] * 8, 4) == [0, 2, 4, 6, 8]
    assert split_points([100, 1, 1, 1, 100, 1], 2) == [0, 3, 6]  # 102 + 102 bytes
    assert split_points([100, 1, 1], 3) == [0, 1, 2, 3]  # a big first tensor still leaves one per shard
    assert split_points([5, 5, 5], 1) == [0, 3]


def test_cli_writes_the_requested_checkpoint(tmp_path, monkeypatch):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads((ROOT / "configs/tiny.json").read_text()), "vocab_size": 256}))
    argv = ["make_checkpoint.py", "--config", str(config), "--dtype", "bf16", "--shards", "3", "--seed", "7"]
    for out in ("a", "b"):
        monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path / out)])
        runpy.run_path(str(ROOT / "scripts/make_checkpoint.py"), run_name="__main__")
    shards = sorted(p.name for p in (tmp_path / "a").glob("model-*"))
    assert shards == [f"model-{i:05d}-of-000003.safetensors" for i in (1, 2, 3)]
    assert all((tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes() for s in shards)  # seeded
    with pytest.raises(ValueError, match=r"--shards=9999 exceeds the \d+ weight tensors"):
        write_checkpoint(config, tmp_path / "c", shards=9999)


def test_activations_stay_well_conditioned_and_the_router_uses_every_expert(small_checkpoint):
    model = load_model(small_checkpoint("fp8"), device="cpu", progress=False)
    loads, rms = [], []
    hooks = [layer.register_forward_hook(lambda m, i, out: rms.append(out.pow(2).mean().sqrt().item())) for layer in model.layers]
    for layer in model.layers[1:]:  # the MoE layers
        hooks.append(layer.ffn.gate.register_forward_hook(lambda m, i, out: loads.append(torch.bincount(out[1].flatten(), minlength=16))))
    tokens = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
    for h in hooks:
        h.remove()
    assert all(0.5 < r < 2 for r in rms), rms
    assert 0.5 < logits.std() < 2
    for load in loads:  # 8 * 64 tokens * top-4 over 16 experts: 128 each if perfectly even
        share = load.float() / load.float().mean()
        assert share.min() > 0.5 and share.max() < 1.5, load.tolist()


def test_without_mtp_the_files_hold_what_a_load_reads(tmp_path, tiny_config):
    """mtp=False (scripts/bench/model.py --load-dir): no MTP layer, and every tensor is one the loader reads."""
    raw = {**tiny_config, "vocab_size": 256}
    path = write_checkpoint(raw, tmp_path, shards=2, mtp=False, device="cpu")
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    assert set(headers(path)) == {s.hf_name for s in checkpoint_tensors(cfg, fp8=True)}
    assert not [n for n in headers(path) if n.startswith(f"model.layers.{cfg.n_layers}.")]
    load_model(path, device="cpu", progress=False)
