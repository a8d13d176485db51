"""The calibrated graph: one stage of a calibrated model as the converted PT2E graph both backends lower.

1. :func:`~quantize.deploy.deploy_form.to_deploy_form` rewrites the calibrated quantizers as integer-op streams;
2. ``torch.export`` → torchao ``prepare_pt2e`` with :class:`~quantize.deploy.calibrated_quantizer.CalibratedQuantizer`
   (calibrated grids fixed; GEMM output ranges observed on the calibration pairs) → ``convert_pt2e``.

The ExecuTorch lowering (``mobile_runtime.export_pte``) and the Core ML conversion (``ios_export.export_coreml``) both
start from :func:`calibrated_graph`, so the two carry the same calibrated scales.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantize.errors import UserError
from quantize.models.roles import layer_roles

from .deploy_form import DeployMatMul, QuantStream, SiteLowering, to_deploy_form
from .output_split import split_output_outliers
from .stages import Stage, in_stage

__all__ = ["TABLE_8BIT", "TableFormat", "calibrated_graph", "calibration_inputs", "table_format"]


@dataclass(frozen=True)
class TableFormat:
    """How the word table is stored: 8 bits with one scale per row, or 4 bits with one float32 scale per ``group``
    values of a row."""

    bits: int = 8
    group: int = 0


TABLE_8BIT = TableFormat()


def calibrated_graph(
    calibrated: nn.Module,
    stage: str,
    example: tuple[torch.Tensor, ...],
    calib: list[tuple[torch.Tensor, ...]],
    output_observer: str = "histogram",
    table: TableFormat = TABLE_8BIT,
    split_outputs: bool = True,
) -> tuple[torch.fx.GraphModule, list[SiteLowering], dict[str, float]]:
    """The converted PT2E graph of ``stage`` with the calibrated grids (the graph both backends lower).

    ``table``: the word table in 8 bits (one scale per row) or 4 bits (symmetric, one scale per group of values of a
    row; the W4 settings, where the 8-bit table would be 40% of the weights).
    ``split_outputs``: GEMMs whose outputs have a few massive channels put them on their own int8 output range
    (:mod:`~quantize.deploy.output_split`)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from .calibrated_quantizer import CalibratedQuantizer

    if table.bits not in (4, 8):
        raise UserError(f"the word table is stored in 4 or 8 bits, not {table.bits}")
    seconds = {}
    roles = layer_roles(calibrated)
    deploy, sites = to_deploy_form(calibrated)
    if table.bits == 4:
        _quantize_table_4bit(deploy, roles.word_table, table.group)
    program = Stage(deploy, stage).eval()
    if split_outputs:
        split_output_outliers(program, calib, sites)
    t = time.perf_counter()
    graph = torch.export.export(program, example).module()
    seconds["export"] = time.perf_counter() - t
    t = time.perf_counter()
    sites_in_program = [n for n, m in program.named_modules() if isinstance(m, (QuantStream, DeployMatMul))]
    required = [n for n in sites_in_program if in_stage(n, stage, roles)]
    quantizer = CalibratedQuantizer(program, required=required, output_observer=output_observer)
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for inputs in calib:
            prepared(*inputs)
    converted = convert_pt2e(prepared)
    seconds["quantize"] = time.perf_counter() - t
    used = {
        s.site
        for s in sites
        if any(k.startswith(f"model.{s.site}.") or k == f"model.{s.site}" for k in quantizer.annotated)
    }
    tables = [
        SiteLowering(n, "embedding", "text", "uint8_per_row", "8-bit table (embedding_byte)", 1, "uint8 per row")
        for n in quantizer.embeddings
    ]
    if table.bits == 4 and stage != "visual":
        tables.append(
            SiteLowering(
                roles.word_table,
                "embedding",
                "text",
                f"int4_group{table.group}",
                "4-bit table (embedding_4bit)",
                1,
                f"int4 per group of {table.group}",
            )
        )
    return converted, [s for s in sites if s.site in used] + tables, seconds


def _quantize_table_4bit(deploy: nn.Module, word_table: str, group: int) -> None:
    """The word table (``word_table``, its module name) as torchao int4 groups, which ExecuTorch fuses into
    ``embedding_4bit`` and coremltools turns into an int4 constexpr lookup table."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    def is_table(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Embedding) and name == word_table

    for name, module in deploy.named_modules():
        if is_table(module, name):
            # padding_idx only shapes gradients, and ExecuTorch's embedding_4bit fusion matches the two-argument call.
            module.padding_idx = None
    quantize_(deploy, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)), is_table)


def table_format(recipe) -> TableFormat:
    """The word table's format for a recipe: its ``table_bits``, with ``table_group`` values per scale at 4 bits."""
    return TableFormat(recipe.table_bits, recipe.table_group if recipe.table_bits == 4 else 0)


def calibration_inputs(model: nn.Module, artifact: str | Path, pairs: int = 32) -> list[tuple[torch.Tensor, ...]]:
    """(image, input_ids, attention_mask) batches of one pair each, on which :func:`calibrated_graph` observes the
    GEMM output ranges: the first ``pairs`` split pairs the artifact was calibrated on, then its everyday expressions
    (their text GEMM outputs need covering ranges too), read from the inputs stored in the artifact, so export needs
    no data set."""
    from quantize.calibration.artifact import QuantizedArtifactError, load_calibration_inputs

    stored = load_calibration_inputs(artifact, model.config)
    if stored is None:
        raise QuantizedArtifactError(
            f"{artifact} stores no calibration inputs (it was saved without them): recalibrate it with "
            f"`ptq4ris calibrate --out {artifact}`"
        )
    manifest_everyday = _everyday_count(artifact)
    total = stored["images"].shape[0]
    split_pairs = total - manifest_everyday
    keep = list(range(min(pairs, split_pairs))) + list(range(split_pairs, total))
    return [
        (stored["images"][i : i + 1], stored["input_ids"][i : i + 1], stored["attention_mask"][i : i + 1])
        for i in keep
    ]


def _everyday_count(artifact: str | Path) -> int:
    import json

    config = json.loads((Path(artifact) / "config.json").read_text())
    return int(config.get("calibration", {}).get("everyday_expressions", 0))
