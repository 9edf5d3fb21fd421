"""The oracle: transformers' DeepseekV3ForCausalLM loaded with exactly the weights dsr1 loads, in fp32.

A dsr1 checkpoint (FP8 or bf16) is turned into an fp32 copy under the same HF names (FP8 weights
dequantized with dsr1.fp8.dequantize, MTP tensors dropped since HF ignores them) with
`quantization_config` removed, and loaded with `from_pretrained`, which stacks the per-expert
tensors into transformers 5.x's `gate_up_proj` / `down_proj`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3ForCausalLM

import dsr1
from dsr1.fp8 import FP8_DTYPE, dequantize
from dsr1.model.transformer import Transformer

# Parity tests shrink the vocabulary: the logits comparison needs no real tokenizer.
PARITY_VOCAB = 512


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def assert_rel(got: torch.Tensor, ref: torch.Tensor, tol: float, label: str) -> float:
    """Assert rel_err(got, ref) <= tol; print it (pytest -s) so runs can report measured errors."""
    assert got.shape == ref.shape, f"{label}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = rel_err(got, ref)
    print(f"\n[rel-err] {label}: {err:.2e} (tol {tol:.0e})")
    assert err <= tol, f"{label}: max rel err {err:.2e} > {tol:.0e}"
    return err


def layer_id(hf_name: str) -> int:
    """i for `model.layers.{i}.*` (the MTP layers come after the n_layers decoder layers), else -1."""
    m = re.match(r"model\.layers\.(\d+)\.", hf_name)
    return int(m.group(1)) if m else -1


def dense_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every weight of `ckpt` by HF name in fp32, FP8 ones dequantized (no weight_scale_inv entries)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    dense = {}
    for name, value in tensors.items():
        if name.endswith(".weight_scale_inv"):
            continue
        if value.dtype == FP8_DTYPE:
            value = dequantize(value, tensors[name.removesuffix(".weight") + ".weight_scale_inv"], torch.float32)
        dense[name] = value.float()
    return dense


def write_fp32_copy(ckpt: Path, out: Path) -> Path:
    """An fp32 single-file copy of `ckpt` (same HF names, no scales, no MTP layer) that HF loads."""
    n_layers = dsr1.ModelConfig.from_file(ckpt).n_layers
    dense = {name: t for name, t in dense_tensors(ckpt).items() if layer_id(name) < n_layers}
    out.mkdir(parents=True, exist_ok=True)
    save_file(dense, str(out / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((ckpt / "config.json").read_text())
    raw.pop("quantization_config", None)
    raw["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out


def load_hf(ckpt: Path, workdir: Path, attention: str = "eager") -> DeepseekV3ForCausalLM:
    """The HF model for `ckpt` in fp32 with `attention` (eager, or sdpa for long prompts); fails unless every
    weight was loaded."""
    hf_dir = write_fp32_copy(ckpt, workdir / "hf-fp32")
    model, info = DeepseekV3ForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation=attention, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info["error_msgs"]
    assert model.config._attn_implementation == attention
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model.eval()


def load_dsr1(ckpt: Path, **kwargs) -> Transformer:
    """dsr1's model for `ckpt` on CPU in fp32."""
    return dsr1.load_model(ckpt, device="cpu", dtype=torch.float32, progress=False, **kwargs)
