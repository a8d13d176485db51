"""From a calibrated artifact to ExecuTorch ``.pte`` programs on the XNNPACK delegate.

The flow, once per program (the full model, or one stage of it):

1. :func:`~quantize.deploy.graph.calibrated_graph`: the calibrated model rewritten as integer-op streams and converted
   to the annotated PT2E graph both backends consume (calibrated grids fixed, GEMM output ranges observed on the
   calibration pairs);
2. ``torch.export`` of the converted graph → ``to_edge_transform_and_lower`` with ``XnnpackPartitioner`` →
   ``to_executorch`` (the 8-bit word table fused into ``embedding_byte`` by ``do_quant_fusion_and_const_prop``) → an
   atomic write.

The float program takes the same path without step 1 (:func:`~quantize.deploy.stages.float_stage`), so the two differ
only in quantization.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantize.atomic import write_atomic
from quantize.deploy.deploy_form import SiteLowering
from quantize.deploy.graph import TABLE_8BIT, TableFormat, calibrated_graph, calibration_inputs, table_format
from quantize.deploy.stages import STAGES, float_stage, stage_inputs
from quantize.errors import UserError

__all__ = ["ExportResult", "export_artifact", "export_program", "merge_reports", "program_paths"]


@dataclass
class ExportResult:
    """A lowered program and what the lowering report needs to know about it."""

    stage: str
    quantized: bool
    buffer: bytes
    seconds: dict[str, float] = field(default_factory=dict)
    sites: list[SiteLowering] = field(default_factory=list)
    delegation: dict = field(default_factory=dict)
    input_shapes: list[list[int]] = field(default_factory=list)


def export_program(
    calibrated: nn.Module,
    stage: str,
    example: tuple[torch.Tensor, ...],
    calib: list[tuple[torch.Tensor, ...]] | None,
    quantized: bool = True,
    output_observer: str = "histogram",
    table: TableFormat = TABLE_8BIT,
    split_outputs: bool = True,
) -> ExportResult:
    """Lower one program of a calibrated model (or, with ``quantized=False``, of its float weights) to a ``.pte``."""
    import executorch.kernels.quantized  # noqa: F401  (out variants of the int8 embedding ops)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    from .lowering_report import delegation_summary

    result = ExportResult(stage, quantized, b"", input_shapes=[list(x.shape) for x in example])
    if quantized:
        if not calib:
            raise UserError("a quantized program needs calibration pairs to observe its GEMM output ranges")
        module, result.sites, result.seconds = calibrated_graph(
            calibrated, stage, example, calib, output_observer, table, split_outputs
        )
    else:
        module = float_stage(calibrated, stage)
    t = time.perf_counter()
    exported = torch.export.export(module, example)
    result.seconds["export_lowered"] = time.perf_counter() - t
    t = time.perf_counter()
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    result.seconds["lower"] = time.perf_counter() - t
    t = time.perf_counter()
    program = edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True))
    result.buffer = program.buffer
    result.seconds["serialize"] = time.perf_counter() - t
    # Counted on the final program: constant propagation has removed the ops that only touched weights.
    result.delegation = delegation_summary(program.exported_program().graph_module)
    return result


def program_paths(out: Path) -> dict[str, Path]:
    """Where ``export-pte --out model.pte`` puts each program: the full model at ``out``, stages and float beside it."""
    stem = out.with_suffix("")
    paths = {"full": out}
    for stage in STAGES:
        if stage != "full":
            paths[stage] = stem.with_name(f"{stem.name}.{stage}.pte")
    paths["float"] = stem.with_name(f"{stem.name}.float.pte")
    paths["report"] = stem.with_name(f"{stem.name}.lowering.json")
    return paths


def export_artifact(
    quantized_dir: str | Path,
    out: str | Path,
    stages: tuple[str, ...] = ("full", "text", "visual"),
    float_program: bool = True,
    calib_pairs: int = 32,
    kernels: bool = True,
    output_observer: str = "histogram",
    split_outputs: bool = True,
    report_path: str | Path | None = None,
    log=print,
) -> dict:
    """Export the programs of a calibrated artifact and write the lowering report; returns the report.

    Args:
        quantized_dir: a folder written by ``ptq4ris calibrate``.
        out: the full model's ``.pte``; stage programs, the float program and the report go beside it.
        stages: quantized programs to export: any of ``full``, ``text``, ``visual``.
        float_program: also export the float model (full) for comparison.
        calib_pairs: calibration pairs for the output ranges (the first of the artifact's calibration set).
        kernels: run each program once with ETDump and list the XNNPACK kernels that executed.
        output_observer: how GEMM output ranges are observed (``histogram`` or ``minmax``).
        split_outputs: give the massive output channels of a GEMM their own int8 output range.
        report_path: where to write the report of this export's programs alone. By default it goes to
            ``<name>.lowering.json`` beside ``out``, merged with the programs an earlier export of the same artifact
            left there (:func:`merge_reports`). Exports running side by side pass a path each and leave the merge to
            whoever started them: a read-merge-write of one shared file would race.
    """

    from quantize.calibration.artifact import load_quantized

    from .lowering_report import REPORT_VERSION, kernel_names, program_report

    out = Path(out)
    if out.suffix != ".pte":
        raise UserError(f"--out must name a .pte file, got {out}")
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise UserError(f"unknown stages {sorted(unknown)}: choose from {', '.join(STAGES)}")
    model, recipe, config = load_quantized(quantized_dir)
    calib = calibration_inputs(model, quantized_dir, calib_pairs)
    paths = program_paths(out)
    report = {
        "version": REPORT_VERSION,
        "artifact": str(quantized_dir),
        "recipe": {"method": recipe.method, "bits": recipe.bits},
        "output_observer": output_observer,
        "output_split": split_outputs,
        "programs": {},
    }
    jobs = [(stage, True) for stage in stages] + ([("full", False)] if float_program else [])
    for stage, quantized in jobs:
        name = stage if quantized else "float"
        pairs = [stage_inputs(model, stage, *pair) for pair in calib]
        log(f"exporting {name} program ...")
        result = export_program(
            model, stage, pairs[0], pairs, quantized, output_observer, table_format(recipe), split_outputs
        )
        write_atomic(paths[name], result.buffer)
        found = kernel_names(result.buffer, pairs[0]) if kernels else None
        report["programs"][name] = {"path": paths[name].name, **program_report(result, found)}
        log(
            f"  {paths[name]}: {len(result.buffer) / 1e6:.2f} MB, {result.delegation['partitions']} partition(s), "
            f"{sum(result.seconds.values()):.0f} s"
        )
        budget = config.get("bit_allocation", {}).get("budget_bytes")
        if budget and name == "full":
            # The allocation counts weights, scales and constants; the program adds its structure on top.
            report["budget_bytes"] = budget
            over = len(result.buffer) - budget
            log(
                f"  size budget {budget / 1e6:.2f} MB: the program is {abs(over) / 1e6:.2f} MB "
                + ("over it (its structure: operators and delegate graphs)" if over > 0 else "under it")
            )
    if report_path is not None:
        write_atomic(Path(report_path), json.dumps(report, indent=2).encode())
        return report
    if paths["report"].is_file():
        report = merge_reports(json.loads(paths["report"].read_text()), report, paths)
    write_atomic(paths["report"], json.dumps(report, indent=2).encode())
    return report


# Reports agree on these before their programs are merged: the same artifact, lowered the same way.
_SAME_LOWERING = ("artifact", "version", "output_observer", "output_split")


def merge_reports(earlier: dict, later: dict, paths: dict[str, Path]) -> dict:
    """``later`` with the programs of ``earlier`` it lacks, when both lowered the same artifact the same way and the
    program's file is still in ``paths`` (e.g. the full model exported before the stages); otherwise ``later``."""
    if any(earlier.get(k) != later.get(k) for k in _SAME_LOWERING):
        return later
    kept = {
        n: p
        for n, p in earlier.get("programs", {}).items()
        if n not in later["programs"] and n in paths and paths[n].is_file()
    }
    return {**later, "programs": {**kept, **later["programs"]}}
