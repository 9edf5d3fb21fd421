"""Benchmark dsr1 against transformers' DeepseekV3ForCausalLM on the same random FP8 weights, next to the
memory-bandwidth floor of a decode step, from short prompts to 128K context, and print two tables
(prefill, decode) and write JSON.

    python scripts/bench/model.py --config configs/r1-5layer.json --json out/bench.json   # one H100/H200
    python scripts/bench/model.py --smoke                                                  # CPU, seconds (CI)

Prefill rows (--prefill BATCHxLENGTH,...): dsr1 prefills through dsr1.engine.generation.prefill in chunks
of --prefill-chunk tokens; tokens/s, and the TFLOPS achieved as a share of the card's dense FP8 peak
(bench_measure.prefill_flops gives the FLOP count, bench_measure.PEAK_FP8_TFLOPS the peak and its source).
Decode rows: each batch of --decode at each cached context of --contexts, next to its memory-bandwidth
floor (which reads that context's latent cache). Every row reports its peak GPU memory; a row whose KV
cache cannot fit the free memory is skipped ("skipped: would need X GiB"), and one that runs out of memory
anyway reads "out of memory".

One model is on the device at a time: dsr1, then each HF configuration of --hf, each built straight on the
device from the same seeded generators (scripts/bench/bench_weights.py):
  fp8        transformers' own FP8 path (FineGrainedFP8: FP8Linear and grouped_mm FP8 experts on the
             finegrained-fp8 Triton kernels; sdpa attention); prefill rows up to --hf-fp8-max-prefill tokens
  bf16-sdpa  the same weights dequantized to bf16, sdpa attention; every prefill row (the long ones too)
HF decode rows run only at --hf-decode-contexts (its DynamicCache holds per-head keys and values, and
decode at 128K is slow). On CPU (the smoke run) only bf16-sdpa runs, in fp32.
--load-dir also writes a random FP8 checkpoint (dsr1.checkpoint.synthetic) and times a cold
dsr1.load_model on it.
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
from dsr1.engine.decode_graphs import GRAPH_MODES, make_graphs
from dsr1.kernels.attention import DECODE_ATTENTION, use_paged_decode
from dsr1.kernels.fp8_gemm import BACKENDS, DEQUANT, probe_fp8_backends, select_fp8_backend, use_fp8_gemm
from dsr1.model.dispatch import LocalDispatcher

ROOT = Path(__file__).resolve().parents[2]
HF_CONFIGS = ("fp8", "bf16-sdpa")
# The smoke run covers every row kind at tiny sizes: chunked prefill (4 chunks of 16), two decode contexts,
# HF decode at one; a nominal CPU "peak" so the share-of-peak column is computed.
SMOKE = dict(config=ROOT / "configs/tiny.json", vocab=512, device="cpu", prefill="1x64,2x16", prefill_chunk=16, decode="1,2", contexts="8,32",
             hf_decode_contexts="8", dequant_decode="1", context=8, steps=2, hf_steps=2, warmup=1, reps=1, check_len=8, copy_mib=16, peak_tflops=0.05)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs/r1-5layer.json", help="HF config.json of the model")
    p.add_argument("--smoke", action="store_true", help="CPU smoke run on configs/tiny.json (512-token vocabulary); for CI")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--vocab", type=int, default=None, help="override vocab_size")
    p.add_argument("--fp8-gemm", choices=BACKENDS, default="auto", help="dsr1's FP8 matmul backend")
    p.add_argument("--prefill", default="1x2048,16x1024,1x32768,1x131072", help="prefill shapes, BATCHxLENGTH, comma-separated")
    p.add_argument("--prefill-chunk", type=int, default=4096, help="dsr1 prefills in chunks of at most this many tokens (0: the whole prompt in one forward)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense FP8 peak of the card, TFLOPS (default: from its name, bench_measure.PEAK_FP8_TFLOPS)")
    p.add_argument("--decode", default="1,8,64", help="decode batch sizes")
    p.add_argument("--contexts", default="512,4096,32768,131072", help="positions already in the KV cache when decode is timed, comma-separated")
    p.add_argument("--dequant-decode", default="1,8", help="decode batch sizes also timed with dsr1's dequant backend ('' for none)")
    p.add_argument("--decode-attention", choices=tuple(DECODE_ATTENTION), default="gather",
                   help="dsr1's decode attention: gather (the W8A16 cache products) or paged (kernels/mla_decode.py)")
    p.add_argument("--cuda-graphs", choices=GRAPH_MODES, default="auto", help="dsr1 decode from CUDA graphs (auto: where the model allows)")
    p.add_argument("--compile-decode", choices=("on", "off"), default="on", help="with CUDA graphs: decoder blocks through torch.compile")
    p.add_argument("--uncompiled-decode", default="1,64", help="with --compile-decode on, decode batch sizes also timed from uncompiled graphs ('' for none)")
    p.add_argument("--eager-decode", default="1,64", help="with CUDA graphs, decode batch sizes also timed eagerly ('' for none)")
    p.add_argument("--context", type=int, default=512, help="cached positions of the extra decode rows (uncompiled, eager, dequant) and the decode-step checks")
    p.add_argument("--steps", type=int, default=50, help="timed decode steps (dsr1)")
    p.add_argument("--hf-steps", type=int, default=4, help="timed decode steps (HF)")
    p.add_argument("--warmup", type=int, default=30, help="untimed decode steps first")
    p.add_argument("--reps", type=int, default=1, help="timed prefills per shape (median), after one warm-up")
    p.add_argument("--chunk", type=int, default=512, help="tokens per MoE dispatch in dsr1 (LocalDispatcher max_tokens)")
    p.add_argument("--check-len", type=int, default=64, help="prompt length of the logits checks (2 rows)")
    p.add_argument("--copy-mib", type=int, default=2048, help="size of the device-to-device copy that measures bandwidth")
    p.add_argument("--hf", nargs="+", choices=(*HF_CONFIGS, "none"), default=None, help="transformers configurations (default: fp8 bf16-sdpa on a GPU, bf16-sdpa on CPU)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (--hf none)")
    p.add_argument("--hf-decode-contexts", default="512,4096", help="cached contexts of HF's decode rows ('' for none)")
    p.add_argument("--hf-fp8-max-prefill", type=int, default=8192, help="HF fp8 runs the prefill rows up to this length; longer ones are bf16-sdpa only")
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


contexts = batches


def run_dsr1(args, cfg, device, dtype, timer) -> tuple[dict, torch.Tensor]:
    """dsr1's figures, and its logits on the check prompt (for the HF comparison)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    decode_len = max(contexts(args.contexts) + [args.context]) + args.warmup + args.steps + 2
    max_len = max([l for _, l in shapes(args.prefill)] + [decode_len, args.check_len])
    model = build_model(cfg, device, dtype, fp8=True, dispatcher=LocalDispatcher(cfg.n_routed_experts, args.chunk), max_seq_len=max_len)
    fill_dsr1(model, cfg, args.seed)
    model.eval()
    backend = select_fp8_backend(args.fp8_gemm, device)
    chunk = args.prefill_chunk or None
    eager = measure.Dsr1Runner(model, prefill_chunk=chunk)
    out = {"backend": backend.name, "backends": probe_fp8_backends(device), "prefill_chunk": chunk}
    prompt = check_prompt(args, device)
    use_fp8_gemm(model, backend)
    use_paged_decode(model, DECODE_ATTENTION[args.decode_attention])
    out["attention_in_decode"] = args.decode_attention  # (a key not starting with "decode": those are rows)
    out["cuda_graphs"] = make_graphs(model, args.cuda_graphs, max_len=1, max_batch=1) is not None  # can this model capture?
    out["compiled"] = out["cuda_graphs"] and args.compile_decode == "on"
    runner = measure.Dsr1GraphRunner(model, compile=out["compiled"], prefill_chunk=chunk) if out["cuda_graphs"] else eager
    log(f"dsr1 built; FP8 backend {backend.name}, CUDA graphs {out['cuda_graphs']}, compiled blocks {out['compiled']}, prefill chunk {chunk}")
    out["build_peak_memory"] = measure.peak_memory(device)
    logits = eager.logits(prompt).float()
    if backend is not DEQUANT:
        use_fp8_gemm(model, DEQUANT)
        ref = eager.logits(prompt)
        out["check_vs_dequant"] = measure.compare_logits(logits, ref)
        # The bf16 noise floor of this model: dequant itself, one row at a time instead of both rows at once.
        out["dequant_row_by_row"] = measure.compare_logits(torch.cat([eager.logits(row[None]) for row in prompt]), ref)
        use_fp8_gemm(model, backend)
        log(f"dsr1 {backend.name} vs dequant: {out['check_vs_dequant']}; dequant row by row vs batched: {out['dequant_row_by_row']}")
    out["prefill"] = [prefill_row(args, runner, cfg, device, timer, b, l) for b, l in shapes(args.prefill)]
    log(f"dsr1 prefill: {[short(p, 'tokens_per_s') for p in out['prefill']]} tok/s")

    def experts(tokens, pos, cache):
        return measure.experts_per_layer(model, tokens, pos, cache)

    out["decode"] = [decode_row(args, runner, cfg, device, timer, b, c, args.steps, experts) for c in contexts(args.contexts) for b in batches(args.decode)]
    log(f"dsr1 decode: {[short(d, 'ms_per_step') for d in out['decode']]} ms")
    if out["compiled"] and args.uncompiled_decode:
        uncompiled = measure.Dsr1GraphRunner(model)
        out["decode_uncompiled"] = [decode_row(args, uncompiled, cfg, device, timer, b, args.context, args.steps) for b in batches(args.uncompiled_decode)]
        # One step's logits from the same cache, compiled blocks vs uncompiled graphs, and eager vs those graphs
        # (the same code over a longer, masked key range).
        b = max(batches(args.uncompiled_decode))
        steps = []
        for r in (runner, uncompiled, eager):
            steps.append(measure.decode_step_logits(r, b, args.context, cfg.vocab_size))
            r.release()
        compiled_step, graph_step, eager_step = steps
        out["compiled_vs_uncompiled"] = measure.compare_logits(compiled_step, graph_step)
        out["eager_vs_uncompiled"] = measure.compare_logits(eager_step, graph_step)
        log(f"dsr1 decode step, compiled vs uncompiled graphs: {out['compiled_vs_uncompiled']}; eager vs uncompiled graphs: {out['eager_vs_uncompiled']}")
    if out["cuda_graphs"] and args.eager_decode:
        out["decode_eager"] = [decode_row(args, eager, cfg, device, timer, b, args.context, args.steps) for b in batches(args.eager_decode)]
    if backend is not DEQUANT and args.dequant_decode:
        use_fp8_gemm(model, DEQUANT)
        out["decode_dequant"] = [decode_row(args, eager, cfg, device, timer, b, args.context, args.steps) for b in batches(args.dequant_decode)]
        use_fp8_gemm(model, backend)
    out["peak_memory"] = overall_peak(out)
    return out, logits.cpu()


