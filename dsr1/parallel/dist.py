"""Process-group helpers for expert parallelism. Nothing here is global state: callers keep what they get."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def init_distributed() -> tuple[int, int, int]:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK -> (rank, world_size, local_rank).

    The backend is NCCL when CUDA is available (after binding this process to GPU LOCAL_RANK), else
    gloo. Without torchrun's variables this is a single process: (0, 1, 0) and no process group.
    """
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, local_rank


def join_ep_benchmark() -> tuple[int, int, torch.device, torch.dtype]:
    """For the torchrun benchmarks of expert parallelism: join the job (SystemExit unless 2+ processes) ->
    (rank, world_size, this process's device, its run dtype: bf16 on a GPU, fp32 on CPU)."""
    rank, world, _ = init_distributed()
    if world == 1:
        raise SystemExit("run under torchrun with 2 or more processes: the benchmark measures expert parallelism")
    if torch.cuda.is_available():
        return rank, world, torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    return rank, world, torch.device("cpu"), torch.float32


def new_cpu_group() -> ProcessGroup:
    """A gloo group over all ranks, for CPU-side collectives (DeepEP's Buffer setup, as vLLM does).

    Collective: every rank must call it, in the same order as any other new_group call.
    """
    return dist.new_group(backend="gloo")


def collective_device(group: ProcessGroup | None = None) -> torch.device:
    """Where tensors for collectives on `group` must live: the current GPU for NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(value: int, group: ProcessGroup | None = None) -> int:
    """The largest `value` over the ranks of `group`."""
    t = torch.tensor([value], dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def is_rank0() -> bool:
    """Whether this process is rank 0 of its job (or runs alone); before the group exists, torchrun's RANK says."""
    return dist.get_rank() == 0 if dist.is_initialized() else int(os.environ.get("RANK", 0)) == 0


def log_rank0(*args, **kwargs) -> None:
    """print() once per job, on rank 0 (streams with end="", writes to stderr with file=sys.stderr)."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


def rank_share(n_items: int, rank: int, world_size: int) -> range:
    """The items rank `rank` handles when n_items are split data-parallel: contiguous blocks of
    ceil(n / world) (so with few items the last ranks may get none, and still join every collective)."""
    per_rank = -(-n_items // world_size)
    return range(min(rank * per_rank, n_items), min((rank + 1) * per_rank, n_items))
