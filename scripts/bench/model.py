"""Benchmark dsr1 against transformers' DeepseekV3ForCausalLM on the same random FP8 weights, next to the
memory-bandwidth floor of a decode step, and print a table (and write JSON).

    python scripts/bench/model.py --config configs/r1-5layer.json --json out/bench.json   # one H100
    python scripts/bench/model.py --smoke                                                  # CPU, seconds (CI)

One model is on the device at a time: dsr1, then HF, each built straight on the device from the same
seeded generators (scripts/bench/bench_weights.py). HF runs its own FP8 path (FineGrainedFP8: FP8Linear and
grouped_mm FP8 experts on the finegrained-fp8 Triton kernels); the smoke run uses HF unquantized on the
dequantized weights. --load-dir also writes a random FP8 checkpoint (dsr1.checkpoint.synthetic) and times
a cold dsr1.load_model on it.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback
from pathlib import Path

import torch

import bench_load
import bench_measure as measure
from bench_report import meta, table, write_json
from bench_timing import Timer, copy_bandwidth
from bench_weights import fill_dsr1
from dsr1.checkpoint.synthetic import write_checkpoint
from dsr1.checkpoint.loader import INDEX_FILE, build_model
from dsr1.config import ModelConfig
from dsr1.engine.decode_graphs import GRAPH_MODES, make_graphs
from dsr1.kernels.fp8_gemm import BACKENDS, DEQUANT, probe_fp8_backends, select_fp8_backend, use_fp8_gemm
from dsr1.model.dispatch import LocalDispatcher

ROOT = Path(__file__).resolve().parents[2]
SMOKE = dict(config=ROOT / "configs/tiny.json", vocab=512, device="cpu", prefill="1x16,2x8", decode="1,2", dequant_decode="1",
             context=8, steps=2, hf_steps=2, warmup=1, reps=1, check_len=8, copy_mib=16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs/r1-5layer.json", help="HF config.json of the model")
    p.add_argument("--smoke", action="store_true", help="CPU smoke run on configs/tiny.json (512-token vocabulary); for CI")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--vocab", type=int, default=None, help="override vocab_size")
    p.add_argument("--fp8-gemm", choices=BACKENDS, default="auto", help="dsr1's FP8 matmul backend")
    p.add_argument("--prefill", default="1x2048,8x512", help="prefill shapes, BATCHxLENGTH, comma-separated")
    p.add_argument("--decode", default="1,8,64", help="decode batch sizes")
    p.add_argument("--dequant-decode", default="1,8", help="decode batch sizes also timed with dsr1's dequant backend ('' for none)")
    p.add_argument("--cuda-graphs", choices=GRAPH_MODES, default="auto", help="dsr1 decode from CUDA graphs (auto: where the model allows)")
    p.add_argument("--compile-decode", choices=("on", "off"), default="on", help="with CUDA graphs: decoder blocks through torch.compile")
    p.add_argument("--uncompiled-decode", default="1,64", help="with --compile-decode on, decode batch sizes also timed from uncompiled graphs ('' for none)")
    p.add_argument("--eager-decode", default="1,64", help="with CUDA graphs, decode batch sizes also timed eagerly ('' for none)")
    p.add_argument("--context", type=int, default=512, help="positions already in the KV cache when decode is timed")
    p.add_argument("--steps", type=int, default=50, help="timed decode steps (dsr1)")
    p.add_argument("--hf-steps", type=int, default=4, help="timed decode steps (HF)")
    p.add_argument("--warmup", type=int, default=30, help="untimed decode steps first")
    p.add_argument("--reps", type=int, default=1, help="timed prefills per shape (median), after one warm-up")
    p.add_argument("--chunk", type=int, default=512, help="tokens per MoE dispatch in dsr1 (LocalDispatcher max_tokens)")
    p.add_argument("--check-len", type=int, default=64, help="prompt length of the logits checks (2 rows)")
    p.add_argument("--copy-mib", type=int, default=2048, help="size of the device-to-device copy that measures bandwidth")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--hf-fp8-kernel", default=None, help="local finegrained_fp8 package dir (kernels-community) for offline machines")
    p.add_argument("--hf-autotune", choices=("full", "fixed"), default="full", help="with --hf-fp8-kernel: autotune, or one fixed Triton config")
    p.add_argument("--load-dir", type=Path, default=None, help="write the weights here as a checkpoint and time a cold dsr1.load_model")
    p.add_argument("--load-only", action="store_true", help="with --load-dir: only the load figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            if key != "device" or args.device is None:
                setattr(args, key, value)
    return args


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def shapes(spec: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in spec.split(",") if s]


def batches(spec: str) -> list[int]:
    return [int(b) for b in spec.split(",") if b]


def run_dsr1(args, cfg, device, dtype, timer) -> tuple[dict, torch.Tensor]:
    """dsr1's figures, and its logits on the check prompt (for the HF comparison)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    max_len = max([l for _, l in shapes(args.prefill)] + [args.context + args.warmup + args.steps + 2, args.check_len])
    model = build_model(cfg, device, dtype, fp8=True, dispatcher=LocalDispatcher(cfg.n_routed_experts, args.chunk), max_seq_len=max_len)
    fill_dsr1(model, cfg, args.seed)
    model.eval()
    backend = select_fp8_backend(args.fp8_gemm, device)
    eager, out = measure.Dsr1Runner(model), {"backend": backend.name, "backends": probe_fp8_backends(device)}
    prompt = check_prompt(args, device)
    use_fp8_gemm(model, backend)
    out["cuda_graphs"] = make_graphs(model, args.cuda_graphs, max_len=1, max_batch=1) is not None  # can this model capture?
    out["compiled"] = out["cuda_graphs"] and args.compile_decode == "on"
    runner = measure.Dsr1GraphRunner(model, compile=out["compiled"]) if out["cuda_graphs"] else eager
    log(f"dsr1 built; FP8 backend {backend.name}, CUDA graphs {out['cuda_graphs']}, compiled blocks {out['compiled']}")
    logits = eager.logits(prompt).float()
    if backend is not DEQUANT:
        use_fp8_gemm(model, DEQUANT)
        ref = eager.logits(prompt)
        out["check_vs_dequant"] = measure.compare_logits(logits, ref)
        # The bf16 noise floor of this model: dequant itself, one row at a time instead of both rows at once.
        out["dequant_row_by_row"] = measure.compare_logits(torch.cat([eager.logits(row[None]) for row in prompt]), ref)
        use_fp8_gemm(model, backend)
        log(f"dsr1 {backend.name} vs dequant: {out['check_vs_dequant']}; dequant row by row vs batched: {out['dequant_row_by_row']}")
    out["prefill"] = [measure.measure_prefill(runner, b, l, cfg.vocab_size, args.reps, timer) for b, l in shapes(args.prefill)]
    log(f"dsr1 prefill: {out['prefill']}")

    def experts(tokens, pos, cache):
        return measure.experts_per_layer(model, tokens, pos, cache)

    out["decode"] = [measure.measure_decode(runner, b, args.context, args.steps, args.warmup, cfg.vocab_size, timer, experts) for b in batches(args.decode)]
    log(f"dsr1 decode: {[round(d['ms_per_step'], 3) for d in out['decode']]} ms")
    if out["compiled"] and args.uncompiled_decode:
        uncompiled = measure.Dsr1GraphRunner(model)
        out["decode_uncompiled"] = [measure.measure_decode(uncompiled, b, args.context, args.steps, args.warmup, cfg.vocab_size, timer) for b in batches(args.uncompiled_decode)]
        # One step's logits from the same cache, compiled blocks vs uncompiled graphs, and eager vs those graphs
        # (the same code over a longer, masked key range).
        b = max(batches(args.uncompiled_decode))
        compiled_step, graph_step, eager_step = (measure.decode_step_logits(r, b, args.context, cfg.vocab_size) for r in (runner, uncompiled, eager))
        out["compiled_vs_uncompiled"] = measure.compare_logits(compiled_step, graph_step)
        out["eager_vs_uncompiled"] = measure.compare_logits(eager_step, graph_step)
        log(f"dsr1 decode step, compiled vs uncompiled graphs: {out['compiled_vs_uncompiled']}; eager vs uncompiled graphs: {out['eager_vs_uncompiled']}")
    if out["cuda_graphs"] and args.eager_decode:
        out["decode_eager"] = [measure.measure_decode(eager, b, args.context, args.steps, args.warmup, cfg.vocab_size, timer) for b in batches(args.eager_decode)]
    if backend is not DEQUANT and args.dequant_decode:
        use_fp8_gemm(model, DEQUANT)
        out["decode_dequant"] = [measure.measure_decode(eager, b, args.context, args.steps, args.warmup, cfg.vocab_size, timer) for b in batches(args.dequant_decode)]
        use_fp8_gemm(model, backend)
    out["peak_memory"] = measure.peak_memory(device)
    return out, logits.cpu()


