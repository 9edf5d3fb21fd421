"""Attention kernels MLA holds, each the twin of its einsums (dsr1/model/attention.py), chosen when a run is built:
`flash`, a prefill through torch's scaled_dot_product_attention (flash attention on a GPU); and `paged`, a
decode step over a paged cache read in place by dsr1/kernels/mla_decode.py (PagedDecode), or, by default,
nothing (GATHER: the cache gathers a row's blocks and MLA runs its products on them).

A prefill runs MLA in its naive, per-head form (as DeepSeek's and vLLM's kernels do: the absorbed form's
latent products suit decode steps, where the cache is read once per token): q and k carry d + r = 192 dims
per head for R1, v d_v = 128. Flash attention wants one head dim for all three, so v is padded with zeros
to d + r and the padding sliced off the output (a choice made without measuring: the zero columns cost
bandwidth; unpadded, torch would pick its memory-efficient kernel instead of flash).

The queries sit at positions [a, a + s) and see keys [0, a + s) causally: the mask aligned to the lower
right (torch.nn.attention.bias.causal_lower_right), which flash applies by tile and never materializes.
Rows whose queries start at different positions get an explicit boolean mask per block of queries.

b batch, s new positions, t key positions, h heads, k qk head dim (d + r), d value head dim
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from dsr1.kernels import mla_decode

MASK_BLOCK_BYTES = 1 << 28  # an explicit mask is built for blocks of queries of at most b * s * t * 4 of these bytes


class PrefillAttention:
    """The interface, and the plain choice: no kernel, so MLA runs its own einsums (on CPU, and for reference runs)."""

    name = "plain"

    def takes(self, q: Tensor) -> bool:
        """Whether `prefill` runs queries q [b, s, h, k] (device, dtype, shape); MLA asks before it builds k and v."""
        return False

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, scale: float, positions: Tensor, key_positions: Tensor, aligned: bool) -> Tensor:
        """softmax(scale * q k^T, causal) v: q [b, s, h, k] at `positions` [b, s], k [b, t, h, k] and v [b, t, h, d] at
        `key_positions` [b, t] -> [b, s, h, d]. A query at position p sees the keys at positions <= p; `aligned`: every
        row's queries are its last s keys (positions a + [0, s) against keys [0, a + s), a shared by the rows)."""
        raise NotImplementedError


class SDPAPrefill(PrefillAttention):
    """F.scaled_dot_product_attention on `devices` in `dtypes` (flash attention on a GPU in bf16/fp16), for
    prefills (s > 1). Decode steps (s = 1) keep MLA's latent path and the W8A16 kernels."""

    name = "sdpa"

    def __init__(self, devices: tuple[str, ...] = ("cuda",), dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)):
        self.devices, self.dtypes = devices, dtypes

    def takes(self, q: Tensor) -> bool:
        b, s = q.shape[:2]
        return s > 1 and b > 0 and q.device.type in self.devices and q.dtype in self.dtypes

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, scale: float, positions: Tensor, key_positions: Tensor, aligned: bool) -> Tensor:
        b, s, h, qk_dim = q.shape
        t, v_dim = k.shape[1], v.shape[-1]
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, h, s, k], [b, h, t, k]
        v = F.pad(v, (0, qk_dim - v_dim)).transpose(1, 2)  # [b, h, t, k]: zeros past d
        if aligned:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(s, t), scale=scale)  # [b, h, s, k]
        else:
            step = max(1, MASK_BLOCK_BYTES // max(1, 4 * b * t))
            blocks = []
            for i in range(0, s, step):
                visible = key_positions[:, None, None, :] <= positions[:, None, i : i + step, None]  # [b, 1, q, t]
                blocks.append(F.scaled_dot_product_attention(q[:, :, i : i + step], k, v, attn_mask=visible, scale=scale))
            o = torch.cat(blocks, dim=2)  # [b, h, s, k]
        return o[..., :v_dim].transpose(1, 2)  # [b, s, h, d]


SDPA = SDPAPrefill()  # MLA's default: flash on CUDA, off (the plain path) on CPU


class PagedDecode:
    """MLA's absorbed attention of a decode step (one new position per row) read in place from the cache by the
    key-split kernel of dsr1/kernels/mla_decode.py, on `devices` (CPU: the Triton interpreter, for tests). The cache
    gives its rows as blocks (`pages`): the engine's paged cache its pool and block tables (dsr1/engine/paged.py),
    generation's contiguous one each row as one block."""

    def __init__(self, devices: tuple[str, ...] = ("cuda",)):
        self.devices = devices
        self.name = "paged" if devices else "gather"

    def takes(self, q_nope: Tensor, cache) -> bool:
        """Whether `decode` runs queries q_nope [b, s, h, d] over `cache`: a decode step, here, over the latent cache."""
        b, s = q_nope.shape[:2]
        device = q_nope.device
        return s == 1 and b > 0 and hasattr(cache, "pages") and device.type in self.devices and mla_decode.available(device, q_nope.dtype)

    def decode(self, q: Tensor, cache, positions: Tensor, scale: float, c: int) -> Tensor:
        """q [b, 1, h, c + r] at positions [b, 1] (its keys: cache positions [0, position]) -> latent output [b, 1, h, c]."""
        pool, table = cache.pages(q.shape[0])
        return mla_decode.paged_decode(q[:, 0], pool, table, positions[:, 0] + 1, scale, c).unsqueeze(1)


GATHER = PagedDecode(devices=())  # MLA's default: no kernel; the cache hands MLA its keys as one tensor per row
PAGED = PagedDecode()
DECODE_ATTENTION = {"gather": GATHER, "paged": PAGED}  # --decode-attention


def use_paged_decode(model: torch.nn.Module, kernel: PagedDecode) -> None:
    """Make every MLA of `model` (every module with a `paged` attribute) run its decode steps with `kernel`."""
    for module in model.modules():
        if hasattr(module, "paged"):
            module.paged = kernel
