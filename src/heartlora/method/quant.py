"""k-bit quantization of adapter matrices (Bi-LoRA, docs/METHOD.md §4): standardise each matrix with its own mean and
std, snap to a codebook that is optimal for N(0, 1), rescale; straight-through gradient; bit packing for storage."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch

# The 1- and 2-bit codebooks are those of the Bi-LoRA reference code (JieShibo/PETL-ViT, docs/METHOD.md §4). Wider
# codes use the Lloyd-Max levels for N(0, 1), computed once below.
_FIXED_LEVELS = {1: (-0.6745, 0.6745), 2: (-1.266, -0.378, 0.378, 1.266)}


def _normal_pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


@cache
def codebook(bits: int) -> tuple[float, ...]:
    """The 2**bits reconstruction levels, ascending."""
    if bits in _FIXED_LEVELS:
        return _FIXED_LEVELS[bits]
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n = 2**bits
    levels = np.linspace(-3.0, 3.0, n)
    for _ in range(500):  # Lloyd-Max: levels are the conditional means of their cells
        edges = np.concatenate([[-np.inf], (levels[1:] + levels[:-1]) / 2, [np.inf]])
        mass = np.diff(_normal_cdf(edges))
        levels = (_normal_pdf(edges[:-1]) - _normal_pdf(edges[1:])) / np.maximum(mass, 1e-300)
    return tuple(float(v) for v in levels)


def _levels(bits: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(codebook(bits), dtype=like.dtype, device=like.device)


def standardise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrix's own mean and (population) std, in one reduction; the std never reaches zero."""
    sigma, mu = torch.std_mean(w, correction=0)
    return mu, sigma.clamp_min(1e-8)


def _one_bit_levels(mu: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # μ ± 0.6745·σ, computed the same way wherever 1-bit values are made (training, decoding), so they agree bit
    # for bit. No division by σ, so a constant matrix (σ = 0) needs no clamp.
    lo, hi = (float(np.float32(v)) for v in codebook(1))
    return torch.add(mu, sigma, alpha=lo), torch.add(mu, sigma, alpha=hi)


def encode(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8, the index of the nearest level), mean and std of ``w``."""
    if bits == 1:
        sigma, mu = torch.std_mean(w, correction=0)
    else:
        mu, sigma = standardise(w)
    return codes_for(w, mu, sigma, bits), mu, sigma


def codes_for(w: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes of ``w`` at a given mean and std. Values that ``decode`` made with that mean and std get their own
    codes back, so a loaded k-bit adapter is stored again as the same codes and statistics (its own statistics
    would differ: the std of two levels is not the std they were decoded with)."""
    mu, sigma = mu.to(w.device, w.dtype), sigma.to(w.device, w.dtype)
    if bits == 1:  # threshold 0 of the standardised value, i.e. w > μ
        return (w > mu).to(torch.uint8)
    levels = _levels(bits, w)
    return torch.bucketize((w - mu) / sigma, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)


def decode(codes: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, bits: int,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    mu, sigma = mu.to(dtype), sigma.to(dtype)
    if bits == 1:
        lo, hi = _one_bit_levels(mu, sigma)
        return torch.where(codes.bool(), hi, lo)
    levels = torch.tensor(codebook(bits), dtype=dtype, device=codes.device)
    return levels[codes.long()] * sigma + mu


@torch.no_grad()
def quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The quantized matrix ``code·σ + μ`` (no gradient path); equal bit for bit to ``decode(*encode(w))``. The
    1-bit case is one reduction, one comparison and one select."""
    if bits == 1:
        sigma, mu = torch.std_mean(w, correction=0)
        lo, hi = _one_bit_levels(mu, sigma)
        return torch.where(w > mu, hi, lo)
    codes, mu, sigma = encode(w, bits)
    return decode(codes, mu, sigma, bits, w.dtype)


class _StraightThrough(torch.autograd.Function):
    """Quantized values forward, the incoming gradient unchanged backward: one fused expression, no extra
    operators for the gradient."""

    @staticmethod
    def forward(ctx: object, w: torch.Tensor, bits: int) -> torch.Tensor:
        return quantize(w, bits)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def quantize_ste(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantized values forward (exactly :func:`quantize`), identity gradient backward (straight-through)."""
    return _StraightThrough.apply(w, bits)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (each < 2**bits) into ceil(n·bits/8) bytes, most significant bit first."""
    flat = codes.detach().cpu().numpy().astype(np.uint8).reshape(-1)
    bit_planes = np.unpackbits(flat[:, None], axis=1)[:, 8 - bits:]  # (n, bits)
    return torch.from_numpy(np.packbits(bit_planes.reshape(-1)).copy())


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    raw = np.unpackbits(packed.detach().cpu().numpy().astype(np.uint8))
    if raw.size < numel * bits:
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} codes of {bits} bits")
    planes = raw[: numel * bits].reshape(numel, bits)
    padded = np.concatenate([np.zeros((numel, 8 - bits), dtype=np.uint8), planes], axis=1)
    return torch.from_numpy(np.packbits(padded, axis=1).reshape(-1).copy())


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8
