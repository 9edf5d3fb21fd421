"""Multi-head latent attention (MLA), with the naive and the absorbed computation side by side.

Both paths compute the same function. *naive* expands the latent into per-head keys and values
(like HF) and caches those; *absorbed* folds W_UK into the query and applies W_UV after attention,
so its cache holds only the normalized latent c and the shared rope key per token (576 values for
R1 instead of 128 x (192 + 128)).

b batch, s new positions, t key positions, h heads, d nope or value head dim, r rope dim,
c kv latent (kv_lora_rank), m model dim
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dsr1.fp8 import BLOCK
from dsr1.config import ModelConfig
from dsr1.kernels import w8a16
from dsr1.model.linear import Linear, linear_pair
from dsr1.model.norm import RMSNorm
from dsr1.model.rope import apply_rotary_emb

ATTN_IMPLS = ("absorb", "naive")


@dataclass
class LatentCache:
    """Absorbed-path cache: keys [B, T, c + r], each position's kv (after kv_norm) then its pe (after rope), so one
    product scores a query against both."""

    keys: Tensor

    def tensors(self) -> list[Tensor]:
        return [self.keys]


@dataclass
class HeadCache:
    """Naive-path cache: per-head keys k [B, T, h, d + r] and values v [B, T, h, d]."""

    k: Tensor
    v: Tensor

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, fp8: bool, impl: str = "absorb"):
        super().__init__()
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attention impl {impl!r} is not one of {ATTN_IMPLS}")
        self.impl = impl
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        qk_dim = self.nope_dim + self.rope_dim
        if cfg.q_lora_rank:
            self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, fp8)  # HF: q_a_proj
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)  # HF: q_a_layernorm
            self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * qk_dim, fp8)  # HF: q_b_proj
        else:
            self.wq = Linear(cfg.dim, self.n_heads * qk_dim, fp8)  # HF: q_proj
        self.wkv_a = Linear(cfg.dim, self.kv_lora_rank + self.rope_dim, fp8)  # HF: kv_a_proj_with_mqa
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)  # HF: kv_a_layernorm
        self.wkv_b = Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), fp8)  # HF: kv_b_proj
        self.wo = Linear(self.n_heads * self.v_dim, cfg.dim, fp8)  # HF: o_proj

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> LatentCache | HeadCache:
        if self.impl == "absorb":
            return LatentCache(torch.zeros(batch, max_len, self.kv_lora_rank + self.rope_dim, dtype=dtype, device=device))
        return HeadCache(
            k=torch.zeros(batch, max_len, self.n_heads, self.nope_dim + self.rope_dim, dtype=dtype, device=device),
            v=torch.zeros(batch, max_len, self.n_heads, self.v_dim, dtype=dtype, device=device),
        )

    def forward(self, x: Tensor, positions: Tensor, freqs_cis: Tensor, keep: Tensor, cache=None) -> Tensor:
        """x: [b, s, m] at `positions` [b, s] -> [b, s, m].

        freqs_cis: [b, s, r/2] for those positions. keep: [b, s, t] bool, which keys each query sees;
        without a cache the keys are this call's own s tokens, with one they are cache rows [0, t).
        """
        b, s, _ = x.shape
        if hasattr(self, "wq_a"):
            q_a, kv_a = linear_pair(x, self.wq_a, self.wkv_a)  # two projections of x, one launch where the backend can
            q = self.wq_b(self.q_norm(q_a))
        else:
            q, kv_a = self.wq(x), self.wkv_a(x)
        q = q.view(b, s, self.n_heads, self.nope_dim + self.rope_dim)  # [b, s, h, d + r]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)
        kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)  # [b, s, c], [b, s, r]
        kv = self.kv_norm(kv)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis).squeeze(2)  # one rope key shared by all heads
        n_keys = keep.shape[-1]
        rows = torch.arange(b, device=x.device).unsqueeze(1)  # [b, 1]: cache row of each batch entry

        if self.impl == "naive":
            wkv_b = self.wkv_b.dense_weight(x.dtype).view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            k_nope, v = torch.einsum("bsc,hdc->bshd", kv, wkv_b).split([self.nope_dim, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)  # [b, s, h, d + r]
            if cache is not None:
                cache.k[rows, positions], cache.v[rows, positions] = k, v
                k, v = cache.k[:b, :n_keys], cache.v[:b, :n_keys]  # [b, t, h, d + r], [b, t, h, d]
            scores = torch.einsum("bshd,bthd->bsht", torch.cat([q_nope, q_pe], dim=-1), k)
            probs = self._softmax(scores, keep)
            o = torch.einsum("bsht,bthd->bshd", probs, v)  # [b, s, h, d]
        else:
            keys = torch.cat([kv, k_pe], dim=-1)  # [b, s, c + r]: this call's positions
            if cache is not None:
                cache.keys[rows, positions] = keys
                keys = cache.keys[:b, :n_keys]  # [b, t, c + r]
            q = torch.cat([self._per_head(q_nope, "W_UK"), q_pe], dim=-1)  # [b, s, h, c + r]: W_UK absorbed into the query
            o = self._attend_latent(q, keys, keep)  # [b, s, h, c]
            o = self._per_head(o, "W_UV")  # [b, s, h, d]: W_UV applied after attention
        return self.wo(o.flatten(2))

    def _attend_latent(self, q: Tensor, keys: Tensor, keep: Tensor) -> Tensor:
        """Attention over the latent cache: q [b, s, h, c + r] against keys [b, t, c + r] (scores q_latent . kv + q_pe . pe),
        probabilities times kv -> [b, s, h, c]. A decode step (s = 1) with the W8A16 backend runs both products in
        that kernel, each batch entry's cache as the "weight" of one group (bf16, no scale): the same fp32 sums,
        rounded to bf16 as the einsums' are, in tiles picked for the batch (w8a16.cache_config; cuBLAS took ~6-7 us
        for each product at batch 1 and R1's 128 heads, the kernel 3.3 and 4.9)."""
        b, s, h, _ = q.shape
        kv = keys[..., : self.kv_lora_rank]  # [b, t, c]
        if s == 1 and b > 0 and self._w8a16_backend(q):
            tiles = w8a16.cache_config(b)
            scores = w8a16.grouped_linear(q.view(b, s * h, -1), keys, None, config=tiles).view(b, s, h, -1)
            probs = self._softmax(scores, keep)  # [b, s, h, t]
            return w8a16.grouped_linear(probs.view(b, s * h, -1), kv.transpose(1, 2), None, config=tiles).view(b, s, h, -1)
        scores = torch.einsum("bshc,btc->bsht", q, keys)
        return torch.einsum("bsht,btc->bshc", self._softmax(scores, keep), kv)

    def _per_head(self, a: Tensor, part: str) -> Tensor:
        """Each head's slice of wkv_b applied to its vector: W_UK, q_nope [b, s, h, d] -> [b, s, h, c]; W_UV,
        o [b, s, h, c] -> [b, s, h, d]. wkv_b's rows are, per head, d of W_UK then d of W_UV ([h, 2d, c]).

        With the W8A16 backend, few rows and whole scale blocks per head, the heads are the experts of one grouped
        FP8 launch on strided views of the stored weight (read as FP8: half the bytes of the kept bf16 copy);
        else an einsum on the dense weight."""
        b, s, h, _ = a.shape
        first = part == "W_UK"
        fp8_kernel = self.wkv_b.scale is not None and self._w8a16_backend(a)
        whole_blocks = self.nope_dim == self.v_dim and self.nope_dim % BLOCK == 0  # each head's W_UK, W_UV: whole scale blocks (R1: 128)
        if not (fp8_kernel and whole_blocks) or not 0 < b * s <= w8a16.DENSE_MAX_ROWS:  # no rows: an idle EP rank's empty batch
            wkv_b = self.wkv_b.dense_weight(a.dtype).view(h, self.nope_dim + self.v_dim, self.kv_lora_rank)
            if first:
                return torch.einsum("bshd,hdc->bshc", a, wkv_b[:, : self.nope_dim])
            return torch.einsum("bshc,hdc->bshd", a, wkv_b[:, self.nope_dim :])
        w = self.wkv_b.weight.view(h, 2, self.nope_dim, self.kv_lora_rank)  # [h, 2, d, c]: W_UK, W_UV
        scale = self.wkv_b.scale.view(h, 2, self.nope_dim // BLOCK, -1)  # [h, 2, d/128, c/128]
        if first:  # q_latent[c] = sum_d W_UK[d, c] q[d]: the weight read as [h, c, d] (strides: c contiguous)
            w, scale = w[:, 0].transpose(1, 2), scale[:, 0].transpose(1, 2)
        else:  # o[d] = sum_c W_UV[d, c] o_latent[c]: [h, d, c] as stored
            w, scale = w[:, 1], scale[:, 1]
        x = a.reshape(b * s, h, -1).transpose(0, 1)  # [h, b*s, in]: heads as experts, no copy
        return w8a16.grouped_linear(x, w, scale).transpose(0, 1).reshape(b, s, h, -1)

    def _w8a16_backend(self, a: Tensor) -> bool:
        """Whether the model runs the W8A16 backend (fp8_gemm.use_fp8_gemm) and its kernel runs on `a`."""
        return self.wkv_b.gemm.name == "w8a16" and w8a16.available(a.device, a.dtype)

    def _softmax(self, scores: Tensor, keep: Tensor) -> Tensor:
        """scores: [b, s, h, t] -> probabilities computed in fp32, returned in the scores' dtype."""
        masked = (scores.float() * self.softmax_scale).masked_fill(~keep.unsqueeze(2), float("-inf"))
        return masked.softmax(dim=-1).to(scores.dtype)
