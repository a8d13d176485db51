"""Quantizer primitives of PTQ4RIS, each with a plain reference (fake-quant) implementation: uniform affine grids,
dual-region quantization (DRQ) for post-softmax / post-GELU activations, and reorder-based outlier-retained
quantization (RORQ) for the text encoder."""

from .drq import drq_gelu_fake_quant, drq_softmax_fake_quant, search_drq_gelu, search_drq_softmax
from .rorq import ChannelGroups, RorqTiers, calibrate_channel_groups, calibrate_tiers
from .uniform import UniformSpec, fake_quantize, minmax_qparams, qrange

__all__ = [
    "UniformSpec",
    "qrange",
    "minmax_qparams",
    "fake_quantize",
    "drq_softmax_fake_quant",
    "search_drq_softmax",
    "drq_gelu_fake_quant",
    "search_drq_gelu",
    "RorqTiers",
    "calibrate_tiers",
    "ChannelGroups",
    "calibrate_channel_groups",
]
