"""Microbenchmark one MoE layer (route + dispatch + experts + combine) under expert parallelism.

Run under torchrun, one process per GPU:
    torchrun --nproc-per-node 4 scripts/bench/moe_layer.py --all2all deepep_ll torch --placement linear round_robin \
        --weights bf16 fp8 --tokens 1 8 64 128 --json moe_layer.json

R1's shape by default (hidden 7168, 256 experts in 8 groups, top-8, expert inner 2048), random bf16 or
FP8 weights, `--tokens` tokens per rank (a decode step's batch per rank). Every configuration sees the same tokens and the same router, so
linear and round-robin route identically and differ only in where the experts live. "skewed" adds a
group-popularity bias to the router (R1's e_score_correction_bias steers selection), as
scripts/placement_report.py does. Prints one row per configuration: the slowest rank's mean time per
layer, the same without expert compute (dispatch + combine only), the heaviest rank's received rows,
the time relative to linear placement, and the torch dispatcher's time over this row's (same placement).
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import torch
import torch.distributed as dist

from bench_report import meta, table, write_json
from bench_timing import Timer
from bench_weights import group_popularity_bias
from dsr1.fp8 import FP8_DTYPE
from dsr1.config import ModelConfig
from dsr1.kernels.fp8_gemm import select_fp8_backend, use_fp8_gemm
from dsr1.model.moe import MoE
from dsr1.engine.load import make_dispatcher
from dsr1.model.dispatch import single_dispatch
from dsr1.parallel.dist import join_ep_benchmark, log_rank0
from dsr1.parallel.placement import expert_placement
from dsr1.placement_report import DEFAULT_CONFIG


def build_layer(cfg: ModelConfig, dispatcher, skew: float, device: torch.device, dtype: torch.dtype, fp8: bool) -> MoE:
    """One MoE layer, built on `device`, with the same random router on every rank and this rank's experts
    (FP8 weights with block scales, multiplied by the w8a16 kernel, if `fp8`)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        moe = MoE(cfg, dispatcher, fp8=fp8)
    torch.set_default_dtype(default_dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in moe.named_parameters():  # each expert or MLP weight [..., out, in]
            if p.dtype == FP8_DTYPE:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=dtype).clamp_(-8, 8).to(FP8_DTYPE))
            elif name.endswith("scale"):
                p.fill_(1 / math.sqrt(128 * p.shape[-1]))  # p [.., out/128, in/128]: outputs of about unit variance
            else:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]), generator=gen)
        moe.gate.weight.mul_(2)  # wide router logits, as the synthetic checkpoints have
        moe.gate.bias.copy_(group_popularity_bias(cfg, skew, gen, device))
    if fp8:
        use_fp8_gemm(moe, select_fp8_backend("auto", device))
    return moe


def time_layer(moe: MoE, x: torch.Tensor, iters: int, experts: bool, graph: bool = False) -> float:
    """Mean µs per call on this rank; experts=False times route + dispatch + combine only; graph=True
    replays the calls from a CUDA graph (what decode does; the dispatcher must be capturable)."""
    d = moe.dispatcher

    outputs = {}  # experts=False: a stand-in for the expert outputs, made once (an FP8 receive can't be combined)

    def step():
        if experts:
            return moe(x)
        w, ids = moe.gate(x)
        recv, counts, handle = d.dispatch(x, ids, w)
        y = outputs.setdefault("y", torch.zeros(recv.shape, dtype=x.dtype, device=x.device))
        return d.combine(y, handle)

    for _ in range(3):
        step()
    run = step
    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        with single_dispatch(d), torch.cuda.graph(cuda_graph):
            step()
        run = cuda_graph.replay
    dist.barrier()  # every rank starts together: a dispatch waits for the slowest
    return 1e6 * Timer(x.device).per_call(run, iters, warmup=0)


