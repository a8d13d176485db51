"""`ptq4ris export-pte` and `ptq4ris parity` end to end on a small LAVT (one block per stage, one BERT layer):
lowering with the calibrated scales, delegation, executed int8 kernels, host-runtime parity and bad input.

The small model (lavt-tiny's trained weights, one block per stage, one BERT layer) keeps every kind of site of lavt-tiny (uniform, RORQ groups, DRQ post-GELU and post-softmax, convs,
attention matmuls) so that the whole lowering runs in CI time; the lavt-tiny figures are in docs/results.md.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from mobile_runtime.export_pte import merge_reports, program_paths
from mobile_runtime.lowering_report import format_report
from mobile_runtime.runtime import PteInputError, PteProgram
from ptq4ris.cli import main
from quantize.calibration.artifact import save_quantized
from quantize.calibration.calibrate import calibrate, calibration_batch
from quantize.calibration.recipe import make_recipe
from quantize.data import open_split
from quantize.data.shapesref import write_shapesref
from quantize.models.lavt import LAVT
from quantize.models.registry import build_model
from tests.torchrun import torchrun_json, without_wall_clock


def small_model() -> LAVT:
    """lavt-tiny cut to the first block of each Swin stage and the first BERT layer, with its trained weights: the
    masks stay structured (an untrained model's logits are all near zero, where any rounding flips pixels)."""
    tiny = build_model("lavt-tiny")
    cfg = tiny.config
    swin = replace(cfg.swin, depths=(1, 1, 1, 1))
    model = LAVT(replace(cfg, swin=swin, text=dict(cfg.text, num_hidden_layers=1))).eval()
    model.load_state_dict(tiny.state_dict(), strict=False)
    return model


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    write_shapesref(root, seed=0, split_scenes={"train": 8, "val": 8})
    return root


def _artifact(root, out, method: str, bits: str = "w8a8"):
    model = small_model()
    cfg = model.config
    train = open_split(root, "shapesref", "unc", "train", cfg)
    recipe = make_recipe(method, bits, search="none", text_groups=4, pwam_groups=2)
    batch = calibration_batch(train, 4)
    quantized, _ = calibrate(model, recipe, batch)
    calib = {"calibration": {"dataset": "shapesref", "split_by": "unc", "split": "train", "pairs": 4}}
    return save_quantized(quantized, recipe, out, "small-test", calib, calibration_inputs=batch)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    # Calibrated on a data set that is gone by the time of export: the artifact carries its calibration inputs.
    data = write_shapesref(folder / "data", seed=0, split_scenes={"train": 8})
    artifact = _artifact(data, folder / "w8a8", "ptq4ris-deploy")
    shutil.rmtree(data)
    out = folder / "pte" / "model.pte"
    argv = ["export-pte", "--quantized", str(artifact), "--out", str(out), "--json"]
    assert main(argv) == 0
    return artifact, out


def test_export_writes_every_program_and_nothing_half_written(exported):
    _, out = exported
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == sorted(
        ["model.pte", "model.text.pte", "model.visual.pte", "model.float.pte", "model.lowering.json"]
    ), names


def test_lowering_report_proves_int8_kernels(exported):
    _, out = exported
    report = json.loads(out.with_name("model.lowering.json").read_text())
    programs = report["programs"]
    for name, prog in programs.items():
        assert prog["delegation"]["partitions"] <= 3, (name, prog["delegation"])
        assert prog["delegation"]["forbidden_fallbacks"] == [], (name, prog["delegation"])
    full = programs["full"]
    assert full["kernels"].get("Fully Connected (NC, QS8, QC8W) GEMM", 0) > 0, full["kernels"]
    assert any(k.startswith("Convolution (NHWC, QC8)") for k in full["kernels"]), full["kernels"]
    assert not any("QS8" in k for k in programs["float"]["kernels"]), programs["float"]["kernels"]
    ways = full["lowered_as"]
    assert "2 int8 streams (DRQ regions)" in ways and any("RORQ channel groups" in w for w in ways)
    assert "F32 bmm; DRQ regions as exact float ops" in ways and "8-bit table (embedding_byte)" in ways
    # MiniLM's FFN output projection writes the massive residual channels: they get their own output range.
    assert any("outlier output channels" in w for w in ways), ways
    assert full["bytes"] < 0.5 * programs["float"]["bytes"]
    table = format_report(report)
    assert "full:" in table and "XNNPACK partition" in table and "kernel Fully Connected (NC, QS8, QC8W)" in table


def test_parity_of_the_deployed_program(exported, refer_root, capsys):
    artifact, out = exported
    argv = [
        "parity",
        "--pte",
        str(out),
        "--quantized",
        str(artifact),
        "--refer-root",
        str(refer_root),
        "--limit",
        "12",
        "--json",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    val, photos = report["sets"]["shapesref val"], report["sets"]["natural photographs"]
    assert val["pairs"] == 12 and photos["pairs"] >= 6
    # A wrong scale anywhere drops agreement far below this.
    assert val["mask_agreement"] > 99 and photos["mask_agreement"] > 98, report
    # The small model's masks are a few hundred pixels: on 12 pairs a handful of boundary pixels move its mIoU by
    # points, so the agreement above is the parity measure and this only catches a collapse.
    assert abs(val["deployed"]["mIoU"] - val["simulated"]["mIoU"]) < 5


def test_parity_sharded_by_torchrun_equals_one_process(exported, refer_root, capsys):
    """`torchrun --nproc-per-node 2 -m ptq4ris parity`: each rank runs its own runtime on its batches and photographs,
    rank 0 reports; every figure (agreement, SQNR, mIoU of both sides, worst pairs) equals one process's."""
    artifact, out = exported
    pairs = len(open_split(refer_root, "shapesref", "unc", "val", small_model().config))
    assert pairs > 16  # parity's batches are 16 pairs: both ranks get some
    argv = ["parity", "--pte", str(out), "--quantized", str(artifact), "--refer-root", str(refer_root), "--json"]
    assert main(argv) == 0
    single = json.loads(capsys.readouterr().out)
    sharded = torchrun_json(*argv)
    assert single["sets"]["shapesref val"]["pairs"] == pairs
    assert without_wall_clock(sharded) == without_wall_clock(single)


def test_w4a4_uses_4bit_weight_kernels_and_keeps_parity(refer_root, tmp_path, capsys):
    artifact = _artifact(refer_root, tmp_path / "w4a4", "ptq4ris-deploy", "w4a4")
    out = tmp_path / "w4.pte"
    argv = [
        "export-pte",
        "--quantized",
        str(artifact),
        "--out",
        str(out),
        "--stages",
        "full",
        "--no-float",
        "--json",
    ]
    assert main(argv) == 0
    full = json.loads(capsys.readouterr().out)["programs"]["full"]
    assert full["kernels"].get("Fully Connected (NC, QS8, QC4W) GEMM", 0) > 0, full["kernels"]
    assert full["weight_storage"].get("int4 (QC4W)", 0) > 0 and full["delegation"]["partitions"] <= 3
    argv = [
        "parity",
        "--pte",
        str(out),
        "--quantized",
        str(artifact),
        "--refer-root",
        str(refer_root),
        "--limit",
        "12",
        "--no-photos",
        "--json",
    ]
    assert main(argv) == 0
    val = json.loads(capsys.readouterr().out)["sets"]["shapesref val"]
    assert val["mask_agreement"] > 97, val


def test_pte_rejects_wrong_shapes_with_the_expected_ones(exported):
    _, out = exported
    program = PteProgram(out, names=("image", "input_ids", "attention_mask"))
    ids = torch.ones(1, 20, dtype=torch.long)
    with pytest.raises(PteInputError, match=r"image of shape \[1, 3, 128, 128\], got \[1, 3, 64, 64\]"):
        program(torch.zeros(1, 3, 64, 64), ids, ids)
    with pytest.raises(PteInputError, match="takes 3 inputs"):
        program(torch.zeros(1, 3, 128, 128), ids)
    with pytest.raises(PteInputError, match="expects input_ids as torch.int64"):
        program(torch.zeros(1, 3, 128, 128), ids.float(), ids)
    assert program(torch.zeros(1, 3, 128, 128), ids, ids).shape == (1, 2, 128, 128)


def test_export_bad_input(refer_root, tmp_path, capsys):
    assert main(["export-pte", "--quantized", str(tmp_path / "missing"), "--out", str(tmp_path / "m.pte")]) == 2
    assert "ptq4ris calibrate" in capsys.readouterr().err
    tiers = _artifact(refer_root, tmp_path / "tiers", "ptq4ris")
    argv = ["export-pte", "--quantized", str(tiers), "--out", str(tmp_path / "m.pte")]
    assert main(argv) == 2
    assert "ptq4ris-deploy" in capsys.readouterr().err
    assert not (tmp_path / "m.pte").exists()
    with pytest.raises(FileNotFoundError, match="export-pte"):
        PteProgram(tmp_path / "none.pte")
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program")
    with pytest.raises(PteInputError, match="re-export"):
        PteProgram(bad)


def test_benchmark_prints_ratios_measured_in_one_run(exported, capsys):
    from mobile_runtime.benchmark import main as bench

    _, out = exported
    assert bench([f"float={out.with_name('model.float.pte')}", f"int8={out}", "--threads", "1", "--runs", "3"]) == 0
    text = capsys.readouterr().out
    assert "threads=1" in text and "size ratio" in text
    int8_row = next(line for line in text.splitlines() if line.startswith("int8") and "." in line.split()[1])
    assert 0 < float(int8_row.split()[2]) < 0.5  # the size ratio of the int8 program


def test_reports_of_side_by_side_exports_merge_into_one(tmp_path):
    """The demo's children each write the report of their own programs; merged, they keep every program whose file
    is there, and a report of another lowering is not mixed in."""
    paths = program_paths(tmp_path / "model.pte")
    for name in ("visual", "text", "float"):
        paths[name].write_bytes(b"program")
    settings = {"version": 1, "artifact": "a", "output_observer": "histogram", "output_split": True}
    visual = {**settings, "programs": {"visual": {"bytes": 1}, "full": {"bytes": 9}}}  # full.pte is not there
    text = {**settings, "programs": {"text": {"bytes": 2}, "float": {"bytes": 3}}}
    assert set(merge_reports(visual, text, paths)["programs"]) == {"visual", "text", "float"}
    other = {**visual, "output_observer": "minmax"}
    assert merge_reports(other, text, paths) == text
