"""ModelConfig.from_hf: R1's file reads as expected, transformers 5's re-saved form reads the same,
and every malformed or unsupported value is refused with a ValueError naming its key."""

import json
import math
from pathlib import Path

import pytest
from transformers import DeepseekV3Config

from dsr1.config import ModelConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_r1_config():
    cfg = ModelConfig.from_file(CONFIGS / "deepseek-r1.json")
    assert (cfg.dim, cfg.n_layers, cfg.n_dense_layers, cfg.n_routed_experts, cfg.n_activated_experts) == (7168, 61, 3, 256, 8)
    assert (cfg.n_expert_groups, cfg.n_limited_groups, cfg.route_scale, cfg.n_mtp_layers) == (8, 4, 2.5, 1)
    assert cfg.quant is not None and cfg.quant.weight_block_size == (128, 128)
    assert cfg.yarn is not None and (cfg.yarn.factor, cfg.yarn.original_max_position_embeddings) == (40, 4096)
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)  # 0.1352338
    assert cfg.softmax_scale == pytest.approx(0.1352338, abs=1e-7)


@pytest.mark.parametrize("rope_scaling", [True, False], ids=["yarn", "no-yarn"])
def test_transformers5_saved_config_reads_the_same(tiny_config, tmp_path, rope_scaling):
    """transformers >= 5 re-saves rope_scaling and rope_theta inside `rope_parameters`."""
    if not rope_scaling:
        tiny_config.pop("rope_scaling")
    tiny_config["rope_theta"] = 50000.0
    DeepseekV3Config(**tiny_config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_scaling" not in saved and "rope_theta" not in saved and "rope_parameters" in saved
    assert ModelConfig.from_file(tmp_path) == ModelConfig.from_hf(tiny_config)


def test_yarn_mscale_defaults_follow_hf(tiny_config):
    """Without mscale keys the softmax scale has no mscale^2 (DeepSeek's and HF's default mscale_all_dim=0)."""
    tiny_config["rope_scaling"] = {"type": "yarn", "factor": 8, "original_max_position_embeddings": 512}
    cfg = ModelConfig.from_hf(tiny_config)
    assert cfg.softmax_scale == cfg.qk_head_dim**-0.5


def rejected(raw: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf(raw)


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "kv_lora_rank", "n_group", "routed_scaling_factor", "vocab_size"])
def test_missing_key(tiny_config, key):
    del tiny_config[key]
    rejected(tiny_config, f"missing required key '{key}'")


@pytest.mark.parametrize(
    "key, value",
    [
        ("scoring_func", "softmax"),
        ("topk_method", "greedy"),
        ("hidden_act", "gelu"),
        ("moe_layer_freq", 2),
        ("attention_bias", True),
        ("norm_topk_prob", False),
        ("rope_interleave", False),
        ("num_key_value_heads", 2),
        ("tie_word_embeddings", True),
        ("hidden_size", "192"),
        ("num_hidden_layers", 0),
        ("topk_group", 5),
        ("num_experts_per_tok", 9),
        ("first_k_dense_replace", 5),
        ("qk_rope_head_dim", 15),
    ],
)
def test_unsupported_value(tiny_config, key, value):
    tiny_config[key] = value
    rejected(tiny_config, key)


def test_experts_not_divisible_by_groups(tiny_config):
    tiny_config["n_routed_experts"] = 15
    rejected(tiny_config, "n_group.*n_routed_experts=15")


@pytest.mark.parametrize(
    "rope_scaling, key",
    [
        ("yarn", "rope_scaling"),
        ({"type": "linear", "factor": 2.0}, "rope_scaling"),
        ({"type": "yarn", "original_max_position_embeddings": 512}, "factor"),
        ({"type": "yarn", "factor": "8", "original_max_position_embeddings": 512}, "factor"),
        ({"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 512}, "factor"),
        ({"type": "yarn", "factor": 8}, "original_max_position_embeddings"),
        ({"type": "yarn", "factor": 8, "original_max_position_embeddings": 512, "mscale_all_dim": None}, "mscale_all_dim"),
    ],
)
def test_malformed_rope_scaling(tiny_config, rope_scaling, key):
    tiny_config["rope_scaling"] = rope_scaling
    rejected(tiny_config, key)


def test_malformed_rope_parameters(tiny_config):
    del tiny_config["rope_scaling"]
    tiny_config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    rejected(tiny_config, "rope_parameters")


@pytest.mark.parametrize(
    "quant, key",
    [
        ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "quantization_config"),
        ({"quant_method": "awq", "weight_block_size": [128, 128]}, "quantization_config"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
        ({"fmt": "e4m3", "weight_block_size": [128, 128]}, "quant_method"),
    ],
)
def test_malformed_quantization_config(tiny_config, quant, key):
    tiny_config["quantization_config"] = quant
    rejected(tiny_config, key)


def test_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        ModelConfig.from_file(tmp_path)
