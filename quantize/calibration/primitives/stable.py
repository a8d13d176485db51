"""Decision rules that do not flip on float noise, so that one calibration gives the same qparams on every machine.

Calibration turns continuous statistics into discrete choices: the scale candidate with the lowest loss, the DRQ
split, the channel order that defines RORQ/PWAM groups, the 3σ tier thresholds, the first channel a tier slice
covers. Computed in float32, those statistics differ between CPUs in their last bits (other SIMD widths, other BLAS
summation orders), and a choice between two near-equal values then goes either way: two machines of the same kind
gave artifacts 0.03 mIoU apart. The rules here compare with a stated tolerance and break ties by a fixed order:

- losses are accumulated in float64 and a candidate beats the incumbent only by more than ``LOSS_RTOL`` (relative);
  ties go to the smaller candidate index (:func:`stable_argmin`, :func:`stable_smallest`);
- continuous data statistics that become qparams or thresholds (activation ranges, tier thresholds, group extremes)
  are snapped to ``STAT_BITS`` significant bits (:func:`snap`), so noise far below a cell leaves them unchanged;
- channels are ordered by a key quantised relative to the largest range, ties by channel index
  (:func:`range_order_key`).

A rule of this kind still has boundaries (a value within the noise of a cell edge can fall either way: nothing that
maps continuous inputs to discrete outputs avoids that), but the probability of meeting one is of the order of
noise / cell instead of certain for near-ties, and values that are equal in exact arithmetic always decide alike.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "LOSS_RTOL",
    "ORDER_BITS",
    "SNAP_SLACK",
    "STAT_BITS",
    "range_order_key",
    "snap",
    "snap_range",
    "stable_argmin",
    "stable_smallest",
]

# Candidate losses are means over thousands of rows; float32 noise between machines (and the 1e-6 relative input
# noise the tests apply) moves them by ~1e-6 relative, while neighbouring scale candidates (α 1.2 % apart) differ by
# ~1e-2 near the optimum. 1e-4 is far above the noise and far below any difference that matters: a candidate
# replaces the incumbent only if its loss is lower by more than LOSS_RTOL · |incumbent|.
LOSS_RTOL = 1e-4
# Floor of the tolerance relative to the largest loss of the decision, for losses that vanish (a channel whose
# output gradient is all but zero): noise around 0 is not a difference.
_LOSS_ATOL_FACTOR = 1e-12
# Data statistics that become qparams are kept to 8 significant bits (cells of 0.4-0.8 %): ranges move by ~1e-6
# relative between machines, so a statistic changes cell with probability ~1e-3 instead of always changing its last
# bits; a grid widened by under 0.8 % costs nothing measurable at 8 bits, and the α search re-scales it anyway.
STAT_BITS = 8
# Ranges are snapped outward (never clipping data) except within this fraction of a cell above a grid point, where
# they snap down: ranges that sit exactly on a grid point (softmax's 1.0) would otherwise jump a cell on noise.
SNAP_SLACK = 1 / 16
# Channel ranges that order RORQ/PWAM groups are compared in steps of 2^-ORDER_BITS of the largest range: channels
# closer than that (GELU's minimum puts many channels at |x| = 0.16997) keep their index order.
ORDER_BITS = 8


def stable_argmin(losses: torch.Tensor, rtol: float = LOSS_RTOL) -> torch.Tensor:
    """The winning candidate of each column of ``losses`` (K candidates along dim 0, any trailing shape).

    Candidates are scanned in index order; one replaces the incumbent only when its loss is lower by more than
    ``rtol · |incumbent|`` (plus a floor of 1e-12 · the column's largest finite loss). NaN counts as +inf.
    Returns int64 indices shaped like ``losses[0]`` (a 0-d tensor for a 1-D input).
    """
    if losses.dim() == 0 or losses.shape[0] == 0:
        raise ValueError("stable_argmin needs at least one candidate")
    loss = torch.nan_to_num(losses.detach().to(torch.float64), nan=math.inf)
    finite = torch.where(torch.isfinite(loss), loss.abs(), torch.zeros_like(loss))
    atol = _LOSS_ATOL_FACTOR * finite.amax(0)
    best = torch.zeros(loss.shape[1:], dtype=torch.long, device=loss.device)
    incumbent = loss[0].clone()
    for k in range(1, loss.shape[0]):
        cand = loss[k]
        margin = torch.where(torch.isfinite(incumbent), rtol * incumbent.abs() + atol, torch.zeros_like(atol))
        better = (cand < incumbent - margin) | (~torch.isfinite(incumbent) & torch.isfinite(cand))
        best = torch.where(better, torch.full_like(best, k), best)
        incumbent = torch.where(better, cand, incumbent)
    return best


def _loss_key(loss: torch.Tensor, rtol: float) -> torch.Tensor:
    """Losses (1-D) rounded to cells of ``rtol`` times the smallest finite |loss| (floored), as float64 integers."""
    loss = torch.nan_to_num(loss.detach().to(torch.float64), nan=math.inf, posinf=math.inf, neginf=-math.inf)
    finite = loss[torch.isfinite(loss)]
    if not len(finite):
        return torch.zeros_like(loss)
    floor = _LOSS_ATOL_FACTOR * float(finite.abs().max())
    cell = max(rtol * float(finite.abs().min()), floor, torch.finfo(torch.float64).tiny)
    low = float(finite.min())
    return torch.where(torch.isfinite(loss), torch.round((loss - low) / cell), torch.full_like(loss, math.inf))


def stable_smallest(losses: torch.Tensor, k: int, rtol: float = LOSS_RTOL) -> torch.Tensor:
    """Indices (ascending) of the ``k`` smallest of the 1-D ``losses``, compared on cells of ``rtol`` times the
    smallest loss, ties by index: the screening pass keeps the same candidates under float noise."""
    key = _loss_key(losses, rtol)
    order = torch.argsort(key, stable=True)[:k]
    return order.sort().values


def _snap_magnitude(m: torch.Tensor, bits: int, mode: str) -> torch.Tensor:
    """|values| (float64, > 0) to ``bits`` significant bits: nearest, or up except within SNAP_SLACK of a cell."""
    mantissa, exponent = torch.frexp(m)  # mantissa in [0.5, 1)
    cells = mantissa * 2.0**bits
    if mode == "nearest":
        cells = torch.round(cells)
    elif mode == "out":
        cells = torch.ceil(cells - SNAP_SLACK)
    else:
        raise ValueError(f"unknown snap mode {mode!r}")
    return torch.ldexp(cells, exponent - bits)


def snap(x, bits: int = STAT_BITS, mode: str = "nearest"):
    """``x`` (float or tensor) kept to ``bits`` significant bits: ``nearest``, or ``out`` (magnitude rounded up, so a
    range never shrinks, except within SNAP_SLACK of a cell above a grid point). 0, inf and NaN stay as they are.
    A float gives a float; a tensor a tensor of its dtype (exact: 8 significant bits fit any float type)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to(torch.float64)
        mag = t.abs()
        ok = torch.isfinite(mag) & (mag > 0)
        snapped = _snap_magnitude(torch.where(ok, mag, torch.ones_like(mag)), bits, mode)
        return torch.where(ok, torch.copysign(snapped, t), t).to(x.dtype)
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return x
    return math.copysign(float(_snap_magnitude(torch.tensor(abs(x), dtype=torch.float64), bits, mode)), x)


def snap_range(lo: float, hi: float, bits: int = STAT_BITS) -> tuple[float, float]:
    """A data range [lo, hi] snapped outward (see :func:`snap`)."""
    return snap(lo, bits, "out"), snap(hi, bits, "out")


def range_order_key(channel_range: torch.Tensor, bits: int = ORDER_BITS) -> torch.Tensor:
    """Channel ranges quantised to steps of 2^-bits of the largest one (float64 integers), for a stable sort that
    breaks ties by channel index. Non-finite ranges are left as they are, for the caller to reject."""
    r = torch.as_tensor(channel_range).detach().to(torch.float64)
    finite = r[torch.isfinite(r)]
    top = float(finite.abs().max()) if len(finite) else 0.0
    if top == 0:
        return torch.where(torch.isfinite(r), torch.zeros_like(r), r)
    # The step is itself snapped, so noise in the largest range does not move every cell edge.
    step = snap(top, STAT_BITS, "nearest") * 2.0**-bits
    return torch.where(torch.isfinite(r), torch.round(r / step), r)
