"""``ptq4ris``: one command line for the whole flow (data → model → evaluation; calibration and export follow).

Each subcommand parses its arguments and calls the Python API by keyword; the logic lives in the modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from quantize.errors import UserError

from .errors import debug_requested, one_line, run_guarded

__all__ = ["build_parser", "main"]

DEFAULT_DATA_ROOT = "data"


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's error policy: a mistake in the flags is one line and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def size_budget(text: str) -> tuple[float, str]:
    """``16.2`` (megabytes) or ``0.15x`` (a fraction of the float program): (value, "MB" | "x")."""
    from quantize.calibration.bit_allocation import parse_budget

    try:
        return parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _budget_text(text: str) -> str:
    """A --budget-size value checked as calibrate checks it, kept as written (it names the bench's cache entry)."""
    size_budget(text)
    return text.lower()


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _add_data_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write the ShapesRef benchmark in the refer layout",
        description="Generate ShapesRef, a deterministic synthetic referring-segmentation benchmark, in the same "
        "refer layout as RefCOCO (instances.json + refs(unc).p + images), so every later step runs the real "
        "RefCOCO code path. Reuses an existing copy with the same seed and sizes.",
    )
    p.add_argument("--out", default=DEFAULT_DATA_ROOT, help="refer root to write into (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="generator seed; same seed, same data (default: %(default)s)")
    p.add_argument(
        "--splits",
        nargs="+",
        default=["val", "testA", "testB"],
        choices=["train", "val", "testA", "testB"],
        help="splits to write (default: the evaluation splits; add train to train a model)",
    )
    for split, default in (("train", 40000), ("val", 800), ("testA", 300), ("testB", 300)):
        p.add_argument(
            f"--{split}-scenes",
            type=positive_int,
            default=default,
            help=f"scenes in {split} (default: %(default)s; ~2.6 expressions per scene)",
        )
    p.add_argument("--workers", type=positive_int, default=1, help="processes rendering scenes (default: %(default)s)")
    p.set_defaults(func=_run_data_synth)


def _run_data_synth(args: argparse.Namespace) -> int:
    from quantize.data.shapesref import check_shapesref_root, write_shapesref

    check_shapesref_root(args.out)
    counts = {s: getattr(args, f"{s}_scenes") for s in args.splits}
    root = write_shapesref(args.out, seed=args.seed, split_scenes=counts, workers=args.workers, progress=True)
    meta = json.loads((Path(root) / "shapesref" / "meta.json").read_text())
    print(f"ShapesRef written to {root}: {meta['refs']} refs, expressions per kind {meta['expressions_per_kind']}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train lavt-tiny on ShapesRef (text encoder frozen)",
        description="Train the embedded default model on ShapesRef's train split. Resumable: rerunning with the "
        "same --out continues from its checkpoint. Writes OUT/lavt-tiny.safetensors (non-text weights), "
        "OUT/training.json and OUT/train_log.jsonl.",
    )
    p.add_argument(
        "--data-root", default=DEFAULT_DATA_ROOT, help="refer root holding shapesref/ (default: %(default)s)"
    )
    p.add_argument("--out", required=True, help="output folder (checkpoints, weights, logs)")
    p.add_argument("--steps", type=positive_int, default=20000, help="optimiser steps (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="(default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument(
        "--max-minutes",
        type=positive_float,
        default=None,
        help="stop after this many minutes of training, annealing the learning rate to fit",
    )
    p.add_argument("--save-every", type=positive_int, default=1000, help="checkpoint interval in steps (default: %(default)s)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from quantize.devices import resolve_device

    resolve_device(args.device)  # before any model or data loads
    from quantize.outputs import check_output_folder
    from quantize.train import TRAINING_KIND, TrainConfig, train

    check_output_folder(args.out, "--out", TRAINING_KIND)
    cfg = TrainConfig(
        data_root=args.data_root,
        out_dir=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        max_minutes=args.max_minutes,
        save_every=args.save_every,
        resume=not args.no_resume,
    )
    weights = train(cfg)
    print(f"weights written to {weights}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="mIoU / oIoU / Prec@X of a model on a refer-layout split",
        description="Evaluate LAVT on RefCOCO, RefCOCO+, RefCOCOg or ShapesRef with LAVT's protocol: every "
        "sentence of every ref, IoU at the model resolution against the NEAREST-resized mask.",
    )
    p.add_argument(
        "--model", default="lavt-tiny", help="registered model name: lavt-tiny or lavt-b (default: %(default)s)"
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="official LAVT .pth or a .safetensors state dict; lavt-b needs it, lavt-tiny uses its "
        "embedded weights without it",
    )
    p.add_argument(
        "--quantized",
        default=None,
        metavar="DIR",
        help="evaluate the calibrated model of `ptq4ris calibrate --out DIR` (its simulated, fake-quantized form) "
        "instead of --model/--checkpoint",
    )
    _add_data_args(p)
    p.add_argument("--batch-size", type=positive_int, default=32, help="(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="(default: %(default)s)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N pairs")
    p.add_argument(
        "--shuffled-expressions",
        action="store_true",
        help="control run: pair each image with another sample's expression",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_run_evaluate)


def _add_data_args(p: argparse.ArgumentParser, split_flag: str = "--split", split_default: str = "val") -> None:
    p.add_argument("--refer-root", default=DEFAULT_DATA_ROOT, help="folder holding <dataset>/ (default: %(default)s)")
    p.add_argument(
        "--dataset",
        default="shapesref",
        choices=["refcoco", "refcoco+", "refcocog", "shapesref"],
        help="(default: %(default)s)",
    )
    p.add_argument("--split-by", default="unc", choices=["unc", "umd", "google"], help="(default: %(default)s)")
    p.add_argument(
        split_flag,
        dest="split",
        default=split_default,
        help="train, val, testA, testB or test (default: %(default)s)",
    )
    p.add_argument(
        "--image-dir",
        default=None,
        help="image folder (default: <refer-root>/images/mscoco/images/train2014, or "
        "<refer-root>/images/shapesref for ShapesRef)",
    )


def _dataset(args: argparse.Namespace, cfg):
    from quantize.data import open_split

    return open_split(args.refer_root, args.dataset, args.split_by, args.split, cfg, args.image_dir)


def _run_evaluate(args: argparse.Namespace) -> int:
    from quantize.devices import resolve_device

    resolve_device(args.device)  # before any model or data loads
    from quantize.evaluate import evaluate, format_table

    if args.quantized:
        from quantize.calibration.artifact import load_quantized

        model, recipe, _ = load_quantized(args.quantized)
        label = f"{args.quantized} ({recipe.method} {recipe.bits}, simulated)"
    else:
        from quantize.models.registry import build_model

        model = build_model(args.model, checkpoint=args.checkpoint)
        label = args.model
    dataset = _dataset(args, model.config)
    results = evaluate(
        model,
        dataset,
        batch_size=args.batch_size,
        device=args.device,
        shuffled_expressions=args.shuffled_expressions,
        limit=args.limit,
        progress=not args.json,
        shard=args.shard,
    )
    if not args.shard.is_main:
        return 0  # rank 0 reports the gathered figures
    results.update(model=label, dataset=args.dataset, split_by=args.split_by, split=args.split)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{label} on {args.dataset} ({args.split_by}) {args.split}")
        print(format_table(results))
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    from quantize.calibration.recipe import BIT_SETTINGS, METHOD_HELP, METHODS

    p = sub.add_parser(
        "calibrate",
        help="post-training quantization: calibrate a model and write the quantized model folder",
        description="Calibrate LAVT with PTQ4RIS (DRQ for post-softmax/post-GELU activations, RORQ for the text "
        "encoder, Hessian-guided scale search) or a baseline, on 32 (image, expression) pairs: the first "
        "expression of each of the first refs of --calib-split. Writes OUT/config.json, OUT/model.safetensors "
        "and OUT/qparams.json, which `ptq4ris evaluate --quantized OUT` and the exporters reload. The same seed and "
        "data give identical qparams. Methods: " + "; ".join(f"{name}: {METHOD_HELP[name]}" for name in METHODS) + ".",
    )
    p.add_argument("--model", default="lavt-tiny", help="registered model name (default: %(default)s)")
    p.add_argument("--checkpoint", default=None, help="official LAVT .pth or .safetensors (lavt-b needs it)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="randomly initialised weights instead of a checkpoint: useless masks, but the real graph, for timing "
        "calibration and export of lavt-b without its checkpoint",
    )
    p.add_argument(
        "--bits", default="w8a8", choices=list(BIT_SETTINGS), help="weight/activation bits (default: %(default)s)"
    )
    p.add_argument("--method", default="ptq4ris", choices=list(METHODS), help="(default: %(default)s)")
    p.add_argument(
        "--pwam",
        choices=["plain", "groups"],
        default=None,
        help="PWAM fusion treatment: one grid, or range-ordered channel groups (default: the method's)",
    )
    p.add_argument(
        "--text-groups",
        type=non_negative_int,
        default=None,
        help="RORQ channel groups per text Linear input for ptq4ris-deploy (each is one int8 GEMM once deployed) "
        "(default: 2 at A8, 8 below)",
    )
    p.add_argument(
        "--text-tiers",
        type=non_negative_int,
        default=None,
        help="ptq4ris-deploy: at most this many RORQ magnitude tiers per text Linear input; beyond the first, each "
        "tier is a residual slice on its own grid, one more int8 GEMM once deployed; 1: channel groups only "
        "(default: 1 at A8, 10 below)",
    )
    p.add_argument(
        "--pwam-groups",
        type=non_negative_int,
        default=None,
        help="channel groups of PWAM's fusion inputs with --pwam groups; 0 picks by bits (default: the method's: "
        "ptq4ris-deploy one grid at W8A8 and 16 groups otherwise, the others 16)",
    )
    p.add_argument(
        "--objective",
        choices=["hessian", "mse", "cosine", "none"],
        default=None,
        help="scale-search objective for searched methods; none keeps the min-max ranges (the method's structure "
        "without its search, e.g. to time an export) (default: hessian)",
    )
    p.add_argument(
        "--weights",
        choices=["nearest", "gptq", "auto"],
        default=None,
        help="weight rounding onto the searched grids: nearest level, or GPTQ (error spread through the inverse "
        "Hessian of the layer's quantized inputs; the exported integers are the simulated ones); auto: GPTQ below "
        "8-bit weights (default: the method's: auto for ptq4ris-deploy, nearest for the others)",
    )
    p.add_argument(
        "--bias-correction",
        action="store_true",
        help="after rounding, add each layer's mean output error on the calibration pairs to its bias (an ablation: it "
        "lowered mIoU on lavt-tiny, see docs/results.md)",
    )
    p.add_argument(
        "--budget-size",
        type=size_budget,
        default=None,
        metavar="MB|Fx",
        help="mixed precision under a size budget for the Android program's weights, scales and constants (the .pte "
        "adds its structure, about 0.7 MB on lavt-tiny), in megabytes (17.5) or as a fraction of the float program "
        "(0.16x): the layers whose 4-bit weights cost the mask logits most per byte keep 8 bits, as many as fit; "
        "needs 4-bit weights in --bits (the setting of the other layers)",
    )
    p.add_argument(
        "--gelu-pow2",
        action="store_true",
        help="DRQ post-GELU: restrict the positive step to 2^k times the negative one (PTQ4ViT's requirement)",
    )
    p.add_argument(
        "--refresh",
        choices=["block", "layer"],
        default="block",
        help="recompute inputs and gradients before every block (fast) or every layer (PTQ4ViT; ~5x slower) "
        "(default: %(default)s)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the quantized model into")
    _add_data_args(p, "--calib-split", "train")
    p.add_argument("--calib-size", type=positive_int, default=32, help="calibration pairs, one per ref (default: %(default)s)")
    p.add_argument(
        "--everyday-expressions",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="also calibrate on N built-in everyday referring expressions (RefCOCO style), each paired with a "
        "calibration image, so the text encoder's grids cover words the calibration split lacks; 0 calibrates on "
        "the split's pairs only (default: all 32 at 8-bit activations, 0 below, where the wider ranges cost accuracy)",
    )
    p.add_argument("--seed", type=int, default=0, help="row-sampling seed (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument(
        "--float64",
        action="store_true",
        help="calibrate in float64: the same qparams on every machine (compare the qparams_digest in the manifest), "
        "at several times the time",
    )
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=32,
        help="calibration pairs per forward/backward; lower it for lavt-b on a small GPU (default: %(default)s)",
    )
    p.set_defaults(func=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from quantize.devices import resolve_device

    resolve_device(args.device)  # before any model or data loads
    from quantize.calibration.artifact import check_artifact_output, save_quantized
    from quantize.calibration.calibrate import calibrate, calibration_batch, calibration_record, default_everyday
    from quantize.calibration.recipe import make_recipe
    from quantize.models.registry import build_model

    overrides = {"seed": args.seed, "gelu_pow2": args.gelu_pow2, "refresh": args.refresh}
    if args.pwam:
        overrides["pwam"] = args.pwam
    if args.text_groups is not None:
        overrides["text_groups"] = args.text_groups
    if args.pwam_groups is not None:
        overrides["pwam_groups"] = args.pwam_groups
    if args.text_tiers is not None:
        overrides["text_tiers"] = args.text_tiers
    if args.weights:
        overrides["weights"] = args.weights
    if args.bias_correction:
        overrides["bias_correction"] = True
    check_artifact_output(args.out)
    recipe = make_recipe(args.method, args.bits, **overrides)
    if args.objective and recipe.search != "none":
        recipe = make_recipe(args.method, args.bits, **overrides, search=args.objective)
    if args.random_weights and args.checkpoint:
        raise UserError("--random-weights and --checkpoint exclude each other: drop one")
    model = build_model(args.model, checkpoint=args.checkpoint, pretrained=not args.random_weights)
    if args.budget_size:  # checked against what the model's programs can be, before any data is read
        from quantize.calibration.bit_allocation import budget_bytes

        budget = budget_bytes(args.budget_size, model, recipe)
    else:
        budget = None
    dataset = _dataset(args, model.config)  # a split it cannot read raises with the fix (open_split)
    batch = calibration_batch(dataset, args.calib_size, default_everyday(recipe, args.everyday_expressions))
    import torch

    allocation = None
    if budget is not None:
        from quantize.calibration.bit_allocation import SENSITIVITY_PAIRS, allocate_weight_bits

        sample = batch.spread(SENSITIVITY_PAIRS).chunks(args.chunk_size, args.device)
        recipe, allocation = allocate_weight_bits(model, recipe, sample, budget, progress=True)
        print(
            f"bit allocation: {len(allocation.high_layers)} of {len(allocation.layers)} layers keep "
            f"{allocation.high_bits}-bit weights; program weights {allocation.estimated_bytes / 1e6:.2f} MB of a "
            f"{budget / 1e6:.2f} MB budget (all {allocation.low_bits}-bit: {allocation.low_program_bytes / 1e6:.2f}, "
            f"all {allocation.high_bits}-bit: {allocation.high_program_bytes / 1e6:.2f})"
        )
    dtype = torch.float64 if args.float64 else None
    quantized, report = calibrate(
        model, recipe, batch, chunk_size=args.chunk_size, device=args.device, progress=True, dtype=dtype
    )
    extra = {"calibration": calibration_record(dataset, batch, report)}
    if allocation is not None:
        extra["bit_allocation"] = allocation.to_dict()
    out = save_quantized(quantized.cpu(), recipe, args.out, args.model, extra, calibration_inputs=batch)
    print(
        f"{recipe.method} {recipe.bits}: {report.sites} quantized layers calibrated in {report.seconds:.1f} s "
        f"on {len(batch)} pairs of {args.dataset} {args.split} ({batch.description}); written to {out}"
    )
    return 0


def _add_export_args(p: argparse.ArgumentParser, kind: str, suffix: str, stages: list[str]) -> None:
    """Arguments export-pte and export-coreml share: both lower the same calibrated graph."""
    p.add_argument("--quantized", required=True, help="folder written by `ptq4ris calibrate`")
    p.add_argument("--out", required=True, help=f"the full model's {suffix}; other {kind}s are written beside it")
    p.add_argument(
        "--stages",
        nargs="+",
        default=stages,
        choices=["full", "text", "visual"],
        help=f"quantized {kind}s to write (default: %(default)s)",
    )
    p.add_argument(
        "--output-observer",
        default="histogram",
        choices=["histogram", "minmax"],
        help="how the int8 ranges of GEMM outputs (the one step the simulation lacks) are observed "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--no-output-split",
        action="store_true",
        help="keep every GEMM output on one int8 range; by default a GEMM whose output has a few massive channels "
        "(BERT's FFN output projections) computes them in a second, narrow GEMM on a range of their own",
    )
    p.add_argument("--no-float", action="store_true", help=f"skip the float comparison {kind}")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def _add_export_pte(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-pte",
        help="lower a calibrated model to ExecuTorch .pte programs (XNNPACK) for Android",
        description="Lower a model written by `ptq4ris calibrate` to ExecuTorch programs on the XNNPACK delegate, "
        "with exactly the calibrated scales: every quantized GEMM runs as an int8 kernel (DRQ post-GELU and RORQ "
        "channel groups as several int8 streams), attention matmuls in F32 on quantized operands. Writes the full "
        "model to --out and, beside it, the stage programs (<name>.text.pte: ids -> word features; "
        "<name>.visual.pte: image + word features -> mask logits), the float program (<name>.float.pte) and the "
        "lowering report (<name>.lowering.json). Inputs are fixed: image float32 [1,3,S,S], input_ids and "
        "attention_mask int64 [1,20]. Element-wise RORQ tiers have no integer lowering: export artifacts of "
        "--method ptq4ris-deploy.",
    )
    _add_export_args(p, "program", ".pte", ["full", "text", "visual"])
    p.add_argument("--no-kernels", action="store_true", help="skip the ETDump run that lists executed kernels")
    p.set_defaults(func=_run_export_pte)


def _run_export_pte(args: argparse.Namespace) -> int:
    from mobile_runtime.export_pte import export_artifact, program_paths
    from mobile_runtime.lowering_report import format_report
    from quantize.calibration.artifact import check_quantized
    from quantize.file_kinds import is_json_object, is_pte
    from quantize.outputs import check_output_file

    out = check_output_file(args.out, "--out", (".pte",), is_pte, "ExecuTorch program")
    wanted = [*args.stages, *([] if args.no_float else ["float"])]
    for name, path in program_paths(out).items():
        if name in wanted and name != "full":
            check_output_file(path, "--out", (".pte",), is_pte, f"ExecuTorch program (the {name} program beside it)")
    check_output_file(program_paths(out)["report"], "--out", (".json",), is_json_object, "lowering report")
    check_quantized(args.quantized)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    report = export_artifact(
        args.quantized,
        out,
        stages=tuple(args.stages),
        float_program=not args.no_float,
        kernels=not args.no_kernels,
        output_observer=args.output_observer,
        split_outputs=not args.no_output_split,
        log=log,
    )
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _add_export_coreml(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-coreml",
        help="convert a calibrated model to Core ML packages (.mlpackage) for iPhone",
        description="Convert a model written by `ptq4ris calibrate` to a Core ML ML program from the same annotated "
        "PT2E graph the .pte is lowered from, so both carry the same calibrated scales: activations as Core ML "
        "quantize/dequantize ops with our scales, weights as int8 constexpr data (int4 for W4 settings, iOS18). "
        "Writes the full model to --out and, beside it, the float package (<name>.float.mlpackage), any stage "
        "packages asked for (<name>.text.mlpackage, <name>.visual.mlpackage) and an export report "
        "(<name>.coreml.json). Inputs: image float32 [1,3,S,S], input_ids and attention_mask int32 [1,20]; "
        "output: mask logits declared float32. Nothing runs Core ML off macOS: check the package with "
        "`ptq4ris parity --coreml`.",
    )
    p.add_argument(
        "--target",
        default="iOS18",
        choices=["iOS17", "iOS18"],
        help="minimum deployment target: iOS17 has int8 activations and weights, iOS18 adds int4 weights "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--precision",
        default="fp16",
        choices=["fp16", "fp32"],
        help="compute precision of the float ops: fp16 runs on the Neural Engine, fp32 on CPU/GPU only "
        "(default: %(default)s)",
    )
    _add_export_args(p, "package", ".mlpackage", ["full"])
    p.set_defaults(func=_run_export_coreml)


def _run_export_coreml(args: argparse.Namespace) -> int:
    from ios_export.export_coreml import export_artifact, package_paths
    from quantize.calibration.artifact import check_quantized
    from quantize.file_kinds import is_json_object, is_mlpackage
    from quantize.outputs import check_output_file, check_output_folder

    out = Path(args.out)
    if out.suffix != ".mlpackage":
        raise UserError(f"--out {out}: name a .mlpackage (e.g. {out.with_suffix('.mlpackage')})")
    wanted = [*args.stages, *([] if args.no_float else ["float"])]
    for name, path in package_paths(out).items():
        if name in wanted:
            check_output_folder(path, "--out", "Core ML package", recognise=is_mlpackage)
    check_output_file(package_paths(out)["report"], "--out", (".json",), is_json_object, "export report")
    check_quantized(args.quantized)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    report = export_artifact(
        args.quantized,
        out,
        stages=tuple(args.stages),
        float_package=not args.no_float,
        target=args.target,
        precision=args.precision,
        output_observer=args.output_observer,
        split_outputs=not args.no_output_split,
        log=log,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"Core ML packages ({report['target']}, {report['compute_precision']} compute precision):")
    for name, pkg in report["packages"].items():
        print(f"  {name:<7} {pkg['path']:<40} weights {pkg['weight_bytes'] / 1e6:8.2f} MB  ({pkg['seconds']:.0f} s)")
    return 0


def _add_parity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity",
        help="check that a .pte or .mlpackage computes what the calibrated model simulated",
        description="Run a full-model .pte with the ExecuTorch runtime (or a .mlpackage with the numpy MIL "
        "interpreter, fp16 storage emulated) and the simulated (fake-quant) model on the "
        "same inputs — every pair of a refer split and scikit-image's natural photographs with typed expressions — "
        "and report mask-pixel agreement, the largest logit difference (absolute and in LSBs of an 8-bit grid over "
        "the simulated logits' range), IoU deltas, and both models' mIoU / oIoU.",
    )
    backend = p.add_mutually_exclusive_group(required=True)
    backend.add_argument("--pte", help="full-model program written by `ptq4ris export-pte`")
    backend.add_argument(
        "--coreml",
        help="full-model package written by `ptq4ris export-coreml`, executed by the MIL interpreter (stage packages "
        "beside it are checked too)",
    )
    p.add_argument(
        "--first-divergence",
        action="store_true",
        help="with --coreml: run the package op by op beside the graph it was converted from, on the first pair, and "
        "name the first op whose output departs beyond tolerance",
    )
    p.add_argument("--quantized", required=True, help="the calibrated folder the program was exported from")
    _add_data_args(p)
    p.add_argument("--limit", type=positive_int, default=None, help="first N pairs of the split only (default: all)")
    p.add_argument(
        "--arm",
        action="store_true",
        help="with --pte: run the program on emulated ARM (the aarch64 native runner under qemu-aarch64 -cpu "
        "cortex-a76, XNNPACK's NEON kernels) and report its parity and its difference from x86; ~3 s per pair, so "
        "--limit defaults to 64 pairs",
    )
    p.add_argument(
        "--runner",
        default=None,
        help="with --arm: an aarch64 ptq4ris_runner (default: build/native-aarch64/ptq4ris_runner, built on first use)",
    )
    p.add_argument("--no-photos", action="store_true", help="skip the natural photographs")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.set_defaults(func=_run_parity)


def _check_program_input(path: str | None, flag: str) -> None:
    """A program or package given on the command line exists (its content is checked by the loader, before native
    code sees it)."""
    if path is None:
        return
    p = Path(path)
    if flag == "--pte":
        if p.suffix != ".pte":
            raise UserError(f"{flag} {p}: name a .pte program written by `ptq4ris export-pte`")
        from mobile_runtime.runtime import stage_paths

        text, visual = stage_paths(p)
        if not p.is_file() and not (text.is_file() and visual.is_file()):
            raise UserError(f"{flag} {p}: no such program (nor its stage programs {text.name} and {visual.name}); "
                            "export it with `ptq4ris export-pte`")  # fmt: skip
    elif not p.is_dir():
        raise UserError(f"{flag} {p}: no such Core ML package (a .mlpackage folder); export it with "
                        "`ptq4ris export-coreml`")  # fmt: skip


def _run_parity(args: argparse.Namespace) -> int:
    from mobile_runtime.parity import run_parity
    from quantize.calibration.artifact import load_quantized
    from quantize.deploy.parity_stats import format_parity

    if args.arm and not args.pte:
        raise UserError("--arm runs an ExecuTorch program on emulated ARM: give it with --pte")
    if args.first_divergence and not args.coreml:
        raise UserError("--first-divergence compares a Core ML package op by op: give it with --coreml")
    if args.out:
        from quantize.file_kinds import is_json_object
        from quantize.outputs import check_output_file

        check_output_file(args.out, "--out", (".json",), is_json_object, "parity report")
    _check_program_input(args.pte or args.coreml, "--pte" if args.pte else "--coreml")
    model, recipe, config = load_quantized(args.quantized)
    dataset = _dataset(args, model.config)
    if args.coreml:
        from ios_export import parity as coreml_parity

        report = coreml_parity.run_parity(
            model, args.coreml, dataset, limit=args.limit, photos=not args.no_photos, progress=not args.json
        )
        report.update(coreml=args.coreml)
        if args.first_divergence:
            report["first_divergence"] = _coreml_first_divergence(args, model, recipe, config, dataset)
        label = "coreml"
    elif args.arm:
        from mobile_runtime.arm_parity import arm_parity
        from mobile_runtime.native_runner import NativeRunner, build_runner

        runner = args.runner or build_runner("aarch64", log=lambda *a: print(*a, file=sys.stderr))
        report = arm_parity(
            model, args.pte, dataset, NativeRunner(runner, emulate=True), limit=args.limit or 64,
            photos=not args.no_photos, progress=not args.json,
        )  # fmt: skip
        report.update(pte=args.pte)
        label = "arm"
    else:
        report = run_parity(
            model, args.pte, dataset, limit=args.limit, photos=not args.no_photos, progress=not args.json,
            shard=args.shard,
        )  # fmt: skip
        report.update(pte=args.pte)
        label = "pte"
        if not args.shard.is_main:
            return 0  # rank 0 reports the gathered figures
    report.update(quantized=args.quantized, recipe=f"{recipe.method} {recipe.bits}")
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        from quantize.atomic import write_atomic

        write_atomic(Path(args.out), text.encode())
    print(text if args.json else format_parity(report, label))
    if not args.json and "stages" in report:
        st = report["stages"]
        print(
            f"stage packages on {st['pairs']} pairs: text features (real tokens) max |Δ| "
            f"{st['text']['max_abs_feature_diff']:.3g}, mean |Δ| {st['text']['mean_abs_feature_diff']:.3g} (features up "
            f"to {st['text']['max_abs_feature']:.3g}); visual (fed the simulated features) mask agreement "
            f"{st['visual']['mask_agreement']:.3f}%, max |Δlogit| {st['visual']['max_abs_logit_diff']:.3f}"
        )
    if not args.json and label == "arm":
        for name, r in report["sets"].items():
            d = r["arm_vs_x86"]
            print(
                f"ARM vs x86 on {name}: max |Δ| {d['max_abs_diff']:.3g} ({d['max_diff_lsb']:.2f} LSB), mask agreement "
                f"{d['mask_agreement']:.3f}%, emulated forward {d['emulated_ms_median']:.0f} ms (not a phone figure)"
            )
    if not args.json and report.get("first_divergence"):
        fd = report["first_divergence"]
        first = fd["first"]
        where = f"{first['op']} -> {first['output']} ({first['relative']:.3g} of its range)" if first else "none"
        print(f"first divergence beyond {fd['tolerance']} of range ({fd['matched_ops']} ops matched): {where}")
    return 0


def _coreml_first_divergence(args: argparse.Namespace, model, recipe, config: dict, dataset) -> dict:
    """Rebuild the graph the full package was converted from and compare op by op on the first pair."""
    from ios_export.parity import first_divergence
    from quantize.deploy.graph import calibrated_graph, calibration_inputs, table_format

    item = dataset[0]
    inputs = (item["image"][None], item["input_ids"][None], item["attention_mask"][None])
    calib = calibration_inputs(model, args.quantized, 32)
    graph, _, _ = calibrated_graph(model, "full", calib[0], calib, table=table_format(recipe))
    return first_divergence(args.coreml, graph, inputs)


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="sensitivity by layer and modality of a calibrated model",
        description="Attribute the quantization error of a calibrated model: for every layer alone, and for each "
        "modality (vision, text, fusion, decoder) alone, the SQNR of the mask logits against the float model on "
        "the calibration pairs' split, and the mIoU lost on the evaluation split. Writes OUT/sensitivity.json and "
        "OUT/sensitivity.png (default OUT: the quantized model's folder).",
    )
    p.add_argument("--quantized", required=True, metavar="DIR", help="folder written by `ptq4ris calibrate`")
    _add_data_args(p)
    p.add_argument(
        "--limit", type=positive_int, default=1000, help="evaluation pairs for the mIoU columns (default: %(default)s)"
    )
    p.add_argument("--sqnr-pairs", type=positive_int, default=32, help="pairs for the SQNR columns (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write the JSON and the plot")
    p.set_defaults(func=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from quantize.calibration.artifact import load_quantized
    from quantize.calibration.calibrate import calibration_batch
    from quantize.calibration.sensitivity import analyze, format_sensitivity, plot_sensitivity, save_json
    from quantize.file_kinds import is_json_object, is_png
    from quantize.outputs import check_output_file

    out = Path(args.out or args.quantized)
    flag = "--out" if args.out else "--quantized"
    check_output_file(out / "sensitivity.json", flag, (".json",), is_json_object, "sensitivity report")
    check_output_file(out / "sensitivity.png", flag, (".png",), is_png, "PNG")
    model, recipe, _ = load_quantized(args.quantized)
    dataset = _dataset(args, model.config)
    pairs = calibration_batch(dataset, args.sqnr_pairs)
    result = analyze(model, (pairs.images, pairs.input_ids, pairs.attention_mask), dataset, args.limit, progress=True)
    result.update(method=recipe.method, bits=recipe.bits, split=args.split)
    out.mkdir(parents=True, exist_ok=True)
    save_json(result, out / "sensitivity.json")
    plot_sensitivity(result, out / "sensitivity.png", f"{recipe.method} {recipe.bits} on {args.dataset} {args.split}")
    print(format_sensitivity(result))
    print(f"written: {out / 'sensitivity.json'}, {out / 'sensitivity.png'}")
    return 0


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment the object a sentence names in one image and write the overlay as a PNG",
        description="Run one (image, sentence) pair through a backend and write the photo with the mask overlaid. "
        "Backends: torch (the float model, or the simulated quantized one with --quantized DIR), pte (a full-model "
        ".pte from `ptq4ris export-pte`, run by the ExecuTorch host runtime with the XNNPACK kernels a phone uses), "
        "coreml-interp (a full-model .mlpackage from `ptq4ris export-coreml`, executed by the numpy MIL "
        "interpreter: Core ML itself runs on Apple devices only). Example: ptq4ris segment --image cat.jpg "
        '--text "the cat on the left" --backend pte --pte runs/demo/android/lavt-tiny-w8a8.pte --out cat.png',
    )
    p.add_argument("--image", required=True, help="a photo (any format Pillow reads)")
    p.add_argument("--text", required=True, help="the referring expression, e.g. 'the red circle on the left'")
    p.add_argument(
        "--backend", default="torch", choices=["torch", "pte", "coreml-interp"], help="(default: %(default)s)"
    )
    p.add_argument("--model", default="lavt-tiny", help="torch backend: registered model (default: %(default)s)")
    p.add_argument("--checkpoint", default=None, help="torch backend: LAVT .pth or .safetensors (lavt-b needs it)")
    p.add_argument("--quantized", default=None, metavar="DIR", help="torch backend: a `ptq4ris calibrate` folder")
    p.add_argument("--pte", default=None, help="pte backend: the full-model .pte")
    p.add_argument("--coreml", default=None, help="coreml-interp backend: the full-model .mlpackage")
    p.add_argument("--out", default="segment.png", help="the PNG to write (default: %(default)s)")
    p.set_defaults(func=_run_segment)


def _run_segment(args: argparse.Namespace) -> int:
    from demo.segment import save_overlay, segment
    from quantize.file_kinds import is_png
    from quantize.outputs import check_output_file

    check_output_file(args.out, "--out", (".png",), is_png, "PNG")  # refused before the model runs
    if Path(args.out).resolve() == Path(args.image).resolve():
        raise UserError(f"--out {args.out} is the --image photo itself: write the overlay to another file")
    if not Path(args.image).is_file():
        what = "a folder" if Path(args.image).is_dir() else "not found"
        raise UserError(f"--image {args.image}: {what}; give a photo file (any format Pillow reads)")
    if args.backend == "pte" and not args.pte:
        raise UserError("--backend pte needs the program: add --pte X.pte (from `ptq4ris export-pte`)")
    if args.backend == "coreml-interp" and not args.coreml:
        raise UserError("--backend coreml-interp needs the package: add --coreml X.mlpackage")
    if args.backend == "pte":
        _check_program_input(args.pte, "--pte")
    if args.backend == "coreml-interp":
        _check_program_input(args.coreml, "--coreml")
    if args.quantized:
        from quantize.calibration.artifact import check_quantized

        check_quantized(args.quantized)
    result = segment(
        args.image,
        args.text,
        backend=args.backend,
        model=args.model,
        checkpoint=args.checkpoint,
        quantized=args.quantized,
        pte=args.pte,
        coreml=args.coreml,
    )
    out = save_overlay(result, args.out)
    print(
        f"{args.backend}: mask covers {100 * result.area:.1f}% of the image ({result.tokens} tokens, "
        f"{1000 * result.seconds:.0f} ms); written {out}"
    )
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: quantize the embedded default, export for Android and iPhone, check, write a report",
        description="One command from the embedded lavt-tiny to phone-ready files and a report: write ShapesRef, "
        "score the float model, calibrate it with PTQ4RIS (deployable form) at --bits (and at --compare-bits for "
        "the gallery), score the simulated models, export the Android programs (the text and visual stage .pte the "
        "app loads, and the float .pte) and the iPhone .mlpackage from the same calibrated graph, check each "
        "against the simulation (the .pte on the ExecuTorch host runtime, the package with the MIL interpreter, the "
        ".pte on an emulated ARM core once the aarch64 runner is built), time float vs int8, and write "
        "OUT/report.html (self-contained) and OUT/report.json. Every step is cached under OUT/steps: run it again "
        "to reuse finished steps (after an interruption, or with another --limit, only what changed reruns). "
        "Files: OUT/android/*.pte, OUT/ios/*.mlpackage, OUT/lavt-tiny-<bits>/ (the calibrated model, for "
        "`ptq4ris evaluate --quantized` and `ptq4ris segment --quantized`).",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    p.add_argument(
        "--data", default=DEFAULT_DATA_ROOT, help="where ShapesRef is written or found (default: %(default)s)"
    )
    p.add_argument("--bits", default="w8a8", help="bit setting of the exported model: w8a8, w6a6, w4a8 or w4a4 "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--compare-bits", default="w4a4", help="a second, simulated-only setting for the gallery, the "
                   "activation figures and the sensitivity plot (default: %(default)s)")  # fmt: skip
    p.add_argument("--limit", type=positive_int, default=1000, help="val pairs scored by the float, simulated and .pte "
                   "models (default: %(default)s; ShapesRef val has 6,345)")  # fmt: skip
    p.add_argument("--coreml-limit", type=positive_int, default=100, help="val pairs for the Core ML interpreter "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--arm-limit", type=positive_int, default=8, help="val pairs on emulated ARM (default: %(default)s)")
    p.add_argument("--no-arm", action="store_true", help="skip the emulated-ARM parity (it runs when the aarch64 "
                   "runner is built: `make system-tools`, then `python -m mobile_runtime.native_runner build --target "
                   "aarch64`)")  # fmt: skip
    p.add_argument("--build-arm", action="store_true", help="build the aarch64 runner first when it is missing "
                   "(downloads the aarch64 ExecuTorch wheel once)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the calibration (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--bench", default="runs/bench", help="a `ptq4ris bench` folder whose last result the report shows "
                   "(default: %(default)s; the bench itself runs only when you ask: `ptq4ris bench`)")  # fmt: skip
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from demo.pipeline import DemoConfig, run_demo
    cfg = DemoConfig(
        out=Path(args.out), data=Path(args.data), bits=args.bits, compare_bits=args.compare_bits, limit=args.limit,
        coreml_limit=args.coreml_limit, arm=not args.no_arm, build_arm=args.build_arm, arm_limit=args.arm_limit,
        seed=args.seed, progress=not args.no_progress, bench=Path(args.bench),
    )  # fmt: skip
    report = run_demo(cfg)
    print(f"report: {Path(args.out) / 'report.html'} (and report.json)")
    for row in report["accuracy"]:
        if "skipped" in row:
            print(f"  {row['backend']:<52} skipped: {row['skipped']}")
        else:
            agree = f"  mask agreement {row['mask_agreement']:.3f}%" if "mask_agreement" in row else ""
            print(f"  {row['backend']:<52} mIoU {row['mIoU']:6.2f} on {row['pairs']:>4} pairs{agree}")
    s, lat = report["sizes"], report["latency"].get("threads=1", {})
    print(f"  .pte {s['pte_int8_bytes'] / 1e6:.1f} MB ({s['pte_ratio']:.2f}x float); host latency "
          f"{lat.get('ratio', float('nan')):.2f}x float at 1 thread; run took {report['run']['seconds']:.0f} s")  # fmt: skip
    android = Path(report["files"]["pte"])
    print(f"  Android: {android.with_suffix('.text.pte')} + {android.with_suffix('.visual.pte').name} (the app's two "
          f"programs; {android.with_suffix('.float.pte').name} for comparison)")  # fmt: skip
    print(f"  iPhone:  {report['files']['coreml']}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from quantize.calibration.recipe import BIT_SETTINGS

    from .bench import BenchConfig, peer_names

    p = sub.add_parser(
        "bench",
        help="ours and the stock flows side by side: accuracy, size, latency and instructions per forward",
        description="Build (or reuse from --out) the float program, ours at each --bits and the stock flows a user "
        "would try first, then measure them in one run: deployed mIoU/oIoU on ShapesRef val and mask agreement with "
        "float, file size, host latency interleaved at each thread count, and instructions per forward on aarch64 "
        "(qemu, cortex-a76) and x86 (callgrind), with ratios to float. Peers: the stock ExecuTorch flows, ONNX "
        "Runtime's static QDQ quantization and coremltools' own W8A8 (checked with the MIL interpreter). A flow that "
        "fails keeps its row with the error. Writes OUT/bench.json, OUT/bench.md and OUT/bench.png.",
    )
    p.add_argument("--out", default="runs/bench", help="cache and result folder (default: %(default)s)")
    p.add_argument("--refer-root", default=DEFAULT_DATA_ROOT, help="folder holding shapesref/ (default: %(default)s)")
    p.add_argument("--model", default="lavt-tiny", help="(default: %(default)s)")
    p.add_argument("--bits", nargs="+", default=["w8a8", "w4a8", "w4a4"], choices=sorted(BIT_SETTINGS),
                   help="our settings (default: %(default)s)")  # fmt: skip
    p.add_argument("--budgets", nargs="*", default=[], type=_budget_text, metavar="MB|Fx",
                   help="also ours as mixed W4/8A8 under each of these size budgets (calibrate --budget-size); "
                   "e.g. 0.18x 0.21x (default: none)")  # fmt: skip
    p.add_argument("--peers", nargs="*", default=list(BenchConfig.peers), choices=list(peer_names()),
                   help="peer flows to compare with (default: all; none: --peers)")  # fmt: skip
    p.add_argument("--pairs", type=positive_int, default=1000, help="val pairs for accuracy (default: %(default)s)")
    p.add_argument("--interpreter-pairs", type=positive_int, default=BenchConfig.interpreter_pairs,
                   help="val pairs for a Core ML package, run by the MIL interpreter at seconds a pair (default: "
                   "%(default)s)")  # fmt: skip
    p.add_argument("--calib-size", type=positive_int, default=32, help="train pairs ours and the stock flows calibrate "
                   "on (default: %(default)s)")  # fmt: skip
    p.add_argument("--runs", type=positive_int, default=30, help="interleaved latency runs (default: %(default)s)")
    p.add_argument("--threads", nargs="+", type=positive_int, default=[1, 2], help="(default: %(default)s)")
    p.add_argument("--arch", nargs="*", default=["aarch64", "x86"], choices=["aarch64", "x86"],
                   help="instruction counts to take (default: %(default)s; none: --arch)")  # fmt: skip
    p.add_argument("--build-dir", default="build", help="native runners and the qemu plugin (default: %(default)s)")
    p.add_argument("--docs", default=None, help="also write the table into this Markdown file's bench section")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from quantize.outputs import check_output_file

    from .bench import BenchConfig, format_table, run_bench, splice_into

    if Path(args.build_dir).exists() and not Path(args.build_dir).is_dir():
        raise UserError(f"--build-dir {args.build_dir} is a file; name a folder for the native runners")
    if args.docs:  # the bench section is spliced in: the rest of the file is kept
        check_output_file(Path(args.docs), "--docs", (".md",), lambda p: True)
    cfg = BenchConfig(
        out=Path(args.out), refer_root=Path(args.refer_root), model=args.model, bits=tuple(args.bits),
        budgets=tuple(args.budgets), peers=tuple(args.peers), pairs=args.pairs,
        interpreter_pairs=args.interpreter_pairs,
        calib_size=args.calib_size, runs=args.runs,
        threads=tuple(args.threads), arches=tuple(args.arch), build_dir=Path(args.build_dir),
        progress=not args.no_progress,
    )  # fmt: skip
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    report = run_bench(cfg, log=log)
    table = format_table(report)
    if args.docs:
        splice_into(Path(args.docs), table, "ptq4ris " + " ".join(sys.argv[1:]))
    print(json.dumps(report, indent=1) if args.json else table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ptq4ris",
        description="PTQ4RIS for phones: referring image segmentation models (LAVT) quantized on the host and "
        "exported for Android (ExecuTorch) and iPhone (Core ML). Start with `ptq4ris data synth` to write the "
        "ShapesRef benchmark, `ptq4ris evaluate` to score the embedded lavt-tiny model on it, and `ptq4ris "
        "calibrate` to quantize it.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at INFO level and show third-party warnings too"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error that is reported as a user's mistake (also: PTQ4RIS_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = sub.add_parser("data", help="data sets: write ShapesRef", description="Data set tools.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    _add_data_synth(data_sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_calibrate(sub)
    _add_analyze(sub)
    _add_export_pte(sub)
    _add_export_coreml(sub)
    _add_parity(sub)
    _add_segment(sub)
    _add_demo(sub)
    _add_bench(sub)
    return parser


def _check_text(argv: list[str]) -> None:
    """Text that did not decode as UTF-8 arrives as lone surrogates; the tokenizer would see garbage."""
    for i, arg in enumerate(argv):
        if arg == "--text" and i + 1 < len(argv) or arg.startswith("--text="):
            text = argv[i + 1] if arg == "--text" else arg.split("=", 1)[1]
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError("--text is not valid UTF-8: pass the sentence in UTF-8 (check the terminal's locale)")


# Commands that split their pairs over the processes torchrun launches (:mod:`quantize.distributed`).
_SHARDED_COMMANDS = ("evaluate", "parity")


def _check_shardable(args: argparse.Namespace) -> None:
    """Under torchrun, before joining the process group: the command splits its work, or it is refused."""
    if args.command not in _SHARDED_COMMANDS:
        raise UserError(
            f"`ptq4ris {args.command}` runs in one process: launch it without torchrun (torchrun shards "
            f"{' and '.join(_SHARDED_COMMANDS)})"
        )
    if args.command == "parity" and (args.coreml or args.arm):
        raise UserError(f"{'--coreml' if args.coreml else '--arm'} parity runs in one process: launch it without "
                        "torchrun (torchrun shards the .pte parity)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    def command() -> int:
        _check_text(argv)
        from quantize.distributed import launched, process_group

        shard = launched()
        if shard.world > 1:
            _check_shardable(args)
        with process_group(shard):
            args.shard = shard
            return args.func(args)

    if args.verbose:
        return run_guarded(command, debug)
    from .quiet import filter_native_stderr, quiet_known_chatter

    quiet_known_chatter()
    with filter_native_stderr():
        return run_guarded(command, debug)


if __name__ == "__main__":
    sys.exit(main())
