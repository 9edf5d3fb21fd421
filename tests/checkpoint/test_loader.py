"""A checkpoint saved under HF names loads back exactly, and every tensor in it is used."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsr1 import ModelConfig, load_model
from dsr1.fp8 import FP8_DTYPE, dequantize
from dsr1.checkpoint.hf_names import checkpoint_tensors
from dsr1.checkpoint.loader import INDEX_FILE, SINGLE_FILE, build_model


def saved(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the checkpoint, read back from its shards."""
    shards = set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values())
    return {name: t for shard in shards for name, t in load_file(path / shard).items()}


def n_main_tensors(path: Path, n_layers: int) -> int:
    """Tensors outside the MTP layers, counted from the index names alone."""
    names = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    layers = [re.match(r"model\.layers\.(\d+)\.", n) for n in names]
    return sum(m is None or int(m.group(1)) < n_layers for m in layers)


def model_value(model, spec) -> torch.Tensor:
    t = model.state_dict()[spec.param]
    return t if spec.slot is None else t[spec.slot]


@pytest.mark.parametrize("load_mtp", [False, True])
def test_bf16_loads_exactly_and_every_key_is_used(small_checkpoint, load_mtp):
    path = small_checkpoint("bf16")
    model = load_model(path, device="cpu", dtype=torch.float32, load_mtp=load_mtp, progress=False)
    tensors = saved(path)
    specs = checkpoint_tensors(model.cfg, fp8=False, mtp=load_mtp)
    for spec in specs:
        assert torch.equal(model_value(model, spec), tensors[spec.hf_name].float()), spec.hf_name
    # Every model entry is filled from the checkpoint (every expert slot, too), and nothing else is.
    assert {s.param for s in specs} == set(model.state_dict())
    for name, t in model.state_dict().items():
        if ".experts." in name:
            assert sorted(s.slot for s in specs if s.param == name) == list(range(t.shape[0])), name
    stats = model.load_stats
    n_main = n_main_tensors(path, model.cfg.n_layers)
    assert n_main < len(tensors)
    assert stats.tensors_read == (len(tensors) if load_mtp else n_main)  # MTP tensors are skipped unless asked for
    assert stats.tensors_total == len(tensors)
    assert stats.ideal_ratio == 1.0