def prefill_row(args, runner, cfg, device, timer, batch: int, length: int) -> dict:
    """One prefill row (bench_measure.run_row): skipped if the prompt's KV cache cannot fit."""
    def fn():
        return measure.measure_prefill(runner, batch, length, cfg.vocab_size, args.reps, timer, cfg, args.peak_tflops)

    return measure.run_row(fn, device, runner.cache_bytes(batch, length), batch=batch, length=length)


def decode_row(args, runner, cfg, device, timer, batch: int, context: int, steps: int, after=None) -> dict:
    """One decode row (bench_measure.run_row) at `context` cached positions: skipped if its cache cannot fit
    (an HF DynamicCache also copies one layer's cache per update: counted)."""
    length = context + args.warmup + steps + 1
    need = runner.cache_bytes(batch, length)
    if isinstance(runner, measure.HFRunner):
        need += need // cfg.n_layers

    def fn():
        try:
            return measure.measure_decode(runner, batch, context, steps, args.warmup, cfg.vocab_size, timer, after)
        finally:
            runner.release()  # the graphs' cache

    return measure.run_row(fn, device, need, batch=batch, context=context)


def short(row: dict, key: str):
    return round(row[key], 3) if row["status"] == "ok" else row["message"]


def overall_peak(out: dict) -> int | None:
    """The largest peak memory of the build and of every row (each row resets the peak)."""
    peaks = [out.get("build_peak_memory")] + [r.get("peak_memory") for k, rows in out.items() if k in ("prefill",) or k.startswith("decode") for r in rows]
    peaks = [p for p in peaks if p]
    return max(peaks) if peaks else None


