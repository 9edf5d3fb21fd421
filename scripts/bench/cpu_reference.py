"""The reference model's own numbers, on the CPU it runs on:

1. the embedded default (`python scripts/generate.py`, 32 new tokens): first run, which builds the tiny
   checkpoint into a fresh cache directory, and a later run (targets: < 60 s and < 15 s on 2 cores);
2. time per new token with the KV cache at short and long context, against recomputing the whole
   sequence every step (the cache keeps it flat);
3. KV-cache bytes per token at R1's shape: the absorbed latent cache against the naive per-head one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsr1 import embedded
from dsr1.checkpoint.loader import load_model
from dsr1.config import ModelConfig
from dsr1.model.attention import MLA

ROOT = Path(__file__).resolve().parents[2]


def embedded_default_seconds() -> tuple[float, float]:
    """Wall time of `python scripts/generate.py` with an empty cache directory, then again."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        times = []
        for _ in range(2):
            start = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py")], env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
    return times[0], times[1]


@torch.inference_mode()
def decode_ms_per_token(model, context: int, steps: int, cached: bool) -> float:
    """Mean ms per new token (batch 1) after a `context`-token prompt, with the cache or by full recompute."""
    tokens = torch.randint(2, 1000, (1, context + steps), generator=torch.Generator().manual_seed(0))
    if cached:
        cache = model.new_cache(1, context + steps)
        model(tokens[:, :context], 0, cache, logits_at=torch.tensor([context - 1]))
        start = time.perf_counter()
        for i in range(steps):
            model(tokens[:, context + i : context + i + 1], context + i, cache, logits_at=torch.tensor([0]))
    else:
        start = time.perf_counter()
        for i in range(steps):
            model(tokens[:, : context + i + 1], logits_at=torch.tensor([context + i]))
    return (time.perf_counter() - start) * 1000 / steps


def cache_values_per_token(cfg: ModelConfig, impl: str) -> int:
    """Values one layer's cache holds per token (built on the meta device: no memory is used)."""
    cache = MLA(cfg, fp8=False, impl=impl).new_cache(1, 1, torch.bfloat16, "meta")
    return sum(t.numel() for t in cache.tensors())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per context")
    p.add_argument("--skip-embedded", action="store_true", help="skip the (slow) embedded-default timing")
    args = p.parse_args()
    torch.set_num_threads(1)

    if not args.skip_embedded:
        first, later = embedded_default_seconds()
        print("embedded default (python scripts/generate.py, 32 new tokens)")
        print(f"  first run (builds the checkpoint): {first:6.1f} s   (target < 60 s)")
        print(f"  later run:                         {later:6.1f} s   (target < 15 s)")

    model = load_model(embedded.tiny_checkpoint(), device="cpu", dtype=torch.float32, progress=False)
    print(f"\ntime per new token, tiny model, batch 1, CPU fp32, {args.steps} steps")
    print(f"{'context':>8} {'KV cache ms':>12} {'recompute ms':>13} {'recompute / cache':>18}")
    for context in args.contexts:
        cached = decode_ms_per_token(model, context, args.steps, cached=True)
        full = decode_ms_per_token(model, context, args.steps, cached=False)
        print(f"{context:>8} {cached:>12.2f} {full:>13.2f} {full / cached:>18.1f}")

    r1 = ModelConfig.from_file(ROOT / "configs" / "deepseek-r1.json")
    absorbed, naive = cache_values_per_token(r1, "absorb"), cache_values_per_token(r1, "naive")
    print("\nKV cache per token per layer at R1's shape (bf16)")
    print(f"  absorbed (latent {r1.kv_lora_rank} + rope key {r1.qk_rope_head_dim}): {absorbed:>6} values, {2 * absorbed / 1024:7.2f} KiB")
    print(f"  naive ({r1.n_heads} heads x ({r1.qk_head_dim} + {r1.v_head_dim})):   {naive:>6} values, {2 * naive / 1024:7.2f} KiB")
    print(f"  naive / absorbed: {naive / absorbed:.1f}x   (target >= 50x)")


if __name__ == "__main__":
    main()
