"""The multi-token-prediction block: skipped by default, loaded on request, and computing what
transformers' MtpModel computes with the same weights and the same main-model hidden states."""

import json

import pytest
import torch
from transformers import modeling_layers

MtpModel = getattr(modeling_layers, "MtpModel", None)
HAS_HF_MTP = hasattr(MtpModel, "forward_layer")  # transformers 5.24 has it; 5.17 (the GPU image's) does not

from tests.model.hf_oracle import PARITY_VOCAB, assert_rel, dense_tensors, layer_id, load_dsr1, load_hf

TOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint({"vocab_size": PARITY_VOCAB})


def test_default_load_skips_mtp(ckpt):
    model = load_dsr1(ckpt)
    assert len(model.mtp) == 0
    assert not [name for name, _ in model.named_parameters() if name.startswith("mtp.")]
    stats = model.load_stats
    n_mtp = sum(layer_id(name) >= model.cfg.n_layers for name in model_tensor_names(ckpt))
    assert n_mtp > 0
    assert stats.tensors_read == stats.tensors_total - n_mtp
    with pytest.raises(ValueError, match="load_mtp"):
        model.mtp_forward(torch.zeros(1, 2, model.cfg.dim), torch.zeros(1, 2, dtype=torch.long))


def model_tensor_names(ckpt) -> list[str]:
    return list(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"])


@torch.no_grad()
def test_mtp_forward_shapes_and_cache(ckpt):
    """mtp_forward -> [b, s, v]; decoding it with the cache equals running it over the whole sequence."""
    model = load_dsr1(ckpt, load_mtp=True)
    assert len(model.mtp) == model.cfg.n_mtp_layers == 1
    assert model.load_stats.tensors_read == model.load_stats.tensors_total
    tokens = torch.randint(0, PARITY_VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    logits, h = model(tokens, return_hidden=True)
    assert logits.shape == (2, 10, PARITY_VOCAB) and h.shape == (2, 10, model.cfg.dim)
    full = model.mtp_forward(h[:, :-1], tokens[:, 1:])  # position i predicts token i + 2
    assert full.shape == (2, 9, PARITY_VOCAB) and full.dtype == torch.float32 and full.isfinite().all()

    cache = model.new_cache(2, 16)  # the MTP block's cache comes after the main layers'
    assert len(cache) == model.cfg.n_layers + 1
    assert_rel(model.mtp_forward(h[:, :4], tokens[:, 1:5], 0, cache), full[:, :4], 1e-5, "MTP cached prefill")
    for pos in range(4, 9):
        step = model.mtp_forward(h[:, pos : pos + 1], tokens[:, pos + 1 : pos + 2], pos, cache)
        assert_rel(step, full[:, pos : pos + 1], 1e-5, f"MTP cached step {pos}")


def hf_mtp(ckpt, tmp_path):
    """transformers' MtpModel holding the checkpoint's MTP layer (its own embedding and head included)."""
    main = load_hf(ckpt, tmp_path)
    mtp = MtpModel(main, 1)
    n_layers = main.config.num_hidden_layers
    prefix = f"model.layers.{n_layers}."
    dense = {name.removeprefix(prefix): t for name, t in dense_tensors(ckpt).items() if name.startswith(prefix)}
    state = {
        "embed_tokens.weight": dense.pop("embed_tokens.weight"),
        "shared_head.weight": dense.pop("shared_head.head.weight"),
        "layers.0.post_norm.weight": dense.pop("shared_head.norm.weight"),
    }
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
        state[f"layers.0.{name}"] = dense.pop(name)
    n_experts = main.config.n_routed_experts
    experts = "layers.0.mtp_block.mlp.experts."
    state[experts + "gate_up_proj"] = torch.stack(
        [torch.cat([dense.pop(f"mlp.experts.{e}.gate_proj.weight"), dense.pop(f"mlp.experts.{e}.up_proj.weight")]) for e in range(n_experts)]
    )
    state[experts + "down_proj"] = torch.stack([dense.pop(f"mlp.experts.{e}.down_proj.weight") for e in range(n_experts)])
    state.update({f"layers.0.mtp_block.{name}": t for name, t in dense.items()})
    missing, unexpected = mtp.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return mtp.eval()


@pytest.mark.skipif(not HAS_HF_MTP, reason="needs transformers' MtpModel.forward_layer (present in 5.24, absent in 5.17)")
@torch.no_grad()
def test_mtp_matches_hf(ckpt, tmp_path):
    """Same hidden states in, same logits out: eh_proj(cat(enorm(embed(t+1)), hnorm(h))) -> block -> shared head."""
    model = load_dsr1(ckpt, load_mtp=True)
    hf = hf_mtp(ckpt, tmp_path)
    tokens = torch.randint(0, PARITY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    _, h = model(tokens, return_hidden=True)
    h, next_tokens = h[:, :-1], tokens[:, 1:]
    ours = model.mtp_forward(h, next_tokens)
    positions = torch.arange(next_tokens.shape[1]).expand(2, -1)
    ref = hf._project_to_logits(hf.forward_layer(0, h, positions, None, input_ids=next_tokens))
    assert_rel(ours, ref, TOL, "MTP vs transformers MtpModel")
