"""Compare linear and round-robin expert placement: per-rank load, cross-rank traffic, ranks per token.

Routing comes from real prompts through a checkpoint's routers (--ckpt-path), or from R1's router
semantics on synthetic scores with a configurable group-popularity skew (--skew, repeatable).
Prints a table and writes a PNG of per-rank load.
"""

import argparse

from dsr1.placement_report import main_args, run

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    main_args(p)
    run(p.parse_args())
