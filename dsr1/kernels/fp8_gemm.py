"""Matrix products with block-quantized FP8 weights: x [..., K] @ dequant(weight [N, K]).T -> [..., N].

R1 stores each projection as e4m3 `weight` [N, K] plus fp32 `weight_scale_inv` [ceil(N/128), ceil(K/128)].
Four backends compute the same product:

- `dequant` (dsr1/kernels/backend.py): dequantize the weight, then multiply in the activations' dtype. Pure
  PyTorch, runs on any device, and is the reference that the others are checked against. It reads the FP8
  weight but also writes and re-reads a dense copy of it.
- `scaled_mm`: quantize the activations per token in 1x128 groups (scale = amax / 448, the DeepSeek-V3
  recipe), then call PyTorch's block-scaled FP8 matmul (cuBLASLt; SM90 with CUDA >= 12.9 only). The
  weight is read once, as FP8.
- `deepgemm`: the same quantization, then DeepGEMM's `fp8_gemm_nt`, where `deep_gemm` imports (built from its
  source: docs/PERFORMANCE.md); its grouped GEMM runs a prefill's routed experts (experts.Contiguous).
- `w8a16` (dsr1/kernels/w8a16_backend.py): weight-only FP8 (dsr1/kernels/w8a16.py, Triton): the FP8 weight
  is read once and multiplied with the bf16 activations as they are, so the result stays within bf16 rounding
  of `dequant` (the activation quantization of the two FP8xFP8 backends costs ~2.5% per matmul). It also runs MLA's per-head and
  latent-cache products and the routed experts on the DeepEP low-latency layout, with no host sync. Its dense
  products past 256 rows (prefill, compute-bound) go to `deepgemm` or `scaled_mm` where one runs, else to
  `dequant`, and so do a prefill's routed experts (`packed_experts`).

All four are one interface (backend.Backend): a layer holds one as `gemm` and asks it for each fast path.

`select_fp8_backend("auto")` picks the first of w8a16, deepgemm, scaled_mm and dequant that imports and
passes a one-matmul self-check on the device. `use_fp8_gemm(model, backend)` gives that backend to every layer.
Shapes the fast backends cannot take (K not a multiple of 128, N not a multiple of 16) go through dequant;
rows are padded to a multiple of `m_align` (4 for scaled_mm). docs/PERFORMANCE.md has the measurements.

M rows (tokens), K in features, N out features, Kb = ceil(K / 128)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr1.fp8 import BLOCK, quantize, quantize_activation
from dsr1.kernels import experts, w8a16
from dsr1.kernels.backend import DEQUANT, Backend
from dsr1.kernels.w8a16_backend import W8A16

BACKENDS = ("auto", "w8a16", "deepgemm", "scaled_mm", "dequant")
PACKED_MIN_TOKENS = 512  # a MoE layer of this many tokens on one process runs its experts on packed rows (DeepGEMM)
SELF_CHECK_TOL = 5e-2  # e4m3 activations alone cost ~2.5% RMS per matmul; a wrong scale layout costs far more
W8A16_TOL = 1e-2  # the same bf16 weights as dequant: only summation order and output rounding differ


class _QuantizedActivations(Backend):
    """Shared by the FP8xFP8 backends: flatten, pad rows, quantize; fall back to dequant for shapes they can't take."""

    keeps_dense = True  # a dense weight needed outside a matmul (MLA's wkv_b) is dequantized once and kept
    dtypes = (torch.bfloat16, torch.float16)  # activation dtypes the matmul takes; others go through dequant

    def __init__(self, m_align: int):
        self.m_align = m_align
        self.ragged_n = True  # N not a multiple of 128 (R1's wkv_a: 576); cleared if the self-check fails on it

    def linear(self, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        n, k = weight.shape
        if k % BLOCK or n % 16 or (n % BLOCK and not self.ragged_n) or x.dtype not in self.dtypes:
            return DEQUANT.linear(x, weight, scale)
        rows = x.reshape(-1, k)  # [M, K]
        m = rows.shape[0]
        if m == 0:  # an idle expert-parallel rank's empty batch
            return x.new_zeros(*x.shape[:-1], n)
        if m % self.m_align:
            rows = F.pad(rows, (0, 0, 0, -m % self.m_align))
        q, q_scale = quantize_activation(rows)
        return self.matmul(q, q_scale, weight, scale, x.dtype)[:m].view(*x.shape[:-1], n)

    def matmul(self, q: Tensor, q_scale: Tensor, weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
        """q [M, K] e4m3 with q_scale [M, Kb], weight [N, K] e4m3 with scale [Nb, Kb] -> [M, N] in dtype."""
        raise NotImplementedError


class ScaledMM(_QuantizedActivations):
    """PyTorch's block-scaled FP8 matmul: 1x128 activation scales, 128x128 weight scales (cuBLASLt, SM90)."""

    name = "scaled_mm"

    def __init__(self, m_align: int = 4):  # cuBLASLt rejects other row counts (CUBLAS_STATUS_NOT_SUPPORTED; H100, CUDA 13.0)
        super().__init__(m_align)

    def matmul(self, q: Tensor, q_scale: Tensor, weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
        # cuBLASLt reads both scale tensors outer-dim-major (q_scale already is), the weight's with its K
        # blocks padded to a multiple of 4 (R1's K are all multiples of 512: no copy).
        pad = -scale.shape[1] % 4
        b_scale = (F.pad(scale, (0, pad)) if pad else scale).t()  # [Kb4, Nb], strides (1, Kb4)
        if hasattr(F, "scaled_mm"):
            recipe = F.ScalingType
            return F.scaled_mm(q, weight.t(), q_scale, recipe.BlockWise1x128, b_scale, recipe.BlockWise128x128, output_dtype=dtype)
        return torch._scaled_mm(q, weight.t(), q_scale, b_scale, out_dtype=dtype)  # torch < 2.10: recipe read off the scale shapes


class DeepGemm(_QuantizedActivations):
    """DeepGEMM's dense FP8 GEMM (`fp8_gemm_nt`, the v2 API): bf16 output, fp32 scales on SM90; and its grouped
    GEMM on contiguous rows for a prefill's routed experts (experts.Contiguous)."""

    name = "deepgemm"
    dtypes = (torch.bfloat16,)

    def __init__(self, m_align: int = 4):  # scales stay MN-major and TMA-aligned (a multiple of 4 rows): no transpose copy
        super().__init__(m_align)
        import deep_gemm  # raises ImportError where it is not installed

        self.deep_gemm = deep_gemm
        self.contiguous = experts.Contiguous(deep_gemm)

    def matmul(self, q: Tensor, q_scale: Tensor, weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
        out = torch.empty(q.shape[0], weight.shape[0], dtype=dtype, device=q.device)
        self.deep_gemm.fp8_gemm_nt((q, q_scale), (weight, scale), out)
        return out

    def packed_experts(self, x: Tensor, fp8: bool) -> experts.Contiguous | None:
        """FP8 experts of PACKED_MIN_TOKENS or more bf16 tokens (below, the masked W8A16 kernel reads only the routed
        experts' weights, and the 128-row segments would be mostly padding); never inside a CUDA-graph capture
        (the segments' row count is read on the host)."""
        takes = fp8 and x.dtype == torch.bfloat16 and x.is_cuda and x.shape[0] >= PACKED_MIN_TOKENS
        return self.contiguous if takes and not torch.cuda.is_current_stream_capturing() else None


def probe_fp8_backends(device: torch.device | str) -> dict[str, str]:
    """Each FP8 backend's status on `device`: 'ok', or why it cannot be used there."""
    return {name: _probe(name, torch.device(device))[1] for name in BACKENDS[1:]}


def select_fp8_backend(name: str = "auto", device: torch.device | str | None = None):
    """The backend called `name` for `device` (default CPU), or with 'auto' the first that works of w8a16,
    deepgemm, scaled_mm, dequant. Naming a backend that cannot run on the device is an error."""
    if name not in BACKENDS:
        raise ValueError(f"--fp8-gemm {name!r} is not one of {BACKENDS}")
    device = torch.device(device or "cpu")
    auto = [c for c in BACKENDS[1:] if device.type == "cuda" or c == "dequant"]  # the others are for GPUs (w8a16 on CPU: tests)
    for candidate in auto if name == "auto" else (name,):
        backend, status = _probe(candidate, device)
        if backend is not None:
            return backend
        if name != "auto":
            raise ValueError(f"--fp8-gemm {name} cannot run on {device}: {status}; use --fp8-gemm auto or dequant")
    raise AssertionError("dequant always works")


def use_fp8_gemm(model: nn.Module, backend: Backend) -> None:
    """Make every layer of `model` with a `gemm` attribute (Linear, MLA, GroupedExperts) use `backend`."""
    for module in model.modules():
        if hasattr(module, "gemm"):
            module.gemm = backend


def _probe(name: str, device: torch.device):
    """(backend, 'ok') if `name` runs on `device` and matches dequant on one product, else (None, reason)."""
    if name == "dequant":
        return DEQUANT, "ok"
    if name == "w8a16":
        if not w8a16.available(device):
            return None, "needs Triton and a CUDA device" if w8a16.triton is not None else "needs Triton (pip install triton)"
        backend = W8A16()
        err = _self_check(backend, device, n=320)
        if not err <= W8A16_TOL:
            return None, f"self-check relative error {err:.2e} > {W8A16_TOL}"
        # products past DENSE_MAX_ROWS rows (a prefill) on FP8 tensor cores: DeepGEMM, else cuBLASLt, where they run
        prefill = next((b for b in (_probe(n, device)[0] for n in ("deepgemm", "scaled_mm")) if b is not None), None)
        backend.prefill = prefill or DEQUANT
        return backend, f"ok (prefill products through {backend.prefill.name})"
    if device.type != "cuda":
        return None, f"needs a CUDA device, got {device}"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return None, f"needs SM90 (Hopper), got SM{''.join(map(str, torch.cuda.get_device_capability(device)))}"
    try:
        backend = ScaledMM() if name == "scaled_mm" else DeepGemm()
        err = _self_check(backend, device, n=384)
        if name == "deepgemm":
            err = max(err, _self_check_experts(backend.contiguous, device))
    except Exception as e:  # an import, a missing kernel or a failed launch: the backend is unusable here
        return None, f"{type(e).__name__}: {e}"
    if not err <= SELF_CHECK_TOL:
        return None, f"self-check relative error {err:.2e} > {SELF_CHECK_TOL}"
    try:
        ragged_ok = _self_check(backend, device, n=320) <= SELF_CHECK_TOL
    except RuntimeError:
        ragged_ok = False
    backend.ragged_n = ragged_ok
    return backend, "ok" if ragged_ok else "ok (N not a multiple of 128 goes through dequant)"


def _self_check_experts(kernel: experts.Contiguous, device: torch.device) -> float:
    """||kernel - loop|| / ||loop|| on three experts' packed rows (5, none, 130: a segment past one block)."""
    gen = torch.Generator(device).manual_seed(0)
    counts = torch.tensor([5, 0, 130], device=device)
    rows = torch.randn(int(counts.sum()), 256, generator=gen, device=device).to(torch.bfloat16)
    w = [[quantize(torch.randn(o, i, generator=gen, device=device) / 16) for _ in range(3)] for o, i in ((128, 256), (256, 128), (128, 256))]
    weights = [(torch.stack([q for q, _ in ws]), torch.stack([s for _, s in ws])) for ws in w]  # w1, w2, w3: [3, out, in]
    got = kernel(rows, counts, *weights).float()
    ref, start = torch.zeros_like(got), 0
    for j, n in enumerate(counts.tolist()):
        x = rows[start : start + n].float()
        h = F.silu(DEQUANT.linear(x, weights[0][0][j], weights[0][1][j])) * DEQUANT.linear(x, weights[2][0][j], weights[2][1][j])
        ref[start : start + n] = DEQUANT.linear(h, weights[1][0][j], weights[1][1][j])
        start += n
    return ((got - ref).norm() / ref.norm()).item()


def _self_check(backend, device: torch.device, n: int) -> float:
    """||backend - dequant|| / ||dequant|| on one random [5, 256] x [n, 256] product (~2.5% from e4m3 activations)."""
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(5, 256, generator=gen, device=device).to(torch.bfloat16)
    weight, scale = quantize(torch.randn(n, 256, generator=gen, device=device) / 16)
    got, ref = backend.linear(x, weight, scale).float(), DEQUANT.linear(x.float(), weight, scale)
    return ((got - ref).norm() / ref.norm()).item()
