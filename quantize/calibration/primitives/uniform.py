"""Uniform affine fake quantization: the grid every other quantizer of this package is built from.

``q = clamp(round(x / Δ) + z, qmin, qmax)``, ``x̂ = (q − z) · Δ``. Symmetric grids have z = 0 and
``[qmin, qmax] = [−2^(b−1), 2^(b−1) − 1]``; asymmetric grids ``[0, 2^b − 1]``. Scales may be per tensor or per slice
along one axis (output channel, head, or q/k/v block: a block is a contiguous run of channels, given as ``groups``).
Weights must use symmetric grids: XNNPACK silently miscomputes per-channel weights with a non-zero zero point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["UniformSpec", "qrange", "minmax_qparams", "fake_quantize", "grouped_amax"]


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit grid."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


@dataclass(frozen=True)
class UniformSpec:
    """A uniform grid: ``bits``, symmetric or not, and the axis/groups its scales vary over.

    Args:
        bits: 2..8.
        symmetric: zero point fixed at 0 (required for weights).
        axis: None for one scale per tensor; else the axis along which scales vary.
        groups: with ``axis``, split that axis into this many equal contiguous blocks with one scale each (heads,
            q/k/v blocks); None means one scale per index along ``axis`` (per channel).
    """

    bits: int = 8
    symmetric: bool = True
    axis: int | None = None
    groups: int | None = None

    def __post_init__(self) -> None:
        qrange(self.bits, self.symmetric)
        if self.groups is not None and self.axis is None:
            raise ValueError(f"groups={self.groups} needs an axis to split")
        if self.groups is not None and self.groups <= 0:
            raise ValueError(f"groups must be positive, got {self.groups}")

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]


def grouped_amax(x: torch.Tensor, axis: int | None, groups: int | None, reduce: str) -> torch.Tensor:
    """max (``reduce='max'``), min or max-abs of ``x`` per tensor / index / block of ``axis``, shaped to broadcast
    against ``x``."""
    op = {"max": torch.amax, "min": torch.amin}
    if axis is None:
        t = x.abs() if reduce == "absmax" else x
        return (t.amax() if reduce != "min" else t.amin()).reshape([1] * x.dim())
    axis = axis % x.dim()
    t = x.abs() if reduce == "absmax" else x
    t = t.movedim(axis, 0)
    n = t.shape[0]
    g = groups or n
    if n % g:
        raise ValueError(f"axis {axis} has {n} entries, not divisible into {g} groups")
    r = op["min" if reduce == "min" else "max"](t.reshape(g, -1), dim=1)  # g
    r = r.repeat_interleave(n // g)  # n
    shape = [1] * x.dim()
    shape[axis] = n
    return r.reshape(shape)


def minmax_qparams(x: torch.Tensor, spec: UniformSpec, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point of ``x`` for ``spec``, broadcastable against ``x``."""
    if spec.symmetric:
        amax = grouped_amax(x, spec.axis, spec.groups, "absmax")
        # Δ0 = max|x| / (2^(b−1) − 0.5), as PTQ4ViT: the extreme value lands on the last level's rounding edge.
        scale = (amax / (spec.qmax + 0.5)).clamp(min=eps)
        return scale, torch.zeros_like(scale)
    lo = grouped_amax(x, spec.axis, spec.groups, "min").clamp(max=0)
    hi = grouped_amax(x, spec.axis, spec.groups, "max").clamp(min=0)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp(min=eps)
    zero_point = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero_point


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize then dequantize on the grid (scale, zero_point, [qmin, qmax])."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale
