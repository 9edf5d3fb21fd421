"""The placement report behind scripts/placement_report.py: route tokens, then tabulate and plot
how linear and round-robin placement spread them over EP ranks."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dsr1.config import ModelConfig
from dsr1.placement_stats import LayerLoad, compare_placements, synthetic_routing

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "deepseek-r1.json"


def main_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ep", type=int, default=8, help="expert-parallel size to evaluate")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="config.json for synthetic routing (default: R1)")
    p.add_argument("--tokens", type=int, default=4096, help="synthetic tokens per layer")
    p.add_argument("--layers", type=int, default=4, help="synthetic MoE layers (each with its own popularity draw)")
    p.add_argument("--skew", type=float, action="append", help="group-popularity skew for synthetic routing (repeatable; default 0 0.25 0.5)")
    p.add_argument("--ckpt-path", help="route real prompts through this checkpoint's routers instead")
    p.add_argument("--prompt", action="append", help="prompt for --ckpt-path (repeatable)")
    p.add_argument("--device", default=None, help="device for --ckpt-path (default: CUDA if available)")
    p.add_argument("--out", default="placement_report.png", help="PNG plot of per-rank load")
    p.add_argument("--seed", type=int, default=0)


def checkpoint_routing(ckpt_path: str, prompts: list[str], ep: int, device) -> tuple[list[torch.Tensor], torch.Tensor, ModelConfig]:
    """Run prompts through a checkpoint and record every MoE layer's expert ids; prompt i lives on rank i % ep."""
    from dsr1.engine.load import load_model
    from dsr1.tokenizer import encode_prompt, load_tokenizer

    model = load_model(ckpt_path, device=device, progress=False)
    tok = load_tokenizer(ckpt_path)
    gates = [layer.ffn.gate for layer in model.layers if hasattr(layer.ffn, "gate")]
    per_layer: list[list[torch.Tensor]] = [[] for _ in gates]
    hooks = [g.register_forward_hook(lambda m, i, o, j=j: per_layer[j].append(o[1].cpu())) for j, g in enumerate(gates)]
    token_rank = []
    with torch.inference_mode():
        for i, text in enumerate(prompts):
            ids = encode_prompt(tok, text, chat=True)
            model(torch.tensor([ids], device=model.embed.weight.device))
            token_rank += [i % ep] * len(ids)
    for h in hooks:
        h.remove()
    return [torch.cat(ids) for ids in per_layer], torch.tensor(token_rank), model.cfg


def summarize(loads: dict[str, list[LayerLoad]]) -> dict[str, dict[str, float]]:
    out = {}
    for strategy, layers in loads.items():
        pairs = sum(int(layer.rank_load.sum()) for layer in layers)
        out[strategy] = {
            "imbalance_mean": sum(layer.imbalance for layer in layers) / len(layers),
            "imbalance_max": max(layer.imbalance for layer in layers),
            "cross_rank_frac": sum(layer.cross_rank for layer in layers) / max(pairs, 1),
            "ranks_per_token": float(torch.cat([layer.ranks_touched for layer in layers]).float().mean()),
        }
    return out


def run(args: argparse.Namespace) -> None:
    sources = {}
    if args.ckpt_path:
        prompts = args.prompt or ["What is the capital of France?", "Write a haiku about the sea.", "Explain MoE routing.", "2+2=?"]
        layers, token_rank, cfg = checkpoint_routing(args.ckpt_path, prompts, args.ep, args.device)
        sources["prompts"] = (layers, token_rank)
    else:
        cfg = ModelConfig.from_file(args.config)
        token_rank = torch.arange(args.tokens) % args.ep
        for skew in args.skew or [0.0, 0.25, 0.5]:
            layers = [synthetic_routing(cfg, args.tokens, skew, seed=args.seed + i) for i in range(args.layers)]
            sources[f"skew={skew:g}"] = (layers, token_rank)

    print(f"EP={args.ep}, {cfg.n_routed_experts} experts in {cfg.n_expert_groups} groups, top-{cfg.n_activated_experts} of {cfg.n_limited_groups} groups")
    print(f"{'routing':<12} {'placement':<12} {'imbalance mean':>15} {'imbalance max':>14} {'cross-rank':>11} {'ranks/token':>12}")
    results = {}
    for name, (layers, token_rank) in sources.items():
        loads = compare_placements(layers, token_rank, cfg.n_routed_experts, args.ep)
        results[name] = loads
        for strategy, row in summarize(loads).items():
            print(
                f"{name:<12} {strategy:<12} {row['imbalance_mean']:>15.3f} {row['imbalance_max']:>14.3f} "
                f"{row['cross_rank_frac']:>10.1%} {row['ranks_per_token']:>12.2f}"
            )
    plot(results, args.ep, args.out)
    print(f"wrote {args.out}")


def plot(results: dict[str, dict[str, list[LayerLoad]]], ep: int, out: str) -> None:
    """One panel per routing source: per-rank load (pairs) of the first MoE layer, linear vs round-robin.

    (Averaging over layers would hide the imbalance: each layer favours different groups.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.5), squeeze=False)
    for ax, (name, loads) in zip(axes[0], results.items()):
        width = 0.4
        for i, (strategy, layers) in enumerate(loads.items()):
            ax.bar(torch.arange(ep) + (i - 0.5) * width, layers[0].rank_load, width, label=strategy)
        ax.set_title(f"{name}, first MoE layer")
        ax.set_xlabel("EP rank")
        ax.set_ylabel("(token, expert) pairs")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
