"""From a calibrated artifact to Core ML packages (``.mlpackage``, ML program) for iPhone.

The quantized packages are converted from the same converted PT2E graph the ``.pte`` is lowered from
(:func:`quantize.deploy.graph.calibrated_graph`), so both backends carry the same calibrated scales: activation
grids become Core ML ``quantize``/``dequantize`` ops, weights ``constexpr_blockwise_shift_scale`` ops over int8 data,
and 4-bit weights are re-typed to int4 (iOS18) by :mod:`ios_export.int4_weights`. The float package takes the same
path without quantization. Every package declares int32 token inputs and a float32 output whatever the compute
precision, and is written atomically.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from quantize.errors import UserError

__all__ = ["PRECISIONS", "TARGETS", "export_artifact", "export_package", "package_paths", "weight_bytes"]

TARGETS = ("iOS17", "iOS18")
PRECISIONS = ("fp16", "fp32")

_DESCRIPTIONS = {
    "image": "RGB image, float32 [1, 3, H, W], resized to the model's size and normalised with ImageNet mean/std",
    "input_ids": "WordPiece token ids, int32 [1, 20]: [CLS] sentence [SEP], padded with 0 (LAVT's 20-token limit)",
    "attention_mask": "int32 [1, 20]: 1 for real tokens, 0 for padding",
    "text_features": "float32 [1, 20, C]: the text encoder's word features (output of the text package)",
}
_OUTPUTS = {
    "full": ("logits", "mask logits, float32 [1, 2, H, W]: background/object; argmax over axis 1 is the mask"),
    "text": ("text_features", _DESCRIPTIONS["text_features"]),
    "visual": ("logits", "mask logits, float32 [1, 2, H, W]: background/object; argmax over axis 1 is the mask"),
}


def package_paths(out: Path) -> dict[str, Path]:
    """Where ``export-coreml --out model.mlpackage`` puts each package: stages and the float one beside it."""
    stem = out.with_suffix("")
    paths = {"full": out}
    for stage in ("text", "visual"):
        paths[stage] = stem.with_name(f"{stem.name}.{stage}.mlpackage")
    paths["float"] = stem.with_name(f"{stem.name}.float.mlpackage")
    paths["report"] = stem.with_name(f"{stem.name}.coreml.json")
    return paths


def weight_bytes(package: str | Path) -> int:
    """Bytes of a package's weight files (what the weights cost on the phone)."""
    weights = Path(package) / "Data" / "com.apple.CoreML" / "weights"
    return sum(f.stat().st_size for f in weights.rglob("*") if f.is_file())


def _metadata(mlmodel, stage: str, quantized: bool, recipe: dict | None, model_name: str, precision: str) -> None:
    from importlib.metadata import version

    what = {"full": "image + sentence → mask", "text": "text encoder", "visual": "vision encoder, fusion, decoder"}
    kind = f"PTQ4RIS {recipe['method']} {recipe['bits'].upper()}" if quantized and recipe else "float"
    mlmodel.author = "ptq4ris"
    mlmodel.license = "MIT (this package's code); the weights keep their own licence"
    mlmodel.version = version("ptq4ris")
    mlmodel.short_description = (
        f"{model_name} referring image segmentation ({what[stage]}), {kind}, {precision} compute precision. "
        "Exported by ptq4ris from the same calibration as the ExecuTorch program."
    )
    spec_inputs = [i.name for i in mlmodel.get_spec().description.input]
    for name in spec_inputs:
        mlmodel.input_description[name] = _DESCRIPTIONS.get(name, name)
    out_name, out_desc = _OUTPUTS[stage]
    mlmodel.output_description[out_name] = out_desc
    meta = {"ptq4ris.stage": stage, "ptq4ris.model": model_name, "ptq4ris.compute_precision": precision}
    if quantized and recipe:
        meta["ptq4ris.recipe"] = json.dumps(recipe, sort_keys=True)
    mlmodel.user_defined_metadata.update(meta)


