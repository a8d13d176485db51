"""The results table renders from cached cells, and shows which cells are missing."""

import json

from quantize.results import ROWS, main, render


def _cell(tmp_path, row, bits, miou, oiou, seconds=12.0):
    cell = {"row": row, "bits": bits, "mIoU": miou, "oIoU": oiou, "pairs": 6345, "calibration_seconds": seconds}
    (tmp_path / f"{row}-{bits}.json").write_text(json.dumps(cell))


def test_table_from_cache(tmp_path):
    _cell(tmp_path, "fp", "fp", 97.15, 97.2)
    _cell(tmp_path, "ptq4ris", "w8a8", 97.01, 96.99, seconds=95.4)
    _cell(tmp_path, "ptq4ris", "w4a4", 91.5, 90.25)
    table = render(tmp_path)
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "| FP (float)" in lines and "97.15 / 97.20" in lines["| FP (float)"]
    ptq4ris = next(line for line in table.splitlines() if line.startswith("| PTQ4RIS, element-wise"))
    assert ptq4ris.split(" | ")[1:] == ["97.01 / 96.99", "–", "–", "91.50 / 90.25", "95 |"]
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 2 + len(ROWS)  # header + FP + rows
    assert "6345 pairs" in table and "73.54 / 72.33" in table  # the paper's W8A8 for reference


def test_render_only_writes_atomically(tmp_path):
    _cell(tmp_path, "fp", "fp", 97.15, 97.2)
    out = tmp_path / "docs" / "results.md"
    assert main(["--cache", str(tmp_path), "--out", str(out), "--render-only"]) == 0
    assert out.read_text().startswith("# Results")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_budget_row_allocates_weight_bits_within_its_budget(tmp_path):
    """A row with a ``budget_size`` override calibrates the recipe ``ptq4ris calibrate --budget-size`` would."""
    from quantize.calibration.bit_allocation import check_budget, float_program_bytes
    from quantize.calibration.calibrate import calibration_batch
    from quantize.calibration.recipe import make_recipe
    from quantize.data import open_split
    from quantize.data.shapesref import write_shapesref
    from quantize.results import cell_recipe

    from .test_export_pte import small_model

    write_shapesref(tmp_path, seed=0, split_scenes={"train": 4})
    model = small_model()
    calib = calibration_batch(open_split(tmp_path, "shapesref", "unc", "train", model.config), 4)
    overrides = {"search": "none", "text_groups": 4, "pwam_groups": 2}
    plain = make_recipe("ptq4ris-deploy", "w4a8", **overrides)
    low, high = check_budget(model, plain, 10**12)
    fraction = (low + high) / 2 / float_program_bytes(model)
    recipe = cell_recipe(
        "ptq4ris-deploy", "w4a8", {**overrides, "budget_size": f"{fraction:.4f}x"}, model, calib, "cpu"
    )
    assert recipe.mixed and 0 < len(recipe.layer_weight_bits)
    assert cell_recipe("ptq4ris-deploy", "w4a8", overrides, model, calib, "cpu") == plain
