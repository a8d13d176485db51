"""The flows a user tries first, lowered to ``.pte`` the stock way, so that ``ptq4ris bench`` compares with them.

Each flow starts from the float model and the same calibration pairs as ours, uses only public ExecuTorch/torchao
APIs as their tutorials show them, and lowers with ``XnnpackPartitioner``:

- ``xnnpack-static-w8a8``: ``XNNPACKQuantizer`` with the symmetric per-channel static config (PT2E);
- ``xnnpack-dynamic-int8``: ``XNNPACKQuantizer`` with ``is_dynamic=True`` (int8 weights, activations quantized per
  run);
- ``torchao-8da4w``: torchao's ``quantize_`` with ``Int8DynamicActivationIntxWeightConfig`` (int4 weights in groups of
  32, dynamic int8 activations).

A flow that fails (at export, lowering or run time) is a result, not a crash: the bench reports how it failed.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the first flow, not with the names the command line lists
    import torch
    from torch import nn

__all__ = ["STOCK_FLOWS", "lower_stock_flow"]

STOCK_FLOWS: dict[str, str] = {
    "xnnpack-static-w8a8": "ExecuTorch XNNPACKQuantizer, static W8A8 per channel (PT2E)",
    "xnnpack-dynamic-int8": "ExecuTorch XNNPACKQuantizer, dynamic int8 (PT2E)",
    "torchao-8da4w": "torchao Int8DynamicActivationIntxWeightConfig, int4 weights / 32, dynamic int8",
}


def _static(model: nn.Module, calib: list[tuple[torch.Tensor, ...]]) -> torch.export.ExportedProgram:
    import torch

    from quantize.calibration.stock_xnnpack import stock_xnnpack_quantize

    converted = stock_xnnpack_quantize(model, calib, 8, 8, dynamic_batch=False)
    return torch.export.export(converted, calib[0])


def _dynamic(model: nn.Module, calib: list[tuple[torch.Tensor, ...]]) -> torch.export.ExportedProgram:
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = torch.export.export(model, calib[0]).module()
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
    prepared = prepare_pt2e(graph, XNNPACKQuantizer().set_global(config))
    for pair in calib:
        prepared(*pair)
    return torch.export.export(convert_pt2e(prepared), calib[0])


def _int8_dynamic_int4_weights(model: nn.Module, calib: list[tuple[torch.Tensor, ...]]) -> torch.export.ExportedProgram:
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    quantized = copy.deepcopy(model)
    quantize_(
        quantized, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
    )
    return torch.export.export(quantized, calib[0])


_FLOWS = {
    "xnnpack-static-w8a8": _static,
    "xnnpack-dynamic-int8": _dynamic,
    "torchao-8da4w": _int8_dynamic_int4_weights,
}


def lower_stock_flow(name: str, model: nn.Module, calib: list[tuple[torch.Tensor, ...]]) -> bytes:
    """The ``.pte`` bytes of stock flow ``name`` applied to ``model`` (float, eval) calibrated on ``calib`` (input
    tuples of batch 1, the program's shapes). Raises whatever the flow raises."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = model.eval()
    with torch.no_grad():
        exported = _FLOWS[name](model, calib)
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    return edge.to_executorch().buffer
