"""``ptq4ris bench``: ours and the stock flows side by side, measured in one run.

Rows: the float program, ours (PTQ4RIS, deployable form) at each requested bit setting, the stock ExecuTorch flows of
:mod:`mobile_runtime.stock_flows` (full-model ``.pte`` programs on XNNPACK), ONNX Runtime's static QDQ quantization
(:mod:`mobile_runtime.onnxruntime_flow`) and coremltools' own W8A8 (:mod:`ios_export.coreml_stock_flow`), all from the
same float model and calibration pairs. For each row:

- deployed mIoU / oIoU on val pairs and mask agreement with the float program (host ExecuTorch runtime);
- file size;
- host latency at each thread count, all programs interleaved in one process (:mod:`mobile_runtime.benchmark`);
- instructions per forward on aarch64 (qemu, cortex-a76) and x86 (callgrind) (:mod:`mobile_runtime.instruction_count`),
  with their ratio to float: the figure machine noise cannot move.

A row measures what its runtime allows here: ONNX Runtime has no aarch64 build that runs under qemu-user here (x86
instructions only), and a Core ML package runs only on Apple devices (its accuracy comes from the MIL interpreter; no
latency, no instructions). Each gap is written in the row's notes.

A flow that fails to lower or to run keeps its row, with the error. Calibrated artifacts and programs are cached in the
output folder (a rerun reuses them); the measurements are taken afresh on every run.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from quantize.atomic import write_atomic
from quantize.errors import UserError

from .errors import one_line

if TYPE_CHECKING:  # torch loads with the bench, not with the command line that lists its peers
    import torch

__all__ = ["BENCH_KIND", "BenchConfig", "format_op_table", "format_table", "plot_bench", "run_bench", "splice_into"]

BENCH_KIND = "bench"
METHOD = "ptq4ris-deploy"
DOCS_MARKER = "<!-- bench section: written by ptq4ris bench --docs -->"

ORT_FLOW = "onnxruntime-static-qdq"
ORT_WEIGHTED_FLOW = "onnxruntime-static-qdq-weighted"
COREML_FLOW = "coremltools-w8a8"
# Peers outside ExecuTorch: name -> (runtime, what, file suffix).
OTHER_PEERS: dict[str, tuple[str, str, str]] = {
    ORT_FLOW: (
        "onnxruntime",
        "ONNX Runtime quantize_static, QDQ int8, per-channel weights, Percentile, all ops",
        ".onnx",
    ),
    ORT_WEIGHTED_FLOW: (
        "onnxruntime",
        "ONNX Runtime quantize_static, QDQ int8, per-channel weights, Percentile, ops with weights only",
        ".onnx",
    ),
    COREML_FLOW: (
        "coreml",
        "coremltools LinearQuantizerConfig W8A8 (CoreMLQuantizer, PT2E) + linear_quantize_weights, iOS17 fp16",
        ".mlpackage",
    ),
}
NOT_HERE = {
    "onnxruntime": {"instructions_aarch64": "no aarch64 ONNX Runtime runs under qemu-user here"},
    "coreml": {
        "latency": "Core ML runs only on Apple devices (accuracy from the MIL interpreter)",
        "instructions_aarch64": "Core ML runs only on Apple devices",
        "instructions_x86": "Core ML runs only on Apple devices",
    },
}


def peer_names() -> tuple[str, ...]:
    from mobile_runtime.stock_flows import STOCK_FLOWS

    return (*STOCK_FLOWS, *OTHER_PEERS)


BUDGET_BITS = "w4a8"  # the setting a size budget mixes with 8-bit weights: the deployment setting for size


@dataclass
class BenchConfig:
    out: Path
    refer_root: Path
    model: str = "lavt-tiny"
    bits: tuple[str, ...] = ("w8a8", "w4a8", "w4a4")
    budgets: tuple[str, ...] = ()  # --budget-size values for mixed W4/8A8 rows (calibrate's syntax: 19.5 or 0.18x)
    peers: tuple[str, ...] = (
        "xnnpack-static-w8a8",
        "xnnpack-dynamic-int8",
        "torchao-8da4w",
        ORT_FLOW,
        ORT_WEIGHTED_FLOW,
        COREML_FLOW,
    )
    pairs: int = 1000
    interpreter_pairs: int = 100  # a Core ML package's pairs: the MIL interpreter takes seconds a pair
    calib_size: int = 32
    runs: int = 30
    threads: tuple[int, ...] = (1, 2)
    arches: tuple[str, ...] = ("aarch64", "x86")
    build_dir: Path = Path("build")
    progress: bool = True


@dataclass
class Row:
    name: str
    what: str
    path: str | None = None
    error: str | None = None
    metrics: dict = field(default_factory=dict)
    runtime: str = "executorch"
    notes: dict[str, str] = field(default_factory=dict)  # measurement -> why this runtime cannot take it here


def _one_line(error: BaseException) -> str:
    from mobile_runtime.runtime import PteInputError

    from mobile_runtime.runtime import REEXPORT_HINT as hint  # noqa: N813

    if isinstance(error, PteInputError) and error.__cause__ is not None:
        error = error.__cause__  # the runtime's own words; our re-export hint is about our programs
    text = one_line(error).replace(f": {hint}", "")
    return f"{type(error).__name__}: {text[:300]}"


def _cli(*args: str) -> None:
    # The children's progress and summaries are the bench's log: stderr, so that stdout stays the table (or JSON).
    done = subprocess.run([sys.executable, "-m", "ptq4ris", *args], stdout=sys.stderr.fileno(), check=False)
    if done.returncode == 2:  # a user's mistake: the child has said which, in one line, above
        raise UserError(f"`ptq4ris {args[0]}` stopped the bench (its message is above)")
    if done.returncode == 130:
        raise KeyboardInterrupt
    if done.returncode != 0:
        raise RuntimeError(f"`ptq4ris {' '.join(args)}` failed with exit {done.returncode}")


def _ours(cfg: BenchConfig, bits: str, with_float: bool, log, budget: str | None = None) -> tuple[Path, Path]:
    """Calibrate and export ours at ``bits`` (mixed under ``budget`` when given) unless the cache already holds them;
    returns the program paths."""
    from mobile_runtime.export_pte import program_paths
    from quantize.calibration.artifact import check_quantized

    name = f"{cfg.model}-{bits}" + (f"-budget-{budget}" if budget else "")
    artifact = cfg.out / name
    pte = cfg.out / "pte" / f"{name}.pte"
    paths = program_paths(pte)
    try:
        check_quantized(artifact)
    except UserError:
        log(f"[{name}] calibrating ...")
        _cli("calibrate", "--model", cfg.model, "--method", METHOD, "--bits", bits, "--refer-root", str(cfg.refer_root),
             "--calib-size", str(cfg.calib_size), "--out", str(artifact),
             *(["--budget-size", budget] if budget else []))  # fmt: skip
    stamp = (artifact / "config.json").stat().st_mtime
    wanted = [paths["full"]] + ([paths["float"]] if with_float else [])
    if any(not p.is_file() or p.stat().st_mtime < stamp for p in wanted):
        log(f"[{bits}] exporting ...")
        _cli("export-pte", "--quantized", str(artifact), "--out", str(pte), "--stages", "full", "--no-kernels",
             *([] if with_float else ["--no-float"]))  # fmt: skip
    return paths["full"], paths["float"]


def _peer(cfg: BenchConfig, flow: str, model, calib, log) -> Row:
    from mobile_runtime.stock_flows import STOCK_FLOWS

    if flow in STOCK_FLOWS:
        runtime, what, suffix, folder = "executorch", STOCK_FLOWS[flow], ".pte", "pte"
    else:
        runtime, what, suffix = OTHER_PEERS[flow]
        folder = runtime
    row = Row(flow, what, runtime=runtime, notes=dict(NOT_HERE.get(runtime, {})))
    path = cfg.out / folder / f"{flow}{suffix}"
    failed = path.with_name(f"{flow}.error.json")
    import torch

    versions = {"torch": torch.__version__, **{p: _version(p) for p in _RUNTIME_PACKAGES[runtime]}}
    if failed.is_file():
        record = json.loads(failed.read_text())
        if record.get("versions") == versions:
            row.error = record["error"]
            return row
    if not path.exists():
        log(f"[{flow}] building ...")
        try:
            _build_peer(flow, runtime, model, calib, path)
        except Exception as e:  # noqa: BLE001 - a stock flow's failure is a result of the bench
            row.error = f"fails to build: {_one_line(e)}"
            write_atomic(failed, json.dumps({"error": row.error, "versions": versions}).encode())
            return row
    row.path = str(path)
    return row


_RUNTIME_PACKAGES = {
    "executorch": ("executorch", "torchao"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "coreml": ("coremltools", "executorch"),
}


def _build_peer(flow: str, runtime: str, model, calib, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if runtime == "executorch":
        from mobile_runtime.stock_flows import lower_stock_flow

        write_atomic(path, lower_stock_flow(flow, model, calib))
    elif runtime == "onnxruntime":
        from mobile_runtime.onnxruntime_flow import WEIGHTED_OPS, build_ort_static

        build_ort_static(model, calib, path, op_types=WEIGHTED_OPS if flow == ORT_WEIGHTED_FLOW else None)
    else:
        from ios_export.coreml_stock_flow import build_coreml_stock_w8a8

        build_coreml_stock_w8a8(model, calib, path)


def _load(row: Row):
    """A callable ``(image, input_ids, attention_mask) -> logits`` for the row's program on its runtime."""
    if row.runtime == "onnxruntime":
        from mobile_runtime.onnxruntime_flow import OrtProgram

        return OrtProgram(row.path)
    if row.runtime == "coreml":
        from ios_export.parity import CoreMLProgram

        return CoreMLProgram(row.path)
    from mobile_runtime.runtime import load_full_model

    return load_full_model(row.path)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _accuracy(rows: list[Row], dataset, limit: int, progress: bool, interpreter_pairs: int) -> None:
    """Deployed mIoU / oIoU of every runnable row, and its mask agreement with the float row (the first). A Core ML
    package runs in the MIL interpreter, seconds a pair: it is scored on the first ``interpreter_pairs``."""
    from quantize.metrics import RisMetrics
    from quantize.progress import progress_bar

    float_masks = None
    for row in rows:
        if row.error:
            continue
        n = min(limit, len(dataset), interpreter_pairs if row.runtime == "coreml" else limit)
        metrics, agree, masks = RisMetrics(), 0, []
        try:
            program = _load(row)
            with progress_bar(progress, total=n, desc=f"accuracy {row.name}", unit="pair") as bar:
                for i in range(n):
                    item = dataset[i]
                    logits = program(item["image"][None], item["input_ids"][None], item["attention_mask"][None])
                    pred = logits.argmax(1)
                    metrics.update(pred, item["target"][None], [dataset.samples[i].kind])
                    masks.append(pred[0].bool())
                    if float_masks is not None:
                        agree += int((pred[0].bool() == float_masks[i]).sum())
                    bar.update(1)
        except Exception as e:  # noqa: BLE001 - a program that fails at run time is a row of the bench
            row.error = f"fails to load or run: {_one_line(e)}"
            continue
        summary = metrics.summary()
        row.metrics.update(pairs=n, mIoU=summary["mIoU"], oIoU=summary["oIoU"])
        if float_masks is None:
            float_masks = masks
        else:
            row.metrics["agreement_with_float"] = 100 * agree / (n * masks[0].numel())


