"""Rotary position embedding with YaRN frequency scaling, exactly as DeepSeek-R1.

The checkpoint stores each rope head's rows as interleaved pairs (2i, 2i+1), so rotation works on
complex numbers formed from those pairs (the official code's layout; HF de-interleaves at run time,
which permutes q and k alike and leaves q.k unchanged).

b batch, s positions, h heads, r rope dim (r/2 frequencies)
"""

import math

import torch
from torch import Tensor

from dsr1.config import ModelConfig, yarn_mscale


def _yarn_correction_dim(n_rotations: float, dim: int, base: float, original_len: int) -> float:
    """The frequency index whose wavelength fits `n_rotations` times into the original context."""
    return dim * math.log(original_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: ModelConfig) -> Tensor:
    """[r/2] fp32 rotation frequencies: high ones kept, low ones divided by the YaRN factor, ramp between."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    yarn = cfg.yarn
    if yarn is None:
        return freqs
    orig = yarn.original_max_position_embeddings
    low = max(math.floor(_yarn_correction_dim(yarn.beta_fast, dim, base, orig)), 0)
    high = min(math.ceil(_yarn_correction_dim(yarn.beta_slow, dim, base, orig)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the frequency is extrapolated (kept), 0 where interpolated
    return freqs / yarn.factor * (1 - keep) + freqs * keep


def precompute_freqs_cis(cfg: ModelConfig, max_len: int) -> Tensor:
    """[max_len, r/2] complex64: attention_factor * exp(i * pos * freq).

    YaRN's attention_factor = mscale(f, mscale) / mscale(f, mscale_all_dim) (1.0 for R1); the
    remaining mscale(f, mscale_all_dim)^2 is folded into the softmax scale (ModelConfig.softmax_scale).
    """
    freqs = inv_frequencies(cfg)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)  # [t, r/2]
    magnitude = 1.0
    if cfg.yarn is not None:
        magnitude = yarn_mscale(cfg.yarn.factor, cfg.yarn.mscale) / yarn_mscale(cfg.yarn.factor, cfg.yarn.mscale_all_dim)
    return torch.polar(torch.full_like(angles, magnitude), angles)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """x: [b, s, h, r] (interleaved pairs), freqs_cis: [b, s, r/2] -> [b, s, h, r] in x's dtype.

    Each pair (x_re, x_im) times cis = (cos, sin): the complex product written out in real arithmetic, which
    torch.compile fuses into one kernel (it leaves complex tensors to eager kernels)."""
    x_re, x_im = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [b, s, h, r/2] each
    cos, sin = torch.view_as_real(freqs_cis).unsqueeze(2).unbind(-1)  # [b, s, 1, r/2] each
    out = torch.stack([x_re * cos - x_im * sin, x_re * sin + x_im * cos], dim=-1)  # [b, s, h, r/2, 2]
    return out.flatten(-2).to(x.dtype)
