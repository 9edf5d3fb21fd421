"""Where a decode step's GPU time goes: the kernels of one eager decode step of dsr1, grouped by name,
with their share of the step's GPU time (torch.profiler). Random FP8 weights built on the GPU.
--compile runs the decoder blocks through torch.compile, as DecodeGraphs(compile=True) does.

    python scripts/bench/profile_decode.py --config configs/r1-5layer.json --batch 1 64 [--compile] [--timeline] [--json profile_decode.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_measure import Dsr1Runner
from bench_report import meta, table, write_json
from bench_weights import fill_dsr1
from dsr1.checkpoint.loader import build_model
from dsr1.config import ModelConfig
from dsr1.engine.decode_graphs import compiled_block, decode_step, run_block
from dsr1.kernels.fp8_gemm import BACKENDS, select_fp8_backend, use_fp8_gemm

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs/r1-5layer.json")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--fp8-gemm", choices=BACKENDS, default="auto")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--compile", action="store_true", help="decoder blocks through torch.compile")
    p.add_argument("--calls", default=None, help="also list each call of the kernels whose name contains this, in launch order")
    p.add_argument("--timeline", action="store_true", help="also list every kernel of the step in launch order, one per line")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args()
    device = torch.device("cuda")
    cfg = ModelConfig.from_file(args.config)
    model = build_model(cfg, device, torch.bfloat16, fp8=True, max_seq_len=args.context + 8).eval()
    fill_dsr1(model, cfg)
    use_fp8_gemm(model, select_fp8_backend(args.fp8_gemm, device))
    runner = Dsr1Runner(model)
    block = compiled_block() if args.compile else run_block
    result = {"meta": meta(device), "config": str(args.config), "compiled": args.compile, "batches": []}
    with torch.inference_mode():
        for b in args.batch:
            cache = runner.decode_cache(b, args.context, 4)
            tokens = torch.randint(0, cfg.vocab_size, (b, 1), device=device)
            logits_at = torch.zeros(b, dtype=torch.long, device=device)

            def step(pos: int, block=block) -> None:  # over all cache rows, as a graph does: one shape
                decode_step(model, tokens, pos, cache, logits_at, args.context + 4, block)

            step(args.context, run_block)  # eager first: kept dense weights exist before tracing
            for pos in range(args.context, args.context + 2):  # warm-up: Triton compiles, cuBLAS picks
                step(pos)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step(args.context + 2)
                torch.cuda.synchronize()
            kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
            total = sum(e.self_device_time_total for e in kernels)
            print(f"\nbatch {b}: {sum(e.count for e in kernels)} kernels, {total / 1e3:.2f} ms of GPU time in one eager step{' (compiled blocks)' if args.compile else ''}")
            top = sorted(kernels, key=lambda e: -e.self_device_time_total)[: args.top]
            result["batches"].append({"batch": b, "kernels": sum(e.count for e in kernels), "gpu_ms": total / 1e3,
                                      "top": [{"kernel": e.key, "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in top]})
            print(table([("kernel", "ms", "share", "calls")] + [(e.key[:110], f"{e.self_device_time_total / 1e3:.3f}",
                                                             f"{100 * e.self_device_time_total / total:.1f}%", e.count) for e in top]))
            if args.calls:
                calls = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and args.calls in e.name), key=lambda e: e.time_range.start)
                print(f"each {args.calls} call (us): " + " ".join(f"{e.device_time_total:.1f}" for e in calls))
            if args.timeline:
                calls = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
                print("\n".join(f"{e.time_range.start - calls[0].time_range.start:9.1f} us {e.device_time_total:7.1f} us  {e.name[:100]}" for e in calls))

    write_json(args.json, result)


if __name__ == "__main__":
    main()