def received_rows(moe: MoE, x: torch.Tensor) -> int:
    """(token, expert) rows this rank's experts receive for x (one full dispatch + combine)."""
    weights, expert_ids = moe.gate(x)
    recv, counts, handle = moe.dispatcher.dispatch(x, expert_ids, weights)
    moe.dispatcher.combine(moe.experts(recv, counts), handle)
    return int(counts.sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--tokens", type=int, nargs="+", default=[128], help="tokens per rank (one dispatch each); decode batch sizes")
    p.add_argument("--weights", nargs="+", default=["bf16"], choices=["bf16", "fp8"], help="expert weights: bf16, or FP8 (w8a16 kernel on CUDA)")
    p.add_argument("--all2all", nargs="+", default=["deepep_ll", "torch"])
    p.add_argument("--placement", nargs="+", default=["linear", "round_robin"])
    p.add_argument("--fp8-dispatch", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--skew", nargs="+", type=float, default=[0.0, 0.5], help="0 = uniform routing")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--cuda-graph", action="store_true", help="replay capturable dispatchers' layers (deepep_ll) from a CUDA graph, as decode does")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON (rank 0)")
    args = p.parse_args()

    rank, world, device, dtype = join_ep_benchmark()
    cfg = ModelConfig.from_file(args.config)
    max_tokens = max(args.tokens)
    rows = []
    for all2all, fp8, weights in itertools.product(args.all2all, args.fp8_dispatch, args.weights):
        if fp8 == "on" and all2all != "deepep_ll":
            continue
        for skew, strategy in itertools.product(args.skew, args.placement):
            placement = expert_placement(cfg.n_routed_experts, world, rank, strategy)
            dispatcher = make_dispatcher(all2all, placement, None, max_tokens, cfg.dim, fp8 == "on")
            moe = build_layer(cfg, dispatcher, skew, device, dtype, weights == "fp8")
            for tokens in args.tokens:
                x = torch.randn(tokens, cfg.dim, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(rank))
                with torch.inference_mode():
                    received = torch.tensor([received_rows(moe, x)], device=device)
                    graph = args.cuda_graph and dispatcher.capturable
                    times = torch.tensor([time_layer(moe, x, args.iters, True, graph), time_layer(moe, x, args.iters, False, graph)], device=device)
                dist.all_reduce(times, op=dist.ReduceOp.MAX)
                dist.all_reduce(received, op=dist.ReduceOp.MAX)
                rows.append({"all2all": all2all, "fp8_dispatch": fp8, "weights": weights, "skew": skew, "experts": getattr(moe.experts.kernel(x), "name", "loop"), "cuda_graph": graph,
                             "placement": strategy, "tokens": tokens, "layer_us": times[0].item(), "dispatch_combine_us": times[1].item(),
                             "max_rank_rows": int(received)})
            del moe, dispatcher

    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    replayed = "; deepep_ll layers replayed from a CUDA graph, torch's eager" if args.cuda_graph else "; eager"
    log_rank0(f"EP={world}, hidden {cfg.dim}, {cfg.n_routed_experts} experts, top-{cfg.n_activated_experts}, {card}; slowest rank, mean of {args.iters}{replayed}")
    keys = ("all2all", "fp8_dispatch", "weights", "skew", "experts", "tokens")
    lines = [("all2all", "fp8", "weights", "skew", "experts", "tokens", "placement", "layer µs", "disp+comb µs", "max rows", "vs linear", "torch / this")]
    for r in rows:
        base = next(b for b in rows if b["placement"] == "linear" and all(b[k] == r[k] for k in keys))
        peer = next((b for b in rows if b["all2all"] == "torch" and b["placement"] == r["placement"] and b["fp8_dispatch"] == "off"
                     and all(b[k] == r[k] for k in keys if k not in ("all2all", "fp8_dispatch"))), None)
        lines.append((r["all2all"], r["fp8_dispatch"], r["weights"], f"{r['skew']:g}", r["experts"], r["tokens"], r["placement"], f"{r['layer_us']:.1f}",
                      f"{r['dispatch_combine_us']:.1f}", r["max_rank_rows"], f"{r['layer_us'] / base['layer_us']:.3f}",
                      f"{peer['layer_us'] / r['layer_us']:.2f}" if peer else "-"))
    log_rank0(table(lines))
    if rank == 0:
        write_json(args.json, {"meta": meta(device), "ep": world, "device": card, "rows": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
