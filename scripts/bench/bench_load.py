"""The cold-load figure's pieces: evicting a checkpoint from the page cache, the disk's own read rate,
reading the same checkpoint the plain way (safetensors, tensor by tensor, `.to(device)`) as a peer, and
timing dsr1.load_model on it (scripts/bench/model.py --load-dir, scripts/bench/disk_read.py)."""

from __future__ import annotations

import functools
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

import dsr1
import dsr1.checkpoint.loader as loader
from bench_timing import Timer
from dsr1.checkpoint.reader import CHUNK, THREADS, Reader


def evict(files: list[Path]) -> str:
    """Drop `files` from the page cache so the next read comes from the disk: the whole cache where this
    process may (root), else each file's clean pages (posix_fadvise DONTNEED). Returns how."""
    os.sync()  # dirty pages cannot be dropped
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def disk_read_rate(files: list[Path], threads: int = THREADS, chunk: int = CHUNK, direct: bool = False) -> float:
    """Bytes per second reading every byte of `files` (evicted first) into host memory, `threads` reads of
    `chunk` bytes in flight: what the disk gives the loader's reading pattern, with no device copy.
    direct: O_DIRECT reads, past the page cache (chunk must be a multiple of 4096)."""
    if direct and chunk % 4096:
        raise ValueError(f"O_DIRECT reads need a chunk that is a multiple of 4096 bytes, got {chunk}")
    evict(files)
    jobs = [(f, start, min(chunk, f.stat().st_size - start)) for f in files for start in range(0, f.stat().st_size, chunk)]
    local = threading.local()  # one buffer per thread; mmap's is page-aligned, as O_DIRECT needs

    def read(job: tuple[Path, int, int]) -> int:
        f, start, n = job
        if not hasattr(local, "buf"):
            local.buf = mmap.mmap(-1, chunk)
        fd = os.open(f, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:  # O_DIRECT reads whole pages: the file's last read asks for more and gets what is there
            return min(n, os.preadv(fd, [memoryview(local.buf)[: -(-n // 4096) * 4096 if direct else n]], start))
        finally:
            os.close(fd)

    total = 0

    def read_all() -> None:
        nonlocal total
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(read, jobs))

    t = Timer("cpu")(read_all)
    return total / t


def safetensors_read_rate(files: list[Path], device: torch.device) -> float:
    """Bytes per second loading every tensor of `files` (evicted first) the plain way: safetensors'
    memory-mapped get_tensor, then a synchronous `.to(device)`, one tensor after another."""
    evict(files)
    total = 0

    def read_all() -> None:
        nonlocal total
        for f in files:
            with safe_open(str(f), "pt") as handle:
                for name in handle.keys():
                    total += handle.get_tensor(name).to(device).nbytes

    t = Timer(device)(read_all)
    return total / t


def time_load(path: Path, device: torch.device, dtype: torch.dtype, gemm: str = "auto", reader: tuple[int, int] | None = None) -> tuple[float, str]:
    """Seconds dsr1.load_model takes on the checkpoint at `path` (FP8 weights kept) from a cold page cache,
    and how the cache was emptied. reader: (threads, chunk bytes) for the loader's Reader instead of its defaults."""
    how = evict(sorted(Path(path).glob("*.safetensors")))
    default = loader.Reader
    if reader is not None:
        loader.Reader = functools.partial(Reader, threads=reader[0], chunk=reader[1])
    try:
        return Timer(device)(lambda: dsr1.load_model(path, device=device, dtype=dtype, fp8=True, progress=False, gemm=gemm)), how
    finally:
        loader.Reader = default