def run_hf(args, name: str, raw, cfg, device, dtype, timer, dsr1_logits: torch.Tensor) -> dict:
    """One HF configuration (HF_CONFIGS): 'fp8', its own FP8 path; 'bf16-sdpa', the weights dequantized to the run dtype."""
    from bench_hf import build_hf, use_local_fp8_kernel

    fp8 = name == "fp8"
    if fp8 and device.type != "cuda":
        raise ValueError("transformers' FP8 path needs a CUDA device")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if fp8 and args.hf_fp8_kernel:
        use_local_fp8_kernel(args.hf_fp8_kernel, args.hf_autotune == "fixed")
    model = build_hf(raw, cfg, device, dtype, fp8=fp8, seed=args.seed)
    import transformers

    out = {"transformers": transformers.__version__, "fp8": fp8, "dtype": str(dtype).removeprefix("torch."), "experts_implementation": model.config._experts_implementation,
           "attn_implementation": model.config._attn_implementation, "lm_head": type(model.lm_head).__name__}
    log(f"HF {name} built: {out}")
    out["build_peak_memory"] = measure.peak_memory(device)
    runner = measure.HFRunner(model)
    out["check_vs_dsr1"] = measure.compare_logits(runner.logits(check_prompt(args, device)).float().cpu(), dsr1_logits)
    log(f"HF {name} vs dsr1: {out['check_vs_dsr1']}")
    out["prefill"] = [prefill_row(args, runner, cfg, device, timer, b, l) for b, l in shapes(args.prefill) if not fp8 or l <= args.hf_fp8_max_prefill]
    log(f"HF {name} prefill: {[short(p, 'tokens_per_s') for p in out['prefill']]} tok/s")
    out["decode"] = [decode_row(args, runner, cfg, device, timer, b, c, args.hf_steps) for c in contexts(args.hf_decode_contexts) for b in batches(args.decode)]
    log(f"HF {name} decode: {[short(d, 'ms_per_step') for d in out['decode']]} ms")
    out["peak_memory"] = overall_peak(out)
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
    raw, cfg = measure.read_config(args.config, args.vocab)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf_configs = hf_list(args, device)
    timer = Timer(device)
    m = meta(device)
    if args.peak_tflops is None:
        args.peak_tflops, peak_source = measure.peak_tflops(m["device"])
    else:
        peak_source = "--peak-tflops" + (" (nominal, for the CPU smoke run)" if args.smoke else "")
    result = {"meta": {**m, "config": str(args.config), "peak_fp8_tflops": args.peak_tflops, "peak_source": peak_source, "hf_configs": hf_configs,
                       "args": {k: str(v) for k, v in vars(args).items()}}}
    if args.load_only:
        result["load"] = run_load(args, raw, cfg, device, dtype)
        print(load_line(result["load"]))
        return write_json(args.json, result)
    result["copy_bandwidth"] = copy_bandwidth(device, args.copy_mib << 20, timer)
    with torch.inference_mode():
        result["dsr1"], dsr1_logits = run_dsr1(args, cfg, device, dtype, timer)
        free(device)
        result["floor"] = [floor_row(cfg, d, result["copy_bandwidth"]) for d in result["dsr1"]["decode"]]
        result["hf"] = {}
        for name in hf_configs:
            try:
                result["hf"][name] = run_hf(args, name, raw, cfg, device, dtype, timer, dsr1_logits)
            except Exception as e:  # keep the other figures when transformers cannot run here; say why
                result["hf"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
                log(result["hf"][name]["traceback"])
            free(device)
        if args.load_dir:
            result["load"] = run_load(args, raw, cfg, device, dtype)
    print(report(result))
    return write_json(args.json, result)


def hf_list(args, device) -> list[str]:
    if args.no_hf or (args.hf and "none" in args.hf):
        return []
    if args.hf:
        return list(dict.fromkeys(args.hf))
    return list(HF_CONFIGS) if device.type == "cuda" else ["bf16-sdpa"]


def floor_row(cfg, d: dict, bandwidth: float) -> dict | None:
    """The memory-bandwidth floor of decode row d (None if it did not run): the experts its extra step routed
    to, and the latent cache at the timed steps' mean position."""
    if d["status"] != "ok":
        return None
    f = measure.floor_bytes(cfg, d["batch"], d["mean_position"], d["after"])
    return {"batch": d["batch"], "context": d["context"], "experts_per_layer": d["after"], "bytes": f, "ms": 1e3 * f["total"] / bandwidth}


def gib(n) -> str:
    return f"{n / 2**30:.1f}" if n else "-"


def report(r: dict) -> str:
    d, hfs = r["dsr1"], r.get("hf", {})
    mt = r["meta"]
    peak = f"{mt['peak_fp8_tflops']:g} TFLOPS ({mt['peak_source']})" if mt["peak_fp8_tflops"] else mt["peak_source"]
    lines = [f"{mt['config']} on {mt['device']}, torch {mt['torch']}, {mt['date']}",
             f"copy bandwidth {r['copy_bandwidth'] / 1e12:.3f} TB/s (read + write); dsr1 FP8 backend: {d['backend']} {d['backends']}",
             f"dsr1 prefill: dsr1.engine.generation.prefill, chunk {d['prefill_chunk'] or 'none (whole prompt)'}; % of peak: of the dense FP8 peak, {peak}"]
    if "check_vs_dequant" in d:
        c = d["check_vs_dequant"]
        lines.append(f"dsr1 {d['backend']} vs dequant logits: rel err {c['rel_err']:.2e} (max-abs {c['max_rel_err']:.2e}), greedy tokens agree {c['greedy_agree']:.1%} of {c['positions']}")
    if "dequant_row_by_row" in d:
        c = d["dequant_row_by_row"]
        lines.append(f"bf16 noise floor, dequant row by row vs batched: rel err {c['rel_err']:.2e} (max-abs {c['max_rel_err']:.2e}), greedy tokens agree {c['greedy_agree']:.1%}")
    for name, hf in hfs.items():
        if "check_vs_dsr1" in hf:
            c = hf["check_vs_dsr1"]
            lines.append(f"HF {name} ({hf['dtype']}) vs dsr1 logits: rel err {c['rel_err']:.2e} (max-abs {c['max_rel_err']:.2e}), greedy tokens agree {c['greedy_agree']:.1%} of {c['positions']}")
        if "error" in hf:
            lines.append(f"HF {name}: {hf['error']}")
    if "compiled_vs_uncompiled" in d:
        c = d["compiled_vs_uncompiled"]
        e = d["eager_vs_uncompiled"]
        lines.append(f"dsr1 decode step vs uncompiled graphs: compiled blocks rel err {c['rel_err']:.2e} (max-abs {c['max_rel_err']:.2e}), greedy tokens agree "
                     f"{c['greedy_agree']:.1%} of {c['positions']}; eager {e['rel_err']:.2e} ({e['max_rel_err']:.2e}), {e['greedy_agree']:.1%}")
    graphs = (", CUDA graphs" if d.get("cuda_graphs") else "") + (", compiled" if d.get("compiled") else "")
    names = [n for n, hf in hfs.items() if "error" not in hf]
    lines += ["", prefill_table(d, {n: hfs[n] for n in names}), "", decode_table(d, r["floor"], {n: hfs[n] for n in names}, graphs)]
    lines.append("peak memory over the run, GiB: " + ", ".join([f"dsr1 {gib(d['peak_memory'])}"] + [f"HF {n} {gib(hfs[n]['peak_memory'])}" for n in names]))
    if "load" in r:
        lines.append(load_line(r["load"]))
    return "\n".join(lines)


def cell(row: dict | None, fmt) -> list[str]:
    """A row's figure, or why it has none: its message, "-" if it was not run."""
    if row is None:
        return "-"
    return fmt(row) if row["status"] == "ok" else row["message"]


def prefill_table(d: dict, hfs: dict) -> str:
    """prefill | dsr1 tok/s | TFLOPS | % of peak | peak GiB | then per HF configuration: tok/s | peak GiB | dsr1 speedup (HF time ÷ dsr1 time)."""
    header = ["prefill", "dsr1 tok/s", "TFLOPS", "% of peak", "peak GiB"]
    for n in hfs:
        header += [f"HF {n} tok/s", "peak GiB", "HF time ÷ dsr1"]
    rows = [tuple(header)]
    for p in d["prefill"]:
        ok = p["status"] == "ok"
        row = [f"{p['batch']}x{p['length']}", cell(p, lambda p: f"{p['tokens_per_s']:.0f}"), f"{p['tflops']:.4g}" if ok else "",
               f"{p['pct_of_peak']:.1f}%" if ok and p["pct_of_peak"] is not None else "", gib(p["peak_memory"])]
        for hf in hfs.values():
            h = next((x for x in hf["prefill"] if (x["batch"], x["length"]) == (p["batch"], p["length"])), None)
            both = ok and h is not None and h["status"] == "ok"
            row += [cell(h, lambda h: f"{h['tokens_per_s']:.0f}"), gib(h and h["peak_memory"]), f"{p['tokens_per_s'] / h['tokens_per_s']:.2f}" if both else ""]
        rows.append(tuple(row))
    return table(rows)


def decode_table(d: dict, floor: list, hfs: dict, graphs: str) -> str:
    """decode | context | dsr1 ms/step | peak GiB | floor ms (GB) | dsr1 ÷ floor | then per HF configuration:
    ms/step | peak GiB | HF time ÷ dsr1; then dsr1's extra rows (uncompiled graphs, eager, dequant)."""
    header = ["decode", "context", f"dsr1{graphs} ms/step", "peak GiB", "floor ms (GB)", "dsr1 ÷ floor"]
    for n in hfs:
        header += [f"HF {n} ms/step", "peak GiB", "HF time ÷ dsr1"]
    rows = [tuple(header)]
    for p, f in zip(d["decode"], floor):
        ok = p["status"] == "ok"
        row = [f"b={p['batch']}", str(p["context"]), cell(p, lambda p: f"{p['ms_per_step']:.2f}"), gib(p["peak_memory"]),
               f"{f['ms']:.3g} ({f['bytes']['total'] / 1e9:.3g})" if f else "", f"{p['ms_per_step'] / f['ms']:.2f}" if f else ""]
        for hf in hfs.values():
            h = next((x for x in hf["decode"] if (x["batch"], x["context"]) == (p["batch"], p["context"])), None)
            both = ok and h is not None and h["status"] == "ok"
            row += [cell(h, lambda h: f"{h['ms_per_step']:.2f}"), gib(h and h["peak_memory"]), f"{h['ms_per_step'] / p['ms_per_step']:.2f}" if both else ""]
        rows.append(tuple(row))
    for key, what in (("decode_uncompiled", "graphs uncompiled"), ("decode_eager", "eager"), ("decode_dequant", "dequant")):
        for p in d.get(key, []):
            rows.append((f"b={p['batch']} {what}", str(p["context"]), cell(p, lambda p: f"{p['ms_per_step']:.2f}"), gib(p["peak_memory"])) + ("",) * (len(header) - 4))
    return table(rows)


def load_line(ld: dict) -> str:
    return (
        f"cold load (page cache emptied by {ld['evicted_by']}): {ld['bytes'] / 1e9:.1f} GB in {ld['seconds']:.1f} s = "
        f"{ld['gb_per_s']:.2f} GB/s; same files cold: disk read {ld['disk_gb_per_s']:.2f} GB/s, "
        f"safetensors tensor by tensor {ld['safetensors_gb_per_s']:.2f} GB/s"
    )


if __name__ == "__main__":
    main()
