"""Decode time per output token under expert parallelism, the whole model end to end: every rank holds the
replicated weights and its own routed experts, decodes its own batch, and all ranks step together (as
scripts/generate.py --ep does). Random FP8 weights built on each device from per-tensor seeded generators,
so every rank, under every placement, holds the same model as one GPU would.

Run under torchrun, one process per GPU:
    torchrun --nproc-per-node 2 scripts/bench/ep_decode.py --config configs/r1-5layer.json \\
        --all2all deepep_ll torch --placement linear round_robin --fp8-dispatch off on --skew 0 0.5 --batch 1 8 64 \\
        --json ep_decode.json

Per configuration and batch per rank: the slowest rank's mean ms per decode step (each sequence's time
per output token), tokens/s over all ranks, and the torch dispatcher's time over this row's (same
placement, skew and batch). deepep_ll steps replay CUDA graphs, as generation does (--cuda-graphs off:
eager); the torch dispatcher reads split sizes on the host and runs eagerly. "skew" adds a
group-popularity bias to every router (scripts/bench/moe_layer.py's), 0 = the model's own routing.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.distributed as dist

from bench_measure import Dsr1GraphRunner, Dsr1Runner, measure_decode
from bench_report import meta, table, write_json
from bench_timing import Timer
from bench_weights import fill_dsr1, group_popularity_bias
from dsr1.checkpoint.loader import build_model
from dsr1.config import ModelConfig
from dsr1.kernels.fp8_gemm import BACKENDS, select_fp8_backend, use_fp8_gemm
from dsr1.model.moe import MoE
from dsr1.engine.load import make_dispatcher
from dsr1.parallel.dist import join_ep_benchmark, log_rank0
from dsr1.parallel.placement import expert_placement


def build(cfg: ModelConfig, dispatcher, device: torch.device, dtype: torch.dtype, gemm: str, max_len: int):
    """This rank's model: FP8 weights (its experts in slot order), multiplied by the `gemm` backend."""
    model = build_model(cfg, device, dtype, fp8=True, dispatcher=dispatcher, max_seq_len=max_len)
    with torch.no_grad():
        fill_dsr1(model, cfg, expert_ids=list(dispatcher.local_expert_ids))
    use_fp8_gemm(model, select_fp8_backend(gemm, device))
    return model.eval()


def set_skew(model, cfg: ModelConfig, skew: float, base: list[torch.Tensor]) -> None:
    """Every router's bias = its own + a group-popularity bias (the same on every rank)."""
    gen = torch.Generator(model.embed.weight.device).manual_seed(0)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe, bias in zip(moes, base):
        moe.gate.bias.copy_(bias + group_popularity_bias(cfg, skew, gen, bias.device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="HF config.json of the model (e.g. configs/r1-5layer.json)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], help="sequences decoded per rank")
    p.add_argument("--all2all", nargs="+", default=["deepep_ll", "torch"])
    p.add_argument("--placement", nargs="+", default=["linear", "round_robin"])
    p.add_argument("--fp8-dispatch", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--skew", nargs="+", type=float, default=[0.0, 0.5], help="0 = the model's own routing")
    p.add_argument("--fp8-gemm", choices=BACKENDS, default="auto", help="FP8 matmul backend")
    p.add_argument("--cuda-graphs", choices=("on", "off"), default="on", help="replay deepep_ll's decode steps from CUDA graphs")
    p.add_argument("--compile-decode", choices=("on", "off"), default="off",
                   help="with CUDA graphs, decoder blocks through torch.compile (off by default: each configuration compiles anew)")
    p.add_argument("--context", type=int, default=512, help="positions already in the KV cache")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON (rank 0)")
    args = p.parse_args()

    rank, world, device, dtype = join_ep_benchmark()
    cfg = ModelConfig.from_file(args.config)
    timer, group = Timer(device), dist.group.WORLD
    max_len = args.context + args.warmup + args.steps + 1
    rows = []
    for strategy, all2all, fp8 in itertools.product(args.placement, args.all2all, args.fp8_dispatch):
        if fp8 == "on" and all2all != "deepep_ll":
            continue
        placement = expert_placement(cfg.n_routed_experts, world, rank, strategy)
        dispatcher = make_dispatcher(all2all, placement, group, max(args.batch), cfg.dim, fp8 == "on")
        model = build(cfg, dispatcher, device, dtype, args.fp8_gemm, max_len)
        base = [m.gate.bias.clone() for m in model.modules() if isinstance(m, MoE)]
        graphs = args.cuda_graphs == "on" and device.type == "cuda" and dispatcher.capturable
        for skew, batch in itertools.product(args.skew, args.batch):
            set_skew(model, cfg, skew, base)
            runner = Dsr1GraphRunner(model, group, compile=args.compile_decode == "on") if graphs else Dsr1Runner(model)
            with torch.inference_mode():
                d = measure_decode(runner, batch, args.context, args.steps, args.warmup, cfg.vocab_size, timer)
            ms = torch.tensor([d["ms_per_step"]], device=device)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the ranks step together: the slowest sets the pace
            rows.append({"all2all": all2all, "fp8_dispatch": fp8, "placement": strategy, "skew": skew, "batch_per_rank": batch,
                         "cuda_graphs": graphs, "compiled": graphs and args.compile_decode == "on", "ms_per_step": ms.item(), "tokens_per_s": world * batch * 1e3 / ms.item()})
            log_rank0(f"[row] {json.dumps(rows[-1])}")  # as it comes: a run cut short keeps what it measured
            del runner
        del model, dispatcher
        if device.type == "cuda":
            torch.cuda.empty_cache()

    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    log_rank0(f"EP={world}, {args.config}, {card}; decode with {args.context} cached positions, slowest rank, mean of {args.steps} steps")
    header = ("all2all", "fp8", "placement", "skew", "batch/rank", "graphs", "compiled", "ms/step", "tokens/s", "torch / this")
    lines = [header]
    same = ("placement", "skew", "batch_per_rank")
    for r in rows:
        peer = next((b for b in rows if b["all2all"] == "torch" and all(b[k] == r[k] for k in same)), None)
        lines.append((r["all2all"], r["fp8_dispatch"], r["placement"], f"{r['skew']:g}", r["batch_per_rank"], r["cuda_graphs"], r["compiled"],
                      f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s']:.0f}", f"{peer['ms_per_step'] / r['ms_per_step']:.2f}" if peer else "-"))
    log_rank0(table(lines))
    if rank == 0:
        write_json(args.json, {"meta": meta(device), "ep": world, "device": card, "config": args.config, "rows": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
