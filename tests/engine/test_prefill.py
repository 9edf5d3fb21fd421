"""Chunked prefill (dsr1.engine.generation.prefill): any chunk size gives one-shot prefill's logits and
tokens, and a 16384-token prompt prefills on the CPU in memory that follows the chunk, not the prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dsr1 import GenerationConfig, load_model
from dsr1.engine.generation import generate, prefill

PROMPTS = [[0, 5, 6, 7, 8, 9, 10], [0, 11, 12], [0, 13, 14, 15, 16], [0, *range(20, 37)]]  # 7, 3, 5, 18 tokens
NO_EOS = -1


@pytest.fixture(scope="module")
def model(make_checkpoint):
    torch.set_num_threads(1)
    return load_model(make_checkpoint(), device="cpu", dtype=torch.float32, progress=False)


def padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)  # [b, l]
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    return tokens, torch.tensor([len(p) for p in prompts])


@torch.inference_mode()
def test_chunked_prefill_equals_one_shot(model):
    tokens, lengths = padded(PROMPTS)
    one_shot = model(tokens, 0, model.new_cache(len(PROMPTS), 32), logits_at=lengths - 1)  # [b, v]
    for chunk in (1, 3, 7, 4096):
        logits = prefill(model, tokens, lengths, model.new_cache(len(PROMPTS), 32), chunk)
        assert logits.dtype == torch.float32 and logits.shape == one_shot.shape
        torch.testing.assert_close(logits, one_shot, rtol=1e-5, atol=1e-5 * float(one_shot.abs().max()), msg=f"chunk {chunk}")


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_generate_with_any_chunk_gives_the_same_tokens(make_checkpoint, model, attn_impl):
    if attn_impl != "absorb":
        model = load_model(make_checkpoint(), device="cpu", dtype=torch.float32, attn_impl=attn_impl, progress=False)
    expected = generate(model, PROMPTS, GenerationConfig(5, eos_id=NO_EOS, prefill_chunk=4096))
    for chunk in (1, 3, 7):
        assert generate(model, PROMPTS, GenerationConfig(5, eos_id=NO_EOS, prefill_chunk=chunk)) == expected, chunk


def test_prefill_chunk_is_checked():
    with pytest.raises(ValueError, match=r"--prefill-chunk must be >= 1 .*got 0"):
        GenerationConfig(4, prefill_chunk=0)
    from dsr1.generate_cli import build_parser

    assert build_parser().parse_args(["--prefill-chunk", "3"]).prefill_chunk == 3
    assert build_parser().parse_args([]).prefill_chunk == GenerationConfig.prefill_chunk
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--prefill-chunk", "0"])


# A 16384-token prompt on a 2-layer (one MoE), 1-head variant of configs/tiny.json. A chunk of c = 512 queries
# scores its [b, c, h, t] fp32 block whole (32 MiB at t = 16384: within MLA.score_bytes), a few copies at once,
# where a one-shot prefill would need 1 GiB each. The peak is the kernel's high-water mark, reset just before
# the prefill (ru_maxrss would include the forking pytest process's), with blocks over 1 MiB mmapped so that
# RSS follows live tensors rather than heap fragmentation. Measured growth on a 2-core CPU, 2026-12-08: 108 MiB.
LONG = 16384
LONG_CONFIG = {"vocab_size": 512, "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1,
               "max_position_embeddings": LONG + 64, "num_nextn_predict_layers": 0}
MEASURE = """
import json, re, sys, torch
from dsr1 import load_model
from dsr1.engine.generation import prefill

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

torch.set_num_threads(1)
model = load_model(sys.argv[1], device="cpu", dtype=torch.float32, progress=False)
n, small, large = (int(a) for a in sys.argv[2:5])
tokens = torch.randint(2, 512, (1, n), generator=torch.Generator().manual_seed(0))
lengths = torch.tensor([n])
with torch.inference_mode():
    prefill(model, tokens[:, :small * 2], torch.tensor([small * 2]), model.new_cache(1, n), small)  # allocator warm-up
    cache = model.new_cache(1, n)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    a = prefill(model, tokens, lengths, cache, small)
    peak = status("VmHWM") - before
    b = prefill(model, tokens, lengths, model.new_cache(1, n), large)
print(json.dumps({"peak": peak, "max_abs": float(a.abs().max()), "max_diff": float((a - b).abs().max()), "argmax": [int(a.argmax()), int(b.argmax())]}))
"""


@pytest.mark.slow  # a fresh interpreter and two 16K-token prefills: ~15 s on one core
def test_long_prompt_prefills_in_bounded_memory(make_checkpoint):
    small, large = 512, 2048
    ckpt = make_checkpoint(LONG_CONFIG)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(ckpt), str(LONG), str(small), str(large)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{LONG}-token prefill in chunks of {small}: peak RSS growth {r['peak'] / 2**20:.0f} MiB")
    scores = small * LONG * 4  # [1, c, h, t] fp32 at the last chunk: 32 MiB
    assert r["peak"] < 8 * scores, f"peak RSS growth {r['peak'] / 2**20:.0f} MiB during a {LONG}-token prefill in chunks of {small}"
    assert r["max_diff"] <= 1e-5 * r["max_abs"] and r["argmax"][0] == r["argmax"][1], r


@pytest.mark.slow  # HF's sdpa over 16K tokens in one pass: ~20 s and ~3 GB on two cores
def test_long_prompt_chunked_prefill_matches_hf(make_checkpoint, tmp_path):
    """A 16384-token prompt prefilled in chunks of 4096 against the cache gives the last-token logits HF computes
    over the whole prompt in one pass (fp32; sdpa attention, as HF's eager one would need 16K x 16K scores)."""
    from tests.model.hf_oracle import assert_rel, load_hf

    ckpt = make_checkpoint(LONG_CONFIG)
    x = torch.randint(2, 512, (1, LONG), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = load_hf(ckpt, tmp_path, attention="sdpa")(x, logits_to_keep=1).logits[:, -1]  # [1, v]
    model = load_model(ckpt, device="cpu", dtype=torch.float32, progress=False)
    with torch.inference_mode():
        got = prefill(model, x, torch.tensor([LONG]), model.new_cache(1, LONG), 4096)  # [1, v]
    assert_rel(got, ref, 1e-4, f"{LONG}-token chunked prefill vs HF")
