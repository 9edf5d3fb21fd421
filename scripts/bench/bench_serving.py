"""scripts/bench/serving.py's workload and measurements: gsm8k-shaped requests, per-request token times, their
percentiles, and peak memory (GPU allocator or this process's RSS)."""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BOS = 0  # the checkpoints' bos_token_id; random prompt tokens avoid ids 0 and 1 (BOS, EOS)


@dataclass
class Workload:
    prompts: list[list[int]]
    lengths: list[int]  # forced answer length per request
    arrivals: list[float]  # seconds after the first arrival


def make_workload(args: argparse.Namespace, vocab: int, n: int | None = None, prefix_tokens: int | None = None, max_output: int | None = None) -> Workload:
    """args.requests (or n) prompts BOS + shared prefix + own suffix, lognormal answer lengths, arrivals all at
    once or Poisson at args.rate; every draw from one generator seeded with args.seed."""
    rng = random.Random(args.seed)
    n = args.requests if n is None else n
    prefix_tokens = args.prefix_tokens if prefix_tokens is None else prefix_tokens
    max_output = args.max_output if max_output is None else max_output
    prefix = [rng.randrange(2, vocab) for _ in range(prefix_tokens)]
    half = args.suffix_tokens // 2
    prompts = [[BOS, *prefix, *(rng.randrange(2, vocab) for _ in range(args.suffix_tokens + rng.randint(-half, half)))] for _ in range(n)]
    lengths = [min(max_output, max(1, round(args.output_median * math.exp(args.output_sigma * rng.gauss(0, 1))))) for _ in range(n)]
    arrivals, t = [], 0.0
    for _ in range(n):
        arrivals.append(t)
        t += rng.expovariate(args.rate) if args.rate > 0 else 0.0
    return Workload(prompts, lengths, arrivals)


class Trace:
    """When each request got its first and its latest token, on the host clock from the run's start (a token's
    id reaching Python has synchronized the device), and its tokens."""

    def __init__(self, arrivals: list[float]):
        self.arrivals, self.start = arrivals, time.perf_counter()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.tokens: dict[int, list[int]] = {}

    def now(self) -> float:
        return time.perf_counter() - self.start

    def token(self, i: int, ids: list[int]) -> None:
        """Request i has generated `ids` so far, the last of them just now."""
        t = self.now()
        self.first.setdefault(i, t)
        self.last[i], self.tokens[i] = t, ids


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in (0, 100])."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latencies(trace: Trace, lengths: list[int]) -> dict:
    """TTFT (arrival -> first token) and TPOT ((last - first) / (tokens - 1), requests of 2+ tokens) p50 and p99, seconds."""
    ttft = [trace.first[i] - trace.arrivals[i] for i in range(len(lengths))]
    tpot = [(trace.last[i] - trace.first[i]) / (n - 1) for i, n in enumerate(lengths) if n > 1] or [0.0]
    return {"ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99), "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99)}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM back to the current RSS


def peak_memory(device: torch.device) -> int:
    """Bytes: torch.cuda.max_memory_allocated on a GPU, else this process's peak RSS (VmHWM) since the reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
