"""From a calibrated artifact to ExecuTorch ``.pte`` programs on the XNNPACK delegate.

The flow, once per program (the full model, or one stage of it):

1. :func:`~mobile_runtime.deploy_form.to_deploy_form` rewrites the calibrated quantizers as integer-op streams;
2. ``torch.export`` → torchao ``prepare_pt2e`` with :class:`~mobile_runtime.calibrated_quantizer.CalibratedQuantizer`
   (calibrated grids fixed; GEMM output ranges observed on the calibration pairs) → ``convert_pt2e``: the one
   annotated PT2E graph both backends consume;
3. ``torch.export`` of the converted graph → ``to_edge_transform_and_lower`` with ``XnnpackPartitioner`` →
   ``to_executorch`` (the 8-bit word table fused into ``embedding_byte`` by ``do_quant_fusion_and_const_prop``) → an
   atomic write.

The float program takes the same path without step 2, so the two differ only in quantization.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantize.atomic import write_atomic
from quantize.calibration.placement import set_quantization

from .deploy_form import DeployMatMul, QuantStream, SiteLowering, to_deploy_form
from .output_split import split_output_outliers
from quantize.errors import MissingFileError, UserError

__all__ = ["STAGES", "ExportResult", "Stage", "calibrated_graph", "export_program", "stage_inputs"]


class Stage(nn.Module):
    """One program's worth of LAVT: ``full`` (image + ids → mask logits), ``text`` (ids → word features) or
    ``visual`` (image + word features → mask logits: Swin, PWAM fusion and the decoder)."""

    def __init__(self, model: nn.Module, stage: str) -> None:
        super().__init__()
        if stage not in STAGES:
            raise UserError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
        self.model, self.stage = model, stage

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.stage == "full":
            return self.model(*inputs)
        if self.stage == "text":
            return self.model.encode_text(*inputs)
        return self.model.forward_with_text_features(*inputs)


# Program inputs, in order: what a runtime must feed each stage.
STAGES: dict[str, tuple[str, ...]] = {
    "full": ("image", "input_ids", "attention_mask"),
    "text": ("input_ids", "attention_mask"),
    "visual": ("image", "text_features", "attention_mask"),
}


def _in_stage(name: str, stage: str) -> bool:
    text = name.startswith("model.text_encoder.")
    return stage == "full" or (stage == "text") == text


def stage_inputs(model: nn.Module, stage: str, images, input_ids, attention_mask) -> tuple[torch.Tensor, ...]:
    """The inputs of ``stage`` for a batch of pairs (word features come from ``model``'s own text encoder)."""
    if stage == "full":
        return images, input_ids, attention_mask
    if stage == "text":
        return input_ids, attention_mask
    with torch.no_grad():
        return images, model.encode_text(input_ids, attention_mask).contiguous(), attention_mask


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


def calibrated_graph(
    calibrated: nn.Module,
    stage: str,
    example: tuple[torch.Tensor, ...],
    calib: list[tuple[torch.Tensor, ...]],
    output_observer: str = "histogram",
    table_bits: int = 8,
    split_outputs: bool = True,
) -> tuple[torch.fx.GraphModule, list[SiteLowering], dict[str, float]]:
    """The converted PT2E graph of ``stage`` with the calibrated grids (the graph both backends lower).

    ``table_bits``: the word table in 8 bits (one scale per row) or 4 bits (symmetric, one scale per group of
    :data:`TABLE_GROUP` values; the W4 settings, where the 8-bit table would be 40% of the weights).
    ``split_outputs``: GEMMs whose outputs have a few massive channels put them on their own int8 output range
    (:mod:`~mobile_runtime.output_split`)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from .calibrated_quantizer import CalibratedQuantizer

    if table_bits not in (4, 8):
        raise UserError(f"table_bits must be 4 or 8, got {table_bits}")
    seconds = {}
    deploy, sites = to_deploy_form(calibrated)
    if table_bits == 4:
        _quantize_table_4bit(deploy)
    program = Stage(deploy, stage).eval()
    if split_outputs:
        split_output_outliers(program, calib, sites)
    t = time.perf_counter()
    graph = torch.export.export(program, example).module()
    seconds["export"] = time.perf_counter() - t
    t = time.perf_counter()
    sites_in_program = [n for n, m in program.named_modules() if isinstance(m, (QuantStream, DeployMatMul))]
    required = [n for n in sites_in_program if _in_stage(n, stage)]
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
    if table_bits == 4 and stage != "visual":
        tables.append(
            SiteLowering(
                "text_encoder.embeddings.word_embeddings",
                "embedding",
                "text",
                f"int4_group{TABLE_GROUP}",
                "4-bit table (embedding_4bit)",
                1,
                f"int4 per group of {TABLE_GROUP}",
            )
        )
    return converted, [s for s in sites if s.site in used] + tables, seconds


# Values per scale of the 4-bit word table: 32 keeps the table's error below the 4-bit weights' (one group of a row
# holds no outlier of another) for 1/8 of the table's bytes in fp32 scales.
TABLE_GROUP = 32


def _quantize_table_4bit(deploy: nn.Module) -> None:
    """The word table as torchao int4 groups, which ExecuTorch fuses into ``embedding_4bit`` and coremltools turns
    into an int4 constexpr lookup table."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    def is_table(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Embedding) and name.endswith("word_embeddings")

    for name, module in deploy.named_modules():
        if is_table(module, name):
            # padding_idx only shapes gradients, and ExecuTorch's embedding_4bit fusion matches the two-argument call.
            module.padding_idx = None
    quantize_(deploy, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(TABLE_GROUP)), is_table)


