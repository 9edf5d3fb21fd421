"""Throughput of the dsr1 lm-eval model's generate_until at several batch sizes (one process).

Builds gsm8k-format zero-shot requests ("Question: ...\\nAnswer:", the task's stop strings) from the
bundled tiny task's questions and times lm.generate_until on the same requests at each batch size (the
serving engine's max_num_seqs, which --batch_size sets by default).
Without --ckpt-path it runs the embedded tiny random-weight checkpoint (configs/tiny.json):

    python scripts/bench/lm_eval_generate.py --batch-sizes 1 8 [--json lm_eval_generate.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from lm_eval.api.instance import Instance

from bench_report import meta, table, write_json
from bench_timing import Timer

from dsr1 import embedded
from dsr1.eval.lm_eval import DSR1LM

TASK_DIR = Path(__file__).resolve().parents[2] / "evals" / "tasks" / "gsm8k_tiny"
UNTIL = ["Question:", "</s>", "<|im_end|>"]  # gsm8k.yaml's generation_kwargs


def build_requests(n: int, max_gen_toks: int) -> list[Instance]:
    questions = [json.loads(line)["question"] for split in ("test", "train") for line in (TASK_DIR / f"{split}.jsonl").read_text().splitlines()]
    gen_kwargs = {"until": UNTIL, "do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks}
    return [
        Instance("generate_until", doc={}, arguments=(f"Question: {questions[i % len(questions)]}\nAnswer:", dict(gen_kwargs)), idx=i)
        for i in range(n)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-path", help="checkpoint directory; default: the embedded tiny checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-gen-toks", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (the fastest is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a busy 2-core machine, 2 threads make timings erratic)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    lm = DSR1LM(ckpt_path=str(args.ckpt_path or embedded.tiny_checkpoint()), device=args.device, max_length=1024)
    requests = build_requests(args.requests, args.max_gen_toks)
    timer = Timer(lm.device)
    lm.generate_until(requests[:2], disable_tqdm=True)  # warm-up
    seconds, outputs = {b: float("inf") for b in args.batch_sizes}, {}
    for _ in range(args.repeats):  # alternate batch sizes so a busy machine slows them alike; keep the best
        for batch_size in args.batch_sizes:
            lm.engine_config = replace(lm.engine_config, max_num_seqs=batch_size)  # one loaded model for every batch size

            def run(batch_size: int = batch_size) -> None:
                outputs[batch_size] = lm.generate_until(requests, disable_tqdm=True)

            seconds[batch_size] = min(seconds[batch_size], timer(run))
    rows = [(b, seconds[b], sum(len(lm.tok_encode(text, add_special_tokens=False)) for text in outputs[b])) for b in args.batch_sizes]

    base = rows[0][2] / rows[0][1]
    print(f"{args.requests} requests, max_gen_toks={args.max_gen_toks}, device={lm.device}, threads={args.threads}, best of {args.repeats}")
    print(table([("batch_size", "seconds", "tokens*", "tokens/s", "speedup")] + [
        (batch_size, f"{secs:.2f}", tokens, f"{tokens / secs:.1f}", f"{tokens / secs / base:.2f}x") for batch_size, secs, tokens in rows]))
    same = all(out == outputs[args.batch_sizes[0]] for out in outputs.values())
    print(f"outputs identical across batch sizes: {same}   (*generated text re-encoded)")
    write_json(args.json, {"meta": meta(lm.device), "requests": args.requests, "max_gen_toks": args.max_gen_toks, "threads": args.threads,
                           "repeats": args.repeats, "outputs_identical": same,
                           "rows": [{"batch_size": b, "seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs} for b, secs, tokens in rows]})


if __name__ == "__main__":
    main()
