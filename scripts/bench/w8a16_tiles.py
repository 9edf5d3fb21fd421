"""Tune and time the W8A16 kernel (dsr1/kernels/w8a16.py) on R1's shapes: each launch config's time per
call (20 calls replayed from a CUDA graph, so host launch cost is excluded) and the weight bandwidth it
reaches (bytes of the weights the call must read / time), next to the card's copy bandwidth.

    python scripts/bench/w8a16_tiles.py [--json w8a16_tiles.json]

Dense products at 1 and 64 rows; routed experts (256 of them, [2048, 7168] and [7168, 2048]) on the
masked layout with the counts of a top-8 routing of 1 and 64 tokens, the kernel launched for the experts
that a batch of that many tokens can reach (w8a16.active_experts), as the MoE layer launches it.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from bench_report import meta, table, write_json
from bench_timing import Timer, copy_bandwidth
from dsr1.fp8 import BLOCK, FP8_DTYPE
from dsr1.kernels import w8a16

DENSE = {"q_b": (24576, 1536), "o": (7168, 16384), "dense_up": (18432, 7168), "dense_down": (7168, 18432)}
EXPERTS = {"expert_up": (2048, 7168), "expert_down": (7168, 2048)}
CONFIGS = [{"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
           for bm, bn, w, st in itertools.product((16, 32), (32, 64, 128), (4, 8), (3, 5))]
ROW_CONFIGS = [{"BLOCK_M": 1, "BLOCK_N": bn, "num_warps": w, "num_stages": st, **split}
               for bn, w, st, split in itertools.product((16, 32, 64), (4, 8), (1, 3), ({}, {"SPLIT_K": 1}, {"SPLIT_K": 2}, {"SPLIT_K": 4}, {"SPLIT_K": 8}))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args()
    device = torch.device("cuda")
    timer = Timer(device)
    bw = copy_bandwidth(device, 2 << 30, timer)  # read + write bytes of a copy per second, as model.py's floor uses
    gen = torch.Generator(device).manual_seed(0)
    cases = []
    for name, (n, k) in DENSE.items():
        w = torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16).to(FP8_DTYPE)
        s = torch.rand(-(-n // BLOCK), -(-k // BLOCK), generator=gen, device=device)
        for m in (1, 64):
            x = torch.randn(1, m, k, generator=gen, device=device, dtype=torch.bfloat16)
            cases.append((f"{name} m={m}", w.nbytes, m, lambda c, x=x, w=w, s=s: w8a16.grouped_linear(x, w[None], s[None], config=c)))
    for name, (n, k) in EXPERTS.items():
        w = torch.randn(256, n, k, generator=gen, device=device, dtype=torch.bfloat16).to(FP8_DTYPE)
        s = torch.rand(256, -(-n // BLOCK), -(-k // BLOCK), generator=gen, device=device)
        for tokens in (1, 64):
            ids = torch.rand(tokens, 256, generator=gen, device=device).topk(8, dim=-1).indices.flatten()
            counts = torch.zeros(256, dtype=torch.int32, device=device).scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
            x = torch.randn(256, tokens, k, generator=gen, device=device, dtype=torch.bfloat16)
            active = int((counts > 0).sum())
            listed = w8a16.active_experts(counts, tokens * 8)  # as MoE passes them: the kernel runs for these experts only
            cases.append((f"{name} tokens={tokens} ({active} experts)", w[0].nbytes * active, tokens,
                          lambda c, x=x, w=w, s=s, counts=counts, listed=listed: w8a16.grouped_linear(x, w, s, counts, config=c, experts=listed)))
    rows = []
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    for label, nbytes, m, fn in cases:
        default = timer.per_call(lambda: fn(None), graph=True)
        configs = CONFIGS + (ROW_CONFIGS if m == 1 else [])
        timed = [(timer.per_call(lambda c=c: fn(c), graph=True), c) for c in configs]
        best = min(timed, key=lambda t: t[0])
        rows.append({"case": label, "bytes": nbytes, "default_us": 1e6 * default, "best_us": 1e6 * best[0], "best_config": best[1],
                     "default_of_bw": nbytes / default / bw, "best_of_bw": nbytes / best[0] / bw, "all_us": [(1e6 * t, c) for t, c in timed]})
        r = rows[-1]
        print(f"{label}: default {r['default_us']:.1f} µs, best {r['best_us']:.1f} µs", flush=True)  # as it comes
    print(table([("case", "default µs", "of bw", "best µs", "of bw", "best config")] + [
        (r["case"], f"{r['default_us']:.1f}", f"{r['default_of_bw']:.1%}", f"{r['best_us']:.1f}", f"{r['best_of_bw']:.1%}", r["best_config"]) for r in rows]))
    write_json(args.json, {"meta": meta(device), "device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows})


if __name__ == "__main__":
    main()
