"""GEMM outputs with a few massive channels get those channels on an int8 range of their own.

XNNPACK delegates a quantized GEMM only with an int8 output on one per-tensor range, a step the simulated model does
not have. For most GEMMs that range costs nothing measurable. BERT-style text encoders are the exception: the FFN
output projection writes the residual stream's massive-activation channels (in MiniLM, the largest reaches 14–130
while the ninth-largest stays under 1.6), so one range for all channels gives every ordinary channel a step near 1,
and the word features drift far from the simulation (relative error 0.23 on the default model, against 0.10 from
the rest of the integer graph).

The fix is exact and stays in stock kernels: the stream's GEMM is split by output channel. The ordinary channels
keep the full-width GEMM with the outlier rows of the weight (and bias) set to zero, so those outputs are exactly
zero; the outlier rows become a narrow GEMM with its own output range, and a constant one-hot F32 linear puts its
channels back in place before the two are added. Both GEMMs read the same int8 input on the same grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantize.calibration.placement import set_submodule

from .deploy_form import QuantStream, SiteLowering, WeightGrid

__all__ = ["OutputSplitStream", "outlier_output_channels", "split_output_outliers"]

# A channel is an outlier when its calibration range exceeds RATIO times the range of the channel ranked
# MAX_CHANNELS + 1: at most MAX_CHANNELS channels move, and the ones left then share a range at least RATIO times
# finer than before.
RATIO = 4.0
MAX_CHANNELS = 8
# Narrower GEMMs stay whole: their ninth-largest channel is no sign of what an ordinary channel spans.
MIN_WIDTH = 8 * MAX_CHANNELS


def outlier_output_channels(amax: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) of the output channels whose calibration ``amax`` stands out; empty when none does."""
    if amax.numel() <= MIN_WIDTH:
        return torch.empty(0, dtype=torch.long)
    reference = amax.sort(descending=True).values[MAX_CHANNELS]
    return torch.nonzero(amax > RATIO * reference).flatten()


class OutputSplitStream(nn.Module):
    """One linear stream computed as two integer GEMMs on the same input: ``ordinary`` (all output channels, the
    outlier rows zero) and ``outliers`` (the outlier rows only), each with its own output range."""

    def __init__(self, stream: QuantStream, channels: torch.Tensor) -> None:
        super().__init__()
        if stream.op != "linear":
            raise ValueError(f"only linear streams are split by output channel, got {stream.op}")
        channels = channels.to(torch.long)
        weight, bias, wg = stream.weight.detach(), stream.bias, stream.weight_grid
        kept = weight.clone()
        kept[channels] = 0
        kept_bias = None
        if bias is not None:
            kept_bias = bias.detach().clone()
            kept_bias[channels] = 0
        self.ordinary = QuantStream("linear", kept, kept_bias, stream.grid, wg)
        self.outliers = QuantStream(
            "linear",
            weight[channels],
            None if bias is None else bias.detach()[channels],
            stream.grid,
            WeightGrid(wg.scale[channels].clone(), wg.qmin, wg.qmax, wg.bits),
        )
        # (C_out, k): column j puts outlier j back on its channel.
        self.register_buffer("place", F.one_hot(channels, weight.shape[0]).t().to(weight.dtype).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ordinary(x) + F.linear(self.outliers(x), self.place)


@torch.no_grad()
def split_output_outliers(
    program: nn.Module, inputs, records: list[SiteLowering] | None = None
) -> dict[str, list[int]]:
    """Replace, in place, every linear stream of ``program`` whose output has outlier channels on ``inputs`` (the
    calibration pairs, as ``program``'s positional inputs) by an :class:`OutputSplitStream`. Returns the split
    streams with their outlier channels, and notes them in the matching ``records``."""
    amax: dict[str, torch.Tensor] = {}

    def observe(name):
        def hook(module, args, out):
            a = out.detach().abs().flatten(0, -2).amax(0)
            amax[name] = torch.maximum(amax[name], a) if name in amax else a

        return hook

    streams = {n: m for n, m in program.named_modules() if isinstance(m, QuantStream) and m.op == "linear"}
    handles = [m.register_forward_hook(observe(n)) for n, m in streams.items()]
    try:
        for args in inputs:
            program(*args)
    finally:
        for h in handles:
            h.remove()
    split = {}
    for name, a in amax.items():
        channels = outlier_output_channels(a)
        if len(channels):
            set_submodule(program, name, OutputSplitStream(streams[name], channels))
            split[name] = channels.tolist()
    for record in records or []:
        moved = {n: c for n, c in split.items() if f".{record.site}.streams." in f".{n}"}
        if moved:
            channels, gemms = sum(map(len, moved.values())), len(moved)
            record.lowered_as += f"; {channels} outlier output channels in {gemms} more GEMM(s) on their own range"
            record.streams += len(moved)
    return split
