"""Fake-quantizer modules: the simulated quantizers that calibration tunes and the artifact stores.

Each quantizer keeps its parameters in buffers (so ``state_dict`` is the qparams), describes itself as a small JSON
dict (so an artifact can rebuild it), and passes gradients straight through (STE) — calibration back-propagates
through quantized layers to weigh each layer's error by its effect on the mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .primitives.drq import GELU_MIN
from .primitives.uniform import qrange

__all__ = [
    "DrqGeluQuantizer",
    "DrqSoftmaxQuantizer",
    "FakeQuantizer",
    "GroupQuantizer",
    "TierQuantizer",
    "UniformQuantizer",
    "quantizer_from_spec",
]


def _round_ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    return x + (xq - x).detach() if x.requires_grad else xq


class FakeQuantizer(nn.Module):
    """Base class: ``forward`` fake-quantizes when ``enabled`` and is the identity otherwise."""

    kind = "base"

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.enabled = True

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return _round_ste(x, self.fake_quant(x))

    def spec(self) -> dict[str, Any]:
        """Everything besides the buffers needed to rebuild this quantizer."""
        return {"kind": self.kind, "bits": self.bits}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "kind")


class UniformQuantizer(FakeQuantizer):
    """Uniform affine grid. ``shape`` is the broadcast shape of scale/zero point: ``()`` per tensor, e.g.
    ``(C_out, 1)`` per output channel of a Linear weight."""

    kind = "uniform"

    def __init__(self, bits: int, symmetric: bool, shape: tuple[int, ...] = ()) -> None:
        super().__init__(bits)
        self.symmetric = symmetric
        self.qmin, self.qmax = qrange(bits, symmetric)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        self.scale.copy_(scale.reshape(self.scale.shape))
        zp = torch.zeros_like(self.scale) if zero_point is None else zero_point.reshape(self.scale.shape)
        if self.symmetric and bool((zp != 0).any()):
            raise ValueError("a symmetric grid needs zero points of 0")
        self.zero_point.copy_(zp)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "symmetric": self.symmetric, "shape": list(self.scale.shape)}


class DrqSoftmaxQuantizer(FakeQuantizer):
    """Post-softmax dual-region quantizer (see :mod:`.primitives.drq`); ``split_exponent`` m puts the split at 2^−m."""

    kind = "drq_softmax"

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        if not 3 <= bits <= 8:
            raise ValueError(f"DRQ needs 3..8 bits (b−1 bits per region), got {bits}")
        self.register_buffer("split_exponent", torch.zeros((), dtype=torch.long))

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def fake_quant(self, x: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """``m`` may hold several exponents shaped to broadcast against ``x`` (vectorised search)."""
        m = self.split_exponent if m is None else m
        delta_hi = 1.0 / self.levels
        split = torch.exp2(-m.to(x.dtype))
        delta_lo = delta_hi * split
        hi = torch.clamp(torch.round(x / delta_hi), 0, self.levels) * delta_hi
        lo = torch.clamp(torch.round(x / delta_lo), 0, self.levels) * delta_lo
        return torch.where(x >= split, hi, lo)


class DrqGeluQuantizer(FakeQuantizer):
    """Post-GELU dual-region quantizer: fixed negative step 0.16997/2^(b−1), searched positive step."""

    kind = "drq_gelu"

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        if not 3 <= bits <= 8:
            raise ValueError(f"DRQ needs 3..8 bits (b−1 bits per region), got {bits}")
        self.register_buffer("delta_pos", torch.ones(()))

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def delta_neg(self) -> float:
        return GELU_MIN / 2 ** (self.bits - 1)

    def fake_quant(self, x: torch.Tensor, delta_pos: torch.Tensor | None = None) -> torch.Tensor:
        delta_pos = self.delta_pos if delta_pos is None else delta_pos
        q_neg = torch.clamp(torch.round(x.clamp(max=0) / self.delta_neg), -(self.levels + 1), 0) * self.delta_neg
        q_pos = torch.clamp(torch.round(x.clamp(min=0) / delta_pos), 0, self.levels) * delta_pos
        return q_neg + q_pos


class TierQuantizer(FakeQuantizer):
    """Element-wise RORQ: nested magnitude tiers, each with its own asymmetric b-bit grid (simulation only)."""

    kind = "rorq_tiers"

    def __init__(self, bits: int, tiers: int = 1) -> None:
        super().__init__(bits)
        self.qmin, self.qmax = qrange(bits, symmetric=False)
        self.register_buffer("thresholds", torch.zeros(tiers - 1))
        self.register_buffer("scale", torch.ones(tiers))
        self.register_buffer("zero_point", torch.zeros(tiers))

    def set_tiers(self, thresholds: tuple[float, ...], grids: tuple[tuple[float, float], ...]) -> None:
        """Replace the tiers (their number is found by calibration)."""
        device = self.scale.device
        self.thresholds = torch.tensor(thresholds, dtype=torch.float32, device=device)
        self.scale = torch.tensor([g[0] for g in grids], dtype=torch.float32, device=device)
        self.zero_point = torch.tensor([g[1] for g in grids], dtype=torch.float32, device=device)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        tier = torch.bucketize(x.abs(), self.thresholds)
        scale, zp = self.scale[tier], self.zero_point[tier]
        q = torch.clamp(torch.round(x / scale) + zp, self.qmin, self.qmax)
        return (q - zp) * scale

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "tiers": int(self.scale.numel())}


class GroupQuantizer(FakeQuantizer):
    """Deployable RORQ: contiguous channel groups along ``axis``, one asymmetric grid each, and optionally magnitude
    tiers as residual slices. The channels were put in range order beforehand by a permutation folded into the
    weights, so outlier channels share groups.

    With tiers (thresholds t_1 < … < t_k on |x|, found by calibration), the input is split into the bulk
    ``clamp(x, −t_1, t_1)``, quantized by channel groups, and the slices ``clamp(x, ±t_{i+1}) − clamp(x, ±t_i)`` (the
    last one ``x − clamp(x, ±t_k)``), each on its own grid. The slices are zero wherever |x| is below their threshold,
    so outliers keep their own fine grids as with element-wise tiers, and since the Linear after it is linear, every
    slice is one more int8 stream through the same weight. Slice i covers only the channels from ``slice_start[i]``
    on, the first (in range order) whose calibrated extreme passes t_i: its stream is a narrow GEMM over the outlier
    channels, and below that channel the input is clipped at t_i like any grid clips beyond its calibrated range.
    """

    kind = "rorq_groups"

    def __init__(self, bits: int, channels: int, groups: int, axis: int, max_tiers: int = 1, slices: int = 0) -> None:
        super().__init__(bits)
        if groups <= 0 or channels % groups:
            raise ValueError(f"{channels} channels cannot be split into {groups} equal groups")
        if max_tiers < 1 or not 0 <= slices < max_tiers:
            raise ValueError(f"need max_tiers >= 1 and 0 <= slices < max_tiers, got {max_tiers}, {slices}")
        self.channels, self.groups, self.axis, self.max_tiers = channels, groups, axis, max_tiers
        self.qmin, self.qmax = qrange(bits, symmetric=False)
        self.register_buffer("scale", torch.ones(groups))
        self.register_buffer("zero_point", torch.zeros(groups))
        self.register_buffer("thresholds", torch.zeros(slices))
        self.register_buffer("slice_scale", torch.ones(slices))
        self.register_buffer("slice_zero_point", torch.zeros(slices))
        self.register_buffer("slice_start", torch.zeros(slices, dtype=torch.long))

    def set_thresholds(self, thresholds: tuple[float, ...]) -> None:
        """Replace the tier thresholds (ascending, at most ``max_tiers − 1``); slice grids are reset to placeholders."""
        if len(thresholds) >= self.max_tiers or list(thresholds) != sorted(thresholds):
            raise ValueError(f"need at most {self.max_tiers - 1} ascending thresholds, got {thresholds}")
        device = self.scale.device
        self.thresholds = torch.tensor(thresholds, dtype=torch.float32, device=device)
        self.slice_scale = torch.ones(len(thresholds), device=device)
        self.slice_zero_point = torch.zeros(len(thresholds), device=device)
        self.slice_start = torch.zeros(len(thresholds), dtype=torch.long, device=device)

    def per_channel(self, t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[axis] = self.channels
        return t.repeat_interleave(self.channels // self.groups).reshape(shape)

    def split(self, x: torch.Tensor, axis: int | None = None) -> list[torch.Tensor]:
        """[bulk, slice_1, …, slice_k], full width (a slice is zero before its first channel): the parts the streams
        quantize. They sum to ``x`` wherever no channel passes a threshold its slice does not cover, which holds on
        the calibration data."""
        axis = self.axis if axis is None else axis
        t = self.thresholds.tolist()
        parts = [x.clamp(-t[0], t[0]) if t else x]
        shape = [1] * x.dim()
        shape[axis] = self.channels
        channel = torch.arange(self.channels, device=x.device).reshape(shape)
        for i, start in enumerate(self.slice_start.tolist()):
            cur = x.clamp(-t[i + 1], t[i + 1]) if i + 1 < len(t) else x
            parts.append((cur - x.clamp(-t[i], t[i])) * (channel >= start))
        return parts

    def fake_quant(self, x: torch.Tensor, axis: int | None = None) -> torch.Tensor:
        axis = self.axis if axis is None else axis
        bulk, *slices = self.split(x, axis)
        scale = self.per_channel(self.scale, x.dim(), axis)
        zp = self.per_channel(self.zero_point, x.dim(), axis)
        out = (torch.clamp(torch.round(bulk / scale) + zp, self.qmin, self.qmax) - zp) * scale
        for part, s_scale, s_zp in zip(slices, self.slice_scale, self.slice_zero_point):
            out = out + (torch.clamp(torch.round(part / s_scale) + s_zp, self.qmin, self.qmax) - s_zp) * s_scale
        return out

    def spec(self) -> dict[str, Any]:
        spec = {**super().spec(), "channels": self.channels, "groups": self.groups, "axis": self.axis}
        if self.max_tiers > 1:
            spec |= {"max_tiers": self.max_tiers, "slices": int(self.thresholds.numel())}
        return spec


def quantizer_from_spec(spec: dict[str, Any]) -> FakeQuantizer:
    """Rebuild a quantizer (with placeholder buffers, to be filled by ``load_state_dict``) from :meth:`spec`."""
    kind, bits = spec["kind"], int(spec["bits"])
    if kind == "uniform":
        return UniformQuantizer(bits, bool(spec["symmetric"]), tuple(spec["shape"]))
    if kind == "drq_softmax":
        return DrqSoftmaxQuantizer(bits)
    if kind == "drq_gelu":
        return DrqGeluQuantizer(bits)
    if kind == "rorq_tiers":
        return TierQuantizer(bits, int(spec["tiers"]))
    if kind == "rorq_groups":
        return GroupQuantizer(
            bits,
            int(spec["channels"]),
            int(spec["groups"]),
            int(spec["axis"]),
            int(spec.get("max_tiers", 1)),
            int(spec.get("slices", 0)),
        )
    raise ValueError(f"unknown quantizer kind {kind!r}")
