"""The one interface between dsr1/model and its fast paths, and its plain implementation (Dequant).

Each layer holds a backend (`gemm`, set once by fp8_gemm.use_fp8_gemm) and writes its own math in PyTorch.
`linear` multiplies by a block-quantized FP8 weight and every backend has one. Each other method is a fast
path for one of the model's products: it returns the product where the backend has a kernel for that case
(the device, the dtype, the shape), and None where it has not, so that the layer computes it as written.
Dequant has no kernels: a model on it runs exactly the math of dsr1/model (what the HF parity tests check).

b batch, s new positions, t cached positions, h heads, d nope head dim, c kv latent, r rope dim,
e local experts, M rows per expert, m model dim
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dsr1.fp8 import FP8Rows, dequantize
from dsr1.kernels import experts


class Backend:
    keeps_dense = False  # whether Linear.dense_weight keeps the dequantized weight it makes (else remade per call)

    def linear(self, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        """x [..., K] @ dequant(weight [N, K] e4m3, scale [ceil(N/128), ceil(K/128)]).T -> [..., N]."""
        raise NotImplementedError

    def linear_pair(self, x: Tensor, first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Two FP8 projections (weight, scale each) of one x: gate and up, or wq_a and wkv_a."""
        return self.linear(x, *first), self.linear(x, *second)

    def w_uk(self, q_nope: Tensor, weight: Tensor, scale: Tensor | None, nope_dim: int) -> Tensor | None:
        """MLA's W_UK absorbed into the query: q_nope [b, s, h, d] -> [b, s, h, c], from wkv_b's weight
        [h * (d + d_v), c] (per head d rows of W_UK, then d_v of W_UV) and its scale (None: run dtype)."""
        return None

    def w_uv(self, o: Tensor, weight: Tensor, scale: Tensor | None, nope_dim: int) -> Tensor | None:
        """MLA's W_UV after attention: o [b, s, h, c] -> [b, s, h, d_v], the same wkv_b as w_uk."""
        return None

    def latent_scores(self, q: Tensor, keys: Tensor) -> Tensor | None:
        """Absorbed MLA's scores: q [b, s, h, c + r] . keys [b, t, c + r] -> [b, s, h, t] (unscaled)."""
        return None

    def latent_values(self, probs: Tensor, kv: Tensor) -> Tensor | None:
        """Absorbed MLA's output in latent space: probs [b, s, h, t] times kv [b, t, c] -> [b, s, h, c]."""
        return None

    def expert_kernel(self, x: Tensor | FP8Rows, fp8: bool) -> experts.Grouped | experts.Masked | None:
        """The kernel that runs GroupedExperts on x (dsr1/kernels/experts.py), or None for its reference loop.
        Run-dtype weights (fp8 False) on a GPU take the masked W8A16 kernel where Triton runs (no host sync: a
        decode step can be captured), else grouped products; FP8 ones loop through this backend's `linear`.
        On CPU, the loop."""
        rows = x.data if isinstance(x, FP8Rows) else x
        if fp8 or not rows.is_cuda:
            return None
        if experts.MASKED.takes(x):
            return experts.MASKED
        return experts.GROUPED if experts.GROUPED.takes(x) else None


    def packed_experts(self, x: Tensor, fp8: bool) -> experts.Contiguous | None:
        """A kernel for every token's routed experts on packed rows, one segment per expert (one process holding
        every expert, a prefill: the MoE layer then skips the dispatch), or None. x [n, m]: the layer's tokens."""
        return None


class Dequant(Backend):
    """Dequantize the weight per matmul (the official `gemm_impl="bf16"` path); no other kernels."""

    name = "dequant"

    def linear(self, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        return F.linear(x, dequantize(weight, scale, x.dtype))


DEQUANT = Dequant()
