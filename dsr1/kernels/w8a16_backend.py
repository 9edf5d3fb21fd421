"""The W8A16 backend: weight-only FP8 (the Triton kernel of dsr1/kernels/w8a16.py) on bf16 activations, for the
dense projections, MLA's per-head and latent-cache products, and the routed experts; dequant otherwise.

Each method takes only the cases the kernel runs well and returns None (or dequant's product) for the rest;
every condition on a shape lives here. The kernel multiplies by the exact FP8 weight in fp32 and rounds once to
bf16, so its results stay within bf16 rounding of the einsums in dsr1/model.

b batch, s new positions, t cached positions, h heads, d head dim (nope = value), c kv latent, r rope dim
"""

from __future__ import annotations

from torch import Tensor

from dsr1.fp8 import BLOCK, FP8Rows
from dsr1.kernels import experts, w8a16
from dsr1.kernels.backend import DEQUANT, Backend


class W8A16(Backend):
    """Past w8a16.DENSE_MAX_ROWS rows (a prefill) a product is compute-bound, and the kernel, which multiplies in
    bf16, is slower than tensor-core GEMMs (scripts/bench/fp8_gemm.py on H200: 2.6 ms for o_proj at 2048 rows
    against 1.7 for cuBLAS on the dequantized weight; 0.11 vs 1.2 ms the other way at 1 row). Those products go
    to `prefill`: block-scaled FP8 x FP8 (DeepGEMM, else ScaledMM; 1x128 activation scales as DeepSeek-V3's own
    inference code quantizes them) where the device has it, chosen when the backend is selected (fp8_gemm._probe),
    else dequant. A prefill's routed experts go to the same backend's grouped GEMM (`packed_experts`)."""

    name = "w8a16"
    keeps_dense = True  # MLA's wkv_b, used outside a matmul where no kernel takes it, is dequantized once and kept

    def __init__(self, prefill: Backend = DEQUANT):
        self.prefill = prefill

    def linear(self, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        if not self._dense_kernel(x):
            return self.prefill.linear(x, weight, scale)
        return w8a16.linear(x, weight, scale)

    def linear_pair(self, x: Tensor, first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """One kernel launch for both (two small products pay one launch's fixed cost; grouped_linear's `second`)."""
        if not self._dense_kernel(x):
            return self.prefill.linear(x, *first), self.prefill.linear(x, *second)
        return w8a16.linear(x, *first, second=second).split([first[0].shape[0], second[0].shape[0]], dim=-1)

    def w_uk(self, q_nope: Tensor, weight: Tensor, scale: Tensor | None, nope_dim: int) -> Tensor | None:
        """q_latent[c] = sum_d W_UK[d, c] q[d]: each head's W_UK read as [c, d] (strides: c contiguous)."""
        heads = self._head_weights(q_nope, weight, scale, nope_dim)
        if heads is None:
            return None
        w, s = heads
        return self._per_head(q_nope, w[:, 0].transpose(1, 2), s[:, 0].transpose(1, 2))

    def w_uv(self, o: Tensor, weight: Tensor, scale: Tensor | None, nope_dim: int) -> Tensor | None:
        """o[d] = sum_c W_UV[d, c] o_latent[c]: each head's W_UV [d, c] as stored."""
        heads = self._head_weights(o, weight, scale, nope_dim)
        if heads is None:
            return None
        w, s = heads
        return self._per_head(o, w[:, 1], s[:, 1])

    def _head_weights(self, a: Tensor, weight: Tensor, scale: Tensor | None, nope_dim: int) -> tuple[Tensor, Tensor] | None:
        """wkv_b as [h, 2, d, c] FP8 (W_UK, W_UV) and its scale [h, 2, d/128, c/128], views of the stored weight, where
        the kernel takes a's products: FP8, each head's W_UK and W_UV whole scale blocks (R1: d = 128), and between
        1 and DENSE_MAX_ROWS rows (none: an idle EP rank's empty batch)."""
        b, s, h, _ = a.shape
        whole_blocks = weight.shape[0] == 2 * h * nope_dim and nope_dim % BLOCK == 0
        if scale is None or not whole_blocks or not 0 < b * s <= w8a16.DENSE_MAX_ROWS or not w8a16.available(a.device, a.dtype):
            return None
        return weight.view(h, 2, nope_dim, -1), scale.view(h, 2, nope_dim // BLOCK, -1)

    def _per_head(self, a: Tensor, w: Tensor, scale: Tensor) -> Tensor:
        """a [b, s, h, in] times each head's w [h, out, in] -> [b, s, h, out]: read as FP8 (half the bytes of the
        kept bf16 copy), the heads as the experts of one grouped launch."""
        b, s, h, _ = a.shape
        x = a.reshape(b * s, h, -1).transpose(0, 1)  # [h, b*s, in], no copy
        return w8a16.grouped_linear(x, w, scale).transpose(0, 1).reshape(b, s, h, -1)

    def latent_scores(self, q: Tensor, keys: Tensor) -> Tensor | None:
        """A decode step (s = 1): each batch entry's cache is one group's bf16 "weight" (no scale); the same fp32
        sums, rounded to bf16 as the einsum's are, in tiles picked for the batch (w8a16.cache_config; cuBLAS took
        ~6-7 us for each product at batch 1 and R1's 128 heads, the kernel 3.3 and 4.9)."""
        if not self._decode_step(q):
            return None
        b, s, h, _ = q.shape
        return w8a16.grouped_linear(q.view(b, s * h, -1), keys, None, config=w8a16.cache_config(b, keys.shape[-1])).view(b, s, h, -1)

    def latent_values(self, probs: Tensor, kv: Tensor) -> Tensor | None:
        """As latent_scores, with kv read transposed ([b, c, t]) as each group's weight."""
        if not self._decode_step(probs):
            return None
        b, s, h, _ = probs.shape
        return w8a16.grouped_linear(probs.view(b, s * h, -1), kv.transpose(1, 2), None, config=w8a16.cache_config(b, kv.shape[1])).view(b, s, h, -1)

    def expert_kernel(self, x: Tensor | FP8Rows, fp8: bool) -> experts.Grouped | experts.Masked | None:
        """FP8 experts too take the masked kernel where it runs."""
        if fp8 and experts.MASKED.takes(x):
            return experts.MASKED
        return super().expert_kernel(x, fp8)

    def packed_experts(self, x: Tensor, fp8: bool) -> experts.Contiguous | None:
        """A prefill's experts on packed rows: the `prefill` backend's grouped FP8 GEMM, where it has one."""
        return self.prefill.packed_experts(x, fp8)

    def _dense_kernel(self, x: Tensor) -> bool:
        return w8a16.available(x.device, x.dtype) and x.numel() <= w8a16.DENSE_MAX_ROWS * x.shape[-1]

    def _decode_step(self, a: Tensor) -> bool:
        b, s = a.shape[:2]
        return s == 1 and b > 0 and w8a16.available(a.device, a.dtype)
