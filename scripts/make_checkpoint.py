"""Write a random-weight checkpoint in DeepSeek-R1's exact Hugging Face layout."""

import argparse

from dsr1.checkpoint.synthetic import write_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="a HF config.json, e.g. configs/tiny.json")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp8", "bf16"], default="fp8", help="fp8: e4m3 weights with 128x128 block scales, as R1")
    p.add_argument("--shards", type=int, default=1, help="number of shard files, cut in file order into runs of about equal bytes (as R1's 163)")
    args = p.parse_args()
    out = write_checkpoint(args.config, args.out, seed=args.seed, dtype=args.dtype, shards=args.shards)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
