"""Run a test function on N CPU processes joined in one gloo process group."""

import multiprocessing
import socket
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn: Callable, world: int, *args) -> None:
    """fn(rank, world, *args) on `world` processes; a failure on any rank re-raises here with its traceback.

    fn must be a module-level function. Ranks fork from a server that has imported torch (and fn's
    module) once, so starting them is quick even on 2 cores, and that never ran torch ops, so no
    OpenMP state is forked.
    """
    # torch._dynamo: imported lazily on first use of the meta device (model building), seconds each time.
    multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", "pytest", "dsr1", fn.__module__])
    mp.start_processes(_entry, args=(fn, world, _free_port(), args), nprocs=world, start_method="forkserver")


def _entry(rank: int, fn: Callable, world: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
