"""Random-weight checkpoints in the exact DeepSeek-R1 Hugging Face layout (names, dtypes, FP8 + scales,
shard index, config.json, MTP tensors, tokenizer files), for tests, benchmarks and the embedded default.

Weights are scaled so activations stay near unit size through the stack, and the router's logits are
spread wide enough that tokens use many experts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsr1.checkpoint.fp8 import FP8_DTYPE, quantize
from dsr1.checkpoint.hf_names import TensorSpec, checkpoint_tensors
from dsr1.checkpoint.loader import INDEX_FILE
from dsr1.config import ModelConfig
from dsr1.tokenizer import copy_tokenizer_files

RESIDUAL_OUTPUTS = ("o_proj", "down_proj", "eh_proj")  # projections that write into the residual stream


def random_tensor(spec: TensorSpec, gen: torch.Generator, n_layers: int) -> torch.Tensor:
    """A full-precision value for `spec` (before any FP8 quantization)."""
    name, shape = spec.hf_name, spec.shape
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=gen) * 0.1
    if len(shape) == 1:  # RMSNorm weights: near one, not all equal
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen)
    std = 1.0 / math.sqrt(shape[1])
    if any(r in name for r in RESIDUAL_OUTPUTS):
        std /= math.sqrt(2 * n_layers)  # keep the residual stream from growing with depth
    if name.endswith("mlp.gate.weight"):
        std *= 2.0  # wide router logits: many experts win for some tokens
    return torch.randn(shape, generator=gen) * std


def write_checkpoint(config: dict | str | Path, out: str | Path, seed: int = 0, dtype: str = "fp8", shards: int = 1) -> Path:
    """Write a random checkpoint for `config` (a HF config dict or a config.json path) into `out`."""
    raw = json.loads(Path(config).read_text()) if not isinstance(config, dict) else dict(config)
    if dtype not in ("fp8", "bf16"):
        raise ValueError(f"--dtype must be 'fp8' or 'bf16', got {dtype!r}")
    if dtype == "fp8":
        raw.setdefault("quantization_config", {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]})
    else:
        raw.pop("quantization_config", None)
    cfg = ModelConfig.from_hf(raw, source=str(config) if not isinstance(config, dict) else "config")
    if shards < 1:
        raise ValueError(f"--shards must be >= 1, got {shards}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    specs = checkpoint_tensors(cfg, fp8=dtype == "fp8", mtp=True)
    weights = [s for s in specs if not s.is_scale]
    per_shard = math.ceil(len(weights) / shards)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i in range(shards):
        filename = f"model-{i + 1:05d}-of-{shards:06d}.safetensors"
        tensors = {}
        for spec in weights[i * per_shard : (i + 1) * per_shard]:
            value = random_tensor(spec, gen, cfg.n_layers)
            if spec.dtype == FP8_DTYPE:
                q, scale_inv = quantize(value)
                tensors[spec.hf_name] = q
                tensors[spec.hf_name.removesuffix(".weight") + ".weight_scale_inv"] = scale_inv
            else:
                tensors[spec.hf_name] = value.to(spec.dtype)
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = filename
            total += t.numel() * t.element_size()
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    copy_tokenizer_files(out)
    return out
