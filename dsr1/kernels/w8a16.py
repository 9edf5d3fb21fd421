"""Weight-only FP8 matmuls (W8A16) in Triton: FP8 weights read as FP8, activations kept in bf16.

One kernel computes x @ W.T for a dense layer and for a stack of experts on DeepEP's low-latency layout
(x [e, M, K] with only rows [0, counts[j]) of expert j valid). Weights cross memory once, at one byte per
value, and are multiplied exactly: e4m3 -> bf16 is exact, each 128-wide K block's products are summed in
fp32 and that partial sum is multiplied by the block's scale. (`dequantize` first rounds fp8 * scale to
bf16, 2^-9 relative per weight, so the two paths differ by bf16 rounding.) One row (M = 1, a batch-1
decode step) is a matrix-vector product in fp32 FMAs, which streams the weight faster than tensor cores
fed through shared memory; more rows use tl.dot. K may be split across programs to fill the GPU: each
split stores an fp32 partial sum and the tile's last split to finish adds them in split order (no
separate reduction kernel; deterministic). Experts with no rows, and row tiles past an expert's
count, exit before loading anything: a decode step reads only the experts it routed to, with no host sync
(the counts stay on the device), so the step can be captured in a CUDA graph; a device-side list of the
experts that can have rows (active_experts) shrinks the grid to those; with `listed`, x holds one block per
listed expert instead (one token times its k experts, no dispatch). FP8 activations (FP8Rows,
from DeepEP's FP8 dispatch) are dequantized tile by tile inside the kernel, bit for bit as
FP8Rows.dequantize. On Hopper and newer the kernel is launched with programmatic dependent launch (PDL):
it may start while the previous kernel finishes, waits for it before its first load, and lets the next
kernel launch once its weights are read. With Inductor's kernels doing the same, a batch-1 decode step on an
H200 took 1.645 ms instead of 1.678 (docs/perf/h200-pdl-ablation.json), bit for bit the same.

Used when Triton imports, the tensors are on a CUDA device and the activations are bf16 (R1's run dtype);
TRITON_INTERPRET=1 runs the same kernel on CPU tensors (the tests do). Run-dtype (bf16) weights take the
same path with no scale (MLA's latent cache in a decode step is one: attention.py).

e experts (1 for a dense layer), M rows per expert, K in features, N out features, S K-splits
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from dsr1.fp8 import BLOCK
from dsr1.fp8 import FP8Rows

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the dequant path computes the same function (up to bf16 rounding)
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DENSE_MAX_ROWS = 256  # the W8A16 backend sends dense products with more rows to dequant (dsr1/kernels/fp8_gemm.py)
TARGET_PROGRAMS = 264  # two waves on H100/H200's 132 SMs: below that a dense decode matmul splits K
MATVEC_PROGRAMS = 1056  # a matrix-vector product's programs each stream less: eight per SM
CACHE_KEYS_PER_SPLIT = 2048  # keys one split of a decode step's cache product sums (16 K tiles)
MAX_CACHE_SPLITS = 64  # so its fp32 partial sums stay small: 64 x 128 heads x 512 x 4 B = 16 MiB per batch entry
MIN_SPLIT_BLOCKS = 4  # K blocks a split streams at least (R1 at batch 1 on H200: 1, 2, 4 within 1%; 4 the best at batch 8)


def available(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the kernel can run on `dtype` activations on `device`."""
    return triton is not None and dtype == torch.bfloat16 and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


