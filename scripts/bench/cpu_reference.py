"""The reference model's own numbers, on the CPU it runs on:

1. the embedded default (`python scripts/generate.py`, 32 new tokens): first run, which builds the tiny
   checkpoint into a fresh cache directory, and a later run (targets: < 60 s and < 15 s on 2 cores);
2. time per new token with the KV cache at short and long context, against recomputing the whole
   sequence every step (the cache keeps it flat);
3. KV-cache bytes per token at R1's shape: the absorbed latent cache against the naive per-head one.

    python scripts/bench/cpu_reference.py [--json cpu_reference.json]
    python scripts/bench/cpu_reference.py --skip-embedded --contexts 8 --steps 1   # seconds (tests/bench)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench_report import meta, table, write_json
from bench_timing import Timer

from dsr1 import embedded
from dsr1.engine.load import load_model
from dsr1.config import ModelConfig
from dsr1.model.attention import MLA

ROOT = Path(__file__).resolve().parents[2]
TIMER = Timer("cpu")


def embedded_default_seconds() -> tuple[float, float]:
    """Wall time of `python scripts/generate.py` with an empty cache directory, then again."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache}

        def run() -> None:
            subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py")], env=env, check=True, capture_output=True)

        return TIMER(run), TIMER(run)


@torch.inference_mode()
def decode_ms_per_token(model, context: int, steps: int, cached: bool) -> float:
    """Mean ms per new token (batch 1) after a `context`-token prompt, with the cache or by full recompute."""
    tokens = torch.randint(2, 1000, (1, context + steps), generator=torch.Generator().manual_seed(0))
    if cached:
        cache = model.new_cache(1, context + steps)
        model(tokens[:, :context], 0, cache, logits_at=torch.tensor([context - 1]))

        def run() -> None:
            for i in range(steps):
                model(tokens[:, context + i : context + i + 1], context + i, cache, logits_at=torch.tensor([0]))
    else:

        def run() -> None:
            for i in range(steps):
                model(tokens[:, : context + i + 1], logits_at=torch.tensor([context + i]))

    return TIMER(run) * 1000 / steps


def cache_values_per_token(cfg: ModelConfig, impl: str) -> int:
    """Values one layer's cache holds per token (built on the meta device: no memory is used)."""
    cache = MLA(cfg, fp8=False, impl=impl).new_cache(1, 1, torch.bfloat16, "meta")
    return sum(t.numel() for t in cache.tensors())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per context")
    p.add_argument("--skip-embedded", action="store_true", help="skip the (slow) embedded-default timing")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    result = {"meta": meta("cpu")}

    if not args.skip_embedded:
        first, later = embedded_default_seconds()
        result["embedded_default_s"] = {"first": first, "later": later}
        print("embedded default (python scripts/generate.py, 32 new tokens)")
        print(f"  first run (builds the checkpoint): {first:6.1f} s   (target < 60 s)")
        print(f"  later run:                         {later:6.1f} s   (target < 15 s)")

    model = load_model(embedded.tiny_checkpoint(), device="cpu", dtype=torch.float32, progress=False)
    result["decode"] = []
    for context in args.contexts:
        cached = decode_ms_per_token(model, context, args.steps, cached=True)
        full = decode_ms_per_token(model, context, args.steps, cached=False)
        result["decode"].append({"context": context, "steps": args.steps, "kv_cache_ms": cached, "recompute_ms": full})
    print(f"\ntime per new token, tiny model, batch 1, CPU fp32, {args.steps} steps")
    print(table([("context", "KV cache ms", "recompute ms", "recompute / cache")] + [
        (d["context"], f"{d['kv_cache_ms']:.2f}", f"{d['recompute_ms']:.2f}", f"{d['recompute_ms'] / d['kv_cache_ms']:.1f}") for d in result["decode"]]))

    r1 = ModelConfig.from_file(ROOT / "configs" / "deepseek-r1.json")
    absorbed, naive = cache_values_per_token(r1, "absorb"), cache_values_per_token(r1, "naive")
    result["kv_cache_values_per_token_per_layer"] = {"absorbed": absorbed, "naive": naive}
    print("\nKV cache per token per layer at R1's shape (bf16)")
    print(f"  absorbed (latent {r1.kv_lora_rank} + rope key {r1.qk_rope_head_dim}): {absorbed:>6} values, {2 * absorbed / 1024:7.2f} KiB")
    print(f"  naive ({r1.n_heads} heads x ({r1.qk_head_dim} + {r1.v_head_dim})):   {naive:>6} values, {2 * naive / 1024:7.2f} KiB")
    print(f"  naive / absorbed: {naive / absorbed:.1f}x   (target >= 50x)")
    write_json(args.json, result)

if __name__ == "__main__":
    main()
