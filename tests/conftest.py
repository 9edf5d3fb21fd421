"""Shared fixtures: the tiny config and session-cached synthetic checkpoints written from it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before dsr1 is imported: Triton kernels then run on CPU tensors, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsr1.checkpoint.synthetic import write_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))  # the benchmarks' helpers (tests/bench)

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


def pytest_addoption(parser):
    parser.addoption("--fuzz-cases", type=int, default=300, help="cases of tests/checkpoint/test_fuzz.py (seeded corruptions of a checkpoint)")


def pytest_configure(config):
    # Tiny models: intra-op threads cost more than they save, and with other processes on the
    # machine their spin-waiting makes a forward pass 30x slower.
    torch.set_num_threads(1)


@pytest.fixture
def tiny_config() -> dict:
    """configs/tiny.json as a dict (a fresh copy per test: mutate freely)."""
    return json.loads(TINY_CONFIG.read_text())


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(overrides=None, dtype='fp8', seed=0) -> directory of a synthetic HF checkpoint.

    `overrides` update configs/tiny.json's keys (None writes JSON null). Each distinct
    (overrides, dtype, seed) is written once per session.
    """
    cache: dict[str, Path] = {}

    def make(overrides: dict | None = None, dtype: str = "fp8", seed: int = 0) -> Path:
        key = json.dumps([overrides, dtype, seed], sort_keys=True)
        if key not in cache:
            raw = {**json.loads(TINY_CONFIG.read_text()), **(overrides or {})}
            out = tmp_path_factory.mktemp(f"ckpt-{dtype}-{len(cache)}")
            cache[key] = write_checkpoint(raw, out, seed=seed, dtype=dtype)
        return cache[key]

    return make
