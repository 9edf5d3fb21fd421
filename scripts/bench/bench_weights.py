"""Random FP8 DeepSeek-R1 weights drawn directly on the device, the same for dsr1 and transformers.

Each tensor of `checkpoint_tensors(cfg, fp8=True)` comes from its own generator, seeded from its HF
name, so two models built one after the other (only one fits on the card at a time) hold identical
values without a checkpoint on disk. FP8 weights are N(0, 1) rounded to e4m3, and their block scales
carry the layer's size (1/sqrt(in), smaller for projections into the residual stream), as in
dsr1/checkpoint/synthetic.py, so activations stay near unit size through the stack. (A checkpoint on
disk, e.g. for the load benchmark, comes from dsr1.checkpoint.synthetic.write_checkpoint.)
"""

from __future__ import annotations

import math
import zlib
from typing import Iterator, NamedTuple

import torch
from torch import Tensor, nn

from dsr1.fp8 import FP8_DTYPE
from dsr1.checkpoint.hf_names import TensorSpec, checkpoint_tensors
from dsr1.config import ModelConfig
from dsr1.checkpoint.synthetic import RESIDUAL_OUTPUTS


class RandomTensor(NamedTuple):
    spec: TensorSpec
    value: Tensor  # as stored in the checkpoint: e4m3 for FP8 weights
    scale_spec: TensorSpec | None = None  # an FP8 weight's weight_scale_inv
    scale: Tensor | None = None


def random_tensors(cfg: ModelConfig, device, seed: int = 0, expert_ids: list[int] | None = None) -> Iterator[RandomTensor]:
    """Every weight of an FP8 checkpoint for `cfg` (no MTP layers), each FP8 weight with its scale; with
    expert_ids, only those routed experts (in slot order). A tensor's values depend on its name only."""
    specs = checkpoint_tensors(cfg, fp8=True, expert_ids=expert_ids)
    scales = {s.hf_name: s for s in specs if s.is_scale}
    for spec in specs:
        if spec.is_scale:
            continue
        gen = torch.Generator(device).manual_seed(zlib.crc32(spec.hf_name.encode()) ^ seed)
        if spec.dtype != FP8_DTYPE:
            yield RandomTensor(spec, _dense(spec, gen, device, cfg.n_layers).to(spec.dtype))
            continue
        out_dim, in_dim = spec.shape
        std = 1.0 / math.sqrt(in_dim) / (math.sqrt(2 * cfg.n_layers) if any(r in spec.hf_name for r in RESIDUAL_OUTPUTS) else 1.0)
        weight = torch.randn(spec.shape, generator=gen, device=device, dtype=torch.bfloat16).to(FP8_DTYPE)
        scale_spec = scales[spec.scale_name]
        scale = std * (0.75 + 0.5 * torch.rand(scale_spec.shape, generator=gen, device=device))  # blocks differ
        yield RandomTensor(spec, weight, scale_spec, scale)


def group_popularity_bias(cfg: ModelConfig, skew: float, gen: torch.Generator, device) -> Tensor:
    """A router bias [e] that makes some expert groups popular: group of popularity rank r (a random order)
    gets -skew * log(1 + r), as R1's e_score_correction_bias steers selection. skew 0: uniform routing."""
    group_size = cfg.n_routed_experts // cfg.n_expert_groups
    group_rank = torch.randperm(cfg.n_expert_groups, generator=gen, device=device).repeat_interleave(group_size)
    return -skew * torch.log1p(group_rank.float())


def _dense(spec: TensorSpec, gen: torch.Generator, device, n_layers: int) -> Tensor:
    """A bf16/fp32 tensor: norms near one, a small router bias, embeddings, lm_head and router weights."""
    x = torch.randn(spec.shape, generator=gen, device=device)
    if spec.hf_name.endswith("e_score_correction_bias"):
        return 0.02 * x
    if len(spec.shape) == 1:
        return 1.0 + 0.1 * x
    if "embed_tokens" in spec.hf_name:
        return x
    wide = 2.0 if spec.hf_name.endswith("mlp.gate.weight") else 1.0  # many experts win for some tokens
    return x * wide / math.sqrt(spec.shape[1])


def fill_dsr1(model: nn.Module, cfg: ModelConfig, seed: int = 0, expert_ids: list[int] | None = None) -> None:
    """Fill a dsr1 Transformer built with fp8=True (and no MTP layers) with `random_tensors`; an
    expert-parallel rank's model with its experts (expert_ids, in slot order): the same weights as one GPU's."""
    device = model.embed.weight.device
    for t in random_tensors(cfg, device, seed, expert_ids):
        _dsr1_target(model, t.spec).copy_(t.value)
        if t.scale is not None:
            _dsr1_target(model, t.scale_spec).copy_(t.scale)


def _dsr1_target(model: nn.Module, spec: TensorSpec) -> Tensor:
    try:
        t = model.get_parameter(spec.param)
    except AttributeError:
        t = model.get_buffer(spec.param)
    return t.data if spec.slot is None else t.data[spec.slot]
