"""Random-weight checkpoints in the exact DeepSeek-R1 Hugging Face layout (names, dtypes, FP8 + scales,
shard index, config.json, MTP tensors, tokenizer files), for tests, benchmarks and the embedded default.

Weights are scaled so activations stay near unit size through the stack, and the router's logits are
spread wide enough that tokens use many experts.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsr1.fp8 import FP8_DTYPE, quantize
from dsr1.checkpoint.hf_names import TensorSpec, checkpoint_tensors
from dsr1.checkpoint.loader import INDEX_FILE
from dsr1.config import ModelConfig
from dsr1.tokenizer import copy_tokenizer_files

RESIDUAL_OUTPUTS = ("o_proj", "down_proj", "eh_proj")  # projections that write into the residual stream


def random_tensor(spec: TensorSpec, gen: torch.Generator, n_layers: int) -> torch.Tensor:
    """A full-precision value for `spec` (before any FP8 quantization), on `gen`'s device."""
    name, shape = spec.hf_name, spec.shape
    randn = functools.partial(torch.randn, generator=gen, device=gen.device)
    if name.endswith("e_score_correction_bias"):
        # Small next to the spread of the sigmoid scores (std ~0.3): it flips some choices, as R1's does,
        # without favouring a few experts (std 0.1 left some experts 5x busier than others).
        return randn(shape) * 0.02
    if len(shape) == 1:  # RMSNorm weights: near one, not all equal
        return 1.0 + 0.1 * randn(shape)
    if "embed_tokens" in name:
        return randn(shape)
    std = 1.0 / math.sqrt(shape[1])
    if any(r in name for r in RESIDUAL_OUTPUTS):
        std /= math.sqrt(2 * n_layers)  # keep the residual stream from growing with depth
    if name.endswith("mlp.gate.weight"):
        std *= 2.0  # wide router logits: many experts win for some tokens
    return randn(shape) * std


def split_points(sizes: list[int], n: int) -> list[int]:
    """Cut a list of tensor sizes into n contiguous non-empty runs of about equal bytes, as HF's
    max_shard_size does: returns n + 1 boundaries. Like R1, a layer's experts then span one or more shards."""
    ends = list(itertools.accumulate(sizes))  # ends[i]: bytes of items [0, i]
    cuts = [0]
    for k in range(1, n):
        cut = bisect.bisect_right(ends, k * ends[-1] / n)  # the items that end within the first k/n of the bytes
        cuts.append(min(max(cut, cuts[-1] + 1), len(sizes) - (n - k)))
    return [*cuts, len(sizes)]


def write_checkpoint(config: dict | str | Path, out: str | Path, seed: int = 0, dtype: str = "fp8", shards: int = 1,
                     device: torch.device | str = "cpu", mtp: bool = True) -> Path:
    """Write a random checkpoint for `config` (a HF config dict or a config.json path) into `out`.

    Values are drawn (and quantized) on `device`, one shard at a time, so a GPU writes a large checkpoint in
    a fraction of the CPU's time; a seed gives the same values on one device, not across devices.
    mtp=False leaves out the MTP layers (which the loader skips), so the files hold what a load reads."""
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

    specs = checkpoint_tensors(cfg, fp8=dtype == "fp8", mtp=mtp)
    weights = [s for s in specs if not s.is_scale]
    if shards > len(weights):
        raise ValueError(f"--shards={shards} exceeds the {len(weights)} weight tensors of this config")
    by_name = {s.hf_name: s for s in specs}
    sizes = [w.nbytes + (by_name[w.scale_name].nbytes if w.dtype == FP8_DTYPE else 0) for w in weights]
    cuts = split_points(sizes, shards)
    gen = torch.Generator(device).manual_seed(seed)
    weight_map, total = {}, 0
    for i in range(shards):
        filename = f"model-{i + 1:05d}-of-{shards:06d}.safetensors"  # R1: model-00001-of-000163.safetensors
        tensors = {}
        for spec in weights[cuts[i] : cuts[i + 1]]:
            value = random_tensor(spec, gen, cfg.n_layers)
            if spec.dtype == FP8_DTYPE:
                tensors[spec.hf_name], tensors[spec.scale_name] = (t.cpu() for t in quantize(value))
            else:
                tensors[spec.hf_name] = value.to(spec.dtype).cpu()
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = filename
            total += t.nbytes
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    copy_tokenizer_files(out)
    return out
