"""Time one FP8-weight matmul per backend (w8a16, scaled_mm, dequant) on R1's projection shapes, next to the time its weight bytes take
at the measured copy bandwidth, and check it against dequant.

    python scripts/bench/fp8_gemm.py [--rows 1,8,64,2048] [--json fp8_gemm.json]

Times are per call of 20 back-to-back calls: the GPU time, or the host's launch time if that is longer.
Also reports which row alignments (--m-align) the scaled_mm backend accepts for odd row counts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench_report import meta, table, write_json
from bench_timing import Timer, copy_bandwidth
from dsr1.fp8 import BLOCK, FP8_DTYPE
from dsr1.kernels import w8a16
from dsr1.fp8 import quantize_activation
from dsr1.kernels.fp8_gemm import DEQUANT, ScaledMM, probe_fp8_backends

SHAPES = {"q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "o": (7168, 16384),
          "dense_up": (18432, 7168), "dense_down": (7168, 18432), "expert_up": (2048, 7168), "expert_down": (7168, 2048)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,64,2048", help="activation rows (tokens) per matmul, comma-separated")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args()
    device = torch.device("cuda")
    timer = Timer(device)
    bw = copy_bandwidth(device, 2 << 30, timer)
    out = {"meta": meta(device), "device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth": bw, "backends": probe_fp8_backends(device), "rows": [], "align": []}
    print(f"{out['device']}, torch {out['torch']}, copy {bw / 1e12:.2f} TB/s, backends {out['backends']}")
    gen = torch.Generator(device).manual_seed(0)
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16).to(FP8_DTYPE)
        scale = (0.5 + torch.rand(-(-n // BLOCK), k // BLOCK, generator=gen, device=device)) / k**0.5
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, generator=gen, device=device, dtype=torch.bfloat16)
            ref = DEQUANT.linear(x.float(), weight, scale)
            got = ScaledMM().linear(x, weight, scale).float()
            got_w8a16 = w8a16.linear(x, weight, scale).float()
            row = {"shape": name, "n": n, "k": k, "m": m, "rel_err": ((got - ref).norm() / ref.norm()).item(),
                   "w8a16_rel_err": ((got_w8a16 - ref).norm() / ref.norm()).item(),
                   "floor_us": 1e6 * weight.nbytes / bw,
                   "w8a16_us": 1e6 * timer.per_call(lambda: w8a16.linear(x, weight, scale)),
                   "scaled_mm_us": 1e6 * timer.per_call(lambda: ScaledMM().linear(x, weight, scale)),
                   "quantize_us": 1e6 * timer.per_call(lambda: quantize_activation(x)),
                   "dequant_us": 1e6 * timer.per_call(lambda: DEQUANT.linear(x, weight, scale))}
            out["rows"].append(row)
            print(f"{name} m={m}: w8a16 {row['w8a16_us']:.1f} µs, scaled_mm {row['scaled_mm_us']:.1f} µs", flush=True)  # as it comes
    weight = torch.randn(2048, 7168, generator=gen, device=device, dtype=torch.bfloat16).to(FP8_DTYPE)
    scale = torch.full((16, 56), 7168**-0.5, device=device)
    for align in (1, 4, 16):
        for m in (1, 2, 3, 5, 17):
            x = torch.randn(m, 7168, generator=gen, device=device, dtype=torch.bfloat16)
            try:
                got, ref = ScaledMM(align).linear(x, weight, scale).float(), DEQUANT.linear(x.float(), weight, scale)
                result = f"rel_err {((got - ref).norm() / ref.norm()).item():.3g}"
            except RuntimeError as e:
                result = f"error: {str(e).splitlines()[0][:160]}"
            out["align"].append({"m_align": align, "m": m, "result": result})
    columns = ("n", "k", "m", "floor_us", "w8a16_us", "scaled_mm_us", "quantize_us", "dequant_us", "rel_err", "w8a16_rel_err")
    print(table([("shape", *columns)] + [(r["shape"], *(f"{r[c]:.3g}" if isinstance(r[c], float) else r[c] for c in columns)) for r in out["rows"]]))
    print(table([("m_align", "m", "scaled_mm")] + [(a["m_align"], a["m"], a["result"]) for a in out["align"]]))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
