"""scripts/bench/bench_timing.py: the benchmarks' one timing helper."""

import time

import torch

from bench_timing import Timer, copy_bandwidth


def test_timer_counts_the_calls_it_times():
    calls = []
    timer = Timer("cpu")
    assert timer(lambda: time.sleep(0.01)) >= 0.01
    per_call = timer.per_call(lambda: (calls.append(1), time.sleep(0.002)), calls=5, warmup=2)
    assert len(calls) == 7 and per_call >= 0.002
    assert timer.median(lambda: calls.append(1), reps=3) >= 0 and len(calls) == 10
    assert copy_bandwidth(torch.device("cpu"), 1 << 20, timer, reps=3) > 0
