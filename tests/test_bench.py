"""``ptq4ris bench``: rows for ours, float and the stock flows, measured in one run, failures reported as rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mobile_runtime.op_profile import group_of
from ptq4ris.bench import DOCS_MARKER, format_table, splice_into

ROOT = Path(__file__).resolve().parents[1]


def _report(rows: list[dict]) -> dict:
    return {
        "config": {"threads": [1, 2], "arches": ["aarch64"]},
        "machine": {"cores": 2, "processor": "x86_64"},
        "rows": rows,
        "counts_skipped": {},
        "latency_runs": 30,
    }


def test_table_gives_ratios_to_float_and_failures_as_rows():
    rows = [
        {"name": "float", "what": "float32", "error": None, "metrics": {"pairs": 8, "mIoU": 97.0, "oIoU": 97.5,
         "size_bytes": 100e6, "latency_ms_1t": 20.0, "latency_ms_2t": 12.0, "instructions_aarch64": 1e9}},
        {"name": "ours-w8a8", "what": "ours", "error": None, "metrics": {"pairs": 8, "mIoU": 96.9, "oIoU": 97.4,
         "agreement_with_float": 99.9, "size_bytes": 27e6, "size_bytes_ratio": 0.27, "latency_ms_1t": 10.0,
         "latency_ms_1t_ratio": 0.5, "latency_ms_2t": 9.0, "latency_ms_2t_ratio": 0.75,
         "instructions_aarch64": 3e8, "instructions_aarch64_ratio": 0.3}},
        {"name": "torchao-8da4w", "what": "peer", "error": "fails at run time: RuntimeError: a | b", "metrics": {}},
    ]  # fmt: skip
    table = format_table(_report(rows))
    lines = table.splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    ours = next(line for line in lines if line.startswith("| ours-w8a8"))
    assert "27.00 (0.27×)" in ours and "10.0 (0.50×)" in ours and "300.0 (0.30×)" in ours and "99.900" in ours
    failed = next(line for line in lines if line.startswith("| torchao-8da4w"))
    assert "fails at run time" in failed and "a \\| b" in failed  # the error's own bar does not split the row
    assert failed.count("|") == lines[0].count("|") + 1  # the escaped bar


def test_a_measure_a_runtime_cannot_take_here_is_named_with_its_reason():
    rows = [
        {"name": "float", "what": "float32", "error": None, "metrics": {"pairs": 8, "mIoU": 97.0, "oIoU": 97.5,
         "size_bytes": 100e6, "latency_ms_1t": 20.0, "latency_ms_2t": 12.0, "instructions_aarch64": 1e9}},
        {"name": "coremltools-w8a8", "what": "peer", "error": None, "runtime": "coreml",
         "notes": {"latency": "Core ML runs only on Apple devices", "instructions_aarch64": "Core ML runs only on "
                   "Apple devices"}, "metrics": {"pairs": 8, "mIoU": 12.0, "oIoU": 10.0, "size_bytes": 30e6}},
        {"name": "onnxruntime-static-qdq", "what": "peer", "error": None, "runtime": "onnxruntime",
         "notes": {"instructions_aarch64": "no aarch64 ONNX Runtime here"},
         "metrics": {"pairs": 8, "mIoU": 90.0, "oIoU": 90.0, "size_bytes": 28e6, "latency_ms_1t": 15.0,
                     "latency_ms_2t": 9.0, "instructions_x86_error": "RuntimeError: valgrind died"}},
    ]  # fmt: skip
    table = format_table(_report(rows))
    core_ml = next(line for line in table.splitlines() if line.startswith("| coremltools-w8a8"))
    assert "12.00 / 10.00" in core_ml and "30.00" in core_ml
    assert "coremltools-w8a8: latency, instructions aarch64 not measured: Core ML runs only on Apple devices" in table
    assert "onnxruntime-static-qdq: instructions aarch64 not measured: no aarch64 ONNX Runtime here" in table
    assert "onnxruntime-static-qdq: instructions x86 not measured: RuntimeError: valgrind died" in table


def test_docs_section_is_replaced_and_the_rest_kept(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nmine\n\n## Later\n\nkept\n")
    splice_into(doc, "| t1 |", "ptq4ris bench")
    first = doc.read_text()
    assert first.startswith("# Results\n\nmine\n") and "## Later\n\nkept" in first and "| t1 |" in first
    splice_into(doc, "| t2 |", "ptq4ris bench")
    second = doc.read_text()
    assert "| t1 |" not in second and "| t2 |" in second and second.count(DOCS_MARKER) == 1
    assert "## Later\n\nkept" in second


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One small bench through the real CLI: ours at W8A8, the float program, the two stock ExecuTorch flows that need
    no calibration and ONNX Runtime's static QDQ (ops with weights), on a small ShapesRef; instruction counts are left
    to their own tests (--arch with no value)."""
    from quantize.data.shapesref import write_shapesref

    folder = tmp_path_factory.mktemp("bench")
    write_shapesref(folder / "refer", seed=0, split_scenes={"train": 16, "val": 4})
    out = folder / "out"
    cmd = [sys.executable, "-m", "ptq4ris", "bench", "--out", str(out), "--refer-root", str(folder / "refer"), "--bits",
           "w8a8", "--peers", "xnnpack-dynamic-int8", "torchao-8da4w", "onnxruntime-static-qdq-weighted", "--pairs",
           "4", "--calib-size", "4", "--runs",
           "3", "--threads", "1", "--arch", "--no-progress", "--json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout), done


def test_bench_measures_every_row_in_one_run(bench):
    out, report, _ = bench
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows)[:2] == ["float", "ours-w8a8"]
    for name in ("float", "ours-w8a8"):
        m = rows[name]["metrics"]
        assert rows[name]["error"] is None and m["pairs"] == 4 and 0 <= m["mIoU"] <= 100
        assert m["size_bytes"] == Path(rows[name]["path"]).stat().st_size and m["latency_ms_1t"] > 0
    ours = rows["ours-w8a8"]["metrics"]
    assert ours["size_bytes_ratio"] < 0.5  # int8 weights
    assert ours["agreement_with_float"] > 90
    for flow in ("xnnpack-dynamic-int8", "torchao-8da4w"):
        row = rows[flow]
        # Each stock flow either runs (and is measured like ours) or says how it failed.
        assert row["error"] or ("mIoU" in row["metrics"] and "latency_ms_1t" in row["metrics"]), row
    ort = rows["onnxruntime-static-qdq-weighted"]
    assert ort["error"] is None and ort["runtime"] == "onnxruntime", ort
    assert ort["metrics"]["pairs"] == 4 and ort["metrics"]["latency_ms_1t"] > 0  # timed in the same rounds
    assert ort["metrics"]["size_bytes"] == Path(ort["path"]).stat().st_size and ort["path"].endswith(".onnx")
    assert "instructions_aarch64" in ort["notes"]
    table = (out / "bench.md").read_text()
    assert all(f"\n| {name} |" in table for name in rows)
    assert "onnxruntime-static-qdq-weighted: instructions aarch64 not measured" in table
    # Where the host time goes: ours runs int8 GEMMs, float none.
    assert "int8 GEMM / conv" in rows["ours-w8a8"]["metrics"]["op_groups"]
    assert "int8 GEMM / conv" not in rows["float"]["metrics"]["op_groups"]
    assert group_of("Fully Connected (NC, QDU8, F32, QC8W) GEMM") == "int8 GEMM / conv"  # dynamic int8
    assert "| int8 GEMM / conv |" in table


def test_bench_reuses_what_it_built(bench):
    out, _, _ = bench
    built = [*(out / "pte").iterdir(), *(out / "onnxruntime").iterdir()]
    programs = {p: p.stat().st_mtime_ns for p in built}
    cmd = [sys.executable, "-m", "ptq4ris", "bench", "--out", str(out), "--refer-root", str(out.parent / "refer"),
           "--bits", "w8a8", "--peers", "xnnpack-dynamic-int8", "torchao-8da4w", "onnxruntime-static-qdq-weighted",
           "--pairs", "2", "--runs", "1", "--threads", "1", "--arch", "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "calibrating" not in done.stdout and "exporting" not in done.stdout and "building" not in done.stdout
    assert {p: p.stat().st_mtime_ns for p in built} == programs


def test_bench_refuses_a_folder_it_did_not_write(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    done = subprocess.run([sys.executable, "-m", "ptq4ris", "bench", "--out", str(folder), "--refer-root",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr and "--out" in done.stderr
    assert (folder / "notes.txt").read_text() == "keep me"