def run_hf(args, raw, cfg, device, dtype, timer, dsr1_logits: torch.Tensor) -> dict:
    from bench_hf import build_hf, use_local_fp8_kernel

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fp8 = device.type == "cuda"
    if fp8 and args.hf_fp8_kernel:
        use_local_fp8_kernel(args.hf_fp8_kernel, args.hf_autotune == "fixed")
    model = build_hf(raw, cfg, device, dtype, fp8=fp8, seed=args.seed)
    import transformers

    out = {"transformers": transformers.__version__, "fp8": fp8, "experts_implementation": model.config._experts_implementation,
           "attn_implementation": model.config._attn_implementation, "lm_head": type(model.lm_head).__name__}
    log(f"HF built: {out}")
    runner = measure.HFRunner(model)
    out["check_vs_dsr1"] = measure.compare_logits(runner.logits(check_prompt(args, device)).float().cpu(), dsr1_logits)
    log(f"HF vs dsr1: {out['check_vs_dsr1']}")
    out["prefill"] = [measure.measure_prefill(runner, b, l, cfg.vocab_size, args.reps, timer) for b, l in shapes(args.prefill)]
    log(f"HF prefill: {out['prefill']}")
    out["decode"] = [measure.measure_decode(runner, b, args.context, args.hf_steps, args.warmup, cfg.vocab_size, timer) for b in batches(args.decode)]
    out["peak_memory"] = measure.peak_memory(device)
    return out


