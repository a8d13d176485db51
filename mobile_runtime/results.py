"""The deployment part of ``docs/results.md``: exported ``.pte`` programs on the host runtime.

Usage::

    python -m mobile_runtime.results \\
        --program w8a8=runs/pte/deploy-w8a8.pte:runs/deploy-w8a8 --program w4a4=runs/pte/deploy-w4a4.pte:runs/deploy-w4a4 \\
        --float runs/pte/deploy-w8a8.float.pte

For every quantized program: parity with its simulated model on all of ShapesRef val and on natural photographs
(cached as ``docs/results-cells/pte-<name>.json``), its lowering report (partitions, fallbacks, kernels, weight
storage) and size; then one interleaved latency run of the float and quantized programs at 1 and 2 threads. The
section is written below the calibration table, replacing an earlier one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from quantize.atomic import write_atomic

from .export_pte import program_paths

__all__ = ["MARKER", "main", "render_section"]

MARKER = "<!-- deployment section: written by python -m mobile_runtime.results -->"
LATER_MARKER = "<!-- core ml section"


def _parity_cell(name: str, pte: Path, artifact: Path, refer_root: str, cache: Path) -> dict:
    """Parity of one program (cached as ``pte-<name>-parity.json``, the output of ``ptq4ris parity --out``) with
    its lowering report attached."""
    cell = cache / f"pte-{name}-parity.json"
    if cell.is_file():
        report = json.loads(cell.read_text())
    else:
        from quantize.calibration.artifact import load_quantized
        from quantize.data import open_split

        from .parity import run_parity

        model, recipe, _ = load_quantized(artifact)
        val = open_split(refer_root, "shapesref", "unc", "val", model.config)
        report = run_parity(model, str(pte), val, progress=True)
        report["recipe"] = f"{recipe.method} {recipe.bits}"
        write_atomic(cell, json.dumps(report, indent=2, default=str).encode())
    programs = json.loads(program_paths(pte)["report"].read_text())["programs"]
    keep = ("bytes", "delegation", "lowered_as", "weight_storage", "kernels", "seconds")
    if "full" in programs:
        return {**report, "lowering": {k: programs["full"][k] for k in keep}}
    # Only the stage programs were exported (what the Android app loads): the model is the two together.
    return {**report, "lowering": _combined(programs["text"], programs["visual"], keep)}


def _combined(text: dict, visual: dict, keys: tuple[str, ...]) -> dict:
    """Two programs' lowering reports as one: sizes, counts and seconds added up, nested counts merged."""

    def add(a, b):
        if isinstance(a, dict):
            return {k: add(a.get(k, 0), b.get(k, 0)) for k in {**a, **b}}
        if isinstance(a, list):
            return a + b
        return a + b

    return {k: add(text[k], visual[k]) for k in keys}


