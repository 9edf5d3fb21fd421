"""MLA's absorbed attention for a decode step, read through a block table, split over the keys (flash-decoding):
the twin of the latent products in dsr1/model/attention.py (scores q . keys, softmax, probabilities . kv) for
one new position per row, without gathering a row's cache blocks into one tensor and without materializing
its [h, t] scores.

Each program takes one row, a block of heads and one split of the row's keys: it walks that split's keys
tile by tile (each key's block from the table), keeps a running maximum and sum of the softmax (online
softmax) and the weighted sum of the latent rows, and writes that split's partial output and its log-sum-exp.
`paged_decode` then merges the splits exactly: each split's output weighted by exp(lse_split - lse_row). The
number of splits follows the table's width (known on the host: no sync, so a CUDA graph can hold it), and a
split past a row's length writes an empty partial (lse = -inf). The row's keys are positions [0, lengths[i]).

Scores and the softmax are fp32; on a GPU the two products run on bf16 tensor cores with fp32 accumulation
(the probabilities rounded to bf16, as the einsums round them). TRITON_INTERPRET=1 runs the kernel on CPU
tensors, in fp32 (the tests compare it with the einsums there).

b rows, h heads, c kv latent, r rope dim, N pool blocks, P positions per block, n table entries, S splits
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dsr1.kernels.w8a16 import INTERPRET, triton

KEYS_PER_SPLIT = 1024  # keys one program walks: a split per 1024 keys, so a long cache is read by many programs
BLOCK_H = 16  # heads per program (tl.dot needs 16 rows at least; fewer heads are masked)
BLOCK_T = 32  # keys per tile

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _mla_decode_kernel(
        q_ptr, pool_ptr, table_ptr, len_ptr, o_ptr, lse_ptr, scale, H, sqb, sqh, spn, spp, stb, sob, sos, soh, slb, sls,
        C: tl.constexpr, R: tl.constexpr, P: tl.constexpr, SPLIT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):  # fmt: skip
        row, pid_h, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
        h_ok = heads < H
        offs_c, offs_r = tl.arange(0, C), tl.arange(0, R)
        q_base = q_ptr + row * sqb + heads[:, None] * sqh
        q_c = tl.load(q_base + offs_c[None, :], mask=h_ok[:, None], other=0.0)  # [BH, C]
        q_r = tl.load(q_base + C + offs_r[None, :], mask=h_ok[:, None], other=0.0)  # [BH, R]
        if INTERPRETED:  # the interpreter's bf16 dot is wrong: fp32 throughout
            q_c, q_r = q_c.to(tl.float32), q_r.to(tl.float32)
        n = tl.load(len_ptr + row)
        start = split * SPLIT
        m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)  # running max of the scaled scores
        l_i = tl.zeros((BLOCK_H,), tl.float32)  # running sum of exp(score - m_i)
        acc = tl.zeros((BLOCK_H, C), tl.float32)  # running sum of exp(score - m_i) * kv
        for t0 in range(start, tl.minimum(start + SPLIT, n), BLOCK_T):  # a split past the row's keys does nothing
            offs_t = t0 + tl.arange(0, BLOCK_T)  # [BT] key positions
            t_ok = offs_t < n
            block = tl.load(table_ptr + row * stb + offs_t // P, mask=t_ok, other=0).to(tl.int64)  # [BT]
            k_base = pool_ptr + block[:, None] * spn + (offs_t % P)[:, None] * spp
            kv = tl.load(k_base + offs_c[None, :], mask=t_ok[:, None], other=0.0)  # [BT, C]
            pe = tl.load(k_base + C + offs_r[None, :], mask=t_ok[:, None], other=0.0)  # [BT, R]
            if INTERPRETED:
                kv, pe = kv.to(tl.float32), pe.to(tl.float32)
            s = (tl.dot(q_c, tl.trans(kv)) + tl.dot(q_r, tl.trans(pe))) * scale  # [BH, BT] fp32
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BH]
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile of no keys keeps everything at zero
            p = tl.exp(s - m_safe[:, None])  # [BH, BT]
            alpha = tl.exp(m_i - m_safe)  # [BH]
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p = p if INTERPRETED else p.to(kv.dtype)  # rounded as the einsums round the probabilities
            acc = acc * alpha[:, None] + tl.dot(p, kv)  # [BH, C]
            m_i = m_new
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        lse = tl.where(l_i > 0, m_i + tl.log(safe_l), float("-inf"))  # [BH]
        tl.store(o_ptr + row * sob + split * sos + heads[:, None] * soh + offs_c[None, :], acc / safe_l[:, None], mask=h_ok[:, None])
        tl.store(lse_ptr + row * slb + split * sls + heads, lse, mask=h_ok)


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs here: Triton, and a CUDA device with bf16 or fp16 (or the interpreter on CPU)."""
    if triton is None:
        return False
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)) or (INTERPRET and device.type == "cpu")


def paged_decode(q: Tensor, pool: Tensor, block_table: Tensor, lengths: Tensor, scale: float, c: int) -> Tensor:
    """q [b, h, c + r] (q_latent then q_pe, one new position per row), pool [N, P, c + r], block_table [b, n],
    lengths [b] (>= 1: row i sees key positions [0, lengths[i])) -> the latent output [b, h, c] in q's dtype:
    softmax(scale * q . keys) . kv over each row's keys."""
    b, h, width = q.shape
    r, page = width - c, pool.shape[1]
    assert c & (c - 1) == 0 and r & (r - 1) == 0 and r >= 16 and page > 0, "c and r powers of two (tl.arange), r >= 16 (tl.dot)"
    splits = max(1, math.ceil(block_table.shape[1] * page / KEYS_PER_SPLIT))
    o = torch.empty(b, splits, h, c, dtype=torch.float32, device=q.device)  # [b, S, h, c]
    lse = torch.empty(b, splits, h, dtype=torch.float32, device=q.device)  # [b, S, h]
    if b:
        grid = (b, triton.cdiv(h, BLOCK_H), splits)
        _mla_decode_kernel[grid](
            q, pool, block_table, lengths, o, lse, scale, h, q.stride(0), q.stride(1), pool.stride(0), pool.stride(1),
            block_table.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
            C=c, R=r, P=page, SPLIT=KEYS_PER_SPLIT, BLOCK_H=BLOCK_H, BLOCK_T=BLOCK_T, INTERPRETED=INTERPRET,
        )  # fmt: skip
    weight = torch.softmax(lse, dim=1)  # [b, S, h]: exp(lse_split - lse_row); an empty split weighs 0
    return (weight.unsqueeze(-1) * o).sum(dim=1).to(q.dtype)  # [b, h, c]