def run_load(args, raw, cfg, device, dtype) -> dict:
    """Write the weights as an FP8 checkpoint; then, each from a cold page cache: the disk's read rate, the
    plain safetensors read (tensor by tensor, `.to(device)`), and dsr1.load_model."""
    write_checkpoint(raw, args.load_dir, seed=args.seed, shards=8, device=device, mtp=False)  # no MTP: the files hold what a load reads
    nbytes = json.loads((args.load_dir / INDEX_FILE).read_text())["metadata"]["total_size"]
    files = sorted(args.load_dir.glob("*.safetensors"))
    out = {"bytes": nbytes, "disk_gb_per_s": bench_load.disk_read_rate(files) / 1e9, "safetensors_gb_per_s": bench_load.safetensors_read_rate(files, device) / 1e9}
    t, out["evicted_by"] = bench_load.time_load(args.load_dir, device, dtype, args.fp8_gemm)
    return {**out, "seconds": t, "gb_per_s": nbytes / t / 1e9}


def check_prompt(args, device) -> torch.Tensor:
    return torch.randint(0, 100, (2, args.check_len), generator=torch.Generator().manual_seed(args.seed)).to(device)


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)  # tiny matmuls: intra-op threads cost more than they save (tests/conftest.py)
    raw = json.loads(args.config.read_text())
    if args.vocab:
        raw["vocab_size"] = args.vocab
    cfg = ModelConfig.from_hf(raw, source=str(args.config))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = Timer(device)
    result = {"meta": {**meta(device), "config": str(args.config), "args": {k: str(v) for k, v in vars(args).items()}}}
    if args.load_only:
        result["load"] = run_load(args, raw, cfg, device, dtype)
        print(load_line(result["load"]))
        return write_json(args.json, result)
    result["copy_bandwidth"] = copy_bandwidth(device, args.copy_mib << 20, timer)
    with torch.inference_mode():
        result["dsr1"], dsr1_logits = run_dsr1(args, cfg, device, dtype, timer)
        free(device)
        result["floor"] = [{"batch": d["batch"], "experts_per_layer": d["after"], "bytes": (f := measure.floor_bytes(cfg, d["batch"], args.context, d["after"])),
                            "ms": 1e3 * f["total"] / result["copy_bandwidth"]} for d in result["dsr1"]["decode"]]
        if not args.no_hf:
            try:
                result["hf"] = run_hf(args, raw, cfg, device, dtype, timer, dsr1_logits)
            except Exception as e:  # keep dsr1's figures when transformers cannot run here; say why
                result["hf"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
                log(result["hf"]["traceback"])
            free(device)
        if args.load_dir:
            result["load"] = run_load(args, raw, cfg, device, dtype)
    print(report(result))
    return write_json(args.json, result)


def report(r: dict) -> str:
    d, hf = r["dsr1"], r.get("hf", {})
    gib = lambda n: f"{n / 2**30:.1f}" if n else "-"  # noqa: E731
    lines = [f"{r['meta']['config']} on {r['meta']['device']}, torch {r['meta']['torch']}, {r['meta']['date']}",
             f"copy bandwidth {r['copy_bandwidth'] / 1e12:.3f} TB/s (read + write); dsr1 FP8 backend: {d['backend']} {d['backends']}"]
    if "check_vs_dequant" in d:
        c = d["check_vs_dequant"]
        lines.append(f"dsr1 {d['backend']} vs dequant logits: rel err {c['rel_err']:.2e} (max-abs {c['max_rel_err']:.2e}), greedy tokens agree {c['greedy_agree']:.1%} of {c['positions']}")
    if "dequant_row_by_row" in d:
        c = d["dequant_row_by_row"]
        lines.append(f"bf16 noise floor, dequant row by row vs batched: rel err {c['rel_err']:.2e} (max-abs {c['max_rel_err']:.2e}), greedy tokens agree {c['greedy_agree']:.1%}")
    if "check_vs_dsr1" in hf:
        c = hf["check_vs_dsr1"]
        lines.append(f"HF vs dsr1 logits: rel err {c['rel_err']:.2e} (max-abs {c['max_rel_err']:.2e}), greedy tokens agree {c['greedy_agree']:.1%} of {c['positions']}")
    if "error" in hf:
        lines.append(f"HF: {hf['error']}")
    if "compiled_vs_uncompiled" in d:
        c = d["compiled_vs_uncompiled"]
        e = d["eager_vs_uncompiled"]
        lines.append(f"dsr1 decode step vs uncompiled graphs: compiled blocks rel err {c['rel_err']:.2e} (max-abs {c['max_rel_err']:.2e}), greedy tokens agree "
                     f"{c['greedy_agree']:.1%} of {c['positions']}; eager {e['rel_err']:.2e} ({e['max_rel_err']:.2e}), {e['greedy_agree']:.1%}")
    graphs = (", CUDA graphs" if d.get("cuda_graphs") else "") + (", compiled" if d.get("compiled") else "")
    rows = [("", f"dsr1 ({d['backend']}{graphs})", "HF", "speedup (HF time / dsr1 time)", "floor", "dsr1 / floor")]
    for i, p in enumerate(d["prefill"]):
        h = hf["prefill"][i]["tokens_per_s"] if "prefill" in hf else None
        rows.append((f"prefill {p['batch']}x{p['length']} tok/s", f"{p['tokens_per_s']:.0f}", f"{h:.0f}" if h else "-",
                     f"{p['tokens_per_s'] / h:.2f}" if h else "-", "", ""))
    for i, (p, f) in enumerate(zip(d["decode"], r["floor"])):
        h = hf["decode"][i]["ms_per_step"] if "decode" in hf else None
        rows.append((f"decode b={p['batch']} ms/step", f"{p['ms_per_step']:.2f}", f"{h:.2f}" if h else "-", f"{h / p['ms_per_step']:.2f}" if h else "-",
                     f"{f['ms']:.2f}", f"{p['ms_per_step'] / f['ms']:.2f}"))
    for p in d.get("decode_uncompiled", []):
        rows.append((f"decode b={p['batch']} ms/step, graphs uncompiled", f"{p['ms_per_step']:.2f}", "", "", "", ""))
    for p in d.get("decode_eager", []):
        rows.append((f"decode b={p['batch']} ms/step, eager", f"{p['ms_per_step']:.2f}", "", "", "", ""))
    for p in d.get("decode_dequant", []):
        rows.append((f"decode b={p['batch']} ms/step, dequant", f"{p['ms_per_step']:.2f}", "", "", "", ""))
    rows.append(("peak memory GiB", gib(d["peak_memory"]), gib(hf.get("peak_memory")), "", "", ""))
    lines.append(table(rows))
    if "load" in r:
        lines.append(load_line(r["load"]))
    return "\n".join(lines)


def load_line(ld: dict) -> str:
    return (
        f"cold load (page cache emptied by {ld['evicted_by']}): {ld['bytes'] / 1e9:.1f} GB in {ld['seconds']:.1f} s = "
        f"{ld['gb_per_s']:.2f} GB/s; same files cold: disk read {ld['disk_gb_per_s']:.2f} GB/s, "
        f"safetensors tensor by tensor {ld['safetensors_gb_per_s']:.2f} GB/s"
    )


if __name__ == "__main__":
    main()
