"""The results table: every calibration method at every bit setting, evaluated on ShapesRef val.

    python -m quantize.results --refer-root data --out docs/results.md [--only ptq4ris minmax] [--bits w4a4]

Each cell (method × bits) calibrates lavt-tiny on the first expression of the first 32 train refs, evaluates the
simulated model on every val pair, and is cached as JSON under ``--cache`` so that an interrupted run resumes and
the table can be filled over several runs (or machines). The Markdown table is rewritten from the cache every time.
``torchrun --nproc-per-node N -m quantize.results ...`` spreads the cells over N processes (cell i on rank i mod N).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .atomic import write_atomic
from .calibration.recipe import BIT_SETTINGS, METHODS, make_recipe
from .distributed import Shard, launched, process_group

__all__ = ["ROWS", "cell_recipe", "main", "render"]

# Row order of the table: (row key, method, recipe overrides, label).
ROWS: list[tuple[str, str, dict, str]] = [
    ("stock-xnnpack", "stock-xnnpack", {}, "ExecuTorch XNNPACKQuantizer (stock PT2E)"),
    ("minmax", "minmax", {}, "min-max, per tensor (BasePTQ-like)"),
    ("percentile", "percentile", {}, "percentile 99.99, per-channel weights"),
    ("ptq4vit", "ptq4vit", {}, "PTQ4ViT (twin-uniform, Hessian search)"),
    ("ptq4ris", "ptq4ris", {}, "PTQ4RIS, element-wise RORQ tiers"),
    (
        "ptq4ris-deploy",
        "ptq4ris-deploy",
        {},
        "PTQ4RIS, deployable RORQ (channel groups, tier slices below A8), GPTQ weights below W8",
    ),
    (
        "ptq4ris-deploy-nearest",
        "ptq4ris-deploy",
        {"weights": "nearest"},
        "PTQ4RIS deployable, weights rounded to nearest",
    ),
    (
        "ptq4ris-deploy-bias-correction",
        "ptq4ris-deploy",
        {"bias_correction": True},
        "PTQ4RIS deployable (GPTQ below W8) + bias correction",
    ),
    (
        "ptq4ris-deploy-budget-0.155x",
        "ptq4ris-deploy",
        {"budget_size": "0.155x"},
        "PTQ4RIS deployable, 8-bit weights where they pay most within 0.155× the float program (W4/8A8)",
    ),
    ("drq-only", "drq-only", {}, "DRQ only (no RORQ)"),
    ("rorq-only", "rorq-only", {}, "RORQ only (no DRQ)"),
    ("ptq4ris-pwam-plain", "ptq4ris", {"pwam": "plain"}, "PTQ4RIS, PWAM without channel groups"),
    ("ptq4ris-drq-a4", "ptq4ris", {"drq_min_bits": 3}, "PTQ4RIS tiers with DRQ kept at A4 (3-bit regions)"),
    (
        "ptq4ris-deploy-drq-a4",
        "ptq4ris-deploy",
        {"drq_min_bits": 3, "weights": "nearest"},
        "PTQ4RIS groups and tier slices with DRQ kept at A4 (nearest weights)",
    ),
    (
        "ptq4ris-deploy-96-groups",
        "ptq4ris-deploy",
        {"text_groups": 96, "text_tiers": 1, "drq_min_bits": 3, "weights": "nearest"},
        "PTQ4RIS deployable, 96 text groups without tier slices (DRQ at A4, nearest weights)",
    ),
]

# Rows that differ from their preset at some bit settings only; elsewhere the cell would repeat the preset's.
ROW_BITS: dict[str, tuple[str, ...]] = {
    "ptq4ris-drq-a4": ("w4a4",),
    "ptq4ris-deploy-drq-a4": ("w4a4",),
    "ptq4ris-deploy-96-groups": ("w4a4",),
    # GPTQ applies below 8-bit weights only: at W8A8 both rows would repeat the preset.
    "ptq4ris-deploy-nearest": ("w6a6", "w4a8", "w4a4"),
    "ptq4ris-deploy-bias-correction": ("w4a8", "w4a4"),
    # A size budget chooses between 4- and 8-bit weights; at 0.155x only the W4A8 program fits.
    "ptq4ris-deploy-budget-0.155x": ("w4a8",),
}
# What the other cells of such a row say (default: the preset's cell would repeat).
ROW_ELSEWHERE: dict[str, str] = {"ptq4ris-deploy-budget-0.155x": "does not apply"}

# The paper's LAVT numbers on RefCOCO val (mIoU / oIoU), from its README.
PAPER = {
    "fp": (74.31, 72.72),
    "w8a8": (73.54, 72.33),
    "w6a6": (72.85, 71.90),
    "w4a8": (72.62, 71.48),
    "w4a4": (69.53, 69.21),
}


def _evaluate_cell(key: str, method: str, overrides: dict, bits: str, args, model, dataset, calib) -> dict:
    from .calibration.calibrate import calibrate
    from .evaluate import evaluate

    start = time.perf_counter()
    if method == "stock-xnnpack":
        from .calibration.stock_xnnpack import stock_xnnpack_quantize

        weight_bits, act_bits = BIT_SETTINGS[bits]
        pairs = [
            (calib.images[i : i + 1], calib.input_ids[i : i + 1], calib.attention_mask[i : i + 1])
            for i in range(len(calib))
        ]
        quantized = stock_xnnpack_quantize(model, pairs, weight_bits, act_bits)
    else:
        recipe = cell_recipe(method, bits, overrides, model, calib, args.device)
        quantized, _ = calibrate(model, recipe, calib, device=args.device)
    seconds = time.perf_counter() - start
    result = evaluate(quantized, dataset, batch_size=32, device=args.device, limit=args.limit)
    return {
        "row": key,
        "bits": bits,
        "mIoU": result["mIoU"],
        "oIoU": result["oIoU"],
        "mIoU_by_kind": result.get("mIoU_by_kind", {}),
        "pairs": result["pairs"],
        "calibration_seconds": seconds,
    }


def cell_recipe(method: str, bits: str, overrides: dict, model, calib, device):
    """The cell's recipe; a ``budget_size`` override allocates weight bits under that budget first, as
    ``ptq4ris calibrate --budget-size`` does (sensitivity on the same spread of the calibration pairs)."""
    overrides = dict(overrides)
    budget = overrides.pop("budget_size", None)
    recipe = make_recipe(method, bits, **overrides)
    if budget is None:
        return recipe
    from .calibration.bit_allocation import SENSITIVITY_PAIRS, allocate_weight_bits, budget_bytes, parse_budget

    size = budget_bytes(parse_budget(budget), model, recipe)
    recipe, _ = allocate_weight_bits(model, recipe, calib.spread(SENSITIVITY_PAIRS).chunks(32, device), size)
    return recipe


def render(cache: Path) -> str:
    """The Markdown table from the cached cells."""
    cells = {}
    for f in sorted(cache.glob("*.json")):
        cell = json.loads(f.read_text())
        if "row" in cell:  # the deployment section's cells (pte-*.json) share the folder
            cells[(cell["row"], cell["bits"])] = cell
    fp = cells.get(("fp", "fp"))
    bits = list(BIT_SETTINGS)
    lines = [
        "# Results: quantizing lavt-tiny on ShapesRef val",
        "",
        (
            "Generated by `python -m quantize.results` (cells cached as JSON under `docs/results-cells/`). Calibration: the first "
            "expression of each of the first 32 refs of ShapesRef **train**; evaluation: every pair of val "
            f"({fp['pairs'] if fp else '?'} pairs), mIoU / oIoU in %. Calibration time in seconds at W8A8 on the "
            "machine that ran the cell. A dash is a cell not run yet."
        ),
        "",
        (
            "At A4 each DRQ region has 3 bits; both PTQ4RIS presets use DRQ from A5 up (the `…DRQ kept at A4` rows "
            "are the other choice; the `drq-only` ablation keeps DRQ at every setting). `ptq4ris-deploy` gives every "
            "text-encoder Linear input range-ordered channel groups (2 at A8, 8 below) and, below A8, RORQ's "
            "magnitude tiers as residual slices: the groups quantize the input clamped at the first 3σ threshold, "
            "each further tier is the part beyond its threshold, over the channels that reach it, on its own grid. "
            "Every group and slice is one int8 GEMM once deployed (at W4A4 a text input has 8 + 1 to 3 of them; 96 "
            "groups without slices, the earlier form, score 2 mIoU less)."
        ),
        "",
        "| Method | " + " | ".join(f"{b.upper()} mIoU / oIoU" for b in bits) + " | calib. s (W8A8) |",
        "|---|" + "---|" * (len(bits) + 1),
    ]
    if fp:
        lines.append("| FP (float) | " + " | ".join(f"{fp['mIoU']:.2f} / {fp['oIoU']:.2f}" for _ in bits) + " | – |")
    for key, _, _, label in ROWS:
        row = []
        for b in bits:
            c = cells.get((key, b))
            if b not in ROW_BITS.get(key, bits):
                row.append(ROW_ELSEWHERE.get(key, "same as preset"))
                continue
            row.append(f"{c['mIoU']:.2f} / {c['oIoU']:.2f}" if c else "–")
        w8 = cells.get((key, "w8a8"))
        seconds = f"{w8['calibration_seconds']:.0f}" if w8 else "–"
        lines.append(f"| {label} | " + " | ".join(row) + f" | {seconds} |")
    lines += [
        "",
        "For reference, the paper's PTQ4RIS on LAVT (Swin-B + BERT-base), RefCOCO val, mIoU / oIoU: "
        + ", ".join(f"{k.upper()} {v[0]:.2f} / {v[1]:.2f}" for k, v in PAPER.items())
        + ". Different model and data: compare the drops, not the levels.",
        "",
    ]
    return "\n".join(lines)


# Sections written by later stages (the deployment section of mobile_runtime.results) start at such a marker and
# survive a re-render of the calibration table.
_LATER_SECTIONS = "<!-- deployment section"


def _write_table(out: Path, table: str) -> None:
    tail = ""
    if out.is_file() and _LATER_SECTIONS in out.read_text():
        text = out.read_text()
        tail = "\n" + text[text.index(_LATER_SECTIONS) :]
    write_atomic(out, table + tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize.results", description=__doc__.split("\n\n")[0])
    p.add_argument("--refer-root", default="data", help="refer root holding shapesref/ with train and val")
    p.add_argument("--out", default="docs/results.md", help="Markdown table to write (default: %(default)s)")
    p.add_argument("--cache", default="docs/results-cells", help="folder of cached cells (default: %(default)s)")
    p.add_argument("--only", nargs="+", default=None, help="row keys to run, fp for the float row (default: all)")
    p.add_argument("--bits", nargs="+", default=list(BIT_SETTINGS), choices=list(BIT_SETTINGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N val pairs only (smoke runs)")
    p.add_argument("--render-only", action="store_true", help="rewrite the table from the cache, run nothing")
    args = p.parse_args(argv)
    cache = Path(args.cache)
    shard = launched()
    with process_group(shard):
        if not args.render_only:
            _run_cells(args, cache, shard)
        if shard.is_main:
            _write_table(Path(args.out), render(cache))
            print(f"table written to {args.out}")
    return 0


def _cells(args) -> list[tuple[str, str, dict, str]]:
    """(row key, method, overrides, bits) of every cell the arguments ask for, in table order."""
    cells = [("fp", "fp", {}, "fp")] if not args.only or "fp" in args.only else []
    for key, method, overrides, _ in ROWS:
        if args.only and key not in args.only:
            continue
        if method not in METHODS and method != "stock-xnnpack":
            continue
        cells.extend((key, method, overrides, bits) for bits in args.bits if bits in ROW_BITS.get(key, BIT_SETTINGS))
    return cells


def _run_cells(args, cache: Path, shard: Shard) -> None:
    """Compute the cells missing from the cache; under torchrun cell i runs on rank i mod N (each writes its own
    cell files; rank 0 renders the table once all are in)."""
    from .calibration.calibrate import calibration_batch
    from .data import open_split
    from .evaluate import evaluate
    from .models.registry import build_model

    todo = [c for c in _cells(args) if not (cache / f"{c[0]}-{c[3]}.json").is_file()]
    mine = shard.items(todo)
    if mine:
        model = build_model("lavt-tiny")
        val = open_split(args.refer_root, "shapesref", "unc", "val", model.config)
        train = open_split(args.refer_root, "shapesref", "unc", "train", model.config)
        calib = calibration_batch(train, 32)
    for _, (key, method, overrides, bits) in mine:
        if key == "fp":
            r = evaluate(model, val, device=args.device, limit=args.limit)
            cell = {"row": "fp", "bits": "fp", "mIoU": r["mIoU"], "oIoU": r["oIoU"], "pairs": r["pairs"]}
        else:
            cell = _evaluate_cell(key, method, overrides, bits, args, model, val, calib)
        write_atomic(cache / f"{key}-{bits}.json", json.dumps(cell))
        print(f"{key} {bits}: mIoU {cell['mIoU']:.2f} oIoU {cell['oIoU']:.2f}", flush=True)
        if shard.world == 1:
            _write_table(Path(args.out), render(cache))
    shard.gather(None)  # every rank's cells are written before rank 0 renders


if __name__ == "__main__":
    sys.exit(main())
