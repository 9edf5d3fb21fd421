"""Expert parallelism through DeepEP's low-latency (LL) kernels (V1 `deep_ep.Buffer` API).

DeepEP is imported only when the dispatcher is built, so this module (and its argument checks) loads
without it. Facts and limits: DeepEP V1 commit 567632d, `deep_ep/buffer.py` and `csrc/deep_ep.cpp`.

n tokens on this rank, k experts per token, e local experts, m model dim, R EP ranks, T max tokens per rank
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from dsr1.model.dispatch import check_chunk
from dsr1.parallel.dispatch import check_group, ep_chunks
from dsr1.fp8 import FP8Rows
from dsr1.parallel.placement import Placement

HIDDEN_SIZES = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)  # compiled in csrc/kernels/launch.cuh
MAX_TOP_K = 11  # kNumMaxTopK in internode_ll.cu

BUILD_HINT = (
    "build DeepEP from source (https://github.com/deepseek-ai/DeepEP, V1 Buffer API, commit 567632d, against the "
    "pip wheel nvidia-nvshmem-cu13), or run with --all2all torch"
)

_buffers: dict[tuple[ProcessGroup, int, int], Any] = {}  # LL Buffers by (group, rdma bytes, qps per rank)


def check_low_latency_args(hidden: int, n_experts: int, ep_size: int, max_tokens: int, fp8_dispatch: bool) -> None:
    """Reject what DeepEP's LL kernels would refuse (or assert on, on the GPU), before importing them."""
    if fp8_dispatch and hidden % 512:  # true of every size compiled today, checked first to say why
        raise ValueError(f"DeepEP FP8 dispatch needs hidden % 512 == 0, got hidden={hidden}; dispatch in BF16")
    if hidden not in HIDDEN_SIZES:
        raise ValueError(f"DeepEP low-latency is built for hidden sizes {HIDDEN_SIZES}, got hidden={hidden}; use --all2all torch")
    if n_experts % ep_size:
        raise ValueError(f"DeepEP low-latency needs n_routed_experts % ep_size == 0, got {n_experts} % {ep_size}")
    if (ep_size * max_tokens) % 4:
        raise ValueError(f"DeepEP low-latency needs ep_size * max_tokens_per_rank % 4 == 0, got {ep_size} * {max_tokens}")


def check_top_k(top_k: int) -> None:
    if top_k > MAX_TOP_K:
        raise ValueError(f"DeepEP low-latency supports at most {MAX_TOP_K} experts per token, got top-k={top_k}")


def _import_deep_ep() -> Any:
    try:
        import deep_ep
    except ImportError as e:
        raise ImportError(f"--all2all deepep_ll needs DeepEP, but `import deep_ep` failed ({e}): {BUILD_HINT}") from e
    return deep_ep


def _low_latency_buffer(deep_ep: Any, group: ProcessGroup, rdma_bytes: int, qps: int) -> Any:
    """An LL Buffer, made once per process and reused by every dispatcher of the same shape: NVSHMEM
    setup is collective and slow, and repeated init/finalize is flaky (vLLM PR #53332)."""
    key = (group, rdma_bytes, qps)
    if key not in _buffers:
        _buffers[key] = deep_ep.Buffer(
            group, num_nvl_bytes=0, num_rdma_bytes=rdma_bytes, low_latency_mode=True, num_qps_per_rank=qps
        )
    return _buffers[key]


class _LLHandle(NamedTuple):
    native: Any  # DeepEP's own handle (src_info, layout_range, T, H, E)
    physical_ids: Tensor  # [n, k] int64: combine must get the ids dispatch got
    weights: Tensor  # [n, k] fp32
    dtype: torch.dtype  # x's dtype, restored by combine


class DeepEPLowLatencyDispatcher:
    """Dispatch/combine with DeepEP LL: tokens cross NVLink (or RDMA) straight into [e, R*T, m] receive buffers.

    Activations travel in BF16 (x of another dtype is cast, and combine casts back), or in FP8 with
    per-128-channel scales when fp8_dispatch is set; the FP8 receive goes to the experts as FP8Rows (the
    w8a16 kernel reads it directly, other paths dequantize it). Rows of an expert arrive grouped by source rank, in
    an order that varies from run to run. The Buffer is set up over `group` (None: the default group);
    vLLM passes a gloo group there (dsr1.parallel.dist.new_cpu_group), and chunks() reduces over it too.
    The LL kernels need no host sync, so decode steps can be captured in CUDA graphs (dsr1/engine/decode_graphs.py).
    """

    capturable = True

    def __init__(
        self, placement: Placement, group: ProcessGroup | None, max_tokens_per_rank: int, hidden: int, fp8_dispatch: bool = False
    ):
        check_low_latency_args(hidden, placement.n_experts, placement.ep_size, max_tokens_per_rank, fp8_dispatch)
        deep_ep = _import_deep_ep()
        group = dist.group.WORLD if group is None else group
        check_group(placement, group)
        self.placement = placement.to(torch.device("cuda", torch.cuda.current_device()))
        self.group, self.max_tokens, self.fp8_dispatch, self.one_chunk = group, max_tokens_per_rank, fp8_dispatch, False
        self.n_local_experts = placement.n_local
        self.local_expert_ids = placement.local_expert_global_ids.tolist()
        n_experts, ep_size = placement.n_experts, placement.ep_size
        rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens_per_rank, hidden, ep_size, n_experts)  # R1: ~1.9 GB
        self.buffer = _low_latency_buffer(deep_ep, group, rdma_bytes, n_experts // ep_size)

    def chunks(self, n_tokens: int) -> list[tuple[int, int]]:
        return ep_chunks(n_tokens, self.max_tokens, self.group, self.one_chunk)

    @torch.compiler.disable  # DeepEP's C++ buffer is opaque to torch.compile (compiled decode blocks break here)
    def dispatch(self, x: Tensor, expert_ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Any]:
        check_chunk(x.shape[0], self.max_tokens)
        check_top_k(expert_ids.shape[1])
        physical_ids = self.placement.to_physical(expert_ids).contiguous()  # [n, k] int64, deep_ep.topk_idx_t
        x16 = x.to(torch.bfloat16).contiguous()  # [n, m]; the kernels take BF16 only
        recv, counts, native, _, _ = self.buffer.low_latency_dispatch(
            x16, physical_ids, self.max_tokens, self.placement.n_experts,
            use_fp8=self.fp8_dispatch, async_finish=False, return_recv_hook=False,
        )
        if self.fp8_dispatch:
            recv = FP8Rows(*recv)  # [e, R*T, m] e4m3, [e, R*T, m/128] fp32: the experts read them as they are
        handle = _LLHandle(native, physical_ids, weights.float().contiguous(), x.dtype)
        return recv, counts, handle

    @torch.compiler.disable
    def combine(self, y: Tensor, handle: Any) -> Tensor:
        out, _, _ = self.buffer.low_latency_combine(
            y.to(torch.bfloat16).contiguous(), handle.physical_ids, handle.weights, handle.native
        )  # [n, m] bf16, the weighted sum done in the kernel
        return out.to(handle.dtype)
