"""Dual-region quantization (DRQ) of PTQ4RIS for post-softmax and post-GELU activations (after PTQ4ViT's
twin-uniform quantization, github ``hahnyuan/PTQ4ViT``; PTQ4RIS, github ``gugu511yy/PTQ4RIS``).

A b-bit budget is split into two regions of b−1 bits each, so a value keeps b bits of information (region + level).

Post-softmax (values in [0, 1]): split at s = 2^−m. High region [s, 1] with Δ_hi = 1/(2^(b−1) − 1); low region
[0, s) with Δ_lo = Δ_hi · 2^−m, so the two scales stand in a power-of-two ratio and the low region's top level
reaches s. m ∈ 0…19 is searched.

Post-GELU (values ≥ −0.17): negative region with fixed Δ_neg = 0.16997 / 2^(b−1) (GELU's minimum is −0.16997),
positive region with a searched Δ_pos; Q(x) = Q_pos(x) + Q_neg(x). ``pow2_ratio`` restricts Δ_pos to 2^k · Δ_neg,
which PTQ4ViT asks for and the reference code does not enforce.

Lowering (later, in ``mobile_runtime``): each region is an ordinary int8 stream with its own scale, so a DRQ input
of a Linear becomes two int8 Linears whose outputs are added — exact, not an approximation.
"""

from __future__ import annotations

import torch

from .stable import snap, stable_argmin

__all__ = [
    "GELU_MIN",
    "drq_softmax_fake_quant",
    "search_drq_softmax",
    "drq_gelu_fake_quant",
    "search_drq_gelu",
]

GELU_MIN = 0.16997  # |min GELU(x)|


def _levels(bits: int) -> int:
    if not 3 <= bits <= 8:
        raise ValueError(f"DRQ needs 3..8 bits (b−1 bits per region), got {bits}")
    return 2 ** (bits - 1) - 1


def drq_softmax_fake_quant(x: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Post-softmax DRQ with split s = 2^−m."""
    if not 0 <= m <= 19:
        raise ValueError(f"split exponent m must be in 0..19, got {m}")
    levels = _levels(bits)
    delta_hi = 1.0 / levels
    delta_lo = delta_hi * 2.0**-m
    split = 2.0**-m
    hi = torch.clamp(torch.round(x / delta_hi), 0, levels) * delta_hi
    lo = torch.clamp(torch.round(x / delta_lo), 0, levels) * delta_lo
    return torch.where(x >= split, hi, lo)


def search_drq_softmax(x: torch.Tensor, bits: int, objective=None, exponents: range = range(20)) -> tuple[int, float]:
    """The split exponent m minimising ``objective(x̂)`` (default: MSE to ``x``, accumulated in float64); losses
    within :data:`.stable.LOSS_RTOL` of each other go to the first exponent. Returns (m, its loss)."""
    objective = objective or (lambda xq: _mse64(xq, x))
    exponents = list(exponents)
    losses = [float(objective(drq_softmax_fake_quant(x, bits, m))) for m in exponents]
    best = int(stable_argmin(torch.tensor(losses, dtype=torch.float64)))
    return exponents[best], losses[best]


def _mse64(xq: torch.Tensor, x: torch.Tensor) -> float:
    return float((xq.double() - x.double()).square().mean())


def drq_gelu_fake_quant(x: torch.Tensor, bits: int, delta_pos: float) -> torch.Tensor:
    """Post-GELU DRQ: fixed negative region, positive region with step ``delta_pos``."""
    if delta_pos <= 0:
        raise ValueError(f"delta_pos must be positive, got {delta_pos}")
    levels = _levels(bits)
    delta_neg = GELU_MIN / 2 ** (bits - 1)
    q_neg = torch.clamp(torch.round(x.clamp(max=0) / delta_neg), -(levels + 1), 0) * delta_neg
    q_pos = torch.clamp(torch.round(x.clamp(min=0) / delta_pos), 0, levels) * delta_pos
    return q_neg + q_pos


def search_drq_gelu(
    x: torch.Tensor,
    bits: int,
    objective=None,
    candidates: int = 100,
    alpha_range: tuple[float, float] = (0.01, 1.19),
    pow2_ratio: bool = False,
) -> tuple[float, float]:
    """Search Δ_pos. Candidates are α · Δ0 with Δ0 = max(x) / (2^(b−1) − 0.5) (PTQ4ViT's grid), or, with
    ``pow2_ratio``, 2^k · Δ_neg for every k that gives a step between the extreme candidates. Returns (Δ_pos, loss)."""
    objective = objective or (lambda xq: _mse64(xq, x))
    levels = _levels(bits)
    delta0 = snap(max(float(x.max()), 1e-8), mode="out") / (levels + 0.5)  # snapped: see .stable
    if pow2_ratio:
        delta_neg = GELU_MIN / 2 ** (bits - 1)
        lo, hi = alpha_range[0] * delta0, alpha_range[1] * delta0
        k_lo = int(torch.floor(torch.log2(torch.tensor(lo / delta_neg))))
        k_hi = int(torch.ceil(torch.log2(torch.tensor(hi / delta_neg))))
        steps = [delta_neg * 2.0**k for k in range(k_lo, k_hi + 1)]
    else:
        a0, a1 = alpha_range
        steps = [(a0 + (a1 - a0) * i / max(candidates - 1, 1)) * delta0 for i in range(candidates)]
    losses = [float(objective(drq_gelu_fake_quant(x, bits, d))) for d in steps]
    best = int(stable_argmin(torch.tensor(losses, dtype=torch.float64)))
    return steps[best], losses[best]