def test_hf_names_land_in_the_right_parameters(small_checkpoint):
    """A few mappings spelled out by hand, independent of the name table."""
    path = small_checkpoint("bf16")
    model = load_model(path, device="cpu", dtype=torch.float32, load_mtp=True, progress=False)
    t = {k: v.float() for k, v in saved(path).items()}
    layer = model.layers[2]
    assert torch.equal(model.embed.weight, t["model.embed_tokens.weight"])
    assert torch.equal(model.head.weight, t["lm_head.weight"])
    assert torch.equal(layer.attn.wkv_a.weight, t["model.layers.2.self_attn.kv_a_proj_with_mqa.weight"])
    assert torch.equal(layer.attn.kv_norm.weight, t["model.layers.2.self_attn.kv_a_layernorm.weight"])
    assert torch.equal(layer.ffn.gate.bias, t["model.layers.2.mlp.gate.e_score_correction_bias"])
    assert layer.ffn.gate.bias.dtype == torch.float32
    assert torch.equal(layer.ffn.experts.w2[3], t["model.layers.2.mlp.experts.3.down_proj.weight"])
    assert torch.equal(layer.ffn.experts.w3[7], t["model.layers.2.mlp.experts.7.up_proj.weight"])
    assert torch.equal(layer.ffn.shared_experts.w1.weight, t["model.layers.2.mlp.shared_experts.gate_proj.weight"])
    assert torch.equal(model.layers[0].ffn.w2.weight, t["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(model.mtp[0].eh_proj.weight, t["model.layers.4.eh_proj.weight"])
    assert torch.equal(model.mtp[0].ffn.experts.w1[0], t["model.layers.4.mlp.experts.0.gate_proj.weight"])


def test_fp8_kept_in_memory_is_bit_exact(small_checkpoint):
    path = small_checkpoint("fp8")
    model = load_model(path, device="cpu", dtype=torch.bfloat16, fp8=True, progress=False)
    tensors = saved(path)
    specs = checkpoint_tensors(model.cfg, fp8=True)
    for spec in specs:
        value, want = model_value(model, spec), tensors[spec.hf_name]
        router = spec.hf_name.endswith("mlp.gate.weight")  # kept in fp32 (Gate.fp32_params): widened, exactly
        assert value.dtype == (torch.float32 if router else want.dtype), spec.hf_name
        assert torch.equal(value.view(torch.uint8), want.view(torch.uint8)) if value.dtype == FP8_DTYPE else torch.equal(value, want.to(value.dtype))
    assert sum(s.dtype == FP8_DTYPE for s in specs) > 100 and model.layers[1].ffn.experts.w1_scale.dtype == torch.float32
    assert model.load_stats.tensors_read == len(specs) == n_main_tensors(path, model.cfg.n_layers)


def test_fp8_dequantized_at_load_equals_dequantize(small_checkpoint):
    path = small_checkpoint("fp8")
    model = load_model(path, device="cpu", dtype=torch.float32, progress=False)
    tensors = saved(path)
    for spec in checkpoint_tensors(model.cfg, fp8=True):
        if spec.dtype == FP8_DTYPE:
            want = dequantize(tensors[spec.hf_name], tensors[spec.scale_name], torch.float32)
            assert torch.equal(model_value(model, spec), want), spec.hf_name
    # Scales are read with their weights: every non-MTP tensor, once.
    assert model.load_stats.tensors_read == n_main_tensors(path, model.cfg.n_layers)


def test_single_file_checkpoint_loads(small_checkpoint, tmp_path):
    sharded = small_checkpoint("bf16")
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text((sharded / "config.json").read_text())
    save_file(saved(sharded), str(single / SINGLE_FILE))
    a = load_model(single, device="cpu", progress=False)
    b = load_model(sharded, device="cpu", progress=False)
    assert a.load_stats.shards_total == a.load_stats.shards_opened == 1
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_other_files_in_the_directory_are_ignored(editable):
    ckpt = editable("bf16")
    (ckpt.path / "model-00009-of-000009.safetensors").write_bytes(b"not a shard")  # not in the index
    (ckpt.path / SINGLE_FILE).write_bytes(b"garbage")  # the index wins over a single file
    (ckpt.path / "README.md").write_text("notes")
    stats = load_model(ckpt.path, device="cpu", progress=False).load_stats
    assert stats.shards_total == 4


def test_fp8_in_memory_needs_an_fp8_checkpoint(small_checkpoint):
    with pytest.raises(ValueError, match="not an FP8 checkpoint"):
        load_model(small_checkpoint("bf16"), device="cpu", fp8=True, progress=False)


def built_in_memory(path: Path, dtype: torch.dtype):
    """The oracle: the model built in memory from the checkpoint's tensors, each FP8 weight dequantized here into
    a dense parameter. None of the loader's reading (index, shards, batches, FP8 kept in memory) is involved; it
    shares only build_model and the name table (checked by hand in test_hf_names_land_in_the_right_parameters)."""
    cfg = ModelConfig.from_file(path)
    model = build_model(cfg, "cpu", dtype, fp8=False)
    tensors = saved(path)
    for spec in checkpoint_tensors(cfg, fp8=True):
        if not spec.is_scale:
            value = tensors[spec.hf_name]
            if value.dtype == FP8_DTYPE:
                value = dequantize(value, tensors[spec.scale_name], dtype)
            model_value(model, spec).copy_(value)
    return model.eval()


def test_loaded_model_runs(small_checkpoint):
    """FP8 weights kept in memory with bf16 activations give exactly the logits of the model built in memory from the
    same tensors: on the CPU each FP8 matmul multiplies by dequantize(weight, scale, bf16), the oracle's weights."""
    path = small_checkpoint("fp8")
    model = load_model(path, device="cpu", fp8=True, dtype=torch.bfloat16, progress=False)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0  # BOS
    with torch.inference_mode():
        logits, want = model(x), built_in_memory(path, torch.bfloat16)(x)
    assert logits.shape == (2, 16, 512) and torch.isfinite(logits).all()
    assert torch.equal(logits, want)
