"""How fast this machine's disk delivers a checkpoint, read pattern by read pattern, next to
dsr1.load_model with the same patterns: is a load bound by the disk or by the loader?

    python scripts/bench/disk_read.py --ckpt-path /tmp/ckpt --json disk_read.json

Every figure starts from a cold page cache (bench_load.evict, as in scripts/bench/model.py --load-dir).
`--patterns` are buffered preads (THREADSxMiB: threads in flight x bytes per read) over the first
`--subset` of the shards; `--direct` the same with O_DIRECT (no page cache); `--load` times load_model
(FP8 weights kept, all shards, to the GPU if there is one) with its reader set to each pattern.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import bench_load
from bench_report import meta, table, write_json


def patterns(spec: str) -> list[tuple[int, int]]:
    """'8x32,16x16' -> [(8 threads, 32 MiB), (16, 16 MiB)]."""
    return [(int(t), int(m) << 20) for t, m in (p.split("x") for p in spec.split(",") if p)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-path", type=Path, required=True, help="a safetensors checkpoint directory (e.g. scripts/bench/model.py --load-dir's)")
    p.add_argument("--patterns", default="1x32,8x32,16x32,32x32,64x16,8x128", help="buffered reads, THREADSxMiB, comma-separated")
    p.add_argument("--direct", default="16x32,32x16", help="O_DIRECT reads, THREADSxMiB ('' for none)")
    p.add_argument("--load", default="8x32,32x16", help="load_model with these reader settings, THREADSxMiB ('' for none)")
    p.add_argument("--subset", type=float, default=1 / 3, help="fraction of the shards the raw read patterns read")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args()
    files = sorted(args.ckpt_path.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{args.ckpt_path} holds no *.safetensors files")
    subset = files[: max(1, round(len(files) * args.subset))]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    total = sum(f.stat().st_size for f in files)
    print(f"{args.ckpt_path}: {len(files)} shards, {total / 1e9:.2f} GB; raw patterns read {len(subset)} shards, "
          f"{sum(f.stat().st_size for f in subset) / 1e9:.2f} GB; load_model to {device}")
    rows = []
    for kind, spec in (("buffered", args.patterns), ("O_DIRECT", args.direct)):
        for threads, chunk in patterns(spec):
            try:
                rate = bench_load.disk_read_rate(subset, threads, chunk, direct=kind == "O_DIRECT") / 1e9
            except OSError as e:  # O_DIRECT: some file systems (tmpfs, ...) refuse it
                print(f"{kind} reads of {subset[0]} failed: {e}")
                continue
            rows.append({"what": kind, "threads": threads, "chunk_mib": chunk >> 20, "gb_per_s": rate})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for threads, chunk in patterns(args.load):
        t, _ = bench_load.time_load(args.ckpt_path, device, dtype, "dequant", reader=(threads, chunk))
        rows.append({"what": "load_model", "threads": threads, "chunk_mib": chunk >> 20, "gb_per_s": total / t / 1e9})
    print(table([("read", "threads", "MiB per read", "GB/s")] + [(r["what"], r["threads"], r["chunk_mib"], f"{r['gb_per_s']:.2f}") for r in rows]))
    write_json(args.json, {"meta": meta(device), "device": str(device), "bytes": total, "rows": rows})


if __name__ == "__main__":
    main()
