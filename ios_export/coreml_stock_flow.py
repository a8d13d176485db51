"""The iPhone baseline "what a Core ML user gets today": coremltools' own W8A8 recipe on the float model.

Nothing of our own calibration is used. Route: ``torch.export`` → ``prepare_pt2e`` with ``CoreMLQuantizer`` configured
by coremltools' ``LinearQuantizerConfig`` (its defaults: symmetric scheme, int8 per-channel weights, uint8
per-tensor activations, moving-average min/max observers, Core ML's own choice of what to quantize: conv, linear,
matmul, add, mul, pooling and their activations) → calibration on the given pairs → ``convert_pt2e`` →
``ct.convert`` (minimum deployment target iOS17, the first with activation quantization; fp16 compute precision,
coremltools' default for ML programs) → ``coremltools.optimize.coreml.linear_quantize_weights`` (``linear_symmetric``,
its defaults) for the large weights the quantizer leaves in float (the word-embedding table above all),
as coremltools' guide recommends after activation quantization. As in coremltools' calibration-based PTQ recipe
(``LinearQuantizer`` with milestones ``[0, N, N, 0]``), the observers record ranges while fake quantization stays off.

Why this route, among coremltools 9's public ones:

* ``coremltools.optimize.coreml.experimental.linear_quantize_activations`` calibrates by running the model with
  ``MLModel.predict``, which exists only on macOS; here it stops with ``Exception: Model prediction is only supported
  on macOS version 10.13 or later.``
* ``coremltools.optimize.torch.quantization.LinearQuantizer`` traces the model with ``torch.fx`` symbolic tracing,
  which LAVT's shape-dependent code defeats: ``TypeError: slice indices must be integers or None or have an
  __index__ method`` (BERT's ``position_ids[:, :n]``), and with the embeddings marked non-traceable, ``TraceError:
  symbolically traced variables cannot be used as inputs to control flow`` (Swin's input-size check, called as a
  method, so no module can be marked non-traceable around it). ``PostTrainingQuantizer`` quantizes weights only.
* coremltools' own PT2E ``CoreMLQuantizer`` (``coremltools.optimize.torch.quantization._coreml_quantizer``) imports
  ``torch.ao.quantization.quantizer``, which this torch no longer has (``ModuleNotFoundError``). ExecuTorch's Core ML
  backend ships the same quantizer, ported to torchao's PT2E (``executorch.backends.apple.coreml.quantizer``): that is
  the one used, with coremltools' config.

Measured on the embedded lavt-tiny (64 calibration pairs of its W8A8 artifact; the package run by the MIL
interpreter on the first 200 ShapesRef val pairs): like the stock XNNPACK baseline, the package keeps 97% of pixels'
argmax but predicts no foreground (mIoU 0.0 vs 97.5 for the float model); the converted PT2E graph does the same in
PyTorch (mIoU 0.0 on 50 pairs), so it is the quantization, not Core ML. Weights: 27.2 MB vs 53.9 MB fp16 /
107.7 MB fp32. Building takes ~2.5 min on one CPU core; ~50 s of CPU of any build is ``CoreMLQuantizer``'s pattern
matching (it exports each of its ~400 patterns), whatever the model's size.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["INPUT_NAMES", "build_coreml_stock_w8a8", "quantization_op_counts"]

INPUT_NAMES = ("image", "input_ids", "attention_mask")
_QUANT_OPS = ("quantize", "dequantize", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")


def _stock_pt2e(model: torch.nn.Module, calib: Sequence[tuple[torch.Tensor, ...]]) -> torch.nn.Module:
    """The converted PT2E graph: coremltools' default ``LinearQuantizerConfig``, calibrated on ``calib``."""
    from coremltools.optimize.torch.quantization import LinearQuantizerConfig, ModuleLinearQuantizerConfig
    from executorch.backends.apple.coreml.quantizer import CoreMLQuantizer
    from torchao.quantization.pt2e.fake_quantize import disable_fake_quant, enable_observer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = LinearQuantizerConfig(global_config=ModuleLinearQuantizerConfig(quantization_scheme="symmetric"))
    graph = torch.export.export(model.eval(), tuple(calib[0])).module()
    prepared = prepare_pt2e(graph, CoreMLQuantizer(config))
    # Post-training calibration: observe the float activations without simulating quantization on the way.
    prepared.apply(enable_observer)
    prepared.apply(disable_fake_quant)
    with torch.no_grad():
        for pair in calib:
            prepared(*pair)
    return convert_pt2e(prepared)


