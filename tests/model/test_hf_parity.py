"""dsr1's logits equal transformers' DeepseekV3ForCausalLM on the same weights (fp32, rel err <= 1e-4).

Configs cover YaRN with R1's semantics (mscale_all_dim folds mscale^2 into the softmax scale), YaRN
whose cos/sin carry an attention factor, YaRN without mscale keys, no YaRN, q_proj instead of
q_lora, one expert group, two shared experts, and FP8 weights whose 128-blocks are ragged
(hidden 192, intermediate 320, moe 96) next to the same architecture in bf16.
"""

import pytest
import torch

from dsr1.model.rope import inv_frequencies
from tests.model.hf_oracle import PARITY_VOCAB, assert_rel, load_dsr1, load_hf, rel_err

TOL = 1e-4
CONFIGS = {  # name -> (overrides of configs/tiny.json, checkpoint dtype); tiny.json has R1's YaRN keys (factor 8 over 512)
    "fp8-yarn": ({}, "fp8"),
    "bf16-yarn": ({}, "bf16"),
    "fp8-yarn-attention-factor": (
        {"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.707}},
        "fp8",
    ),
    "fp8-yarn-no-mscale-keys": ({"rope_scaling": {"type": "yarn", "factor": 8, "original_max_position_embeddings": 512}}, "fp8"),
    "fp8-q_proj-one-group-two-shared-no-yarn": (
        {"q_lora_rank": None, "n_group": 1, "topk_group": 1, "n_shared_experts": 2, "rope_scaling": None},
        "fp8",
    ),
}


@pytest.fixture(scope="module")
def models(make_checkpoint, tmp_path_factory):
    """models(name) -> (checkpoint dir, HF model); the HF model is built once per config."""
    hf = {}

    def get(name: str):
        overrides, dtype = CONFIGS[name]
        ckpt = make_checkpoint({**overrides, "vocab_size": PARITY_VOCAB}, dtype=dtype)
        if name not in hf:
            hf[name] = load_hf(ckpt, tmp_path_factory.mktemp(name))
        return ckpt, hf[name]

    return get


def tokens(b: int = 2, s: int = 24) -> torch.Tensor:
    return torch.randint(0, PARITY_VOCAB, (b, s), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("impl", ["absorb", "naive"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(models, name, impl):
    ckpt, hf = models(name)
    ours = load_dsr1(ckpt, attn_impl=impl)
    assert ours.layers[0].attn.softmax_scale == pytest.approx(hf.model.layers[0].self_attn.scaling, rel=1e-12)
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert ref.shape == (2, 24, PARITY_VOCAB)
    assert_rel(got, ref, TOL, f"HF parity {name} {impl}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rope_tables_match_hf(models, name):
    """YaRN frequencies and the cos/sin magnitude (HF's attention_scaling) equal HF's."""
    ckpt, hf = models(name)
    ours = load_dsr1(ckpt)
    emb = hf.model.rotary_emb
    torch.testing.assert_close(inv_frequencies(ours.cfg), emb.inv_freq, rtol=1e-6, atol=0)
    positions = torch.arange(0, 4096, 7)
    cos, sin = emb(torch.zeros(1, dtype=torch.float32), positions.unsqueeze(0))  # [1, t, r]: cat(freqs, freqs)
    half = cos.shape[-1] // 2
    ref = torch.complex(cos[0, :, :half], sin[0, :, :half])
    torch.testing.assert_close(ours.freqs_cis[positions], ref, rtol=0, atol=2e-5)


def test_fp8_kept_in_memory_equals_dequantized_at_load(models):
    ckpt, _ = models("fp8-yarn")
    x = tokens()
    with torch.no_grad():
        a = load_dsr1(ckpt)(x)
        b = load_dsr1(ckpt, fp8=True)(x)
    assert_rel(b, a, 1e-6, "fp8 in memory vs dequantized at load")


def drop_mscale(hf):
    for layer in hf.model.layers:
        layer.self_attn.scaling = layer.self_attn.qk_head_dim**-0.5


def rotate_half_layout(hf):
    hf.config.rope_interleave = False


@pytest.mark.parametrize("perturb", [drop_mscale, rotate_half_layout], ids=lambda f: f.__name__)
def test_comparison_detects_rope_mistakes(make_checkpoint, tmp_path, perturb):
    """Negative controls: HF without the mscale^2 softmax factor, or reading rope rows as halves
    instead of interleaved pairs, no longer matches, so the parity tests do see these mistakes."""
    ckpt = make_checkpoint({"vocab_size": PARITY_VOCAB})
    hf = load_hf(ckpt, tmp_path)  # a private copy: perturbing must not leak into other tests
    perturb(hf)
    x = tokens()
    with torch.no_grad():
        err = rel_err(load_dsr1(ckpt)(x), hf(x).logits)
    print(f"\n[negative control] {perturb.__name__}: {err:.2e}")
    assert err > 1e-3


LONG = 4096


@pytest.mark.slow  # ~15 s on two cores, most of it HF's eager [1, h, s, s] attention
def test_long_prompt_matches_hf(make_checkpoint, tmp_path):
    """A 4096-token prompt on 2 layers of the tiny config, the queries in blocks of 512 (the score budget shrunk),
    against HF in one pass: the blockwise einsums compute the function HF's full [s, s] attention computes."""
    ckpt = make_checkpoint({"vocab_size": PARITY_VOCAB, "num_hidden_layers": 2, "max_position_embeddings": LONG})
    hf = load_hf(ckpt, tmp_path)
    x = torch.randint(0, PARITY_VOCAB, (1, LONG), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(x).logits
        for impl in ("absorb", "naive"):
            ours = load_dsr1(ckpt, attn_impl=impl)
            for layer in ours.layers:
                layer.attn.score_bytes = 4 * layer.attn.n_heads * LONG * 512  # [1, q, h, t] fp32: 8 blocks of 512 queries
            assert_rel(ours(x), ref, TOL, f"HF parity, {LONG} tokens, {impl}")
