"""The baseline "what a user gets today": ExecuTorch's stock PT2E flow with ``XNNPACKQuantizer``.

``torch.export`` -> torchao ``prepare_pt2e`` with ``XNNPACKQuantizer().set_global(get_symmetric_quantization_config(
...))`` -> calibration -> ``convert_pt2e``. Nothing of our own calibration is used: the quantizer picks what it
annotates (linear, conv, add, mul, cat, adaptive avgpool, plus view-like ops that share their producer's qparams),
activations use its ``HistogramObserver`` (per-tensor affine), weights its min-max observer (symmetric, per channel
or per tensor). Attention matmuls (``bmm``), softmax, GELU, ``rsqrt``/``sub`` and the embedding stay in float.

Bit widths other than 8 are the same config with narrower ``qmin``/``qmax`` (stored in int8), the way a user would
try W4A4 with the stock quantizer. Note that its ``HistogramObserver`` searches the clipping range for 256 levels
whatever ``quant_min``/``quant_max`` say (its ``dst_nbins`` comes from the dtype), so below 8 bits the activation
ranges are the 8-bit-optimal ones, rounded to the coarser grid: that is the stock behaviour this baseline measures.

Measured on the embedded lavt-tiny (3 ShapesRef calibration pairs, 32 val pairs): even W8A8 keeps 97% of pixels'
argmax but predicts no foreground at all (IoU with the float masks 0, logit correlation ~0). Bisection with filtered
quantizers puts the damage in the PWAM fusion: its attention adds an additive -1e4 word mask through a quantized
``add``, whose single per-tensor scale (~40) rounds every real score to 0 (excluding just that add brings the IoU
back to 0.35); the rest comes from PWAM's wide element-wise products and InstanceNorm-as-mean/mul. The text encoder
alone costs less (IoU 0.37 when only it is quantized); Swin blocks and the decoder alone are harmless (IoU >= 0.97).
Here LayerNorm is written as mean/sub/rsqrt/mul (see ``quantize.models.layers``), so its ``mean``/``mul``/``add``
are quantized too; only ``sub`` and ``rsqrt`` stay float.

The returned module is the converted ``GraphModule`` (q/dq reference representation): it computes the quantized
model's output in PyTorch and is the module one would lower to XNNPACK. It is exported with a dynamic batch
dimension, so it accepts any batch size; :attr:`StockQuantSummary.dynamic_batch` says so, and the summary of what was
quantized is attached as ``module.stock_summary``. Its forward is ~2-3x the float model's in eager PyTorch (the
decomposed q/dq ops dominate): batch 32 of lavt-tiny ~1.5 s vs 0.7 s float on one busy core. Run it with
``torch.set_num_threads(1)`` on a small shared machine: with 2 intra-op threads on a busy 2-core box the thousands of
small ops spin-wait and the same forward took 72 s.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["MAX_BITS", "MIN_BITS", "StockQuantSummary", "quantized_op_summary", "stock_xnnpack_quantize"]

logger = logging.getLogger(__name__)

MIN_BITS, MAX_BITS = 2, 8
_MAX_BATCH = 4096
_ANNOTATION_KEY = "quantization_annotation"
# Graph bookkeeping, not computation: left out of the per-op summary.
_IGNORED_OPS = {
    "quantize_per_tensor",
    "dequantize_per_tensor",
    "quantize_per_channel",
    "dequantize_per_channel",
    "choose_qparams",
    "_assert_tensor_metadata",
    "sym_size",
    "sym_constrain_range_for_size",
}


@dataclass(frozen=True)
class StockQuantSummary:
    """What the stock flow quantized: per aten op name, ``(quantized, total)`` node counts.

    An op counts as quantized when ``XNNPACKQuantizer`` annotated it, i.e. it got q/dq on its inputs and/or output
    (view-like ops such as ``reshape`` or ``mean`` are annotated by propagation and share their producer's qparams).
    """

    weight_bits: int
    act_bits: int
    per_channel: bool
    dynamic_batch: bool
    calibration_batches: int
    ops: dict[str, tuple[int, int]] = field(default_factory=dict)

    def quantized(self, op: str) -> int:
        return self.ops.get(op, (0, 0))[0]

    def total(self, op: str) -> int:
        return self.ops.get(op, (0, 0))[1]

    def float_ops(self) -> dict[str, int]:
        """Op types with at least one node left in float, and how many."""
        return {k: t - q for k, (q, t) in self.ops.items() if t > q}

    def table(self) -> str:
        """One line per op type, ``op  quantized/total``, sorted by name."""
        width = max((len(k) for k in self.ops), default=2)
        return "\n".join(f"{k:<{width}}  {q}/{t}" for k, (q, t) in sorted(self.ops.items()))


def _op_name(target: object) -> str | None:
    """``torch.ops.aten.linear.default`` -> ``linear``; None for Python builtins on SymInts."""
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return None


def quantized_op_summary(gm: torch.fx.GraphModule) -> dict[str, tuple[int, int]]:
    """``{op: (annotated, total)}`` over the call_function nodes of a prepared or converted PT2E graph."""
    quantized: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name is None or name in _IGNORED_OPS:
            continue
        total[name] += 1
        annotation = node.meta.get(_ANNOTATION_KEY)
        if annotation is not None and getattr(annotation, "_annotated", False):
            quantized[name] += 1
    return {k: (quantized[k], total[k]) for k in sorted(total)}


def _check_bits(name: str, bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{name} must be an integer from {MIN_BITS} to {MAX_BITS} (XNNPACKQuantizer stores int8), got {bits!r}"
        )
    return bits


def _check_inputs(calibration_inputs: list[tuple[Tensor, ...]]) -> list[tuple[Tensor, ...]]:
    inputs = list(calibration_inputs)
    if not inputs:
        raise ValueError("calibration_inputs is empty: give at least one (image, input_ids, attention_mask) tuple")
    arity = len(inputs[0])
    for i, example in enumerate(inputs):
        if not isinstance(example, (tuple, list)) or not all(isinstance(t, Tensor) for t in example):
            raise ValueError(f"calibration_inputs[{i}] must be a tuple of tensors, got {type(example).__name__}")
        if len(example) != arity:
            raise ValueError(f"calibration_inputs[{i}] has {len(example)} tensors, the first has {arity}")
        sizes = {t.shape[0] if t.dim() else None for t in example}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"calibration_inputs[{i}]: every tensor needs the same leading batch dim, got {sizes}")
    return [tuple(example) for example in inputs]


def _export(model: nn.Module, example: tuple[Tensor, ...], dynamic_batch: bool) -> tuple[torch.fx.GraphModule, bool]:
    """Export with a dynamic batch dim (falling back to the example's fixed batch if export refuses)."""
    if dynamic_batch:
        # A batch of 1 would be specialised by export: trace with at least 2 (repeating the example).
        batch = example[0].shape[0]
        traced = example if batch >= 2 else tuple(t.repeat(2, *([1] * (t.dim() - 1))) for t in example)
        dim = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
        try:
            ep = torch.export.export(model, traced, dynamic_shapes=tuple({0: dim} for _ in traced))
            return ep.module(), True
        except Exception as e:  # noqa: BLE001 - any export failure falls back to fixed shapes
            logger.warning("export with a dynamic batch dim failed (%s); exporting with batch %d", e, batch)
    return torch.export.export(model, example).module(), False


def stock_xnnpack_quantize(
    model: nn.Module,
    calibration_inputs: list[tuple[Tensor, Tensor, Tensor]],
    weight_bits: int,
    act_bits: int,
    per_channel: bool = True,
    *,
    dynamic_batch: bool = True,
) -> torch.fx.GraphModule:
    """Quantize ``model`` with ExecuTorch's stock ``XNNPACKQuantizer`` PT2E flow; return the converted module.

    Args:
        model: the float model (put in eval mode here; it is not modified).
        calibration_inputs: positional-argument tuples, e.g. ``(image (B,3,H,W), input_ids (B,T), mask (B,T))``,
            each run once through the observed model, in order (the observers see each tuple as one batch).
        weight_bits: 2..8; weights symmetric in ``[-(2^(b-1)-1), 2^(b-1)-1]`` (zero point 0, as XNNPACK needs).
        act_bits: 2..8; activations per-tensor affine in ``[-2^(b-1), 2^(b-1)-1]``.
        per_channel: per-output-channel weight scales (else one per tensor).
        dynamic_batch: export with a dynamic batch dim (default), so the result takes any batch size; False (or an
            export failure) fixes the batch to the first tuple's, and every tuple must then have that batch.

    Returns:
        The converted ``torch.fx.GraphModule`` (q/dq ops around the annotated ops, int8 weights dequantized in the
        graph), traced in eval mode, with ``.stock_summary``: a :class:`StockQuantSummary` of what was quantized.

    Raises:
        ValueError: bits outside 2..8, or malformed calibration inputs.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    weight_bits = _check_bits("weight_bits", weight_bits)
    act_bits = _check_bits("act_bits", act_bits)
    inputs = _check_inputs(calibration_inputs)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            gm, dynamic = _export(model, inputs[0], dynamic_batch)
    finally:
        model.train(was_training)
    if not dynamic:
        batch = inputs[0][0].shape[0]
        if any(example[0].shape[0] != batch for example in inputs):
            raise ValueError(f"fixed-batch export: every calibration tuple must have batch {batch}")

    config = get_symmetric_quantization_config(
        is_per_channel=per_channel,
        act_qmin=-(2 ** (act_bits - 1)),
        act_qmax=2 ** (act_bits - 1) - 1,
        weight_qmin=-(2 ** (weight_bits - 1) - 1),
        weight_qmax=2 ** (weight_bits - 1) - 1,
    )
    prepared = prepare_pt2e(gm, XNNPACKQuantizer().set_global(config))
    with torch.no_grad():
        for example in inputs:
            prepared(*example)
    converted = convert_pt2e(prepared)
    # Export ran in eval mode, so dropout is already gone from the graph; exported modules refuse .eval() unless
    # told to accept it, and every evaluation loop calls it.
    allow_exported_model_train_eval(converted)
    converted.stock_summary = StockQuantSummary(
        weight_bits=weight_bits,
        act_bits=act_bits,
        per_channel=per_channel,
        dynamic_batch=dynamic,
        calibration_batches=len(inputs),
        ops=quantized_op_summary(converted),
    )
    return converted
