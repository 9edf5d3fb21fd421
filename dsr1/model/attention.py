"""Multi-head latent attention (MLA), with the naive and the absorbed computation side by side.

Both paths compute the same function. *naive* expands the latent into per-head keys and values
(like HF) and caches those; *absorbed* folds W_UK into the query and applies W_UV after attention,
so its cache holds only the normalized latent c and the shared rope key per token (576 values for
R1 instead of 128 x (192 + 128)).

Neither path builds a [b, s, t] mask or [s, t] scores for the whole call: `Causal` describes which keys each
query sees in O(b (s + t)), and the einsums run over blocks of queries sized so that a block's fp32 scores
[b, q, h, t] stay within SCORE_BLOCK_BYTES (memory linear in t for a fixed s; one block for short inputs).
Prefills on a GPU go through the `flash` kernel instead (dsr1/kernels/attention.py), in the naive form.

b batch, s new positions, q a block of them, t key positions, h heads, d nope or value head dim, r rope dim,
c kv latent (kv_lora_rank), m model dim
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dsr1.config import ModelConfig
from dsr1.kernels.attention import GATHER, SDPA
from dsr1.kernels.backend import DEQUANT
from dsr1.model.linear import Linear, linear_pair
from dsr1.model.norm import RMSNorm
from dsr1.model.rope import apply_rotary_emb

ATTN_IMPLS = ("absorb", "naive")
SCORE_BLOCK_BYTES = 1 << 28  # the fp32 scores of one block of queries, [b, q, h, t], take at most this (or one query)


@dataclass(frozen=True)
class Causal:
    """Which keys each query sees, without a [b, s, t] mask: the query at position p sees the keys at positions
    <= p. Without a cache the keys are the call's own tokens (key_positions = positions, t = s); with one they
    are cache rows [0, t) (key_positions = 0 .. t - 1). aligned: each row's queries are the last s of its t keys
    (one start a for all rows and t = a + s): causal from the lower right, what flash attention applies."""

    positions: Tensor  # [b, s]
    key_positions: Tensor  # [b, t]
    aligned: bool
    step: Tensor | None = None  # a decode step's (s = 1) mask [b, 1, t], b * t bools built once for every layer

    @classmethod
    def own(cls, positions: Tensor) -> Causal:
        """The new tokens [b, s] attend to each other."""
        return cls(positions, positions, True)

    @classmethod
    def cached(cls, positions: Tensor, n_keys: int, aligned: bool = False) -> Causal:
        """The new tokens at positions [b, s] attend to cache rows [0, n_keys)."""
        key_positions = torch.arange(n_keys, device=positions.device).expand(positions.shape[0], -1)  # [b, t]
        mask = cls(positions, key_positions, aligned)
        return cls(positions, key_positions, aligned, mask.hidden(slice(0, 1))) if positions.shape[1] == 1 else mask

    @property
    def n_keys(self) -> int:
        return self.key_positions.shape[-1]

    def hidden(self, rows: slice) -> Tensor:
        """[b, q, t] bool for the queries `rows` of [0, s): True where a key is past the query's position."""
        if self.step is not None:
            return self.step
        return self.key_positions.unsqueeze(1) > self.positions[:, rows].unsqueeze(2)


@dataclass
class LatentCache:
    """Absorbed-path cache: keys [B, T, c + r], each position's kv (after kv_norm) then its pe (after rope), so one
    product scores a query against both. MLA only calls `store`: any object with it serves as a layer's cache
    (the serving engine's PagedLatentCache keeps the same rows in fixed-size blocks)."""

    keys: Tensor

    def store(self, positions: Tensor, keys: Tensor, n_keys: int) -> Tensor:
        """Write this call's keys [b, s, c + r] at `positions` [b, s] of cache rows [0, b) -> the keys to attend
        over, rows [0, n_keys) of each: [b, t, c + r]. (dsr1/engine/paged.py's PagedLatentCache does the same in
        blocks.)"""
        self.write(positions, keys)
        return self.keys[: keys.shape[0], :n_keys]

    def write(self, positions: Tensor, keys: Tensor) -> None:
        """Write this call's keys only (a decode kernel that reads the cache in place follows: MLA.paged)."""
        rows = torch.arange(keys.shape[0], device=keys.device).unsqueeze(1)  # [b, 1]: cache row of each batch entry
        self.keys[rows, positions] = keys

    def pages(self, b: int) -> tuple[Tensor, Tensor]:
        """The cache as blocks for the paged decode kernel: each row one block of all T positions -> (pool [B, T, c + r],
        block table [b, 1])."""
        return self.keys, torch.arange(b, device=self.keys.device).unsqueeze(1)

    def tensors(self) -> list[Tensor]:
        return [self.keys]


