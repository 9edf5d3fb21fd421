"""Block-wise FP8 weights: dequantization against a hand-built example with ragged last blocks, and the
quantize -> dequantize round trip within e4m3's rounding bound."""

import torch

from dsr1.fp8 import BLOCK, FP8_DTYPE, FP8_MAX, dequantize, quantize, scale_shape

# e4m3: 3 mantissa bits, so rounding a normal value is off by at most 2^-4 of it; the subnormal
# step is 2^-9, so a value near zero is off by at most 2^-10 (in units of the block scale).
E4M3_REL, E4M3_SUBNORMAL_HALF_STEP = 2.0**-4, 2.0**-10


def hand_built() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A [130, 129] FP8 weight (2 x 2 blocks, the last row and column of blocks 2 and 1 wide), its
    scale_inv, and the dequantized value written out block by block."""
    i, j = torch.meshgrid(torch.arange(130), torch.arange(129), indexing="ij")
    values = ((i + 2 * j) % 9 - 4).float()  # integers -4..4 are exact in e4m3
    scale_inv = torch.tensor([[0.5, 2.0], [3.0, 0.25]])
    expected = values.clone()
    expected[:128, :128] *= 0.5
    expected[:128, 128:] *= 2.0
    expected[128:, :128] *= 3.0
    expected[128:, 128:] *= 0.25
    return values.to(FP8_DTYPE), scale_inv, expected


def test_scale_shape():
    assert scale_shape(130, 129) == (2, 2)
    assert scale_shape(128, 128) == (1, 1)
    assert scale_shape(192, 320) == (2, 3)
    assert scale_shape(7168, 2048) == (56, 16)


def test_dequantize_hand_built_blocks():
    weight, scale_inv, expected = hand_built()
    assert torch.equal(weight.float(), ((torch.arange(130)[:, None] + 2 * torch.arange(129)) % 9 - 4).float())
    assert torch.equal(dequantize(weight, scale_inv, torch.float32), expected)
    assert torch.equal(dequantize(weight, scale_inv, torch.bfloat16), expected.to(torch.bfloat16))


def test_dequantize_stacked_experts():
    """[e, o, i] weights with [e, so, si] scales (GroupedExperts) dequantize expert by expert."""
    weight, scale_inv, expected = hand_built()
    factors = torch.tensor([1.0, 4.0, 0.125])
    stacked = dequantize(weight.expand(3, -1, -1), scale_inv * factors[:, None, None], torch.float32)
    assert torch.equal(stacked, expected * factors[:, None, None])


def test_quantize_round_trip_bound():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=gen) * 0.05
    w[130:140, 10:20] *= 50  # one block with outliers: its scale is much coarser
    w[256:, 128:] = 0  # an all-zero ragged block
    q, scale_inv = quantize(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == scale_shape(300, 200) == (3, 2)

    block_scale = torch.empty_like(w)  # each element's block scale_inv, written out block by block
    for bi in range(3):
        for bj in range(2):
            rows, cols = slice(bi * BLOCK, (bi + 1) * BLOCK), slice(bj * BLOCK, (bj + 1) * BLOCK)
            amax = w[rows, cols].abs().max()
            if amax > 0:
                torch.testing.assert_close(scale_inv[bi, bj], amax / FP8_MAX, rtol=1e-6, atol=0)
            block_scale[rows, cols] = scale_inv[bi, bj]

    back = dequantize(q, scale_inv, torch.float32)
    bound = E4M3_REL * w.abs() + E4M3_SUBNORMAL_HALF_STEP * block_scale
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    assert torch.equal(back[256:, 128:], torch.zeros(44, 72))
    # The largest magnitude of each block maps to +-448 and comes back almost exactly.
    idx = w.abs().argmax()
    torch.testing.assert_close(back.flatten()[idx], w.flatten()[idx], rtol=1e-6, atol=0)
    assert (back - w).norm() / w.norm() < 0.03