def _latency(rows: list[Row], cfg: BenchConfig) -> dict:
    from mobile_runtime.benchmark import benchmark, program_size

    timed = [row for row in rows if not row.error and "latency" not in row.notes]
    report = benchmark({row.name: row.path for row in timed}, list(cfg.threads), runs=cfg.runs, warmup=3)
    for row in rows:
        if row.error:
            continue
        row.metrics["size_bytes"] = program_size(row.path)
        if row not in timed:
            continue
        for threads in cfg.threads:
            row.metrics[f"latency_ms_{threads}t"] = report[f"threads={threads}"][row.name]["median_ms"]
    return report


def _op_profile(rows: list[Row], inputs: tuple[torch.Tensor, ...]) -> None:
    """Host time per forward by XNNPACK operator group (ETDump): where the programs spend it besides their GEMMs."""
    from mobile_runtime.op_profile import op_time_by_group, op_time_by_kind

    for row in rows:
        if row.error or row.runtime != "executorch":
            continue
        try:
            row.metrics["op_groups"] = op_time_by_group(op_time_by_kind(row.path, inputs))
        except RuntimeError as e:
            row.metrics["op_groups_error"] = _one_line(e)


def _instructions(rows: list[Row], cfg: BenchConfig, inputs: tuple[torch.Tensor, ...], log) -> dict[str, str]:
    from mobile_runtime.instruction_count import count_instructions
    from mobile_runtime.native_runner import ToolMissing

    skipped = {}
    for arch in cfg.arches:
        for row in rows:
            if row.error or f"instructions_{arch}" in row.notes:
                continue
            log(f"[{row.name}] counting {arch} instructions ...")
            try:
                if row.runtime == "onnxruntime":
                    from mobile_runtime.onnxruntime_flow import count_ort_instructions_x86

                    count = count_ort_instructions_x86(row.path, inputs)
                else:
                    count = count_instructions(row.path, inputs, arch, cfg.build_dir).per_forward
                row.metrics[f"instructions_{arch}"] = count
            except ToolMissing as e:
                skipped[arch] = str(e)
                break
            except (RuntimeError, UserError) as e:
                row.metrics[f"instructions_{arch}_error"] = _one_line(e)
    return skipped


