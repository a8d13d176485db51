"""Reorder-based outlier-retained quantization (RORQ) of PTQ4RIS, for the inputs of the text encoder's Linears.

Two forms:

- **Magnitude tiers** (the reference code's reading, element-wise, simulation only): calibration finds nested
  thresholds t_i = mean|R| + 3·std|R| over the values R still above the previous threshold, up to 10 tiers; every
  tier has its own full b-bit asymmetric min-max grid, so outliers are kept, not clipped.
- **Channel groups** (the deployable reading): BERT-family outliers sit in a few fixed channels, so channels are
  sorted by calibrated range into G contiguous groups with one asymmetric grid each. The permutation is folded into
  the neighbouring weights (done by the lowering), so the float function is unchanged and each group is an ordinary
  int8 stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .stable import range_order_key, snap
from .uniform import UniformSpec, minmax_qparams, qrange

__all__ = ["RorqTiers", "calibrate_tiers", "channel_group_order", "ChannelGroups", "calibrate_channel_groups"]


def _asym_grid(values: torch.Tensor, bits: int) -> tuple[float, float]:
    """(scale, zero point) of the asymmetric min-max grid over ``values`` (an empty tier gets a grid around 0); the
    extremes are snapped outward (:func:`.stable.snap`) so that float noise leaves the grid unchanged."""
    if values.numel() == 0:
        values = torch.zeros(1)
    extremes = snap(torch.stack([values.min(), values.max()]).float(), mode="out")
    scale, zero_point = minmax_qparams(extremes, UniformSpec(bits, symmetric=False))
    return float(scale), float(zero_point)


@dataclass(frozen=True)
class RorqTiers:
    """Thresholds on |x| (ascending; tier i holds t_{i-1} < |x| ≤ t_i, the last tier everything above) and each
    tier's asymmetric (scale, zero point)."""

    bits: int
    thresholds: tuple[float, ...]
    grids: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if len(self.grids) != len(self.thresholds) + 1:
            raise ValueError(
                f"{len(self.thresholds)} thresholds need {len(self.thresholds) + 1} grids, got {len(self.grids)}"
            )

    def tier_of(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(x.abs(), torch.tensor(self.thresholds, dtype=x.dtype, device=x.device))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(self.bits, symmetric=False)
        tier = self.tier_of(x)
        out = torch.empty_like(x)
        for i, (scale, zp) in enumerate(self.grids):
            sel = tier == i
            q = torch.clamp(torch.round(x[sel] / scale) + zp, qmin, qmax)
            out[sel] = (q - zp) * scale
        return out


def calibrate_tiers(x: torch.Tensor, bits: int, max_tiers: int = 10, k_sigma: float = 3.0) -> RorqTiers:
    """Nested 3σ magnitude tiers over the calibration values ``x`` (any shape).

    The statistics are taken in float64 and each threshold is snapped to :data:`.stable.STAT_BITS` significant bits
    before values are compared with it, so that float noise in ``x`` does not move the tiers."""
    if max_tiers < 1:
        raise ValueError(f"max_tiers must be at least 1, got {max_tiers}")
    values = x.detach().flatten().float()
    mags = values.abs()
    thresholds: list[float] = []
    remaining = mags
    while len(thresholds) < max_tiers - 1 and remaining.numel() > 1:
        r64 = remaining.double()
        t = snap(float(r64.mean() + k_sigma * r64.std()))
        above = remaining[remaining > t]
        if above.numel() == 0:
            break
        thresholds.append(t)
        remaining = above
    bounds = [0.0, *thresholds, float("inf")]
    grids = []
    for lo_t, hi_t in zip(bounds[:-1], bounds[1:]):
        sel = values[(mags > lo_t) & (mags <= hi_t)] if lo_t > 0 else values[mags <= hi_t]
        grids.append(_asym_grid(sel, bits))
    return RorqTiers(bits, tuple(thresholds), tuple(grids))


def channel_group_order(channel_range: torch.Tensor) -> torch.Tensor:
    """Permutation putting channels in ascending order of calibrated range, compared in steps of 2^-8 of the largest
    range (:func:`.stable.range_order_key`) and stable, so near-ties keep their channel order under float noise."""
    return torch.argsort(range_order_key(channel_range), stable=True)


@dataclass(frozen=True)
class ChannelGroups:
    """Channel-reordered RORQ: ``perm`` (new position → old channel), G contiguous groups of the permuted channels,
    one asymmetric grid each."""

    bits: int
    perm: tuple[int, ...]
    group_size: int
    grids: tuple[tuple[float, float], ...]

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """On the original channel order (last dim); the result equals quantizing the permuted tensor by groups."""
        qmin, qmax = qrange(self.bits, symmetric=False)
        perm = torch.tensor(self.perm, device=x.device)
        xp = x[..., perm]
        scale = torch.tensor([g[0] for g in self.grids], dtype=x.dtype, device=x.device).repeat_interleave(
            self.group_size
        )
        zp = torch.tensor([g[1] for g in self.grids], dtype=x.dtype, device=x.device).repeat_interleave(self.group_size)
        q = torch.clamp(torch.round(xp / scale) + zp, qmin, qmax)
        out = torch.empty_like(x)
        out[..., perm] = (q - zp) * scale
        return out


def calibrate_channel_groups(x: torch.Tensor, bits: int, groups: int) -> ChannelGroups:
    """Sort the last-dim channels of ``x`` by max |value| and give each of ``groups`` contiguous blocks a grid."""
    channels = x.shape[-1]
    if groups <= 0 or channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} equal groups")
    flat = x.detach().reshape(-1, channels).float()
    perm = channel_group_order(flat.abs().amax(0))
    size = channels // groups
    grids = []
    for g in range(groups):
        block = flat[:, perm[g * size : (g + 1) * size]]
        grids.append(_asym_grid(block, bits))
    return ChannelGroups(bits, tuple(perm.tolist()), size, tuple(grids))
