"""Check that expert-parallel runs reproduce the single-process model.

    python scripts/ep_parity.py --ckpt-path DIR --reference ref.json            # one process: write the reference
    torchrun --nproc-per-node 4 scripts/ep_parity.py --ckpt-path DIR --reference ref.json \\
        --all2all deepep_ll --placement linear round_robin --fp8-dispatch off on

For fixed prompts, split across ranks as generation splits them (contiguous blocks: uneven ranks,
and with few prompts some idle ones), it records each prompt's next-token logits after prefill and
its greedy continuation. Under torchrun it runs every (placement, FP8 dispatch) combination in one
process (DeepEP's buffer is made once) and prints, per combination, how many prompts' greedy tokens
equal the reference and the largest logit error relative to the largest reference logit.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from dsr1.config import GenerationConfig, ParallelConfig
from dsr1.engine.generation import generate
from dsr1.engine.load import gather_to_rank0, load_model
from dsr1.parallel.dist import init_distributed, log_rank0, rank_share
from dsr1.tokenizer import encode_prompt, load_tokenizer

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea and the wind over it.",
    "2+2=",
    "Explain expert parallelism in mixture-of-experts models in two sentences, please.",
    "List three prime numbers.",
]


@torch.inference_mode()
def run(model, prompts: list[list[int]], max_new_tokens: int, group) -> tuple[torch.Tensor, list[list[int]]]:
    """This rank's prompts -> (next-token logits after prefill [b, v] fp32, greedy continuations)."""
    device = model.embed.weight.device
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    tokens = torch.zeros(len(prompts), max(lengths.tolist(), default=1), dtype=torch.long)  # right-padded
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    logits = model(tokens.to(device), logits_at=(lengths - 1).to(device)).cpu()  # one forward on every rank
    return logits, generate(model, prompts, GenerationConfig(max_new_tokens), group=group)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-path", required=True)
    p.add_argument("--reference", required=True, help="JSON written by the one-process run, compared by the others")
    p.add_argument("--all2all", default="torch", choices=["torch", "deepep_ll"])
    p.add_argument("--placement", nargs="+", default=["linear", "round_robin"])
    p.add_argument("--fp8-dispatch", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-dispatch-tokens", type=int, default=128)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    p.add_argument("--fp8-weights", action="store_true", help="keep FP8 weights (w8a16 kernel on CUDA), in the reference run too")
    p.add_argument("--json", help="write the result rows here (rank 0)")
    args = p.parse_args()

    rank, world, _ = init_distributed()
    group = dist.group.WORLD if world > 1 else None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    tok = load_tokenizer(args.ckpt_path)
    prompts = [encode_prompt(tok, text, chat=True) for text in PROMPTS]
    mine = [prompts[i] for i in rank_share(len(prompts), rank, world)]

    if world == 1:
        model = load_model(args.ckpt_path, dtype=dtype, fp8=args.fp8_weights, progress=False)
        logits, tokens = run(model, mine, args.max_new_tokens, None)
        with open(args.reference, "w") as f:
            json.dump({"logits": logits.tolist(), "tokens": tokens}, f)
        print(f"wrote {args.reference}: {len(prompts)} prompts, {args.max_new_tokens} greedy tokens each")
        return

    rows = []
    for strategy in args.placement:
        for fp8 in args.fp8_dispatch:
            parallel = ParallelConfig(world, strategy, args.all2all, fp8 == "on", args.max_dispatch_tokens)
            model = load_model(args.ckpt_path, dtype=dtype, fp8=args.fp8_weights, progress=False, parallel=parallel, rank=rank, group=group)
            logits, tokens = run(model, mine, args.max_new_tokens, group)
            parts = gather_to_rank0((logits, tokens, model.load_stats.summary()), group)
            del model
            if rank == 0:
                ref = json.load(open(args.reference))
                got_logits = torch.cat([part[0] for part in parts])
                got_tokens = [t for part in parts for t in part[1]]
                want = torch.tensor(ref["logits"])
                rows.append({
                    "placement": strategy, "fp8_dispatch": fp8,
                    "tokens_identical": sum(a == b for a, b in zip(got_tokens, ref["tokens"])), "prompts": len(PROMPTS),
                    "max_logit_rel_err": float((got_logits - want).abs().max() / want.abs().max()),
                    "load": [part[2] for part in parts],
                })
    if rank == 0:
        log_rank0(f"EP={world}, --all2all {args.all2all}, {len(PROMPTS)} prompts split {[len(rank_share(len(PROMPTS), r, world)) for r in range(world)]}")
        log_rank0(f"{'placement':<12} {'fp8':<4} {'greedy tokens identical':>24} {'max logit rel err':>18}")
        for r in rows:
            log_rank0(f"{r['placement']:<12} {r['fp8_dispatch']:<4} {r['tokens_identical']:>19}/{r['prompts']:<4} {r['max_logit_rel_err']:>18.2e}")
        for line in rows[0]["load"]:
            log_rank0("  " + line)
        if args.json:
            json.dump({"ep": world, "all2all": args.all2all, "rows": rows}, open(args.json, "w"), indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
