"""scripts/bench/cpu_reference.py runs and reports its three figures (a smoke run: it is not timed here)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_reference_smoke(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench" / "cpu_reference.py"), "--skip-embedded", "--contexts", "8", "--steps", "1"],
        capture_output=True, text=True, check=True, env=env,
    ).stdout
    assert "recompute / cache" in out
    assert "naive / absorbed: 71.1x" in out  # 128 x (192 + 128) / (512 + 64) at R1's shape
