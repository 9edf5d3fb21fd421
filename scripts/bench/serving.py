"""Serving throughput and latency: the serving engine (dsr1.engine.engine: continuous batching, prefix caching)
against today's static batching (dsr1.engine.generation.generate on batches of the same maximum size, each batch
waiting for its longest answer), on the same gsm8k-shaped workload, with random FP8 weights (bench_weights).

    python scripts/bench/serving.py --config configs/r1-5layer.json --json out/serving.json            # one H100/H200
    python scripts/bench/serving.py --config configs/r1-5layer.json --rate 8 --json out/serving_rate8.json
    python scripts/bench/serving.py --smoke                                                             # CPU, seconds (CI)

Workload (bench_serving.make_workload, seeded by --seed): --requests prompts, each BOS + one shared few-shot
prefix of --prefix-tokens random tokens (gsm8k's 5-shot prefix is ~800 tokens) + a distinct question of
--suffix-tokens random tokens (± half). Each answer's length is drawn from a lognormal with median
--output-median and shape --output-sigma (long-tailed: sigma 0.8 puts p99 at ~6.4x the median), clipped to
[1, --max-output], and forced: the engine ignores EOS with max_tokens = the length, the static path never
stops at EOS and stops each row at its length. Arrivals: all at once (--rate 0), or a Poisson process of
--rate requests/s. The static path takes the requests that have arrived when its previous batch ends (up to
--max-num-seqs), or waits for the next arrival. Both decode from CUDA graphs where the run allows them
(--cuda-graphs: the static path's over its contiguous cache, the engine's over its paged one) and prefill in
chunks of --max-num-batched-tokens. The engine's pool defaults to the blocks --max-num-seqs sequences of the
longest prompt + answer need: the static path's largest cache.

Per system: output tokens/s (generated tokens / time from the first arrival to the last token), TTFT p50/p99
(arrival -> first token), TPOT p50/p99 (per request: (last token - first token) / (tokens - 1)), prefix-cache
hit rate (cached prompt tokens / prompt tokens), peak memory (GPU: torch.cuda.max_memory_allocated; CPU: this
process's peak RSS, VmHWM, reset before each run), the engine/static throughput ratio, and how many requests
got the same greedy tokens from both.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from pathlib import Path

import torch

from bench_report import meta, table, write_json
from bench_measure import read_config
from bench_serving import Trace, latencies, make_workload, peak_memory, reset_peak_memory
from bench_timing import Timer
from bench_weights import fill_dsr1
from dsr1.checkpoint.loader import build_model
from dsr1.config import GenerationConfig, ModelConfig
from dsr1.engine.decode_graphs import GRAPH_MODES, make_graphs
from dsr1.engine.engine import Engine, EngineConfig, SamplingParams
from dsr1.engine.generation import generate
from dsr1.kernels.fp8_gemm import BACKENDS, select_fp8_backend, use_fp8_gemm
from dsr1.model.dispatch import LocalDispatcher

ROOT = Path(__file__).resolve().parents[2]
SMOKE = dict(config=ROOT / "configs/tiny.json", vocab=512, device="cpu", requests=12, prefix_tokens=40, suffix_tokens=8,
             output_median=6, max_output=24, max_num_seqs=4, block_size=8, max_num_batched_tokens=64)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs/r1-5layer.json", help="HF config.json of the model")
    p.add_argument("--smoke", action="store_true", help="CPU smoke run on configs/tiny.json (512-token vocabulary, 12 short requests; other flags still apply); for CI")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--vocab", type=int, default=None, help="override vocab_size")
    p.add_argument("--fp8-gemm", choices=BACKENDS, default="auto", help="how the FP8 weights are multiplied (auto: as generate.py --fp8-weights)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prefix-tokens", type=int, default=800, help="shared few-shot prefix (after BOS)")
    p.add_argument("--suffix-tokens", type=int, default=60, help="mean distinct question length (uniform in ± half)")
    p.add_argument("--output-median", type=float, default=120, help="median answer length (lognormal)")
    p.add_argument("--output-sigma", type=float, default=0.8, help="lognormal shape: the spread of log(length)")
    p.add_argument("--max-output", type=int, default=1024, help="answer lengths are clipped to this")
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals, requests/s (0: all at once)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="the engine's running sequences = the static batch size")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None, help="engine pool; default: max-num-seqs x the longest prompt + answer")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="engine prefill tokens per step = the static prefill chunk")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--cuda-graphs", choices=GRAPH_MODES, default="auto", help="decode steps from CUDA graphs, both systems (auto: where the run allows)")
    p.add_argument("--chunk", type=int, default=512, help="tokens per MoE dispatch (LocalDispatcher max_tokens)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    if p.parse_args(argv).smoke:
        p.set_defaults(**SMOKE)  # flags given explicitly still win
    return p.parse_args(argv)


def build(args, cfg: ModelConfig, device: torch.device, max_len: int):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, device, dtype, fp8=True, dispatcher=LocalDispatcher(cfg.n_routed_experts, args.chunk), max_seq_len=max_len)
    fill_dsr1(model, cfg, args.seed)
    backend = select_fp8_backend(args.fp8_gemm, device)
    use_fp8_gemm(model, backend)
    return model.eval(), backend.name


def run_engine(model, work, config: EngineConfig) -> tuple[Trace, dict]:
    """Feed the requests as they arrive, step until all are answered -> the trace and the engine's stats."""
    engine, trace = Engine(model, config=config), Trace(work.arrivals)
    pending, rows = deque(range(len(work.prompts))), {}
    while pending or engine.has_unfinished_requests():
        while pending and work.arrivals[pending[0]] <= trace.now():
            i = pending.popleft()
            rows[engine.add_request(work.prompts[i], SamplingParams(max_tokens=work.lengths[i], ignore_eos=True))] = i
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, work.arrivals[pending[0]] - trace.now()))
            continue
        for out in engine.step():
            if out.new_token_ids:
                trace.token(rows[out.request_id], out.token_ids)
    s = engine.stats()
    return trace, {"prefix_hit_rate": s.cached_prompt_tokens / s.prompt_tokens, "preemptions": s.preemptions, "num_blocks": s.total_blocks + 1}