def _check_budgets(cfg: BenchConfig, model) -> None:
    """Each --budgets value against the model's smallest program, before anything is built."""
    from quantize.calibration.bit_allocation import budget_bytes, parse_budget
    from quantize.calibration.recipe import make_recipe

    recipe = make_recipe(METHOD, BUDGET_BITS)
    for budget in cfg.budgets:
        try:
            budget_bytes(parse_budget(budget), model, recipe)
        except UserError as e:
            raise UserError(f"--budgets {budget}: {e}") from None


def run_bench(cfg: BenchConfig, log=print) -> dict:
    from quantize.data import open_split
    from quantize.deploy.graph import calibration_inputs
    from quantize.models.registry import build_model
    from quantize.outputs import check_output_folder, write_manifest

    if not cfg.bits:
        raise UserError("--bits needs at least one setting: the float program comes from its export")
    check_output_folder(cfg.out, "--out", BENCH_KIND)
    start = time.perf_counter()
    model = build_model(cfg.model)
    dataset = open_split(cfg.refer_root, "shapesref", "unc", "val", model.config)  # refused before anything is written
    _check_budgets(cfg, model)
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_manifest(cfg.out, BENCH_KIND)

    rows: list[Row] = []
    float_path = None
    for i, bits in enumerate(cfg.bits):
        full, floating = _ours(cfg, bits, with_float=i == 0, log=log)
        float_path = float_path or floating
        rows.append(Row(f"ours-{bits}", f"PTQ4RIS deployable {bits.upper()}", str(full)))
    for budget in cfg.budgets:
        full, _ = _ours(cfg, BUDGET_BITS, with_float=False, log=log, budget=budget)
        rows.append(Row(f"ours-budget-{budget}", f"PTQ4RIS deployable W4/8A8, size budget {budget}", str(full)))
    rows.insert(0, Row("float", "float32 (XNNPACK)", str(float_path)))
    calib = calibration_inputs(model, cfg.out / f"{cfg.model}-{cfg.bits[0]}")
    for flow in cfg.peers:
        rows.append(_peer(cfg, flow, model, calib, log))

    log(f"accuracy on {min(cfg.pairs, len(dataset))} val pairs ...")
    _accuracy(rows, dataset, cfg.pairs, cfg.progress, cfg.interpreter_pairs)
    log(f"latency: {cfg.runs} interleaved runs at {', '.join(map(str, cfg.threads))} thread(s) ...")
    latency = _latency(rows, cfg)
    item = dataset[0]
    inputs = (item["image"][None], item["input_ids"][None], item["attention_mask"][None])
    log("host time by operator group (ETDump) ...")
    _op_profile(rows, inputs)
    skipped = _instructions(rows, cfg, inputs, log)

    base = rows[0].metrics
    for row in rows[1:]:
        for key in (
            "size_bytes",
            *(f"latency_ms_{t}t" for t in cfg.threads),
            *(f"instructions_{a}" for a in cfg.arches),
        ):
            if key in row.metrics and base.get(key):
                row.metrics[f"{key}_ratio"] = row.metrics[key] / base[key]
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": {"processor": platform.processor() or platform.machine(), "cores": _cores()},
        "rows": [asdict(r) for r in rows],
        "counts_skipped": skipped,
        "latency_runs": latency["runs"],
        "seconds": time.perf_counter() - start,
    }
    write_atomic(cfg.out / "bench.json", json.dumps(report, indent=1).encode())
    write_atomic(cfg.out / "bench.md", (format_table(report) + "\n").encode())
    write_atomic(cfg.out / "bench.png", plot_bench(report))
    return report


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cell(metrics: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    if key not in metrics:
        return "–"
    ratio = metrics.get(f"{key}_ratio")
    value = format(metrics[key] * scale, fmt)
    return f"{value} ({ratio:.2f}×)" if ratio is not None else value


def format_table(report: dict) -> str:
    """The bench as a Markdown table (ratios are to the float row, measured in the same run)."""
    cfg = report["config"]
    threads = cfg["threads"]
    head = ["row", "what", "mIoU / oIoU", "agreement with float %", "size MB"]
    head += [f"latency {t} thread{'s' if t > 1 else ''} ms" for t in threads]
    head += [f"{a} instructions (M)" for a in cfg["arches"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        m = row["metrics"]
        if row["error"]:
            cells = [row["name"], row["what"], row["error"].replace("|", "\\|")] + ["–"] * (len(head) - 3)
        else:
            accuracy = f"{m['mIoU']:.2f} / {m['oIoU']:.2f}" if "mIoU" in m else "–"
            agreement = f"{m['agreement_with_float']:.3f}" if "agreement_with_float" in m else "–"
            cells = [row["name"], row["what"], accuracy, agreement, _cell(m, "size_bytes", ".2f", 1e-6)]
            cells += [_cell(m, f"latency_ms_{t}t", ".1f") for t in threads]
            cells += [_cell(m, f"instructions_{a}", ",.1f", 1e-6) for a in cfg["arches"]]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = next((r["metrics"]["pairs"] for r in report["rows"] if "pairs" in r["metrics"]), 0)
    lines += [
        "",
        f"ShapesRef val, first {pairs} pairs; latency: median of {report['latency_runs']} interleaved runs after 3 "
        f"warm-up runs on {report['machine']['cores']} cores ({report['machine']['processor']}); instructions: one "
        "forward at one thread, aarch64 under qemu -cpu cortex-a76, x86 under callgrind. Ratios are to float.",
    ]
    for arch, reason in report.get("counts_skipped", {}).items():
        lines.append(f"{arch} instructions not counted: {reason}")
    for row in report["rows"]:
        n = row["metrics"].get("pairs")
        if n is not None and n != pairs:
            lines.append(f"{row['name']}: accuracy and agreement on the first {n} pairs (MIL interpreter)")
    for row in report["rows"]:
        if row.get("error"):
            continue
        gaps: dict[str, list[str]] = {}
        for measure, why in row.get("notes", {}).items():
            gaps.setdefault(why, []).append(measure.replace("_", " "))
        for key in (k for k in row["metrics"] if k.endswith("_error")):
            gaps.setdefault(row["metrics"][key], []).append(key.removesuffix("_error").replace("_", " "))
        for why, measures in gaps.items():
            lines.append(f"{row['name']}: {', '.join(measures)} not measured: {why}")
    lines += ["", *format_op_table(report)]
    return "\n".join(lines)


def format_op_table(report: dict) -> list[str]:
    """Host ms per forward (operators per forward) by XNNPACK operator group, one column per program."""
    rows = [r for r in report["rows"] if "op_groups" in r["metrics"]]
    if not rows:
        return []
    groups = list(dict.fromkeys(g for r in rows for g in r["metrics"]["op_groups"]))
    lines = [
        "Host time per forward by XNNPACK operator group, ms (operators), from an ETDump run at the default thread "
        "count:",
        "",
        "| operator group | " + " | ".join(r["name"] for r in rows) + " |",
        "|" + "---|" * (len(rows) + 1),
    ]
    for group in [*groups, "total"]:
        cells = []
        for r in rows:
            stats = r["metrics"]["op_groups"]
            if group == "total":
                cells.append(f"{sum(s['ms'] for s in stats.values()):.2f} ({sum(s['count'] for s in stats.values())})")
            else:
                cells.append(f"{stats[group]['ms']:.2f} ({stats[group]['count']})" if group in stats else "–")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return lines


def plot_bench(report: dict) -> bytes:
    """Accuracy against size, each program's marker area proportional to its aarch64 instructions (x86 where aarch64
    was not counted): the trade-off of the table in one picture, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cost = next((f"instructions_{a}" for a in ("aarch64", "x86") if any(f"instructions_{a}" in r["metrics"]
                 for r in report["rows"])), None)  # fmt: skip
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    runs = [r for r in report["rows"] if "mIoU" in r["metrics"] and "size_bytes" in r["metrics"]]
    top = max((r["metrics"].get(cost, 0) for r in runs), default=0) if cost else 0
    for r in runs:
        m = r["metrics"]
        area = 40 + 400 * (m[cost] / top) if cost and top and cost in m else 60
        ours = r["name"].startswith("ours")
        ax.scatter(m["size_bytes"] / 1e6, m["mIoU"], s=area, alpha=0.6, color="tab:green" if ours else "tab:gray"
                   if r["name"] == "float" else "tab:red", edgecolor="black")  # fmt: skip
        label = r["name"] + (f"\n{m[cost + '_ratio']:.2f}× instr." if f"{cost}_ratio" in m else "")
        ax.annotate(label, (m["size_bytes"] / 1e6, m["mIoU"]), fontsize=7, xytext=(6, 4), textcoords="offset points")
    ax.set_xlabel("program size (MB)")
    ax.set_ylabel("deployed mIoU (%)")
    arch = cost.split("_")[1] if cost else None
    ax.set_title(f"accuracy, size and {arch} instructions per forward (marker area)" if arch else "accuracy and size")
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def splice_into(doc: Path, table: str, command: str) -> None:
    """Replace the bench section of ``doc`` (from its marker to the next ``## `` heading), or append it."""
    section = f"{DOCS_MARKER}\n\n## Bench: ours and the stock flows\n\nReproduce with `{command}`.\n\n{table}\n"
    text = doc.read_text() if doc.is_file() else ""
    if DOCS_MARKER in text:
        before, _, after = text.partition(DOCS_MARKER)
        rest = after.split("\n## ", 2)
        tail = "\n## " + rest[2] if len(rest) > 2 else ""
        text = before + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_atomic(doc, text.encode())
