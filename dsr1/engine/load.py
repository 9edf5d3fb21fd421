"""Load a checkpoint for an expert-parallel torchrun job: one process per EP rank, attention data-parallel.

Each rank places the routed experts (linear or round-robin), builds its dispatcher (torch collectives
or DeepEP low-latency) and loads only the replicated tensors plus its own experts.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from torch.distributed import ProcessGroup

from dsr1.checkpoint.loader import load_model
from dsr1.config import ModelConfig
from dsr1.model.transformer import Transformer
from dsr1.model.dispatch import Dispatcher, LocalDispatcher
from dsr1.parallel.deepep import DeepEPLowLatencyDispatcher
from dsr1.parallel.dispatch import TorchDispatcher
from dsr1.parallel.dist import init_distributed
from dsr1.parallel.placement import Placement, expert_placement as place_experts

DEFAULT_PLACEMENT = "linear"
DEFAULT_ALL2ALL = "torch"
ALL2ALL = ("local", "torch", "deepep_ll")


def load_ep_model(
    ckpt_path: str | Path,
    ep: int = 1,
    expert_placement: str | None = None,
    all2all: str | None = None,
    fp8_dispatch: bool = False,
    max_dispatch_tokens: int = 128,
    **load_kwargs,
) -> tuple[Transformer, ProcessGroup | None]:
    """(model, EP process group) on every rank of a torchrun job of `ep` processes; (model, None) for ep=1.

    expert_placement: 'linear' | 'round_robin'; all2all: 'torch' | 'deepep_ll'; fp8_dispatch: DeepEP sends
    FP8 activations; max_dispatch_tokens: tokens per rank per dispatch (longer prefills are chunked).
    load_kwargs go to dsr1.load_model (device, dtype, fp8, attn_impl, max_seq_len, progress, ...).
    """
    rank, world, _ = init_distributed()
    if ep < 1:
        raise ValueError(f"--ep must be >= 1, got {ep}")
    if world != ep:
        raise ValueError(
            f"--ep {ep} needs one process per EP rank, but WORLD_SIZE={world}: launch with "
            f"torchrun --nproc-per-node {ep} (attention runs data-parallel over the same ranks)"
        )
    if ep == 1:
        return load_model(ckpt_path, **load_kwargs), None
    cfg = ModelConfig.from_file(Path(ckpt_path) / "config.json")
    placement = place_experts(cfg.n_routed_experts, ep, rank, expert_placement or DEFAULT_PLACEMENT)
    group = dist.group.WORLD
    dispatcher = make_dispatcher(all2all or DEFAULT_ALL2ALL, placement, group, max_dispatch_tokens, cfg.dim, fp8_dispatch)
    return load_model(ckpt_path, dispatcher=dispatcher, rank=rank, **load_kwargs), group


def make_dispatcher(
    all2all: str, placement: Placement, group: ProcessGroup | None, max_tokens: int, hidden: int, fp8_dispatch: bool = False
) -> Dispatcher:
    """The dispatcher for --all2all (local | torch | deepep_ll); one EP rank always gets LocalDispatcher.

    max_tokens is the per-rank chunk size T; hidden the model dim (DeepEP sizes its buffer with it);
    fp8_dispatch sends FP8 activations (deepep_ll only).
    """
    if all2all not in ALL2ALL:
        raise ValueError(f"--all2all={all2all!r} is not one of {ALL2ALL}")
    if fp8_dispatch and all2all != "deepep_ll":
        raise ValueError(f"FP8 dispatch needs --all2all deepep_ll, got --all2all {all2all}")
    if placement.ep_size == 1:
        return LocalDispatcher(placement.n_experts, max_tokens)
    if all2all == "local":
        raise ValueError(
            f"--all2all local holds all experts in one process, but ep_size={placement.ep_size}: use torch or deepep_ll"
        )
    if all2all == "torch":
        return TorchDispatcher(placement, group, max_tokens)
    return DeepEPLowLatencyDispatcher(placement, group, max_tokens, hidden, fp8_dispatch)


def gather_to_rank0(obj, group: ProcessGroup | None) -> list | None:
    """Every rank's obj, in rank order, on rank 0 (None on the others); [obj] without a group."""
    if group is None:
        return [obj]
    out = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out
