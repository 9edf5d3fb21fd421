"""Typed configuration: the model, read from a checkpoint's Hugging Face `config.json`; how a run spreads
the experts over processes (`ParallelConfig`); how it samples (`GenerationConfig`).

`ModelConfig.from_hf` lists every key it reads. Keys it does not know are ignored
(R1's file carries training-only fields such as `aux_loss_alpha`); keys it needs
must be present and well-formed, and unsupported values are refused by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class YarnConfig:
    """`rope_scaling` with `type: yarn` (R1: factor 40 over 4096 original positions).

    Missing mscale / mscale_all_dim default to 1 / 0 as in DeepSeek's modeling_deepseek.py and HF:
    then cos/sin carry mscale(factor) and the softmax scale is left alone. R1 sets both to 1.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class QuantConfig:
    """`quantization_config`: block-wise FP8 e4m3 weights with float32 `weight_scale_inv`."""

    weight_block_size: tuple[int, int] = (128, 128)
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int  # HF: hidden_size
    inter_dim: int  # HF: intermediate_size (dense MLP)
    moe_inter_dim: int  # HF: moe_intermediate_size (one routed or shared expert)
    n_layers: int  # HF: num_hidden_layers (the MTP layer comes after these)
    n_dense_layers: int  # HF: first_k_dense_replace
    n_heads: int  # HF: num_attention_heads
    q_lora_rank: int  # 0 = no query compression (q_proj instead of q_a/q_b)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int  # HF: num_experts_per_tok
    n_expert_groups: int  # HF: n_group
    n_limited_groups: int  # HF: topk_group
    route_scale: float  # HF: routed_scaling_factor
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    yarn: YarnConfig | None
    quant: QuantConfig | None
    n_mtp_layers: int  # HF: num_nextn_predict_layers
    bos_token_id: int
    eos_token_id: int
    tie_word_embeddings: bool = False

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(192), times YaRN's mscale(factor, mscale_all_dim)^2 when YaRN is on."""
        scale = self.qk_head_dim**-0.5
        if self.yarn is not None:
            m = yarn_mscale(self.yarn.factor, self.yarn.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {path}: expected a Hugging Face config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf(raw, source=str(path))

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Read a DeepSeek-V3/R1 `config.json` dict; every error names the key."""
        r = _Reader(raw, source)
        for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("hidden_act", "silu")):
            got = r.get(key, str, want)
            if got != want:
                raise ValueError(f"{source}: {key}={got!r} is not supported; dsr1 implements DeepSeek-R1's {key}={want!r}")
        if r.get("moe_layer_freq", int, 1) != 1:
            raise ValueError(f"{source}: moe_layer_freq={raw['moe_layer_freq']} is not supported; expected 1 (every layer after first_k_dense_replace is MoE)")
        if r.get("attention_bias", bool, False):
            raise ValueError(f"{source}: attention_bias=true is not supported; DeepSeek-R1 has no attention bias")
        if not r.get("norm_topk_prob", bool, True):
            raise ValueError(f"{source}: norm_topk_prob=false is not supported; R1 normalizes the top-k sigmoid weights")
        if not r.get("rope_interleave", bool, True):
            raise ValueError(f"{source}: rope_interleave=false is not supported; R1 checkpoints store rope rows as interleaved pairs")
        n_heads = r.need("num_attention_heads", int)
        n_kv = r.get("num_key_value_heads", int, n_heads)
        if n_kv != n_heads:
            raise ValueError(f"{source}: num_key_value_heads={n_kv} must equal num_attention_heads={n_heads} (MLA has no GQA)")

        cfg = cls(
            vocab_size=r.need("vocab_size", int),
            dim=r.need("hidden_size", int),
            inter_dim=r.need("intermediate_size", int),
            moe_inter_dim=r.need("moe_intermediate_size", int),
            n_layers=r.need("num_hidden_layers", int),
            n_dense_layers=r.need("first_k_dense_replace", int, minimum=0),
            n_heads=n_heads,
            q_lora_rank=r.get("q_lora_rank", int, 0, minimum=0, allow_none=True) or 0,
            kv_lora_rank=r.need("kv_lora_rank", int),
            qk_nope_head_dim=r.need("qk_nope_head_dim", int),
            qk_rope_head_dim=r.need("qk_rope_head_dim", int),
            v_head_dim=r.need("v_head_dim", int),
            n_routed_experts=r.need("n_routed_experts", int),
            n_shared_experts=r.need("n_shared_experts", int, minimum=0),
            n_activated_experts=r.need("num_experts_per_tok", int),
            n_expert_groups=r.need("n_group", int),
            n_limited_groups=r.need("topk_group", int),
            route_scale=r.need("routed_scaling_factor", float),
            norm_topk_prob=True,
            rms_norm_eps=r.get("rms_norm_eps", float, 1e-6),
            rope_theta=r.get("rope_theta", float, _nested(raw, "rope_parameters", "rope_theta", 10000.0)),
            max_position_embeddings=r.need("max_position_embeddings", int),
            yarn=_read_yarn(raw, source),
            quant=_read_quant(raw, source),
            n_mtp_layers=r.get("num_nextn_predict_layers", int, 0, minimum=0),
            bos_token_id=r.get("bos_token_id", int, 0, minimum=0),
            eos_token_id=r.get("eos_token_id", int, 1, minimum=0),
            tie_word_embeddings=r.get("tie_word_embeddings", bool, False),
        )
        cfg._check(source)
        return cfg

    def _check(self, source: str) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"{source}: {key}: {msg}")

        if self.n_routed_experts % self.n_expert_groups:
            raise bad("n_group", f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_expert_groups}")
        if not 1 <= self.n_limited_groups <= self.n_expert_groups:
            raise bad("topk_group", f"topk_group={self.n_limited_groups} must be in [1, n_group={self.n_expert_groups}]")
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_expert_groups > 1 and per_group < 2:
            raise bad("n_group", f"each group needs >= 2 experts for the top-2 group score, got {per_group}")
        if not 1 <= self.n_activated_experts <= self.n_limited_groups * per_group:
            raise bad(
                "num_experts_per_tok",
                f"{self.n_activated_experts} must be in [1, topk_group * experts per group = {self.n_limited_groups * per_group}]",
            )
        if self.n_dense_layers > self.n_layers:
            raise bad("first_k_dense_replace", f"{self.n_dense_layers} exceeds num_hidden_layers={self.n_layers}")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", f"must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "true is not supported; R1 has a separate lm_head")


@dataclass(frozen=True)
class ParallelConfig:
    """Expert parallelism: `ep_size` processes (one per EP rank, attention data-parallel over them)."""

    ep_size: int = 1  # --ep
    expert_placement: str = "linear"  # linear: rank r holds experts [r*L, (r+1)*L); round_robin: r, r+ep, ...
    all2all: str = "torch"  # token dispatch: local (one process), torch (collectives) or deepep_ll
    fp8_dispatch: bool = False  # DeepEP sends FP8 activations (deepep_ll only)
    max_dispatch_tokens: int = 128  # tokens per rank per dispatch; longer prefills are split

    def __post_init__(self):
        if self.ep_size < 1:
            raise ValueError(f"--ep must be >= 1, got {self.ep_size}")


@dataclass(frozen=True)
class GenerationConfig:
    """What dsr1.engine.generation.generate does with each prompt: greedy at temperature 0, else nucleus
    (top-p) sampling from a generator seeded with `seed`; a row stops at `eos_id` (None: the model
    config's) or after `max_new_tokens`. Prompts are prefilled in chunks of at most `prefill_chunk` tokens."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    eos_id: int | None = None
    # Peak prefill activations grow with the chunk, not the prompt. 4096 rows keep each chunk's matmuls
    # as efficient as a whole prompt's on a GPU while R1's per-chunk activations stay a few GB.
    prefill_chunk: int = 4096

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk must be >= 1 (tokens per prefill forward), got {self.prefill_chunk}")


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature term, 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class _Reader:
    """Typed access to a config dict whose errors name the key and the file."""

    def __init__(self, raw: dict[str, Any], source: str):
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object, found {type(raw).__name__}")
        self.raw, self.source = raw, source

    def need(self, key: str, typ: type, minimum: int | None = 1):
        if key not in self.raw:
            raise ValueError(f"{self.source}: missing required key {key!r}")
        return self._convert(key, self.raw[key], typ, minimum)

    def get(self, key: str, typ: type, default, minimum: int | None = None, allow_none: bool = False):
        value = self.raw.get(key, default)
        if value is None and allow_none:
            return None
        return self._convert(key, value, typ, minimum)

    def _convert(self, key: str, value, typ: type, minimum):
        ok = {
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool),
            bool: isinstance(value, bool),
            str: isinstance(value, str),
        }[typ]
        if not ok:
            raise ValueError(f"{self.source}: key {key!r} must be {typ.__name__}, found {value!r}")
        if minimum is not None and typ in (int, float) and value < minimum:
            raise ValueError(f"{self.source}: key {key!r} must be >= {minimum}, found {value!r}")
        return typ(value)


def _nested(raw: dict[str, Any], outer: str, key: str, default):
    """raw[outer][key] when raw[outer] is a dict holding key, else `default`."""
    inner = raw.get(outer)
    return inner.get(key, default) if isinstance(inner, dict) else default


def _read_yarn(raw: dict[str, Any], source: str) -> YarnConfig | None:
    """R1's `rope_scaling`, or `rope_parameters` as transformers >= 5 saves the same dict (with rope_type 'default' if no YaRN)."""
    key = "rope_scaling" if raw.get("rope_scaling") is not None else "rope_parameters"
    rope = raw.get(key)
    if rope is None:
        return None
    r = _Reader(rope, f"{source}: {key}")
    kind = rope.get("type", rope.get("rope_type"))
    if key == "rope_parameters" and kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f"{source}: {key} type={kind!r} is not supported; DeepSeek-R1 uses 'yarn' (or omit {key})")
    yarn = YarnConfig(
        factor=r.need("factor", float),
        original_max_position_embeddings=r.need("original_max_position_embeddings", int),
        beta_fast=r.get("beta_fast", float, 32.0),
        beta_slow=r.get("beta_slow", float, 1.0),
        mscale=r.get("mscale", float, 1.0),
        mscale_all_dim=r.get("mscale_all_dim", float, 0.0),
    )
    if yarn.factor < 1:
        raise ValueError(f"{source}: {key}.factor={yarn.factor} must be >= 1")
    return yarn


def _read_quant(raw: dict[str, Any], source: str) -> QuantConfig | None:
    q = raw.get("quantization_config")
    if q is None:
        return None
    where = f"{source}: quantization_config"
    r = _Reader(q, where)
    method = r.need("quant_method", str)
    fmt = r.get("fmt", str, "e4m3")
    if method != "fp8" or fmt != "e4m3":
        raise ValueError(f"{where}: quant_method={method!r}, fmt={fmt!r} is not supported; expected fp8/e4m3 (DeepSeek-R1's)")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"{where}: weight_block_size must be a list of two positive ints, found {block!r}")
    return QuantConfig(weight_block_size=(block[0], block[1]), fmt=fmt, activation_scheme=r.get("activation_scheme", str, "dynamic"))
