"""Absorbed MLA attention of a decode step over the latent cache, as one Triton kernel (flash-decoding).

The einsum path (dsr1/model/attention.py) takes three launches and a softmax per layer: scores against the
cache, the masked softmax, and the probabilities times the cache. At batch 1 each is a few microseconds of
launch and latency for half a megabyte of cache. Here one launch does all of it: each program takes a block
of heads of one query and a slice of the cache positions, keeps a running max and sum (online softmax, in
fp32), and stores its partial output; the last slice of a head block to finish merges the partials in slice
order (deterministic, no second kernel). Scores stay fp32 (the einsum path rounds them to bf16) and the
probabilities meet the cache in bf16 on tensor cores, as flash attention does. Cache tiles whose positions
are all masked are skipped unread: a CUDA graph captured for a long context pays only for the filled part.
Used for one-position queries (decode) in bf16 on CUDA; TRITON_INTERPRET=1 runs it on CPU (the tests do).

b batch, s query positions, h heads, t key positions, c kv latent, r rope dim, S position slices
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsr1.model.w8a16 import INTERPRET, _arrival_counters, triton

BLOCK_H = 16  # heads per program (tl.dot's smallest M)
BLOCK_T = 32  # cache positions per tile
TARGET_PROGRAMS = 132  # one per H100/H200 SM: the cache is split into that many slices at batch 1

if triton is not None:
    import triton.language as tl

    NEG = tl.constexpr(-1.0e30)  # a finite "no score yet": exp(NEG - NEG) = 1, where -inf - -inf would be nan

    @triton.jit
    def _latent_attention_kernel(
        q_ptr, keys_ptr, keep_ptr, out_ptr, part_ptr, stats_ptr, arrived_ptr, scale,
        H, T, C, R, t_per_slice,
        sqb, sqh, skb, skt, sob, soh, skeep_b, skeep_t,
        C_POW2: tl.constexpr, R_POW2: tl.constexpr, SLICES: tl.constexpr, INTERPRETED: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        row, pid_h, slice_ = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
        cs, rs = tl.arange(0, C_POW2), tl.arange(0, R_POW2)  # latent and rope channels
        h_ok, c_ok, r_ok = heads < H, cs < C, rs < R
        q_row = q_ptr + row * sqb + heads[:, None] * sqh
        q_c = tl.load(q_row + cs[None, :], mask=h_ok[:, None] & c_ok[None, :], other=0.0)  # [BH, C] q_latent
        q_r = tl.load(q_row + C + rs[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # [BH, R] q_pe
        m = tl.full((BLOCK_H,), NEG, tl.float32)  # running max of the scaled scores
        l = tl.zeros((BLOCK_H,), tl.float32)  # running sum of exp(score - m)
        acc = tl.zeros((BLOCK_H, C_POW2), tl.float32)  # running sum of exp(score - m) * kv
        t_start = slice_ * t_per_slice
        for t0 in range(t_start, t_start + t_per_slice, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)  # [BT]
            keep = tl.load(keep_ptr + row * skeep_b + ts * skeep_t, mask=ts < T, other=0).to(tl.int1)  # [BT]
            if tl.max(keep.to(tl.int32), axis=0) > 0:  # a tile of masked positions is not read
                k_row = keys_ptr + row * skb + ts[:, None] * skt
                kv = tl.load(k_row + cs[None, :], mask=keep[:, None] & c_ok[None, :], other=0.0)  # [BT, C]
                pe = tl.load(k_row + C + rs[None, :], mask=keep[:, None] & r_ok[None, :], other=0.0)  # [BT, R]
                if INTERPRETED:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
                    scores = tl.dot(q_c.to(tl.float32), tl.trans(kv.to(tl.float32))) + tl.dot(q_r.to(tl.float32), tl.trans(pe.to(tl.float32)))
                else:
                    scores = tl.dot(q_c, tl.trans(kv)) + tl.dot(q_r, tl.trans(pe))  # [BH, BT] fp32
                scores = tl.where(keep[None, :], scores * scale, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, axis=1))
                p = tl.exp(scores - m_new[:, None])  # [BH, BT]; masked positions 0
                alpha = tl.exp(m - m_new)
                p_bf16 = p.to(tl.bfloat16)
                if INTERPRETED:
                    pv = tl.dot(p_bf16.to(tl.float32), kv.to(tl.float32))
                else:
                    pv = tl.dot(p_bf16, kv)  # [BH, C] fp32
                l = l * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + pv
                m = m_new
        o_ptrs = out_ptr + row * sob + heads[:, None] * soh + cs[None, :]  # [BH, C]
        o_mask = h_ok[:, None] & c_ok[None, :]
        if SLICES == 1:
            tl.store(o_ptrs, (acc / l[:, None]).to(tl.bfloat16), mask=o_mask)
        else:  # partials per slice; the head block's last slice to finish merges them in slice order
            tile = row * tl.num_programs(1) + pid_h  # [b*s, h-blocks] head tiles
            part = part_ptr + ((tile * SLICES + slice_) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None] * C_POW2 + cs[None, :]
            stats = stats_ptr + ((tile * SLICES + slice_) * 2) * BLOCK_H + tl.arange(0, BLOCK_H)
            tl.store(part, acc)
            tl.store(stats, m)
            tl.store(stats + BLOCK_H, l)
            tl.debug_barrier()  # every thread's partial is written before the release below
            if tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel") == SLICES - 1:
                m_all = tl.full((BLOCK_H,), NEG, tl.float32)
                for j in range(SLICES):
                    m_all = tl.maximum(m_all, tl.load(stats_ptr + ((tile * SLICES + j) * 2) * BLOCK_H + tl.arange(0, BLOCK_H), cache_modifier=".cg"))
                total = tl.zeros((BLOCK_H, C_POW2), tl.float32)
                norm = tl.zeros((BLOCK_H,), tl.float32)
                for j in range(SLICES):
                    base = (tile * SLICES + j) * 2 * BLOCK_H + tl.arange(0, BLOCK_H)
                    w = tl.exp(tl.load(stats_ptr + base, cache_modifier=".cg") - m_all)  # [BH]
                    norm += w * tl.load(stats_ptr + base + BLOCK_H, cache_modifier=".cg")
                    rows_j = ((tile * SLICES + j) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None] * C_POW2 + cs[None, :]
                    total += w[:, None] * tl.load(part_ptr + rows_j, cache_modifier=".cg")
                tl.store(o_ptrs, (total / norm[:, None]).to(tl.bfloat16), mask=o_mask)
                tl.atomic_xchg(arrived_ptr + tile, 0)  # ready for the next call (and the next graph replay)


def used_for(q: Tensor) -> bool:
    """Whether MLA takes the kernel for these queries [b, s, h, c + r]: one position, bf16, on CUDA (on CPU it
    only runs interpreted, for the tests)."""
    return triton is not None and q.shape[1] == 1 and q.dtype == torch.bfloat16 and q.is_cuda


def latent_attention(q: Tensor, keys: Tensor, keep: Tensor, c: int, scale: float) -> Tensor:
    """q [b, 1, h, c + r] (q_latent then q_pe), keys [b, t, c + r] (kv then pe), keep [b, 1, t] bool ->
    o [b, 1, h, c] = softmax(scale * q . keys over the kept positions) @ kv, per head, in bf16."""
    b, s, h, cr = q.shape
    t = keys.shape[1]
    if s != 1 or keys.shape[2] != cr or keep.shape != (b, 1, t) or q.stride(-1) != 1 or keys.stride(-1) != 1:
        raise ValueError(f"latent_attention: q [b, 1, h, c + r], keys [b, t, c + r], keep [b, 1, t], channels contiguous; "
                         f"got q {tuple(q.shape)}, keys {tuple(keys.shape)}, keep {tuple(keep.shape)}")
    return torch.ops.dsr1.latent_attention(q, keys, keep, c, scale)


@torch.library.custom_op("dsr1::latent_attention", mutates_args=())
def _launch(q: Tensor, keys: Tensor, keep: Tensor, c: int, scale: float) -> Tensor:
    """latent_attention's kernel launch, an opaque operator to torch.compile."""
    b, _, h, cr = q.shape
    t = keys.shape[1]
    r = cr - c
    h_blocks = triton.cdiv(h, BLOCK_H)
    slices = max(1, min(triton.cdiv(t, BLOCK_T), TARGET_PROGRAMS // (b * h_blocks)))
    t_per_slice = triton.cdiv(triton.cdiv(t, slices), BLOCK_T) * BLOCK_T
    slices = triton.cdiv(t, t_per_slice)
    c_pow2 = triton.next_power_of_2(c)
    out = torch.empty(b, 1, h, c, dtype=torch.bfloat16, device=q.device)
    tiles = b * h_blocks
    part = torch.empty(tiles * slices * BLOCK_H, c_pow2, dtype=torch.float32, device=q.device) if slices > 1 else out
    stats = torch.empty(tiles * slices * 2 * BLOCK_H, dtype=torch.float32, device=q.device) if slices > 1 else out
    arrived = _arrival_counters(q.device, tiles) if slices > 1 else out
    keep_u8 = keep.view(torch.uint8)
    _latent_attention_kernel[(b, h_blocks, slices)](
        q, keys, keep_u8, out, part, stats, arrived, scale,
        h, t, c, r, t_per_slice,
        q.stride(0), q.stride(2), keys.stride(0), keys.stride(1), out.stride(0), out.stride(2), keep_u8.stride(0), keep_u8.stride(2),
        C_POW2=c_pow2, R_POW2=triton.next_power_of_2(r), SLICES=slices, INTERPRETED=INTERPRET, BLOCK_H=BLOCK_H, BLOCK_T=BLOCK_T,
    )  # fmt: skip
    return out


@_launch.register_fake
def _(q: Tensor, keys: Tensor, keep: Tensor, c: int, scale: float) -> Tensor:
    return q.new_empty(q.shape[0], 1, q.shape[2], c, dtype=torch.bfloat16)