def export_program(
    calibrated: nn.Module,
    stage: str,
    example: tuple[torch.Tensor, ...],
    calib: list[tuple[torch.Tensor, ...]] | None,
    quantized: bool = True,
    output_observer: str = "histogram",
    table_bits: int = 8,
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
            calibrated, stage, example, calib, output_observer, table_bits, split_outputs
        )
    else:
        module = Stage(_float_copy(calibrated), stage).eval()
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


def _float_copy(calibrated: nn.Module) -> nn.Module:
    import copy

    model = copy.deepcopy(calibrated).eval()
    set_quantization(model, False)
    return model


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
    refer_root: str | Path = "data",
    stages: tuple[str, ...] = ("full", "text", "visual"),
    float_program: bool = True,
    calib_pairs: int = 32,
    kernels: bool = True,
    output_observer: str = "histogram",
    split_outputs: bool = True,
    log=print,
) -> dict:
    """Export the programs of a calibrated artifact and write the lowering report; returns the report.

    Args:
        quantized_dir: a folder written by ``ptq4ris calibrate``.
        out: the full model's ``.pte``; stage programs, the float program and the report go beside it.
        refer_root: where the artifact's calibration data lives (the GEMM output ranges are observed on it).
        stages: quantized programs to export: any of ``full``, ``text``, ``visual``.
        float_program: also export the float model (full) for comparison.
        calib_pairs: calibration pairs for the output ranges (the first of the artifact's calibration set).
        kernels: run each program once with ETDump and list the XNNPACK kernels that executed.
        output_observer: how GEMM output ranges are observed (``histogram`` or ``minmax``).
        split_outputs: give the massive output channels of a GEMM their own int8 output range.
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
    calib = _calibration_data(model, config, refer_root, calib_pairs)
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
            model, stage, pairs[0], pairs, quantized, output_observer, table_bits(recipe), split_outputs
        )
        write_atomic(paths[name], result.buffer)
        found = kernel_names(result.buffer, pairs[0]) if kernels else None
        report["programs"][name] = {"path": paths[name].name, **program_report(result, found)}
        log(
            f"  {paths[name]}: {len(result.buffer) / 1e6:.2f} MB, {result.delegation['partitions']} partition(s), "
            f"{sum(result.seconds.values()):.0f} s"
        )
    _merge_and_write_report(paths, report)
    return report


def _merge_and_write_report(paths: dict[str, Path], report: dict) -> None:
    """Write the lowering report, keeping programs exported earlier from the same artifact and settings (e.g. the
    full model before the stages). Exports of the same model's programs may run side by side (``ptq4ris demo`` lowers the
    stages in parallel), so the read-merge-write holds an exclusive lock on the folder."""
    import fcntl
    import json
    import os

    paths["report"].parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(paths["report"].parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        if paths["report"].is_file():
            earlier = json.loads(paths["report"].read_text())
            same = ("artifact", "version", "output_observer", "output_split")
            if all(earlier.get(k) == report[k] for k in same):
                kept = {
                    n: p for n, p in earlier["programs"].items() if n not in report["programs"] and paths[n].is_file()
                }
                report["programs"] = {**kept, **report["programs"]}
        write_atomic(paths["report"], json.dumps(report, indent=2).encode())
    finally:
        os.close(folder)  # releases the lock


def table_bits(recipe) -> int:
    """The word table's bits for a recipe: 4 with 4-bit weights (where an 8-bit table would dominate the file), else 8."""
    return 4 if recipe.weight_bits <= 4 else 8


def _calibration_data(model, config: dict, refer_root, pairs: int) -> list[tuple[torch.Tensor, ...]]:
    from quantize.calibration.calibrate import calibration_batch
    from quantize.data.preprocess import Tokenizer
    from quantize.data.refer import ReferDataset
    from quantize.models.registry import text_encoder_dir

    calib = config.get("calibration", {})
    dataset, split_by, split = (
        calib.get("dataset", "shapesref"),
        calib.get("split_by", "unc"),
        calib.get("split", "train"),
    )
    cfg = model.config
    try:
        data = ReferDataset(
            refer_root,
            dataset,
            split_by,
            split,
            Tokenizer(text_encoder_dir(), cfg.preprocess.max_tokens),
            cfg.swin.img_size,
        )
    except (FileNotFoundError, ValueError) as e:
        raise MissingFileError(
            f"export observes the int8 GEMM output ranges on the artifact's calibration data ({dataset} {split_by} "
            f"{split}) and could not read it under {refer_root}: {e}. Point --refer-root at it"
            + (
                f" or write it with `ptq4ris data synth --out {refer_root} --splits {split} val --{split}-scenes 64`"
                if dataset == "shapesref"
                else ""
            )
        ) from e
    # The pairs calibration used, everyday expressions included: their text GEMM outputs need covering ranges too.
    everyday = calib.get("everyday_expressions", 0)
    batch = calibration_batch(data, min(pairs, len({s.ref_id for s in data.samples})), everyday)
    return [
        (batch.images[i : i + 1], batch.input_ids[i : i + 1], batch.attention_mask[i : i + 1])
        for i in range(len(batch))
    ]