def export_package(
    module: torch.nn.Module,
    stage: str,
    example: tuple[torch.Tensor, ...],
    target: str = "iOS18",
    precision: str = "fp16",
    int4_weights: bool = False,
):
    """Convert one program (a float ``Stage`` or a converted PT2E graph) to a Core ML ``MLModel``."""
    import coremltools as ct

    from quantize.deploy.stages import STAGES

    if target not in TARGETS:
        raise UserError(f"unknown --target {target!r}: choose {' or '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}: choose {' or '.join(PRECISIONS)}")
    if int4_weights and target != "iOS18":
        raise UserError("int4 weights need Core ML for iOS18: use --target iOS18 (or a W8 artifact for iOS17)")
    inputs = []
    for name, x in zip(STAGES[stage], example):
        dtype = np.float32 if x.dtype.is_floating_point else np.int32
        inputs.append(ct.TensorType(name=name, shape=tuple(x.shape), dtype=dtype))
    pipeline = ct.PassPipeline.DEFAULT
    if int4_weights:
        from . import int4_weights as _int4  # registers the pass

        pipeline.append_pass(_int4.PASS_NAME)
    # Core ML refuses the training dialect; the default decompositions break torch.roll (fmod), so none are run.
    exported = torch.export.export(module, example).run_decompositions({})
    return ct.convert(
        exported,
        inputs=inputs,
        outputs=[ct.TensorType(name=_OUTPUTS[stage][0], dtype=np.float32)],
        minimum_deployment_target=getattr(ct.target, target),
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        pass_pipeline=pipeline,
        skip_model_load=True,  # nothing can load a Core ML model off macOS; the interpreter checks it instead
    )


def export_artifact(
    quantized_dir: str | Path,
    out: str | Path,
    stages: tuple[str, ...] = ("full",),
    float_package: bool = True,
    target: str = "iOS18",
    precision: str = "fp16",
    calib_pairs: int = 32,
    output_observer: str = "histogram",
    split_outputs: bool = True,
    log=print,
) -> dict:
    """Export the Core ML packages of a calibrated artifact and write the export report; returns the report.

    Args:
        quantized_dir: a folder written by ``ptq4ris calibrate``.
        out: the full model's ``.mlpackage``; stage packages, the float package and the report go beside it.
        stages: quantized packages to export: any of ``full``, ``text``, ``visual``.
        float_package: also export the float model (full) for comparison.
        target: minimum deployment target (``iOS17``: int8 activations and weights; ``iOS18``: also int4 weights).
        precision: compute precision of the float ops (``fp16``, Core ML's default and the Neural Engine's, or
            ``fp32``).
        calib_pairs: calibration pairs for the GEMM output ranges.
        output_observer: how GEMM output ranges are observed (``histogram`` or ``minmax``).
        split_outputs: give the massive output channels of a GEMM their own int8 output range, as for the ``.pte``.
    """
    from quantize.atomic import atomic_folder, write_atomic
    from quantize.calibration.artifact import load_quantized
    from quantize.deploy.graph import calibrated_graph, calibration_inputs, table_format
    from quantize.deploy.stages import STAGES, float_stage, stage_inputs
    from quantize.file_kinds import is_mlpackage

    out = Path(out)
    if out.suffix != ".mlpackage":
        raise UserError(f"--out must name a .mlpackage, got {out}")
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise UserError(f"unknown stages {sorted(unknown)}: choose from {', '.join(STAGES)}")
    model, recipe, config = load_quantized(quantized_dir)
    int4 = recipe.min_weight_bits <= 4
    if int4 and target != "iOS18":
        raise UserError(
            f"{recipe.bits.upper()} stores its weights in int4, which Core ML supports from iOS18: use --target iOS18"
        )
    calib = calibration_inputs(model, quantized_dir, calib_pairs)
    paths = package_paths(out)
    recipe_info = {"method": recipe.method, "bits": recipe.bits}
    report = {
        "artifact": str(quantized_dir),
        "recipe": recipe_info,
        "target": target,
        "compute_precision": precision,
        "packages": {},
    }
    jobs = [(stage, True) for stage in stages] + ([("full", False)] if float_package else [])
    for stage, quantized in jobs:
        name = stage if quantized else "float"
        pairs = [stage_inputs(model, stage, *pair) for pair in calib]
        log(f"converting {name} package ...")
        t = time.perf_counter()
        if quantized:
            module, _, _ = calibrated_graph(
                model, stage, pairs[0], pairs, output_observer, table_format(recipe), split_outputs
            )
        else:
            module = float_stage(model, stage)
        mlmodel = export_package(module, stage, pairs[0], target, precision, int4_weights=int4 and quantized)
        _metadata(mlmodel, stage, quantized, recipe_info, config.get("model", "lavt"), precision)
        with atomic_folder(paths[name], recognise=is_mlpackage) as tmp:
            mlmodel.save(str(tmp))
        ops: dict[str, int] = {}
        for op in mlmodel._mil_program.functions["main"].operations:
            ops[op.op_type] = ops.get(op.op_type, 0) + 1
        report["packages"][name] = {
            "path": paths[name].name,
            "stage": stage,
            "quantized": quantized,
            "weight_bytes": weight_bytes(paths[name]),
            "seconds": round(time.perf_counter() - t, 1),
            "ops": dict(sorted(ops.items())),
        }
        log(f"  {paths[name]}: weights {report['packages'][name]['weight_bytes'] / 1e6:.2f} MB")
    write_atomic(paths["report"], json.dumps(report, indent=2).encode())
    return report