def render_section(cells: dict[str, dict], bench: dict | None, float_bytes: int | None) -> str:
    lines = [MARKER, "", "## Deployed: `.pte` programs on the ExecuTorch host runtime (XNNPACK)", ""]
    lines.append(
        "Produced by `ptq4ris export-pte` and checked by `ptq4ris parity` (the full-model program, or the text and "
        "visual programs chained where only they were exported, batch 1). "
        "Parity compares the `.pte` with the simulated model it was exported from; mIoU / oIoU in %."
    )
    lines += [
        "",
        (
            "| program | val pairs | mask agreement % | max Δlogit (LSB) | simulated mIoU / oIoU | .pte mIoU / oIoU | "
            "photos: agreement % | partitions | size MB |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in cells.items():
        val = next(v for k, v in c["sets"].items() if k != "natural photographs")
        photos = c["sets"].get("natural photographs", {})
        low = c["lowering"]
        lines.append(
            f"| {name} ({c['recipe']}) | {val['pairs']} | {val['mask_agreement']:.3f} | "
            f"{val['max_abs_logit_diff']:.2f} ({val['max_logit_diff_lsb']:.0f}) | "
            f"{val['simulated']['mIoU']:.2f} / {val['simulated']['oIoU']:.2f} | "
            f"{val['deployed']['mIoU']:.2f} / {val['deployed']['oIoU']:.2f} | "
            f"{photos.get('mask_agreement', float('nan')):.3f} | {low['delegation']['partitions']} | "
            f"{low['bytes'] / 1e6:.2f} |"
        )
    if float_bytes:
        sizes = ", ".join(f"{n} {c['lowering']['bytes'] / float_bytes:.3f}×" for n, c in cells.items())
        lines += ["", f"Size against the float program ({float_bytes / 1e6:.2f} MB): {sizes}."]
    lines += ["", "How each program was lowered (sites per way) and the XNNPACK kernels an ETDump run saw:", ""]
    for name, c in cells.items():
        low = c["lowering"]
        ways = "; ".join(f"{n} × {w}" for w, n in low["lowered_as"].items())
        kernels = ", ".join(f"{k} ×{n}" for k, n in low["kernels"].items() if "GEMM" in k or "Convolution" in k)
        left = ", ".join(f"{op} ×{n}" for op, n in low["delegation"]["non_delegated_ops"].items()) or "none"
        lines.append(
            f"- **{name}**: {ways}. Weights: "
            + "; ".join(f"{n} × {s}" for s, n in low["weight_storage"].items())
            + f". Kernels: {kernels}. Not delegated: {left}. Export: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in low["seconds"].items())
            + "."
        )
    if bench:
        lines += [
            "",
            (
                f"Host latency, {bench['runs']} interleaved runs after {bench['warmup']} warm-up runs, median ms "
                "(ratio to float), on the machine that ran this script:"
            ),
            "",
        ]
        threads = [k for k in bench if k.startswith("threads=")]
        lines.append("| program | " + " | ".join(threads) + " |")
        lines.append("|---|" + "---|" * len(threads))
        for name in bench[threads[0]]:
            row = []
            for t in threads:
                s = bench[t][name]
                ratio = next(v for k, v in s.items() if k.startswith("ratio_to_"))
                row.append(f"{s['median_ms']:.1f} ({ratio:.2f}×)")
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        sizes = bench["sizes"]
        base = next(iter(sizes.values()))
        lines += [
            "",
            "File sizes: " + ", ".join(f"{n} {b / 1e6:.2f} MB ({b / base:.3f}×)" for n, b in sizes.items()) + ".",
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mobile_runtime.results", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--program",
        action="append",
        required=True,
        metavar="NAME=PTE:ARTIFACT",
        help="a full-model .pte and the calibrated folder it came from (repeatable)",
    )
    p.add_argument("--float", dest="float_pte", default=None, help="the float .pte, for sizes and latency")
    p.add_argument("--refer-root", default="data")
    p.add_argument("--cache", default="docs/results-cells")
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args(argv)
    programs = {}
    for item in args.program:
        name, _, rest = item.partition("=")
        pte, _, artifact = rest.partition(":")
        if not (name and pte and artifact):
            p.error(f"expected NAME=PTE:ARTIFACT, got {item!r}")
        programs[name] = (Path(pte), Path(artifact))
    cache = Path(args.cache)
    cells = {n: _parity_cell(n, pte, art, args.refer_root, cache) for n, (pte, art) in programs.items()}
    bench, float_bytes = None, None
    if args.float_pte:
        from .benchmark import benchmark

        float_bytes = Path(args.float_pte).stat().st_size
        bench_file = cache / "pte-benchmark.json"
        if bench_file.is_file():
            bench = json.loads(bench_file.read_text())
        else:
            bench = benchmark(
                {"float": args.float_pte, **{n: str(pte) for n, (pte, _) in programs.items()}}, [1, 2], runs=args.runs
            )
            write_atomic(bench_file, json.dumps(bench, indent=2).encode())
    out = Path(args.out)
    text = out.read_text() if out.is_file() else ""
    head = text.split(MARKER)[0].rstrip() + "\n\n" if text else ""
    # Sections after this one (Core ML) are kept as they are.
    tail = "\n" + LATER_MARKER + text.split(LATER_MARKER, 1)[1] if LATER_MARKER in text else ""
    write_atomic(out, (head + render_section(cells, bench, float_bytes) + tail).encode())
    print(f"deployment section written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
