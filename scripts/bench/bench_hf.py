"""transformers' DeepseekV3ForCausalLM holding the same random weights as dsr1 (scripts/bench/bench_weights.py).

FP8: the model is built on the meta device and converted by transformers' own FineGrainedFP8 quantizer
(FP8Linear, FP8Experts with the grouped_mm experts path, lm_head left in bf16), as `from_pretrained`
does for R1; its parameters are then allocated on the device and filled. Dense (the CPU smoke run):
an unquantized model holding the same weights dequantized.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import torch
from torch import Tensor

from bench_weights import random_tensors
from dsr1.fp8 import dequantize
from dsr1.config import ModelConfig

EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def build_hf(raw_config: dict, cfg: ModelConfig, device, dtype: torch.dtype, fp8: bool, seed: int = 0):
    """DeepseekV3ForCausalLM (sdpa attention) with `random_tensors(cfg, device, seed)`, FP8 or dequantized."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    raw = {k: v for k, v in raw_config.items() if fp8 or k != "quantization_config"}
    config = DeepseekV3Config.from_dict(raw)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    quantizer = AutoHfQuantizer.from_config(config.quantization_config, pre_quantized=True) if fp8 else None
    if quantizer is not None:
        if cfg.moe_inter_dim % 128:
            raise ValueError(f"moe_intermediate_size={cfg.moe_inter_dim}: HF fuses gate and up into one FP8 weight, whose 128-row scale blocks need it to be a multiple of 128")
        quantizer.preprocess_model(model)
    model.to_empty(device=device)
    with torch.device(device):  # to_empty left the rope table uninitialized
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):  # HF keeps the router bias in fp32 (_keep_in_fp32_modules_strict)
            layer.mlp.gate.e_score_correction_bias = torch.zeros(cfg.n_routed_experts, device=device)
    _fill(model, cfg, device, seed)
    if quantizer is not None:
        quantizer.postprocess_model(model)
    return model.eval()


def _fill(model, cfg: ModelConfig, device, seed: int) -> None:
    inter = cfg.moe_inter_dim
    for t in random_tensors(cfg, device, seed):
        match = EXPERT_RE.match(t.spec.hf_name)
        if match is None:
            _copy(model, t.spec.hf_name, t.value, t.scale)
            continue
        layer, expert, proj = int(match.group(1)), int(match.group(2)), match.group(3)
        experts = model.model.layers[layer].mlp.experts
        name = "down_proj" if proj == "down_proj" else "gate_up_proj"
        rows = {"gate_proj": slice(0, inter), "up_proj": slice(inter, 2 * inter), "down_proj": slice(None)}[proj]
        weight = getattr(experts, name)
        if weight.dtype == t.value.dtype:  # FP8: the weight and its block scales
            weight.data[expert, rows] = t.value
            scale_rows = slice(rows.start // 128, rows.stop // 128) if rows.stop else slice(None)
            getattr(experts, f"{name}_scale_inv").data[expert, scale_rows] = t.scale
        else:
            weight.data[expert, rows] = dequantize(t.value, t.scale, weight.dtype)


def _copy(model, name: str, value: Tensor, scale: Tensor | None) -> None:
    """Copy into the HF parameter or buffer `name`: FP8 with its scale, or dequantized if the model is dense."""
    try:
        target = model.get_parameter(name)
    except AttributeError:
        target = model.get_buffer(name)
    if scale is not None and target.dtype != value.dtype:
        value = dequantize(value, scale, target.dtype)
    elif scale is not None:
        model.get_parameter(name.removesuffix(".weight") + ".weight_scale_inv").data.copy_(scale)
    target.data.copy_(value)


def use_local_fp8_kernel(package_dir: str | Path, fixed_config: bool) -> None:
    """Give transformers the finegrained-fp8 Triton kernels from a local copy of the package
    (kernels-community/finegrained-fp8 torch-ext/finegrained_fp8) instead of the Hugging Face Hub, which an
    offline machine cannot reach. With `fixed_config`, each kernel runs one Triton config (4 warps,
    3 stages) instead of autotuning over its grid, which costs minutes of compiling on a fresh machine."""
    package_dir = Path(package_dir).resolve()
    sys.path.insert(0, str(package_dir.parent))
    kernel = importlib.import_module(package_dir.name)
    import transformers.integrations.finegrained_fp8 as hf_fp8

    hf_fp8._FINEGRAINED_FP8 = hf_fp8.FineGrainedFP8(
        matmul=kernel.matmul_2d, batched_matmul=kernel.matmul_batched, grouped_matmul=kernel.matmul_grouped
    )
    if fixed_config:
        from triton.runtime.autotuner import Autotuner

        for module_name, module in list(sys.modules.items()):
            if module_name.startswith(package_dir.name):
                for obj in vars(module).values():
                    if isinstance(obj, Autotuner):
                        obj.configs = [next((c for c in obj.configs if c.num_warps == 4 and c.num_stages == 3), obj.configs[0])]
