"""The deployable form of a calibrated model: every fake quantizer rewritten as streams of stock integer ops.

A calibrated model (``quantize.calibration``) computes ``op(Q_x(x), Q_w(w))`` with quantizers that stock kernels do not
have: DRQ's two regions, RORQ's channel groups. Each has an exact equivalent built from per-tensor int8 GEMMs:

- uniform input grid: one stream, ``op(x, ŵ)`` with the input on that grid;
- RORQ channel groups (the permutation already folded into the weights): one stream per contiguous group,
  ``Σ_g op(x[g], ŵ[:, g])``, each group on its own grid; with magnitude tiers the groups take the bulk
  ``clamp(x, ±t_1)`` and every tier slice ``clamp(x, ±t_{i+1}) − clamp(x, ±t_i)`` is one more stream, a GEMM over the
  channels from the first that passes t_i on (range order: the outlier channels);
- DRQ post-GELU: Q(x) = Q_neg(min(x, 0)) + Q_pos(max(x, 0)) and ``op`` is linear, so two streams on the two regions,
  both fed GELU's output as it is: the negative grid sits at the top of the int8 container, where positive inputs
  saturate to its zero, and the positive grid's clamp takes the negative inputs to its own;
- DRQ post-softmax feeds an activation × activation matmul, which XNNPACK runs in F32 anyway (it has no int8 kernel
  for two runtime operands): each region is an int8 quantize/dequantize round trip and an exact power-of-two region
  select picks between them, in front of the F32 ``bmm``;
- element-wise RORQ tiers pick a grid per element, each grid covering its tier's values only; they are refused:
  calibrate with ``ptq4ris-deploy``, whose tier slices are the deployable equivalent.

The streams compute in float here; :class:`~quantize.deploy.calibrated_quantizer.CalibratedQuantizer` annotates each
stream's GEMM with its grids so that PT2E conversion puts the calibrated scales, unchanged, into the graph. Weights
are stored already on their grid (ŵ = s·clamp(round(w/s))), so re-quantizing them with the same scale is exact.
Narrow grids (fewer than 8 bits) get an explicit float clamp to their range first, because the int8 container of the
runtime would otherwise keep values the simulated grid clips.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.ao.quantization.fx._decomposed  # registers the quantize/dequantize ops that PT2E graphs are made of
import torch.nn.functional as F
from torch import nn

from quantize.calibration.placement import QuantMatMul, quantized_sites, set_submodule
from quantize.calibration.quantizers import (
    DrqGeluQuantizer,
    DrqSoftmaxQuantizer,
    FakeQuantizer,
    GroupQuantizer,
    TierQuantizer,
    UniformQuantizer,
)
from quantize.errors import UserError

_QD = torch.ops.quantized_decomposed

__all__ = [
    "ActGrid",
    "DeployLayer",
    "DeployMatMul",
    "DrqSoftmaxForm",
    "LoweringError",
    "QuantStream",
    "SiteLowering",
    "WeightGrid",
    "simulate_streams",
    "to_deploy_form",
]


# Tier-slice streams start at a multiple of this many input channels.
SLICE_ALIGN = 8


class LoweringError(UserError):
    """A calibrated model that has no exact lowering to stock integer kernels."""


@dataclass(frozen=True)
class ActGrid:
    """A per-tensor activation grid in an int8 container: q = clamp(round(x/scale) + zero_point, qmin, qmax)."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    bits: int

    @property
    def narrow(self) -> bool:
        return self.qmax - self.qmin < 255

    def bounds(self) -> tuple[float, float]:
        """The float range the grid represents."""
        return (self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        if not self.narrow:
            return x
        lo, hi = self.bounds()
        return x.clamp(lo, hi)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """What the int8 kernel sees, in float: the value of ``x``'s grid point."""
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale


def _container(scale: float, zero_point: float, qmin: int, qmax: int, bits: int) -> ActGrid:
    # An unsigned b-bit grid (0..2^b−1) moves down by 2^(b−1) into int8; the integers it computes with do not change.
    shift = 2 ** (bits - 1) if qmin >= 0 and qmax > 0 and qmax - qmin == 2**bits - 1 else 0
    if qmin == -(2 ** (bits - 1)) and qmax == 0:  # DRQ's negative GELU region: already inside int8
        shift = 0
    return ActGrid(float(scale), round(float(zero_point)) - shift, qmin - shift, qmax - shift, bits)


def act_grid(q: UniformQuantizer) -> ActGrid:
    if q.scale.numel() != 1:
        raise LoweringError(f"activation grids must be per tensor, got scale shape {tuple(q.scale.shape)}")
    return _container(q.scale.item(), q.zero_point.item(), q.qmin, q.qmax, q.bits)


@dataclass(frozen=True)
class WeightGrid:
    """Symmetric per-output-channel weight grid (zero point 0: XNNPACK miscomputes other per-channel zero points)."""

    scale: torch.Tensor  # (C_out,)
    qmin: int
    qmax: int
    bits: int


def _weight_grid(q: UniformQuantizer) -> WeightGrid:
    if not q.symmetric or bool((q.zero_point != 0).any()):
        raise LoweringError("weight grids must be symmetric (zero point 0)")
    return WeightGrid(q.scale.detach().flatten().clone(), q.qmin, q.qmax, q.bits)


class QuantStream(nn.Module):
    """One integer GEMM or convolution: input on ``grid``, weight on ``weight_grid``. Its forward is the float op on
    the grid-clamped input; the PT2E quantizer supplies the q/dq."""

    def __init__(
        self,
        op: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grid: ActGrid,
        weight_grid: WeightGrid,
        conv: dict | None = None,
    ) -> None:
        super().__init__()
        self.op, self.grid, self.weight_grid, self.conv = op, grid, weight_grid, conv or {}
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # True: round the input onto its grid here (host check of the stream form); False for export.
        self.simulate = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grid.fake_quant(x) if self.simulate else self.grid.clamp(x)
        if self.op == "linear":
            return F.linear(x, self.weight, self.bias)
        if self.op == "conv1d":
            return F.conv1d(x, self.weight, self.bias, **self.conv)
        return F.conv2d(x, self.weight, self.bias, **self.conv)


class DeployLayer(nn.Module):
    """A quantized Linear/Conv as the sum of its streams; ``feed`` says which part of the input each stream gets.

    With ``feed="groups"`` the first ``groups`` streams take contiguous channel blocks of the input, clamped to
    ±``thresholds[0]`` when there are magnitude tiers; each further stream takes one tier's slice over the channels
    from its ``starts`` entry on.
    """

    def __init__(
        self,
        streams: list[QuantStream],
        feed: str,
        axis: int = -1,
        groups: int = 0,
        thresholds: tuple = (),
        starts: tuple = (),
    ) -> None:
        super().__init__()
        self.streams = nn.ModuleList(streams)
        self.feed, self.axis, self.groups = feed, axis, groups
        self.thresholds, self.starts = tuple(thresholds), tuple(starts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feed == "whole":
            return self.streams[0](x)
        if self.feed == "drq_gelu":  # each region's grid saturates (or clamps) the other region to its zero
            return self.streams[0](x) + self.streams[1](x)
        t = self.thresholds
        bulk = x.clamp(-t[0], t[0]) if t else x
        width = x.shape[self.axis] // self.groups
        out = None
        for g, stream in enumerate(self.streams[: self.groups]):
            y = stream(bulk.narrow(self.axis, g * width, width))
            out = y if out is None else out + y
        channels = x.shape[self.axis]
        for i, (stream, start) in enumerate(zip(self.streams[self.groups :], self.starts)):
            xi = x.narrow(self.axis, start, channels - start)
            cur = xi.clamp(-t[i + 1], t[i + 1]) if i + 1 < len(t) else xi
            out = out + stream(cur - xi.clamp(-t[i], t[i]))
        return out


class DrqSoftmaxForm(nn.Module):
    """Post-softmax DRQ as two int8 round trips and one region select, all delegable.

    Each region's grid is a per-tensor int8 quantize/dequantize pair: ``hi`` on Δ = 1/L (softmax outputs stay within
    L·Δ = 1, so it never saturates), ``lo`` on Δ·2^−m, whose top level L·Δ·2^−m is the split itself (an explicit clamp
    keeps narrow grids there, as the int8 container would saturate at 127 instead). The converts round half to even
    like the simulated quantizer. The region is ``clamp(floor(x·2^m), 0, 1)``: a power-of-two product, so membership
    is exact. Ten element-wise passes over the attention matrix; the form with float rounding needed sixteen.
    """

    def __init__(self, bits: int, split_exponent: int) -> None:
        super().__init__()
        self.bits, self.m = bits, split_exponent
        self.levels = 2 ** (bits - 1) - 1

    @staticmethod
    def _round_trip(x: torch.Tensor, scale: float) -> torch.Tensor:
        q = _QD.quantize_per_tensor(x, scale, 0, -128, 127, torch.int8)
        return _QD.dequantize_per_tensor(q, scale, 0, -128, 127, torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = float(2.0**self.m)
        step = 1.0 / self.levels
        hi = self._round_trip(x, step)
        lo = self._round_trip(x if self.levels == 127 else x.clamp(max=1.0 / up), step / up)
        high_region = torch.floor(x * up).clamp(0, 1)
        return lo + high_region * (hi - lo)


class DeployMatMul(nn.Module):
    """``bmm(a, b)`` with each operand on its grid (or DRQ's float form); XNNPACK runs the product itself in F32."""

    def __init__(self, a: ActGrid | DrqSoftmaxForm, b: ActGrid) -> None:
        super().__init__()
        self.a_grid = a if isinstance(a, ActGrid) else None
        self.a_drq = a if isinstance(a, DrqSoftmaxForm) else None
        self.b_grid = b
        self.simulate = False

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.simulate:
            a = self.a_drq(a) if self.a_drq is not None else self.a_grid.fake_quant(a)
            return torch.bmm(a, self.b_grid.fake_quant(b))
        a = self.a_drq(a) if self.a_drq is not None else self.a_grid.clamp(a)
        return torch.bmm(a, self.b_grid.clamp(b))


@dataclass
class SiteLowering:
    """How one calibrated site was lowered, for the lowering report."""

    site: str
    op: str
    modality: str
    quantizer: str
    lowered_as: str
    streams: int
    weight_storage: str = ""
    grids: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _fake_quant_weight(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module.weight_quantizer.fake_quant(module.weight)


def _weight_storage(op: str, wg: WeightGrid) -> str:
    if wg.bits == 8:
        return "int8 (QC8W)"
    if op == "linear" and wg.bits == 4:
        return "int4 (QC4W)"
    return f"int8 container, {wg.bits}-bit values"


def _conv_args(module: nn.Module) -> dict | None:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return {
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
            "groups": module.groups,
        }
    return None


def _lower_layer(site: nn.Module) -> tuple[DeployLayer, SiteLowering]:
    info, q = site.info, site.input_quantizer
    wg = _weight_grid(site.weight_quantizer)
    # XNNPACK has no 4-bit convolution kernel: a conv keeps 4-bit values in an int8-range declaration.
    declared = wg if info.op == "linear" or wg.bits == 8 else WeightGrid(wg.scale, -128, 127, wg.bits)
    weight, bias, conv = _fake_quant_weight(site), site.bias, _conv_args(site)
    record = SiteLowering(info.name, info.op, info.modality, q.kind, "", 1, _weight_storage(info.op, wg))

    def stream(w, b, grid):
        if info.op == "linear" and wg.bits == 4 and w.shape[1] % 2:
            # Packed two to a byte, 4-bit weights of an odd input width come out wrong from XNNPACK, silently.
            raise LoweringError(
                f"{info.name}: a 4-bit stream of odd input width {w.shape[1]}: choose a channel-group count that "
                "divides the channels into even widths (--text-groups, --pwam-groups)"
            )
        record.grids.append(grid.__dict__)
        return QuantStream(info.op, w, b, grid, declared, conv)

    if isinstance(q, UniformQuantizer):
        layer = DeployLayer([stream(weight, bias, act_grid(q))], "whole")
        record.lowered_as = "int8 kernel"
    elif isinstance(q, DrqGeluQuantizer):
        # The negative region's grid sits at the top of the int8 container (zero point 127): every positive input
        # saturates to 127, the grid's zero, so that stream takes GELU's output as it is, with no clamp. Its bottom
        # needs none either: GELU never goes below −GELU_MIN, the grid's last step.
        neg = ActGrid(q.delta_neg, 127, -128, 127, q.bits)
        pos = ActGrid(q.delta_pos.item(), 0, 0, q.levels, q.bits)
        layer = DeployLayer([stream(weight, None, neg), stream(weight, bias, pos)], "drq_gelu")
        record.lowered_as, record.streams = "2 int8 streams (DRQ regions)", 2
    elif isinstance(q, GroupQuantizer):
        width = q.channels // q.groups
        axis = -1 if info.op == "linear" else 1
        streams = []
        for g in range(q.groups):
            grid = _container(q.scale[g].item(), q.zero_point[g].item(), q.qmin, q.qmax, q.bits)
            streams.append(stream(weight.narrow(1, g * width, width), bias if g == 0 else None, grid))
        tiers = len(q.thresholds)
        starts = []
        for scale, zero_point, start in zip(
            q.slice_scale.tolist(), q.slice_zero_point.tolist(), q.slice_start.tolist()
        ):
            # The stream starts at a multiple of 8 channels (XNNPACK packs 4-bit weights two to a byte and an odd
            # input width breaks them); weight columns before the slice's first channel are zero, as in the mask.
            aligned = start - start % SLICE_ALIGN
            w = weight.narrow(1, aligned, q.channels - aligned).clone()
            w[:, : start - aligned] = 0
            streams.append(stream(w, None, _container(scale, zero_point, q.qmin, q.qmax, q.bits)))
            starts.append(aligned)
        layer = DeployLayer(streams, "groups", axis, q.groups, tuple(q.thresholds.tolist()), tuple(starts))
        record.lowered_as = f"{q.groups} int8 streams (RORQ channel groups)"
        if tiers:
            record.lowered_as = f"{q.groups} + {tiers} int8 streams (RORQ channel groups + magnitude tier slices)"
        record.streams = q.groups + tiers
    elif isinstance(q, TierQuantizer):
        raise LoweringError(
            f"{info.name} uses element-wise RORQ tiers, which pick a grid per element and have no exact lowering to "
            "integer kernels; calibrate with --method ptq4ris-deploy (RORQ as channel groups) to export"
        )
    else:
        raise LoweringError(f"{info.name}: no lowering for quantizer kind {q.kind!r}")
    return layer, record


def _lower_matmul(site: QuantMatMul) -> tuple[DeployMatMul, SiteLowering]:
    info = site.info
    b = act_grid(_uniform(site.b_quantizer, info.name))
    if isinstance(site.a_quantizer, DrqSoftmaxQuantizer):
        a = DrqSoftmaxForm(site.a_quantizer.bits, int(site.a_quantizer.split_exponent))
        how = "F32 bmm; DRQ regions as exact float ops"
        grids = [{"drq_softmax_split_exponent": a.m, "bits": a.bits}, b.__dict__]
    else:
        a = act_grid(_uniform(site.a_quantizer, info.name))
        how = "F32 bmm on q/dq operands"
        grids = [a.__dict__, b.__dict__]
    record = SiteLowering(info.name, "matmul", info.modality, site.a_quantizer.kind, how, 1, "", grids)
    return DeployMatMul(a, b), record


def _uniform(q: FakeQuantizer, name: str) -> UniformQuantizer:
    if not isinstance(q, UniformQuantizer):
        raise LoweringError(f"{name}: no lowering for a {q.kind!r} matmul operand")
    return q


def simulate_streams(model: nn.Module, enabled: bool = True) -> None:
    """Make every stream of a deploy form round its inputs onto their grids in float: the model then computes what
    the integer graph computes, minus the int8 re-quantization of GEMM outputs."""
    for m in model.modules():
        if isinstance(m, (QuantStream, DeployMatMul)):
            m.simulate = enabled


@torch.no_grad()
def to_deploy_form(calibrated: nn.Module) -> tuple[nn.Module, list[SiteLowering]]:
    """A copy of ``calibrated`` with every quantized site replaced by its stream form, and how each was lowered.

    The copy computes in float (the streams' inputs are clamped to their grids but not rounded): quantization comes
    from :class:`~quantize.deploy.calibrated_quantizer.CalibratedQuantizer` during PT2E conversion.
    """
    model = copy.deepcopy(calibrated).eval()
    records = []
    for site in quantized_sites(model):
        lowered, record = _lower_matmul(site) if isinstance(site, QuantMatMul) else _lower_layer(site)
        set_submodule(model, site.info.name, lowered)
        records.append(record)
    return model, records
