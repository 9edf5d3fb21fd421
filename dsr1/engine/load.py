"""Build a run: config -> expert placement -> dispatcher -> model -> weights -> FP8 matmul backend.

`load_model` (dsr1.load_model) serves one process, or one rank of an expert-parallel job; `load_ep_model`
first joins the torchrun job (one process per EP rank, attention data-parallel over them). Each rank
places the routed experts (linear or round-robin), builds its dispatcher (torch collectives or DeepEP
low-latency) and reads only the replicated tensors plus its own experts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from dsr1.checkpoint.loader import Checkpoint, build_model, read_weights
from dsr1.config import ParallelConfig
from dsr1.kernels.fp8_gemm import select_fp8_backend, use_fp8_gemm
from dsr1.model.dispatch import Dispatcher, LocalDispatcher
from dsr1.model.transformer import Transformer
from dsr1.parallel.deepep import DeepEPLowLatencyDispatcher
from dsr1.parallel.dispatch import TorchDispatcher
from dsr1.parallel.dist import init_distributed
from dsr1.parallel.placement import Placement, expert_placement

ALL2ALL = ("local", "torch", "deepep_ll")


def load_model(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    fp8: bool = False,
    gemm: str = "auto",
    attn_impl: str = "absorb",
    max_seq_len: int | None = None,
    load_mtp: bool = False,
    progress: bool = True,
    parallel: ParallelConfig = ParallelConfig(),
    rank: int = 0,
    group: ProcessGroup | None = None,
) -> Transformer:
    """The checkpoint at `path` as a Transformer in eval mode; its `.load_stats` says what was read.

    device/dtype default to CUDA (cuda:$LOCAL_RANK) + bf16 when available, else CPU + float32. fp8=True
    keeps FP8 weights in memory and multiplies them with the `gemm` backend (dsr1/kernels/fp8_gemm.py:
    'auto' takes FP8 matmuls where the device has them, 'dequant' dequantizes per matmul); otherwise they
    are dequantized once, at load. attn_impl: 'absorb' (cache the MLA latent) or 'naive'; max_seq_len
    sizes the rope table (default max_position_embeddings); load_mtp also loads the MTP layer. With
    parallel.ep_size > 1 this process is EP rank `rank` of `group` (load_ep_model sets both up).
    """
    default_device, default_dtype = default_device_dtype()
    device = torch.device(device or default_device)
    dtype = dtype or (default_dtype if device.type == default_device.split(":")[0] else torch.float32)
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    if fp8 and not ckpt.is_fp8:
        raise ValueError(f"fp8=True keeps FP8 weights in memory, but {ckpt.path} is not an FP8 checkpoint (no quantization_config)")
    placement = expert_placement(cfg.n_routed_experts, parallel.ep_size, rank, parallel.expert_placement)
    plan = ckpt.plan(placement.local_expert_global_ids.tolist(), load_mtp, rank)  # checked before anything is allocated
    dispatcher = make_dispatcher(parallel.all2all, placement, group, parallel.max_dispatch_tokens, cfg.dim, parallel.fp8_dispatch)
    model = build_model(cfg, device, dtype, fp8, dispatcher=dispatcher, attn_impl=attn_impl, max_seq_len=max_seq_len, load_mtp=load_mtp)
    model.load_stats = read_weights(ckpt, plan, model, fp8, progress)
    if fp8:
        use_fp8_gemm(model, select_fp8_backend(gemm, device))
    return model.eval()


def load_ep_model(path: str | Path, parallel: ParallelConfig = ParallelConfig(), **load_kwargs) -> tuple[Transformer, ProcessGroup | None]:
    """(model, EP process group) on every rank of a torchrun job of `parallel.ep_size` processes; (model, None)
    for one. load_kwargs go to load_model (device, dtype, fp8, gemm, attn_impl, max_seq_len, progress, ...)."""
    rank, world, _ = init_distributed()
    if world != parallel.ep_size:
        raise ValueError(
            f"--ep {parallel.ep_size} needs one process per EP rank, but WORLD_SIZE={world}: launch with "
            f"torchrun --nproc-per-node {parallel.ep_size} (attention runs data-parallel over the same ranks)"
        )
    group = dist.group.WORLD if world > 1 else None
    return load_model(path, parallel=parallel, rank=rank, group=group, **load_kwargs), group


def default_device_dtype() -> tuple[str, torch.dtype]:
    """CUDA (this process's LOCAL_RANK) with bf16 when available, else CPU with float32."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}", torch.bfloat16
    return "cpu", torch.float32


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
