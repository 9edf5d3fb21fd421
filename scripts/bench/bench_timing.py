"""The benchmarks' one timing helper: `Timer`, and the copy bandwidth that the memory floors divide by.

Every script under scripts/bench/ times through a Timer: CUDA events on a GPU, the host clock after a
sync elsewhere, always from an idle device, so a figure counts the work's whole span (host launches
included, unless replayed from a CUDA graph).
"""

from __future__ import annotations

import time
from typing import Callable

import torch


class Timer:
    """Wall time of device work: CUDA events on a GPU, the host clock after a sync elsewhere."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        """Seconds `fn` takes, measured from an idle device."""
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    def median(self, fn: Callable[[], object], reps: int) -> float:
        """Median seconds of `reps` timed calls of `fn`."""
        times = sorted(self(fn) for _ in range(reps))
        return times[len(times) // 2]

    def per_call(self, fn: Callable[[], object], calls: int = 20, warmup: int = 1, graph: bool = False) -> float:
        """Seconds per call of `calls` back-to-back calls of `fn`, after `warmup` untimed ones. graph: the
        calls are captured into one CUDA graph and replayed (host launch cost excluded)."""
        for _ in range(warmup):
            fn()

        def run() -> None:
            for _ in range(calls):
                fn()

        if not graph:
            return self(run) / calls
        torch.cuda.synchronize()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            run()
        cuda_graph.replay()  # the first replay uploads the graph
        return self(cuda_graph.replay) / calls


def copy_bandwidth(device: torch.device, nbytes: int, timer: Timer, reps: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written (median of reps)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / timer.median(lambda: dst.copy_(src), reps)