def run_static(model, work, batch_size: int, prefill_chunk: int, graphs=None) -> tuple[Trace, dict]:
    """Batches of the requests that have arrived (up to batch_size), each run to its longest answer."""
    trace, pending = Trace(work.arrivals), deque(range(len(work.prompts)))
    while pending:
        time.sleep(max(0.0, work.arrivals[pending[0]] - trace.now()))
        batch = []
        while pending and len(batch) < batch_size and work.arrivals[pending[0]] <= trace.now():
            batch.append(pending.popleft())
        lengths = [work.lengths[i] for i in batch]
        config = GenerationConfig(max(lengths), eos_id=-1, prefill_chunk=prefill_chunk)  # eos_id -1: never stops at EOS
        outs: dict[int, list[int]] = {row: [] for row in range(len(batch))}

        def on_token(row: int, token: int) -> None:
            outs[row].append(token)
            trace.token(batch[row], outs[row])

        generate(model, [work.prompts[i] for i in batch], config, on_token=on_token, should_stop=lambda row, ids: len(ids) >= lengths[row], graphs=graphs)
    return trace, {"prefix_hit_rate": 0.0}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    _, cfg = read_config(args.config, args.vocab)
    work = make_workload(args, cfg.vocab_size)
    longest = max(map(len, work.prompts)) + args.max_output
    model, backend = build(args, cfg, device, longest)
    num_blocks = args.num_blocks or args.max_num_seqs * -(-longest // args.block_size) + 1
    config = EngineConfig(block_size=args.block_size, num_blocks=num_blocks, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
                          cuda_graphs=args.cuda_graphs)
    graphs = make_graphs(model, args.cuda_graphs, longest, args.max_num_seqs)  # the static path's
    warm = make_workload(args, cfg.vocab_size, n=2, prefix_tokens=8, max_output=4)  # first forwards (kernel selection, allocator) off the clock
    run_engine(model, warm, config)
    run_static(model, warm, args.max_num_seqs, args.max_num_batched_tokens, graphs)
    timer, results, tokens = Timer(device), {}, {}
    for name, run in (("static", lambda: run_static(model, work, args.max_num_seqs, args.max_num_batched_tokens, graphs)),
                      ("engine", lambda: run_engine(model, work, config))):
        reset_peak_memory(device)
        box = []
        seconds = timer(lambda: box.append(run()))  # from the first arrival to the last token
        trace, counts = box[0]
        results[name] = {"seconds": seconds, "output_tokens_per_s": sum(work.lengths) / seconds, **latencies(trace, work.lengths), **counts,
                         "peak_memory_bytes": peak_memory(device)}
        tokens[name] = trace.tokens
    same = sum(tokens["engine"][i] == tokens["static"][i] for i in range(len(work.prompts)))
    ratio = results["engine"]["output_tokens_per_s"] / results["static"]["output_tokens_per_s"]

    print(f"{len(work.prompts)} requests: BOS + {args.prefix_tokens} shared + ~{args.suffix_tokens} own prompt tokens; answers lognormal "
          f"(median {args.output_median:g}, sigma {args.output_sigma:g}, max {args.max_output}): {sum(work.lengths)} tokens, longest "
          f"{max(work.lengths)}; arrivals {'all at once' if not args.rate else f'Poisson {args.rate:g}/s'}; max {args.max_num_seqs} sequences; "
          f"{device} ({backend}); same greedy tokens: {same}/{len(work.prompts)}")
    rows = [("system", "out tok/s", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms", "prefix hit", "peak MiB")]
    for name, r in results.items():
        rows.append((name, f"{r['output_tokens_per_s']:.1f}", f"{r['ttft_p50']:.3f}", f"{r['ttft_p99']:.3f}", f"{1e3 * r['tpot_p50']:.2f}",
                     f"{1e3 * r['tpot_p99']:.2f}", f"{r['prefix_hit_rate']:.1%}", f"{r['peak_memory_bytes'] / 2**20:.0f}"))
    print(table(rows))
    print(f"engine / static throughput: {ratio:.2f}x")
    workload = {k: getattr(args, k) for k in ("requests", "prefix_tokens", "suffix_tokens", "output_median", "output_sigma", "max_output", "rate",
                                              "max_num_seqs", "block_size", "max_num_batched_tokens", "seed")}
    return write_json(args.json, {"meta": meta(device), "config": str(args.config), "fp8_gemm": backend, "workload": workload,
                                  "output_tokens": sum(work.lengths), "same_greedy_tokens": same, "engine_over_static": ratio, **results})


if __name__ == "__main__":
    main()
