"""The one table between Hugging Face checkpoint names and dsr1 parameter names.

`checkpoint_tensors` lists, from the config alone, every tensor a DeepSeek-R1 checkpoint holds (or the
subset one expert-parallel rank needs): its HF name, shape and dtype on disk, and the dsr1 parameter
it fills. The loader checks checkpoints against it and `make_checkpoint` writes checkpoints from it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from dsr1.fp8 import FP8_DTYPE, scale_shape
from dsr1.config import ModelConfig

# HF projection name -> dsr1 name, for the dense MLP, the shared expert and each routed expert.
MLP = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
EXPERT_RE = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")


@dataclass(frozen=True)
class TensorSpec:
    hf_name: str
    param: str  # dsr1 state_dict key
    shape: tuple[int, ...]
    dtype: torch.dtype  # on disk
    slot: int | None = None  # row of a stacked expert parameter
    expert_id: int | None = None  # global routed expert id
    is_scale: bool = False  # a weight_scale_inv (param is the weight's scale)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def scale_name(self) -> str:
        """The HF name of this FP8 weight's block scale."""
        return self.hf_name.removesuffix(".weight") + ".weight_scale_inv"


def routed_expert_id(hf_name: str) -> int | None:
    """The global expert id in `model.layers.{i}.mlp.experts.{id}.*`, else None."""
    m = EXPERT_RE.match(hf_name)
    return int(m.group(1)) if m else None


def checkpoint_tensors(
    cfg: ModelConfig, fp8: bool, expert_ids: Sequence[int] | None = None, mtp: bool = False
) -> list[TensorSpec]:
    """Every tensor to read, in file order. fp8: linear weights are e4m3 with weight_scale_inv.

    expert_ids: the global routed experts this rank holds, in local-slot order (default: all).
    mtp: include the MTP layers (layer ids n_layers ... n_layers + n_mtp_layers - 1).
    """
    experts = list(range(cfg.n_routed_experts)) if expert_ids is None else list(expert_ids)
    linear_dtype = FP8_DTYPE if fp8 else torch.bfloat16
    specs: list[TensorSpec] = []

    def tensor(hf: str, param: str, shape, dtype=torch.bfloat16, **kw) -> None:
        specs.append(TensorSpec(hf, param, tuple(shape), dtype, **kw))

    def linear(hf: str, param: str, out_dim: int, in_dim: int, slot: int | None = None, expert_id: int | None = None) -> None:
        """A (possibly FP8) projection weight and, if FP8, its block scale."""
        weight_param, scale_param = (f"{param}.weight", f"{param}.scale") if slot is None else (param, f"{param}_scale")
        tensor(f"{hf}.weight", weight_param, (out_dim, in_dim), linear_dtype, slot=slot, expert_id=expert_id)
        if fp8:
            tensor(f"{hf}.weight_scale_inv", scale_param, scale_shape(out_dim, in_dim), torch.float32, slot=slot, expert_id=expert_id, is_scale=True)

    def block(layer_id: int, prefix: str) -> None:
        hf = f"model.layers.{layer_id}."
        d, h = cfg.dim, cfg.n_heads
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        tensor(hf + "input_layernorm.weight", prefix + "attn_norm.weight", (d,))
        if cfg.q_lora_rank:
            linear(hf + "self_attn.q_a_proj", prefix + "attn.wq_a", cfg.q_lora_rank, d)
            tensor(hf + "self_attn.q_a_layernorm.weight", prefix + "attn.q_norm.weight", (cfg.q_lora_rank,))
            linear(hf + "self_attn.q_b_proj", prefix + "attn.wq_b", h * qk, cfg.q_lora_rank)
        else:
            linear(hf + "self_attn.q_proj", prefix + "attn.wq", h * qk, d)
        linear(hf + "self_attn.kv_a_proj_with_mqa", prefix + "attn.wkv_a", cfg.kv_lora_rank + cfg.qk_rope_head_dim, d)
        tensor(hf + "self_attn.kv_a_layernorm.weight", prefix + "attn.kv_norm.weight", (cfg.kv_lora_rank,))
        linear(hf + "self_attn.kv_b_proj", prefix + "attn.wkv_b", h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        linear(hf + "self_attn.o_proj", prefix + "attn.wo", d, h * cfg.v_head_dim)
        tensor(hf + "post_attention_layernorm.weight", prefix + "ffn_norm.weight", (d,))
        if not cfg.is_moe_layer(layer_id):
            mlp(hf + "mlp.", prefix + "ffn.", cfg.inter_dim)
            return
        tensor(hf + "mlp.gate.weight", prefix + "ffn.gate.weight", (cfg.n_routed_experts, d))
        tensor(hf + "mlp.gate.e_score_correction_bias", prefix + "ffn.gate.bias", (cfg.n_routed_experts,), torch.float32)
        for slot, e in enumerate(experts):
            for hf_proj, name in MLP.items():
                out_dim, in_dim = (d, cfg.moe_inter_dim) if name == "w2" else (cfg.moe_inter_dim, d)
                linear(f"{hf}mlp.experts.{e}.{hf_proj}", f"{prefix}ffn.experts.{name}", out_dim, in_dim, slot=slot, expert_id=e)
        if cfg.n_shared_experts:
            mlp(hf + "mlp.shared_experts.", prefix + "ffn.shared_experts.", cfg.n_shared_experts * cfg.moe_inter_dim)

    def mlp(hf: str, prefix: str, inter_dim: int) -> None:
        for hf_proj, name in MLP.items():
            out_dim, in_dim = (cfg.dim, inter_dim) if name == "w2" else (inter_dim, cfg.dim)
            linear(hf + hf_proj, prefix + name, out_dim, in_dim)

    tensor("model.embed_tokens.weight", "embed.weight", (cfg.vocab_size, cfg.dim))
    for i in range(cfg.n_layers):
        block(i, f"layers.{i}.")
    tensor("model.norm.weight", "norm.weight", (cfg.dim,))
    tensor("lm_head.weight", "head.weight", (cfg.vocab_size, cfg.dim))
    for j in range(cfg.n_mtp_layers if mtp else 0):
        layer_id, prefix = cfg.n_layers + j, f"mtp.{j}."
        hf = f"model.layers.{layer_id}."
        tensor(hf + "embed_tokens.weight", prefix + "embed.weight", (cfg.vocab_size, cfg.dim))
        tensor(hf + "enorm.weight", prefix + "enorm.weight", (cfg.dim,))
        tensor(hf + "hnorm.weight", prefix + "hnorm.weight", (cfg.dim,))
        tensor(hf + "eh_proj.weight", prefix + "eh_proj.weight", (cfg.dim, 2 * cfg.dim))
        block(layer_id, prefix)
        tensor(hf + "shared_head.norm.weight", prefix + "shared_head.norm.weight", (cfg.dim,))
        tensor(hf + "shared_head.head.weight", prefix + "shared_head.head.weight", (cfg.vocab_size, cfg.dim))
    return specs
