"""k-bit quantization: codebooks, straight-through gradient, packing."""

from __future__ import annotations

import pytest
import torch

from heartlora.method import quant


def test_one_and_two_bit_codebooks_are_the_specs() -> None:
    assert quant.codebook(1) == (-0.6745, 0.6745)
    assert quant.codebook(2) == (-1.266, -0.378, 0.378, 1.266)


@pytest.mark.parametrize("bits", [3, 4])
def test_wider_codebooks_are_lloyd_max_for_a_standard_normal(bits: int) -> None:
    levels = torch.tensor(quant.codebook(bits), dtype=torch.float64)
    assert len(levels) == 2**bits and torch.all(levels[1:] > levels[:-1])
    assert torch.allclose(levels, -levels.flip(0), atol=1e-9)  # symmetric
    # Lloyd-Max fixed point: each level is the mean of N(0,1) over its cell (checked by sampling).
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cells = torch.bucketize(z, (levels[1:] + levels[:-1]) / 2)
    means = torch.stack([z[cells == i].mean() for i in range(len(levels))])
    assert torch.allclose(means, levels, atol=0.02)
    if bits == 3:  # published Lloyd-Max levels for 8 cells
        assert torch.allclose(levels[4:], torch.tensor([0.2451, 0.7560, 1.3440, 2.1520], dtype=torch.float64),
                              atol=2e-3)


def test_one_bit_quantization_standardises_with_the_matrix_mean_and_std() -> None:
    w = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    mu, sigma = w.mean(), w.std(unbiased=False)
    expected = torch.where(w > mu, mu + 0.6745 * sigma, mu - 0.6745 * sigma)
    assert torch.allclose(quant.quantize(w, 1), expected)


def test_straight_through_gradient_is_identity() -> None:
    w = torch.randn(6, 4, requires_grad=True)
    g = torch.randn(6, 4)
    (quant.quantize_ste(w, 1) * g).sum().backward()
    assert torch.equal(w.grad, g)
    assert quant.quantize_ste(w, 1).unique().numel() == 2


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("numel", [1, 7, 64, 1000])
def test_pack_unpack_round_trip(bits: int, numel: int) -> None:
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.uint8)
    packed = quant.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == quant.packed_nbytes(numel, bits)
    assert torch.equal(quant.unpack_codes(packed, bits, numel), codes)


def test_encode_decode_round_trip_equals_quantize() -> None:
    w = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    for bits in (1, 2, 4):
        codes, mu, sigma = quant.encode(w, bits)
        unpacked = quant.unpack_codes(quant.pack_codes(codes, bits), bits, w.numel()).view(w.shape)
        assert torch.equal(quant.decode(unpacked, mu, sigma, bits), quant.quantize(w, bits))