if triton is not None:

    @triton.jit
    def _w8a16_kernel(
        x_ptr, xs_ptr, w_ptr, s_ptr, w2_ptr, s2_ptr, counts_ptr, experts_ptr, out_ptr, part_ptr, arrived_ptr,
        M, N, N1, K, k_per_split,
        sxe, sxm, sxk, sxse, sxsm, sxsk, swe, swn, swk, sse, ssn, ssk, sw2e, ss2e, soe, som, son, spe, sps, spm, spn,
        HAS_X_SCALE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_EXPERTS: tl.constexpr, LISTED: tl.constexpr, PAIRED: tl.constexpr,
        SCALE_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:  # launched early: every input may still be in the making (the counts too), wait for the previous kernel
            tl.extra.cuda.gdc_wait()
        pid_n, pid_m, pid_es = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        slot, split = (pid_es // SPLITS).to(tl.int64), pid_es % SPLITS  # int64: e * swe passes 2^31 at R1's shape
        e = slot  # the expert whose weight this program reads
        if HAS_EXPERTS:  # the grid covers a list of experts (every one with rows among them), not all of them
            e = tl.load(experts_ptr + slot).to(tl.int64)
        xe = slot if LISTED else e  # the block of x (and of the output) it multiplies: by list position, or by expert id
        rows = tl.load(counts_ptr + e) if HAS_COUNTS else M
        if pid_m * BLOCK_M < rows:  # row tiles past this expert's count (all of an unused expert's) do nothing
            # this tile's first output column and first weight row, the columns it may write, and its weight
            row0, col0, n_end, w_base, s_base = pid_n * BLOCK_N, pid_n * BLOCK_N, N, w_ptr + e * swe, s_ptr + e * sse
            if PAIRED:  # output columns [0, N1) are the first weight's rows, [N1, N) the second's
                first_tiles = tl.cdiv(N1, BLOCK_N)
                if pid_n < first_tiles:
                    n_end = N1
                else:
                    row0 = (pid_n - first_tiles) * BLOCK_N
                    col0, w_base, s_base = N1 + row0, w2_ptr + e * sw2e, s2_ptr + e * ss2e
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
            offs_n = col0 + tl.arange(0, BLOCK_N)  # [BN] output columns
            offs_k = tl.arange(0, BLOCK_K)  # [BK]
            m_ok, n_ok = offs_m < rows, offs_n < n_end
            x_ptrs = x_ptr + xe * sxe + offs_m[:, None] * sxm + offs_k[None, :] * sxk  # [BM, BK]
            w_ptrs = w_base + (row0 + tl.arange(0, BLOCK_N))[:, None] * swn + offs_k[None, :] * swk  # [BN, BK]
            s_ptrs = s_base + (row0 // SCALE_BLOCK) * ssn  # the tile's row of scale blocks (BLOCK_N divides 128)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_nk = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # one row: products summed along K at the end
            k_start = split * k_per_split
            for i in range(0, k_per_split, BLOCK_K):  # the last split's tail past K is masked off
                k = k_start + i
                k_ok = (k + offs_k) < K
                x = tl.load(x_ptrs + k * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                if HAS_X_SCALE:  # FP8 activations with a scale per row and 128 channels: dequantized to bf16 here
                    xs_ok = m_ok & (offs_m * 0 + k < K)  # [BM]; a vector mask (Triton 3.9's interpreter refuses tensor & scalar)
                    x_scale = tl.load(xs_ptr + xe * sxse + offs_m * sxsm + (k // SCALE_BLOCK) * sxsk, mask=xs_ok, other=0.0)
                    x = x.to(tl.float32) * x_scale[:, None]
                    x = _round_to_bf16(x) if INTERPRETED else x.to(tl.bfloat16)
                w = tl.load(w_ptrs + k * swk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                scale = 1.0
                if HAS_SCALE and BLOCK_K > SCALE_BLOCK:  # one row, K tiles of several scale blocks: a scale per column
                    scale = tl.load(s_ptrs + ((k + offs_k) // SCALE_BLOCK) * ssk, mask=k_ok, other=0.0)[None, :]  # [1, BK]
                elif HAS_SCALE:  # the tile lies in one 128x128 scale block (BLOCK_N divides 128)
                    scale = tl.load(s_ptrs + (k // SCALE_BLOCK) * ssk, mask=k < K, other=0.0)
                if BLOCK_M == 1:  # one row: a matrix-vector product in fp32 FMAs, no tensor cores, no shared-memory round trip
                    acc_nk += w.to(tl.float32) * (x.to(tl.float32) * scale)  # [BN, BK] * [1, BK]
                elif INTERPRETED:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
                    acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32))) * scale
                else:  # e4m3 -> bf16 is exact; the block scale multiplies the block's fp32 partial sum
                    acc += tl.dot(x, tl.trans(w.to(tl.bfloat16))) * scale  # [BM, BN] fp32
            if PDL:  # the weights are read: the next kernel may launch (it waits for this one's stores)
                tl.extra.cuda.gdc_launch_dependents()
            if BLOCK_M == 1:
                acc += tl.sum(acc_nk, axis=1)[None, :]
            out_ptrs = out_ptr + xe * soe + offs_m[:, None] * som + offs_n[None, :] * son  # [BM, BN]
            mask = m_ok[:, None] & n_ok[None, :]
            if SPLITS == 1:
                tl.store(out_ptrs, _round_to_bf16(acc) if INTERPRETED else acc.to(tl.bfloat16), mask=mask)
            else:  # K split: partial sums in fp32; the tile's last split to finish adds them up in split order
                part_ptrs = part_ptr + xe * spe + offs_m[:, None] * spm + offs_n[None, :] * spn  # [BM, BN] of split 0
                tl.store(part_ptrs + split * sps, acc, mask=mask)
                tl.debug_barrier()  # every thread's partial is written before the release below
                tile = (xe * tl.num_programs(1) + pid_m) * tl.num_programs(0) + pid_n
                if tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel") == SPLITS - 1:
                    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for j in range(SPLITS):  # a fixed order: the result does not depend on which split ran last
                        total += tl.load(part_ptrs + j * sps, mask=mask, other=0.0, cache_modifier=".cg")
                    tl.store(out_ptrs, _round_to_bf16(total) if INTERPRETED else total.to(tl.bfloat16), mask=mask)
                    tl.atomic_xchg(arrived_ptr + tile, 0)  # ready for the next call (and the next graph replay)


    @triton.jit
    def _round_to_bf16(v):
        """fp32 -> bf16, round to nearest even, in integer ops, for the interpreter (its float cast truncates)."""
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


def grouped_linear(
    x: Tensor | FP8Rows,
    weight: Tensor,
    scale: Tensor | None,
    counts: Tensor | None = None,
    config: dict | None = None,
    experts: Tensor | None = None,
    second: tuple[Tensor, Tensor | None] | None = None,
    listed: bool = False,
) -> Tensor:
    """x [e, M, K] bf16 (or FP8Rows: e4m3 with 1x128 scales, as DeepEP's FP8 dispatch delivers them, dequantized
    in the kernel exactly as FP8Rows.dequantize does) times each expert's weight [e, N, K] (e4m3 with scale
    [e, ceil(N/128), ceil(K/128)], or bf16 with scale None) -> [e, M, N] bf16. With counts [e], only rows
    [0, counts[j]) of expert j are computed; the rest of the output is left as torch.empty made it.
    experts [L] (optional, with counts): distinct expert ids holding every expert with rows (active_experts):
    the kernel is launched for those L only, instead of all e.
    listed (with experts, without counts): x [L, M, K] and the result [L, M, N] hold one block per listed expert, in
    list order (x[i] times expert experts[i]'s weight; x may be a stride-0 expand of one token's rows), instead of
    one per expert id: a single process's batch-1 step multiplies its token by its k experts with no dispatch.
    second (weight2 [e, N2, K], scale2): a second product of the same x in the same launch (gate and up, or
    wq_a and wkv_a, are one launch, not two): the result is [e, M, N + N2], x @ weight.T then x @ weight2.T,
    each column computed as it would be alone with the same launch config."""
    x, x_scale = (x.data, x.scales) if isinstance(x, FP8Rows) else (x, None)
    weight2, scale2 = second or (None, None)
    n1 = weight.shape[1]
    n = n1 + (0 if weight2 is None else weight2.shape[1])
    grouped = counts is not None or experts is not None  # tiled for the few rows a decode step routes to each expert
    cfg = {**launch_config(x.shape[1], n, x.shape[2], grouped), **(config or {})}
    block_k = cfg.get("BLOCK_K", BLOCK)
    if BLOCK % cfg["BLOCK_N"] or block_k % BLOCK or (block_k > BLOCK and cfg["BLOCK_M"] > 1):
        raise ValueError(f"w8a16 config {cfg}: BLOCK_N must divide the scale block {BLOCK} (a weight tile sits in one scale block), "
                         f"BLOCK_K must be a multiple of it, and more than {BLOCK} only with BLOCK_M 1")
    if weight2 is not None and (weight2.shape[0] != weight.shape[0] or weight2.shape[2] != weight.shape[2] or (scale is None) != (scale2 is None)):
        raise ValueError(f"w8a16: a paired product needs both weights [e, N, K] with the same e and K (got {tuple(weight.shape)} "
                         f"and {tuple(weight2.shape)}), both FP8 or neither")
    if listed and (experts is None or counts is not None or experts.shape[0] != x.shape[0]):
        raise ValueError(f"w8a16: listed rows need an experts list with one entry per block of x ({x.shape[0]}) and no counts "
                         f"(got experts {None if experts is None else tuple(experts.shape)}, counts {'given' if counts is not None else None})")
    split_k = cfg.get("SPLIT_K") or default_k_splits(x.shape[1], triton.cdiv(n, cfg["BLOCK_N"]), grouped, triton.cdiv(x.shape[2], block_k))
    return torch.ops.dsr1.w8a16(
        x, x_scale, weight, scale, weight2, scale2, counts, experts, listed,
        cfg["BLOCK_M"], cfg["BLOCK_N"], block_k, split_k, cfg["num_warps"], cfg["num_stages"],
    )  # fmt: skip


@torch.library.custom_op("dsr1::w8a16", mutates_args=())
def _launch(
    x: Tensor, x_scale: Tensor | None, weight: Tensor, scale: Tensor | None, weight2: Tensor | None, scale2: Tensor | None,
    counts: Tensor | None, experts: Tensor | None, listed: bool,
    block_m: int, block_n: int, block_k: int, split_k: int, num_warps: int, num_stages: int,
) -> Tensor:  # fmt: skip
    """grouped_linear's kernel launch, an opaque operator to torch.compile (which fuses the code around it)."""
    e, m, k = x.shape
    n1 = weight.shape[1]
    n = n1 + (0 if weight2 is None else weight2.shape[1])
    n_tiles, m_tiles = triton.cdiv(n1, block_n) + triton.cdiv(n - n1, block_n), triton.cdiv(m, block_m)  # a pair: each weight's own tiles
    k_per_split = triton.cdiv(triton.cdiv(k, min(split_k, triton.cdiv(k, block_k))), block_k) * block_k
    k_splits = triton.cdiv(k, k_per_split)
    out = torch.empty(e, m, n, dtype=torch.bfloat16, device=x.device)
    part = torch.empty(k_splits, e, m, n, dtype=torch.float32, device=x.device) if k_splits > 1 else out  # fp32 partial sums
    arrived = _arrival_counters(x.device, n_tiles * m_tiles * e) if k_splits > 1 else out  # tiles numbered by block of x
    slots = e if experts is None else experts.numel()
    _w8a16_kernel[(n_tiles, m_tiles, slots * k_splits)](
        x, _or(x_scale, x), weight, _or(scale, weight), _or(weight2, weight), _or(scale2, _or(scale, weight)),  # unused pointers: any tensor
        _or(counts, x), _or(experts, x), out, part, arrived,
        m, n, n1, k, k_per_split,
        *x.stride(), *_strides(x_scale), *weight.stride(), *_strides(scale), _or(weight2, weight).stride(0), _strides(_or(scale2, scale))[0],
        *out.stride(), *_part_strides(part),
        HAS_X_SCALE=x_scale is not None, HAS_SCALE=scale is not None, HAS_COUNTS=counts is not None, HAS_EXPERTS=experts is not None, LISTED=listed,
        PAIRED=weight2 is not None, SCALE_BLOCK=BLOCK, INTERPRETED=INTERPRET,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLITS=k_splits, num_warps=num_warps, num_stages=num_stages,
        PDL=(pdl := not INTERPRET and pdl_supported(x.device)), launch_pdl=pdl,  # the interpreter has no griddepcontrol
    )  # fmt: skip
    return out


@_launch.register_fake
def _(x: Tensor, x_scale, weight: Tensor, scale, weight2: Tensor | None, *args) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[1] + (0 if weight2 is None else weight2.shape[1]), dtype=torch.bfloat16)


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on `device` can use programmatic dependent launch: NVIDIA compute capability 9.0 (Hopper)
    and up (ROCm devices are "cuda" to torch too, with their own capability numbers)."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (9, 0)


def active_experts(counts: Tensor, bound: int) -> Tensor:
    """[min(e, bound)] distinct expert ids holding every expert with rows, when at most `bound` experts have
    rows (a batch of n tokens routes to at most n * top_k): grouped_linear's `experts`, on the device.

    Under torch.compile, those with rows first in id order, then the rest (a stable partition by two running
    counts, which Inductor fuses into the step's kernels: topk's sort took 9 us per MoE layer on an H200);
    eagerly, one topk (fewer launches)."""
    bound = min(bound, counts.numel())
    if not torch.compiler.is_compiling():
        return torch.topk(counts, bound, sorted=False).indices
    active = counts > 0  # [e]
    place = torch.where(active, active.cumsum(0), active.sum() + (~active).cumsum(0)) - 1  # [e]: a permutation
    ids = torch.arange(counts.numel(), device=counts.device)
    return torch.empty_like(ids).scatter_(0, place, ids)[:bound]


_ARRIVALS: dict[torch.device, Tensor] = {}


def _arrival_counters(device: torch.device, tiles: int) -> Tensor:
    """Per output tile, how many K splits have stored their partial sum: zeros, and back to zero after each
    call (the last split resets its tile), so one buffer per device serves every call, graph replays too."""
    counters = _ARRIVALS.get(device)
    if counters is None or counters.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"w8a16: {tiles} split-K counters first needed while capturing a CUDA graph; run the step once before capture")
        counters = _ARRIVALS[device] = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device)
    return counters


def _or(t: Tensor | None, other: Tensor) -> Tensor:
    return other if t is None else t


def _strides(t: Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else t.stride()


def launch_config(m: int, n: int, k: int, grouped: bool) -> dict:
    """Tile sizes and launch settings for M rows (per expert when grouped: the counts stay on the device, so a
    grouped call is tiled for the few rows a decode step routes to each expert) of K features into N. From
    scripts/bench/w8a16_tiles.py on H200 (docs/PERFORMANCE.md): one row is a matrix-vector product (BLOCK_M 1),
    whose best tiles depend on R1's shapes; wide N tiles for the experts and the long-K dense products.
    A "SPLIT_K" key overrides default_k_splits."""
    if m == 1:
        if grouped and k >= 4096:  # a batch-1 step's experts (8 of them, listed), gate and up: 64 x 256 tiles, 68.7 -> 61.8 us (H200)
            return {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 8, "num_stages": 3, "SPLIT_K": 1}
        if grouped:  # their down projection (K = 2048): 64-wide tiles, 39.8 -> 35.8 us on R1's 8 experts (H200)
            return {"BLOCK_M": 1, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
        if n >= 16384:  # the dense layers' gate and up (2 x 18432), wq_b (24576): 256-wide K tiles
            return {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 8, "num_stages": 3, "SPLIT_K": 1}
        if n >= 4096 and k <= 8192:  # the shared expert's gate and up (2 x 2048) and down: 8 rows, K in 1024s
            return {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 3, "SPLIT_K": 1}
        if k <= BLOCK:  # MLA's W_UK, heads as experts (K = 128, read transposed): one warp per tile, 8.0 -> 5.6 us on R1
            return {"BLOCK_M": 1, "BLOCK_N": 32, "num_warps": 1, "num_stages": 3}
        return {"BLOCK_M": 1, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
    block_m = 16 if grouped or m <= 16 else 32 if m <= 64 else 64
    wide = grouped or k >= 16384 or m > 64
    return {"BLOCK_M": block_m, "BLOCK_N": 128 if wide else 64, "num_warps": 4, "num_stages": 3}


def cache_config(groups: int, k: int) -> dict:
    """Tiles for MLA's decode products over the latent cache (a group per batch entry, R1's 128 heads as its rows):
    small tiles fill the GPU at few groups, large ones past that. H200, both products at 516 / 2052 keys
    (docs/perf/h200-w8a16-cache-tiles.json): b=1 8.2 / 18.1 us vs the einsums' 12.9 / 19.6; b=8 15.1 / 43.5
    vs 20.9 / 46.3; b=64 58 / 178 vs 63 / 180. k is the product's K: c + r for the scores, the cached keys for
    the values, which over a long cache split K, one split per CACHE_KEYS_PER_SPLIT keys (at most
    MAX_CACHE_SPLITS): unsplit, its 64 programs at b=1 each summed all keys in turn. The split count depends on
    k alone, so a row's result does not depend on the batch it decodes in; up to 4095 keys nothing changes."""
    splits = max(1, min(MAX_CACHE_SPLITS, k // CACHE_KEYS_PER_SPLIT))
    if groups < 8:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "SPLIT_K": splits}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "SPLIT_K": splits}


def default_k_splits(m: int, n_tiles: int, grouped: bool, k_tiles: int) -> int:
    """K splits of a dense product with few N tiles, so the GPU has enough programs, each still streaming at
    least MIN_SPLIT_BLOCKS K tiles; by N, K (and whether M is one row) only, so a row's result does not
    depend on how many rows share its call. A grouped call's active experts are known on the device only:
    no split."""
    if grouped:
        return 1
    return max(1, min((MATVEC_PROGRAMS if m == 1 else TARGET_PROGRAMS) // n_tiles, k_tiles // MIN_SPLIT_BLOCKS))


def _part_strides(part: Tensor) -> tuple[int, ...]:
    """part [S, e, M, N] (or any tensor when K is not split) -> strides in the kernel's order (expert, split, row, column)."""
    if part.dim() != 4:
        return 0, 0, 0, 0
    return part.stride(1), part.stride(0), part.stride(2), part.stride(3)


def linear(x: Tensor, weight: Tensor, scale: Tensor | None, second: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
    """x [..., K] bf16 @ weight [N, K].T (e4m3 with scale [ceil(N/128), ceil(K/128)], or bf16) -> [..., N].
    second (weight2 [N2, K], scale2): also x @ weight2.T in the same launch -> [..., N + N2]."""
    k = weight.shape[1]
    n = weight.shape[0] + (0 if second is None else second[0].shape[0])
    rows = x.reshape(1, -1, k)  # [1, M, K]
    if rows.shape[1] == 0:  # an idle expert-parallel rank's empty batch
        return x.new_zeros(*x.shape[:-1], n)
    if second is not None:
        second = (second[0].unsqueeze(0), None if second[1] is None else second[1].unsqueeze(0))
    out = grouped_linear(rows, weight.unsqueeze(0), None if scale is None else scale.unsqueeze(0), second=second)
    return out.view(*x.shape[:-1], n)