def build_coreml_stock_w8a8(
    model: torch.nn.Module,
    calib: Sequence[tuple[torch.Tensor, ...]],
    out_path: str | Path,
    target: str = "iOS17",
    log=None,
) -> Path:
    """coremltools' stock W8A8 of ``model`` (``forward(image, input_ids, attention_mask) -> logits``), calibrated on
    ``calib`` (batch-1 ``(image, input_ids, attention_mask)`` tuples), written atomically as the ``.mlpackage``
    ``out_path`` (built under a temporary name, renamed when complete). Token inputs are declared int32 and the
    output float32 ``logits``, as in :mod:`ios_export.export_coreml`. Returns ``out_path``; any failure is raised."""
    import coremltools as ct
    import coremltools.optimize as cto

    from quantize.atomic import atomic_folder
    from quantize.errors import UserError
    from quantize.file_kinds import is_mlpackage

    out_path = Path(out_path)
    if out_path.suffix != ".mlpackage":
        raise UserError(f"out_path must name a .mlpackage, got {out_path}")
    if not calib:
        raise UserError("the stock Core ML flow needs at least one calibration pair")
    if target not in ("iOS17", "iOS18"):
        raise UserError(
            f"activation quantization needs Core ML for iOS17 or later: choose iOS17 or iOS18, not {target}"
        )
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    example = tuple(calib[0])
    if len(example) != len(INPUT_NAMES):
        raise UserError(f"calibration pairs must be ({', '.join(INPUT_NAMES)}), got {len(example)} tensors")
    converted = _stock_pt2e(model, calib)
    say(f"calibrated on {len(calib)} pairs in {time.perf_counter() - start:.0f} s; converting ...")
    inputs = [
        ct.TensorType(name=name, shape=tuple(x.shape), dtype=np.float32 if x.is_floating_point() else np.int32)
        for name, x in zip(INPUT_NAMES, example)
    ]
    # Core ML refuses the training dialect; the default decompositions break torch.roll (fmod), so none are run.
    exported = torch.export.export(converted, example).run_decompositions({})
    mlmodel = ct.convert(
        exported,
        inputs=inputs,
        outputs=[ct.TensorType(name="logits", dtype=np.float32)],
        minimum_deployment_target=getattr(ct.target, target),
        compute_precision=ct.precision.FLOAT16,  # ct.convert's default for an ML program
        skip_model_load=True,  # nothing can load a Core ML model off macOS
    )
    weights = cto.coreml.OptimizationConfig(global_config=cto.coreml.OpLinearQuantizerConfig(mode="linear_symmetric"))
    mlmodel = cto.coreml.linear_quantize_weights(mlmodel, config=weights)
    mlmodel.short_description = "coremltools stock W8A8 (CoreMLQuantizer PT2E + linear_quantize_weights), fp16 compute"
    with atomic_folder(out_path, recognise=is_mlpackage) as tmp:
        mlmodel.save(str(tmp))
    say(f"wrote {out_path} in {time.perf_counter() - start:.0f} s")
    return out_path


def quantization_op_counts(package: str | Path) -> dict[str, int]:
    """How many activation ``quantize``/``dequantize`` and constexpr weight ops a saved package's main function holds,
    and the storage dtypes of its constexpr weights (``weight_dtypes``)."""
    from .mil_interpreter import load_program

    ops = load_program(package).functions["main"].operations
    counts = Counter(op.op_type for op in ops if op.op_type in _QUANT_OPS)
    dtypes: Counter[str] = Counter()
    for op in ops:
        if op.op_type.startswith("constexpr_"):
            data = op.inputs.get("quantized_data", op.inputs.get("data"))
            dtypes[str(np.asarray(data.val).dtype)] += 1
    return {**{name: counts.get(name, 0) for name in _QUANT_OPS}, "weight_dtypes": dict(dtypes)}