@dataclass
class HeadCache:
    """Naive-path cache: per-head keys k [B, T, h, d + r] and values v [B, T, h, d]."""

    k: Tensor
    v: Tensor

    def store(self, positions: Tensor, k: Tensor, v: Tensor, n_keys: int) -> tuple[Tensor, Tensor]:
        """Write this call's k [b, s, h, d + r], v [b, s, h, d] at `positions` [b, s] -> rows [0, n_keys) of both."""
        rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)  # [b, 1]: cache row of each batch entry
        self.k[rows, positions], self.v[rows, positions] = k, v
        return self.k[: k.shape[0], :n_keys], self.v[: k.shape[0], :n_keys]

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, fp8: bool, impl: str = "absorb"):
        super().__init__()
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attention impl {impl!r} is not one of {ATTN_IMPLS}")
        self.impl = impl
        self.attend = self.naive if impl == "naive" else self.absorbed
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
        self.gemm = DEQUANT  # backend, set by fp8_gemm.use_fp8_gemm: kernels for the absorbed products (W8A16's)
        self.flash = SDPA  # prefill attention (kernels/attention.py): flash on CUDA; elsewhere the blockwise einsums
        self.paged = GATHER  # decode attention over a paged cache (kernels/attention.py): by default its blocks gathered
        self.score_bytes = SCORE_BLOCK_BYTES

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> LatentCache | HeadCache:
        if self.impl == "absorb":
            return LatentCache(torch.zeros(batch, max_len, self.kv_lora_rank + self.rope_dim, dtype=dtype, device=device))
        return HeadCache(
            k=torch.zeros(batch, max_len, self.n_heads, self.nope_dim + self.rope_dim, dtype=dtype, device=device),
            v=torch.zeros(batch, max_len, self.n_heads, self.v_dim, dtype=dtype, device=device),
        )

    def forward(self, x: Tensor, positions: Tensor, freqs_cis: Tensor, mask: Causal, cache=None) -> Tensor:
        """x: [b, s, m] at `positions` [b, s] -> [b, s, m].

        freqs_cis: [b, s, r/2] for those positions. mask: which keys each query sees; without a cache the keys
        are this call's own s tokens, with one they are cache rows [0, mask.n_keys).
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
        o = self.attend(q_nope, q_pe, kv, k_pe, mask, cache, positions)  # [b, s, h, d]
        return self.wo(o.flatten(2))

    def naive(self, q_nope: Tensor, q_pe: Tensor, kv: Tensor, k_pe: Tensor, mask: Causal, cache: HeadCache | None, positions: Tensor) -> Tensor:
        """Per-head keys and values expanded from the latent, as HF computes them. q_nope [b, s, h, d],
        q_pe [b, s, h, r], kv [b, s, c], k_pe [b, s, r] (this call's positions) -> o [b, s, h, d]."""
        t = mask.n_keys
        k, v = self._expand(kv, k_pe)  # [b, s, h, d + r], [b, s, h, d]
        if cache is not None:
            k, v = cache.store(positions, k, v, t)  # [b, t, h, d + r], [b, t, h, d]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [b, s, h, d + r]
        if self.flash.takes(q):
            return self.flash.prefill(q, k, v, self.softmax_scale, mask.positions, mask.key_positions, mask.aligned)
        blocks = []
        for rows in self._query_blocks(q, t):
            scores = torch.einsum("bqhd,bthd->bqht", q[:, rows], k)
            blocks.append(torch.einsum("bqht,bthd->bqhd", self._softmax(scores, mask.hidden(rows)), v))
        return _cat_blocks(blocks)  # [b, s, h, d]

    def absorbed(self, q_nope: Tensor, q_pe: Tensor, kv: Tensor, k_pe: Tensor, mask: Causal, cache: LatentCache | None, positions: Tensor) -> Tensor:
        """W_UK folded into the query, attention over the latent, W_UV applied after it; naive's inputs -> o [b, s, h, d].

        Each product is first offered to the backend (`gemm`), which returns None where it has no kernel for it.
        A prefill that the `flash` kernel takes runs in the naive form, on keys and values expanded from the latent;
        a decode step over a paged cache that the `paged` kernel takes reads the cache's blocks in place."""
        t = mask.n_keys
        keys = torch.cat([kv, k_pe], dim=-1)  # [b, s, c + r]: this call's positions
        if cache is not None and self.paged.takes(q_nope, cache):
            cache.write(positions, keys)
            o = self.paged.decode(self._absorb_query(q_nope, q_pe), cache, positions, self.softmax_scale, self.kv_lora_rank)  # [b, 1, h, c]
            return self._value_heads(o)
        if cache is not None:
            keys = cache.store(positions, keys, t)  # [b, t, c + r]: every key the queries may see
        kv = keys[..., : self.kv_lora_rank]  # [b, t, c]
        if self.flash.takes(q_nope):
            k, v = self._expand(kv, keys[..., self.kv_lora_rank :])  # [b, t, h, d + r], [b, t, h, d]
            q = torch.cat([q_nope, q_pe], dim=-1)  # [b, s, h, d + r]
            return self.flash.prefill(q, k, v, self.softmax_scale, mask.positions, mask.key_positions, mask.aligned)
        fast = self.gemm
        q = self._absorb_query(q_nope, q_pe)  # [b, s, h, c + r]
        blocks = []
        for rows in self._query_blocks(q, t):
            scores = fast.latent_scores(q[:, rows], keys)
            if scores is None:
                scores = torch.einsum("bqhc,btc->bqht", q[:, rows], keys)  # q_latent . kv + q_pe . k_pe
            probs = self._softmax(scores, mask.hidden(rows))  # [b, q, h, t]
            o = fast.latent_values(probs, kv)
            if o is None:
                o = torch.einsum("bqht,btc->bqhc", probs, kv)  # [b, q, h, c]
            blocks.append(o)
        return self._value_heads(_cat_blocks(blocks))  # [b, s, h, c] -> [b, s, h, d]

    def _absorb_query(self, q_nope: Tensor, q_pe: Tensor) -> Tensor:
        """W_UK folded into the query: q_nope [b, s, h, d], q_pe [b, s, h, r] -> [b, s, h, c + r]."""
        q_latent = self.gemm.w_uk(q_nope, self.wkv_b.weight, self.wkv_b.scale, self.nope_dim)
        if q_latent is None:
            q_latent = torch.einsum("bshd,hdc->bshc", q_nope, self._wkv_b(q_nope.dtype)[:, : self.nope_dim])  # [b, s, h, c]
        return torch.cat([q_latent, q_pe], dim=-1)

    def _value_heads(self, o: Tensor) -> Tensor:
        """W_UV after attention over the latent: o [b, s, h, c] -> [b, s, h, d]."""
        out = self.gemm.w_uv(o, self.wkv_b.weight, self.wkv_b.scale, self.nope_dim)
        if out is None:
            out = torch.einsum("bshc,hdc->bshd", o, self._wkv_b(o.dtype)[:, self.nope_dim :])  # [b, s, h, d]
        return out

    def _expand(self, kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys and values from latent rows kv [b, t, c] and their rope keys k_pe [b, t, r]:
        -> k [b, t, h, d + r] (the rope key shared by all heads), v [b, t, h, d]."""
        k_nope, v = torch.einsum("btc,hdc->bthd", kv, self._wkv_b(kv.dtype)).split([self.nope_dim, self.v_dim], dim=-1)
        return torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1), v

    def _query_blocks(self, q: Tensor, t: int) -> list[slice]:
        """Blocks of the s queries of q [b, s, h, ...] whose fp32 scores [b, q, h, t] fit score_bytes (at least one row)."""
        b, s, h = q.shape[:3]
        step = max(1, self.score_bytes // max(1, 4 * b * h * t))
        return [slice(i, i + step) for i in range(0, s, step)] or [slice(0, 0)]

    def _wkv_b(self, dtype: torch.dtype) -> Tensor:
        """wkv_b's weight as [h, d + d, c] in `dtype`: each head's W_UK rows, then its W_UV rows."""
        return self.wkv_b.dense_weight(dtype).view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)

    def _softmax(self, scores: Tensor, hidden: Tensor) -> Tensor:
        """scores: [b, q, h, t], hidden: [b, q, t] bool (True: not seen) -> probabilities computed in fp32, returned
        in the scores' dtype."""
        masked = (scores.float() * self.softmax_scale).masked_fill(hidden.unsqueeze(2), float("-inf"))
        return masked.softmax(dim=-1).to(scores.dtype)


def _cat_blocks(blocks: list[Tensor]) -> Tensor:
    """The blocks' outputs [b, q, h, ...] along the queries (one block: itself, no copy)."""
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
